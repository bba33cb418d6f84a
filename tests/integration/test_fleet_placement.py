"""GPU placement through the real scheduler on real Postgres and Redis: two GPU
workers declared as an RTX 4090 (24 GiB) and an RTX 5090 (32 GiB), as their rows
and heartbeats say, and jobs of several shapes. Affinity, VRAM fit, generation
before training, aging, fair share, a job too big for the fleet, a departed
worker's job placed again, an out-of-memory placed on the larger GPU, and two
schedulers placing at once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.engine import session_scope
from core.db.models import Account, Job, JobKind, JobStatus, Lora, Subject, Worker, utcnow
from core.fleet.workers import Inventory, register_worker, touch_worker
from core.jobs import states
from core.settings import Settings
from scheduler.dispatcher import Dispatcher
from transport.queues import connect, gpu_queue

Sessions = async_sessionmaker[AsyncSession]
GIB = 2**30
RTX4090, RTX5090 = "rtx4090@a", "rtx5090@b"
COSTS = {  # peak GiB per shape: a margin of 1 GiB is added by placement
    "train:tiny:64:default": 6,
    "generate:tiny:64:default": 3,
    "train:tiny-sdxl:64:default": 26,  # only the 5090 holds it (27 GiB with the margin)
    "generate:tiny-sdxl:64:default": 40,  # no GPU of the fleet holds it
}


@pytest.fixture
def cost_table(tmp_path: Path) -> Path:
    rows = {
        shape: {"peak_vram_gib": gib, "seconds_per_unit": 0.1, "unit": "step", "source": "test"}
        for shape, gib in COSTS.items()
    }
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


@pytest.fixture
async def fleet(
    settings: Settings, sessions: Sessions, redis: Redis, cost_table: Path
) -> AsyncIterator[tuple[Dispatcher, ArqRedis]]:
    async with session_scope(sessions) as session:
        for worker_id, gib in ((RTX4090, 24), (RTX5090, 32)):
            await register_worker(
                session, worker_id=worker_id, name=worker_id.split("@")[0], pool="gpu",
                device="cpu", vram_bytes=gib * GIB, queue=gpu_queue(worker_id),
            )  # fmt: skip
    arq = await connect(settings.redis_url)
    placing = settings.model_copy(update={"cost_table": cost_table, "placement_fair_share": 0.5})
    yield Dispatcher(placing, sessions, arq), arq
    await arq.aclose()


async def _account(sessions: Sessions) -> uuid.UUID:
    async with session_scope(sessions) as session:
        account = Account(name="shopper")
        session.add(account)
    return account.id


async def _job(
    sessions: Sessions,
    kind: JobKind,
    account_id: uuid.UUID,
    profile: str = "tiny",
    *,
    age_s: float = 0.0,
    lora_sha: str | None = None,
) -> uuid.UUID:
    async with session_scope(sessions) as session:
        subject = Subject(account_id=account_id, class_noun="person", token="sks")
        session.add(subject)
        await session.flush()
        if lora_sha is not None:
            session.add(Lora(subject_id=subject.id, job_id=None, profile=profile, rank=4,
                             steps=1, blob_key="k", bytes=1, sha256=lora_sha))  # fmt: skip
        params = {"profile": profile, "steps": 10} if kind is JobKind.train else {
            "prompt": "p", "profile": profile, "steps": 10, "candidates": 2,
            "num_images": 2}  # fmt: skip
        job = await states.create_job(
            session, account_id=account_id, kind=kind, subject_id=subject.id, params=params,
            max_attempts=3,
        )  # fmt: skip
        if age_s:
            job.created_at = utcnow() - timedelta(seconds=age_s)
    return job.id


async def _placed(sessions: Sessions, job_id: uuid.UUID) -> Job:
    async with sessions() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job


async def _inventory(sessions: Sessions, worker_id: str, inventory: Inventory) -> None:
    async with session_scope(sessions) as session:
        await touch_worker(session, worker_id, inventory)


async def test_generation_goes_where_its_lora_is_hot(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions, redis: Redis
) -> None:
    dispatcher, _ = fleet
    account = await _account(sessions)
    # Best fit alone would pick the 4090; the 5090 holds the user's LoRA.
    await _inventory(sessions, RTX5090, Inventory(30 * GIB, ["tiny"], {"host": ["sha-u"]}))
    job_id = await _job(sessions, JobKind.generate, account, lora_sha="sha-u")
    assert await dispatcher.place() == 1
    job = await _placed(sessions, job_id)
    assert (job.status, job.placed_on) == (JobStatus.scheduled, RTX5090)
    assert job.placement and job.placement["reason"] == "affinity-lora-host"
    assert await redis.zcard(gpu_queue(RTX5090)) == 1 and await redis.zcard(gpu_queue(RTX4090)) == 0


async def test_vram_fit_and_a_job_too_big_for_the_fleet(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    dispatcher, _ = fleet
    account = await _account(sessions)
    big = await _job(sessions, JobKind.train, account, "tiny-sdxl")
    huge = await _job(sessions, JobKind.generate, account, "tiny-sdxl")
    await dispatcher.place()
    assert (await _placed(sessions, big)).placed_on == RTX5090
    refused = await _placed(sessions, huge)
    assert refused.status == JobStatus.failed and refused.error
    assert refused.error["code"] == "too-big-for-fleet"
    assert "41.0 GiB" in refused.error["detail"] and "32.0 GiB" in refused.error["detail"]


async def test_a_job_whose_cost_cannot_be_told_fails_alone(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    """A row no spec reads (written by hand, or by an old release) fails with the
    reason; it does not stop the placement round for the jobs behind it."""
    dispatcher, _ = fleet
    account = await _account(sessions)
    broken = await _job(sessions, JobKind.train, account)
    async with session_scope(sessions) as session:
        await session.execute(
            update(Job).where(col(Job.id) == broken).values(params={"steps": "many"})
        )
    fine = await _job(sessions, JobKind.generate, account)
    await dispatcher.place()
    failed = await _placed(sessions, broken)
    assert failed.status == JobStatus.failed and failed.error
    assert failed.error["code"] == "unplaceable"
    assert (await _placed(sessions, fine)).status == JobStatus.scheduled


async def test_generation_before_training_and_aging(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    dispatcher, _ = fleet
    async with session_scope(sessions) as session:  # one GPU left in the fleet
        await session.execute(
            update(Worker).where(col(Worker.id) == RTX5090).values(stopped_at=utcnow())
        )
    train = await _job(sessions, JobKind.train, await _account(sessions))
    gen = await _job(sessions, JobKind.generate, await _account(sessions))
    await dispatcher.place()
    # One GPU: the generation starts; the training waits in Postgres, not in Redis.
    assert (await _placed(sessions, gen)).status == JobStatus.scheduled
    assert (await _placed(sessions, train)).status == JobStatus.queued

    # A training that waited 11 minutes (aging 60 s a level, bonus 10) goes first.
    old_train = await _job(sessions, JobKind.train, await _account(sessions), age_s=660)
    fresh_gen = await _job(sessions, JobKind.generate, await _account(sessions))
    async with session_scope(sessions) as session:  # the GPU is free again
        done = update(Job).where(col(Job.id) == gen).values(status="succeeded")
        await session.execute(done)
    await dispatcher.place()
    assert (await _placed(sessions, old_train)).status == JobStatus.scheduled
    assert (await _placed(sessions, fresh_gen)).status == JobStatus.queued


async def test_one_account_cannot_take_the_whole_fleet(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    dispatcher, _ = fleet
    busy, other = await _account(sessions), await _account(sessions)
    mine = [await _job(sessions, JobKind.generate, busy) for _ in range(3)]
    theirs = await _job(sessions, JobKind.generate, other)
    await dispatcher.place()
    placed = [await _placed(sessions, job_id) for job_id in [*mine, theirs]]
    starting = [j for j in placed if j.status == JobStatus.scheduled]
    # Two GPUs, share 0.5: one starts for each account, though the first asked more.
    assert sorted(str(j.account_id) for j in starting) == sorted([str(busy), str(other)])


async def test_a_departed_workers_job_is_placed_again(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions, settings: Settings
) -> None:
    dispatcher, _ = fleet
    job_id = await _job(sessions, JobKind.train, await _account(sessions))
    await dispatcher.place()
    first = (await _placed(sessions, job_id)).placed_on
    assert first == RTX4090
    async with session_scope(sessions) as session:  # its heartbeat stopped long ago
        stale = utcnow() - timedelta(seconds=settings.heartbeat_stale_s + 1)
        await session.execute(update(Worker).where(col(Worker.id) == first).values(last_seen=stale))
    await dispatcher.tick()
    again = await _placed(sessions, job_id)
    assert again.status == JobStatus.scheduled and again.placed_on == RTX5090
    async with sessions() as session:
        gone = await session.get(Worker, RTX4090)
        assert gone is not None and gone.gone_at is not None


async def test_out_of_memory_goes_to_the_larger_gpu_once(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    dispatcher, _ = fleet
    job_id = await _job(sessions, JobKind.train, await _account(sessions))
    await dispatcher.place()
    assert (await _placed(sessions, job_id)).placed_on == RTX4090
    async with session_scope(sessions) as session:
        assert await states.claim(session, job_id, RTX4090)
        assert (
            await states.requeue_after_out_of_memory(session, job_id, RTX4090, 24 * GIB) == "queued"
        )
    await dispatcher.place()
    retried = await _placed(sessions, job_id)
    assert retried.placed_on == RTX5090 and retried.attempts == 0  # no attempt spent
    assert retried.vram_floor_bytes == 24 * GIB + 1
    async with session_scope(sessions) as session:
        assert await states.claim(session, job_id, RTX5090)
        outcome = await states.requeue_after_out_of_memory(session, job_id, RTX5090, 32 * GIB)
    assert outcome == JobStatus.failed  # a second out-of-memory is the end
    failed = await _placed(sessions, job_id)
    assert failed.error and "not retried again" in failed.error["detail"]


async def test_two_schedulers_never_place_a_job_twice(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions, settings: Settings, cost_table: Path
) -> None:
    dispatcher, _ = fleet
    arq = await connect(settings.redis_url)
    second = Dispatcher(dispatcher.settings, sessions, arq)
    accounts = [await _account(sessions) for _ in range(4)]
    jobs = [await _job(sessions, JobKind.generate, accounts[i % 4]) for i in range(12)]
    placed = 0
    for _ in range(6):
        counts = await asyncio.gather(dispatcher.place(), second.place())
        placed += sum(counts)
        async with session_scope(sessions) as session:  # every placed job finishes
            await session.execute(
                update(Job).where(col(Job.status) == "scheduled").values(status="succeeded")
            )
    await arq.aclose()
    async with sessions() as session:
        rows = (await session.exec(select(Job).where(col(Job.id).in_(jobs)))).all()
    assert placed == len(jobs) == sum(1 for row in rows if row.status == "succeeded")


async def test_a_waiting_look_makes_a_long_training_yield(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    dispatcher, _ = fleet
    async with session_scope(sessions) as session:  # one GPU in the fleet
        stopped = update(Worker).where(col(Worker.id) == RTX5090).values(stopped_at=utcnow())
        await session.execute(stopped)
    train = await _job(sessions, JobKind.train, await _account(sessions))
    await dispatcher.place()
    async with session_scope(sessions) as session:  # it runs, 10 minutes to go
        assert await states.claim(session, train, RTX4090)
        await touch_worker(
            session, RTX4090, Inventory(None, busy_until=utcnow() + timedelta(minutes=10))
        )
    look = await _job(sessions, JobKind.generate, await _account(sessions), age_s=61)
    await dispatcher.place()
    placed = await _placed(sessions, look)
    assert placed.placed_on == RTX4090 and placed.placement
    assert (placed.placement["reason"], placed.placement["preempts"]) == ("preempt", str(train))
    assert (await _placed(sessions, train)).preempt_requested
    # The training's worker hears it on its next beat, checkpoints and yields.
    async with session_scope(sessions) as session:
        reply = await states.heartbeat(session, train, RTX4090, stage="training", progress=0.5,
                                       detail={})  # fmt: skip
        assert reply == states.HeartbeatReply(cancel=False, preempt=True)
        assert await states.yield_gpu(session, train, RTX4090)
    yielded = await _placed(sessions, train)
    assert (yielded.status, yielded.attempts, yielded.preempt_requested) == ("queued", 0, False)


async def test_an_older_inventory_written_late_never_replaces_a_newer_one(
    fleet: tuple[Dispatcher, ArqRedis], sessions: Sessions
) -> None:
    # A heartbeat read the caches, then a job's outcome published the LoRA it left
    # hot, then the heartbeat's write arrived: the LoRA must stay published.
    before = utcnow()
    after = Inventory(30 * GIB, ["tiny"], {"vram": ["sha-new"]}, taken_at=utcnow())
    async with session_scope(sessions) as session:
        await touch_worker(session, RTX5090, after)
    async with session_scope(sessions) as session:
        await touch_worker(session, RTX5090, Inventory(30 * GIB, ["tiny"], {}, taken_at=before))
    async with sessions() as session:
        row = await session.get(Worker, RTX5090)
    assert row is not None and row.loras == {"vram": ["sha-new"]}
    assert row.last_seen >= after.taken_at  # the heartbeat itself still counted
