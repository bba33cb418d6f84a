"""The scheduler loop: Postgres decides what runs and where, arq carries it.

Each tick:
1. fails queued jobs whose prerequisite failed (they can never run);
2. marks GPU workers whose heartbeat stopped gone, and puts the jobs placed on a
   departed worker but not started back in the queue;
3. places GPU jobs on GPUs (core/fleet/placing.py) and sends each to its worker's
   own queue; refuses at once a job too big for every GPU of the fleet;
4. marks runnable CPU jobs ``scheduled`` and sends them to the shared CPU queue;
5. requeues running jobs whose worker stopped heartbeating (the reaper);
6. re-sends scheduled jobs whose message vanished (Redis flushed or restarted) or
   was taken by a worker that died before claiming the job.
Every step is safe to run from several schedulers at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.engine import session_scope
from core.db.models import utcnow
from core.fleet.costs import CostTable, cached_cost_table
from core.fleet.placement import PlacementPolicy
from core.fleet.placing import place_round, requeue_from_departed
from core.fleet.workers import mark_gone
from core.idempotency import sweep_expired
from core.jobs import scheduling
from core.jobs.routing import POOL_BY_KIND, Pool
from core.metrics import (
    JOBS_DISPATCHED,
    JOBS_REAPED,
    JOBS_REENQUEUED,
    SCHEDULER_TICK,
    WORKERS_GONE,
)
from core.settings import MiB, Settings
from scheduler.gauges import refresh_gauges
from transport.queues import message_waiting, new_message_id, queue_of, send

log = logging.getLogger("atelier.scheduler")

# CPU jobs handed out per tick; the rest wait for the next tick.
DISPATCH_BATCH = 32
# The gauges' two queries run at most this often, not every tick: Prometheus scrapes
# every 15 s or so.
GAUGES_EVERY_S = 5.0
# Idempotency-Key rows past their TTL are deleted this often (claims already ignore them).
SWEEP_KEYS_EVERY_S = 60.0
CPU_KINDS = [kind.value for kind, pool in POOL_BY_KIND.items() if pool is Pool.cpu]


def placement_policy(settings: Settings) -> PlacementPolicy:
    return PlacementPolicy(
        safety_margin_bytes=settings.placement_margin_mib * MiB,
        aging_s=settings.placement_aging_s,
        interactive_bonus=settings.placement_interactive_bonus,
        fair_share=settings.placement_fair_share,
        affinity_wait_s=settings.placement_affinity_wait_s,
        preempt_after_s=settings.placement_preempt_after_s or None,
        preempt_min_remaining_s=settings.placement_preempt_min_remaining_s,
    )


@dataclass
class Dispatcher:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    costs: CostTable = field(init=False)
    policy: PlacementPolicy = field(init=False)
    gauges_at: float = field(init=False, default=-GAUGES_EVERY_S)
    swept_at: float = field(init=False, default=-SWEEP_KEYS_EVERY_S)

    def __post_init__(self) -> None:
        self.costs = cached_cost_table(self.settings.cost_table)
        self.policy = placement_policy(self.settings)

    async def tick(self) -> None:
        started = time.perf_counter()
        async with session_scope(self.sessions) as session:
            if failed := await scheduling.fail_blocked_dependents(session):
                log.info("failed %d jobs whose prerequisite failed", failed)
        await self.depart()
        await self.place()
        await self.dispatch()
        await self.reap()
        await self.reconcile()
        if started - self.gauges_at >= GAUGES_EVERY_S:
            self.gauges_at = started
            async with session_scope(self.sessions) as session:
                await refresh_gauges(session)
        if started - self.swept_at >= SWEEP_KEYS_EVERY_S:
            self.swept_at = started
            await self.sweep_idempotency_keys()
        SCHEDULER_TICK.observe(time.perf_counter() - started)

    async def depart(self) -> None:
        stale = timedelta(seconds=self.settings.heartbeat_stale_s)
        async with session_scope(self.sessions) as session:
            gone = await mark_gone(session, stale)
            requeued = await requeue_from_departed(session)
        for worker_id in gone:
            WORKERS_GONE.inc()
            log.warning("worker %s stopped heartbeating: gone", worker_id)
        for job_id in requeued:
            log.warning("job %s: its GPU worker left before it started; placed again", job_id)

    async def place(self) -> int:
        async with session_scope(self.sessions) as session:
            placed = await place_round(
                session,
                self.costs,
                self.policy,
                stale_after=timedelta(seconds=self.settings.heartbeat_stale_s),
                max_pending=self.settings.placement_max_pending,
            )
            ids = {p.job_id: new_message_id(p.job_id) for p in placed}
            await scheduling.set_transport_ids(session, ids)
        # Sent after the commit: if we crash in between, reconcile() re-sends.
        for p in placed:
            await send(self.redis, p.job_id, ids[p.job_id], queue_of(p.kind, p.worker_id))
            JOBS_DISPATCHED.inc()
            log.info("job %s %s placed on %s (%s)", p.job_id, p.kind, p.worker_id, p.reason)
        return len(placed)

    async def dispatch(self) -> int:
        async with session_scope(self.sessions) as session:
            taken = await scheduling.take_dispatchable(session, DISPATCH_BATCH, CPU_KINDS)
            for job in taken:
                job.transport_id = new_message_id(job.id)
        for job in taken:
            assert job.transport_id is not None
            await send(self.redis, job.id, job.transport_id, queue_of(job.kind, None))
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
            queue = queue_of(job.kind, job.placed_on)
            if job.transport_id and await message_waiting(self.redis, job.transport_id, queue):
                continue  # still queued: its worker has not got to it yet
            new_id = new_message_id(job.id)
            async with session_scope(self.sessions) as session:
                if not await scheduling.replace_transport_id(
                    session, job.id, job.transport_id, new_id
                ):
                    continue
            await send(self.redis, job.id, new_id, queue)
            JOBS_REENQUEUED.inc()
            log.warning("job %s: its message was lost, re-sent", job.id)

    async def sweep_idempotency_keys(self) -> None:
        ttl = timedelta(seconds=self.settings.idempotency_ttl_s)
        async with session_scope(self.sessions) as session:
            swept = await sweep_expired(session, now=utcnow(), ttl=ttl)
        if swept:
            log.info("deleted %d expired Idempotency-Keys", swept)

    async def run_forever(self) -> None:
        log.info("scheduler running (poll every %.1fs)", self.settings.scheduler_poll_s)
        while True:
            try:
                await self.tick()
            except Exception:  # Postgres or Redis blip: log and try again next tick
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.settings.scheduler_poll_s)
