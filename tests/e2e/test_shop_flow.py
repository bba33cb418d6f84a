"""End to end: a crawled catalog embedded by a real GPU-worker process (on the CPU),
then, through the typed client and the look resource, photos + prompt -> training
-> 4 images, each linked to in-stock products whose buy links point at the fixture
shop, followed live on the look's event stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from api.look_schemas import LookOut
from api.schemas import JobOut
from client import AtelierClient, LookEvent
from core.accounts import create_account_with_key
from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import crawl_site
from core.db.engine import session_scope
from core.settings import Settings
from fixture_shop import ShopConfig, running_shop
from tests.e2e.test_look_flow import _finished, _wait

pytestmark = pytest.mark.e2e

Sessions = async_sessionmaker[AsyncSession]


async def test_photos_and_prompt_to_four_images_with_buy_links(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    stack: int,
    settings: Settings,
    sessions: Sessions,
    tiny_clip_dir: Path,
    served: str,
) -> None:
    async with running_shop(ShopConfig(products=40, trouble=False, image_side=96)) as shop:
        crawling = settings.model_copy(update={"crawl_base_urls": {"fixture": shop}})
        await crawl_site(crawling, sessions, blob_store_from_settings(settings), "fixture")
        async with session_scope(sessions) as session:
            admin = await create_account_with_key(session, "ops", is_admin=True)
        ops = {"Authorization": f"Bearer {admin.key}"}
        embed = (await client.post("/v1/admin/clip/embed", headers=ops)).json()
        embedded = await _wait(client, ops, embed["id"], _finished)
        assert embedded["status"] == "succeeded", embedded
        assert embedded["result"]["rows_written"] > 0

        key = auth["Authorization"].removeprefix("Bearer ")
        async with AtelierClient(served, key) as atelier:
            subject = await atelier.create_subject(sample_photos)
            body = {"subject_id": str(subject.id), "prompt": "a Harry Potter costume", "seed": 7}
            once = {"Idempotency-Key": f"look-{subject.id}"}
            first = await atelier.request("POST", "/v1/looks", json=body, headers=dict(once))
            again = await atelier.request("POST", "/v1/looks", json=body, headers=dict(once))
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content  # one look, answered twice
            look = LookOut.model_validate_json(first.content)
            assert look.status == "queued" and look.jobs.training is not None
            events, woken_after = await asyncio.gather(
                _events(atelier, look.id), _woken_after(atelier, look.jobs.training)
            )
            assert woken_after < 1.0  # a long-poll hears of a change within 1 s
            path, etag = f"/v1/looks/{look.id}", await _etag(atelier, look.id)
            started = time.monotonic()
            unchanged = await atelier.request(
                "GET", path, headers={"If-None-Match": etag}, params={"wait": 0.5}
            )
            assert unchanged.status_code == 304 and time.monotonic() - started >= 0.5
            done = await atelier.look(look.id)
        names = [e.name for e in events]
        stages = [e.data["stage"] for e in events if e.name == "stage"]
        assert stages == ["training", "generating", "matching"], names
        assert names.count("image") == 4 and names[-1] == "completed"
        assert done.status == "succeeded" and len(done.images) == 4
        assert [s.seconds is not None for s in done.stages] == [True, True, True]
        generation = await atelier_job(client, auth, str(done.jobs.generation))
        assert generation["result"]["candidates"] == settings.look_candidates
        assert generation["result"]["grounding"]["products"]
        for image in done.images:
            whole = [i for i in image.products if i.region == "whole"]
            assert len(whole) == settings.products_per_image
            for item in image.products:
                product = item.product
                assert product.available and not item.sold_out
                assert product.buy_url.startswith(f"{shop}/p/")
                assert product.price and product.currency


async def _etag(atelier: AtelierClient, look_id: object) -> str:
    return (await atelier.request("GET", f"/v1/looks/{look_id}")).headers["etag"]


async def atelier_job(client: AsyncClient, auth: dict[str, str], job_id: str) -> dict:
    return dict((await client.get(f"/v1/jobs/{job_id}", headers=auth)).json())


async def _events(atelier: AtelierClient, look_id: uuid.UUID) -> list[LookEvent]:
    return [event async for event in atelier.look_events(look_id)]


async def _woken_after(atelier: AtelierClient, job_id: object) -> float:
    """Long-poll the job until one of its changes is heard; seconds from the change
    (its updated_at, the same host's clock) to the answer."""
    path = f"/v1/jobs/{job_id}"
    answer = await atelier.request("GET", path)
    seen = JobOut.model_validate_json(answer.content)
    while seen.status not in ("succeeded", "failed", "canceled"):
        headers = {"If-None-Match": answer.headers["etag"]}
        answer = await atelier.request("GET", path, headers=headers, params={"wait": 30})
        received = datetime.now(UTC)
        if answer.status_code == 304:
            continue
        job = JobOut.model_validate_json(answer.content)
        if job.updated_at != seen.updated_at:
            return (received - job.updated_at).total_seconds()
        seen = job
    raise AssertionError(f"job {job_id} finished before a change was heard")
