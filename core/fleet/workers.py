"""Worker registry: which workers exist, what device they declare, what they hold,
when they were last seen, and which are gone.

A GPU worker publishes its ``Inventory`` with every heartbeat; the scheduler reads
the live ones (``live_gpu_workers``) to place jobs, and marks a worker whose
heartbeat stopped gone (``mark_gone``): it is never placed on again, and the jobs
placed on it but not started go back to the queue (core.fleet.placing).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Worker, utcnow
from core.errors import InvalidInput

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "GB": 10**9, "MB": 10**6}


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776. Accepts B, KiB, MiB, GiB, MB, GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise InvalidInput(f"not a size: {text!r} (try '24GiB')")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def new_worker_id(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Inventory:
    """What a GPU worker holds, as of ``taken_at``."""

    vram_free_bytes: int | None
    profiles: list[str] = field(default_factory=list)  # base pipelines, least recent first
    loras: dict[str, list[str]] = field(default_factory=dict)  # tier -> LoRA sha256s
    busy_until: datetime | None = None  # when the running job is expected to end
    taken_at: datetime = field(default_factory=utcnow)

    def columns(self) -> dict[str, Any]:
        return {
            "vram_free_bytes": self.vram_free_bytes,
            "profiles": self.profiles,
            "loras": self.loras,
            "busy_until": self.busy_until,
            "inventory_at": self.taken_at,
        }


async def register_worker(
    session: AsyncSession,
    *,
    worker_id: str,
    name: str,
    pool: str,
    device: str,
    vram_bytes: int,
    queue: str,
) -> None:
    stmt = insert(Worker).values(
        id=worker_id, name=name, pool=pool, device=device, vram_bytes=vram_bytes, queue=queue
    )
    await session.execute(stmt.on_conflict_do_nothing())


async def touch_worker(
    session: AsyncSession, worker_id: str, inventory: Inventory | None = None
) -> None:
    """The heartbeat: last_seen, and the inventory of a GPU worker. A worker marked
    gone whose heartbeat comes back (a pause, a network blip) is live again; the
    job it ran was requeued meanwhile and its own attempt stops on its next beat."""
    this = col(Worker.id) == worker_id
    await session.execute(update(Worker).where(this).values(last_seen=func.now(), gone_at=None))
    if inventory is not None:
        newer = or_(
            col(Worker.inventory_at).is_(None), col(Worker.inventory_at) < inventory.taken_at
        )
        await session.execute(update(Worker).where(this, newer).values(**inventory.columns()))


async def live_gpu_workers(session: AsyncSession, stale_after: timedelta) -> list[Worker]:
    """GPU workers heard from within ``stale_after``, neither stopped nor gone."""
    query = select(Worker).where(
        col(Worker.pool) == "gpu",
        col(Worker.stopped_at).is_(None),
        col(Worker.gone_at).is_(None),
        col(Worker.last_seen) >= func.now() - stale_after,
    )
    return list((await session.exec(query)).all())


async def mark_gone(session: AsyncSession, stale_after: timedelta) -> list[str]:
    """Mark the workers whose heartbeat stopped gone; their ids."""
    stmt = (
        update(Worker)
        .where(
            col(Worker.gone_at).is_(None),
            col(Worker.stopped_at).is_(None),
            col(Worker.last_seen) < func.now() - stale_after,
        )
        .values(gone_at=func.now())
        .returning(col(Worker.id))
    )
    return list((await session.execute(stmt)).scalars().all())


async def stop_worker(session: AsyncSession, worker_id: str) -> None:
    await session.execute(
        update(Worker).where(col(Worker.id) == worker_id).values(stopped_at=func.now())
    )
