"""Scrapy's side of ``bench.crawl_vs_scrapy``: the same shop, the same fields.

Run in its own process by the benchmark (Twisted's reactor and our asyncio loop
don't share a process well, and the benchmark measures each side's CPU and
peak memory from outside). Discovery mirrors the ``fixture`` site entry: the
sitemap index (gzip chunks) and the category listings with their next pages.
Fields mirror atelier's generic reading: schema.org JSON-LD first, OpenGraph and
the visible markup where a page has none. Scrapy writes a JSON Lines feed;
atelier writes to Postgres. Both obey robots.txt with the same per-host
concurrency and the same AutoThrottle target.

    python -m bench.scrapy_side --base http://127.0.0.1:8710 --out feed.jsonl \
        --stats stats.json --concurrency 16
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response, TextResponse
from scrapy.utils.gz import gunzip
from scrapy.utils.sitemap import Sitemap

IN_STOCK = "instock"


def _jsonld_product(response: Response) -> dict[str, Any] | None:
    for raw in response.css('script[type="application/ld+json"]::text').getall():
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        for item in data.get("@graph", [data]) if isinstance(data, dict) else data:
            if isinstance(item, dict) and item.get("@type") == "Product":
                return item
    return None


def _from_jsonld(product: dict[str, Any], url: str) -> dict[str, Any]:
    offers = product.get("offers") or []
    offers = offers if isinstance(offers, list) else [offers]
    in_stock = [o for o in offers if str(o.get("availability", "")).lower().endswith(IN_STOCK)]
    brand = product.get("brand") or {}
    images = product.get("image") or []
    return {
        "external_id": str(product.get("sku", "")),
        "url": url,
        "designer": brand.get("name", "") if isinstance(brand, dict) else str(brand),
        "name": product.get("name", ""),
        "description": product.get("description", ""),
        "price": str(offers[0].get("price")) if offers else None,
        "currency": offers[0].get("priceCurrency") if offers else None,
        "available": bool(in_stock),
        "sizes": [str(o.get("name", "")) for o in in_stock],
        "category_path": [p.strip() for p in str(product.get("category", "")).split(">") if p],
        "image_urls": images if isinstance(images, list) else [images],
    }


def _from_markup(response: Response) -> dict[str, Any]:
    meta = {
        m.attrib.get("property", ""): m.attrib.get("content", "")
        for m in response.css("meta[property]")
    }
    return {
        "external_id": (response.css("span.sku::text").get() or "").strip(),
        "url": response.url,
        "designer": (response.css("a.designer::text").get() or "").strip(),
        "name": (response.css("h1.product-name::text").get() or meta.get("og:title", "")).strip(),
        "description": meta.get("og:description", ""),
        "price": meta.get("product:price:amount"),
        "currency": meta.get("product:price:currency"),
        "available": meta.get("product:availability", "") == IN_STOCK,
        "sizes": [s.strip() for s in response.css("ul.sizes li.in-stock::text").getall()],
        "category_path": [s.strip() for s in response.css("ol.breadcrumb li::text").getall()],
        "image_urls": [
            response.urljoin(src) for src in response.css("img.product-image::attr(src)").getall()
        ],
    }


class ShopSpider(scrapy.Spider):
    name = "shop"

    def __init__(self, base: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base.rstrip("/")

    async def start(self) -> Any:
        yield scrapy.Request(f"{self.base}/sitemap.xml", callback=self.parse_sitemap)
        yield scrapy.Request(f"{self.base}/", callback=self.parse_home)

    def parse_sitemap(self, response: Response) -> Iterator[scrapy.Request]:
        body = response.body
        if body[:2] == b"\x1f\x8b":
            body = gunzip(body)
        sitemap = Sitemap(body)
        for entry in sitemap:
            loc = entry["loc"]
            if sitemap.type == "sitemapindex":
                yield scrapy.Request(loc, callback=self.parse_sitemap)
            elif "/p/" in loc:
                yield scrapy.Request(loc, callback=self.parse_product)
            else:
                yield scrapy.Request(loc, callback=self.parse_listing)

    def parse_home(self, response: Response) -> Iterator[scrapy.Request]:
        if isinstance(response, TextResponse):
            yield from response.follow_all(css="a.category", callback=self.parse_listing)

    def parse_listing(self, response: Response) -> Iterator[scrapy.Request]:
        if isinstance(response, TextResponse):
            yield from response.follow_all(css="a.product-card", callback=self.parse_product)
            yield from response.follow_all(css="a[rel=next]", callback=self.parse_listing)

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        product = _jsonld_product(response)
        record = _from_jsonld(product, response.url) if product else _from_markup(response)
        if record["external_id"]:
            yield record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrapy_side")
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--user-agent", default="atelier-bench-scrapy/0.1")
    args = parser.parse_args(argv)
    settings = {
        "ROBOTSTXT_OBEY": True,
        "USER_AGENT": args.user_agent,
        "CONCURRENT_REQUESTS": args.concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.concurrency,
        "AUTOTHROTTLE_ENABLED": True,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": float(args.concurrency),
        "AUTOTHROTTLE_START_DELAY": 0.0,
        "DOWNLOAD_DELAY": 0.0,
        "RETRY_TIMES": 3,
        "LOG_LEVEL": "WARNING",
        "TELNETCONSOLE_ENABLED": False,
        "FEEDS": {str(args.out): {"format": "jsonlines", "overwrite": True}},
    }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(ShopSpider)
    process.crawl(crawler, base=args.base)
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    args.stats.write_text(json.dumps(stats, default=str, indent=2))


if __name__ == "__main__":
    main()
