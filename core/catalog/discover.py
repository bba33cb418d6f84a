"""Finding product pages: listings (with pagination) and sitemaps.

Discovery streams: listing and sitemap pages are walked by a few walkers, and
each product URL they find goes into a bounded queue that the fetch workers
drain, so a walker waits when the workers fall behind and no more than one
sitemap's URLs are in memory at a time. Every URL is visited once per run (the
context's ``seen`` set). A listing or sitemap answering 304 replays the links it
held last time, so a refresh of an unchanged shop still reaches every product.
Last, known product pages that nothing linked to this time are asked again: a
404/410 is what tells a removed product for sure.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from lxml import etree

from core.catalog import store
from core.catalog.bodies import BodyCorrupt, BodyTooLarge, gunzip_file
from core.catalog.context import CrawlContext
from core.catalog.extract import parse_document
from core.catalog.fetch import CrawlErrorKind, FetchResult
from core.catalog.sites import Rule, Site
from core.catalog.values import absolute_urls
from core.db.catalog_models import CrawlPage
from core.db.engine import session_scope
from core.db.models import utcnow

log = logging.getLogger("atelier.catalog")
PageKind = Literal["listing", "sitemap"]
_KNOWN_PAGE_BATCH = 500


class SitemapError(Exception):
    """Not a sitemap we can read (invalid XML, neither urlset nor sitemapindex)."""


@dataclass(frozen=True)
class PageLinks:
    """What one listing or sitemap page points to (also kept in crawl_page.links)."""

    products: tuple[str, ...] = ()
    listings: tuple[str, ...] = ()
    sitemaps: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {"products": list(self.products), "listings": list(self.listings),
                "sitemaps": list(self.sitemaps)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PageLinks:
        return cls(*(tuple(data.get(key) or ()) for key in ("products", "listings", "sitemaps")))


# --- reading pages --------------------------------------------------------------------


def on_site(site: Site, urls: Iterable[str]) -> tuple[str, ...]:
    return tuple(u for u in urls if urlsplit(u).netloc == site.host)


def links_on_listing(site: Site, url: str, body: bytes, content_type: str | None) -> PageLinks:
    doc = parse_document(body, url, content_type)
    rules = site.discovery.listing

    def found(selectors: tuple[Rule, ...]) -> tuple[str, ...]:
        return on_site(site, absolute_urls(url, (s for r in selectors for s in r.strings(doc))))

    return PageLinks(
        products=found(rules.product_links),
        listings=tuple(dict.fromkeys(found(rules.listing_links) + found(rules.next_page))),
    )


def links_in_sitemap(site: Site, body: bytes, max_bytes: int) -> PageLinks:
    """A <urlset> (pages, classified by the site's URL patterns), a <sitemapindex>
    (more sitemaps) or a plain-text list of URLs; gzip files are unpacked."""
    data = gunzip_file(body, max_bytes)
    if not data.lstrip().startswith(b"<"):
        lines = data.decode("utf-8", errors="replace").splitlines()
        return _classified(site, (line.strip() for line in lines if line.strip()), ())
    pages: list[str] = []
    sitemaps: list[str] = []
    for parent, loc in _locs(data):
        (sitemaps if parent == "sitemap" else pages).append(loc)
    return _classified(site, pages, sitemaps)


def _locs(data: bytes) -> Iterator[tuple[str, str]]:
    """(parent tag, loc) for each <url>/<sitemap> entry, parsed incrementally and
    freed as it goes; entities and DTDs are never resolved (no XXE)."""
    events = etree.iterparse(
        io.BytesIO(data), events=("end",), resolve_entities=False, no_network=True,
        load_dtd=False, huge_tree=False, remove_comments=True, remove_pis=True,
    )  # fmt: skip
    root_seen = False
    try:
        for _, element in events:
            tag = etree.QName(element).localname
            if tag in ("url", "sitemap"):
                root_seen = True
                loc = next((c.text for c in element if etree.QName(c).localname == "loc"), None)
                if loc and loc.strip():
                    yield tag, loc.strip()
                element.clear()
                while element.getprevious() is not None:
                    del element.getparent()[0]
            elif tag in ("urlset", "sitemapindex"):
                root_seen = True
    except etree.XMLSyntaxError as exc:
        raise SitemapError(f"invalid sitemap XML: {exc}") from exc
    if not root_seen:
        raise SitemapError("neither <urlset> nor <sitemapindex>")


def _classified(site: Site, pages: Iterable[str], sitemaps: Iterable[str]) -> PageLinks:
    products: list[str] = []
    listings: list[str] = []
    walk_listings = bool(site.discovery.listing.product_links)
    for url in on_site(site, absolute_urls(site.base_url, pages)):
        kind = page_kind(site, url)
        if kind == "product":
            products.append(url)
        elif kind == "listing" and walk_listings:
            listings.append(url)
    return PageLinks(tuple(products), tuple(listings), absolute_urls(site.base_url, sitemaps))


def page_kind(site: Site, url: str) -> Literal["product", "listing"] | None:
    """What a sitemap entry is, by the site's URL patterns (path and query)."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    discovery = site.discovery
    if discovery.product_urls is not None and discovery.product_urls.search(target):
        return "product"
    if discovery.listing_urls is not None and discovery.listing_urls.search(target):
        return "listing"
    return "product" if discovery.product_urls is None else None


# --- walking ----------------------------------------------------------------------------


async def discover(ctx: CrawlContext, products: asyncio.Queue[str | None], walkers: int) -> None:
    """Walk every listing and sitemap reachable from the site's entry points,
    putting each new product URL into ``products``. Returns when all are walked."""
    discovery = ctx.site.discovery
    frontier: asyncio.Queue[tuple[str, PageKind]] = asyncio.Queue()
    sitemaps = list(discovery.sitemaps)
    if discovery.sitemaps_from_robots:
        sitemaps += await ctx.fetcher.robots.sitemaps(ctx.site.base_url + "/")
    for url, kind in [*((u, "listing") for u in discovery.start_urls),
                      *((u, "sitemap") for u in sitemaps)]:  # fmt: skip
        if ctx.first_sight(url):
            frontier.put_nowait((url, kind))  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_walk(ctx, frontier, products)) for _ in range(walkers)]
        await frontier.join()
        for task in tasks:
            task.cancel()
    async for url in _known_unseen(ctx):
        await products.put(url)


async def _known_unseen(ctx: CrawlContext) -> AsyncIterator[str]:
    """Product pages we know that no listing or sitemap led to this time: asked
    once more, so that a removed product is confirmed by its 404/410 (and one
    merely unlisted, still on sale, is not called gone)."""
    after_id, revisited = 0, 0
    while True:
        async with ctx.sessions() as session:
            rows = await store.known_product_pages(
                session, ctx.site.name, after_id=after_id, limit=_KNOWN_PAGE_BATCH
            )
        if not rows:
            break
        after_id = rows[-1][0]
        for _, url in rows:
            if ctx.first_sight(url):
                revisited += 1
                yield url
    if revisited:
        log.info("%s: %d known product pages no longer linked, asked again", ctx.site.name,
                 revisited)  # fmt: skip


async def _walk(
    ctx: CrawlContext,
    frontier: asyncio.Queue[tuple[str, PageKind]],
    products: asyncio.Queue[str | None],
) -> None:
    while True:
        url, kind = await frontier.get()
        try:
            links = await ctx.guarded(url, visit_listing(ctx, url, kind)) or PageLinks()
            for link in links.sitemaps:
                if ctx.first_sight(link):
                    frontier.put_nowait((link, "sitemap"))
            for link in links.listings:
                if ctx.first_sight(link):
                    frontier.put_nowait((link, "listing"))
            for link in links.products:
                if ctx.first_sight(link):
                    await products.put(link)  # waits while the workers are behind
        finally:
            frontier.task_done()


async def visit_listing(ctx: CrawlContext, url: str, kind: PageKind) -> PageLinks:
    """Fetch a listing or sitemap (conditionally) and return its links."""
    site = ctx.site.name
    async with ctx.sessions() as session:
        previous = await store.find_page(session, site, url)
    result = await ctx.fetch_page(url, previous)
    if result.error is CrawlErrorKind.robots:
        ctx.tally.error(CrawlErrorKind.robots, url, result.detail, unvisited=False)
        return PageLinks()
    if result.not_modified and previous is not None and previous.links is not None:
        links = PageLinks.from_json(previous.links)
        await _save(ctx, url, kind, result, previous, links)
        return links
    if not result.ok:
        error = result.error or CrawlErrorKind.http_4xx
        ctx.tally.error(error, url, result.detail or f"HTTP {result.status}",
                        unvisited=not result.definitive)  # fmt: skip
        await _save(ctx, url, kind, result, previous, None)
        return PageLinks()
    try:
        size, body = len(result.body), result.body
        if kind == "sitemap":
            cap = ctx.settings.crawl_max_page_bytes
            links = await ctx.parse(size, links_in_sitemap, ctx.site, body, cap)
        else:
            links = await ctx.parse(
                size, links_on_listing, ctx.site, url, body, result.content_type
            )
    except (SitemapError, BodyCorrupt, BodyTooLarge, ValueError) as exc:
        too_large = isinstance(exc, BodyTooLarge)
        error = CrawlErrorKind.too_large if too_large else CrawlErrorKind.parse
        ctx.tally.error(error, url, str(exc), unvisited=False)
        await _save(ctx, url, kind, result, previous, None)
        return PageLinks()
    await _save(ctx, url, kind, result, previous, links)
    return links


async def _save(
    ctx: CrawlContext,
    url: str,
    kind: PageKind,
    result: FetchResult,
    previous: CrawlPage | None,
    links: PageLinks | None,
) -> None:
    """Validators are kept only with the links they stand for: a page whose links
    we do not hold is fetched in full next time."""
    held: dict[str, Any] | None
    keep = result.not_modified or not (result.ok or result.definitive)
    if result.ok and links is not None:
        etag, modified, held = result.etag, result.last_modified, links.as_json()
    elif keep and previous is not None:
        etag = result.etag or previous.etag
        modified = result.last_modified or previous.last_modified
        held = previous.links
    else:
        etag, modified, held = None, None, None
    page = CrawlPage(
        site=ctx.site.name, url=url, kind=kind, etag=etag, last_modified=modified,
        status=result.status or 0, links=held, fetched_at=utcnow(),
    )  # fmt: skip
    async with session_scope(ctx.sessions) as session:
        await store.save_page(session, page)
