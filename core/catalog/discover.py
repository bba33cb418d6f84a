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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from lxml import etree

from core.catalog import store
from core.catalog.bodies import BodyCorrupt, BodyTooLarge, gunzip_file
from core.catalog.context import CrawlContext
from core.catalog.extract import parse_document
from core.catalog.fetch import CrawlErrorKind, FetchResult
from core.catalog.product_pages import ProductVisit
from core.catalog.sites import Rule, Site
from core.catalog.store import PageRow
from core.catalog.values import absolute_url, absolute_urls
from core.db.models import utcnow

log = logging.getLogger("atelier.catalog")
PageKind = Literal["listing", "sitemap"]
_KNOWN_PAGE_BATCH = 500
_LOOKUP_CHUNK = 100  # product pages looked up in one query


class SitemapError(Exception):
    """Not a sitemap we can read (invalid XML, neither urlset nor sitemapindex)."""


@dataclass(frozen=True)
class PageLinks:
    """What one listing or sitemap page points to (also kept in crawl_page.links)."""

    products: tuple[str, ...] = ()
    listings: tuple[str, ...] = ()
    sitemaps: tuple[str, ...] = ()
    # A sitemap's <lastmod> of each product (ISO 8601 as written, None where
    # absent), aligned with ``products``; empty when the page gave none.
    lastmods: tuple[str | None, ...] = field(default=(), compare=False)

    def as_json(self) -> dict[str, list[Any]]:
        held: dict[str, list[Any]] = {"products": list(self.products),
                                      "listings": list(self.listings),
                                      "sitemaps": list(self.sitemaps)}  # fmt: skip
        if self.lastmods:
            held["lastmods"] = list(self.lastmods)
        return held

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PageLinks:
        keys = ("products", "listings", "sitemaps", "lastmods")
        return cls(*(tuple(data.get(key) or ()) for key in keys))

    def lastmod(self, index: int) -> datetime | None:
        return parse_lastmod(self.lastmods[index]) if index < len(self.lastmods) else None


def parse_lastmod(value: str | None) -> datetime | None:
    """A W3C datetime (sitemaps' <lastmod>) in UTC; None if unreadable. A date
    alone stands for the end of that day: the page may have changed any time in it."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if "T" not in value:
        when += timedelta(days=1)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


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
    lastmods: dict[str, str] = {}
    for parent, loc, lastmod in _locs(data):
        (sitemaps if parent == "sitemap" else pages).append(loc)
        if lastmod and parent == "url":
            lastmods[loc] = lastmod
    return _classified(site, pages, sitemaps, lastmods)


def _locs(data: bytes) -> Iterator[tuple[str, str, str | None]]:
    """(parent tag, loc, lastmod) for each <url>/<sitemap> entry, parsed
    incrementally and freed as it goes; entities and DTDs are never resolved (no XXE)."""
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
                loc = lastmod = None
                for child in element:
                    name = etree.QName(child).localname
                    if name == "loc" and loc is None:
                        loc = child.text
                    elif name == "lastmod" and lastmod is None:
                        lastmod = child.text
                if loc and loc.strip():
                    yield tag, loc.strip(), lastmod.strip() if lastmod else None
                element.clear()
                while element.getprevious() is not None:
                    del element.getparent()[0]
            elif tag in ("urlset", "sitemapindex"):
                root_seen = True
    except etree.XMLSyntaxError as exc:
        raise SitemapError(f"invalid sitemap XML: {exc}") from exc
    if not root_seen:
        raise SitemapError("neither <urlset> nor <sitemapindex>")


def _classified(
    site: Site,
    pages: Iterable[str],
    sitemaps: Iterable[str],
    lastmods: dict[str, str] | None = None,
) -> PageLinks:
    products: list[str] = []
    listings: list[str] = []
    stamps: list[str | None] = []
    walk_listings = bool(site.discovery.listing.product_links)
    for written in pages:
        url = absolute_url(site.base_url, written)
        if url is None or urlsplit(url).netloc != site.host:
            continue
        kind = page_kind(site, url)
        if kind == "product":
            products.append(url)
            stamps.append(lastmods.get(written) if lastmods else None)
        elif kind == "listing" and walk_listings:
            listings.append(url)
    kept: dict[str, str | None] = {}  # distinct, the first kept, as absolute_urls does
    for url, stamp in zip(products, stamps, strict=True):
        kept.setdefault(url, stamp)
    return PageLinks(
        tuple(kept),
        tuple(dict.fromkeys(listings)),
        absolute_urls(site.base_url, sitemaps),
        tuple(kept.values()) if any(stamps) else (),
    )


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


async def discover(
    ctx: CrawlContext, products: asyncio.Queue[ProductVisit | None], walkers: int
) -> None:
    """Walk every listing and sitemap reachable from the site's entry points,
    putting each new product page into ``products``. Returns when all are walked.

    A site that trusts its sitemaps' <lastmod> has its listings walked only once
    every sitemap has been read (while the products found there still stream
    into the queue): a product reached through a sitemap comes with its lastmod,
    which may spare its fetch (product_pages.unchanged_since_visit)."""
    discovery = ctx.site.discovery
    sitemaps = list(discovery.sitemaps)
    if discovery.sitemaps_from_robots:
        sitemaps += await ctx.fetcher.robots.sitemaps(ctx.site.base_url + "/")
    first = _Walk(ctx, products, hold_listings=discovery.trust_sitemap_lastmod)
    for url in discovery.start_urls:
        first.add(url, "listing")
    for url in sitemaps:
        first.add(url, "sitemap")
    async with asyncio.TaskGroup() as group:
        group.create_task(first.run(walkers))
        if first.held is not None:
            await first.sitemaps_read.wait()
            then = _Walk(ctx, products, hold_listings=False)
            for url in first.held:
                then.frontier.put_nowait((url, "listing"))  # seen already
            # Listings hold a page of links each (sitemaps up to 50,000): more of
            # them at once, so that walking their pagination chains (all 304s on
            # a refresh) does not take one round trip per page.
            group.create_task(then.run(max(walkers, ctx.settings.crawl_concurrency_per_host)))
    async for visit in _known_unseen(ctx):
        await products.put(visit)


class _Walk:
    """Walkers draining one frontier of listings and sitemaps. With
    ``hold_listings`` listings are kept in ``held`` for a later walk, and
    ``sitemaps_read`` is set once no sitemap waits to be read (its products
    already marked seen, though maybe not all queued yet)."""

    def __init__(
        self,
        ctx: CrawlContext,
        products: asyncio.Queue[ProductVisit | None],
        *,
        hold_listings: bool,
    ) -> None:
        self.ctx, self.products = ctx, products
        self.frontier: asyncio.Queue[tuple[str, PageKind]] = asyncio.Queue()
        self.held: list[str] | None = [] if hold_listings else None
        self.unread_sitemaps = 0
        self.sitemaps_read = asyncio.Event()
        self.sitemaps_read.set()

    def add(self, url: str, kind: PageKind) -> None:
        if not self.ctx.first_sight(url):
            return
        if kind == "listing" and self.held is not None:
            self.held.append(url)
            return
        if kind == "sitemap":
            self.unread_sitemaps += 1
            self.sitemaps_read.clear()
        self.frontier.put_nowait((url, kind))

    def _read(self, kind: PageKind) -> None:
        if kind == "sitemap":
            self.unread_sitemaps -= 1
            if self.unread_sitemaps == 0:
                self.sitemaps_read.set()

    async def run(self, walkers: int) -> None:
        """Walk until the frontier is empty."""
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._walker()) for _ in range(walkers)]
            await self.frontier.join()
            for task in tasks:
                task.cancel()

    async def _walker(self) -> None:
        ctx = self.ctx
        while True:
            url, kind = await self.frontier.get()
            read = False
            try:
                links = await ctx.guarded(url, visit_listing(ctx, url, kind)) or PageLinks()
                for link in links.sitemaps:
                    self.add(link, "sitemap")
                for link in links.listings:
                    self.add(link, "listing")
                new = [i for i, link in enumerate(links.products) if ctx.first_sight(link)]
                self._read(kind)
                read = True
                async for visit in _visits(ctx, links, new):
                    await self.products.put(visit)  # waits while the workers are behind
            finally:
                if not read:
                    self._read(kind)
                self.frontier.task_done()


async def _lookup(ctx: CrawlContext, urls: list[str]) -> dict[str, store.KnownPage]:
    async with store.driver_connection(store.engine_of(ctx.sessions)) as conn:
        return await store.known_pages(conn, ctx.site.name, urls, images=ctx.settings.crawl_images)


async def _visits(
    ctx: CrawlContext, links: PageLinks, indices: list[int]
) -> AsyncIterator[ProductVisit]:
    """The product pages ``links.products[i]`` with what we know of them, looked up
    a chunk at a time (one query each, a chunk in memory)."""
    trust = ctx.site.discovery.trust_sitemap_lastmod
    for start in range(0, len(indices), _LOOKUP_CHUNK):
        chunk = indices[start : start + _LOOKUP_CHUNK]
        known = await _lookup(ctx, [links.products[i] for i in chunk])
        for i in chunk:
            url = links.products[i]
            yield ProductVisit(url, links.lastmod(i) if trust else None, known.get(url))


async def _known_unseen(ctx: CrawlContext) -> AsyncIterator[ProductVisit]:
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
        unseen = PageLinks(products=tuple(url for _, url in rows if ctx.first_sight(url)))
        revisited += len(unseen.products)
        async for visit in _visits(ctx, unseen, list(range(len(unseen.products)))):
            yield visit
    if revisited:
        log.info("%s: %d known product pages no longer linked, asked again", ctx.site.name,
                 revisited)  # fmt: skip


async def visit_listing(ctx: CrawlContext, url: str, kind: PageKind) -> PageLinks:
    """Fetch a listing or sitemap (conditionally) and return its links."""
    site = ctx.site.name
    async with store.driver_connection(store.engine_of(ctx.sessions)) as conn:
        previous = await store.listing_page(conn, site, url)
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
            # Always in a thread: a sitemap may list 50,000 URLs (~30 us each here),
            # and its gzip size says little of that; on the loop it would hold
            # every request of the crawl meanwhile.
            cap = ctx.settings.crawl_max_page_bytes
            links = await asyncio.to_thread(links_in_sitemap, ctx.site, body, cap)
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
    previous: PageRow | None,
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
    await ctx.write(PageRow(url, kind, result.status or 0, utcnow(), etag, modified, held))
