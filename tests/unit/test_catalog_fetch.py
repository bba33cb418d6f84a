"""core.catalog.fetch and its parts: robots.txt, throttle math, Retry-After,
size caps, retries with backoff, conditional GETs and redirects.

The HTTP tests talk to a small local aiohttp app: a test double of the *remote
shop*, with misbehaviour on demand (our own Postgres/Redis are not involved).
"""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.catalog.bodies import BodyCorrupt, BodyTooLarge, CappedDecoder, gunzip_file
from core.catalog.context import CrawlAborted, CrawlContext, CrawlTally
from core.catalog.fetch import CrawlErrorKind, Fetcher, FetchResult
from core.catalog.robots import RobotsAnswer, RobotsRules
from core.catalog.throttle import (
    HostThrottle,
    ThrottlePolicy,
    backoff_s,
    next_delay,
    retry_after_seconds,
)
from core.settings import Settings

KiB = 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UA = "atelier-test-bot/1.0"


class RemoteShop:
    """Counts what it was asked; answers per path."""

    def __init__(self, robots: tuple[int, str] = (200, "User-agent: *\nDisallow: /private/\n")):
        self.robots = robots
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.in_flight = self.peak = 0
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/ok", self._ok)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/flaky/{fails}", self._flaky)
        app.router.add_get("/status/{status}", self._status)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/declared", self._declared)
        app.router.add_get("/endless", self._endless)
        app.router.add_get("/bomb", self._bomb)
        app.router.add_get("/redirect/{to:.*}", self._redirect)
        app.router.add_get("/private/{tail:.*}", self._private)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.user_agents.add(request.headers.get("User-Agent", ""))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _robots(self, request: web.Request) -> web.Response:
        return web.Response(status=self.robots[0], text=self.robots[1])

    async def _declared(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (300 * KiB))

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/" + request.match_info["to"])

    async def _private(self, request: web.Request) -> web.Response:
        return web.Response(text="members only")

    async def _ok(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(text="hello", headers={"ETag": '"v1"', "Last-Modified": "x"})

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"<html>zipped</html>"),
                            headers={"Content-Encoding": "gzip"})  # fmt: skip

    async def _flaky(self, request: web.Request) -> web.Response:
        if self.hits[request.path] <= int(request.match_info["fails"]):
            return web.Response(status=500, text="oops")
        return web.Response(text="fine now")

    async def _status(self, request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        headers = (
            {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else {}
        )
        if status == 429 and self.hits[request.path] > 1:
            return web.Response(text="welcome back")
        return web.Response(status=status, headers=headers)

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10_000):  # 640 MiB if nobody hangs up
            await response.write(b"y" * (64 * KiB))
        return response

    async def _bomb(self, request: web.Request) -> web.Response:
        body = gzip.compress(b"\0" * (64 * 1024 * KiB))  # 64 MiB of zeros in ~64 KiB
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})


@pytest.fixture
async def shop() -> AsyncIterator[RemoteShop]:
    state = RemoteShop()
    server = TestServer(state.app())
    await server.start_server()
    state.base = str(server.make_url("")).rstrip("/")
    yield state
    await server.close()


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = dict(
        crawl_user_agent=UA, crawl_retries=2, crawl_backoff_s=0.01, crawl_timeout_s=5.0,
        crawl_max_delay_s=5.0, crawl_max_page_bytes=256 * KiB, crawl_concurrency_per_host=4,
    )  # fmt: skip
    return Settings(**(values | overrides))  # type: ignore[arg-type]


async def fetch(shop: RemoteShop, path: str, s: Settings | None = None, **kw: Any) -> FetchResult:
    async with Fetcher(s or settings()) as fetcher:
        return await fetcher.fetch(shop.base + path, **kw)


# --- HTTP: the basics, conditional GETs, redirects ----------------------------------------


async def test_ok_with_validators_then_304(shop: RemoteShop) -> None:
    first = await fetch(shop, "/ok")
    assert first.ok and first.body == b"hello" and first.etag == '"v1"'
    assert shop.user_agents == {UA}
    again = await fetch(shop, "/ok", etag=first.etag, last_modified=first.last_modified)
    assert again.not_modified and not again.ok and again.error is None and again.body == b""


async def test_gzip_content_encoding_is_decoded(shop: RemoteShop) -> None:
    result = await fetch(shop, "/gzip")
    assert result.body == b"<html>zipped</html>"
    assert result.wire_bytes < len(result.body) + 30


async def test_redirects_are_followed_and_checked_against_robots(shop: RemoteShop) -> None:
    moved = await fetch(shop, "/redirect/ok")
    assert (
        moved.ok
        and moved.final_url == shop.base + "/ok"
        and moved.url == shop.base + "/redirect/ok"
    )
    private = await fetch(shop, "/redirect/private/x")
    assert private.error is CrawlErrorKind.robots
    looping = await fetch(
        shop, "/redirect/redirect/redirect/redirect/redirect/redirect/redirect/ok"
    )
    assert looping.error is CrawlErrorKind.redirect
    assert shop.hits["/private/x"] == 0


# --- robots.txt -------------------------------------------------------------------------


async def test_disallowed_urls_are_never_requested_and_robots_is_fetched_once(
    shop: RemoteShop,
) -> None:
    async with Fetcher(settings()) as fetcher:
        results = await asyncio.gather(
            *(fetcher.fetch(f"{shop.base}/private/{i}") for i in range(10)),
            *(fetcher.fetch(f"{shop.base}/ok") for _ in range(5)),
        )
    assert [r.error for r in results[:10]] == [CrawlErrorKind.robots] * 10
    assert all(r.ok for r in results[10:])
    assert shop.hits["/robots.txt"] == 1
    assert not any(path.startswith("/private/") for path in shop.hits)


@pytest.mark.parametrize(
    ("answer", "allowed"),
    [
        (RobotsAnswer(200, "User-agent: *\nDisallow: /\n"), False),
        (RobotsAnswer(200, f"User-agent: {UA.split('/')[0]}\nDisallow: /p\n\n"
                           "User-agent: *\nAllow: /\n"), False),
        (RobotsAnswer(200, "User-agent: other\nDisallow: /\n"), True),
        (RobotsAnswer(404, "not found"), True),  # RFC 9309: no file, no rules
        (RobotsAnswer(503, ""), False),  # unreachable: assume everything is disallowed
        (RobotsAnswer(429, ""), False),
        (RobotsAnswer(None, ""), False),  # no answer at all
    ],
)  # fmt: skip
async def test_robots_status_rules(answer: RobotsAnswer, allowed: bool) -> None:
    calls: list[str] = []

    async def fetch_robots(url: str) -> RobotsAnswer:
        calls.append(url)
        await asyncio.sleep(0.01)
        return answer

    robots = RobotsRules(fetch_robots, UA)
    verdicts = await asyncio.gather(*(robots.allowed("https://a.test/p/1") for _ in range(8)))
    assert verdicts == [allowed] * 8
    assert calls == ["https://a.test/robots.txt"]  # once per host, however many ask
    await robots.allowed("https://b.test/p/1")
    assert calls[-1] == "https://b.test/robots.txt"


async def test_crawl_delay_and_sitemaps_from_robots() -> None:
    async def fetch_robots(url: str) -> RobotsAnswer:
        return RobotsAnswer(200, "User-agent: *\nCrawl-delay: 2\nSitemap: https://a.test/s.xml\n")

    robots = RobotsRules(fetch_robots, UA)
    assert await robots.crawl_delay("https://a.test/x") == 2.0
    assert await robots.sitemaps("https://a.test/") == ["https://a.test/s.xml"]


# --- retries, backoff, Retry-After, timeouts ----------------------------------------------


async def test_5xx_is_retried_until_it_passes(shop: RemoteShop) -> None:
    result = await fetch(shop, "/flaky/2")
    assert result.ok and result.attempts == 3 and shop.hits["/flaky/2"] == 3


async def test_5xx_gives_up_after_the_retries(shop: RemoteShop) -> None:
    result = await fetch(shop, "/status/503")
    assert result.error is CrawlErrorKind.http_5xx and result.attempts == 3
    assert not result.definitive


async def test_4xx_is_not_retried(shop: RemoteShop) -> None:
    gone = await fetch(shop, "/status/410")
    assert (gone.error, gone.attempts, gone.gone, gone.definitive) == (
        CrawlErrorKind.http_4xx, 1, True, True,
    )  # fmt: skip
    forbidden = await fetch(shop, "/status/403")
    assert forbidden.attempts == 1 and not forbidden.definitive  # maybe a block: not an answer


async def test_retry_after_is_honoured_capped_and_slows_the_host(shop: RemoteShop) -> None:
    s = settings(crawl_max_delay_s=0.3)
    async with Fetcher(s) as fetcher:
        started = time.monotonic()
        result = await fetcher.fetch(f"{shop.base}/status/429?retry_after=30")
        waited = time.monotonic() - started
        throttle = fetcher.throttle(shop.base)
    assert result.ok and result.attempts == 2
    assert 0.3 <= waited < 2  # Retry-After 30 s, capped by the max delay
    assert throttle.delay > 0


async def test_timeouts_are_retried_then_reported(shop: RemoteShop) -> None:
    result = await fetch(shop, "/slow", settings(crawl_timeout_s=0.2, crawl_retries=1))
    assert result.error is CrawlErrorKind.timeout and result.attempts == 2
    assert shop.hits["/slow"] == 2


async def test_connection_refused_is_a_connection_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    async with Fetcher(settings(crawl_retries=1)) as fetcher:
        result = await fetcher.fetch(f"http://127.0.0.1:{port}/x", obey_robots=False)
    assert result.error is CrawlErrorKind.connection and result.attempts == 2


# --- size caps ----------------------------------------------------------------------------


async def test_declared_length_over_the_cap_is_refused_unread(shop: RemoteShop) -> None:
    result = await fetch(shop, "/declared")
    assert result.error is CrawlErrorKind.too_large and result.wire_bytes == 0
    assert "Content-Length" in result.detail


async def test_endless_body_stops_at_the_cap(shop: RemoteShop) -> None:
    started = time.monotonic()
    result = await fetch(shop, "/endless")
    assert result.error is CrawlErrorKind.too_large and "wire" in result.detail
    assert time.monotonic() - started < 5


async def test_gzip_bomb_stops_at_the_cap_after_decompression(shop: RemoteShop) -> None:
    result = await fetch(shop, "/bomb", settings(crawl_max_page_bytes=1024 * KiB))
    assert result.error is CrawlErrorKind.too_large and "decoded" in result.detail


def test_capped_decoder() -> None:
    data = b"a" * 1000
    assert CappedDecoder(None, 1000).feed(data) == data
    with pytest.raises(BodyTooLarge):
        CappedDecoder("identity", 999).feed(data)
    for encoded, encoding in (
        (gzip.compress(data), "gzip"),
        (zlib.compress(data), "deflate"),
        (zlib.compress(data)[2:-4], "deflate"),  # raw deflate, as some servers send it
    ):
        decoder = CappedDecoder(encoding, 1000)
        assert decoder.feed(encoded[:7]) + decoder.feed(encoded[7:]) + decoder.flush() == data
        with pytest.raises(BodyTooLarge):
            CappedDecoder(encoding, 999).feed(encoded)
    with pytest.raises(BodyCorrupt):
        CappedDecoder("br", 10)
    with pytest.raises(BodyCorrupt):
        CappedDecoder("gzip", 10_000).feed(b"\x1f\x8b not gzip at all")
    assert gunzip_file(gzip.compress(b"<urlset/>"), 100) == b"<urlset/>"
    assert gunzip_file(b"<urlset/>", 100) == b"<urlset/>"


# --- throttle math ------------------------------------------------------------------------

POLICY = ThrottlePolicy(concurrency=2, target_concurrency=4.0, min_delay_s=0.0, max_delay_s=10.0)


def test_next_delay_follows_latency_over_target_concurrency() -> None:
    assert next_delay(0.0, 1.0, POLICY, floor=0.0) == 0.25  # up at once
    assert next_delay(1.0, 0.4, POLICY, floor=0.0) == pytest.approx(0.55)  # down halfway
    assert next_delay(0.0, 100.0, POLICY, floor=0.0) == 10.0  # max delay
    assert next_delay(0.0, 0.0, POLICY, floor=0.5) == 0.5  # robots.txt Crawl-delay floor


def test_errors_never_lower_the_delay_but_may_raise_it() -> None:
    throttle = HostThrottle(POLICY)
    throttle.delay = 1.0
    throttle.observe(0.01, 500)
    throttle.observe(0.01, None)
    assert throttle.delay == 1.0
    throttle.observe(20.0, 503)
    assert throttle.delay == 5.0
    throttle.observe(0.0, 304)  # a conditional GET's answer is a healthy one
    assert throttle.delay == 2.5
    throttle.observe(0.0, 200)
    assert throttle.delay == 1.25


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def slot_starts(clock: FakeClock, count: int, delay: float = 0.5) -> list[float]:
    throttle = HostThrottle(POLICY, clock=clock.time, sleep=clock.sleep)
    throttle.delay = delay
    starts = []
    for _ in range(count):
        async with throttle.slot():
            starts.append(clock.now)
    return starts


async def test_slots_are_spaced_by_the_delay_and_paused_by_back_off() -> None:
    clock = FakeClock()
    throttle = HostThrottle(POLICY, clock=clock.time, sleep=clock.sleep)
    assert await slot_starts(clock, 3) == [0.0, 0.5, 1.0]
    throttle.delay = 0.5
    async with throttle.slot():
        pass
    throttle.back_off(3.0)  # Retry-After: 3
    assert throttle.delay == 1.0  # doubled
    async with throttle.slot():
        assert clock.now == pytest.approx(1.0 + 3.0)


async def test_late_timers_do_not_widen_the_spacing() -> None:
    class LateClock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds + 0.1)  # every timer fires 0.1 s late

    # Start times stay 0.5 s apart on average, not 0.6 s.
    assert (await slot_starts(LateClock(), 5))[-1] == pytest.approx(2.0 + 0.1)


async def test_concurrency_per_host_is_capped(shop: RemoteShop) -> None:
    async with Fetcher(settings(crawl_concurrency_per_host=3)) as fetcher:
        results = await asyncio.gather(*(fetcher.fetch(f"{shop.base}/ok") for _ in range(20)))
        assert fetcher.throttle(shop.base).peak_in_flight <= 3
    assert all(r.ok for r in results)
    assert shop.peak <= 3


def test_retry_after_values() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120.0
    assert (
        retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    )
    assert retry_after_seconds(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-5"):
        assert retry_after_seconds(unreadable, now) is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    assert [backoff_s(n, 0.5, 30.0, rand=lambda: 1.0) for n in range(8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0,
    ]  # fmt: skip
    assert backoff_s(3, 0.5, 30.0, rand=lambda: 0.0) == 0.0
    draws = [backoff_s(2, 0.5, 30.0) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in draws) and len(set(draws)) > 100


# --- a page that fails unexpectedly -------------------------------------------------------


async def test_unexpected_failures_are_counted_and_stop_the_crawl_when_they_persist() -> None:
    tally = CrawlTally("shop")
    ctx = CrawlContext(settings(), site=None, sessions=None, blobs=None, fetcher=None,  # type: ignore[arg-type]
                       run_id=uuid.uuid4(), tally=tally)  # fmt: skip

    async def failing() -> int:
        raise RuntimeError("bug")

    async def fine() -> int:
        return 7

    assert await ctx.guarded("https://a.test/1", failing()) is None
    assert await ctx.guarded("https://a.test/2", fine()) == 7
    assert tally.errors["internal"] == 1 and tally.unvisited == 1
    with pytest.raises(CrawlAborted):
        for i in range(100):
            await ctx.guarded(f"https://a.test/{i}", failing())
    assert tally.errors["internal"] == 21
