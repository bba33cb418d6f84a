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

# One shared queue for GPU workers until placement picks a GPU per job.
GPU_QUEUE = "atelier:gpu"
# CPU workers: crawls and CLIP head fine-tuning (later webhooks); no diffusion model.
CPU_QUEUE = "atelier:cpu"
RUN_JOB = "run_job"  # the one arq function workers expose
QUEUE_BY_POOL: dict[Pool, str] = {Pool.gpu: GPU_QUEUE, Pool.cpu: CPU_QUEUE}


def queue_for(kind: str) -> str:
    """The queue of the pool that runs ``kind`` (core/jobs/routing.py)."""
    return QUEUE_BY_POOL[pool_of(kind)]


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


async def connect(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


def new_message_id(job_id: uuid.UUID) -> str:
    # Unique per dispatch, so a re-send after a flush never collides with a
    # finished message's leftovers.
    return f"atelier:{job_id}:{secrets.token_hex(4)}"


async def send(redis: ArqRedis, job_id: uuid.UUID, message_id: str, queue: str = GPU_QUEUE) -> bool:
    """Put the job on the queue; False if a message with that id is already there."""
    sent = await redis.enqueue_job(RUN_JOB, str(job_id), _job_id=message_id, _queue_name=queue)
    return sent is not None


async def message_waiting(redis: ArqRedis, message_id: str, queue: str = GPU_QUEUE) -> bool:
    """Whether the message still waits in the queue for a worker to take it.

    A message a worker has taken ("in progress") does not count: a worker claims
    its job in Postgres right after taking it, so a job still unclaimed long after
    its message was taken belongs to a worker that died in between.
    """
    status = await ArqJob(message_id, redis, _queue_name=queue).status()
    return status in (ArqStatus.queued, ArqStatus.deferred)
