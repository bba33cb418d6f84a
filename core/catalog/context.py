"""What the parts of one crawl share: settings, site, fetcher, run id, and the tally.

The tally is the single place where pages, products, errors and bytes are
counted: into the crawl_run row, the Prometheus counters and the progress line
at once, so the three always agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.catalog.fetch import CrawlErrorKind, Fetcher, FetchResult
from core.catalog.records import ChangeKind
from core.catalog.sites import Site
from core.metrics import CRAWL_BYTES, CRAWL_ERRORS, CRAWL_PAGES, CRAWL_PRODUCTS
from core.settings import Settings

if TYPE_CHECKING:
    from core.catalog.writer import CatalogWriter, Outcome

log = logging.getLogger("atelier.catalog")
_MB = 1_000_000
# Unexpected failures on this many pages in a row stop the crawl: something is
# broken everywhere (the database is down...), not on one page.
MAX_FAILURES_IN_A_ROW: Final = 20
# Bodies larger than this are parsed in a thread: lxml on a few MB takes long
# enough to stall every other request of the crawl (and the progress line).
_PARSE_IN_THREAD_BYTES: Final = 256 * 1024
T = TypeVar("T")
P = ParamSpec("P")


class Validators(Protocol):
    @property
    def etag(self) -> str | None: ...
    @property
    def last_modified(self) -> str | None: ...


class CrawlAborted(Exception):
    """Too many pages in a row failed unexpectedly; the crawl ends as failed."""


@dataclass(frozen=True)
class CrawlProgress:
    site: str
    pages: int
    products_new: int
    products_changed: int
    products_unchanged: int
    products_gone: int
    errors: int  # all kinds together
    bytes: int
    elapsed_s: float
    rate: float  # pages per second

    def line(self) -> str:
        """'fixture: 1,204 pages (38.1/s) · products 950 new / 12 changed / 3 gone ·
        7 errors · 14.2 MB'."""
        return (
            f"{self.site}: {self.pages:,} pages ({self.rate:.1f}/s) · products "
            f"{self.products_new:,} new / {self.products_changed:,} changed / "
            f"{self.products_gone:,} gone · {self.errors:,} errors · {self.bytes / _MB:.1f} MB"
        )


@dataclass
class CrawlTally:
    site: str
    started: float = field(default_factory=time.monotonic)
    pages: int = 0
    pages_by_status: Counter[str] = field(default_factory=Counter)
    not_modified: int = 0
    products: Counter[ChangeKind] = field(default_factory=Counter)
    images_new: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    # Pages that got no definitive answer (network errors, 5xx after retries...):
    # while any, the crawl is not complete and nothing is marked gone.
    unvisited: int = 0

    def page(self, result: FetchResult) -> None:
        """One fetched page (a robots.txt refusal is not a fetch)."""
        if result.error is CrawlErrorKind.robots:
            return
        status = str(result.status) if result.status is not None else str(result.error)
        self.pages += 1
        self.pages_by_status[status] += 1
        self.not_modified += result.not_modified
        CRAWL_PAGES.labels(site=self.site, status=status).inc()
        self.transferred(result)

    def transferred(self, result: FetchResult) -> None:
        self.bytes += result.wire_bytes
        CRAWL_BYTES.labels(site=self.site).inc(result.wire_bytes)

    def error(self, kind: CrawlErrorKind, url: str, detail: str, *, unvisited: bool) -> None:
        """Count and log one error; ``unvisited``: the page still waits for an answer."""
        self.errors[kind.value] += 1
        self.unvisited += unvisited
        CRAWL_ERRORS.labels(site=self.site, kind=kind.value).inc()
        level = logging.INFO if kind is CrawlErrorKind.robots else logging.WARNING
        log.log(level, "%s %s: %s", kind.value, url, detail)

    def product(self, change: ChangeKind, count: int = 1) -> None:
        self.products[change] += count
        CRAWL_PRODUCTS.labels(site=self.site, change=change.value).inc(count)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> CrawlProgress:
        elapsed = self.elapsed_s
        return CrawlProgress(
            site=self.site,
            pages=self.pages,
            products_new=self.products[ChangeKind.new],
            products_changed=self.products[ChangeKind.changed],
            products_unchanged=self.products[ChangeKind.unchanged],
            products_gone=self.products[ChangeKind.gone],
            errors=sum(self.errors.values()),
            bytes=self.bytes,
            elapsed_s=elapsed,
            rate=self.pages / elapsed if elapsed > 0 else 0.0,
        )

    def run_columns(self) -> dict[str, Any]:
        """The crawl_run columns this tally fills."""
        return dict(
            pages=self.pages,
            pages_by_status=dict(self.pages_by_status),
            not_modified=self.not_modified,
            products_new=self.products[ChangeKind.new],
            products_changed=self.products[ChangeKind.changed],
            products_unchanged=self.products[ChangeKind.unchanged],
            products_gone=self.products[ChangeKind.gone],
            images_new=self.images_new,
            errors=dict(self.errors),
            bytes=self.bytes,
            duration_s=round(self.elapsed_s, 3),
        )


@dataclass
class CrawlContext:
    settings: Settings
    site: Site
    sessions: async_sessionmaker[AsyncSession]
    blobs: BlobStore
    fetcher: Fetcher
    run_id: uuid.UUID
    tally: CrawlTally
    # Where page handlers leave their outcomes (set by crawl_site).
    writer: CatalogWriter | None = None
    # Every URL this run has queued, listings and products: a page is visited once.
    seen: set[str] = field(default_factory=set)
    failures_in_a_row: int = 0

    def first_sight(self, url: str) -> bool:
        if url in self.seen:
            return False
        self.seen.add(url)
        return True

    async def write(self, outcome: Outcome) -> None:
        """Hand one page's outcome to the writer (batched, see writer.py)."""
        assert self.writer is not None, "crawl_site sets the writer"
        await self.writer.put(outcome)

    async def fetch_page(self, url: str, previous: Validators | None) -> FetchResult:
        """A conditional GET when we hold validators from the last visit."""
        result = await self.fetcher.fetch(
            url,
            etag=previous.etag if previous else None,
            last_modified=previous.last_modified if previous else None,
        )
        self.tally.page(result)
        return result

    async def parse(
        self, size: int, parser: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``parser(*args, **kwargs)``, off the event loop when the body is large."""
        if size > _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(parser, *args, **kwargs)
        return parser(*args, **kwargs)

    async def guarded(self, url: str, work: Awaitable[T]) -> T | None:
        """Run the handling of one page; an unexpected exception is logged with its
        traceback, counted (kind internal) and the crawl goes on, unless pages keep
        failing this way."""
        try:
            result = await work
        except Exception as exc:
            log.exception("handling %s failed", url)
            self.tally.error(CrawlErrorKind.internal, url, repr(exc), unvisited=True)
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise CrawlAborted(f"{self.failures_in_a_row} pages in a row failed") from exc
            return None
        self.failures_in_a_row = 0
        return result
