"""The job state machine, in Postgres.

    queued -> scheduled -> running -> succeeded | failed | canceled
                 ^            |
                 +-- queued <-+  (worker lost or transient error, attempts left)

Every transition is one conditional UPDATE (``WHERE status = <expected>``), so
two actors racing on a job (a worker finishing while the reaper gives up on it,
a re-delivered arq message) can never both win. The transport (arq) is not
known here: the scheduler asks which jobs to hand out, and workers claim them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.cursor import newest_first
from core.db.models import ACTIVE, Job, JobKind, JobStatus, utcnow
from core.errors import Conflict, NotFound
from core.idempotency import IdempotencyKeyReused
from core.metrics import JOBS_CREATED, JOBS_FINISHED

_now = func.now


async def create_job(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    kind: JobKind,
    params: dict[str, Any],
    max_attempts: int,
    subject_id: uuid.UUID | None = None,
    depends_on: uuid.UUID | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """Insert a queued job; with an idempotency key, a repeat returns the first job.

    The API's Idempotency-Key middleware compares whole requests (method, path and
    body) and replays the first response; the key on the job row is the backstop
    for a request whose process died after committing the job but before storing
    its response: its retry (the same request, by the middleware's check) gets
    the job made then. Kind and subject are still compared, a cheap guard for a
    caller without the middleware; params are not: a random default (the seed)
    makes them differ between two runs of one request."""
    values = dict(
        id=uuid.uuid4(),
        account_id=account_id,
        subject_id=subject_id,
        kind=kind.value,
        params=params,
        max_attempts=max_attempts,
        depends_on=depends_on,
        idempotency_key=idempotency_key,
        status=JobStatus.queued.value,
        stage="waiting for training" if depends_on else "queued",
    )
    stmt = insert(Job).values(**values)
    if idempotency_key is not None:
        stmt = stmt.on_conflict_do_nothing(constraint="uq_job_idempotency")
    inserted = (await session.execute(stmt.returning(col(Job.id)))).scalar_one_or_none()
    if inserted is None:  # the same key was used before
        existing = (
            await session.exec(
                select(Job).where(
                    col(Job.account_id) == account_id,
                    col(Job.idempotency_key) == idempotency_key,
                )
            )
        ).first()
        assert existing is not None
        if existing.kind != kind.value or existing.subject_id != subject_id:
            raise IdempotencyKeyReused("this Idempotency-Key was first used for another job")
        return existing
    JOBS_CREATED.labels(kind=kind.value).inc()
    job = await session.get(Job, inserted)
    assert job is not None
    return job


async def get_job(session: AsyncSession, account_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.account_id != account_id:
        raise NotFound(f"job {job_id} not found")
    return job


@dataclass(frozen=True)
class Page:
    jobs: Sequence[Job]
    next_cursor: str | None


async def list_jobs(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None = None,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
) -> Page:
    """Newest first; the cursor is the last row's (created_at, id), stable under inserts."""
    query = select(Job).where(col(Job.account_id) == account_id)
    if status is not None:
        query = query.where(col(Job.status) == status.value)
    if kind is not None:
        query = query.where(col(Job.kind) == kind.value)
    rows, after = await newest_first(
        session, query, col(Job.created_at), col(Job.id), limit=limit, cursor=cursor
    )
    return Page(rows, after)


async def cancel_job(session: AsyncSession, account_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Waiting jobs are canceled now; a running one is asked to stop at its next step."""
    job = await get_job(session, account_id, job_id)
    await session.refresh(job, with_for_update=True)
    status = JobStatus(job.status)
    if status.finished:
        raise Conflict(f"job {job_id} already {status.value}", job_status=status.value)
    if status is JobStatus.running:
        job.cancel_requested = True
        job.updated_at = utcnow()
    else:
        finish(job, JobStatus.canceled, stage="canceled")
    await session.flush()
    return job


def finish(job: Job, status: JobStatus, *, stage: str, error: dict[str, Any] | None = None) -> None:
    job.status = status.value  # type: ignore[assignment]
    job.stage = stage
    job.error = error
    job.finished_at = job.updated_at = utcnow()
    JOBS_FINISHED.labels(kind=JobKind(job.kind).value, outcome=status.value).inc()


def unplace(job: Job) -> None:
    """Back in the queue, the job's next attempt is placed afresh."""
    job.status = JobStatus.queued.value  # type: ignore[assignment]
    job.worker_id = job.placed_on = job.placement = job.transport_id = None
    job.updated_at = utcnow()


def retry_or_fail(job: Job, error: dict[str, Any]) -> JobStatus:
    """Back to the queue while attempts remain, else failed; canceled if asked."""
    if job.cancel_requested:
        finish(job, JobStatus.canceled, stage="canceled")
    elif job.attempts >= job.max_attempts:
        error = {
            **error,
            "detail": f"{error['detail']} (attempt {job.attempts} of {job.max_attempts})",
        }
        finish(job, JobStatus.failed, stage="failed", error=error)
    else:
        unplace(job)
        job.stage = "retrying"
        job.error = error  # kept for inspection while the next attempt runs
    return JobStatus(job.status)


# --- worker side -------------------------------------------------------------------


async def claim(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> Job | None:
    """Take a scheduled job for this worker; None if it is not (or no longer) ours to run."""
    stmt = (
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.scheduled.value)
        .values(
            status=JobStatus.running.value,
            stage="starting",
            attempts=col(Job.attempts) + 1,
            worker_id=worker_id,
            started_at=_now(),
            heartbeat_at=_now(),
            updated_at=_now(),
        )
        .returning(col(Job.id))
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return None
    return await session.get(Job, job_id, populate_existing=True)


@dataclass(frozen=True)
class HeartbeatReply:
    cancel: bool  # the client canceled: stop and record the cancel
    preempt: bool  # the scheduler wants the GPU for a look: checkpoint and yield


def _owned(job_id: uuid.UUID, worker_id: str) -> Any:
    return and_(
        col(Job.id) == job_id,
        col(Job.worker_id) == worker_id,
        col(Job.status) == JobStatus.running.value,
    )


async def heartbeat(
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    *,
    stage: str,
    progress: float,
    detail: dict[str, Any],
) -> HeartbeatReply | None:
    """Record liveness and progress. Returns what the job is asked to do, or None if
    it was taken from this worker (reaped, deleted): the worker must then stop and
    discard."""
    stmt = (
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(
            heartbeat_at=_now(),
            updated_at=_now(),
            stage=stage,
            progress=progress,
            progress_detail=detail,
        )
        .returning(col(Job.cancel_requested), col(Job.preempt_requested))
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else HeartbeatReply(cancel=row[0], preempt=row[1])


async def _owned_job(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> Job | None:
    query = select(Job).where(_owned(job_id, worker_id)).with_for_update()
    return (await session.exec(query)).one_or_none()


async def complete(
    session: AsyncSession, job_id: uuid.UUID, worker_id: str, result: dict[str, Any]
) -> bool:
    """Mark succeeded. False if the job is no longer this worker's (caller discards)."""
    job = await _owned_job(session, job_id, worker_id)
    if job is None:
        return False
    job.result = result
    job.error = None
    job.progress = 1.0
    job.progress_detail = {}
    finish(job, JobStatus.succeeded, stage="done")
    await session.flush()
    return True


async def give_up(
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    error: dict[str, Any],
    *,
    retryable: bool,
) -> JobStatus | None:
    """Record a failed attempt: back to the queue if it may help and attempts remain."""
    job = await _owned_job(session, job_id, worker_id)
    if job is None:
        return None
    if retryable:
        outcome = retry_or_fail(job, error)
    else:
        finish(job, JobStatus.failed, stage="failed", error=error)
        outcome = JobStatus.failed
    await session.flush()
    return outcome


async def _hand_back(session: AsyncSession, job_id: uuid.UUID, worker_id: str, why: str) -> bool:
    """Back to the queue without spending an attempt; False if it is not ours."""
    job = await _owned_job(session, job_id, worker_id)
    if job is None:
        return False
    unplace(job)
    job.stage = f"requeued: {why}"
    job.attempts -= 1
    job.preempt_requested = False
    await session.flush()
    return True


async def release(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> bool:
    """The worker is shutting down: put the job back without spending an attempt."""
    return await _hand_back(session, job_id, worker_id, "worker stopped")


async def yield_gpu(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> bool:
    """The training stopped at a checkpoint for a look: back to the queue without
    spending an attempt, to resume from that checkpoint on the next GPU free."""
    return await _hand_back(session, job_id, worker_id, "yielded its GPU to a look")


async def requeue_after_out_of_memory(
    session: AsyncSession, job_id: uuid.UUID, worker_id: str, vram_total_bytes: int
) -> JobStatus | None:
    """The attempt ran out of device memory on a GPU of ``vram_total_bytes``: back to
    the queue once, for a larger GPU only, without spending an attempt; a second
    out-of-memory fails the job. None if the job is no longer this worker's."""
    job = await _owned_job(session, job_id, worker_id)
    if job is None:
        return None
    detail = f"ran out of device memory on a GPU of {vram_total_bytes / 2**30:.1f} GiB"
    if job.vram_floor_bytes:
        detail += ", after an earlier out-of-memory: not retried again"
    error = {"code": "out-of-device-memory", "detail": detail, "vram_total_bytes": vram_total_bytes}
    if job.vram_floor_bytes:
        finish(job, JobStatus.failed, stage="failed", error=error)
    else:
        unplace(job)
        job.stage = "requeued: out of device memory"
        job.attempts -= 1
        job.error = error
        job.vram_floor_bytes = vram_total_bytes + 1  # strictly larger GPUs only
    await session.flush()
    return JobStatus(job.status)


async def acknowledge_cancel(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> bool:
    job = await _owned_job(session, job_id, worker_id)
    if job is None:
        return False
    finish(job, JobStatus.canceled, stage="canceled")
    await session.flush()
    return True


async def active_job_for_subject(
    session: AsyncSession, subject_id: uuid.UUID, kind: JobKind
) -> Job | None:
    # A run of several subjects belongs to its first; the others are in its params.
    in_run = col(Job.params).contains({"subject_ids": [str(subject_id)]})
    query = (
        select(Job)
        .where(
            or_(col(Job.subject_id) == subject_id, in_run),
            col(Job.kind) == kind.value,
            col(Job.status).in_([s.value for s in ACTIVE]),
        )
        .order_by(col(Job.created_at).desc())
        .limit(1)
    )
    return (await session.exec(query)).one_or_none()
