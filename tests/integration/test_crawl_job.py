"""Crawl jobs end to end: API -> scheduler -> CPU queue -> arq worker -> Executor ->
crawl_site against a real fixture shop -> products in GET /v1/products.

Also: progress and cancel while a crawl runs, a second crawl of a site failing
the job (not retried), the periodic crawl, and `python -m worker crawl`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import SYSTEM_ACCOUNT, create_account_with_key
from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import crawl_site
from core.db.catalog_models import CrawlRun, CrawlStatus, Product
from core.db.engine import session_scope
from core.db.models import Account, Job, JobKind, JobStatus
from core.handlers.crawl import create_due_crawl_jobs, run_crawl
from core.jobs import scheduling
from core.jobs.execution import Executor
from core.settings import Settings
from fixture_shop import ShopConfig, running_shop
from scheduler.dispatcher import Dispatcher
from tests.conftest import ROOT
from transport.queues import CPU_QUEUE, connect
from worker.cpu import build_cpu_worker

Sessions = async_sessionmaker[AsyncSession]
SHOP = ShopConfig(products=40, trouble=False)


@pytest.fixture
async def shop() -> AsyncIterator[str]:
    async with running_shop(SHOP) as base_url:
        yield base_url


def crawling(settings: Settings, base_url: str, **more: Any) -> Settings:
    return settings.model_copy(update={"crawl_base_urls": {"fixture": base_url}, **more})


@pytest.fixture
async def admin(sessions: Sessions) -> dict[str, str]:
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "ops", is_admin=True)
    return {"Authorization": f"Bearer {new.key}"}


async def _job(sessions: Sessions, job_id: str | uuid.UUID) -> Job:
    async with sessions() as session:
        job = await session.get(Job, uuid.UUID(str(job_id)))
        assert job is not None
        return job


def _executor(settings: Settings, sessions: Sessions) -> Executor:
    return Executor(
        settings=settings,
        sessions=sessions,
        store=blob_store_from_settings(settings),
        worker_id="test-cpu",
        handlers={JobKind.crawl: run_crawl},
    )


async def _schedule(sessions: Sessions) -> None:
    async with session_scope(sessions) as session:
        await scheduling.take_dispatchable(session, 10)


async def test_a_crawl_job_runs_on_the_cpu_worker_and_fills_the_catalog(
    client: AsyncClient,
    admin: dict[str, str],
    settings: Settings,
    sessions: Sessions,
    redis: Redis,
    shop: str,
) -> None:
    created = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    arq = await connect(settings.redis_url)
    assert await Dispatcher(settings, sessions, arq).dispatch() == 1
    assert await redis.zcard(CPU_QUEUE) == 1
    worker = build_cpu_worker(crawling(settings, shop), burst=True, handle_signals=False)
    await asyncio.wait_for(worker.main(), timeout=120)
    await worker.close()
    await arq.aclose()

    job = (await client.get(f"/v1/jobs/{job_id}", headers=admin)).json()
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["site"] == "fixture" and result["status"] == "succeeded" and result["complete"]
    assert result["products_new"] == SHOP.products and result["pages"] > SHOP.products

    runs = (await client.get("/v1/admin/crawls", headers=admin)).json()["items"]
    assert [(r["id"], r["job_id"]) for r in runs] == [(result["crawl_run_id"], job_id)]

    page = await client.get("/v1/products", headers=admin, params={"site": "fixture", "limit": 100})
    items = page.json()["items"]
    assert len(items) == SHOP.products
    assert all(item["image_url"] and item["buy_url"].startswith(shop) for item in items)
    detail = (await client.get(f"/v1/products/{items[0]['id']}", headers=admin)).json()
    assert 3 <= len(detail["images"]) <= 5 and detail["price_history"]
    padded = await client.get(
        detail["images"][0]["padded_url"].removeprefix("http://testserver"), headers=admin
    )
    assert padded.status_code == 200 and padded.headers["content-type"] == "image/png"


async def test_progress_is_written_and_cancel_stops_the_crawl(
    client: AsyncClient, admin: dict[str, str], settings: Settings, sessions: Sessions
) -> None:
    slow = ShopConfig(products=400, trouble=False, latency_ms=40)
    async with running_shop(slow) as base_url:
        created = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
        job_id = created.json()["id"]
        await _schedule(sessions)
        executor = _executor(crawling(settings, base_url), sessions)
        running = asyncio.create_task(executor.execute(uuid.UUID(job_id)))
        detail: dict[str, Any] = {}
        for _ in range(100):
            await asyncio.sleep(0.2)
            detail = (await _job(sessions, job_id)).progress_detail
            if detail.get("pages", 0) > 5:
                break
        assert detail["pages"] > 5 and "products_new" in detail and "rate" in detail
        canceled = await client.post(f"/v1/jobs/{job_id}/cancel", headers=admin)
        assert canceled.status_code == 200
        assert await asyncio.wait_for(running, timeout=30) is JobStatus.canceled

    async with sessions() as session:
        run = (await session.exec(select(CrawlRun))).one()
    assert run.status == CrawlStatus.interrupted and run.job_id == uuid.UUID(job_id)


async def test_a_second_crawl_of_a_site_fails_the_job_without_retry(
    client: AsyncClient, admin: dict[str, str], settings: Settings, sessions: Sessions
) -> None:
    slow = ShopConfig(products=400, trouble=False, latency_ms=40)
    async with running_shop(slow) as base_url:
        crawl_settings = crawling(settings, base_url)
        stop = asyncio.Event()
        blobs = blob_store_from_settings(settings)
        first = asyncio.create_task(
            crawl_site(crawl_settings, sessions, blobs, "fixture", stop=stop)
        )
        for _ in range(100):  # until the first crawl holds the site's lock
            await asyncio.sleep(0.05)
            async with sessions() as session:
                if (await session.exec(select(func.count()).select_from(CrawlRun))).one():
                    break
        created = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
        job_id = created.json()["id"]
        await _schedule(sessions)
        outcome = await _executor(crawl_settings, sessions).execute(uuid.UUID(job_id))
        stop.set()
        await first

    assert outcome is JobStatus.failed
    job = await _job(sessions, job_id)
    assert job.attempts == 1 and job.error is not None
    assert job.error["code"] == "conflict" and "already running" in job.error["detail"]


async def test_periodic_crawl_creates_one_job_per_due_site(
    settings: Settings, sessions: Sessions
) -> None:
    periodic = settings.model_copy(
        update={"crawl_sites": ["fixture", "jsonld-generic", "nope"], "crawl_period_s": 3600}
    )

    async def tick() -> list[str]:
        async with session_scope(sessions) as session:
            return sorted(
                job.params["site"] for job in await create_due_crawl_jobs(session, periodic)
            )

    assert await tick() == ["fixture", "jsonld-generic"]  # "nope" is logged and skipped
    assert await tick() == []  # both still queued
    async with session_scope(sessions) as session:
        await session.execute(update(Job).values(status=JobStatus.succeeded.value))
    assert await tick() == []  # finished, but within the period
    async with session_scope(sessions) as session:
        await session.execute(
            update(Job)
            .where(col(Job.params)["site"].astext == "fixture")
            .values(created_at=Job.created_at - timedelta(hours=2))
        )
    assert await tick() == ["fixture"]

    async with sessions() as session:
        owners = (
            await session.exec(select(Account).join(Job, col(Job.account_id) == Account.id))
        ).all()
    assert {(a.name, a.is_admin) for a in owners} == {(SYSTEM_ACCOUNT, True)}


async def test_worker_crawl_command(settings: Settings, sessions: Sessions, shop: str) -> None:
    env = {
        "DATABASE_URL": settings.database_url,
        "ATELIER_BLOB_DIR": str(settings.blob_dir),
        "ATELIER_CRAWL_BASE_URLS": json.dumps({"fixture": shop}),
        "PATH": "/usr/bin:/bin",
    }

    def crawl(site: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "worker", "crawl", site]
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    unknown = await asyncio.to_thread(crawl, "nope")
    assert unknown.returncode == 2 and "fixture" in unknown.stdout
    done = await asyncio.to_thread(crawl, "fixture")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "crawl of fixture succeeded" in done.stdout
    assert f"{SHOP.products} new" in done.stdout
    async with sessions() as session:
        count = (await session.exec(select(func.count()).select_from(Product))).one()
    assert count == SHOP.products
