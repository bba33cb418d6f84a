"""The shop's HTML pages, rendered from plain string templates.

Every page is a pure function of its arguments (no clock, no request state), so
the same product renders the same bytes in every epoch and every process.
"""

from __future__ import annotations

import json
from html import escape
from typing import Final

from fixture_shop.catalog import ShopProduct
from fixture_shop.catalog_index import ListingPage, listing_path
from fixture_shop.fashion_data import CATEGORIES
from fixture_shop.troubles import Trouble

SHOP_NAME: Final = "Maison Fixture"
IN_STOCK: Final = "https://schema.org/InStock"
OUT_OF_STOCK: Final = "https://schema.org/OutOfStock"
FOOTER: Final = (
    '<footer class="site-footer"><p>Complimentary express shipping on orders over €500 '
    "and free returns within 28 days.</p><p>© 2024 Maison Fixture. All rights reserved.</p>"
    "</footer>"
)
# What a malformed page keeps of the footer: it stops mid-sentence, mid-tag.
TRUNCATED_FOOTER: Final = '<footer class="site-footer"><p>Complimentary express shipping on or'


def _category_nav() -> str:
    links = "".join(
        f'<li><a class="category" href="/c/{category.slug}">{escape(category.gender)} '
        f"{escape(category.name)}</a></li>"
        for category in CATEGORIES
    )
    return f'<nav class="categories"><ul>{links}</ul></nav>'


CATEGORY_NAV: Final = _category_nav()
HEADER: Final = (
    f'<header class="site-header"><a class="logo" href="/">{SHOP_NAME}</a>{CATEGORY_NAV}</header>'
)


def format_price(product: ShopProduct) -> str:
    """``€1,250.00``."""
    return f"€{product.price:,.2f}"


def _document(title: str, head: str, body: str, *, closed: bool = True) -> str:
    start = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title>{head}</head>\n<body>{HEADER}\n{body}\n"
    )
    return start + (f"{FOOTER}\n</body></html>\n" if closed else TRUNCATED_FOOTER)


def render_home() -> str:
    intro = (
        '<main class="home"><h1>New season, new arrivals</h1>'
        "<p>Discover ready-to-wear, bags, shoes and accessories from the world's most "
        "celebrated designers.</p></main>"
    )
    return _document(f"{SHOP_NAME} | Luxury fashion for women and men", "", intro)


def _product_card(product: ShopProduct) -> str:
    badge = "" if product.available else '<span class="card-badge">Sold out</span>'
    return (
        f'<li class="product-item"><a class="product-card" href="{product.url_path}">'
        f'<img class="card-image" src="{product.image_paths[0]}" alt="" loading="lazy">'
        f'<span class="card-designer">{escape(product.designer)}</span>'
        f'<span class="card-name">{escape(product.name)}</span>'
        f'<span class="card-price">{format_price(product)}</span>{badge}</a></li>'
    )


def render_listing(base: str, prefix: str, slug: str, title: str, page: ListingPage,
                   total: int, private_link: str | None) -> str:  # fmt: skip
    """A category (prefix ``c``) or designer (prefix ``d``) listing page."""
    cards = "".join(_product_card(product) for product in page.products)
    links = []
    if page.number > 1:
        href = listing_path(prefix, slug, page.number - 1)
        links.append(f'<a rel="prev" class="prev" href="{escape(href)}">Previous</a>')
    links.append(f'<span class="page-number">Page {page.number} of {page.count}</span>')
    if page.number < page.count:
        href = listing_path(prefix, slug, page.number + 1)
        links.append(f'<a rel="next" class="next" href="{escape(href)}">Next</a>')
    promo = ""
    if private_link is not None:
        promo = (
            f'<aside class="promo"><a href="{private_link}">Members: preview the private '
            "sale</a></aside>"
        )
    canonical = escape(base + listing_path(prefix, slug, page.number))
    body = (
        f'<main class="listing"><h1 class="listing-title">{escape(title)}</h1>'
        f'<p class="result-count">{total} products</p>{promo}'
        f'<ul class="product-grid">{cards}</ul>'
        f'<nav class="pagination">{"".join(links)}</nav></main>'
    )
    head = f'<link rel="canonical" href="{canonical}">'
    return _document(f"{title} | {SHOP_NAME}", head, body)


def product_json_ld(base: str, product: ShopProduct) -> str:
    """The schema.org Product, as the JSON text of the page's script."""
    url = base + product.url_path
    in_stock = set(product.sizes_in_stock)
    offers = [
        {
            "@type": "Offer",
            "name": size,
            "price": f"{product.price:.2f}",
            "priceCurrency": product.currency,
            "availability": IN_STOCK if size in in_stock else OUT_OF_STOCK,
            "url": url,
        }
        for size in product.all_sizes
    ]
    document = {
        "@context": "https://schema.org",
        "@type": "Product",
        "name": product.name,
        "sku": product.id,
        "brand": {"@type": "Brand", "name": product.designer},
        "description": product.description,
        "category": " > ".join(product.category_path),
        "color": product.colour.replace("-", " "),
        "image": [base + path for path in product.image_paths],
        "offers": offers,
    }
    return json.dumps(document, ensure_ascii=False).replace("</", "<\\/")


def _product_head(base: str, product: ShopProduct, trouble: Trouble) -> str:
    url = escape(base + product.url_path)
    meta = [
        ("og:type", "product"),
        ("og:site_name", SHOP_NAME),
        ("og:title", product.name),
        ("og:description", product.description),
        ("og:image", base + product.image_paths[0]),
        ("og:url", base + product.url_path),
        ("product:brand", product.designer),
        ("product:price:amount", f"{product.price:.2f}"),
        ("product:price:currency", product.currency),
        ("product:availability", "instock" if product.available else "oos"),
        ("product:retailer_item_id", product.id),
    ]
    parts = [f'<link rel="canonical" href="{url}">',
             f'<meta name="description" content="{escape(product.description)}">']  # fmt: skip
    parts.extend(f'<meta property="{key}" content="{escape(value)}">' for key, value in meta)
    if trouble is not Trouble.NO_JSON_LD:
        json_ld = product_json_ld(base, product)
        if trouble is Trouble.BROKEN_JSON_LD:
            json_ld = json_ld[: len(json_ld) * 2 // 3]
        parts.append(f'<script type="application/ld+json">{json_ld}</script>')
    return "".join(parts)


def _sizes(product: ShopProduct) -> str:
    in_stock = set(product.sizes_in_stock)
    items = "".join(
        f'<li class="size in-stock">{escape(size)}</li>'
        if size in in_stock
        else f'<li class="size sold-out">{escape(size)}</li>'
        for size in product.all_sizes
    )
    return f'<ul class="sizes">{items}</ul>'


def render_product(base: str, product: ShopProduct, trouble: Trouble) -> str:
    """A product page; ``trouble`` decides its JSON-LD and whether its HTML is broken."""
    malformed = trouble is Trouble.MALFORMED_HTML
    crumbs = "".join(f"<li>{escape(part)}</li>" for part in product.category_path)
    alt = escape(f"{product.designer} {product.name}")
    images = "".join(
        f'<img class="product-image" src="{path}" alt="{alt}">' for path in product.image_paths
    )
    availability = "In stock" if product.available else "Sold out"
    # A malformed page leaves the description's <p> and the info <div> open.
    description_end = "" if malformed else "</p></div>"
    info_end = "" if malformed else "</div>"
    body = (
        f'<main class="product-page"><ol class="breadcrumb">{crumbs}</ol>'
        f'<div class="product-gallery">{images}</div>'
        '<div class="product-info">'
        f'<a class="designer" href="/d/{product.designer_slug}">{escape(product.designer)}</a>'
        f'<h1 class="product-name">{escape(product.name)}</h1>'
        f'<p class="pricing"><span class="price" data-currency="{product.currency}" '
        f'data-amount="{product.price:.2f}">{format_price(product)}</span> '
        f'<span class="availability">{availability}</span></p>'
        f"{_sizes(product)}"
        f'<div class="description"><p>{escape(product.description)}{description_end}'
        f'<p class="details">Item number <span class="sku">{product.id}</span> · '
        f'Colour <span class="colour">{escape(product.colour.replace("-", " "))}</span></p>'
        f"{info_end}</main>"
    )
    title = f"{product.name} | {product.designer} | {SHOP_NAME}"
    return _document(title, _product_head(base, product, trouble), body, closed=not malformed)


def render_private(path: str) -> str:
    body = (
        f'<main class="private"><h1>Private sale preview</h1><p>Members only: '
        f"{escape(path)} opens to invited clients.</p></main>"
    )
    return _document(f"Private sale | {SHOP_NAME}", '<meta name="robots" content="noindex">', body)


def render_problem(status: int, message: str) -> str:
    """The small page of a 404, 410, 429 or 500."""
    body = f'<main class="problem"><h1>{escape(message)}</h1></main>'
    return _document(f"{status} | {SHOP_NAME}", "", body)
