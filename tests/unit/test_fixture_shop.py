"""The fixture shop keeps its contract: determinism, epochs, discovery, validators, troubles."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from fixture_shop import ShopConfig, ShopProduct, catalog_at, running_shop, troubles
from fixture_shop.catalog_index import CatalogIndex
from fixture_shop.images import image_size
from fixture_shop.troubles import Trouble, duplicate_image_source, kind_for

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ShopConfig()
JSON_LD = re.compile(r'<script type="application/ld\+json">(.*?)</script>', re.S)
HREF = re.compile(r'<a (?:rel="next" )?class="(product-card|next|category)" href="([^"]+)"')
LOC = re.compile(r"<loc>([^<]+)</loc>")


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(client: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes]:
    async with client.get(url, headers=headers, allow_redirects=False) as response:
        return response.status, await response.read()


async def status_of(client: aiohttp.ClientSession, url: str, **headers: str) -> int:
    return (await get(client, url, **headers))[0]


def live_products(config: ShopConfig, epoch: int = 0) -> list[ShopProduct]:
    return [product for product in catalog_at(config, epoch) if product.is_live]


def is_clean(product: ShopProduct) -> bool:
    return product.is_live and kind_for(CONFIG, product.url_path) is Trouble.NONE


def paths_with(kind: Trouble, config: ShopConfig = CONFIG) -> list[str]:
    return [p.url_path for p in catalog_at(config, 0) if kind_for(config, p.url_path) is kind]


# -- catalog ----------------------------------------------------------------------------------


def test_same_seed_same_catalog_in_another_process() -> None:
    script = (
        "import hashlib; from fixture_shop import ShopConfig, catalog_at;"
        "print(hashlib.sha256(repr(catalog_at(ShopConfig(), 2)).encode()).hexdigest())"
    )
    env = {"PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    here = hashlib.sha256(repr(catalog_at(CONFIG, 2)).encode()).hexdigest()
    assert other.stdout.strip() == here
    assert catalog_at(replace(CONFIG, seed=8), 0) != catalog_at(CONFIG, 0)


def test_catalog_looks_like_a_fashion_shop() -> None:
    products = catalog_at(CONFIG, 0)
    assert len(products) == CONFIG.products
    assert products[123].id == "P000123"
    assert len({p.designer for p in products}) >= 40
    assert len({p.category_path for p in products}) == 26
    for product in products[:200]:
        assert product.url_path == f"/p/{product.slug}-{product.id}"
        assert product.price.as_tuple().exponent == -2 and product.price > 0
        assert 2 <= product.description.count(". ") + 1 <= 4
        assert 3 <= len(product.image_paths) <= 5
        assert set(product.sizes_in_stock) <= set(product.all_sizes)
        assert product.available and product.sizes_in_stock and product.status == "live"


def test_an_epoch_adds_reprices_sells_out_and_removes_the_stated_fractions() -> None:
    before = {p.id: p for p in catalog_at(CONFIG, 0)}
    after = catalog_at(CONFIG, 1)
    added = [p for p in after if p.id not in before]
    removed = [p for p in after if p.id in before and not p.is_live]
    sold_out = [p for p in after if p.id in before and before[p.id].available and not p.available]
    repriced = [p for p in after if p.id in before and p.price != before[p.id].price]
    assert (len(added), len(removed), len(sold_out), len(repriced)) == (40, 20, 60, 100)
    assert {p.status for p in removed} == {"gone404", "gone410"}
    assert all(p.sizes_in_stock == () for p in sold_out)
    untouched = [p for p in after if p.id in before and p.changed_epoch == 0]
    assert len(untouched) == 2000 - 180 and all(p == before[p.id] for p in untouched)
    assert catalog_at(CONFIG, 3)[:2000] != catalog_at(CONFIG, 2)[:2000]


# -- discovery ----------------------------------------------------------------------------------


async def test_robots_txt(client: aiohttp.ClientSession) -> None:
    async with running_shop(CONFIG) as base:
        status, body = await get(client, f"{base}/robots.txt")
    lines = body.decode().splitlines()
    assert status == 200
    assert lines[:2] == ["User-agent: *", "Disallow: /private/"]
    assert f"Sitemap: {base}/sitemap.xml" in lines


async def test_listings_paginate_and_cover_every_live_product(
    client: aiohttp.ClientSession,
) -> None:
    config = replace(CONFIG, page_size=48)
    seen: set[str] = set()
    private: set[str] = set()
    async with running_shop(config) as base:
        _, home = await get(client, base + "/")
        categories = [href for kind, href in HREF.findall(home.decode()) if kind == "category"]
        assert len(categories) == 26
        pages = 0
        for href in categories:
            url: str | None = base + href
            while url is not None:
                status, body = await get(client, url)
                assert status == 200
                pages += 1
                links = HREF.findall(body.decode())
                cards = [h for kind, h in links if kind == "product-card"]
                assert 0 < len(cards) <= config.page_size
                seen.update(cards)
                private.update(re.findall(r'href="(/private/[^"]+)"', body.decode()))
                nexts = [h for kind, h in links if kind == "next"]
                url = base + nexts[0] if nexts else None
    assert seen == {p.url_path for p in live_products(config)}
    assert pages > 26  # some categories span several pages
    assert private  # a few listings tempt a crawler into /private/


async def test_sitemaps_list_every_live_product(client: aiohttp.ClientSession) -> None:
    async with running_shop(replace(CONFIG, epoch=1)) as base:
        status, index = await get(client, f"{base}/sitemap.xml")
        assert status == 200 and b"<sitemapindex" in index
        locations = LOC.findall(index.decode())
        assert locations[-1] == f"{base}/sitemaps/categories.xml"
        urls: list[str] = []
        for location in locations[:-1]:
            async with client.get(location) as response:
                assert response.headers["Content-Type"] == "application/gzip"
                assert "Content-Encoding" not in response.headers
                xml = gzip.decompress(await response.read()).decode()
            chunk = LOC.findall(xml)
            assert len(chunk) <= 1000 and xml.count("<lastmod>") == len(chunk)
            urls.extend(chunk)
        _, categories = await get(client, locations[-1])
    assert len(locations) == 4  # 2000 - 1% + 2% live products -> three files
    assert urls == [base + p.url_path for p in live_products(CONFIG, 1)]
    listing_urls = LOC.findall(categories.decode())
    assert (
        f"{base}/c/women-dresses" in listing_urls
        and f"{base}/c/women-dresses?page=2" in listing_urls
    )


# -- product pages ---------------------------------------------------------------------------


async def test_product_page_carries_json_ld_open_graph_and_visible_fields(
    client: aiohttp.ClientSession,
) -> None:
    product = next(p for p in catalog_at(CONFIG, 0) if is_clean(p))
    async with running_shop(CONFIG) as base:
        status, body = await get(client, base + product.url_path)
    html = body.decode()
    assert status == 200
    data = json.loads(JSON_LD.findall(html)[0])
    assert data["@type"] == "Product" and data["sku"] == product.id and data["name"] == product.name
    assert data["brand"] == {"@type": "Brand", "name": product.designer}
    assert data["category"] == " > ".join(product.category_path)
    assert data["image"] == [base + path for path in product.image_paths]
    assert [offer["name"] for offer in data["offers"]] == list(product.all_sizes)
    assert {offer["price"] for offer in data["offers"]} == {f"{product.price:.2f}"}
    in_stock = [o["name"] for o in data["offers"] if o["availability"].endswith("/InStock")]
    assert in_stock == list(product.sizes_in_stock)
    assert f'<meta property="og:url" content="{base}{product.url_path}">' in html
    assert f'<meta property="og:image" content="{base}{product.image_paths[0]}">' in html
    assert f'data-amount="{product.price:.2f}"' in html
    assert f'<span class="sku">{product.id}</span>' in html
    assert html.count('class="product-image"') == len(product.image_paths)


async def test_sold_out_and_removed_products(client: aiohttp.ClientSession) -> None:
    after = catalog_at(CONFIG, 1)
    sold_out = next(p for p in after if p.is_live and not p.available)
    gone404 = next(p for p in after if p.status == "gone404")
    gone410 = next(p for p in after if p.status == "gone410")
    async with running_shop(replace(CONFIG, trouble=False)) as base:
        assert await status_of(client, base + gone404.url_path) == 200
        async with client.post(f"{base}/_admin/epoch", json={"epoch": 1}) as response:
            assert (await response.json())["epoch"] == 1
        status, body = await get(client, base + sold_out.url_path)
        assert await status_of(client, base + gone404.url_path) == 404
        assert await status_of(client, base + gone410.url_path) == 410
        async with client.post(f"{base}/_admin/epoch", json={"epoch": "x"}) as response:
            assert response.status == 400
    html = body.decode()
    assert status == 200 and '<span class="availability">Sold out</span>' in html
    assert "/InStock" not in html and 'class="size in-stock"' not in html
    assert '<meta property="product:availability" content="oos">' in html


async def test_etags_last_modified_304_and_gzip(client: aiohttp.ClientSession) -> None:
    before = {p.id: p for p in catalog_at(CONFIG, 0)}
    after = catalog_at(CONFIG, 1)
    untouched = next(p for p in after if p.changed_epoch == 0 and is_clean(p))
    repriced = next(
        p
        for p in after
        if p.changed_epoch == 1 and p.available and is_clean(p) and p.price != before[p.id].price
    )
    async with running_shop(CONFIG) as base:
        headers = {}
        for product in (untouched, repriced):
            async with client.get(base + product.url_path) as response:
                assert response.headers["Content-Encoding"] == "gzip"
                headers[product.id] = response.headers
                body = await response.read()
        identity = {"Accept-Encoding": "identity"}
        async with client.get(base + repriced.url_path, headers=identity) as response:
            assert "Content-Encoding" not in response.headers and await response.read() == body
            assert response.headers["ETag"] == headers[repriced.id]["ETag"]
        await client.post(f"{base}/_admin/epoch", json={"epoch": 1})
        current, stale = headers[untouched.id], headers[repriced.id]
        current_url, stale_url = base + untouched.url_path, base + repriced.url_path
        assert await status_of(client, current_url, **{"If-None-Match": current["ETag"]}) == 304
        since = current["Last-Modified"]
        assert await status_of(client, current_url, **{"If-Modified-Since": since}) == 304
        assert await status_of(client, stale_url, **{"If-None-Match": stale["ETag"]}) == 200
        since = stale["Last-Modified"]
        assert await status_of(client, stale_url, **{"If-Modified-Since": since}) == 200
        async with client.get(base + repriced.url_path) as response:
            assert response.headers["Last-Modified"] == "Sat, 02 Mar 2024 00:00:00 GMT"
        async with client.get(f"{base}/_admin/stats") as response:
            assert (await response.json())["not_modified"] == 2


# -- troubles -----------------------------------------------------------------------------------


def test_trouble_fractions_and_a_clean_shop() -> None:
    paths = [p.url_path for p in catalog_at(CONFIG, 0)]
    counts = {
        kind: list(troubles.troubled_paths(CONFIG, paths).values()).count(kind) for kind in Trouble
    }
    assert 10 <= counts[Trouble.ERROR_ONCE] <= 35 and 10 <= counts[Trouble.THROTTLE_ONCE] <= 35
    assert 25 <= counts[Trouble.SLOW] <= 60 and 150 <= counts[Trouble.NO_JSON_LD] <= 250
    assert counts[Trouble.MALFORMED_HTML] > 0 and counts[Trouble.BROKEN_JSON_LD] > 0
    assert troubles.troubled_paths(replace(CONFIG, trouble=False), paths) == {}


async def test_first_request_troubles_then_200(client: aiohttp.ClientSession) -> None:
    error_path = paths_with(Trouble.ERROR_ONCE)[0]
    throttle_path = paths_with(Trouble.THROTTLE_ONCE)[0]
    async with running_shop(CONFIG) as base:
        assert await status_of(client, base + error_path) == 500
        assert await status_of(client, base + error_path) == 200
        async with client.get(base + throttle_path) as response:
            assert response.status == 429 and response.headers["Retry-After"] == "1"
        assert await status_of(client, base + throttle_path) == 200
    async with running_shop(replace(CONFIG, trouble=False)) as base:
        assert await status_of(client, base + error_path) == 200
        assert await status_of(client, base + throttle_path) == 200


async def test_malformed_pages_still_carry_open_graph(client: aiohttp.ClientSession) -> None:
    async with running_shop(CONFIG) as base:
        _, malformed = await get(client, base + paths_with(Trouble.MALFORMED_HTML)[0])
        _, broken = await get(client, base + paths_with(Trouble.BROKEN_JSON_LD)[0])
        _, bare = await get(client, base + paths_with(Trouble.NO_JSON_LD)[0])
        started = time.perf_counter()
        await get(client, base + paths_with(Trouble.SLOW)[0])
        assert time.perf_counter() - started >= 0.3
    assert not malformed.rstrip().endswith(b"</html>") and b"</body>" not in malformed
    json.loads(JSON_LD.findall(malformed.decode())[0])  # the head is intact
    with pytest.raises(json.JSONDecodeError):
        json.loads(JSON_LD.findall(broken.decode())[0])
    assert not JSON_LD.findall(bare.decode())
    for page in (malformed, broken, bare):
        assert b'property="og:title"' in page and b'class="product-name"' in page


async def test_images_decode_are_not_square_and_some_are_duplicates_or_corrupt(
    client: aiohttp.ClientSession,
) -> None:
    products = catalog_at(CONFIG, 0)
    image_paths = [path for p in products for path in p.image_paths]
    corrupt = [path for path in image_paths if kind_for(CONFIG, path) is Trouble.CORRUPT_IMAGE]
    duplicates = [
        (f"/images/{name}.jpg", f"/images/{source}.jpg")
        for path in image_paths
        if (source := duplicate_image_source(CONFIG, name := path[8:-4])) is not None
    ]
    assert 40 <= len(corrupt) <= 130 and 50 <= len(duplicates) <= 160
    sample = [path for p in products[:40] for path in p.image_paths if path not in corrupt]
    async with running_shop(CONFIG) as base:
        for path in sample:
            status, body = await get(client, base + path)
            image = Image.open(io.BytesIO(body))
            image.load()
            assert status == 200 and image.format == "JPEG"
            assert max(image.size) == CONFIG.image_side and image.size[0] != image.size[1]
        copy, source = duplicates[0]
        assert (await get(client, base + copy))[1] == (await get(client, base + source))[1]
        status, body = await get(client, base + corrupt[0])
        assert status == 200
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()
    shape = products[0].category.shape
    assert image_size(shape, 320) in ((320, 240), (240, 320))


# -- stats and admin -----------------------------------------------------------------------------


async def test_stats_count_kinds_statuses_private_and_peak_concurrency(
    client: aiohttp.ClientSession,
) -> None:
    config = replace(CONFIG, latency_ms=50, trouble=False)
    products = live_products(config)[:12]
    async with running_shop(config) as base:
        await client.post(f"{base}/_admin/stats/reset")
        await asyncio.gather(*(get(client, base + p.url_path) for p in products))
        await get(client, f"{base}/robots.txt")
        await get(client, f"{base}/private/preview/women-dresses")
        await get(client, f"{base}/p/no-such-thing-P999999")
        await get(client, f"{base}/c/women-dresses?page=99")
        async with client.get(f"{base}/_admin/stats") as response:
            stats = await response.json()
        async with client.get(f"{base}/_admin/catalog") as response:
            catalog = await response.json()
    assert stats["by_kind_status"]["product"] == {"200": 12, "404": 1}
    assert stats["by_kind"]["robots"] == 1 and stats["by_kind"]["listing"] == 1
    assert stats["private"] == 1 and stats["by_kind"]["admin"] == 1
    assert stats["peak_in_flight"] >= 4 and stats["in_flight"] == 0
    assert len(catalog["products"]) == 2000 and catalog["products"][0]["id"] == "P000000"
    assert catalog["products"][5]["url"] == base + catalog_at(config, 0)[5].url_path


async def test_latency_is_a_deadline_for_pages_and_errors_but_not_admin(
    client: aiohttp.ClientSession,
) -> None:
    config = replace(CONFIG, latency_ms=80, trouble=False)
    page = live_products(config)[0].url_path
    async with running_shop(config) as base:
        timings = {}
        for name, path in (("page", page), ("missing", "/p/no-such-thing-P999999"),
                           ("admin", "/_admin/stats")):  # fmt: skip
            started = time.perf_counter()
            status, _ = await get(client, base + path)
            timings[name] = (status, time.perf_counter() - started)
    assert timings["page"][0] == 200 and timings["page"][1] >= 0.08
    assert timings["missing"][0] == 404 and timings["missing"][1] >= 0.08
    assert timings["admin"][0] == 200 and timings["admin"][1] < 0.08


def test_index_sitemap_chunks_hold_at_most_a_thousand() -> None:
    index = CatalogIndex(replace(CONFIG, products=2500), 0)
    assert [len(chunk) for chunk in index.sitemap_chunks()] == [1000, 1000, 500]
