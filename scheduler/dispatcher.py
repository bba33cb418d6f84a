"""The scheduler loop: Postgres decides what runs, arq carries it.

Each tick:
1. fails queued jobs whose prerequisite failed (they can never run);
2. marks runnable queued jobs ``scheduled`` and sends them to their kind's queue
   (GPU for train/generate, CPU for crawls: transport/queues.py);
3. requeues running jobs whose worker stopped heartbeating (the reaper);
4. re-sends scheduled jobs whose message vanished (Redis flushed or restarted) or
   was taken by a worker that died before claiming the job.
Every step is safe to run from several schedulers at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.engine import session_scope
from core.jobs import scheduling
from core.metrics import JOBS_DISPATCHED, JOBS_REAPED, JOBS_REENQUEUED
from core.settings import Settings
from transport.queues import message_waiting, new_message_id, queue_for, send

log = logging.getLogger("atelier.scheduler")

# Jobs handed out per tick; the rest wait for the next tick.
DISPATCH_BATCH = 32


@dataclass
class Dispatcher:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis

    async def tick(self) -> None:
        async with session_scope(self.sessions) as session:
            if failed := await scheduling.fail_blocked_dependents(session):
                log.info("failed %d jobs whose prerequisite failed", failed)
        await self.dispatch()
        await self.reap()
        await self.reconcile()

    async def dispatch(self) -> int:
        async with session_scope(self.sessions) as session:
            taken = await scheduling.take_dispatchable(session, DISPATCH_BATCH)
            for job in taken:
                job.transport_id = new_message_id(job.id)
        # Sent after the commit: if we crash in between, reconcile() re-sends.
        for job in taken:
            assert job.transport_id is not None
            await send(self.redis, job.id, job.transport_id, queue_for(job.kind))
            JOBS_DISPATCHED.inc()
            log.info("job %s %s scheduled", job.id, job.kind)
        return len(taken)

    async def reap(self) -> None:
        stale = timedelta(seconds=self.settings.heartbeat_stale_s)
        async with session_scope(self.sessions) as session:
            reaped = await scheduling.reap_orphans(session, stale)
        for r in reaped:
            JOBS_REAPED.labels(outcome=r.outcome.value).inc()
            log.warning("job %s: worker %s lost, job %s", r.job_id, r.worker_id, r.outcome.value)

    async def reconcile(self) -> None:
        grace = timedelta(seconds=self.settings.reconcile_grace_s)
        async with session_scope(self.sessions) as session:
            waiting = await scheduling.scheduled_unclaimed(session, grace)
        for job in waiting:
            queue = queue_for(job.kind)
            if job.transport_id and await message_waiting(self.redis, job.transport_id, queue):
                continue  # still queued: no worker is free yet
            new_id = new_message_id(job.id)
            async with session_scope(self.sessions) as session:
                if not await scheduling.replace_transport_id(
                    session, job.id, job.transport_id, new_id
                ):
                    continue
            await send(self.redis, job.id, new_id, queue)
            JOBS_REENQUEUED.inc()
            log.warning("job %s: its message was lost, re-sent", job.id)

    async def run_forever(self) -> None:
        log.info("scheduler running (poll every %.1fs)", self.settings.scheduler_poll_s)
        while True:
            try:
                await self.tick()
            except Exception:  # Postgres or Redis blip: log and try again next tick
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.settings.scheduler_poll_s)
