"""The catalog in Postgres: products upserted by (site, SKU), price history, pages.

Every function takes the caller's session (or, for the crawl's hot path, an
asyncpg connection) and writes inside its transaction; the crawler writes pages
in batches, one short transaction each (writer.py, ``write_batch``), so a crawl
stopped at any point leaves every product either as it was or fully updated.
Products are never deleted: a product the shop removed is marked unavailable
with gone_at, and comes back (available again, gone_at cleared) if it is seen again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog.records import ChangeKind, ProductRecord
from core.db.catalog_models import CrawlPage, Product, ProductImage
from core.errors import Conflict


@dataclass(frozen=True)
class KnownProduct:
    id: uuid.UUID
    content_hash: str
    gone: bool


# --- products -----------------------------------------------------------------------


async def find_product(session: AsyncSession, site: str, external_id: str) -> KnownProduct | None:
    row = (
        await session.exec(
            select(Product.id, Product.content_hash, Product.gone_at).where(
                col(Product.site) == site, col(Product.external_id) == external_id
            )
        )
    ).first()
    return None if row is None else KnownProduct(row[0], row[1], row[2] is not None)


async def image_sources(session: AsyncSession, product_id: uuid.UUID) -> dict[str, str]:
    """source_url -> image sha256 of the images a product links to now."""
    rows = await session.exec(
        select(ProductImage.source_url, ProductImage.image_sha256).where(
            col(ProductImage.product_id) == product_id
        )
    )
    return dict(rows.all())


async def mark_gone(session: AsyncSession, product_id: uuid.UUID, now: datetime) -> bool:
    """The shop answered 404/410 for its page. True if it was not gone already."""
    done = await session.execute(
        update(Product)
        .where(col(Product.id) == product_id, col(Product.gone_at).is_(None))
        .values(available=False, gone_at=now)
        .returning(col(Product.id))
    )
    return done.scalar_one_or_none() is not None


async def mark_unseen_gone(
    session: AsyncSession, site: str, run_id: uuid.UUID, now: datetime
) -> int:
    """After a complete crawl: products of the site this run did not see are gone.

    Their pages lose their validators, so if one comes back its page is read in
    full (a 304 would not tell us its sizes and availability)."""
    gone = await session.execute(
        update(Product)
        .where(
            col(Product.site) == site,
            col(Product.gone_at).is_(None),
            col(Product.last_run_id).is_distinct_from(run_id),
        )
        .values(available=False, gone_at=now)
        .returning(col(Product.id))
    )
    ids = list(gone.scalars())
    if ids:
        await session.execute(
            update(CrawlPage)
            .where(col(CrawlPage.site) == site, col(CrawlPage.product_id).in_(ids))
            .values(etag=None, last_modified=None)
        )
    return len(ids)


# --- pages --------------------------------------------------------------------------


async def find_page(session: AsyncSession, site: str, url: str) -> CrawlPage | None:
    return (
        await session.exec(
            select(CrawlPage).where(col(CrawlPage.site) == site, col(CrawlPage.url) == url)
        )
    ).first()


async def known_product_pages(
    session: AsyncSession, site: str, *, after_id: int, limit: int
) -> list[tuple[int, str]]:
    """(page id, url) of product pages whose product is not gone, by page id:
    keyset pages, so the caller never holds them all nor a long transaction."""
    query = (
        select(CrawlPage.id, CrawlPage.url)
        .join(Product, col(Product.id) == col(CrawlPage.product_id))
        .where(
            col(CrawlPage.site) == site,
            col(CrawlPage.kind) == "product",
            col(CrawlPage.id) > after_id,
            col(Product.gone_at).is_(None),
        )
        .order_by(col(CrawlPage.id))
        .limit(limit)
    )
    return [(int(page_id or 0), url) for page_id, url in (await session.exec(query)).all()]


# --- one crawl at a time per site ---------------------------------------------------


def _lock_key(site: str) -> int:
    digest = hashlib.blake2b(f"atelier.crawl:{site}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@asynccontextmanager
async def site_lock(engine: AsyncEngine, site: str) -> AsyncIterator[None]:
    """A Postgres advisory lock on its own connection for the whole crawl.

    Session-level, in autocommit (no transaction stays open for hours). If the
    process dies, its connection dies and Postgres releases the lock; here the
    connection is closed, never returned to the pool still holding it."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        key = _lock_key(site)
        taken = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
        if not taken:
            raise Conflict(f"a crawl of {site} is already running")
        try:
            yield
        finally:
            await conn.invalidate()


# --- batched, on the driver connection ----------------------------------------------
#
# The crawl's hot path: one lookup per chunk of discovered URLs, one transaction
# per batch of page outcomes (writer.py). Plain SQL on asyncpg (prepared and
# cached per connection): the ORM's per-statement work cost more CPU than the
# crawl's fetching and parsing together.


@dataclass(frozen=True, slots=True)
class KnownPage:
    """What the last visit of a product page left: its validators and its product."""

    url: str
    etag: str | None
    last_modified: str | None
    status: int
    fetched_at: datetime
    product_id: uuid.UUID | None
    external_id: str | None  # of that product
    content_hash: str | None
    product_gone: bool
    image_sources: dict[str, str] | None = None  # source URL -> sha256, when asked for


def engine_of(sessions: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    engine = sessions.kw.get("bind")
    if not isinstance(engine, AsyncEngine):
        raise TypeError("the crawler needs a sessionmaker bound to an AsyncEngine")
    return engine


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """asyncpg's connection under a pooled SQLAlchemy one (returned to the pool after)."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        yield raw.driver_connection


async def image_known(conn: asyncpg.Connection, sha256: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM catalog_image WHERE sha256 = $1", sha256))


_INSERT_IMAGE_SQL = """
INSERT INTO catalog_image (sha256, blob_key, padded_blob_key, media_type, width, height, bytes,
                           created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now())
ON CONFLICT (sha256) DO NOTHING RETURNING sha256
"""


async def insert_image(conn: asyncpg.Connection, values: dict[str, Any]) -> bool:
    """A ``catalog_image`` row (images.store_image_blobs' values); False if the
    same bytes were stored meanwhile (by another worker: a harmless race)."""
    keys = ("sha256", "blob_key", "padded_blob_key", "media_type", "width", "height", "bytes")
    return await conn.fetchval(_INSERT_IMAGE_SQL, *(values[k] for k in keys)) is not None


_LISTING_PAGE_SQL = """
SELECT url, kind, status, fetched_at, etag, last_modified, links FROM crawl_page
WHERE site = $1 AND url = $2
"""


async def listing_page(conn: asyncpg.Connection, site: str, url: str) -> PageRow | None:
    """A listing's or sitemap's row as its last visit left it (links included)."""
    row = await conn.fetchrow(_LISTING_PAGE_SQL, site, url)
    return None if row is None else PageRow(*row)


_KNOWN_PAGES_SQL = """
SELECT cp.url, cp.etag, cp.last_modified, cp.status, cp.fetched_at, cp.product_id,
       p.external_id, p.content_hash, p.gone_at IS NOT NULL
FROM crawl_page cp LEFT JOIN product p ON p.id = cp.product_id
WHERE cp.site = $1 AND cp.url = ANY($2::text[])
"""
_IMAGE_SOURCES_SQL = """
SELECT product_id, source_url, image_sha256 FROM product_image
WHERE product_id = ANY($1::uuid[]) ORDER BY product_id, position
"""


async def known_pages(
    conn: asyncpg.Connection, site: str, urls: list[str], *, images: bool = False
) -> dict[str, KnownPage]:
    """The pages among ``urls`` we visited before, by URL, in one query (two with
    ``images``: the image sources of their products too)."""
    rows = await conn.fetch(_KNOWN_PAGES_SQL, site, urls)
    sources: dict[uuid.UUID, dict[str, str]] = {}
    if images:
        ids = list({row[5] for row in rows if row[5] is not None})
        for product_id, source, sha in await conn.fetch(_IMAGE_SOURCES_SQL, ids) if ids else ():
            sources.setdefault(product_id, {})[source] = sha
    return {
        url: KnownPage(url, etag, modified, status, fetched_at, product_id, sku, content_hash,
                       gone, sources.get(product_id, {}) if images and product_id else None)
        for url, etag, modified, status, fetched_at, product_id, sku, content_hash, gone in rows
    }  # fmt: skip


@dataclass(slots=True)
class PageRow:
    """A crawl_page row as this visit leaves it."""

    url: str
    kind: str
    status: int
    fetched_at: datetime
    etag: str | None = None
    last_modified: str | None = None
    links: dict[str, Any] | None = None
    product_id: uuid.UUID | None = None


@dataclass(slots=True)
class ProductWrite:
    """A product read off its page: upserted by (site, external id)."""

    record: ProductRecord
    seen_at: datetime
    page: PageRow  # its product_id is filled in once the product has one
    images: list[tuple[str, str]] | None = None  # None: its image links stay as they are
    content_hash: str = ""

    def __post_init__(self) -> None:
        self.content_hash = self.content_hash or self.record.content_hash()


@dataclass(slots=True)
class Touch:
    """Seen, unchanged (a 304, a sitemap lastmod we trust, a page we could not read)."""

    product_id: uuid.UUID
    seen_at: datetime
    page: PageRow | None = None  # None: the page was not fetched, its row stays
    counts: bool = True  # as an unchanged product (not for a page we could not read)


@dataclass(slots=True)
class Gone:
    """The shop answered 404/410 for the page."""

    product_id: uuid.UUID | None
    seen_at: datetime
    page: PageRow


@dataclass
class BatchOutcome:
    """What one written batch did, for the tally."""

    changes: list[ChangeKind]
    gone: int = 0
    # Touched products found gone meanwhile: their pages lost their validators.
    touched_gone: int = 0


_PRODUCT_COLUMNS = (
    "id, site, external_id, url, designer, name, description, price, currency, available,"
    " sizes, category_path, content_hash, first_seen, last_seen, changed_at, last_run_id"
)
_EXISTING_SQL = """
SELECT external_id, id, content_hash, gone_at IS NOT NULL, price, currency FROM product
WHERE site = $1 AND external_id = ANY($2::text[]) ORDER BY id FOR UPDATE
"""
_INSERT_PRODUCTS_SQL = f"""
INSERT INTO product ({_PRODUCT_COLUMNS})
SELECT u.id, $1, u.external_id, u.url, u.designer, u.name, u.description, u.price, u.currency,
       u.available, u.sizes::jsonb, u.category_path::jsonb, u.content_hash, u.seen, u.seen,
       u.seen, $2
FROM unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::numeric[], $10::text[], $11::bool[], $12::text[], $13::text[], $14::text[],
            $15::timestamptz[])
     AS u(id, external_id, url, designer, name, description, price, currency, available,
          sizes, category_path, content_hash, seen)
ON CONFLICT ON CONSTRAINT uq_product_site_external DO NOTHING
RETURNING external_id, id
"""
_UPDATE_CHANGED_SQL = """
UPDATE product p SET url = u.url, designer = u.designer, name = u.name,
       description = u.description, price = u.price, currency = u.currency,
       available = u.available, sizes = u.sizes::jsonb, category_path = u.category_path::jsonb,
       content_hash = u.content_hash, last_seen = u.seen, changed_at = u.seen,
       last_run_id = $1, gone_at = NULL
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::numeric[],
            $8::text[], $9::bool[], $10::text[], $11::text[], $12::text[], $13::timestamptz[])
     AS u(id, url, designer, name, description, price, currency, available, sizes,
          category_path, content_hash, seen)
WHERE p.id = u.id
"""
_UPDATE_SEEN_SQL = """
UPDATE product p SET url = u.url, last_seen = u.seen, last_run_id = $1, gone_at = NULL
FROM unnest($2::uuid[], $3::text[], $4::timestamptz[]) AS u(id, url, seen)
WHERE p.id = u.id
"""
_INSERT_PRICES_SQL = """
INSERT INTO product_price (product_id, price, currency, seen_at, run_id)
SELECT u.product_id, u.price, u.currency, u.seen, $1
FROM unnest($2::uuid[], $3::numeric[], $4::text[], $5::timestamptz[])
     AS u(product_id, price, currency, seen)
"""
_DELETE_IMAGES_SQL = "DELETE FROM product_image WHERE product_id = ANY($1::uuid[])"
_INSERT_IMAGES_SQL = """
INSERT INTO product_image (id, product_id, position, source_url, image_sha256)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[])
"""
_TOUCH_SQL = """
UPDATE product p SET last_seen = u.seen, last_run_id = $1
FROM unnest($2::uuid[], $3::timestamptz[]) AS u(id, seen)
WHERE p.id = u.id AND p.gone_at IS NULL
RETURNING p.id
"""
_GONE_SQL = """
UPDATE product p SET available = false, gone_at = u.seen
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, seen)
WHERE p.id = u.id AND p.gone_at IS NULL
RETURNING p.id
"""
_SAVE_PAGES_SQL = """
INSERT INTO crawl_page (site, url, kind, etag, last_modified, status, links, product_id,
                        fetched_at)
SELECT $1, u.url, u.kind, u.etag, u.last_modified, u.status, u.links::jsonb, u.product_id,
       u.fetched_at
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[], $8::uuid[],
            $9::timestamptz[])
     AS u(url, kind, etag, last_modified, status, links, product_id, fetched_at)
ON CONFLICT ON CONSTRAINT uq_crawl_page_site_url DO UPDATE SET
    kind = excluded.kind, etag = excluded.etag, last_modified = excluded.last_modified,
    status = excluded.status, links = excluded.links, product_id = excluded.product_id,
    fetched_at = excluded.fetched_at
"""


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _content_columns(writes: list[ProductWrite]) -> list[list[Any]]:
    """url .. content_hash, seen: the unnest arrays of the product columns."""
    records = [w.record for w in writes]
    return [
        [r.url for r in records],
        [r.designer for r in records],
        [r.name for r in records],
        [r.description for r in records],
        [r.price for r in records],
        [r.currency for r in records],
        [r.available for r in records],
        [_json(list(r.sizes)) for r in records],
        [_json(list(r.category_path)) for r in records],
        [w.content_hash for w in writes],
        [w.seen_at for w in writes],
    ]


async def write_batch(
    conn: asyncpg.Connection,
    site: str,
    run_id: uuid.UUID,
    writes: list[ProductWrite],
    touches: list[Touch],
    gones: list[Gone],
    pages: list[PageRow],
) -> BatchOutcome:
    """Write one batch of page outcomes; call it inside a transaction.

    Products first: their rows are locked (``FOR UPDATE``) and compared, the
    missing ones inserted with ``ON CONFLICT DO NOTHING`` (a row another writer
    inserted meanwhile is then locked and compared like the others), so the
    new/changed/unchanged classification and the price history stay right under
    concurrency. ``writes`` must not repeat an external id.
    """
    changes: list[ChangeKind] = []
    if writes:
        changes = await _write_products(conn, site, run_id, writes)
    touched_gone = 0
    if touches:
        touched = {
            row[0]
            for row in await conn.fetch(
                _TOUCH_SQL, run_id, [t.product_id for t in touches], [t.seen_at for t in touches]
            )
        }
        for touch in touches:
            if touch.product_id in touched:
                changes.extend([ChangeKind.unchanged] if touch.counts else [])
            elif touch.page is not None:
                # Gone meanwhile: a 304 cannot tell us the product; read it in full next time.
                touch.page.etag = touch.page.last_modified = None
                touched_gone += 1
    gone = 0
    marked = [g for g in gones if g.product_id is not None]
    if marked:
        ids = [g.product_id for g in marked]
        gone = len(await conn.fetch(_GONE_SQL, ids, [g.seen_at for g in marked]))
    rows = list({page.url: page for page in pages}.values())  # one row per URL
    if rows:
        await conn.execute(
            _SAVE_PAGES_SQL,
            site,
            [p.url for p in rows],
            [p.kind for p in rows],
            [p.etag for p in rows],
            [p.last_modified for p in rows],
            [p.status for p in rows],
            [_json(p.links) for p in rows],
            [p.product_id for p in rows],
            [p.fetched_at for p in rows],
        )
    return BatchOutcome(changes, gone, touched_gone)


async def _write_products(
    conn: asyncpg.Connection, site: str, run_id: uuid.UUID, writes: list[ProductWrite]
) -> list[ChangeKind]:
    by_sku = {w.record.external_id: w for w in writes}
    assert len(by_sku) == len(writes), "one write per external id in a batch"
    existing = {row[0]: row for row in await conn.fetch(_EXISTING_SQL, site, list(by_sku))}
    change: dict[str, ChangeKind] = {}
    priced: list[ProductWrite] = []
    missing = [w for sku, w in by_sku.items() if sku not in existing]
    if missing:
        ids = [uuid.uuid4() for _ in missing]
        content = _content_columns(missing)
        inserted = await conn.fetch(
            _INSERT_PRODUCTS_SQL, site, run_id, ids,
            [w.record.external_id for w in missing], *content,
        )  # fmt: skip
        for sku, product_id in inserted:
            by_sku[sku].page.product_id = product_id
            change[sku] = ChangeKind.new
            priced.append(by_sku[sku])
        raced = [w.record.external_id for w in missing if w.record.external_id not in change]
        if raced:  # inserted by another writer since we looked: lock and compare them
            for row in await conn.fetch(_EXISTING_SQL, site, raced):
                existing[row[0]] = row
    changed: list[ProductWrite] = []
    seen: list[ProductWrite] = []
    for sku, (_, product_id, old_hash, old_gone, old_price, old_currency) in existing.items():
        write = by_sku[sku]
        write.page.product_id = product_id
        record = write.record
        if old_hash != write.content_hash or old_gone:
            change[sku] = ChangeKind.changed
            changed.append(write)
        else:
            change[sku] = ChangeKind.unchanged
            seen.append(write)
        if old_price != record.price or old_currency != record.currency:
            priced.append(write)
    if changed:
        await conn.execute(
            _UPDATE_CHANGED_SQL, run_id, [w.page.product_id for w in changed],
            *_content_columns(changed),
        )  # fmt: skip
    if seen:
        await conn.execute(
            _UPDATE_SEEN_SQL, run_id, [w.page.product_id for w in seen],
            [w.record.url for w in seen], [w.seen_at for w in seen],
        )  # fmt: skip
    if priced:
        await conn.execute(
            _INSERT_PRICES_SQL, run_id, [w.page.product_id for w in priced],
            [w.record.price for w in priced], [w.record.currency for w in priced],
            [w.seen_at for w in priced],
        )  # fmt: skip
    imaged = [w for w in writes if w.images is not None]
    if imaged:
        await conn.execute(_DELETE_IMAGES_SQL, [w.page.product_id for w in imaged])
        links = [(w.page.product_id, i, url, sha) for w in imaged
                 for i, (url, sha) in enumerate(w.images or ())]  # fmt: skip
        if links:
            columns = [list(column) for column in zip(*links, strict=True)]
            await conn.execute(_INSERT_IMAGES_SQL, [uuid.uuid4() for _ in links], *columns)
    return [change[w.record.external_id] for w in writes if w.record.external_id in change]
