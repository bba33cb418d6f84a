"""One placement round against Postgres: the GPU jobs waiting, the live fleet as its
workers published it, ``core.fleet.placement.place`` between them, and the
outcome written back, in one transaction.

A job is placed exactly once: the round runs under a transaction-level advisory
lock, so of several schedulers (or one restarted mid-round) only one places at a
time and each sees the others' committed placements; the jobs it takes are also
locked ``FOR UPDATE SKIP LOCKED``. A placed job is ``scheduled`` with ``placed_on``
naming its worker; the caller sends it to that worker's queue after the commit
(the reconciler re-sends a message lost in between).
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, text, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Job, JobStatus, Lora, Worker, utcnow
from core.fleet.cost_store import observed_costs
from core.fleet.costs import (
    CostTable,
    JobShape,
    ObservedCost,
    UnknownShape,
    job_shape,
    job_units,
)
from core.fleet.placement import (
    GpuView,
    PendingJob,
    Placement,
    PlacementPolicy,
    Reason,
    need_bytes,
    place,
)
from core.fleet.workers import live_gpu_workers
from core.jobs.routing import POOL_BY_KIND, Pool
from core.jobs.scheduling import runnable_queued
from core.jobs.states import finish, unplace
from core.metrics import PLACEMENTS, QUEUE_WAIT

# Any constant both schedulers agree on: the key of the placement lock.
PLACEMENT_LOCK = 0x61746C72  # "atlr"
GPU_KINDS = [kind.value for kind, pool in POOL_BY_KIND.items() if pool is Pool.gpu]

log = logging.getLogger("atelier.placement")


@dataclass(frozen=True)
class Placed:
    job_id: uuid.UUID
    kind: str
    worker_id: str
    reason: Reason


async def _pending(session: AsyncSession, limit: int) -> list[tuple[Job, datetime]]:
    """Runnable queued GPU jobs, locked, each with when it became runnable."""
    return [
        (job, since) for job, since in (await session.exec(runnable_queued(limit, GPU_KINDS))).all()
    ]


async def _lora_shas(session: AsyncSession, jobs: list[Job]) -> dict[uuid.UUID, str]:
    """The LoRA (sha256) each generation applies: its subject's latest for its profile."""
    generations = [j for j in jobs if j.kind == "generate" and j.subject_id is not None]
    if not generations:
        return {}
    subjects = {j.subject_id for j in generations}
    query = select(Lora).where(col(Lora.subject_id).in_(subjects)).order_by(col(Lora.created_at))
    latest: dict[tuple[uuid.UUID, str], str] = {}
    for row in (await session.exec(query)).all():
        latest[(row.subject_id, row.profile)] = row.sha256  # the newest last
    found = {j.id: latest.get((j.subject_id, str(j.params.get("profile")))) for j in generations}  # type: ignore[arg-type]
    return {job_id: sha for job_id, sha in found.items() if sha is not None}


async def _views(session: AsyncSession, workers: list[Worker], now: datetime) -> list[GpuView]:
    """The fleet as placement sees it: each worker's inventory, and which of its
    jobs run or wait to start on it."""
    ids = [w.id for w in workers]
    busy = (
        await session.exec(
            select(Job).where(
                or_(col(Job.worker_id).in_(ids), col(Job.placed_on).in_(ids)),
                col(Job.status).in_([JobStatus.running.value, JobStatus.scheduled.value]),
            )
        )
    ).all()
    jobs_on: dict[str, list[Job]] = defaultdict(list)
    for job in busy:
        owner = job.worker_id if job.status == JobStatus.running.value else job.placed_on
        if owner is not None:
            jobs_on[owner].append(job)
    return [_view(worker, jobs_on[worker.id], now) for worker in workers]


def _view(worker: Worker, jobs: list[Job], now: datetime) -> GpuView:
    # The running job first, then those waiting to start (the next one).
    jobs.sort(key=lambda j: (j.status != JobStatus.running.value, j.scheduled_at or now))
    accounts = [str(j.account_id) for j in jobs]
    running = jobs[0] if jobs and jobs[0].status == JobStatus.running.value else None
    # A running training may yield its GPU (once: not while asked already).
    preemptible = running is not None and running.kind == "train" and not running.preempt_requested
    until = worker.busy_until
    if until is None and jobs:
        placed = (jobs[0].placement or {}).get("seconds", 0.0)
        until = (jobs[0].started_at or jobs[0].scheduled_at or now) + timedelta(seconds=placed)
    loras = worker.loras or {}
    return GpuView(
        worker_id=worker.id,
        vram_total_bytes=worker.vram_bytes,
        profiles=frozenset(worker.profiles or []),
        loras_vram=frozenset(loras.get("vram", [])),
        loras_host=frozenset(loras.get("host", [])),
        loras_disk=frozenset(loras.get("disk", [])),
        running_account=accounts[0] if accounts else None,
        busy_until=until.timestamp() if until and jobs else None,
        next_account=accounts[1] if len(accounts) > 1 else None,
        preemptible_job=str(running.id) if running is not None and preemptible else None,
    )


async def place_round(
    session: AsyncSession,
    table: CostTable,
    policy: PlacementPolicy,
    *,
    stale_after: timedelta,
    max_pending: int,
) -> list[Placed]:
    """Place what can be placed now; returns the placed jobs (the caller sends each
    to its worker's queue after the commit). Refuses jobs too big for the fleet."""
    locked = await session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                   {"key": PLACEMENT_LOCK})  # fmt: skip
    if not locked.scalar_one():
        return []  # another scheduler is placing right now
    pending = await _pending(session, max_pending)
    if not pending:
        return []
    now = utcnow()
    workers = await live_gpu_workers(session, stale_after)
    gpus = await _views(session, workers, now)
    jobs = {str(job.id): job for job, _ in pending}
    shapes = _shapes(jobs)
    observed = await observed_costs(session, (shape.key for shape in shapes.values()))
    loras = await _lora_shas(session, [job for job, _ in pending])
    views = []
    for job, since in pending:
        shape = shapes.get(str(job.id))
        if shape is None:
            continue
        try:
            views.append(_pending_view(job, since, shape, table, observed.get(shape.key),
                                       loras.get(job.id)))  # fmt: skip
        except UnknownShape as exc:
            _unplaceable(job, exc)
    by_id = {view.id: view for view in views}
    placed = []
    # Placement's clock is seconds since the epoch.
    for placement in place(views, gpus, now.timestamp(), policy):
        job = jobs[placement.job_id]
        PLACEMENTS.labels(reason=placement.reason.value).inc()
        if placement.worker_id is None:
            _refuse(job, by_id[placement.job_id], gpus, policy)
            continue
        _apply(job, placement, by_id[placement.job_id], shapes[placement.job_id])
        if placement.preempts is not None:
            await _ask_to_yield(session, uuid.UUID(placement.preempts))
        waited = now.timestamp() - by_id[placement.job_id].waiting_since
        QUEUE_WAIT.labels(kind=job.kind, priority=str(job.priority)).observe(waited)
        placed.append(Placed(job.id, job.kind, placement.worker_id, placement.reason))
    await session.flush()
    return placed


def _shapes(jobs: dict[str, Job]) -> dict[str, JobShape]:
    """Each job's shape; a job whose shape cannot be told fails, alone."""
    shapes = {}
    for key, job in jobs.items():
        try:
            shapes[key] = job_shape(job)
        except UnknownShape as exc:
            _unplaceable(job, exc)
    return shapes


def _unplaceable(job: Job, exc: UnknownShape) -> None:
    """A row whose params no spec reads, or a shape no cost row covers: fail that
    job with the reason instead of stopping every placement round on it."""
    log.error("job %s cannot be placed: %s", job.id, exc)
    error = {"code": "unplaceable", "detail": f"cannot tell what the job costs: {exc}"}
    finish(job, JobStatus.failed, stage="failed", error=error)


def _pending_view(
    job: Job,
    since: datetime,
    shape: JobShape,
    table: CostTable,
    seen: ObservedCost | None,
    lora: str | None,
) -> PendingJob:
    # An out-of-memory of this job, or of any job of its shape, rules its GPU out.
    learnt = seen.oom_floor_bytes + 1 if seen and seen.oom_floor_bytes else 0
    return PendingJob(
        id=str(job.id),
        kind=job.kind,
        account=str(job.account_id),
        profile=shape.profile,
        cost=table.cost(shape, job_units(job), seen),
        waiting_since=since.timestamp(),
        priority=job.priority,
        lora=lora,
        min_vram_bytes=max(job.vram_floor_bytes, learnt),
    )


async def _ask_to_yield(session: AsyncSession, job_id: uuid.UUID) -> None:
    """The running training's worker reads this with its next heartbeat."""
    await session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.running.value)
        .values(preempt_requested=True)
    )


def _apply(job: Job, placement: Placement, view: PendingJob, shape: JobShape) -> None:
    job.status = JobStatus.scheduled.value  # type: ignore[assignment]
    job.stage = (
        "scheduled"
        if placement.starts_now
        else "scheduled: a training yields its GPU"
        if placement.preempts
        else "scheduled: next on its GPU"
    )
    job.placed_on = placement.worker_id
    job.placement = {
        "reason": placement.reason.value,
        "starts_now": placement.starts_now,
        "shape": shape.key,
        "peak_vram_bytes": view.cost.peak_vram_bytes,
        "preempts": placement.preempts,
        "seconds": round(view.cost.seconds, 3),
    }
    job.scheduled_at = job.updated_at = utcnow()


def _refuse(job: Job, view: PendingJob, gpus: list[GpuView], policy: PlacementPolicy) -> None:
    need, largest = need_bytes(view, policy), max(g.vram_total_bytes for g in gpus)
    finish(
        job,
        JobStatus.failed,
        stage="failed",
        error={
            "code": "too-big-for-fleet",
            "detail": f"this job needs {need / 2**30:.1f} GiB of GPU memory (its peak plus a "
            f"{policy.safety_margin_bytes / 2**30:.1f} GiB margin); the largest GPU of the "
            f"fleet has {largest / 2**30:.1f} GiB",
            "need_bytes": need,
            "largest_gpu_bytes": largest,
        },
    )


async def requeue_from_departed(session: AsyncSession) -> list[uuid.UUID]:
    """Scheduled jobs placed on a worker that stopped or is gone, not yet started:
    back to the queue to be placed again (no attempt was spent)."""
    departed = select(Worker.id).where(
        or_(col(Worker.stopped_at).is_not(None), col(Worker.gone_at).is_not(None))
    )
    query = (
        select(Job)
        .where(col(Job.status) == JobStatus.scheduled.value, col(Job.placed_on).in_(departed))
        .with_for_update(skip_locked=True)
    )
    jobs = list((await session.exec(query)).all())
    for job in jobs:
        unplace(job)
        job.stage = "requeued: its GPU worker left"
    await session.flush()
    return [job.id for job in jobs]
