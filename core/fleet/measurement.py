"""What a finished GPU job teaches the cost model, and what an out-of-memory does:
the worker side of core/fleet/costs.py, run in the job's final transaction."""

from __future__ import annotations

import logging

from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Job, JobStatus
from core.fleet.cost_store import record_finished, record_out_of_memory
from core.fleet.costs import job_units
from core.fleet.device import Device
from core.jobs.states import requeue_after_out_of_memory
from core.metrics import OOM_RETRIES

log = logging.getLogger("atelier.fleet")


def expected_peak(job: Job) -> int:
    """The peak VRAM the job was placed with (0 for a job placed before costs)."""
    return int((job.placement or {}).get("peak_vram_bytes", 0))


async def record_measurement(
    session: AsyncSession, job: Job, device: Device, seconds: float
) -> None:
    """Store the attempt's measured peak on the job and fold it, with its seconds per
    unit of work, into its shape's observed cost."""
    peak = device.peak_bytes(expected_peak(job))
    row = await session.get(Job, job.id)
    if row is not None:
        row.peak_vram_bytes = peak
    shape = (job.placement or {}).get("shape")
    if shape:
        await record_finished(session, shape, seconds / job_units(job), peak)


async def out_of_memory(
    session: AsyncSession, job: Job, worker_id: str, device: Device
) -> JobStatus | None:
    """Requeue the job for a larger GPU (once), and teach its shape that this GPU's
    size is not enough."""
    outcome = await requeue_after_out_of_memory(session, job.id, worker_id, device.total_bytes)
    shape = (job.placement or {}).get("shape")
    if outcome is not None and shape:
        await record_out_of_memory(session, shape, device.total_bytes)
    label = "requeued" if outcome is JobStatus.queued else "failed"
    OOM_RETRIES.labels(outcome=label).inc()
    log.warning("job %s ran out of device memory on %s: %s", job.id, worker_id, label)
    return outcome
