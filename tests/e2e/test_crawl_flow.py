"""End to end: the periodic crawl on a real CPU worker process, through a real
scheduler, against a real fixture shop; products in the API, metrics on the
worker's port; SIGTERM hands a running crawl back."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.catalog_models import CrawlRun, CrawlStatus
from core.db.models import Job, JobKind
from core.settings import Settings
from fixture_shop import ShopConfig, running_shop
from tests.e2e.conftest import Processes, free_port

pytestmark = pytest.mark.e2e

Sessions = async_sessionmaker[AsyncSession]


async def _crawl_job(sessions: Sessions, within: float = 60, **expect: Any) -> Job:
    deadline = time.monotonic() + within
    job = None
    while time.monotonic() < deadline:
        async with sessions() as session:
            query = select(Job).where(col(Job.kind) == JobKind.crawl.value)
            job = (await session.exec(query)).first()
        if job is not None and all(getattr(job, k) == v for k, v in expect.items()):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"no crawl job with {expect}; last seen: {job}")


def _cpu_worker(processes: Processes, settings: Settings, name: str, port: int = 0) -> Any:
    processes.settings = settings
    return processes.start("worker", "cpu", "--metrics-port", str(port), name=name)


async def test_periodic_crawl_fills_the_catalog_and_exports_metrics(
    client: AsyncClient,
    auth: dict[str, str],
    processes: Processes,
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
) -> None:
    products = 30
    async with running_shop(ShopConfig(products=products, trouble=False)) as shop:
        periodic = settings.model_copy(
            update={"crawl_sites": ["fixture"], "crawl_base_urls": {"fixture": shop}}
        )
        processes.scheduler()
        port = free_port()
        _cpu_worker(processes, periodic, "cpu", port)
        job = await _crawl_job(sessions, status="succeeded")

    assert job.result and job.result["products_new"] == products, job.result
    page = await client.get("/v1/products", headers=auth, params={"limit": 100})
    assert len(page.json()["items"]) == products
    async with httpx.AsyncClient() as plain:
        metrics = (await plain.get(f"http://127.0.0.1:{port}/metrics")).text
    assert f'atelier_crawl_products_total{{change="new",site="fixture"}} {products}.0' in metrics
    assert 'atelier_crawl_pages_total{site="fixture",status="200"}' in metrics
    assert 'atelier_crawl_duration_seconds_count{outcome="succeeded",site="fixture"} 1.0' in metrics
    assert 'atelier_job_duration_seconds_count{kind="crawl",outcome="succeeded"} 1.0' in metrics


async def test_stopping_the_cpu_worker_hands_its_crawl_back(
    processes: Processes, settings: Settings, sessions: Sessions, redis: Redis
) -> None:
    async with running_shop(ShopConfig(products=150, trouble=False, latency_ms=50)) as shop:
        periodic = settings.model_copy(
            update={"crawl_sites": ["fixture"], "crawl_base_urls": {"fixture": shop}}
        )
        processes.scheduler()
        leaving = _cpu_worker(processes, periodic, "leaving")
        await _crawl_job(sessions, status="running")
        await asyncio.sleep(1)
        leaving.send_signal(signal.SIGTERM)
        back = await _crawl_job(sessions, within=30, attempts=0)
        assert back.status in ("queued", "scheduled"), back
        async with sessions() as session:
            run = (await session.exec(select(CrawlRun))).one()
        assert run.status == CrawlStatus.interrupted

        _cpu_worker(processes, periodic, "next")
        done = await _crawl_job(sessions, within=120, status="succeeded")
    assert done.attempts == 1 and done.result and done.result["products_new"] > 0
