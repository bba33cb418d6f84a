"""The transport contract, in one module: queue names, message ids, Redis keys.

arq only carries job ids from the scheduler to workers; Postgres holds the
state. A message may be lost (Redis flushed) or delivered twice (arq re-runs a
crashed worker's message when its in-progress key expires): the scheduler
re-sends lost ones, and a worker's claim in Postgres ignores duplicates.
"""

from __future__ import annotations

import secrets
import uuid

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus as ArqStatus

from core.jobs.routing import Pool, pool_of

# Each GPU worker reads its own queue, GPU_QUEUE_PREFIX + its worker id: the
# scheduler sends a GPU job only to the worker it placed it on, and only what that
# worker can start now or next, so arq's FIFO never decides the order.
GPU_QUEUE_PREFIX = "atelier:gpu:"
# CPU workers share one queue: crawls and CLIP head fine-tuning; no diffusion model.
CPU_QUEUE = "atelier:cpu"
RUN_JOB = "run_job"  # the one arq function workers expose


def gpu_queue(worker_id: str) -> str:
    return GPU_QUEUE_PREFIX + worker_id


def queue_of(kind: str, placed_on: str | None) -> str:
    """Where a job's message goes: its worker's queue for a GPU job (placed first),
    the shared queue for a CPU one (core/jobs/routing.py says which is which)."""
    if pool_of(kind) is Pool.cpu:
        return CPU_QUEUE
    if placed_on is None:
        raise ValueError(f"a {kind} job is sent only once it is placed on a GPU worker")
    return gpu_queue(placed_on)


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


async def connect(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


def new_message_id(job_id: uuid.UUID) -> str:
    # Unique per dispatch, so a re-send after a flush never collides with a
    # finished message's leftovers.
    return f"atelier:{job_id}:{secrets.token_hex(4)}"


async def send(redis: ArqRedis, job_id: uuid.UUID, message_id: str, queue: str) -> bool:
    """Put the job on the queue; False if a message with that id is already there."""
    sent = await redis.enqueue_job(RUN_JOB, str(job_id), _job_id=message_id, _queue_name=queue)
    return sent is not None


async def message_waiting(redis: ArqRedis, message_id: str, queue: str) -> bool:
    """Whether the message still waits in the queue for a worker to take it.

    A message a worker has taken ("in progress") does not count: a worker claims
    its job in Postgres right after taking it, so a job still unclaimed long after
    its message was taken belongs to a worker that died in between.
    """
    status = await ArqJob(message_id, redis, _queue_name=queue).status()
    return status in (ArqStatus.queued, ArqStatus.deferred)
