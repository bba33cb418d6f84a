"""The scheduler's gauges, refreshed once a tick from Postgres: what waits, by kind
and priority, and what each live GPU worker has and has promised."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Job, JobStatus, Worker
from core.metrics import GPU_VRAM, QUEUE_DEPTH

WAITING = [JobStatus.queued.value, JobStatus.scheduled.value]


async def refresh_gauges(session: AsyncSession) -> None:
    depth = await session.exec(
        select(col(Job.kind), col(Job.priority), func.count())
        .where(col(Job.status).in_(WAITING))
        .group_by(col(Job.kind), col(Job.priority))
    )
    QUEUE_DEPTH.clear()  # a kind no longer waiting reads 0, not its last value
    for kind, priority, count in depth.all():
        QUEUE_DEPTH.labels(kind=kind, priority=str(priority)).set(count)
    workers = (
        await session.exec(
            select(Worker).where(
                col(Worker.pool) == "gpu",
                col(Worker.gone_at).is_(None),
                col(Worker.stopped_at).is_(None),
            )
        )
    ).all()
    reserved = await _reserved(session)
    GPU_VRAM.clear()
    for worker in workers:
        GPU_VRAM.labels(worker=worker.name + "/" + worker.id, state="total").set(worker.vram_bytes)
        if worker.vram_free_bytes is not None:
            GPU_VRAM.labels(worker=worker.name + "/" + worker.id, state="free").set(
                worker.vram_free_bytes
            )
        GPU_VRAM.labels(worker=worker.name + "/" + worker.id, state="reserved").set(
            reserved.get(worker.id, 0)
        )


async def _reserved(session: AsyncSession) -> dict[str, int]:
    """Per worker, the expected peaks of the jobs placed on it (running or next)."""
    jobs = (
        await session.exec(
            select(Job).where(
                col(Job.placed_on).is_not(None),
                col(Job.status).in_([JobStatus.scheduled.value, JobStatus.running.value]),
            )
        )
    ).all()
    totals: dict[str, int] = {}
    for job in jobs:
        peak = int((job.placement or {}).get("peak_vram_bytes", 0))
        assert job.placed_on is not None
        totals[job.placed_on] = max(totals.get(job.placed_on, 0), peak)
    return totals
