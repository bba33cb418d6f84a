"""Visiting one product page: fetch, extract, images, then hand it to the writer.

A page whose sitemap <lastmod> says it has not changed since we read it is not
fetched at all, where the site entry trusts its lastmods (``unchanged_since_visit``).
Else the page is fetched conditionally; a 304 only touches the product
(last_seen, last_run_id). A 200 is extracted; a new or changed product gets its
images (those it did not already link under the same URL are downloaded and
ingested, each in its own short transaction: an image row alone is harmless),
then the product, its images and its crawl_page row are written together, in
the writer's next batch (one transaction). A 404/410 marks the product that URL
held unavailable and gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from core.catalog import store
from core.catalog.context import CrawlContext
from core.catalog.extract import ExtractionError, extract_product
from core.catalog.fetch import IMAGE_ACCEPT, CrawlErrorKind, FetchResult
from core.catalog.images import CatalogImageError, ingest_image_bytes
from core.catalog.records import ProductRecord
from core.catalog.store import Gone, KnownPage, PageRow, ProductWrite, Touch
from core.db.models import utcnow

log = logging.getLogger("atelier.catalog")


@dataclass(frozen=True, slots=True)
class ProductVisit:
    """A product page to visit: its URL, the sitemap's <lastmod> for it (if any)
    and what our last visit left (looked up by discovery, a chunk at a time)."""

    url: str
    lastmod: datetime | None = None
    known: KnownPage | None = None


async def visit_product(ctx: CrawlContext, visit: ProductVisit) -> None:
    url, known = visit.url, visit.known
    if unchanged_since_visit(ctx, visit, utcnow()):
        assert known is not None and known.product_id is not None
        await ctx.write(Touch(known.product_id, utcnow()))
        return
    # A gone product's page is read in full: a 304 would not tell us the product.
    live = known is not None and known.product_id is not None and not known.product_gone
    result = await ctx.fetch_page(url, known if live else None)
    if result.not_modified and live:
        assert known is not None and known.product_id is not None
        now = utcnow()
        await ctx.write(Touch(known.product_id, now, _page_row(url, result, known, now=now)))
    elif result.error is CrawlErrorKind.robots:
        ctx.tally.error(CrawlErrorKind.robots, url, result.detail, unvisited=False)
    elif result.gone:
        log.info("gone (%s): %s", result.status, url)
        now = utcnow()
        await ctx.write(Gone(known.product_id if known else None, now,
                             _page_row(url, result, known, now=now)))  # fmt: skip
    elif not result.ok:
        await _failed(ctx, url, result, known, result.error or CrawlErrorKind.http_4xx,
                      result.detail or f"HTTP {result.status}")  # fmt: skip
    else:
        try:
            record = await ctx.parse(
                len(result.body), extract_product, ctx.site, result.final_url or url, result.body,
                content_type=result.content_type,
                max_images=ctx.settings.crawl_images_per_product,
            )  # fmt: skip
        except ExtractionError as exc:
            await _failed(ctx, url, result, known, CrawlErrorKind.parse, str(exc))
            return
        await _save(ctx, url, result, record, known)


def unchanged_since_visit(ctx: CrawlContext, visit: ProductVisit, now: datetime) -> bool:
    """The site trusts its sitemap's <lastmod>, and this one is not newer than
    the version of the page we hold: no need to fetch it. The version is the
    page's own Last-Modified when it sent one (the shop's clock on both sides),
    else when we fetched it. Only for a page we read whole last time (its
    validators kept: product stored, images complete) and revalidated within
    ``crawl_revalidate_after_s``, so a shop whose lastmods lie is still caught."""
    known = visit.known
    if not ctx.site.discovery.trust_sitemap_lastmod or visit.lastmod is None or known is None:
        return False
    if known.product_id is None or known.product_gone or known.status not in (200, 304):
        return False
    if not (known.etag or known.last_modified):
        return False
    if (now - known.fetched_at).total_seconds() > ctx.settings.crawl_revalidate_after_s:
        return False
    version = http_date(known.last_modified) or known.fetched_at
    return visit.lastmod <= version


def http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


async def _failed(
    ctx: CrawlContext,
    url: str,
    result: FetchResult,
    known: KnownPage | None,
    error: CrawlErrorKind,
    detail: str,
) -> None:
    """Counted and logged. A page that answered but could not be read still shows
    its product exists: it is touched, so a complete crawl does not call it gone."""
    answered = result.definitive
    ctx.tally.error(error, url, detail, unvisited=not answered)
    now = utcnow()
    page = _page_row(url, result, known, now=now)
    if answered and known is not None and known.product_id is not None:
        await ctx.write(Touch(known.product_id, now, page, counts=False))
    else:
        await ctx.write(page)


async def _save(
    ctx: CrawlContext, url: str, result: FetchResult, record: ProductRecord,
    known: KnownPage | None,
) -> None:  # fmt: skip
    content_hash = record.content_hash()
    linked, fetch_images = await _image_plan(ctx, record, content_hash, known)
    images, complete = (await _images(ctx, record, linked)) if fetch_images else ([], True)
    now = utcnow()
    # An image that failed for a passing reason is tried again next run: no
    # validators, so the page is fetched in full.
    page = _page_row(url, result, None, now=now, validators=complete)
    await ctx.write(ProductWrite(record, now, page, images if fetch_images else None,
                                 content_hash))  # fmt: skip


async def _image_plan(
    ctx: CrawlContext, record: ProductRecord, content_hash: str, page: KnownPage | None
) -> tuple[dict[str, str], bool]:
    """The images the product links now (source URL -> sha256), and whether to
    (re)visit them: for a new or changed product, or one missing an image."""
    if not ctx.settings.crawl_images:
        return {}, False
    known: store.KnownProduct | None
    if page is not None and page.external_id == record.external_id and page.product_id:
        assert page.content_hash is not None
        known = store.KnownProduct(page.product_id, page.content_hash, page.product_gone)
        linked = page.image_sources or {}
    else:  # a page new to us, or now showing another product
        async with ctx.sessions() as session:
            known = await store.find_product(session, ctx.site.name, record.external_id)
            linked = await store.image_sources(session, known.id) if known else {}
    changed = known is None or known.gone or known.content_hash != content_hash
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
    try:
        sha, new = await ingest_image_bytes(
            store.engine_of(ctx.sessions), ctx.blobs, result.body,
            side=settings.catalog_image_side, max_pixels=settings.max_photo_pixels,
        )  # fmt: skip
    except CatalogImageError as exc:
        ctx.tally.error(CrawlErrorKind.image, url, str(exc), unvisited=False)
        return None, True
    ctx.tally.images_new += new
    return sha, True


def _page_row(
    url: str,
    result: FetchResult,
    previous: KnownPage | None,
    *,
    now: datetime,
    validators: bool = True,
) -> PageRow:
    """The crawl_page row after this fetch. Validators are kept from a 200 we
    stored, carried over on a 304 or a failure that may pass, else dropped.
    The product it shows is kept (a product write sets its own)."""
    etag = modified = None
    if result.ok and validators:
        etag, modified = result.etag, result.last_modified
    elif previous is not None and (result.not_modified or not result.definitive):
        etag = result.etag or previous.etag
        modified = result.last_modified or previous.last_modified
    return PageRow(url, "product", result.status or 0, now, etag, modified, None,
                   previous.product_id if previous else None)  # fmt: skip
