"""Reading pages: products (JSON-LD, OpenGraph, selectors, values), listings, sitemaps.

The fixture shop's own page renderer provides realistic pages (every trouble
kind); hand-written pages cover the shapes other shops use (@graph,
AggregateOffer, price strings with separators, OpenGraph only).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest

from core.catalog.bodies import BodyTooLarge
from core.catalog.discover import (
    PageLinks,
    SitemapError,
    links_in_sitemap,
    links_on_listing,
    parse_lastmod,
)
from core.catalog.extract import ExtractionError, extract_product
from core.catalog.records import ProductRecord
from core.catalog.sites import Site, parse_site
from core.catalog.values import absolute_url, parse_availability, parse_currency, parse_price
from core.settings import Settings
from fixture_shop import ShopConfig, catalog_at
from fixture_shop.pages import render_product
from fixture_shop.troubles import Trouble

SITES = Path(Settings().sites_dir)
BASE = "http://shop.test"
URL = f"{BASE}/p/a-dress-P000001"


def site(name: str, base: str = BASE) -> Site:
    path = SITES / f"{name}.toml"
    return parse_site(path, path.read_text(), base)


def generic(text: str = "") -> Site:
    body = '[discovery]\nsitemaps = ["/sitemap.xml"]\n' + text
    return parse_site(Path("generic.toml"), body, BASE)


def page(head: str = "", body: str = "") -> bytes:
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>".encode()


def jsonld(data: object) -> str:
    return f'<script type="application/ld+json">{json.dumps(data)}</script>'


def extract(entry: Site, body: bytes, url: str = URL, max_images: int = 5) -> ProductRecord:
    return extract_product(entry, url, body, max_images=max_images)


# --- the fixture shop's pages, every trouble kind, both entries ------------------------

CONFIG = ShopConfig(products=60)
PRODUCTS = catalog_at(CONFIG, 0)


@pytest.mark.parametrize("entry", ["fixture", "fixture-selectors"])
@pytest.mark.parametrize(
    "trouble",
    [Trouble.NONE, Trouble.NO_JSON_LD, Trouble.BROKEN_JSON_LD, Trouble.MALFORMED_HTML],
)
def test_fixture_pages_read_like_the_ground_truth(entry: str, trouble: Trouble) -> None:
    for product in PRODUCTS[:12]:
        html = render_product(BASE, product, trouble).encode()
        record = extract(site(entry), html, BASE + product.url_path)
        assert record == ProductRecord(
            external_id=product.id,
            url=BASE + product.url_path,
            designer=product.designer,
            name=product.name,
            description=product.description,
            price=product.price,
            currency="EUR",
            available=product.available,
            sizes=product.sizes_in_stock,
            category_path=product.category_path,
            image_urls=tuple(BASE + p for p in product.image_paths),
        )


def test_sold_out_fixture_page_has_no_sizes_and_is_unavailable() -> None:
    import dataclasses

    sold_out = dataclasses.replace(PRODUCTS[0], available=False, sizes_in_stock=())
    for entry in ("fixture", "fixture-selectors"):
        html = render_product(BASE, sold_out, Trouble.NONE).encode()
        record = extract(site(entry), html)
        assert record.available is False
        assert record.sizes == ()


# --- JSON-LD shapes ---------------------------------------------------------------------


def test_graph_with_product_and_breadcrumb_and_aggregate_offer() -> None:
    graph = {
        "@context": "https://schema.org",
        "@graph": [
            {"@type": "WebPage", "name": "Shop"},
            {
                "@type": "BreadcrumbList",
                "itemListElement": [
                    {"@type": "ListItem", "position": 2, "name": "Bags"},
                    {"@type": "ListItem", "position": 1, "item": {"name": "Women"}},
                ],
            },
            {
                "@type": ["Product", "Thing"],
                "name": "Tote &amp; pouch",
                "productID": 4411,
                "brand": "Prada",
                "description": "<p>Soft   leather.</p>",
                "image": [{"@type": "ImageObject", "contentUrl": "/img/1.jpg"}, "/img/2.jpg"],
                "offers": {
                    "@type": "AggregateOffer",
                    "lowPrice": "1.250,00",
                    "highPrice": "1.500,00",
                    "priceCurrency": "eur",
                },
            },
        ],
    }
    record = extract(generic(), page(jsonld(graph)))
    assert record.external_id == "4411"
    assert record.name == "Tote & pouch"
    assert record.designer == "Prada"
    assert record.description == "Soft leather."
    assert record.category_path == ("Women", "Bags")
    assert record.price == Decimal("1250.00")
    assert record.currency == "EUR"
    assert record.available is True  # nothing says otherwise
    assert record.image_urls == (f"{BASE}/img/1.jpg", f"{BASE}/img/2.jpg")


def test_offers_per_size_give_sizes_in_stock_and_lowest_available_price() -> None:
    offers = [
        {"@type": "Offer", "name": "S", "price": 900, "priceCurrency": "USD",
         "availability": "http://schema.org/OutOfStock"},
        {"@type": "Offer", "name": "M", "price": "1,250.00", "priceCurrency": "USD",
         "availability": "InStock"},
        {"@type": "Offer", "size": "L", "price": 1300.5, "priceCurrency": "USD",
         "availability": "https://schema.org/LimitedAvailability"},
    ]  # fmt: skip
    product = {"@type": "Product", "sku": "X1", "name": "Coat", "offers": offers}
    record = extract(generic(), page(jsonld([{"@type": "Organization"}, product])))
    assert record.sizes == ("M", "L")
    assert record.available is True
    assert record.price == Decimal("1250.00")
    assert record.currency == "USD"


def test_every_offer_out_of_stock_is_sold_out() -> None:
    offers = {"@type": "AggregateOffer", "offers": [
        {"@type": "Offer", "name": "38", "price": "500", "priceCurrency": "EUR",
         "availability": "https://schema.org/SoldOut"},
    ]}  # fmt: skip
    product = {"@type": "Product", "sku": "X2", "name": "Boot", "offers": offers}
    record = extract(generic(), page(jsonld(product)))
    assert (record.available, record.sizes, record.price) == (False, (), Decimal("500.00"))


def test_product_group_reads_as_one_product_with_its_variants_sizes() -> None:
    def variant(sku: str, size: object, price: str, availability: str) -> dict[str, object]:
        return {"@type": "Product", "sku": sku, "size": size, "offers": {
            "@type": "Offer", "price": price, "priceCurrency": "GBP",
            "availability": f"https://schema.org/{availability}"}}  # fmt: skip

    group = {
        "@context": "https://schema.org",
        "@type": "ProductGroup",
        "productGroupID": "G-77",
        "name": "Wool coat",
        "brand": {"@type": "Brand", "name": "Max Mara"},
        "variesBy": "https://schema.org/size",
        "hasVariant": [
            {**variant("G-77-S", "S", "1890.00", "OutOfStock"), "image": "/img/coat.jpg"},
            variant("G-77-M", {"@type": "SizeSpecification", "name": "M"}, "1990.00", "InStock"),
            variant("G-77-L", "L", "2090.00", "InStock"),
        ],
    }
    # A ProductGroup wins over a stray Product elsewhere on the page (a recommendation).
    stray = {"@type": "Product", "sku": "OTHER", "name": "Scarf"}
    record = extract(generic(), page(jsonld(stray) + jsonld(group)))
    assert record.external_id == "G-77"
    assert (record.name, record.designer) == ("Wool coat", "Max Mara")
    assert record.sizes == ("M", "L")
    assert record.available is True
    assert (record.price, record.currency) == (Decimal("1990.00"), "GBP")
    assert record.image_urls == (f"{BASE}/img/coat.jpg",)


def test_product_group_with_every_variant_sold_out_is_unavailable() -> None:
    group = {"@type": "ProductGroup", "productGroupID": "G-8", "name": "Loafer",
             "hasVariant": [{"@type": "Product", "size": "41", "offers": {
                 "price": "650", "priceCurrency": "EUR",
                 "availability": "https://schema.org/SoldOut"}}]}  # fmt: skip
    record = extract(generic(), page(jsonld(group)))
    assert (record.external_id, record.available, record.sizes) == ("G-8", False, ())
    assert record.price == Decimal("650.00")


def test_a_single_offer_named_like_the_product_is_not_a_size() -> None:
    product = {"@type": "Product", "sku": "B", "name": "Belt",
               "offers": {"@type": "Offer", "name": "Belt", "price": "90"}}  # fmt: skip
    assert extract(generic(), page(jsonld(product))).sizes == ()


def test_broken_json_ld_falls_back_to_opengraph() -> None:
    head = (
        '<script type="application/ld+json">{"@type": "Product", "name": "cut</script>'
        '<meta property="og:title" content="Scarf">'
        '<meta property="product:retailer_item_id" content="S-9">'
        '<meta property="product:price:amount" content="120.00">'
        '<meta property="product:price:currency" content="GBP">'
        '<meta property="product:availability" content="oos">'
        '<meta property="og:image" content="https://cdn.test/s.jpg">'
    )
    record = extract(generic(), page(head))
    assert (record.external_id, record.name, record.price, record.currency) == (
        "S-9", "Scarf", Decimal("120.00"), "GBP",
    )  # fmt: skip
    assert record.available is False
    assert record.image_urls == ("https://cdn.test/s.jpg",)


def test_json_ld_first_then_selectors_per_field() -> None:
    entry = generic(
        '[product]\nread = ["jsonld", "selectors"]\n'
        '[product.selectors]\ncategory_path = "nav.crumbs a::text"\n'
        "sizes = { xpath = \"//li[@data-stock='yes']/text()\" }\n"
    )
    product = {"@type": "Product", "sku": "Q", "name": "Shirt", "offers": {"price": "80"}}
    body = page(jsonld(product), '<nav class="crumbs"><a>Men</a><a>Shirts</a></nav>'
                '<ul><li data-stock="yes">M</li><li data-stock="no">L</li></ul>')  # fmt: skip
    record = extract(entry, body)
    assert record.category_path == ("Men", "Shirts")
    assert record.sizes == ("M",)
    assert record.available is True  # a size in stock
    assert record.price == Decimal("80.00")


def test_images_are_absolute_distinct_and_capped() -> None:
    images = ["/a.jpg", "/a.jpg#zoom", "b.jpg", "https://cdn.test/c.jpg", "/d.jpg", "/e.jpg"]
    product = {"@type": "Product", "sku": "I", "name": "Bag", "image": images}
    record = extract(generic(), page(jsonld(product)), max_images=3)
    assert record.image_urls == (f"{BASE}/a.jpg", f"{BASE}/p/b.jpg", "https://cdn.test/c.jpg")


def test_external_id_from_the_url_as_a_last_resort() -> None:
    entry = generic('[product]\nread = ["opengraph", "url"]\nexternal_id_in_url = "-(P\\\\d+)$"\n')
    record = extract(entry, page('<meta property="og:title" content="Hat">'))
    assert record.external_id == "P000001"


# --- pages that are not products ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        (page(jsonld({"@type": "Product", "name": "No SKU"})), "external_id"),
        (page(jsonld({"@type": "Product", "sku": "N"})), "name"),
        (page("<title>Home</title>"), "external_id"),
        (b"", "external_id"),
        (b"\x00\xff\xfe garbage \x89PNG", "external_id"),
        (page(jsonld({"@type": "Product", "sku": "N", "name": "x"})[:-20]), "external_id"),
    ],
)
def test_a_page_without_id_or_name_raises_extraction_error(body: bytes, missing: str) -> None:
    with pytest.raises(ExtractionError) as raised:
        extract(generic(), body)
    assert raised.value.missing == missing
    assert URL in str(raised.value)


def test_deeply_nested_or_odd_json_never_crashes() -> None:
    nested: object = {"@type": "Product", "sku": "D", "name": "Deep"}
    for _ in range(50):
        nested = {"@graph": [nested]}
    odd = [1, "x", None, {"@type": 5, "offers": "free"}, {"@type": "Product", "offers": [None, 3]}]
    body = page(jsonld(nested) + jsonld(odd) + jsonld({"@type": "Product", "sku": ["x"]}))
    with pytest.raises(ExtractionError):
        extract(generic(), body)


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("1250.00", "1250.00"),
        ("€1,250.00", "1250.00"),
        ("1.250,00 €", "1250.00"),
        ("1 250,50", "1250.50"),
        ("CHF 1'250.-", "1250.00"),
        ("12.500", "12500.00"),
        ("1,250", "1250.00"),
        ("0.125", "0.12"),
        ("99,9", "99.90"),
        ("1.234.567,89", "1234567.89"),
        (1250, "1250.00"),
        (12.5, "12.50"),
        ("from $ 80", "80.00"),
    ],
)
def test_parse_price(text: object, amount: str) -> None:
    assert parse_price(text) == Decimal(amount)


@pytest.mark.parametrize("text", ["", "free", None, True, "-5", [], "NaN"])
def test_parse_price_refuses_what_is_not_a_price(text: object) -> None:
    assert parse_price(text) is None


def test_parse_currency_and_availability() -> None:
    assert [parse_currency(v) for v in ("eur", "€ 10", "10 GBP", "$5", "??", None)] == [
        "EUR", "EUR", "GBP", "USD", None, None,
    ]  # fmt: skip
    assert parse_availability("https://schema.org/InStock") is True
    assert parse_availability("schema:OutOfStock") is False
    assert parse_availability("in stock") is True
    assert parse_availability("OOS") is False
    assert parse_availability("maybe") is None


# --- listings and sitemaps --------------------------------------------------------------

SITEMAP_NS = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'
MiB = 1024 * 1024


def urlset(*locs: str) -> bytes:
    entries = "".join(f"<url><loc>{loc}</loc><lastmod>2024-03-01</lastmod></url>" for loc in locs)
    return f'<?xml version="1.0" encoding="UTF-8"?><urlset {SITEMAP_NS}>{entries}</urlset>'.encode()


def test_sitemap_index_and_gzipped_urlset_are_classified_by_the_site_patterns() -> None:
    fixture = site("fixture")
    index = (
        f"<sitemapindex {SITEMAP_NS}><sitemap><loc>{BASE}/sitemaps/products-1.xml.gz</loc>"
        f"</sitemap><sitemap><loc> /sitemaps/categories.xml </loc></sitemap></sitemapindex>"
    ).encode()
    assert links_in_sitemap(fixture, index, MiB) == PageLinks(
        sitemaps=(f"{BASE}/sitemaps/products-1.xml.gz", f"{BASE}/sitemaps/categories.xml")
    )
    locs = [f"{BASE}/p/a-P1", f"{BASE}/c/women-dresses", "http://away.test/p/b", f"{BASE}/about"]
    body = gzip.compress(urlset(*locs))
    assert links_in_sitemap(fixture, body, MiB) == PageLinks(
        products=(f"{BASE}/p/a-P1",), listings=(f"{BASE}/c/women-dresses",)
    )
    # An entry that walks no listings keeps only products; without a product
    # pattern every page of the site is a product candidate.
    assert links_in_sitemap(generic(), body, MiB).products == (
        f"{BASE}/p/a-P1", f"{BASE}/c/women-dresses", f"{BASE}/about",
    )  # fmt: skip


def test_sitemap_lastmods_travel_with_their_products() -> None:
    fixture = site("fixture")
    body = (
        f"<urlset {SITEMAP_NS}><url><loc>{BASE}/p/a-P1</loc><lastmod>2024-03-02T10:00:00Z</lastmod>"
        f"</url><url><loc>/c/women</loc><lastmod>2024-03-01</lastmod></url>"
        f"<url><lastmod>2024-03-05</lastmod><loc>/p/b-P2</loc></url>"
        f"<url><loc>{BASE}/p/c-P3</loc></url><url><loc>{BASE}/p/a-P1</loc></url></urlset>"
    ).encode()
    links = links_in_sitemap(fixture, body, MiB)
    assert links.products == (f"{BASE}/p/a-P1", f"{BASE}/p/b-P2", f"{BASE}/p/c-P3")
    assert links.lastmods == ("2024-03-02T10:00:00Z", "2024-03-05", None)
    assert links.lastmod(0) == datetime(2024, 3, 2, 10, tzinfo=UTC)
    assert links.lastmod(2) is None
    again = PageLinks.from_json(json.loads(json.dumps(links.as_json())))
    assert again == links and again.lastmods == links.lastmods
    assert "lastmods" not in PageLinks(products=("x",)).as_json()  # none given, none kept
    assert PageLinks.from_json({"products": ["x"]}).lastmod(0) is None  # rows of old crawls


def test_lastmod_values() -> None:
    assert parse_lastmod("2024-03-01T00:00:00+00:00") == datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_lastmod("2024-03-01T12:30:00+02:00") == datetime(2024, 3, 1, 10, 30, tzinfo=UTC)
    assert parse_lastmod("2024-03-01T12:30Z") == datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
    # A day alone: the page may have changed any time in it.
    assert parse_lastmod(" 2024-03-01 ") == datetime(2024, 3, 2, tzinfo=UTC)
    assert parse_lastmod("yesterday") is None and parse_lastmod(None) is None


def test_absolute_url_shortcuts_agree_with_urljoin() -> None:
    def joined(page: str, link: str) -> str | None:
        url = urldefrag(urljoin(page, link.strip())).url
        return url if urlsplit(url).scheme in ("http", "https") else None

    pages = ["http://shop.test/a/b?x=1", "http://shop.test", "https://shop.test:8443/",
             "https://u@shop.test/x", "http://shop.test#top", "http://shop.testx/a"]  # fmt: skip
    links = ["http://shop.test/p/x-P1", "https://a.b/c/./d", "http://a.b/c/..", "http://a.b/c?",
             "http://a.b/c?x=1#f", "http://a.b", "http://a.b/c d", "HTTP://a.b/c", "http://a.b:/c",
             "http://a.b/c?x=../y", "/p/x-P1", "/", "//other/x", "/a/../b", "/a/./b", "/a?",
             "/a?b=1#c", "/.", "/..", "/.x", "?q=1", "p/x", "/a//b", " /p/y ",
             "http://a.b/ü"]  # fmt: skip
    for page in pages:
        for link in links:
            assert absolute_url(page, link) == joined(page, link), (page, link)


def test_text_sitemap() -> None:
    assert links_in_sitemap(generic(), b"/p/1\n\nhttp://shop.test/p/2\n", MiB).products == (
        f"{BASE}/p/1", f"{BASE}/p/2",
    )  # fmt: skip


def test_sitemaps_never_resolve_entities() -> None:
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE u [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<urlset><url><loc>http://shop.test/p/&x;</loc></url></urlset>"
    )
    try:
        links = links_in_sitemap(generic(), xxe, MiB)
    except SitemapError:
        return
    assert not any("root:" in url for url in links.products)


@pytest.mark.parametrize("body", [b"<urlset><url><loc>http://x", b"<html><body/></html>", b"<"])
def test_broken_sitemaps_raise_sitemap_error(body: bytes) -> None:
    with pytest.raises(SitemapError):
        links_in_sitemap(generic(), body, MiB)


def test_a_gzip_bomb_sitemap_is_refused() -> None:
    with pytest.raises(BodyTooLarge):
        links_in_sitemap(generic(), gzip.compress(b" " * (8 * MiB)), MiB)


def test_listing_links_stay_on_the_site() -> None:
    html = page(body=(
        '<a class="category" href="/c/women-bags">Bags</a>'
        '<a class="product-card" href="/p/a-P1">A</a><a class="product-card" href="/p/a-P1#x">A</a>'
        '<a class="product-card" href="http://elsewhere.test/p/b">B</a>'
        '<aside class="promo"><a href="/private/preview">Private</a></aside>'
        '<a rel="next" class="next" href="?page=2">Next</a>'
    ))  # fmt: skip
    links = links_on_listing(site("fixture"), f"{BASE}/c/women-dresses", html, None)
    assert links == PageLinks(
        products=(f"{BASE}/p/a-P1",),
        listings=(f"{BASE}/c/women-bags", f"{BASE}/c/women-dresses?page=2"),
    )


def test_content_hash_is_stable_across_releases() -> None:
    # Stored in product.content_hash: if these bytes moved, the next crawl would
    # call every product of every site changed.
    record = ProductRecord(
        "SKU-1", "https://shop.test/p/1", "Max Mara", "Wool coat", "Double-faced wool, belted.",
        Decimal("1990.5"), "EUR", True, ("S", "M"), ("Women", "Coats"),
        ("https://shop.test/i/1.jpg", "https://shop.test/i/2.jpg"),
    )  # fmt: skip
    assert record.content_hash() == (
        "7d024ea094361f635b79fb8f82282586654320e899aebcb34e1e86de0fac286c"
    )
    assert ProductRecord("B", "u").content_hash() == (
        "f9e005485afb04c6b97a973d2812feb5402254b23106f9f4caa2948f382e8cf5"
    )
    assert replace(record, price=Decimal("1990.50")).content_hash() == record.content_hash()
    assert replace(record, sizes=("S",)).content_hash() != record.content_hash()
