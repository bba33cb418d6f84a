"""The CPU worker: crawl jobs and fashion-CLIP fine-tunes from the CPU queue, and
the periodic crawl.

No diffusion model is loaded here; a fine-tune loads the fashion CLIP when it
runs (its heads train over stored features, with no tower pass). The periodic
crawl is an arq cron job that ticks every minute (or every ``crawl_period_s``
when that is shorter) and asks core which sites are due: one with no crawl job
created within the period and none waiting or running. Every CPU worker ticks; the per-site lock in
``create_crawl_job`` makes two ticks at once create one job.
"""

from __future__ import annotations

import logging
from typing import Any

from arq import cron
from arq.cron import CronJob
from arq.worker import Worker

from core.db.engine import session_scope
from core.db.models import JobKind
from core.handlers.clip_finetune import run_clip_finetune
from core.handlers.crawl import create_due_crawl_jobs, run_crawl
from core.jobs.routing import Pool
from core.settings import Settings
from transport.queues import CPU_QUEUE
from worker.app import Device, build_worker

log = logging.getLogger("atelier.worker.cpu")

CPU_DEVICE = Device(name="cpu", device="cpu", vram_bytes=0)
_SECONDS_PER_MINUTE = 60


def periodic_crawl(settings: Settings) -> list[CronJob]:
    if not settings.crawl_period_s or not settings.crawl_sites:
        return []

    async def create_due_crawls(ctx: dict[str, Any]) -> int:
        async with session_scope(ctx["sessions"]) as session:
            created = await create_due_crawl_jobs(session, settings)
        for job in created:
            log.info("periodic crawl of %s: job %s", job.params["site"], job.id)
        return len(created)

    tick = max(1, min(_SECONDS_PER_MINUTE, settings.crawl_period_s))
    return [
        cron(
            create_due_crawls,
            name="periodic-crawl",
            second=set(range(0, _SECONDS_PER_MINUTE, tick)),
            microsecond=0,
            run_at_startup=True,
        )
    ]


def build_cpu_worker(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True
) -> Worker:
    return build_worker(
        settings,
        CPU_DEVICE,
        pool=Pool.cpu,
        queue=CPU_QUEUE,
        handlers={JobKind.crawl: run_crawl, JobKind.clip_finetune: run_clip_finetune},
        cron_jobs=periodic_crawl(settings),
        max_jobs=settings.cpu_worker_jobs,
        burst=burst,
        handle_signals=handle_signals,
    )
