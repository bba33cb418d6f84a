"""Worker registry: which workers exist, what device they declare, when last seen."""

from __future__ import annotations

import os
import re
import secrets
import socket

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Worker
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


async def register_worker(
    session: AsyncSession, *, worker_id: str, name: str, device: str, vram_bytes: int, queue: str
) -> None:
    stmt = insert(Worker).values(
        id=worker_id, name=name, device=device, vram_bytes=vram_bytes, queue=queue
    )
    await session.execute(stmt.on_conflict_do_nothing())


async def touch_worker(session: AsyncSession, worker_id: str) -> None:
    await session.execute(
        update(Worker).where(col(Worker.id) == worker_id).values(last_seen=func.now())
    )


async def stop_worker(session: AsyncSession, worker_id: str) -> None:
    await session.execute(
        update(Worker).where(col(Worker.id) == worker_id).values(stopped_at=func.now())
    )
