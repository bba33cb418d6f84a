"""The aiohttp app: routes, the latency/stats middleware, and a runner for tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from aiohttp import web

from fixture_shop import pages, sitemaps
from fixture_shop.admin import add_admin_routes, base_url
from fixture_shop.catalog import ShopProduct
from fixture_shop.catalog_index import moment_of
from fixture_shop.config import ShopConfig
from fixture_shop.fashion_data import CATEGORIES
from fixture_shop.images import corrupted, render_jpeg, spec_for
from fixture_shop.responses import (
    GZIP_FILE,
    HTML,
    JPEG,
    TEXT,
    XML,
    CachedBody,
    cached_body,
    problem,
    respond,
)
from fixture_shop.shop_state import SHOP_STATE, ShopState
from fixture_shop.stats import CLIENT_CLOSED, kind_of_path
from fixture_shop.troubles import (
    FIRST_REQUEST_STATUS,
    RETRY_AFTER_SECONDS,
    SLOW_EXTRA_MS,
    Trouble,
    duplicate_image_source,
    kind_for,
    private_link,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CATEGORY_POSITION = {category.slug: position for position, category in enumerate(CATEGORIES)}
_GONE_STATUS = {"gone404": 404, "gone410": 410}


def _not_found() -> web.Response:
    return problem(404, "This page does not exist")


async def robots(request: web.Request) -> web.Response:
    base = base_url(request)
    body = request.app[SHOP_STATE].cached(
        f"{base}/robots.txt", lambda: cached_body(sitemaps.robots_txt(base), TEXT, moment_of(0))
    )
    return respond(request, body)


async def home(request: web.Request) -> web.Response:
    body = request.app[SHOP_STATE].cached(
        "/", lambda: cached_body(pages.render_home(), HTML, moment_of(0))
    )
    return respond(request, body)


def _listing(request: web.Request, prefix: str, slug: str, title: str,
             products: Sequence[ShopProduct], changed_epoch: int,
             private_path: str | None) -> web.Response:  # fmt: skip
    """Page ``?page=N`` (default 1) of a category (``c``) or designer (``d``) listing."""
    state = request.app[SHOP_STATE]
    raw_number = request.query.get("page", "1")
    number = int(raw_number) if raw_number.isdigit() and len(raw_number) < 7 else 0
    page = state.index.page_of(products, number)
    if page is None:
        return _not_found()
    base = base_url(request)
    link = private_path if number == 1 else None

    def render() -> CachedBody:
        html = pages.render_listing(base, prefix, slug, title, page, len(products), link)
        return cached_body(html, HTML, moment_of(changed_epoch))

    return respond(request, state.cached(f"{base}/{prefix}/{slug}?{number}", render))


async def category_listing(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    slug = request.match_info["slug"]
    category = state.index.categories.get(slug)
    if category is None:
        return _not_found()
    return _listing(
        request, "c", slug, f"{category.gender} {category.name}", state.index.by_category[slug],
        state.index.category_changed[slug],
        private_link(state.config, _CATEGORY_POSITION[slug], slug),
    )  # fmt: skip


async def designer_listing(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    slug = request.match_info["slug"]
    designer = state.index.designers.get(slug)
    if designer is None:
        return _not_found()
    return _listing(
        request, "d", slug, designer, state.index.by_designer[slug],
        state.index.designer_changed[slug], None,
    )  # fmt: skip


async def product_page(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    path = request.path
    product = state.index.product(request.match_info["tail"].rpartition("-")[2])
    if product is None or product.url_path != path:
        return _not_found()
    gone_status = _GONE_STATUS.get(product.status)
    if gone_status is not None:
        return problem(gone_status, "This piece is no longer available")
    trouble = kind_for(state.config, path)
    first_status = FIRST_REQUEST_STATUS.get(trouble)
    if first_status is not None and path not in state.answered_once:
        state.answered_once.add(path)
        if first_status == 429:
            return problem(429, "Too many requests",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)})  # fmt: skip
        return problem(first_status, "Something went wrong on our side")
    base = base_url(request)
    body = state.cached(
        base + path,
        lambda: cached_body(
            pages.render_product(base, product, trouble), HTML, moment_of(product.changed_epoch)
        ),
    )
    return respond(request, body)


async def image(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    stem = request.match_info["stem"]
    view_text = stem.rpartition("-")[2]
    product = state.index.product(stem.rpartition("-")[0].upper())
    if product is None or f"/images/{stem}.jpg" not in product.image_paths:
        return _not_found()
    source_stem = duplicate_image_source(state.config, stem)
    source, view = product, int(view_text)
    if source_stem is not None:
        source = state.index.product(source_stem.rpartition("-")[0].upper()) or product
        view = int(source_stem.rpartition("-")[2])
    jpeg = render_jpeg(spec_for(source, view), state.config.image_side)
    if kind_for(state.config, request.path) is Trouble.CORRUPT_IMAGE:
        jpeg = corrupted(jpeg)
    # Images are not kept in the body cache: render_jpeg keeps their bytes already.
    body = cached_body(jpeg, JPEG, moment_of(product.created_epoch), compressible=False)
    return respond(request, body)


async def sitemap_index(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    base = base_url(request)
    index = state.index
    body = state.cached(
        f"{base}/sitemap.xml",
        lambda: cached_body(
            sitemaps.sitemap_index(base, len(index.sitemap_chunks()), index.latest_change),
            XML,
            moment_of(index.latest_change),
        ),
    )
    return respond(request, body)


async def products_sitemap(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    index = state.index
    number = int(request.match_info["number"])
    chunks = index.sitemap_chunks()
    if not 1 <= number <= len(chunks):
        return _not_found()
    base = base_url(request)
    body = state.cached(
        f"{base}/sitemaps/products-{number}",
        lambda: cached_body(
            sitemaps.products_sitemap(base, chunks[number - 1]),
            GZIP_FILE,
            moment_of(index.latest_change),
            compressible=False,  # already a gzip file: no Content-Encoding on top
        ),
    )
    return respond(request, body)


async def categories_sitemap(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    index = state.index
    base = base_url(request)

    body = state.cached(
        f"{base}/sitemaps/categories.xml",
        lambda: cached_body(
            sitemaps.categories_sitemap(base, index.category_listing_pages()),
            XML,
            moment_of(index.latest_change),
        ),
    )
    return respond(request, body)


async def private_page(request: web.Request) -> web.Response:
    body = request.app[SHOP_STATE].cached(
        request.path,
        lambda: cached_body(pages.render_private(request.path), HTML, moment_of(0)),
    )
    return respond(request, body)


@web.middleware
async def latency_and_stats(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers every non-admin request ``latency_ms`` after it arrived (+300 ms for
    slow pages) and counts every request by kind and status.

    The latency is a deadline, not a sleep before the work: the page is built
    while the request waits, so building it does not add to the configured
    latency (a benchmark's bound of concurrency / latency stays the shop's real
    one). An answer that takes longer to build than the latency goes out at once."""
    state = request.app[SHOP_STATE]
    kind = kind_of_path(request.path)
    tracked = kind != "admin"  # admin answers are counted, never delayed
    loop = asyncio.get_running_loop()
    due = loop.time() + (_latency_ms(state.config, request.path) / 1000 if tracked else 0)
    status = CLIENT_CLOSED
    if tracked:
        state.stats.started()
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            await _until(loop, due)
            status = exc.status
            raise
        await _until(loop, due)
        status = response.status
        return response
    finally:
        state.stats.finished(kind, status, was_in_flight=tracked)


def _latency_ms(config: ShopConfig, path: str) -> float:
    if kind_of_path(path) == "product" and kind_for(config, path) is Trouble.SLOW:
        return config.latency_ms + SLOW_EXTRA_MS
    return config.latency_ms


async def _until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    if (wait_s := due - loop.time()) > 0:
        await asyncio.sleep(wait_s)


def build_app(config: ShopConfig | None = None) -> web.Application:
    """The shop for ``config`` (defaults: ``ShopConfig()``)."""
    app = web.Application(middlewares=[latency_and_stats])
    app[SHOP_STATE] = ShopState(config or ShopConfig())
    router = app.router
    router.add_get("/robots.txt", robots)
    router.add_get("/", home)
    router.add_get("/c/{slug}", category_listing)
    router.add_get("/d/{slug}", designer_listing)
    router.add_get("/p/{tail}", product_page)
    router.add_get(r"/images/{stem:[a-z0-9]+-\d}.jpg", image)
    router.add_get("/sitemap.xml", sitemap_index)
    router.add_get(r"/sitemaps/products-{number:\d{1,6}}.xml.gz", products_sitemap)
    router.add_get("/sitemaps/categories.xml", categories_sitemap)
    router.add_get("/private/{tail:.*}", private_page)
    add_admin_routes(app)
    return app


def shop_state(app: web.Application) -> ShopState:
    """The state behind an app from ``build_app`` (for tests that hold the app)."""
    return app[SHOP_STATE]


@asynccontextmanager
async def running_shop(config: ShopConfig | None = None) -> AsyncIterator[str]:
    """Serves the shop on 127.0.0.1 at a free port; yields ``http://127.0.0.1:<port>``."""
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
