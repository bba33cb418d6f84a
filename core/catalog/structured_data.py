"""Reading the data shops publish for search engines and social previews.

schema.org Product JSON-LD (the richest: SKU, brand, offers per size with
availability; a ProductGroup's variants read as one product's sizes) and
OpenGraph product meta tags. Each reader returns only the fields its page
actually states, so the extractor can fall back per field; a broken JSON-LD
block is skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Final

from parsel import Selector as Document

from core.catalog.values import (
    absolute_urls,
    clean_markup_text,
    clean_text,
    distinct_texts,
    parse_availability,
    parse_currency,
    parse_price,
)

log = logging.getLogger("atelier.catalog")

Fields = dict[str, Any]
_MAX_DEPTH: Final = 8  # how deep to look for a Product inside other nodes
_ID_KEYS: Final = ("sku", "productID", "mpn", "gtin13", "gtin14", "gtin12", "gtin8", "gtin")


# --- JSON-LD --------------------------------------------------------------------------


def jsonld_fields(doc: Document, page_url: str, separator: str) -> Fields:
    nodes = list(_jsonld_nodes(doc, page_url))
    product = _product_node(nodes)
    if product is None:
        return {}
    fields: Fields = {}
    external_id = next((product[k] for k in _ID_KEYS if _scalar(product.get(k))), None)
    if external_id is not None:
        fields["external_id"] = clean_text(str(external_id))
    for key, source in (("name", "name"), ("description", "description")):
        if isinstance(product.get(source), str) and clean_markup_text(product[source]):
            fields[key] = clean_markup_text(product[source])
    designer = _name_of(product.get("brand")) or _name_of(product.get("manufacturer"))
    if designer:
        fields["designer"] = designer
    images = absolute_urls(page_url, _image_urls(product.get("image")))
    if images:
        fields["image_urls"] = images
    category = _category(product.get("category"), separator) or _breadcrumb(nodes)
    if category:
        fields["category_path"] = category
    fields.update(_offer_fields(product, fields.get("name", "")))
    return fields


def _product_node(nodes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The page's item: a ProductGroup (one product sold in variants, Google's
    markup for sizes) read as one Product whose offers are its variants' offers,
    else the first Product."""
    group = next((n for n in nodes if _is_type(n, "ProductGroup")), None)
    if group is None:
        return next((n for n in nodes if _is_type(n, "Product")), None)
    variants = [v for v in _as_list(group.get("hasVariant")) if isinstance(v, dict)]
    merged = {key: value for key, value in group.items() if value not in (None, "", [])}
    if _scalar(group.get("productGroupID")):
        merged.setdefault("sku", group["productGroupID"])
    for key in ("name", "description", "brand", "image", "category"):
        if key not in merged:  # a group may leave these to its variants
            merged[key] = next((v[key] for v in variants if v.get(key)), None)
    offers = [_variant_offer(v, o) for v in variants for o in _offers(v)]
    if offers:
        merged["offers"] = offers
    return merged


def _variant_offer(variant: dict[str, Any], offer: dict[str, Any]) -> dict[str, Any]:
    """A variant's offer, carrying the variant's size where the offer names none."""
    if offer.get("size") or not variant.get("size"):
        return offer
    return {**offer, "size": variant["size"]}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _jsonld_nodes(doc: Document, page_url: str) -> Iterator[dict[str, Any]]:
    for block in doc.xpath(
        '//script[translate(normalize-space(@type), "LDJSON", "ldjson")="application/ld+json"]'
        "/text()"
    ).getall():
        try:
            data = json.loads(block, strict=False)  # raw newlines in strings are common
        except ValueError as exc:
            log.warning("invalid JSON-LD on %s (other sources still count): %s", page_url, exc)
            continue
        yield from _walk(data, 0)


def _walk(data: Any, depth: int) -> Iterator[dict[str, Any]]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(data, list):
        for item in data:
            yield from _walk(item, depth + 1)
    elif isinstance(data, dict):
        yield data
        for key, value in data.items():
            if key in ("@graph", "mainEntity", "itemListElement", "about") or (
                key != "offers" and isinstance(value, dict) and "@type" in value
            ):
                yield from _walk(value, depth + 1)


def _is_type(node: dict[str, Any], name: str) -> bool:
    types = node.get("@type")
    return any(
        isinstance(t, str) and t.rsplit("/", 1)[-1].rsplit(":", 1)[-1] == name
        for t in _as_list(types)
    )


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip() != ""


def _name_of(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("name")
    return clean_markup_text(value) if isinstance(value, str) else ""


def _image_urls(value: Any) -> Iterator[str]:
    for item in _as_list(value):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            url = item.get("contentUrl") or item.get("url")
            if isinstance(url, str):
                yield url


def _category(value: Any, separator: str) -> tuple[str, ...]:
    if isinstance(value, list):
        return distinct_texts(v for v in value if isinstance(v, str))
    if isinstance(value, str):
        return distinct_texts(value.split(separator))
    return ()


def _breadcrumb(nodes: list[dict[str, Any]]) -> tuple[str, ...]:
    trail = next((n for n in nodes if _is_type(n, "BreadcrumbList")), None)
    items = trail.get("itemListElement") if trail else None
    if not isinstance(items, list):
        return ()
    items = sorted((i for i in items if isinstance(i, dict)), key=_position)
    return distinct_texts(_name_of(i) or _name_of(i.get("item")) for i in items)


def _position(item: dict[str, Any]) -> float:
    try:
        return float(item.get("position", 0))
    except (TypeError, ValueError):
        return 0.0


def _offers(product: dict[str, Any]) -> list[dict[str, Any]]:
    """Offer nodes, an AggregateOffer's own offers unfolded (or itself, as one)."""
    raw = product.get("offers")
    found: list[dict[str, Any]] = []
    for offer in _as_list(raw):
        if not isinstance(offer, dict):
            continue
        nested = offer.get("offers")
        if _is_type(offer, "AggregateOffer") and isinstance(nested, list | dict):
            found.extend(o for o in _as_list(nested) if isinstance(o, dict))
        else:
            found.append(offer)
    return found


def _offer_price(offer: dict[str, Any]) -> tuple[Decimal | None, str | None]:
    spec = offer.get("priceSpecification")
    spec = spec[0] if isinstance(spec, list) and spec else spec
    spec = spec if isinstance(spec, dict) else {}
    price = parse_price(offer.get("price", offer.get("lowPrice", spec.get("price"))))
    currency = parse_currency(offer.get("priceCurrency", spec.get("priceCurrency")))
    return price, currency


def _size_of(offer: dict[str, Any], product_name: str) -> str:
    item = offer.get("itemOffered")
    size = offer.get("size") or (item.get("size") if isinstance(item, dict) else None)
    size = size or offer.get("name")
    # Text, or a SizeSpecification whose name is the label.
    label = clean_markup_text(size) if isinstance(size, str) else _name_of(size)
    # A single offer named like the product is not a size.
    return "" if label == product_name else label


def _offer_fields(product: dict[str, Any], product_name: str) -> Fields:
    offers = _offers(product)
    if not offers:
        return {}
    fields: Fields = {}
    stock = [parse_availability(o.get("availability")) for o in offers]
    priced = [(_offer_price(o), s) for o, s in zip(offers, stock, strict=True)]
    in_stock_prices = [p for p, s in priced if p[0] is not None and s is not False]
    candidates = in_stock_prices or [p for p, _ in priced if p[0] is not None]
    if candidates:
        fields["price"], currency = min(candidates, key=lambda p: p[0] or 0)
        if currency:
            fields["currency"] = currency
    if any(s is not None for s in stock):
        fields["available"] = any(s is True for s in stock)
    labels = [(_size_of(o, product_name), s) for o, s in zip(offers, stock, strict=True)]
    if any(label for label, _ in labels):
        fields["sizes"] = distinct_texts(label for label, s in labels if label and s is not False)
    return fields


# --- OpenGraph ------------------------------------------------------------------------


def opengraph_fields(doc: Document, page_url: str, separator: str) -> Fields:
    meta: dict[str, list[str]] = {}
    for tag in doc.xpath("//meta[@content]"):
        key = (tag.attrib.get("property") or tag.attrib.get("name") or "").strip().lower()
        if key:
            meta.setdefault(key, []).append(tag.attrib["content"])

    def first(*keys: str) -> str:
        return next((clean_text(meta[k][0]) for k in keys if k in meta and meta[k][0].strip()), "")

    fields: Fields = {}
    for field, keys in (
        ("external_id", ("product:retailer_item_id", "product:sku")),
        ("name", ("og:title",)),
        ("designer", ("product:brand", "og:brand")),
        ("description", ("og:description",)),
    ):
        if value := first(*keys):
            fields[field] = value
    price = parse_price(first("product:price:amount", "og:price:amount"))
    if price is not None:
        fields["price"] = price
    if currency := parse_currency(first("product:price:currency", "og:price:currency")):
        fields["currency"] = currency
    available = parse_availability(first("product:availability", "og:availability"))
    if available is not None:
        fields["available"] = available
    images = [
        u for k in ("og:image", "og:image:url", "og:image:secure_url") for u in meta.get(k, [])
    ]
    if urls := absolute_urls(page_url, images):
        fields["image_urls"] = urls
    if category := _category(first("product:category"), separator):
        fields["category_path"] = category
    return fields
