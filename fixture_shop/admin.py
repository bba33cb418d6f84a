"""``/_admin/*``: ground truth and controls for tests and benchmarks (never delayed)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fixture_shop.catalog import ShopProduct
from fixture_shop.shop_state import SHOP_STATE
from fixture_shop.troubles import kind_for


def base_url(request: web.Request) -> str:
    """``http://host:port`` as the client addressed the shop."""
    return f"{request.scheme}://{request.host}"


def product_record(product: ShopProduct, base: str, trouble: str) -> dict[str, Any]:
    return {
        "id": product.id,
        "slug": product.slug,
        "url_path": product.url_path,
        "url": base + product.url_path,
        "designer": product.designer,
        "name": product.name,
        "description": product.description,
        "price": f"{product.price:.2f}",
        "currency": product.currency,
        "available": product.available,
        "sizes_in_stock": list(product.sizes_in_stock),
        "sizes": list(product.all_sizes),
        "category_path": list(product.category_path),
        "image_paths": list(product.image_paths),
        "image_urls": [base + path for path in product.image_paths],
        "status": product.status,
        "colour": product.colour,
        "created_epoch": product.created_epoch,
        "changed_epoch": product.changed_epoch,
        "trouble": trouble,
    }


async def catalog(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    base = base_url(request)
    products = [
        product_record(product, base, kind_for(state.config, product.url_path).value)
        for product in state.index.products
    ]
    return web.json_response({"epoch": state.epoch, "seed": state.config.seed,
                              "products": products})  # fmt: skip


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SHOP_STATE].stats.snapshot())


async def reset_stats(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    state.stats.reset()
    return web.json_response(state.stats.snapshot())


async def epoch(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    return web.json_response({"epoch": state.epoch, "live": len(state.index.live)})


async def set_epoch(request: web.Request) -> web.Response:
    state = request.app[SHOP_STATE]
    try:
        payload = await request.json()
    except ValueError:
        payload = None
    value = payload.get("epoch") if isinstance(payload, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise web.HTTPBadRequest(text='expected JSON {"epoch": <integer >= 0>}')
    state.set_epoch(value)
    return await epoch(request)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/_admin/catalog", catalog)
    app.router.add_get("/_admin/stats", stats)
    app.router.add_post("/_admin/stats/reset", reset_stats)
    app.router.add_get("/_admin/epoch", epoch)
    app.router.add_post("/_admin/epoch", set_epoch)
