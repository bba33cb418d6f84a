"""Field-for-field agreement of two crawls with the fixture shop's ground truth.

Every side is normalised to the same plain form first (price as a 2-decimal
string, lists as lists, stripped text), so a difference is a real difference in
what was extracted, not in how it was typed.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("designer", "name", "description", "price", "currency", "available", "sizes",
          "category_path", "image_urls")  # fmt: skip
Normalised = dict[str, dict[str, Any]]  # external id -> field -> value


def _price(value: Any) -> str | None:
    if value in (None, ""):
        return None
    return f"{Decimal(str(value).replace(',', '')):.2f}"


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "designer": str(record.get("designer") or "").strip(),
        "name": str(record.get("name") or "").strip(),
        "description": str(record.get("description") or "").strip(),
        "price": _price(record.get("price")),
        "currency": record.get("currency") or None,
        "available": bool(record.get("available")),
        "sizes": [str(s) for s in record.get("sizes") or []],
        "category_path": [str(s) for s in record.get("category_path") or []],
        "image_urls": [str(u) for u in record.get("image_urls") or []],
    }


async def _connect(database_url: str, database: str | None = None) -> asyncpg.Connection:
    url = make_url(database_url)
    return await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=database or url.database
    )


def truth_products(catalog: Any) -> Normalised:
    """The shop's ``/_admin/catalog``: live products only (gone ones have no page)."""
    items = catalog["products"] if isinstance(catalog, dict) else catalog
    truth: Normalised = {}
    for item in items:
        if item.get("status", "live") != "live":
            continue
        record = dict(item)
        record["sizes"] = item.get("sizes_in_stock", item.get("sizes"))
        record["image_urls"] = item.get("image_urls", item.get("images"))
        truth[str(item["id"])] = _normalise(record)
    return truth


def atelier_products(database_url: str, site: str) -> Normalised:
    async def read() -> list[asyncpg.Record]:
        conn = await _connect(database_url)
        try:
            return await conn.fetch(
                "SELECT p.*, coalesce(array_agg(i.source_url ORDER BY i.position) "
                "FILTER (WHERE i.source_url IS NOT NULL), '{}') AS image_urls "
                "FROM product p LEFT JOIN product_image i ON i.product_id = p.id "
                "WHERE p.site = $1 AND p.gone_at IS NULL GROUP BY p.id",
                site,
            )
        finally:
            await conn.close()

    products: Normalised = {}
    for row in asyncio.run(read()):
        record = dict(row)
        for key in ("sizes", "category_path"):
            if isinstance(record[key], str):
                record[key] = json.loads(record[key])
        products[row["external_id"]] = _normalise(record)
    return products


def last_crawl_seconds(database_url: str, site: str) -> float:
    """The duration atelier recorded for its newest crawl of ``site``."""

    async def read() -> float:
        conn = await _connect(database_url)
        try:
            return float(await conn.fetchval(
                "SELECT duration_s FROM crawl_run WHERE site = $1 ORDER BY started_at DESC LIMIT 1",
                site,
            ))  # fmt: skip
        finally:
            await conn.close()

    return asyncio.run(read())


def scrapy_products(feed: Path) -> Normalised:
    products: Normalised = {}
    for line in feed.read_text().splitlines():
        record = json.loads(line)
        products[record["external_id"]] = _normalise(record)
    return products


def agreement_table(
    catalog: Any, atelier: Normalised, scrapy: Normalised
) -> dict[str, dict[str, float]]:
    """Per field, the share of ground-truth products each side got exactly right.

    ``found`` is the share of products extracted at all.
    """
    truth = truth_products(catalog)
    table: dict[str, dict[str, float]] = {"found": {}}
    for side, got in (("atelier", atelier), ("scrapy", scrapy)):
        table["found"][side] = sum(1 for key in truth if key in got) / max(len(truth), 1)
        for field in FIELDS:
            compared = [key for key in truth if key in got]
            right = sum(1 for key in compared if got[key][field] == truth[key][field])
            table.setdefault(field, {})[side] = right / max(len(compared), 1)
    return table


def recreate_and_migrate(database_url: str) -> None:
    """A fresh scratch database at the newest migration."""

    async def recreate() -> None:
        url = make_url(database_url)
        admin = await _connect(database_url, "postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{url.database}"')
        finally:
            await admin.close()

    asyncio.run(recreate())
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")
