"""HTTP for the crawler: polite, bounded, retried, typed.

Every request checks robots.txt, waits for its host's slot (concurrency cap and
adaptive delay, see throttle.py), carries our User-Agent and the page's
validators (If-None-Match / If-Modified-Since), and reads the body under a byte
budget. Network errors, timeouts, 5xx and 429 are retried with exponential
backoff and full jitter (Retry-After, where given, instead). Redirects are
followed by hand so that each hop is checked against robots.txt. The result is
a FetchResult, never an exception: the crawler counts errors by kind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from core.catalog.bodies import BodyCorrupt, BodyTooLarge, CappedDecoder
from core.catalog.robots import RobotsAnswer, RobotsRules
from core.catalog.throttle import (
    HostThrottle,
    ThrottlePolicy,
    backoff_s,
    retry_after_seconds,
)
from core.catalog.values import absolute_url
from core.settings import Settings

log = logging.getLogger("atelier.catalog")

_CHUNK: Final = 64 * 1024
_MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_ROBOTS_MAX_BYTES: Final = 512 * 1024  # RFC 9309 asks crawlers to read at least 500 KiB
PAGE_ACCEPT: Final = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
IMAGE_ACCEPT: Final = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8"


class CrawlErrorKind(StrEnum):
    """Why a page or image did not yield what we wanted; keys of crawl_run.errors."""

    timeout = "timeout"
    connection = "connection"
    http_5xx = "http_5xx"
    http_4xx = "http_4xx"
    redirect = "redirect"  # a loop, too many hops, or no Location
    too_large = "too_large"
    robots = "robots"  # disallowed by robots.txt: skipped, not fetched
    parse = "parse"  # fetched, but nothing usable in it (bad HTML/XML/gzip, no product)
    image = "image"  # an image that does not decode
    # A complete crawl that would mark most of the catalog gone at once: not done.
    too_many_gone = "too_many_gone"
    # An unexpected failure while handling one page (a bug, the database): logged
    # with its traceback; the crawl goes on unless it keeps happening.
    internal = "internal"


_RETRYABLE: Final = frozenset(
    {CrawlErrorKind.timeout, CrawlErrorKind.connection, CrawlErrorKind.http_5xx}
)


@dataclass(frozen=True)
class FetchResult:
    url: str  # as requested
    status: int | None = None  # of the last response; None when none came
    body: bytes = b""  # decoded; only for 2xx
    final_url: str = ""  # after redirects
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    error: CrawlErrorKind | None = None
    detail: str = ""
    wire_bytes: int = 0  # as transferred, compressed
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    @property
    def not_modified(self) -> bool:
        return self.status == 304

    @property
    def gone(self) -> bool:
        return self.status in (404, 410)

    @property
    def definitive(self) -> bool:
        """An answer that another try would not change. Network errors, 5xx, 429
        and other 4xx (a 403 may be a block of crawlers) are not: while a page has
        no definitive answer the crawl is not complete and nothing is marked gone."""
        if self.error in _RETRYABLE or self.error is CrawlErrorKind.internal:
            return False
        return self.status is None or self.status < 400 or self.gone


class Fetcher:
    """One per crawl: an aiohttp session, a throttle per host, robots.txt per host."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = ThrottlePolicy(
            concurrency=settings.crawl_concurrency_per_host,
            target_concurrency=settings.crawl_target_concurrency,
            min_delay_s=settings.crawl_min_delay_s,
            max_delay_s=settings.crawl_max_delay_s,
        )
        self.throttles: dict[str, HostThrottle] = {}
        self.robots = RobotsRules(self._fetch_robots_txt, settings.crawl_user_agent)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": self.settings.crawl_user_agent},
            # We decode ourselves, under a byte budget (bodies.py).
            auto_decompress=False,
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=self.settings.crawl_concurrency_per_host, ttl_dns_cache=300
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def throttle(self, url: str) -> HostThrottle:
        host = urlsplit(url).netloc
        if host not in self.throttles:
            self.throttles[host] = HostThrottle(self.policy)
        return self.throttles[host]

    async def fetch(
        self,
        url: str,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        max_bytes: int | None = None,
        accept: str = PAGE_ACCEPT,
        obey_robots: bool = True,
    ) -> FetchResult:
        """GET ``url`` with retries. A disallowed URL is not fetched (error robots)."""
        if obey_robots and not await self._allowed(url):
            return FetchResult(url, error=CrawlErrorKind.robots, detail="disallowed by robots.txt")
        headers = {"Accept": accept, "Accept-Encoding": "gzip, deflate"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        budget = max_bytes or self.settings.crawl_max_page_bytes
        retries = self.settings.crawl_retries
        for attempt in range(retries + 1):
            result, wait_s = await self._follow(url, headers, budget, obey_robots)
            result = replace(result, attempts=attempt + 1)
            retryable = result.error in _RETRYABLE or result.status == 429
            if not retryable or attempt == retries:
                return result
            if wait_s is None:
                wait_s = backoff_s(attempt, self.settings.crawl_backoff_s, self.policy.max_delay_s)
            log.debug("retrying %s in %.2fs: %s %s", url, wait_s, result.error, result.detail)
            await asyncio.sleep(wait_s)
        raise AssertionError("unreachable")  # the loop always returns

    async def _allowed(self, url: str) -> bool:
        throttle = self.throttle(url)
        allowed = await self.robots.allowed(url)
        delay = await self.robots.crawl_delay(url)
        if delay is not None and throttle.floor < delay:
            throttle.set_floor(delay)
        return allowed

    async def _fetch_robots_txt(self, url: str) -> RobotsAnswer:
        result = await self.fetch(
            url, max_bytes=_ROBOTS_MAX_BYTES, accept="text/plain", obey_robots=False
        )
        if result.error is CrawlErrorKind.too_large:
            return RobotsAnswer(200, "")  # RFC 9309: the first 500 KiB; we keep none, allow
        return RobotsAnswer(result.status, result.body.decode("utf-8", errors="replace"))

    async def _follow(
        self, url: str, headers: dict[str, str], budget: int, obey_robots: bool
    ) -> tuple[FetchResult, float | None]:
        """One attempt, redirects followed; also how long the server asked us to wait."""
        requested, seen = url, {url}
        for _ in range(_MAX_REDIRECTS + 1):
            result, wait_s, location = await self._request(url, headers, budget)
            if location is None:
                return replace(result, url=requested, final_url=url), wait_s
            target = absolute_url(url, location)
            if target is None or target in seen:
                detail = f"bad or looping redirect to {location!r}"
                error = CrawlErrorKind.redirect
                return FetchResult(requested, result.status, error=error, detail=detail), None
            if obey_robots and not await self._allowed(target):
                return FetchResult(requested, error=CrawlErrorKind.robots,
                                   detail=f"redirect to {target} disallowed"), None  # fmt: skip
            seen.add(target)
            url = target
            # Validators belong to the URL we asked for, not to where it moved.
            headers = {k: v for k, v in headers.items() if not k.startswith("If-")}
        return FetchResult(
            requested, error=CrawlErrorKind.redirect, detail="too many redirects"
        ), None

    async def _request(
        self, url: str, headers: dict[str, str], budget: int
    ) -> tuple[FetchResult, float | None, str | None]:
        assert self._session is not None, "use Fetcher as an async context manager"
        throttle = self.throttle(url)
        timeout = aiohttp.ClientTimeout(total=self.settings.crawl_timeout_s)
        async with throttle.slot():
            started = time.monotonic()
            try:
                async with self._session.get(
                    url, headers=headers, allow_redirects=False, timeout=timeout
                ) as response:
                    throttle.observe(time.monotonic() - started, response.status)
                    return await self._answer(url, response, budget, throttle)
            except TimeoutError:
                throttle.observe(time.monotonic() - started, None)
                return (
                    FetchResult(url, error=CrawlErrorKind.timeout, detail="timed out"),
                    None,
                    None,
                )
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                return (
                    FetchResult(url, error=CrawlErrorKind.connection, detail=repr(exc)),
                    None,
                    None,
                )
            except (aiohttp.InvalidURL, ValueError) as exc:
                return FetchResult(url, error=CrawlErrorKind.parse, detail=repr(exc)), None, None

    async def _answer(
        self, url: str, response: aiohttp.ClientResponse, budget: int, throttle: HostThrottle
    ) -> tuple[FetchResult, float | None, str | None]:
        status = response.status
        if status in _REDIRECTS:
            return FetchResult(url, status), None, response.headers.get("Location", "")
        wait_s = None
        if status in (429, 503):
            asked = retry_after_seconds(response.headers.get("Retry-After"))
            wait_s = min(asked, self.policy.max_delay_s) if asked is not None else None
            throttle.back_off(wait_s if wait_s is not None else self.settings.crawl_backoff_s)
        result = FetchResult(
            url,
            status,
            content_type=response.headers.get("Content-Type"),
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
        )
        if status >= 500:
            return (
                replace(result, error=CrawlErrorKind.http_5xx, detail=f"HTTP {status}"),
                wait_s,
                None,
            )
        if status >= 400:
            return (
                replace(result, error=CrawlErrorKind.http_4xx, detail=f"HTTP {status}"),
                wait_s,
                None,
            )
        if not 200 <= status < 300:
            return result, None, None  # 304 and friends: no body
        try:
            body, wire = await read_capped(response, budget)
        except BodyTooLarge as exc:
            return replace(result, error=CrawlErrorKind.too_large, detail=str(exc)), None, None
        except BodyCorrupt as exc:
            return replace(result, error=CrawlErrorKind.parse, detail=str(exc)), None, None
        return replace(result, body=body, wire_bytes=wire), None, None


async def read_capped(response: aiohttp.ClientResponse, budget: int) -> tuple[bytes, int]:
    """The decoded body and its wire size; BodyTooLarge as soon as either passes
    ``budget`` (a declared Content-Length over it is refused unread)."""
    declared = response.content_length
    if declared is not None and declared > budget:
        response.close()
        raise BodyTooLarge(f"Content-Length {declared:,} over {budget:,} bytes")
    decoder = CappedDecoder(response.headers.get("Content-Encoding"), budget)
    chunks: list[bytes] = []
    wire = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        wire += len(chunk)
        if wire > budget:
            response.close()
            raise BodyTooLarge(f"more than {budget:,} bytes on the wire")
        chunks.append(decoder.feed(chunk))
    chunks.append(decoder.flush())
    return b"".join(chunks), wire
