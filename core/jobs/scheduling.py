"""The scheduler's side of the job state machine (see core/jobs/states.py for the states).

Which jobs to hand out, which can never run, which lost their worker, which lost
their transport message. Each query locks with SKIP LOCKED or updates
conditionally, so several schedulers can run at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, true, update
from sqlalchemy.orm import aliased
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

from core.db.models import Job, JobStatus, utcnow
from core.jobs.states import finish, retry_or_fail

_now = func.now


async def fail_blocked_dependents(session: AsyncSession) -> int:
    """Queued jobs whose prerequisite failed or was canceled can never run: fail them."""
    parent = aliased(Job)
    rows = (
        await session.exec(
            select(Job, col(parent.status))
            .join(parent, col(Job.depends_on) == col(parent.id))
            .where(
                col(Job.status) == JobStatus.queued.value,
                col(parent.status).in_([JobStatus.failed.value, JobStatus.canceled.value]),
            )
            .with_for_update(of=Job, skip_locked=True)
        )
    ).all()
    for job, parent_status in rows:
        finish(
            job,
            JobStatus.failed,
            stage="failed",
            error={
                "code": "dependency-failed",
                "detail": f"job {job.depends_on} it waited for was {parent_status}",
            },
        )
    return len(rows)


def runnable_queued(limit: int, kinds: Sequence[str] | None = None) -> Select[Job, datetime]:
    """Up to ``limit`` runnable queued jobs (of ``kinds``, default all), each with
    when it became runnable (created, or its prerequisite done), highest priority then
    oldest first, locked ``FOR UPDATE SKIP LOCKED`` so several schedulers never take
    one twice. Runnable: no prerequisite, or one that succeeded."""
    parent = aliased(Job)
    return (
        select(Job, func.greatest(col(Job.created_at), col(parent.finished_at)))
        .outerjoin(parent, col(Job.depends_on) == col(parent.id))
        .where(
            col(Job.status) == JobStatus.queued.value,
            or_(col(Job.depends_on).is_(None), col(parent.status) == JobStatus.succeeded.value),
            col(Job.kind).in_(kinds) if kinds is not None else true(),
        )
        .order_by(col(Job.priority).desc(), col(Job.created_at))
        .limit(limit)
        .with_for_update(of=Job, skip_locked=True)
    )


async def take_dispatchable(
    session: AsyncSession, limit: int, kinds: Sequence[str] | None = None
) -> list[Job]:
    """Mark up to ``limit`` runnable queued jobs (of ``kinds``, default all) ``scheduled``
    and return them (``runnable_queued``). GPU jobs are placed instead:
    core.fleet.placing."""
    jobs = [job for job, _ in (await session.exec(runnable_queued(limit, kinds))).all()]
    for job in jobs:
        job.status = JobStatus.scheduled.value  # type: ignore[assignment]
        job.stage = "scheduled"
        job.scheduled_at = job.updated_at = utcnow()
    await session.flush()
    return jobs


async def scheduled_unclaimed(session: AsyncSession, older_than: timedelta) -> list[Job]:
    """Scheduled jobs nobody claimed for a while: their transport message may be lost."""
    query = select(Job).where(
        col(Job.status) == JobStatus.scheduled.value,
        col(Job.scheduled_at) < _now() - older_than,
    )
    return list((await session.exec(query)).all())


@dataclass(frozen=True)
class Reaped:
    job_id: uuid.UUID
    worker_id: str | None
    outcome: JobStatus  # queued again, failed (no attempts left) or canceled


async def reap_orphans(session: AsyncSession, stale_after: timedelta) -> list[Reaped]:
    """Running jobs whose worker stopped heartbeating go back to the queue (or fail)."""
    query = (
        select(Job)
        .where(
            col(Job.status) == JobStatus.running.value,
            col(Job.heartbeat_at) < _now() - stale_after,
        )
        .with_for_update(skip_locked=True)
    )
    reaped = []
    for job in (await session.exec(query)).all():
        lost = {"code": "worker-lost", "detail": f"worker {job.worker_id} stopped heartbeating"}
        reaped.append(Reaped(job.id, job.worker_id, retry_or_fail(job, lost)))
    await session.flush()
    return reaped


async def replace_transport_id(
    session: AsyncSession, job_id: uuid.UUID, old: str | None, new: str
) -> bool:
    """Point a still-scheduled job at a new message; False if it moved on meanwhile."""
    stmt = (
        update(Job)
        .where(
            col(Job.id) == job_id,
            col(Job.status) == JobStatus.scheduled.value,
            col(Job.transport_id) == old,
        )
        .values(transport_id=new, scheduled_at=_now(), updated_at=_now())
        .returning(col(Job.id))
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def set_transport_ids(session: AsyncSession, ids: dict[uuid.UUID, str]) -> None:
    """The message id of each job's dispatch, written before the message is sent."""
    for job_id, message_id in ids.items():
        job = await session.get(Job, job_id)
        assert job is not None
        job.transport_id = message_id
    await session.flush()
