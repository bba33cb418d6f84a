"""The job state machine and the scheduler loop on real Postgres and Redis."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.engine import session_scope
from core.db.models import Account, Job, JobKind, JobStatus, Subject
from core.fleet.workers import register_worker
from core.jobs import scheduling, states
from core.settings import Settings
from scheduler.dispatcher import Dispatcher
from transport.queues import CPU_QUEUE, connect, gpu_queue, message_waiting

Sessions = async_sessionmaker[AsyncSession]
# A live GPU worker row (its heartbeat is its registration, fresh for these tests):
# GPU jobs are placed on it and sent to its own queue.
GPU_WORKER = "rtx4090@test"
GPU_QUEUE = gpu_queue(GPU_WORKER)


async def _account_subject(sessions: Sessions) -> tuple[uuid.UUID, uuid.UUID]:
    async with session_scope(sessions) as session:
        account = Account(name="t")
        session.add(account)
        await session.flush()
        subject = Subject(account_id=account.id, class_noun="person", token="sks")
        session.add(subject)
    return account.id, subject.id


# Each kind's row as its spec writes it (the scheduler reads them typed).
_PARAMS: dict[JobKind, dict[str, object]] = {
    JobKind.train: {"profile": "tiny"},
    JobKind.generate: {"profile": "tiny", "prompt": "a photo"},
    JobKind.crawl: {"site": "fixture"},
}


async def _job(
    sessions: Sessions, kind: JobKind = JobKind.train, depends_on: uuid.UUID | None = None
) -> Job:
    account_id, subject_id = await _account_subject(sessions)
    async with session_scope(sessions) as session:
        return await states.create_job(
            session,
            account_id=account_id,
            subject_id=subject_id,
            kind=kind,
            params=_PARAMS[kind],
            max_attempts=2,
            depends_on=depends_on,
        )


async def _reload(sessions: Sessions, job_id: uuid.UUID) -> Job:
    async with sessions() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job


async def _age(sessions: Sessions, job_id: uuid.UUID, **columns: timedelta) -> None:
    """Move a job's timestamps into the past instead of sleeping."""
    async with session_scope(sessions) as session:
        job = await session.get(Job, job_id)
        assert job is not None
        values = {name: getattr(job, name) - delta for name, delta in columns.items()}
        await session.execute(update(Job).where(Job.id == job_id).values(**values))  # type: ignore[arg-type]


async def _dispatcher(settings: Settings, sessions: Sessions) -> tuple[Dispatcher, ArqRedis]:
    async with session_scope(sessions) as session:
        await register_worker(
            session, worker_id=GPU_WORKER, name="rtx4090", pool="gpu", device="cpu",
            vram_bytes=24 * 2**30, queue=GPU_QUEUE,
        )  # fmt: skip
    arq = await connect(settings.redis_url)
    return Dispatcher(settings, sessions, arq), arq


async def test_dispatch_sends_one_message_per_job(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await _job(sessions)
    dispatcher, arq = await _dispatcher(settings, sessions)
    assert await dispatcher.place() == 1
    assert await dispatcher.place() == 0  # nothing is handed out twice
    scheduled = await _reload(sessions, job.id)
    assert scheduled.status == JobStatus.scheduled
    assert scheduled.transport_id and await message_waiting(arq, scheduled.transport_id, GPU_QUEUE)
    assert await redis.zcard(GPU_QUEUE) == 1
    await arq.aclose()


async def test_claim_is_exclusive_and_heartbeat_sees_cancel(sessions: Sessions) -> None:
    job = await _job(sessions)
    async with session_scope(sessions) as session:
        await scheduling.take_dispatchable(session, 10)
    async with session_scope(sessions) as session:
        first = await states.claim(session, job.id, "w1")
    async with session_scope(sessions) as session:
        second = await states.claim(session, job.id, "w2")
    assert first is not None and first.attempts == 1 and first.worker_id == "w1"
    assert second is None
    async with session_scope(sessions) as session:
        beat = await states.heartbeat(
            session, job.id, "w1", stage="training", progress=0.5, detail={}
        )
    assert beat == states.HeartbeatReply(cancel=False, preempt=False)
    async with session_scope(sessions) as session:
        await states.cancel_job(session, first.account_id, job.id)
    async with session_scope(sessions) as session:
        beat = await states.heartbeat(session, job.id, "w1", stage="x", progress=0.5, detail={})
        assert beat is not None and beat.cancel
        # Another worker's heartbeat is refused: the job is not theirs.
        assert (
            await states.heartbeat(session, job.id, "w2", stage="x", progress=0.5, detail={})
            is None
        )


async def test_dependent_waits_for_its_prerequisite_and_fails_with_it(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    train = await _job(sessions)
    gen = await _job(sessions, JobKind.generate, depends_on=train.id)
    dispatcher, arq = await _dispatcher(settings, sessions)
    assert await dispatcher.place() == 1  # only the training job
    assert (await _reload(sessions, gen.id)).status == JobStatus.queued
    async with session_scope(sessions) as session:
        await states.claim(session, train.id, "w1")
    async with session_scope(sessions) as session:
        await states.give_up(
            session, train.id, "w1", {"code": "x", "detail": "boom"}, retryable=False
        )
    await dispatcher.tick()
    failed = await _reload(sessions, gen.id)
    assert failed.status == JobStatus.failed
    assert failed.error and failed.error["code"] == "dependency-failed"
    await arq.aclose()


async def test_dependent_runs_after_prerequisite_succeeds(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    train = await _job(sessions)
    gen = await _job(sessions, JobKind.generate, depends_on=train.id)
    dispatcher, arq = await _dispatcher(settings, sessions)
    await dispatcher.place()
    async with session_scope(sessions) as session:
        await states.claim(session, train.id, "w1")
    async with session_scope(sessions) as session:
        assert await states.complete(session, train.id, "w1", {"ok": True})
    assert await dispatcher.place() == 1
    assert (await _reload(sessions, gen.id)).status == JobStatus.scheduled
    await arq.aclose()


async def test_reaper_requeues_then_fails_a_job_whose_worker_died(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await _job(sessions)  # max_attempts=2
    dispatcher, arq = await _dispatcher(settings, sessions)
    stale = timedelta(seconds=settings.heartbeat_stale_s + 1)
    for attempt in (1, 2):
        await dispatcher.place()
        async with session_scope(sessions) as session:
            assert await states.claim(session, job.id, f"w{attempt}")
        await dispatcher.reap()
        assert (await _reload(sessions, job.id)).status == JobStatus.running  # fresh heartbeat
        await _age(sessions, job.id, heartbeat_at=stale)
        await dispatcher.reap()
    final = await _reload(sessions, job.id)
    assert final.status == JobStatus.failed
    assert final.attempts == 2
    assert final.error and final.error["code"] == "worker-lost"
    assert "attempt 2 of 2" in final.error["detail"]
    await arq.aclose()


async def test_reconcile_resends_messages_lost_in_a_redis_flush(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await _job(sessions)
    dispatcher, arq = await _dispatcher(settings, sessions)
    await dispatcher.place()
    before = (await _reload(sessions, job.id)).transport_id
    await dispatcher.reconcile()  # within the grace period and alive: untouched
    assert (await _reload(sessions, job.id)).transport_id == before

    await redis.flushdb()
    await _age(sessions, job.id, scheduled_at=timedelta(seconds=settings.reconcile_grace_s + 1))
    await dispatcher.reconcile()
    after = await _reload(sessions, job.id)
    assert after.status == JobStatus.scheduled
    assert after.transport_id and after.transport_id != before
    assert await message_waiting(arq, after.transport_id, GPU_QUEUE)
    await arq.aclose()


async def test_scheduler_loop_survives_and_dispatches(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    dispatcher, arq = await _dispatcher(settings, sessions)
    loop = asyncio.create_task(dispatcher.run_forever())
    job = await _job(sessions)
    for _ in range(50):
        if (await _reload(sessions, job.id)).status == JobStatus.scheduled:
            break
        await asyncio.sleep(0.1)
    loop.cancel()
    assert (await _reload(sessions, job.id)).status == JobStatus.scheduled
    await arq.aclose()


async def test_reconcile_resends_a_message_taken_by_a_worker_that_died_before_claiming(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    job = await _job(sessions)
    dispatcher, arq = await _dispatcher(settings, sessions)
    await dispatcher.place()
    taken = (await _reload(sessions, job.id)).transport_id
    assert taken
    # What arq leaves behind when a worker takes a message and dies at once.
    await redis.zrem(GPU_QUEUE, taken)
    await redis.set(in_progress_key_prefix + taken, b"1")
    await _age(sessions, job.id, scheduled_at=timedelta(seconds=settings.reconcile_grace_s + 1))
    await dispatcher.reconcile()
    after = await _reload(sessions, job.id)
    assert after.transport_id != taken and after.transport_id
    assert await message_waiting(arq, after.transport_id, GPU_QUEUE)
    await arq.aclose()


async def test_crawl_jobs_go_to_the_cpu_queue_and_are_resent_there(
    settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    train = await _job(sessions)
    crawl = await _job(sessions, JobKind.crawl)
    dispatcher, arq = await _dispatcher(settings, sessions)
    assert await dispatcher.place() == 1 and await dispatcher.dispatch() == 1
    assert await redis.zcard(GPU_QUEUE) == 1 and await redis.zcard(CPU_QUEUE) == 1
    before = (await _reload(sessions, crawl.id)).transport_id
    assert before and await message_waiting(arq, before, CPU_QUEUE)

    await redis.flushdb()
    for job in (train, crawl):
        await _age(sessions, job.id, scheduled_at=timedelta(seconds=settings.reconcile_grace_s + 1))
    await dispatcher.reconcile()
    after = (await _reload(sessions, crawl.id)).transport_id
    assert after and after != before and await message_waiting(arq, after, CPU_QUEUE)
    assert await redis.zcard(GPU_QUEUE) == 1 and await redis.zcard(CPU_QUEUE) == 1
    await arq.aclose()
