"""Running one job attempt on a worker: claim, heartbeat, run, record.

The transport (arq) only delivers a job id; everything else is decided here
against Postgres. A job that is not ``scheduled`` when its message arrives (a
duplicate delivery, a job canceled meanwhile) is skipped. While it runs, a
heartbeat writes progress into the row and reads back cancel requests; if the
row is gone or taken over (subject erased, reaper gave up on us) the attempt
stops and removes what it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus
from core.errors import AtelierError, Canceled, CheckpointMissing, ErrorKind
from core.fleet.device import Device, is_out_of_memory
from core.fleet.measurement import expected_peak, out_of_memory, record_measurement
from core.fleet.workers import Inventory, touch_worker
from core.jobs import states
from core.jobs.progress import ProgressTracker
from core.logs import job_context
from core.metrics import JOB_DURATION, JOBS_RUNNING
from core.settings import Settings

log = logging.getLogger("atelier.jobs")


@dataclass
class JobResult:
    """What a handler produced: rows to commit with the success, blobs they point to."""

    result: dict[str, Any]
    rows: list[SQLModel] = field(default_factory=list)
    blob_keys: list[str] = field(default_factory=list)


# Runs blocking model code off the event loop: asyncio.to_thread by default; the
# GPU worker passes its main-thread runner (see worker/compute.py for why).
Compute = Callable[..., Awaitable[Any]]


@dataclass
class JobContext:
    job: Job
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    store: BlobStore
    progress: ProgressTracker
    # Set when the client canceled or the job was taken from us: stop at the next step.
    stop: threading.Event
    compute: Compute = asyncio.to_thread
    # Blobs written so far, removed if the attempt does not end in success.
    written: list[str] = field(default_factory=list)
    # Set with ``stop`` when the scheduler gave the GPU to a look: a training saves a
    # checkpoint at the step it stops at, and the job goes back to the queue.
    yielding: bool = False

    async def put_blob(self, key: str, data: bytes) -> None:
        self.written.append(key)
        await self.store.put(key, data)

    def raise_if_stopped(self) -> None:
        if self.stop.is_set():
            raise Canceled("stop requested")


Handler = Callable[[JobContext], Awaitable[JobResult]]


@dataclass
class Executor:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    store: BlobStore
    worker_id: str
    handlers: dict[JobKind, Handler]
    compute: Compute = asyncio.to_thread
    # A GPU worker's device: measured peaks, out-of-memory handling (None on CPU workers).
    device: Device | None = None
    # The attempt running now, for the worker's published inventory.
    current: JobContext | None = None
    # What the worker holds (GPU workers): published with each outcome too, so the
    # scheduler places what follows a job (a look after its training) on what it
    # left behind, without waiting for the next heartbeat.
    inventory: Callable[[], Inventory] | None = None

    async def execute(self, job_id: uuid.UUID) -> JobStatus | None:
        """Run one attempt of the job; returns its status after, None if skipped."""
        # Every line logged during the attempt (heartbeat task and to_thread work
        # included: both copy the context) carries the job id.
        with job_context(job_id):
            return await self._execute(job_id)

    async def _execute(self, job_id: uuid.UUID) -> JobStatus | None:
        async with session_scope(self.sessions) as session:
            job = await states.claim(session, job_id, self.worker_id)
        if job is None:
            log.info("job %s is not scheduled any more: skipped", job_id)
            return None
        ctx = JobContext(
            job,
            self.settings,
            self.sessions,
            self.store,
            ProgressTracker(),
            threading.Event(),
            self.compute,
        )
        taken = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(ctx, taken))
        started = time.monotonic()
        JOBS_RUNNING.inc()
        log.info("job %s %s: attempt %d started", job.id, job.kind, job.attempts)
        self.current = ctx
        try:
            outcome = await self._run(ctx, taken)
        finally:
            self.current = None
            beat.cancel()
            JOBS_RUNNING.dec()
        label = outcome.value if outcome else "taken"
        JOB_DURATION.labels(kind=job.kind, outcome=label).observe(time.monotonic() - started)
        log.info("job %s %s: %s after %.1fs", job.id, job.kind, label, time.monotonic() - started)
        if outcome is not JobStatus.succeeded:
            for key in ctx.written:
                await self.store.delete(key)
        return outcome

    async def _run(self, ctx: JobContext, taken: asyncio.Event) -> JobStatus | None:
        job = ctx.job
        started = time.monotonic()
        try:
            if self.device is not None:
                self.device.reset_peak()
                self.device.check_fits(expected_peak(job))
            done = await self.handlers[JobKind(job.kind)](ctx)
        except asyncio.CancelledError:
            # The worker is stopping (SIGTERM, deploy): hand the job back now
            # instead of letting the reaper find it stale.
            ctx.stop.set()
            await asyncio.shield(self._release(job))
            raise
        except Canceled:
            if taken.is_set():
                return None
            if ctx.yielding:
                async with session_scope(self.sessions) as session:
                    if await states.yield_gpu(session, job.id, self.worker_id):
                        log.info("job %s yielded its GPU to a look: back in the queue", job.id)
                return None
            async with session_scope(self.sessions) as session:
                ok = await states.acknowledge_cancel(session, job.id, self.worker_id)
            return JobStatus.canceled if ok else None
        except Exception as exc:  # every failure leaves the job retryable or inspectable
            if self.device is not None and is_out_of_memory(exc):
                async with session_scope(self.sessions) as session:
                    return await out_of_memory(session, job, self.worker_id, self.device)
            return await self._record_failure(job, exc)
        async with session_scope(self.sessions) as session:
            if not await states.complete(session, job.id, self.worker_id, done.result):
                return None
            session.add_all(done.rows)
            if self.device is not None:
                await record_measurement(session, job, self.device, time.monotonic() - started)
            if self.inventory is not None:
                await touch_worker(session, self.worker_id, self.inventory())
        return JobStatus.succeeded

    async def _release(self, job: Job) -> None:
        async with session_scope(self.sessions) as session:
            if await states.release(session, job.id, self.worker_id):
                log.info("job %s handed back to the queue: worker stopping", job.id)

    async def _record_failure(self, job: Job, exc: Exception) -> JobStatus | None:
        retryable = not isinstance(exc, AtelierError) or exc.kind is ErrorKind.unavailable
        if isinstance(exc, CheckpointMissing):
            retryable = False  # another attempt on this host cannot find it either
        error: dict[str, Any]
        if isinstance(exc, AtelierError):
            error = {"code": exc.code, "detail": exc.detail}
        else:
            log.exception("job %s %s failed", job.id, job.kind)
            error = {"code": "internal", "detail": f"{type(exc).__name__}: {exc}"}
        error["attempt"] = job.attempts
        async with session_scope(self.sessions) as session:
            return await states.give_up(session, job.id, self.worker_id, error, retryable=retryable)

    async def _heartbeat(self, ctx: JobContext, taken: asyncio.Event) -> None:
        job = ctx.job
        while True:
            snap = ctx.progress.snapshot()
            reply: states.HeartbeatReply | None = states.HeartbeatReply(False, False)
            try:
                async with session_scope(self.sessions) as session:
                    reply = await states.heartbeat(
                        session,
                        job.id,
                        self.worker_id,
                        stage=snap.stage,
                        progress=snap.progress,
                        detail=snap.detail,
                    )
            except Exception:  # a database blip must not kill a long training run
                log.warning("job %s: heartbeat failed, will retry", job.id, exc_info=True)
            if reply is None:
                log.warning("job %s was taken from this worker: stopping", job.id)
                taken.set()
                ctx.stop.set()
                return
            if reply.preempt and not reply.cancel:
                ctx.yielding = True
            if reply.cancel or reply.preempt:
                ctx.stop.set()
            log.info("job %s %s: %s", str(job.id)[:8], job.kind, snap.line())
            await asyncio.sleep(self.settings.heartbeat_interval_s)
