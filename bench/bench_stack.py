"""A benchmark's own stack: a database, Redis db and blob directory of its own, and
a catalog crawled and embedded once through the demo's stack (fixture shop + CPU
worker), which later runs reuse. bench.look_tiny and bench.search_latency run on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

import httpx
from alembic import command
from alembic.config import Config

from core.db import create as create_database
from core.db.engine import make_engine, make_sessionmaker
from core.settings import Settings
from core.shop.catalog_index import load_index
from demo.__main__ import ROOT, Stack, _wait_healthy, run_crawl

# A crawl and its embedding on 2 cores take about a minute; the client waits that long.
HTTP_TIMEOUT_S = 300


def bench_environment(args: argparse.Namespace, bench_dir: Path) -> None:
    """Every process this starts (the stacks) and this one's settings read these:
    ``args`` names the database, Redis db and API port, ``bench_dir`` holds the blobs."""
    os.environ.update(
        {
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{args.database}",
            "REDIS_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
            "ATELIER_BLOB_DIR": str(bench_dir / "blobs"),
            "ATELIER_PUBLIC_BASE_URL": f"http://127.0.0.1:{args.port}",
            # A development stack may be serving its metrics on the default ports.
            "ATELIER_WORKER_METRICS_PORT": "0",
            "ATELIER_SCHEDULER_METRICS_PORT": "0",
            "ATELIER_CPU_WORKER_METRICS_PORT": "0",
            # The first crawl changes the whole catalog, which would queue a CLIP
            # fine-tune on the CPU worker: not part of what is measured (1 = never).
            "ATELIER_CLIP_FINETUNE_AFTER_CHANGE": "1",
        }
    )


async def migrate(settings: Settings) -> None:
    await create_database.main()
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = settings.database_url
    await asyncio.to_thread(command.upgrade, config, "head")  # alembic runs its own loop


async def catalog_products(settings: Settings) -> int:
    """Products in the active fashion-CLIP version's index (0: none active)."""
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            index = await load_index(session, settings.clip_profile)
    finally:
        await engine.dispose()
    return len(index) if index is not None else 0


def crawl_and_embed(key: str, port: int, shop_port: int) -> None:
    """The demo's crawl through the admin API, waiting for the catalog's embedding."""
    stack = Stack(port, shop_port)
    stack.start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers=headers, timeout=HTTP_TIMEOUT_S) as http:
            _wait_healthy(http, stack)
            run_crawl(http, stack, wait=True)
    finally:
        stack.stop()
        restore_signals()


def restore_signals() -> None:
    """Stack.stop ignores Ctrl-C from then on (a demo's last act); the bench goes on."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
