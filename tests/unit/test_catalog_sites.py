"""core.catalog.sites: the shipped entries load, and mistakes name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.catalog.sites import SiteConfigError, known_sites, load_site, parse_site
from core.settings import Settings

MINIMAL = 'base_url = "https://shop.test"\n[discovery]\nsitemaps = ["/sitemap.xml"]\n'


def test_shipped_entries_load() -> None:
    settings = Settings(crawl_base_urls={"jsonld-generic": "https://any.test/"})
    names = known_sites(settings)
    assert {"fixture", "fixture-selectors", "luisaviaroma", "jsonld-generic"} <= set(names)
    for name in names:
        entry = load_site(settings, name)
        assert entry.name == name
        assert entry.discovery.start_urls or entry.discovery.sitemaps
    generic = load_site(settings, "jsonld-generic")
    assert generic.base_url == "https://any.test"
    assert generic.discovery.sitemaps == ("https://any.test/sitemap.xml",)


def test_base_url_override_moves_absolute_start_urls() -> None:
    settings = Settings(crawl_base_urls={"luisaviaroma": "http://127.0.0.1:9999"})
    entry = load_site(settings, "luisaviaroma")
    assert entry.base_url == "http://127.0.0.1:9999"
    assert all(u.startswith("http://127.0.0.1:9999/") for u in entry.discovery.start_urls)
    assert (
        load_site(Settings(), "luisaviaroma")
        .discovery.start_urls[0]
        .startswith("https://www.luisaviaroma.com/")
    )


def test_generic_entry_needs_a_base_url_from_settings() -> None:
    with pytest.raises(SiteConfigError, match=r"jsonld-generic\.toml: base_url: missing"):
        load_site(Settings(crawl_base_urls={}), "jsonld-generic")


def test_unknown_site_lists_the_known_ones() -> None:
    with pytest.raises(SiteConfigError, match=r"known: .*fixture"):
        load_site(Settings(), "nope")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour = 1\n", r"shop\.toml: colour: unknown key"),
        ('[product]\nread = ["jsonld", "magic"]\n', r"product\.read: unknown source 'magic'"),
        ('[product]\nread = ["selectors"]\n', r"product\.selectors: read names 'selectors'"),
        ('[product]\n[product.selectors]\nname = "h1::text"\n', r"product\.read: selectors are"),
        ('[product]\nread = ["selectors"]\n[product.selectors]\nname = "h1[::text"\n',
         r"product\.selectors\.name: invalid css"),
        ('[product]\nread = ["selectors"]\n[product.selectors]\nname = { xpath = "//h1[" }\n',
         r"product\.selectors\.name: invalid xpath"),
        ('[product]\nread = ["selectors"]\n[product.selectors]\ncolour = "h1"\n',
         r"product\.selectors\.colour: not a product field"),
        ('[product]\nread = ["selectors"]\n[product.selectors]\nname = { css = "a", xpath = "" }\n',
         r"product\.selectors\.name: expected a CSS string"),
        ('[product]\nexternal_id_in_url = "(["\n', r"product\.external_id_in_url: bad regular"),
        ('[product]\nread = ["url"]\n', r"product\.read: 'url' needs external_id_in_url"),
        ("[discovery.listing]\nnext_pages = 'a'\n", r"discovery\.listing\.next_pages: unknown key"),
    ],
)  # fmt: skip
def test_mistakes_name_the_file_and_the_key(extra: str, message: str) -> None:
    text = MINIMAL + extra if extra.startswith("[") else extra + MINIMAL  # top-level keys first
    with pytest.raises(SiteConfigError, match=message):
        parse_site(Path("shop.toml"), text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base_url = [", r"shop\.toml: not valid TOML"),
        ('base_url = "ftp://x"\n[discovery]\nsitemaps = ["/s"]\n', r"base_url: 'ftp://x' is not"),
        ('base_url = "https://x"\n', r"discovery: needs start_urls, sitemaps"),
        ('base_url = "https://x"\n[discovery]\nstart_urls = ["/"]\n',
         r"discovery\.listing\.product_links: start_urls need listing rules"),
        ('base_url = "https://x"\n[discovery]\nsitemaps = "/s"\n',
         r"discovery\.sitemaps: expected a list"),
    ],
)  # fmt: skip
def test_structural_mistakes(text: str, message: str) -> None:
    with pytest.raises(SiteConfigError, match=message):
        parse_site(Path("shop.toml"), text)
