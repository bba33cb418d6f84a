"""arq wiring for a worker: startup, the one task function, shutdown.

Thin on purpose: the task hands the job id to core's Executor, which claims the
job in Postgres, runs it and records the outcome. A GPU worker (train, generate,
catalog embedding) and a CPU worker (crawl, CLIP fine-tuning, worker/cpu.py)
differ only in their queue, handlers and cron jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq.cron import CronJob
from arq.worker import Worker, func

from core.blobs.store import blob_store_from_settings
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.db.models import JobKind
from core.fleet.device import Device as DeviceMemory
from core.fleet.workers import (
    Inventory,
    new_worker_id,
    register_worker,
    stop_worker,
    touch_worker,
)
from core.handlers.catalog_embed import run_catalog_embed
from core.handlers.generate import run_generation
from core.handlers.train import run_training
from core.jobs.execution import Compute, Executor, Handler
from core.jobs.routing import Pool
from core.metrics import LORA_CACHE
from core.settings import Settings
from transport.queues import RUN_JOB, gpu_queue, redis_settings

log = logging.getLogger("atelier.worker")


@dataclass(frozen=True)
class Device:
    name: str  # e.g. rtx4090; a dev box declares the GPU it stands in for
    device: str  # torch device: cuda:0, cpu
    vram_bytes: int


# What a GPU worker publishes with each heartbeat (None: a CPU worker, nothing).
InventoryProvider = Callable[[Executor], Inventory]


async def run_job(ctx: dict[str, Any], job_id: str) -> str | None:
    executor: Executor = ctx["executor"]
    status = await executor.execute(uuid.UUID(job_id))
    return status.value if status else None


async def _liveness(settings: Settings, ctx: dict[str, Any]) -> None:
    publish = ctx["executor"].inventory  # None on a CPU worker: it holds nothing
    while True:
        try:
            held = await asyncio.to_thread(publish) if publish else None
            async with session_scope(ctx["sessions"]) as session:
                await touch_worker(session, ctx["worker_id"], held)
        except Exception:
            log.warning("worker heartbeat failed", exc_info=True)
        await asyncio.sleep(settings.heartbeat_interval_s)


async def _erasure_sweeps(settings: Settings, ctx: dict[str, Any], compute: Compute) -> None:
    """Evict from this worker's LoRA tiers every LoRA whose subject was erased, once a
    heartbeat interval. Apart from the heartbeat: evicting an adapter waits for the
    model thread, which a running job holds."""
    from core.ml.resident import erase_orphaned_loras

    while True:
        try:
            erased = await erase_orphaned_loras(settings, ctx["sessions"], compute)
            if erased:
                LORA_CACHE.labels(tier="all", event="erased").inc(len(erased))
                log.info("evicted %d erased subjects' LoRAs from every tier", len(erased))
        except Exception:
            log.warning("LoRA erasure sweep failed", exc_info=True)
        await asyncio.sleep(settings.heartbeat_interval_s)


GPU_HANDLERS: dict[JobKind, Handler] = {
    JobKind.train: run_training,
    JobKind.generate: run_generation,
    JobKind.catalog_embed: run_catalog_embed,
}


def build_worker(
    settings: Settings,
    device: Device,
    *,
    pool: Pool = Pool.gpu,
    queue: str | None = None,
    handlers: dict[JobKind, Handler] | None = None,
    memory: DeviceMemory | None = None,
    inventory: InventoryProvider | None = None,
    cron_jobs: list[CronJob] | None = None,
    max_jobs: int | None = None,
    compute: Compute = asyncio.to_thread,
    burst: bool = False,
    handle_signals: bool = True,
) -> Worker:
    worker_id = new_worker_id(device.name)
    # A GPU worker reads its own queue: the scheduler sends it only what it placed there.
    queue = queue or gpu_queue(worker_id)

    async def startup(ctx: dict[str, Any]) -> None:
        engine = make_engine(settings)
        sessions = make_sessionmaker(engine)
        ctx.update(engine=engine, sessions=sessions, worker_id=worker_id)
        ctx["executor"] = Executor(
            settings=settings,
            sessions=sessions,
            store=blob_store_from_settings(settings),
            worker_id=worker_id,
            handlers=GPU_HANDLERS if handlers is None else handlers,
            compute=compute,
            device=memory,
        )
        if inventory is not None:
            executor = ctx["executor"]
            executor.inventory = functools.partial(inventory, executor)
        async with session_scope(sessions) as session:
            await register_worker(
                session,
                worker_id=worker_id,
                name=device.name,
                pool=pool.value,
                device=device.device,
                vram_bytes=device.vram_bytes,
                queue=queue,
            )
        ctx["liveness"] = asyncio.create_task(_liveness(settings, ctx))
        if pool is Pool.gpu:
            ctx["erasure"] = asyncio.create_task(_erasure_sweeps(settings, ctx, compute))
        log.info("worker %s ready on %s, queue %s", worker_id, device.device, queue)

    async def shutdown(ctx: dict[str, Any]) -> None:
        for task in ("liveness", "erasure"):
            if task in ctx:
                ctx[task].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ctx[task]
        if "sessions" in ctx:
            async with session_scope(ctx["sessions"]) as session:
                await stop_worker(session, worker_id)
            await ctx["engine"].dispose()

    return Worker(
        functions=[func(run_job, name=RUN_JOB)],
        cron_jobs=cron_jobs,
        queue_name=queue,
        redis_settings=redis_settings(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        # One job at a time per GPU: the resident pipeline is shared by train and generate.
        max_jobs=max_jobs or settings.worker_concurrency,
        job_timeout=settings.job_timeout_s,
        # State lives in Postgres; arq neither keeps results nor retries on its own.
        keep_result=0,
        max_tries=1,
        burst=burst,
        handle_signals=handle_signals,
    )
