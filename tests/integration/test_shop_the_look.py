"""Shop the look in process, on real Postgres: a crawl of the fixture shop, the
catalog embedded by a catalog_embed job (tiny fashion CLIP), search through the
API's ONNX encoder, and a generation grounded in and matched to in-stock products.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from httpx import AsyncClient
from PIL import Image
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import crawl_site
from core.db.catalog_models import Product
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus, Output, utcnow
from core.db.shop_models import ClipModel, LookItem, ProductEmbedding
from core.handlers.catalog_embed import run_catalog_embed
from core.handlers.generate import run_generation
from core.jobs.execution import Executor
from core.settings import Settings
from fixture_shop import ShopConfig, running_shop
from tests.integration.test_api_generation_params import (
    _give_subject_a_lora,
    _random_tiny_lora,
    _subject,
)

Sessions = async_sessionmaker[AsyncSession]
SHOP = ShopConfig(products=40, trouble=False, image_side=128)


@pytest.fixture
async def shop() -> AsyncIterator[str]:
    async with running_shop(SHOP) as base_url:
        yield base_url


async def _run(
    sessions: Sessions, settings: Settings, job_id: uuid.UUID, handlers: Any = None
) -> Job:
    async with session_scope(sessions) as session:
        await session.execute(
            update(Job).where(col(Job.id) == job_id).values(status=JobStatus.scheduled.value)
        )
    executor = Executor(
        settings,
        sessions,
        blob_store_from_settings(settings),
        "test-worker",
        handlers or {JobKind.generate: run_generation, JobKind.catalog_embed: run_catalog_embed},
    )
    await executor.execute(job_id)
    async with sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job


async def _embed(sessions: Sessions, settings: Settings) -> dict[str, Any]:
    async with session_scope(sessions) as session:
        account = (await session.exec(select(Job.account_id).limit(1))).first()
        from core.accounts import system_account
        from core.clip_jobs import request_catalog_embed

        job = await request_catalog_embed(
            session, settings, account or await system_account(session)
        )
    done = await _run(sessions, settings, job.id)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None
    return done.result


async def test_a_look_is_grounded_in_and_linked_to_in_stock_products(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    sessions: Sessions,
    settings: Settings,
    shop: str,
    tiny_model_dir: Path,
    tiny_clip_dir: Path,
) -> None:
    crawling = settings.model_copy(update={"crawl_base_urls": {"fixture": shop}})
    await crawl_site(crawling, sessions, blob_store_from_settings(settings), "fixture")
    first = await _embed(sessions, settings)
    assert first["created_base_version"] and first["rows_written"] > 0
    assert first["images_embedded"] > 0 and first["texts_embedded"] == SHOP.products
    again = await _embed(sessions, settings)  # incremental: nothing new
    assert (again["images_embedded"], again["rows_written"]) == (0, 0)
    assert again["clip_model_id"] == first["clip_model_id"]

    # Search through the API's torch-free encoder.
    found = await client.get("/v1/products/search", params={"q": "red dress"}, headers=auth)
    assert found.status_code == 200, found.text
    items = found.json()["items"]
    assert items and all(i["available"] for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    page = await client.get(
        "/v1/products/search", params={"q": "red dress", "limit": 2}, headers=auth
    )
    nxt = await client.get(
        "/v1/products/search",
        params={"q": "red dress", "limit": 2, "cursor": page.json()["next_cursor"]},
        headers=auth,
    )
    assert [i["id"] for i in page.json()["items"] + nxt.json()["items"]] == [
        i["id"] for i in items[:4]
    ]
    buf = io.BytesIO()
    Image.new("RGB", (80, 120), (200, 30, 30)).save(buf, format="PNG")
    by_image = await client.post(
        "/v1/products/search", files={"image": ("q.png", buf.getvalue(), "image/png")},
        headers=auth,
    )  # fmt: skip
    assert by_image.status_code == 200 and by_image.json()["items"]

    # A look: grounded, reranked, matched.
    subject_id = await _subject(client, auth, sample_photos)
    lora = _random_tiny_lora(settings)
    await _give_subject_a_lora(sessions, settings, uuid.UUID(subject_id), lora)
    body = {"subject_id": subject_id, "prompt": "an evening look", "num_images": 2,
            "candidates": 3, "seed": 5, "steps": 2, "products_per_image": 3}  # fmt: skip
    created = await client.post("/v1/generations", headers=auth, json=body)
    assert created.status_code == 202, created.text
    job = await _run(sessions, settings, uuid.UUID(created.json()["id"]))
    assert job.status == JobStatus.succeeded, job.error
    result = job.result or {}
    assert result["candidates"] == 3 and result["grounding"]["products"]
    descriptor = result["grounding"]["products"][0]["descriptor"]
    assert descriptor in result["prompt"]
    viewed = (await client.get(f"/v1/jobs/{job.id}", headers=auth)).json()
    stages = ("load", "grounding", "generation", "reranking", "matching", "saving")
    timings = viewed["result"]["timings"]  # seconds per stage, as the API shows them
    assert set(timings) == {f"{stage}_s" for stage in stages}
    assert all(seconds >= 0 for seconds in timings.values())
    assert timings["generation_s"] > 0 and timings["matching_s"] > 0  # they ran
    outputs = viewed["outputs"]
    assert len(outputs) == 2
    async with sessions() as session:
        kept = [await session.get(Output, uuid.UUID(o["id"])) for o in outputs]
    ranks = [o.candidate_rank for o in kept if o is not None]
    assert ranks == [0, 1]  # the best two of three candidates, best first
    linked = await client.get(f"/v1/outputs/{outputs[0]['id']}/products", headers=auth)
    assert linked.status_code == 200
    items = linked.json()["items"]
    assert {i["region"] for i in items} == {"whole", "upper", "lower", "feet"}
    assert all(not i["sold_out"] and i["product"]["buy_url"].startswith(shop) for i in items)

    # A linked product sells out: still returned, flagged, with in-stock stand-ins.
    sold = uuid.UUID(items[0]["product"]["id"])
    async with session_scope(sessions) as session:
        await session.execute(
            update(Product).where(col(Product.id) == sold).values(available=False)
        )
    client_app = client._transport.app  # type: ignore[attr-defined]
    client_app.state.searcher.holder._checked = -float("inf")  # the next read reloads
    relinked = (await client.get(f"/v1/outputs/{outputs[0]['id']}/products", headers=auth)).json()
    flagged = [i for i in relinked["items"] if i["product"]["id"] == str(sold)]
    assert flagged and all(i["sold_out"] for i in flagged)
    assert flagged[0]["alternatives"]
    assert all(a["available"] and a["id"] != str(sold) for a in flagged[0]["alternatives"])
    # Search never offers it as in stock.
    found = await client.get("/v1/products/search", params={"q": "dress"}, headers=auth)
    assert str(sold) not in {i["id"] for i in found.json()["items"]}

    # Gone products leave the index at the next embedding; their look items stay.
    async with session_scope(sessions) as session:
        await session.execute(
            update(Product).where(col(Product.id) == sold).values(gone_at=utcnow())
        )
    dropped = await _embed(sessions, settings)
    assert dropped["rows_dropped"] > 0
    async with sessions() as session:
        rows = await session.exec(
            select(ProductEmbedding).where(col(ProductEmbedding.product_id) == sold)
        )
        assert rows.first() is None
        items_left = await session.exec(select(LookItem).where(col(LookItem.product_id) == sold))
        assert items_left.first() is not None
        assert (await session.exec(select(ClipModel))).first() is not None
