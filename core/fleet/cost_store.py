"""The cost model's memory in Postgres: what finished jobs of each shape measured
(``job_cost``), read by the scheduler and written by the workers."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import JobCostRow, utcnow
from core.fleet.costs import ObservedCost, observe


async def observed_costs(session: AsyncSession, shapes: Iterable[str]) -> dict[str, ObservedCost]:
    keys = sorted(set(shapes))
    if not keys:
        return {}
    rows = (await session.exec(select(JobCostRow).where(col(JobCostRow.shape).in_(keys)))).all()
    return {
        row.shape: ObservedCost(
            row.samples, row.seconds_per_unit, row.peak_vram_bytes, row.oom_floor_bytes
        )
        for row in rows
    }


async def _locked(session: AsyncSession, shape: str) -> JobCostRow:
    """The shape's row, locked; created empty first so that concurrent workers
    update one row under its lock."""
    empty = {"samples": 0, "seconds_per_unit": 0.0, "peak_vram_bytes": 0, "oom_floor_bytes": 0}
    await session.execute(
        insert(JobCostRow)
        .values(shape=shape, updated_at=utcnow(), **empty)
        .on_conflict_do_nothing()
    )
    query = select(JobCostRow).where(col(JobCostRow.shape) == shape).with_for_update()
    row = (await session.exec(query)).first()
    assert row is not None
    return row


async def record_finished(
    session: AsyncSession, shape: str, seconds_per_unit: float, peak_vram_bytes: int
) -> ObservedCost:
    """Fold one finished job's measurement into its shape's row."""
    row = await _locked(session, shape)
    before = ObservedCost(
        row.samples, row.seconds_per_unit, row.peak_vram_bytes, row.oom_floor_bytes
    )
    after = observe(before, seconds_per_unit, peak_vram_bytes)
    row.samples, row.seconds_per_unit = after.samples, after.seconds_per_unit
    row.peak_vram_bytes, row.updated_at = after.peak_vram_bytes, utcnow()
    await session.flush()
    return after


async def record_out_of_memory(session: AsyncSession, shape: str, vram_total_bytes: int) -> None:
    """A job of this shape ran out of memory on a GPU this large: from now on the
    shape needs a larger one, whatever the table says."""
    row = await _locked(session, shape)
    row.oom_floor_bytes = max(row.oom_floor_bytes, vram_total_bytes)
    row.updated_at = utcnow()
    await session.flush()
