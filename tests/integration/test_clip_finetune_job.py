"""The clip_finetune job in process: heads trained over stored features of a crawled
fixture shop, judged on held-out products against the active version, activated
only when better (with its index rows and ONNX encoder), rejected otherwise."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from httpx import AsyncClient
from PIL import Image
from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import crawl_site
from core.db.catalog_models import CatalogImage
from core.db.engine import session_scope
from core.db.models import JobKind, JobStatus
from core.db.shop_models import ClipModel, ClipModelStatus, ProductEmbedding
from core.handlers.clip_finetune import run_clip_finetune
from core.ml.resident import resident_clip_runtime
from core.settings import Settings
from core.shop import feature_store
from fixture_shop import ShopConfig, running_shop
from tests.integration.test_shop_the_look import _embed, _run

Sessions = async_sessionmaker[AsyncSession]
SHOP = ShopConfig(products=200, trouble=False, image_side=96)
# Half the products held out: with k = 10, recall@10 over 30 held-out products is
# 0.33 by chance alone, over 100 it is 0.10, so a 10-point lift means learning.
HOLDOUT = 0.5


@pytest.fixture
async def embedded(
    sessions: Sessions, settings: Settings, tiny_clip_dir: Path
) -> AsyncIterator[dict[str, str]]:
    async with running_shop(SHOP) as shop:
        crawling = settings.model_copy(update={"crawl_base_urls": {"fixture": shop}})
        await crawl_site(crawling, sessions, blob_store_from_settings(settings), "fixture")
    await _embed(sessions, settings)
    async with session_scope(sessions) as session:
        admin = await create_account_with_key(session, "ops", is_admin=True)
    yield {"Authorization": f"Bearer {admin.key}"}


async def _finetune(
    client: AsyncClient,
    auth: dict[str, str],
    sessions: Sessions,
    settings: Settings,
    **body: object,
) -> dict[str, object]:
    created = await client.post("/v1/admin/clip/finetune", headers=auth, json=body)
    assert created.status_code == 201, created.text
    job_id = uuid.UUID(created.json()["id"])
    assert created.json()["kind"] == JobKind.clip_finetune
    handlers = {JobKind.clip_finetune: run_clip_finetune}
    done = await _run(sessions, settings, job_id, handlers)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None
    return done.result


async def test_the_outcome_follows_the_held_out_figures_and_the_index_follows_the_outcome(
    client: AsyncClient, embedded: dict[str, str], sessions: Sessions, settings: Settings
) -> None:
    """Whether fine-tuning learns is the unit tests' business (tests/unit/
    test_clip_finetune.py needs +10 points of R@10); here: the job judges on one
    held-out split, and activation, index rows, encoder and search follow."""
    trained = await _finetune(
        client, embedded, sessions, settings, steps=400, holdout_fraction=HOLDOUT, seed=1
    )
    metrics = trained["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["split"]["held_out"] == SHOP.products * HOLDOUT
    better = metrics["candidate"]["t2i_r10"] > metrics["active"]["t2i_r10"]
    assert trained["activated"] is better
    model_id = uuid.UUID(str(trained["clip_model_id"]))
    async with sessions() as session:
        version = await session.get(ClipModel, model_id)
        assert version is not None and version.blob_key and version.metrics == metrics
        rows = (
            await session.exec(
                select(func.count()).where(col(ProductEmbedding.model_id) == model_id)
            )
        ).one()
        active = (
            await session.exec(select(ClipModel).where(col(ClipModel.status) == "active"))
        ).one()
    found = await client.get("/v1/products/search", params={"q": "dress"}, headers=embedded)
    assert found.status_code == 200
    if better:
        assert version.status == ClipModelStatus.active and active.id == model_id
        assert version.config["onnx_files"] and rows == trained["index_rows"] > 0
        assert found.json()["model_id"] == str(model_id)
    else:
        assert version.status == ClipModelStatus.rejected and active.id != model_id
        assert rows == 0 and found.json()["model_id"] == str(active.id)

    # One step at a tiny rate from identity heads cannot beat the active version
    # (equal at best): rejected, kept with its figures, no index rows.
    worse = await _finetune(
        client, embedded, sessions, settings, steps=1, learning_rate=1e-9,
        holdout_fraction=HOLDOUT, seed=1,
    )  # fmt: skip
    assert worse["activated"] is False and worse["index_rows"] == 0
    async with sessions() as session:
        rejected = await session.get(ClipModel, uuid.UUID(str(worse["clip_model_id"])))
        assert rejected is not None and rejected.status == ClipModelStatus.rejected
        assert rejected.metrics is not None and rejected.blob_key
        still = (
            await session.exec(select(ClipModel).where(col(ClipModel.status) == "active"))
        ).one()
        assert still.id == active.id


async def test_a_second_finetune_while_one_waits_is_a_conflict(
    client: AsyncClient, embedded: dict[str, str]
) -> None:
    first = await client.post("/v1/admin/clip/finetune", headers=embedded, json={})
    assert first.status_code == 201
    second = await client.post("/v1/admin/clip/finetune", headers=embedded, json={})
    assert second.status_code == 409
    assert second.headers["content-type"] == "application/problem+json"
    assert second.json()["job_id"] == first.json()["id"]
    bad = await client.post("/v1/admin/clip/finetune", headers=embedded, json={"steps": 0})
    assert bad.status_code == 422


async def test_unfrozen_blocks_train_judge_and_embed_through_the_towers(
    client: AsyncClient, embedded: dict[str, str], sessions: Sessions, settings: Settings
) -> None:
    """A version with its own last blocks: its index rows are its towers' outputs over
    the padded images, not its heads over the stored base features (which are another
    model's outputs for it)."""
    trained = await _finetune(
        client, embedded, sessions, settings, steps=120, holdout_fraction=HOLDOUT, seed=1,
        unfreeze_image_blocks=1, unfreeze_text_blocks=1,
    )  # fmt: skip
    assert trained["recomputed"] is True
    metrics = trained["metrics"]
    assert isinstance(metrics, dict)
    # Heads and blocks from a random base over 100 training products: the tiny
    # profile's held-out R@10 rises from about chance (0.10) to 0.3-0.5.
    assert trained["activated"], metrics
    model_id = uuid.UUID(str(trained["clip_model_id"]))
    async with sessions() as session:
        version = await session.get(ClipModel, model_id)
        assert version is not None and version.config["unfreeze_image_blocks"] == 1
        stored = (
            await session.exec(
                select(ProductEmbedding)
                .where(col(ProductEmbedding.model_id) == model_id)
                .order_by(col(ProductEmbedding.image_sha256))
                .limit(4)
            )
        ).all()
        shas = [row.image_sha256 for row in stored]
        base = await feature_store.image_features(session, version.base_id, shas)
    runtime = resident_clip_runtime(settings)
    state = await blob_store_from_settings(settings).get(str(version.blob_key))
    encoder = runtime.version_encoder(model_id, state, version.config)
    assert encoder.recomputes
    store = blob_store_from_settings(settings)
    images = []
    async with sessions() as session:
        for sha in shas:
            image = await session.get(CatalogImage, sha)
            assert image is not None
            png = await store.get(image.padded_blob_key)
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    rows = feature_store.to_matrix([row.vector for row in stored])
    assert np.allclose(rows, encoder.encode_images(images), atol=1e-4)
    over_features = encoder.heads_over_image_features(np.stack([base[s] for s in shas]))
    assert not np.allclose(rows, over_features, atol=1e-3)
