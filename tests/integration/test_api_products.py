"""The catalog API: product search and detail, catalog images, admin crawls."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from httpx import AsyncClient
from PIL import Image
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.store import blob_store_from_settings
from core.catalog.images import ingest_image, set_product_images
from core.db.catalog_models import CrawlRun, Product, ProductPrice
from core.db.engine import session_scope
from core.db.models import Job, JobStatus, utcnow
from core.settings import Settings

Sessions = async_sessionmaker[AsyncSession]
T0 = utcnow() - timedelta(days=1)

CATALOG: list[dict[str, Any]] = [
    dict(designer="Erdem", name="Floral midi dress", description="Silk crepe, floral print",
         price=Decimal("1250.00"), category_path=["Women", "Clothing", "Dresses"]),
    dict(designer="erdem", name="Lace blouse", description="Cotton lace 100%",
         price=Decimal("690.00"), category_path=["Women", "Clothing", "Tops"], available=False),
    dict(designer="Khaite", name="Wool coat", description="Double-faced wool",
         price=Decimal("2900.00"), category_path=["Women", "Clothing", "Coats"]),
    dict(designer="Khaite", name="Leather boots", description="Knee-high, black_calf",
         price=Decimal("1450.00"), category_path=["Women", "Shoes", "Boots"], currency="GBP"),
    dict(designer="Toteme", name="Slip dress", description="Silk satin",
         price=Decimal("450.00"), category_path=["Women", "Clothing", "Dresses"], site="other"),
]  # fmt: skip


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60, 90), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def catalog(sessions: Sessions, settings: Settings) -> list[Product]:
    """Five products (seen a minute apart, newest last), images for the first."""
    products = []
    async with session_scope(sessions) as session:
        for i, spec in enumerate(CATALOG):
            fields = dict(spec)
            product = Product(
                site=fields.pop("site", "fixture"),
                external_id=f"P{i:06d}",
                url=f"https://shop.example/p/{i}",
                currency=fields.pop("currency", "EUR"),
                content_hash=str(i),
                first_seen=T0 + timedelta(minutes=i),
                **fields,
            )
            session.add(product)
            products.append(product)
        await session.flush()
        blobs = blob_store_from_settings(settings)
        images = [
            await ingest_image(session, blobs, _png(c), side=64, max_pixels=10**6)
            for c in [(200, 0, 0), (0, 200, 0)]
        ]
        await set_product_images(
            session,
            products[0].id,
            [(f"https://shop.example/i/{k}.png", im.sha256) for k, im in enumerate(images)],
        )
        session.add(
            ProductPrice(
                product_id=products[0].id, price=Decimal("1400.00"), currency="EUR", seen_at=T0
            )
        )
        session.add(
            ProductPrice(
                product_id=products[0].id,
                price=Decimal("1250.00"),
                currency="EUR",
                seen_at=T0 + timedelta(hours=1),
            )
        )
    return products


async def _names(client: AsyncClient, auth: dict[str, str], **params: Any) -> list[str]:
    response = await client.get("/v1/products", headers=auth, params=params)
    assert response.status_code == 200, response.text
    return [item["name"] for item in response.json()["items"]]


async def test_products_need_a_key(client: AsyncClient, catalog: list[Product]) -> None:
    response = await client.get("/v1/products")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["Slip dress", "Leather boots", "Wool coat", "Lace blouse", "Floral midi dress"]),
        ({"designer": "ERDEM"}, ["Lace blouse", "Floral midi dress"]),
        ({"category": "dresses"}, ["Slip dress", "Floral midi dress"]),
        ({"category": "Shoes"}, ["Leather boots"]),
        ({"category": "Dress"}, []),  # a whole level, not a substring
        ({"min_price": "690", "max_price": "1450"}, ["Leather boots", "Lace blouse",
                                                     "Floral midi dress"]),
        ({"currency": "gbp"}, ["Leather boots"]),
        ({"available": "false"}, ["Lace blouse"]),
        ({"available": "true", "designer": "erdem"}, ["Floral midi dress"]),
        ({"site": "other"}, ["Slip dress"]),
        ({"q": "SILK"}, ["Slip dress", "Floral midi dress"]),
        ({"q": "100%"}, ["Lace blouse"]),  # LIKE wildcards are literal
        ({"q": "black_calf"}, ["Leather boots"]),
        ({"q": "a_b"}, []),
    ],
)  # fmt: skip
async def test_filters(
    client: AsyncClient,
    auth: dict[str, str],
    catalog: list[Product],
    params: dict[str, str],
    expected: list[str],
) -> None:
    assert await _names(client, auth, **params) == expected


async def test_pagination_is_stable_and_complete(
    client: AsyncClient, auth: dict[str, str], catalog: list[Product], sessions: Sessions
) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/v1/products", headers=auth, params=params)).json()
        seen += [item["name"] for item in body["items"]]
        pages += 1
        if pages == 1:  # a product appearing meanwhile does not shift later pages
            async with session_scope(sessions) as session:
                session.add(
                    Product(
                        site="fixture", external_id="NEW", url="u", name="New", content_hash="n"
                    )
                )
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert pages == 3
    # No gap, no repeat; the newcomer sorts first, before the pages already read.
    assert await _names(client, auth, limit=100) == ["New", *seen]
    assert len(set(seen)) == len(CATALOG)

    bad = await client.get("/v1/products", headers=auth, params={"cursor": "garbage!"})
    assert bad.status_code == 422
    ties = await _names(client, auth, designer="khaite", limit=1)
    assert ties == ["Leather boots"]


async def test_bad_filter_values_are_problems(
    client: AsyncClient, auth: dict[str, str], catalog: list[Product]
) -> None:
    for params in ({"min_price": "-1"}, {"min_price": "abc"}, {"limit": 0}, {"currency": "EURO"}):
        response = await client.get("/v1/products", headers=auth, params=params)
        assert response.status_code == 422, params
        assert response.headers["content-type"] == "application/problem+json"


async def test_list_items_carry_the_first_padded_image(
    client: AsyncClient, auth: dict[str, str], catalog: list[Product]
) -> None:
    items = (await client.get("/v1/products", headers=auth, params={"designer": "erdem"})).json()
    by_name = {item["name"]: item for item in items["items"]}
    first = by_name["Floral midi dress"]
    assert first["image_url"].startswith("http://testserver/v1/catalog-images/")
    assert "?variant=padded&expires=" in first["image_url"] and "&signature=" in first["image_url"]
    assert first["buy_url"] == "https://shop.example/p/0"
    assert first["price"] == "1250.00" and first["currency"] == "EUR"
    assert by_name["Lace blouse"]["image_url"] is None
    assert by_name["Lace blouse"]["sold_out"] is True


async def test_product_detail(
    client: AsyncClient, auth: dict[str, str], catalog: list[Product]
) -> None:
    response = await client.get(f"/v1/products/{catalog[0].id}", headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Floral midi dress" and body["designer"] == "Erdem"
    assert body["description"] == "Silk crepe, floral print"
    assert body["category_path"] == ["Women", "Clothing", "Dresses"]
    assert body["buy_url"] == "https://shop.example/p/0"
    assert body["available"] is True and body["sold_out"] is False and body["gone_at"] is None
    assert [p["price"] for p in body["price_history"]] == ["1400.00", "1250.00"]
    assert [i["position"] for i in body["images"]] == [0, 1]
    assert body["images"][1]["source_url"] == "https://shop.example/i/1.png"

    image = body["images"][0]
    padded = await client.get(image["padded_url"].removeprefix("http://testserver"), headers=auth)
    assert padded.status_code == 200 and padded.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(padded.content)).size == (64, 64)
    original = await client.get(
        image["original_url"].removeprefix("http://testserver"), headers=auth
    )
    assert original.content == _png((200, 0, 0))
    assert (image["width"], image["height"]) == (60, 90)


async def test_unknown_product_and_image_are_404(
    client: AsyncClient, auth: dict[str, str], catalog: list[Product]
) -> None:
    missing = await client.get(f"/v1/products/{uuid.uuid4()}", headers=auth)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert (await client.get("/v1/products/not-a-uuid", headers=auth)).status_code == 422
    image = await client.get(f"/v1/catalog-images/{'0' * 64}", headers=auth)
    assert image.status_code == 404
    assert (await client.get("/v1/catalog-images/..%2Fsecret", headers=auth)).status_code in (
        404,
        422,
    )


# --- admin -------------------------------------------------------------------------


@pytest.fixture
async def admin(sessions: Sessions) -> dict[str, str]:
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "ops", is_admin=True)
    return {"Authorization": f"Bearer {new.key}"}


async def test_admin_routes_refuse_other_keys(client: AsyncClient, auth: dict[str, str]) -> None:
    for method, path in [("POST", "/v1/admin/crawls"), ("GET", "/v1/admin/crawls")]:
        response = await client.request(method, path, headers=auth, json={"site": "fixture"})
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "/problems/forbidden"
        anonymous = await client.request(method, path, json={"site": "fixture"})
        assert anonymous.status_code == 401


async def test_start_a_crawl(
    client: AsyncClient, admin: dict[str, str], sessions: Sessions
) -> None:
    response = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["kind"] == "crawl" and job["status"] == "queued"
    assert job["params"] == {"site": "fixture"}
    polled = await client.get(f"/v1/jobs/{job['id']}", headers=admin)
    assert polled.status_code == 200 and polled.json()["id"] == job["id"]

    again = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
    assert again.status_code == 409
    assert again.json()["job_id"] == job["id"]

    async with session_scope(sessions) as session:
        row = await session.get(Job, uuid.UUID(job["id"]))
        assert row is not None
        row.status = JobStatus.succeeded
    third = await client.post("/v1/admin/crawls", headers=admin, json={"site": "fixture"})
    assert third.status_code == 201  # the earlier one is finished


async def test_unknown_site_lists_the_known_ones(
    client: AsyncClient, admin: dict[str, str]
) -> None:
    response = await client.post("/v1/admin/crawls", headers=admin, json={"site": "nope"})
    assert response.status_code == 422
    body = response.json()
    assert "fixture" in body["known_sites"] and "fixture" in body["detail"]
    missing = await client.post("/v1/admin/crawls", headers=admin, json={})
    assert missing.status_code == 422


async def test_list_crawl_runs(
    client: AsyncClient, admin: dict[str, str], sessions: Sessions
) -> None:
    async with session_scope(sessions) as session:
        for i, site in enumerate(["fixture", "other", "fixture"]):
            session.add(
                CrawlRun(
                    site=site,
                    status="succeeded",
                    pages=10 * i,
                    products_new=i,
                    errors={"http-500": i},
                    started_at=T0 + timedelta(hours=i),
                )
            )
    body = (await client.get("/v1/admin/crawls", headers=admin)).json()
    assert [run["pages"] for run in body["items"]] == [20, 10, 0]
    assert body["items"][0]["errors"] == {"http-500": 2}
    only = (await client.get("/v1/admin/crawls", headers=admin, params={"site": "other"})).json()
    assert [run["site"] for run in only["items"]] == ["other"]
