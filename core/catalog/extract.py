"""One product page in, one ProductRecord out.

A site entry lists its sources in order (``read``): schema.org JSON-LD,
OpenGraph, its own CSS/XPath selectors, the URL (for the SKU only). Each field
comes from the first source that states it, so an entry can read JSON-LD and
fill what a page leaves out from its markup. A page without an external id or a
name raises ExtractionError (the crawler counts it as a parse error and goes
on); malformed HTML or JSON never raises anything else.
"""

from __future__ import annotations

import logging
from typing import Any

from parsel import Selector as Document
from w3lib.encoding import html_to_unicode

from core.catalog.records import ProductRecord
from core.catalog.sites import LIST_FIELDS, PRODUCT_FIELDS, TEXT_FIELDS, Rule, Site
from core.catalog.structured_data import Fields, jsonld_fields, opengraph_fields
from core.catalog.values import (
    absolute_urls,
    clean_text,
    distinct_texts,
    parse_availability,
    parse_currency,
    parse_price,
)

log = logging.getLogger("atelier.catalog")


class ExtractionError(Exception):
    """A page the site entry cannot read a product from; ``missing`` names the field."""

    def __init__(self, url: str, missing: str, detail: str = "") -> None:
        super().__init__(f"{url}: no {missing}" + (f" ({detail})" if detail else ""))
        self.url = url
        self.missing = missing


def parse_document(body: bytes, url: str, content_type: str | None = None) -> Document:
    """An HTML document from raw bytes, decoded by BOM, header, <meta> or sniffing."""
    _, text = html_to_unicode(content_type, body)
    return Document(text=text, base_url=url)


def extract_product(
    site: Site, url: str, body: bytes, *, content_type: str | None = None, max_images: int = 5
) -> ProductRecord:
    try:
        doc = parse_document(body, url, content_type)
    except Exception as exc:  # lxml refuses some byte soups outright
        raise ExtractionError(url, "document", str(exc)) from exc
    fields: Fields = {}
    for source in site.product.read:
        for key, value in _read_source(site, source, doc, url).items():
            fields.setdefault(key, value)
        if len(fields) == len(PRODUCT_FIELDS):
            break  # the later sources could only repeat what we know
    return _record(url, fields, max_images)


def _read_source(site: Site, source: str, doc: Document, url: str) -> Fields:
    rules = site.product
    try:
        if source == "jsonld":
            return jsonld_fields(doc, url, rules.category_separator)
        if source == "opengraph":
            return opengraph_fields(doc, url, rules.category_separator)
        if source == "selectors":
            return selector_fields(doc, url, rules.selectors, rules.category_separator)
        if source == "url" and rules.external_id_in_url is not None:
            match = rules.external_id_in_url.search(url)
            return {"external_id": match.group(1)} if match else {}
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # Only shapes of a page nobody anticipated get here; the other sources still count.
        log.warning("%s: reading %s failed: %r", url, source, exc)
    return {}


def selector_fields(
    doc: Document, url: str, selectors: dict[str, Rule] | Any, separator: str
) -> Fields:
    fields: Fields = {}
    matches = {key: rule.strings(doc) for key, rule in selectors.items()}
    for key in TEXT_FIELDS:
        text = clean_text(" ".join(matches.get(key, ())))
        if text:
            fields[key] = text
    if "currency" in fields:
        currency = parse_currency(fields.pop("currency"))
        if currency:
            fields["currency"] = currency
    for text in matches.get("price", ()):
        price = parse_price(text)
        if price is not None:
            fields["price"] = price
            fields.setdefault("currency", parse_currency(text))
            break
    if fields.get("currency") is None:
        fields.pop("currency", None)
    if "sizes" in matches:
        # An empty list of sizes in stock is an answer: sold out.
        fields["sizes"] = distinct_texts(matches["sizes"])
    for value in matches.get("available", ()):
        available = parse_availability(value)
        if available is not None:
            fields["available"] = available
            break
    else:
        if "sizes" in matches and "available" not in matches:
            fields["available"] = bool(fields["sizes"])
    if category := _category_path(matches.get("category_path", ()), separator):
        fields["category_path"] = category
    if images := absolute_urls(url, matches.get("image_urls", ())):
        fields["image_urls"] = images
    return fields


def _category_path(texts: list[str] | tuple[str, ...], separator: str) -> tuple[str, ...]:
    """Breadcrumb items, or one string written with the separator ("A > B > C")."""
    parts = [p for t in texts for p in t.split(separator)] if separator else list(texts)
    return distinct_texts(parts)


def _record(url: str, fields: Fields, max_images: int) -> ProductRecord:
    for required in ("external_id", "name"):
        if not fields.get(required):
            raise ExtractionError(url, required)
    values = {key: fields[key] for key in (*TEXT_FIELDS, *LIST_FIELDS) if key in fields}
    values["image_urls"] = tuple(fields.get("image_urls", ()))[:max_images]
    return ProductRecord(
        url=url,
        price=fields.get("price"),
        available=fields.get("available", True),
        **values,
    )
