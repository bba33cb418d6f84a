"""Site entries: what the crawler knows about one shop, read from a TOML file.

A site is configuration, not code: ``core/catalog/sites/<name>.toml`` names the
shop's base URL, where discovery starts (listing pages and/or sitemaps), how to
find product links and next pages on a listing, and how to read a product page:
from schema.org JSON-LD and OpenGraph (generic, no selectors), from per-field
CSS/XPath selectors, or both, field by field in the order ``read`` gives.

A selector is a CSS string (parsel's ``::text`` / ``::attr(x)`` included) or a
table ``{ xpath = "..." }``. Every mistake in a file is reported with the file
and the key (``fixture.toml: product.selectors.price: ...``) when it is loaded,
not halfway through a crawl.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal
from urllib.parse import urljoin, urlsplit

from parsel import Selector as Document

from core.settings import Settings

SOURCES: Final = ("jsonld", "opengraph", "selectors", "url")
TEXT_FIELDS: Final = ("external_id", "designer", "name", "description", "currency")
SCALAR_FIELDS: Final = (*TEXT_FIELDS, "price", "available")
LIST_FIELDS: Final = ("sizes", "category_path", "image_urls")
PRODUCT_FIELDS: Final = (*SCALAR_FIELDS, *LIST_FIELDS)
_PROBE: Final = Document(text="<html><body><p>probe</p></body></html>")


class SiteConfigError(ValueError):
    """A site entry that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Rule:
    """One CSS or XPath query; matches are strings (text nodes or attributes)."""

    query: str
    language: Literal["css", "xpath"] = "css"

    def strings(self, doc: Document) -> list[str]:
        found = doc.css(self.query) if self.language == "css" else doc.xpath(self.query)
        return [s for s in found.getall() if isinstance(s, str)]


@dataclass(frozen=True)
class ListingRules:
    product_links: tuple[Rule, ...] = ()
    listing_links: tuple[Rule, ...] = ()  # e.g. categories on a home page
    next_page: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Discovery:
    start_urls: tuple[str, ...] = ()  # absolute, on the effective base URL
    sitemaps: tuple[str, ...] = ()
    # Also read the Sitemap: lines of robots.txt.
    sitemaps_from_robots: bool = False
    # The shop's sitemap <lastmod>s are right: a product page whose lastmod is not
    # newer than the version we hold is not fetched (crawl_revalidate_after_s
    # still has it read now and then, in case they are not).
    trust_sitemap_lastmod: bool = False
    # Which discovered URLs (sitemaps list both) are product pages and listings;
    # matched against the path and query. No product pattern: every sitemap URL
    # is a product candidate.
    product_urls: re.Pattern[str] | None = None
    listing_urls: re.Pattern[str] | None = None
    listing: ListingRules = field(default_factory=ListingRules)


@dataclass(frozen=True)
class ProductRules:
    read: tuple[str, ...] = ("jsonld", "opengraph")
    selectors: Mapping[str, Rule] = field(default_factory=dict)
    # Last resort for the SKU: group 1 of this pattern on the product URL.
    external_id_in_url: re.Pattern[str] | None = None
    category_separator: str = ">"


@dataclass(frozen=True)
class Site:
    name: str
    path: Path
    base_url: str  # scheme://host[:port], no trailing slash
    discovery: Discovery
    product: ProductRules

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    def absolute(self, url: str) -> str:
        return urljoin(self.base_url + "/", url)


def known_sites(settings: Settings) -> list[str]:
    """Names of the site entries in ``settings.sites_dir`` (file stems)."""
    return sorted(p.stem for p in Path(settings.sites_dir).glob("*.toml"))


def load_site(settings: Settings, name: str) -> Site:
    path = Path(settings.sites_dir) / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(known_sites(settings)) or "none"
        raise SiteConfigError(f"no site entry {name!r} in {settings.sites_dir} (known: {known})")
    return parse_site(path, path.read_text(encoding="utf-8"), settings.crawl_base_urls.get(name))


def parse_site(path: Path, text: str, base_override: str | None = None) -> Site:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path.name}: not valid TOML: {exc}") from exc
    root = _Table(path.name, "", data)
    written_base = root.text("base_url", required=False)
    base = _base_url(root, base_override or written_base)
    site = Site(
        name=path.stem,
        path=path,
        base_url=base,
        discovery=_discovery(root.table("discovery"), written_base, base),
        product=_product(root.table("product")),
    )
    root.done()
    if not site.discovery.start_urls and not site.discovery.sitemaps:
        if not site.discovery.sitemaps_from_robots:
            raise root.error("discovery", "needs start_urls, sitemaps or sitemaps_from_robots")
    return site


def _base_url(root: _Table, base: str | None) -> str:
    if not base:
        raise root.error(
            "base_url",
            "missing: write it in the file or set it for this site in ATELIER_CRAWL_BASE_URLS",
        )
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise root.error("base_url", f"{base!r} is not an http(s) URL")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _rebase(url: str, written_base: str | None, base: str) -> str:
    """A URL of the file, moved onto the effective base URL (settings override it)."""
    if written_base and url.startswith(written_base.rstrip("/")):
        url = url[len(written_base.rstrip("/")) :] or "/"
    return urljoin(base + "/", url)


def _discovery(table: _Table, written_base: str | None, base: str) -> Discovery:
    urls = [_rebase(u, written_base, base) for u in table.strings("start_urls")]
    sitemaps = [_rebase(u, written_base, base) for u in table.strings("sitemaps")]
    listing = table.table("listing")
    rules = ListingRules(
        product_links=listing.rules("product_links"),
        listing_links=listing.rules("listing_links"),
        next_page=listing.rules("next_page"),
    )
    listing.done()
    if urls and not rules.product_links:
        raise listing.error("product_links", "start_urls need listing rules to find products")
    discovery = Discovery(
        start_urls=tuple(urls),
        sitemaps=tuple(sitemaps),
        sitemaps_from_robots=table.flag("sitemaps_from_robots"),
        trust_sitemap_lastmod=table.flag("trust_sitemap_lastmod"),
        product_urls=table.pattern("product_urls"),
        listing_urls=table.pattern("listing_urls"),
        listing=rules,
    )
    table.done()
    return discovery


def _product(table: _Table) -> ProductRules:
    read = table.strings("read") or ["jsonld", "opengraph"]
    for source in read:
        if source not in SOURCES:
            raise table.error("read", f"unknown source {source!r} (one of {', '.join(SOURCES)})")
    selectors_table = table.table("selectors")
    selectors = {}
    for key in list(selectors_table.keys()):
        if key not in PRODUCT_FIELDS:
            raise selectors_table.error(key, f"not a product field ({', '.join(PRODUCT_FIELDS)})")
        selectors[key] = selectors_table.rule(key)
    selectors_table.done()
    if "selectors" in read and not selectors:
        raise table.error("selectors", "read names 'selectors' but none are given")
    if selectors and "selectors" not in read:
        raise table.error("read", "selectors are given but read does not name 'selectors'")
    rules = ProductRules(
        read=tuple(read),
        selectors=MappingProxyType(selectors),
        external_id_in_url=table.pattern("external_id_in_url"),
        category_separator=table.text("category_separator", required=False) or ">",
    )
    if "url" in rules.read and rules.external_id_in_url is None:
        raise table.error("read", "'url' needs external_id_in_url")
    table.done()
    return rules


class _Table:
    """A TOML table being read: typed getters that name file and key in errors,
    and ``done()`` refuses keys nobody read (a typo is an error, not a no-op)."""

    def __init__(self, file: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.file, self.prefix, self.data = file, prefix, data
        self.read: set[str] = set()

    def error(self, key: str, message: str) -> SiteConfigError:
        return SiteConfigError(f"{self.file}: {self.prefix}{key}: {message}")

    def keys(self) -> list[str]:
        return list(self.data)

    def _get(self, key: str) -> Any:
        self.read.add(key)
        return self.data.get(key)

    def text(self, key: str, *, required: bool = True) -> str | None:
        value = self._get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "expected a non-empty string")
        return value.strip()

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if value is not None and not isinstance(value, bool):
            raise self.error(key, "expected true or false")
        return bool(value)

    def strings(self, key: str) -> list[str]:
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "expected a list of non-empty strings")
        return value

    def pattern(self, key: str) -> re.Pattern[str] | None:
        value = self.text(key, required=False)
        if value is None:
            return None
        try:
            return re.compile(value)
        except re.error as exc:
            raise self.error(key, f"bad regular expression: {exc}") from exc

    def table(self, key: str) -> _Table:
        value = self._get(key)
        if value is not None and not isinstance(value, dict):
            raise self.error(key, "expected a table")
        return _Table(self.file, f"{self.prefix}{key}.", value or {})

    def rule(self, key: str) -> Rule:
        value = self._get(key)
        if isinstance(value, str):
            rule = Rule(value)
        elif isinstance(value, dict) and len(value) == 1 and {*value} <= {"css", "xpath"}:
            language, query = next(iter(value.items()))
            if not isinstance(query, str) or not query:
                raise self.error(key, f"{language} must be a non-empty string")
            rule = Rule(query, language)
        else:
            raise self.error(
                key, 'expected a CSS string or a table { css = "..." } / { xpath = "..." }'
            )
        try:
            rule.strings(_PROBE)
        except Exception as exc:  # parsel raises several types for a bad query
            raise self.error(key, f"invalid {rule.language}: {exc}") from exc
        return rule

    def rules(self, key: str) -> tuple[Rule, ...]:
        """One rule or a list of rules, tried together (their matches are merged)."""
        value = self._get(key)
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        return tuple(_Table(self.file, self.prefix, {key: item}).rule(key) for item in items)

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.read]
        if unknown:
            raise self.error(unknown[0], "unknown key")
