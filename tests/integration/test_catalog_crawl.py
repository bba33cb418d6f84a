"""crawl_site end to end: the real fixture shop (aiohttp, on a free port) and the
real Postgres, checked against the shop's ground truth (``catalog_at``) and its
own request counts (``/_admin/stats``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import LocalBlobStore
from core.catalog import store
from core.catalog.crawl import CrawlProgress, crawl_site
from core.db.catalog_models import (
    CatalogImage,
    CrawlPage,
    CrawlStatus,
    Product,
    ProductImage,
    ProductPrice,
)
from core.db.engine import session_scope
from core.db.models import utcnow
from core.errors import Conflict
from core.settings import Settings
from fixture_shop import ShopConfig, ShopProduct, catalog_at, running_shop, troubles

Sessions = async_sessionmaker[AsyncSession]


class Shop:
    def __init__(self, config: ShopConfig, base: str, http: aiohttp.ClientSession) -> None:
        self.config, self.base, self.http = config, base, http

    def live(self, epoch: int = 0) -> dict[str, ShopProduct]:
        return {p.id: p for p in catalog_at(self.config, epoch) if p.is_live}

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/_admin/stats") as response:
            stats: dict[str, Any] = await response.json()
            return stats

    async def reset_stats(self) -> None:
        await self.http.post(f"{self.base}/_admin/stats/reset")

    async def set_epoch(self, epoch: int) -> None:
        await self.http.post(f"{self.base}/_admin/epoch", json={"epoch": epoch})


async def open_shop(config: ShopConfig) -> AsyncIterator[Shop]:
    async with running_shop(config) as base, aiohttp.ClientSession() as http:
        yield Shop(config, base, http)


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    # Seed 4's first 150 products show every kind of page trouble at least once.
    async for opened in open_shop(ShopConfig(seed=4, products=150, image_side=48)):
        yield opened


def crawl_settings(settings: Settings, shop: Shop, **more: Any) -> Settings:
    values = dict(
        crawl_base_urls={"fixture": shop.base, "fixture-selectors": shop.base},
        crawl_concurrency_per_host=4, crawl_target_concurrency=4.0, crawl_backoff_s=0.05,
        crawl_max_delay_s=2.0, crawl_timeout_s=10.0, catalog_image_side=64,
    )  # fmt: skip
    return settings.model_copy(update=values | more)


async def products_by_id(sessions: Sessions) -> dict[str, Product]:
    async with sessions() as session:
        return {p.external_id: p for p in (await session.exec(select(Product))).all()}


async def count(sessions: Sessions, model: Any, *where: Any) -> int:
    async with sessions() as session:
        return (await session.exec(select(func.count()).select_from(model).where(*where))).one()


def corrupt_image(shop: Shop, path: str) -> bool:
    return troubles.kind_for(shop.config, path) is troubles.Trouble.CORRUPT_IMAGE


def assert_matches(product: Product, truth: ShopProduct, base: str) -> None:
    assert product.url == base + truth.url_path
    assert (product.designer, product.name, product.description) == (
        truth.designer, truth.name, truth.description,
    )  # fmt: skip
    assert (product.price, product.currency) == (truth.price, truth.currency)
    assert product.available is truth.available
    assert product.sizes == list(truth.sizes_in_stock)
    assert product.category_path == list(truth.category_path)
    assert product.gone_at is None


async def test_first_crawl_matches_the_shop_then_a_refresh_changes_nothing(
    settings: Settings, sessions: Sessions, shop: Shop, tmp_path: Path
) -> None:
    s = crawl_settings(settings, shop)
    blobs = LocalBlobStore(tmp_path / "blobs")
    seen: list[CrawlProgress] = []
    run = await crawl_site(s, sessions, blobs, "fixture", progress=seen.append)

    assert (run.status, run.complete) == (CrawlStatus.succeeded, True)
    live = shop.live()
    stored = await products_by_id(sessions)
    assert stored.keys() == live.keys()  # every live product, exactly once
    for product_id, truth in live.items():
        assert_matches(stored[product_id], truth, shop.base)
    assert run.products_new == len(live) and run.errors.get("parse", 0) == 0
    # The shop's troubles: retried pages made it, robots.txt was obeyed, the cap held.
    troubled = troubles.troubled_paths(shop.config, (p.url_path for p in live.values()))
    kinds = set(troubled.values())
    assert {troubles.Trouble.ERROR_ONCE, troubles.Trouble.THROTTLE_ONCE} <= kinds
    assert {troubles.Trouble.MALFORMED_HTML, troubles.Trouble.BROKEN_JSON_LD} & kinds
    stats = await shop.stats()
    assert stats["private"] == 0
    assert stats["peak_in_flight"] <= 4
    assert stats["by_kind_status"]["product"].get("500", 0) > 0
    assert stats["by_kind_status"]["product"].get("429", 0) > 0
    # Images: every decodable one linked in page order, corrupt ones counted, not fatal.
    corrupt = 0
    async with sessions() as session:
        for product_id, truth in list(live.items())[:60]:
            links = (await session.exec(
                select(ProductImage).where(col(ProductImage.product_id) == stored[product_id].id)
                .order_by(col(ProductImage.position))
            )).all()  # fmt: skip
            good = [shop.base + p for p in truth.image_paths if not corrupt_image(shop, p)]
            corrupt += len(truth.image_paths) - len(good)
            assert [link.source_url for link in links] == good
            for link in links:
                image = await session.get(CatalogImage, link.image_sha256)
                assert image is not None and blobs.open_path(image.padded_blob_key).is_file()
    assert run.errors.get("image", 0) >= corrupt
    assert run.images_new == await count(sessions, CatalogImage)
    assert await count(sessions, ProductPrice) == len(live)
    assert seen and seen[-1].pages == run.pages and seen[-1].products_new == len(live)
    assert "fixture: " in seen[-1].line() and " new / " in seen[-1].line()

    # A refresh of the unchanged shop: 304s, no image downloaded, no row changed.
    await shop.reset_stats()
    before = {k: (p.content_hash, p.changed_at) for k, p in stored.items()}
    again = await crawl_site(s, sessions, blobs, "fixture")
    stats = await shop.stats()
    assert again.status == CrawlStatus.succeeded
    assert again.products_unchanged == len(live) and again.products_new == 0
    assert again.products_changed == again.products_gone == 0
    assert again.not_modified >= 0.95 * again.pages
    assert stats["by_kind"]["image"] == 0 and stats["by_kind"]["private"] == 0
    after = await products_by_id(sessions)
    assert {k: (p.content_hash, p.changed_at) for k, p in after.items()} == before
    assert all(p.last_run_id == again.id for p in after.values())
    assert await count(sessions, ProductPrice) == len(live)


async def test_a_new_epoch_adds_reprices_sells_out_and_removes(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    async for shop in open_shop(ShopConfig(products=150, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False)
        blobs = LocalBlobStore(tmp_path / "blobs")
        first = await crawl_site(s, sessions, blobs, "fixture")
        await shop.set_epoch(1)
        run = await crawl_site(s, sessions, blobs, "fixture")

        before, after = shop.live(0), catalog_at(shop.config, 1)
        stored = await products_by_id(sessions)
        added = [p for p in after if p.id not in before]
        removed = [p for p in after if not p.is_live]
        sold_out = [p for p in after if p.is_live and not p.available and before[p.id].available]
        repriced = [p for p in after if p.is_live and p.id in before
                    and p.price != before[p.id].price]  # fmt: skip
        assert added and removed and sold_out and repriced
        assert (run.status, run.complete) == (CrawlStatus.succeeded, True)
        assert run.products_new == len(added) and run.products_gone == len(removed)
        assert run.products_changed == len(sold_out) + len(repriced)
        for truth in (p for p in after if p.is_live):
            assert_matches(stored[truth.id], truth, shop.base)
        # Removed products left listings and sitemaps; their known pages were asked
        # again and answered 404/410. They are kept, not deleted.
        assert run.pages_by_status.get("404", 0) + run.pages_by_status.get("410", 0) == len(removed)
        async with sessions() as session:
            for truth in removed:
                gone = stored[truth.id]
                assert gone.available is False and gone.gone_at is not None
                assert gone.last_run_id == first.id and gone.name == truth.name
                page = await store.find_page(session, "fixture", shop.base + truth.url_path)
                assert (
                    page is not None
                    and page.status == {"gone404": 404, "gone410": 410}[truth.status]
                )
        async with sessions() as session:
            for truth in repriced:
                of_product = col(ProductPrice.product_id) == stored[truth.id].id
                history = (await session.exec(
                    select(ProductPrice).where(of_product).order_by(col(ProductPrice.seen_at))
                )).all()  # fmt: skip
                assert [h.price for h in history] == [before[truth.id].price, truth.price]
        assert await count(sessions, ProductPrice) == len(before) + len(added) + len(repriced)


async def test_selectors_entry_walks_listings_and_reads_markup(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    async for shop in open_shop(ShopConfig(products=150, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False)
        run = await crawl_site(s, sessions, LocalBlobStore(tmp_path), "fixture-selectors")
        assert (run.status, run.complete) == (CrawlStatus.succeeded, True)
        stored = await products_by_id(sessions)
        live = shop.live()
        assert stored.keys() == live.keys()
        for product_id, truth in live.items():
            assert_matches(stored[product_id], truth, shop.base)
        assert (await shop.stats())["by_kind"]["sitemap"] == 0  # listings only


async def test_second_crawl_conflicts_and_stop_leaves_a_consistent_catalog(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    async for shop in open_shop(ShopConfig(products=120, image_side=48, latency_ms=10)):
        s = crawl_settings(settings, shop)
        blobs = LocalBlobStore(tmp_path)
        stop = asyncio.Event()
        first = asyncio.create_task(crawl_site(s, sessions, blobs, "fixture", stop=stop))
        while await count(sessions, Product) < 20:  # noqa: ASYNC110 (a row count to wait for)
            await asyncio.sleep(0.05)
        with pytest.raises(Conflict, match="a crawl of fixture is already running"):
            await crawl_site(s, sessions, blobs, "fixture")
        stop.set()
        interrupted = await asyncio.wait_for(first, timeout=10)
        assert (interrupted.status, interrupted.complete) == (CrawlStatus.interrupted, False)
        assert interrupted.finished_at is not None
        stored = await products_by_id(sessions)
        assert 20 <= len(stored) < len(shop.live())
        await assert_consistent(sessions, stored, shop)

        # The next run picks up: what the first stored answers 304, the rest is new.
        run = await crawl_site(s, sessions, blobs, "fixture")
        assert (run.status, run.complete) == (CrawlStatus.succeeded, True)
        assert run.products_unchanged == len(stored)
        assert run.products_new == len(shop.live()) - len(stored)
        stored = await products_by_id(sessions)
        assert stored.keys() == shop.live().keys()
        await assert_consistent(sessions, stored, shop)


async def assert_consistent(sessions: Sessions, stored: dict[str, Product], shop: Shop) -> None:
    """Each stored product is whole: fields as the shop says, a price row, images
    numbered from 0, and its page row pointing at it."""
    live = shop.live()
    async with sessions() as session:
        for product in stored.values():
            assert_matches(product, live[product.external_id], shop.base)
            prices = await session.exec(
                select(func.count()).where(col(ProductPrice.product_id) == product.id)
            )
            assert prices.one() >= 1
            positions = (await session.exec(
                select(ProductImage.position).where(col(ProductImage.product_id) == product.id)
            )).all()  # fmt: skip
            assert sorted(positions) == list(range(len(positions)))
            page = (await session.exec(
                select(CrawlPage).where(col(CrawlPage.url) == product.url)
            )).one()  # fmt: skip
            assert page.product_id == product.id and page.status in (200, 304)


async def test_generic_entry_reads_json_ld_and_opengraph(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    """jsonld-generic knows nothing of the shop but its base URL: sitemaps from
    robots.txt, JSON-LD or OpenGraph on the page. Category pages in the sitemap
    are not products: counted as parse errors, never fatal."""
    async for shop in open_shop(ShopConfig(products=100, trouble=False, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False,
                           crawl_base_urls={"jsonld-generic": shop.base})  # fmt: skip
        run = await crawl_site(s, sessions, LocalBlobStore(tmp_path), "jsonld-generic")
        stored = await products_by_id(sessions)
        assert stored.keys() == shop.live().keys()
        for product_id, truth in shop.live().items():
            assert_matches(stored[product_id], truth, shop.base)
        assert run.errors.get("parse", 0) > 0 and run.status == CrawlStatus.succeeded
        assert run.products_new == len(stored)


async def test_links_robots_txt_disallows_are_skipped_and_counted(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    """An entry that also takes the listings' promo links as products meets the
    shop's /private/ links: never requested, counted as robots."""
    entry = (Path(settings.sites_dir) / "fixture-selectors.toml").read_text()
    greedy = entry.replace(
        'product_links = "a.product-card::attr(href)"',
        'product_links = ["a.product-card::attr(href)", "aside.promo a::attr(href)"]',
    )
    (tmp_path / "greedy.toml").write_text(greedy)
    async for shop in open_shop(ShopConfig(products=60, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False, sites_dir=tmp_path,
                           crawl_base_urls={"greedy": shop.base})  # fmt: skip
        run = await crawl_site(s, sessions, LocalBlobStore(tmp_path), "greedy")
        assert run.errors.get("robots", 0) > 0 and (await shop.stats())["private"] == 0
        assert run.status == CrawlStatus.succeeded
        assert (await products_by_id(sessions)).keys() == shop.live().keys()


async def test_a_product_seen_again_is_available_again(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    async for shop in open_shop(ShopConfig(products=40, trouble=False, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False)
        await crawl_site(s, sessions, LocalBlobStore(tmp_path), "fixture")
        stored = await products_by_id(sessions)
        back = sorted(stored)[:2]
        async with session_scope(sessions) as session:  # as if the shop had answered 404 once
            for external_id in back:
                assert await store.mark_gone(session, stored[external_id].id, utcnow())
        run = await crawl_site(s, sessions, LocalBlobStore(tmp_path), "fixture")
        assert run.products_changed == 2 and run.products_unchanged == len(stored) - 2
        again = await products_by_id(sessions)
        for external_id in back:
            assert again[external_id].gone_at is None
            assert_matches(again[external_id], shop.live()[external_id], shop.base)


async def test_trusted_sitemap_lastmods_spare_unchanged_pages_until_revalidation(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    """fixture.toml trusts the shop's <lastmod>s: a refresh fetches no product page
    whose lastmod is not newer than the version we hold, only touches it; a page
    read longer ago than crawl_revalidate_after_s is asked again (conditionally);
    a changed product (newer lastmod) is read in full."""
    async for shop in open_shop(ShopConfig(products=60, trouble=False, image_side=48)):
        s = crawl_settings(settings, shop, crawl_images=False)
        blobs = LocalBlobStore(tmp_path)
        first = await crawl_site(s, sessions, blobs, "fixture")
        live = shop.live()
        assert first.products_new == len(live)
        async with sessions() as session:
            fetched = {p.url: p.fetched_at for p in (await session.exec(select(CrawlPage))).all()}

        await shop.reset_stats()
        spared = await crawl_site(s, sessions, blobs, "fixture")
        assert (spared.status, spared.complete) == (CrawlStatus.succeeded, True)
        assert spared.products_unchanged == len(live) and spared.products_gone == 0
        assert (await shop.stats())["by_kind"].get("product", 0) == 0
        stored = await products_by_id(sessions)
        assert all(p.last_run_id == spared.id and p.gone_at is None for p in stored.values())
        async with sessions() as session:  # the pages keep the time they were last read
            pages = (await session.exec(select(CrawlPage))).all()
            assert {p.url: p.fetched_at for p in pages if p.kind == "product"} == {
                u: t for u, t in fetched.items() if "/p/" in u
            }

        await shop.reset_stats()
        revalidated = await crawl_site(s.model_copy(update={"crawl_revalidate_after_s": 0}),
                                       sessions, blobs, "fixture")  # fmt: skip
        assert revalidated.products_unchanged == len(live)
        stats = await shop.stats()
        assert stats["by_kind"]["product"] == len(live) and stats["not_modified"] >= len(live)

        await shop.set_epoch(1)
        await shop.reset_stats()
        run = await crawl_site(s, sessions, blobs, "fixture")
        after = catalog_at(shop.config, 1)
        changed = [p for p in after if p.is_live and p.id in live and p.changed_epoch == 1]
        assert changed and run.products_changed == len(changed)
        stored = await products_by_id(sessions)
        for truth in (p for p in after if p.is_live):
            assert_matches(stored[truth.id], truth, shop.base)
        # Only what changed (or appeared, or went) was fetched.
        assert (await shop.stats())["by_kind"]["product"] < len(live) / 2
