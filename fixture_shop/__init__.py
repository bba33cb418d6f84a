"""The fixture shop: a seeded luxury-fashion web shop for the crawler, demo, tests, benchmarks.

This docstring is the contract. Everything below is deterministic from the
config: the same ``(seed, products, epoch)`` gives the same catalog and the same
bytes on every run and machine.

Running it
==========
``python -m fixture_shop --host 127.0.0.1 --port 8710 --seed 7 --products 2000
--latency-ms 50 [--no-trouble] [--epoch 0] [--image-side 320] [--page-size 48]``

In code::

    ShopConfig(seed=7, products=2000, latency_ms=0.0, trouble=True, epoch=0,
               image_side=320, page_size=48)              # frozen dataclass
    build_app(config) -> aiohttp.web.Application
    async with running_shop(config) as base_url: ...     # "http://127.0.0.1:<port>"
    catalog_at(config, epoch) -> list[ShopProduct]       # ground truth, gone ones included
    troubles.kind_for(config, path) -> Trouble           # how a URL path misbehaves

Catalog
=======
``ShopProduct`` (frozen): ``id`` ("P000123", index order), ``slug``, ``url_path``
("/p/<slug>-<id>"), ``designer``, ``name``, ``description`` (2-4 sentences),
``price`` (Decimal, 2 places), ``currency`` ("EUR"), ``available``,
``sizes_in_stock`` (tuple; empty when sold out), ``category_path``
(("Women", "Clothing", "Dresses")), ``image_paths`` (3-5 "/images/p000123-<n>.jpg"),
``status`` ("live" | "gone404" | "gone410"); beyond the brief: ``colour``,
``created_epoch``, ``changed_epoch``, and the properties ``all_sizes`` (every size
it comes in) and ``designer_slug``.

41 designers, 26 categories (14 Women, 12 Men: clothing, bags, shoes,
accessories), see ``fashion_data``. Category slug: ``slugify(f"{gender} {name}")``
("women-dresses", "men-tote-bags"); designer slug: ``slugify(name)`` ("chloe").

Epochs (``catalog``): epoch ``e`` >= 1 starts from the live products of ``e - 1``
and removes ``round(1%)`` of them (half 404, half 410: they leave listings and
sitemaps), sells out ``round(3%)`` (available False, sizes empty, page still 200),
re-prices ``round(5%)`` (disjoint sets), then adds ``round(2%)`` new products
with the next ids. Untouched products keep identical pages (ETag, Last-Modified).
Change the epoch with ``POST /_admin/epoch {"epoch": n}`` or ``--epoch``.

Times: epoch ``e`` is ``2024-03-01T00:00:00Z + e days`` (``catalog_index.moment_of``).

Pages
=====
Every 200 carries ``ETag`` (a strong hash of the identity body; the gzip variant
carries the same ETag) and ``Last-Modified``; ``If-None-Match`` (takes precedence)
and ``If-Modified-Since`` give 304. Text answers (HTML, XML, robots.txt) are
gzipped when the request's ``Accept-Encoding`` names gzip (``Vary: Accept-Encoding``);
JPEGs and the ``.xml.gz`` files never get a Content-Encoding. Every non-admin
answer, errors and 304s included, leaves ``latency_ms`` after its request arrived
(built meanwhile, so building it adds nothing unless it takes longer). 404/410/429/500
answers are small HTML pages without validators.

``/robots.txt``
    ``User-agent: *`` / ``Disallow: /private/`` / ``Sitemap: <base>/sitemap.xml``
    (base = scheme and Host of the request). Last-Modified: epoch 0.
``/``
    ``<nav class="categories">`` with ``<a class="category" href="/c/<slug>">`` per
    category. The same nav heads every HTML page. Last-Modified: epoch 0.
``/c/<category-slug>?page=N``
    N from 1 (no ``page`` = 1; past the end, 0 or not a number: 404). ``page_size``
    live products, in id order: ``<a class="product-card" href="/p/<slug>-<id>">``
    (with designer, name, price, "Sold out" badge). ``<a rel="next" class="next"
    href="/c/<slug>?page=N+1">`` when there is a next page, ``<a rel="prev"
    class="prev">`` after page 1 (page 1's own URL is ``/c/<slug>``). Some first
    pages link to ``/private/preview/<slug>`` (see troubles). Last-Modified: the
    latest ``changed_epoch`` of the category's products, gone ones included.
``/d/<designer-slug>?page=N``
    The same listing for a designer (product pages link there); not in sitemaps.
``/sitemap.xml``
    ``<sitemapindex>`` of ``<base>/sitemaps/products-<k>.xml.gz`` (k from 1; gzip
    file bodies, ``Content-Type: application/gzip``, <= 1000 live products each,
    ``<url><loc>`` + ``<lastmod>`` = the product's Last-Modified in ISO 8601) and
    ``<base>/sitemaps/categories.xml`` (plain ``<urlset>`` of every category
    listing page URL, page 1 as ``/c/<slug>``).
``/p/<slug>-<id>``
    The product page (404 for an unknown id or a wrong slug; 404/410 once gone).
    Head: ``<link rel="canonical">``, OpenGraph ``og:type`` (product), ``og:title``
    (= name), ``og:description``, ``og:image`` (first image, absolute), ``og:url``,
    ``product:brand``, ``product:price:amount`` ("1250.00"),
    ``product:price:currency``, ``product:availability`` ("instock" | "oos"),
    ``product:retailer_item_id`` (id); and, on ~90% of pages, ``<script
    type="application/ld+json">`` with a schema.org Product: name, sku (= id),
    brand {"@type": "Brand", "name"}, description, category ("Women > Clothing >
    Dresses"), color, image [absolute URLs], offers: one Offer per size the
    product comes in {"@type": "Offer", "name": size, "price": "1250.00",
    "priceCurrency": "EUR", "availability": "https://schema.org/InStock" |
    "https://schema.org/OutOfStock", "url": absolute product URL}.
    Body: ``<ol class="breadcrumb"><li>Women</li><li>Clothing</li><li>Dresses</li></ol>``,
    ``<img class="product-image" src="/images/...jpg">`` x3-5,
    ``<a class="designer" href="/d/<designer-slug>">``, ``<h1 class="product-name">``,
    ``<span class="price" data-currency="EUR" data-amount="1250.00">€1,250.00</span>``,
    ``<span class="availability">In stock</span>`` or ``Sold out``,
    ``<ul class="sizes"><li class="size in-stock">M</li><li class="size sold-out">L</li></ul>``,
    ``<div class="description"><p>...</p></div>``, ``<span class="sku">P000123</span>``.
    Sold out: every offer OutOfStock, every size ``sold-out``, "Sold out".
    Last-Modified: ``changed_epoch``.
``/images/<stem>.jpg``
    A JPEG silhouette of the garment in the product's colour on a light ground,
    portrait (clothing, scarves, boots) or landscape (bags, shoes, belts,
    sunglasses), ``image_side`` px on the long side. Served for gone products too.
    Last-Modified: ``created_epoch``.
``/private/<anything>``
    200, a "members only" page (robots.txt disallows it; stats count it).

Admin (never delayed, not in the in-flight counts)
==================================================
``GET /_admin/catalog``: ``{"epoch", "seed", "products": [...]}``, every product
of the epoch (gone ones too) with the fields above, price as "1250.00", plus
``url``, ``image_urls``, ``sizes`` (all sizes) and ``trouble`` (its page's kind).
``GET /_admin/stats``: ``{"total", "by_kind": {robots, home, listing, sitemap,
product, image, private, admin, other}, "by_status", "by_kind_status": {kind:
{status: n}}, "not_modified" (304s), "private", "in_flight", "peak_in_flight"}``
(status 499: the client left before the answer). ``POST /_admin/stats/reset``.
``GET /_admin/epoch`` and ``POST /_admin/epoch {"epoch": n}`` -> ``{"epoch", "live"}``.

Troubles
========
With ``trouble=True`` (the default); exact rules in ``fixture_shop.troubles``:
product pages 1% ``error_once`` (500 first, then 200), 1% ``throttle_once`` (429
+ ``Retry-After: 1`` first, then 200), 2% ``slow`` (+300 ms), 0.5%
``malformed_html`` (unclosed tags, cut off in the footer), 0.5%
``broken_json_ld`` (invalid JSON), 10% ``no_json_ld``; 1% of image URLs
``corrupt_image`` (truncated JPEG); 5% of products' third image duplicates an
earlier product's first image byte for byte; a fifth of the categories' first
listing pages link to ``/private/``. "First request" is per app instance.
``trouble=False``: none of these (every page has valid JSON-LD).
"""

from __future__ import annotations

from fixture_shop import troubles
from fixture_shop.app import build_app, running_shop, shop_state
from fixture_shop.catalog import ShopProduct, catalog_at
from fixture_shop.config import ShopConfig

__all__ = [
    "ShopConfig",
    "ShopProduct",
    "build_app",
    "catalog_at",
    "running_shop",
    "shop_state",
    "troubles",
]
