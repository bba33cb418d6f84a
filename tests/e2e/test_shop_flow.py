"""End to end: a crawled catalog embedded by a real GPU-worker process (on the CPU),
then photos + prompt -> 4 images, each linked to in-stock products whose buy links
point at the fixture shop."""

from __future__ import annotations

from pathlib import Path

import pytest
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import crawl_site
from core.db.engine import session_scope
from core.settings import Settings
from fixture_shop import ShopConfig, running_shop
from tests.e2e.test_look_flow import _finished, _subject, _wait

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

        subject_id = await _subject(client, auth, sample_photos)
        body = {"subject_id": subject_id, "prompt": "a Harry Potter costume", "seed": 7}
        generation = (await client.post("/v1/generations", headers=auth, json=body)).json()
        done = await _wait(client, auth, generation["id"], _finished, within=240)
        assert done["status"] == "succeeded", done
        assert len(done["outputs"]) == 4
        assert done["result"]["candidates"] == settings.look_candidates
        assert done["result"]["grounding"]["products"]
        for output in done["outputs"]:
            linked = await client.get(f"/v1/outputs/{output['id']}/products", headers=auth)
            assert linked.status_code == 200
            items = linked.json()["items"]
            whole = [i for i in items if i["region"] == "whole"]
            assert len(whole) == settings.products_per_image
            for item in items:
                product = item["product"]
                assert product["available"] and not item["sold_out"]
                assert product["buy_url"].startswith(f"{shop}/p/")
                assert product["price"] and product["currency"]
