"""The catalog in Postgres: products upserted by (site, SKU), price history, pages.

Every function takes the caller's session and writes inside its transaction;
the crawler gives each product its own short transaction, so a crawl stopped at
any point leaves every product either as it was or fully updated. Products are
never deleted: a product the shop removed is marked unavailable with gone_at,
and comes back (available again, gone_at cleared) if it is seen again.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog.records import ChangeKind, ProductRecord
from core.db.catalog_models import CrawlPage, Product, ProductImage, ProductPrice
from core.errors import Conflict


@dataclass(frozen=True)
class KnownProduct:
    id: uuid.UUID
    content_hash: str
    gone: bool


@dataclass(frozen=True)
class SavedProduct:
    id: uuid.UUID
    change: ChangeKind


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


def _content(record: ProductRecord, content_hash: str) -> dict[str, Any]:
    return dict(
        url=record.url,
        designer=record.designer,
        name=record.name,
        description=record.description,
        price=record.price,
        currency=record.currency,
        available=record.available,
        sizes=list(record.sizes),
        category_path=list(record.category_path),
        content_hash=content_hash,
    )


async def save_product(
    session: AsyncSession, site: str, record: ProductRecord, run_id: uuid.UUID, now: datetime
) -> SavedProduct:
    """Insert or update one product; say whether it is new, changed or unchanged.

    The row is locked (or inserted with ON CONFLICT DO NOTHING, so two workers
    meeting the same SKU cannot both insert it) before it is compared, which
    keeps the classification and the price history right under concurrency.
    """
    content_hash = record.content_hash()
    where = (col(Product.site) == site, col(Product.external_id) == record.external_id)
    lock = select(Product).where(*where).with_for_update()
    existing = (await session.exec(lock)).first()
    if existing is None:
        inserted = await session.execute(
            insert(Product)
            .values(
                id=uuid.uuid4(),
                site=site,
                external_id=record.external_id,
                **_content(record, content_hash),
                first_seen=now,
                last_seen=now,
                changed_at=now,
                last_run_id=run_id,
            )
            .on_conflict_do_nothing(constraint="uq_product_site_external")
            .returning(col(Product.id))
        )
        product_id = inserted.scalar_one_or_none()
        if product_id is not None:
            await _price_seen(session, product_id, record, run_id, now)
            return SavedProduct(product_id, ChangeKind.new)
        existing = (await session.exec(lock)).one()  # inserted by another worker meanwhile
    values: dict[str, Any] = dict(url=record.url, last_seen=now, last_run_id=run_id, gone_at=None)
    changed = existing.content_hash != content_hash or existing.gone_at is not None
    if changed:
        values |= _content(record, content_hash) | {"changed_at": now}
    if existing.price != record.price or existing.currency != record.currency:
        await _price_seen(session, existing.id, record, run_id, now)
    await session.execute(update(Product).where(col(Product.id) == existing.id).values(**values))
    return SavedProduct(existing.id, ChangeKind.changed if changed else ChangeKind.unchanged)


async def _price_seen(
    session: AsyncSession,
    product_id: uuid.UUID,
    record: ProductRecord,
    run_id: uuid.UUID,
    now: datetime,
) -> None:
    """A price history row: on first sight and whenever price or currency change."""
    row = dict(product_id=product_id, price=record.price, currency=record.currency,
               seen_at=now, run_id=run_id)  # fmt: skip
    await session.execute(insert(ProductPrice).values(**row))


async def touch_product(
    session: AsyncSession, product_id: uuid.UUID, run_id: uuid.UUID, now: datetime
) -> bool:
    """Seen unchanged (304, or a page we could not read this time): last_seen and
    last_run_id only. False when the product is gone: its page needs a full GET."""
    done = await session.execute(
        update(Product)
        .where(col(Product.id) == product_id, col(Product.gone_at).is_(None))
        .values(last_seen=now, last_run_id=run_id)
        .returning(col(Product.id))
    )
    return done.scalar_one_or_none() is not None


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


async def save_page(session: AsyncSession, page: CrawlPage) -> None:
    """Upsert by (site, url): what the last fetch of this URL gave."""
    values = dict(
        kind=page.kind, etag=page.etag, last_modified=page.last_modified, status=page.status,
        links=page.links, product_id=page.product_id, fetched_at=page.fetched_at,
    )  # fmt: skip
    await session.execute(
        insert(CrawlPage)
        .values(site=page.site, url=page.url, **values)
        .on_conflict_do_update(constraint="uq_crawl_page_site_url", set_=values)
    )


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
