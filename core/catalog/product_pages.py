"""Visiting one product page: fetch, extract, images, one transaction.

The page is fetched conditionally; a 304 only touches the product (last_seen,
last_run_id). A 200 is extracted; a new or changed product gets its images
(those it did not already link under the same URL are downloaded and ingested,
each in its own short transaction: an image row alone is harmless), then the
product, its images and its crawl_page row are written in one transaction. A
404/410 marks the product that URL held unavailable and gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from datetime import datetime

from sqlalchemy.exc import IntegrityError

from core.catalog import store
from core.catalog.context import CrawlContext
from core.catalog.extract import ExtractionError, extract_product
from core.catalog.fetch import IMAGE_ACCEPT, CrawlErrorKind, FetchResult
from core.catalog.images import CatalogImageError, ingest_image, set_product_images
from core.catalog.records import ChangeKind, ProductRecord
from core.db.catalog_models import CatalogImage, CrawlPage
from core.db.engine import session_scope
from core.db.models import utcnow

log = logging.getLogger("atelier.catalog")


async def visit_product(ctx: CrawlContext, url: str) -> None:
    async with ctx.sessions() as session:
        previous = await store.find_page(session, ctx.site.name, url)
    result = await ctx.fetch_page(url, previous)
    if result.not_modified:
        if await _touch(ctx, url, result, previous, utcnow()):
            return
        # Marked gone since (or never stored): a 304 cannot tell us the product.
        result = await ctx.fetch_page(url, None)
    if result.error is CrawlErrorKind.robots:
        ctx.tally.error(CrawlErrorKind.robots, url, result.detail, unvisited=False)
    elif result.gone:
        await _gone(ctx, url, result, previous)
    elif not result.ok:
        await _failed(ctx, url, result, previous, result.error or CrawlErrorKind.http_4xx,
                      result.detail or f"HTTP {result.status}")  # fmt: skip
    else:
        try:
            record = await ctx.parse(
                len(result.body), extract_product, ctx.site, result.final_url or url, result.body,
                content_type=result.content_type,
                max_images=ctx.settings.crawl_images_per_product,
            )  # fmt: skip
        except ExtractionError as exc:
            await _failed(ctx, url, result, previous, CrawlErrorKind.parse, str(exc))
            return
        await _save(ctx, url, result, record)


async def _touch(
    ctx: CrawlContext, url: str, result: FetchResult, previous: CrawlPage | None, now: datetime
) -> bool:
    if previous is None or previous.product_id is None:
        return False
    async with session_scope(ctx.sessions) as session:
        if not await store.touch_product(session, previous.product_id, ctx.run_id, now):
            return False
        await store.save_page(session, _page_row(ctx, url, result, previous, now=now))
    ctx.tally.product(ChangeKind.unchanged)
    return True


async def _gone(
    ctx: CrawlContext, url: str, result: FetchResult, previous: CrawlPage | None
) -> None:
    now = utcnow()
    async with session_scope(ctx.sessions) as session:
        if previous is not None and previous.product_id is not None:
            if await store.mark_gone(session, previous.product_id, now):
                ctx.tally.product(ChangeKind.gone)
        await store.save_page(session, _page_row(ctx, url, result, previous, now=now))
    log.info("gone (%s): %s", result.status, url)


async def _failed(
    ctx: CrawlContext,
    url: str,
    result: FetchResult,
    previous: CrawlPage | None,
    error: CrawlErrorKind,
    detail: str,
) -> None:
    """Counted and logged. A page that answered but could not be read still shows
    its product exists: it is touched, so a complete crawl does not call it gone."""
    answered = result.definitive
    ctx.tally.error(error, url, detail, unvisited=not answered)
    now = utcnow()
    async with session_scope(ctx.sessions) as session:
        if answered and previous is not None and previous.product_id is not None:
            await store.touch_product(session, previous.product_id, ctx.run_id, now)
        await store.save_page(session, _page_row(ctx, url, result, previous, now=now))


async def _save(ctx: CrawlContext, url: str, result: FetchResult, record: ProductRecord) -> None:
    site = ctx.site.name
    linked, fetch_images = await _image_plan(ctx, record)
    images, complete = (await _images(ctx, record, linked)) if fetch_images else ([], True)
    now = utcnow()
    async with session_scope(ctx.sessions) as session:
        saved = await store.save_product(session, site, record, ctx.run_id, now)
        if fetch_images:
            await set_product_images(session, saved.id, images)
        # An image that failed for a passing reason is tried again next run: no
        # validators, so the page is fetched in full.
        page = _page_row(ctx, url, result, None, now=now, product_id=saved.id,
                         validators=complete)  # fmt: skip
        await store.save_page(session, page)
    ctx.tally.product(saved.change)


async def _image_plan(ctx: CrawlContext, record: ProductRecord) -> tuple[dict[str, str], bool]:
    """The images the product links now (source URL -> sha256), and whether to
    (re)visit them: for a new or changed product, or one missing an image."""
    if not ctx.settings.crawl_images:
        return {}, False
    async with ctx.sessions() as session:
        known = await store.find_product(session, ctx.site.name, record.external_id)
        linked = await store.image_sources(session, known.id) if known else {}
    changed = known is None or known.gone or known.content_hash != record.content_hash()
    return linked, changed or any(u not in linked for u in record.image_urls)


async def _images(
    ctx: CrawlContext, record: ProductRecord, linked: dict[str, str]
) -> tuple[list[tuple[str, str]], bool]:
    """(source URL, sha256) of the record's images that could be stored, in page
    order, and whether none failed for a reason that may pass (a timeout, a 5xx).
    New ones are downloaded together; the host's slots keep that polite."""
    new = [url for url in record.image_urls if url not in linked]
    ingested = dict(zip(new, await asyncio.gather(*(_ingest(ctx, u) for u in new)), strict=True))
    images = [(url, linked.get(url) or ingested[url][0]) for url in record.image_urls]
    complete = all(definitive for _, definitive in ingested.values())
    return [(url, sha) for url, sha in images if sha is not None], complete


async def _ingest(ctx: CrawlContext, url: str) -> tuple[str | None, bool]:
    settings = ctx.settings
    result = await ctx.fetcher.fetch(url, max_bytes=settings.crawl_max_image_bytes,
                                     accept=IMAGE_ACCEPT)  # fmt: skip
    ctx.tally.transferred(result)
    if not result.ok:
        detail = f"{result.error or 'HTTP'} {result.status or ''} {result.detail}".strip()
        ctx.tally.error(CrawlErrorKind.image, url, detail, unvisited=False)
        return None, result.definitive
    sha = hashlib.sha256(result.body).hexdigest()
    try:
        async with session_scope(ctx.sessions) as session:
            existed = await session.get(CatalogImage, sha) is not None
            image = await ingest_image(session, ctx.blobs, result.body,
                                       side=settings.catalog_image_side,
                                       max_pixels=settings.max_photo_pixels)  # fmt: skip
    except CatalogImageError as exc:
        ctx.tally.error(CrawlErrorKind.image, url, str(exc), unvisited=False)
        return None, True
    except IntegrityError:
        return sha, True  # the same bytes stored by another worker at the same moment
    ctx.tally.images_new += not existed
    return image.sha256, True


def _page_row(
    ctx: CrawlContext,
    url: str,
    result: FetchResult,
    previous: CrawlPage | None,
    *,
    now: datetime,
    product_id: uuid.UUID | None = None,
    validators: bool = True,
) -> CrawlPage:
    """The crawl_page row after this fetch. Validators are kept from a 200 we
    stored, carried over on a 304 or a failure that may pass, else dropped."""
    etag = modified = None
    if result.ok and validators:
        etag, modified = result.etag, result.last_modified
    elif previous is not None and (result.not_modified or not result.definitive):
        etag = result.etag or previous.etag
        modified = result.last_modified or previous.last_modified
    return CrawlPage(
        site=ctx.site.name, url=url, kind="product", etag=etag, last_modified=modified,
        status=result.status or 0, links=None, fetched_at=now,
        product_id=product_id or (previous.product_id if previous else None),
    )  # fmt: skip
