"""robots.txt and the sitemaps: what a polite crawler reads before the pages.

``/sitemap.xml`` is a sitemap index of ``/sitemaps/products-<k>.xml.gz`` (k from
1; gzip files of at most 1000 product URLs each, with ``<lastmod>``) and of
``/sitemaps/categories.xml`` (every category listing page, plain XML).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Final
from xml.sax.saxutils import escape

from fixture_shop.catalog import ShopProduct
from fixture_shop.catalog_index import moment_of

SITEMAP_NS: Final = "http://www.sitemaps.org/schemas/sitemap/0.9"
XML_DECLARATION: Final = '<?xml version="1.0" encoding="UTF-8"?>\n'


def robots_txt(base: str) -> str:
    return f"User-agent: *\nDisallow: /private/\n\nSitemap: {base}/sitemap.xml\n"


def products_sitemap_path(number: int) -> str:
    return f"/sitemaps/products-{number}.xml.gz"


CATEGORIES_SITEMAP_PATH: Final = "/sitemaps/categories.xml"


def _lastmod(epoch: int) -> str:
    return moment_of(epoch).isoformat()


def sitemap_index(base: str, product_files: int, changed_epoch: int) -> str:
    """The index of ``product_files`` products files and the categories file."""
    paths = [products_sitemap_path(number) for number in range(1, product_files + 1)]
    paths.append(CATEGORIES_SITEMAP_PATH)
    lastmod = _lastmod(changed_epoch)
    body = "".join(
        f"<sitemap><loc>{escape(base + path)}</loc><lastmod>{lastmod}</lastmod></sitemap>\n"
        for path in paths
    )
    return f'{XML_DECLARATION}<sitemapindex xmlns="{SITEMAP_NS}">\n{body}</sitemapindex>\n'


def _urlset(entries: Sequence[tuple[str, int]]) -> str:
    body = "".join(
        f"<url><loc>{escape(url)}</loc><lastmod>{_lastmod(changed)}</lastmod></url>\n"
        for url, changed in entries
    )
    return f'{XML_DECLARATION}<urlset xmlns="{SITEMAP_NS}">\n{body}</urlset>\n'


def products_sitemap(base: str, products: Sequence[ShopProduct]) -> bytes:
    """A gzip file (fixed mtime, so the same bytes every time) of product URLs."""
    xml = _urlset([(base + product.url_path, product.changed_epoch) for product in products])
    return gzip.compress(xml.encode(), mtime=0)


def categories_sitemap(base: str, listings: Sequence[tuple[str, int]]) -> str:
    """``listings``: (path, last change epoch) of every category listing page."""
    return _urlset([(base + path, changed) for path, changed in listings])
