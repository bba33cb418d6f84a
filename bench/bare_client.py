"""The ceiling beside ``bench.crawl_vs_scrapy``: a client that only fetches.

It asks the shop for the same pages the crawlers visit (robots.txt, the sitemap
index and its files, then every URL they list: product pages and category
listings), at the same number of requests in flight per host, and does nothing
with the answers but read them (aiohttp decompresses). No parsing, no robots
rules, no throttle, no storage: what is left is the shop's own latency and the
HTTP stack's cost, so its rate is what any crawler could reach here.

Before that pass it measures the shop's latency unloaded: one request at a
time over a sample of product pages, after a few to warm the connection. With
that latency, concurrency / latency is the bound the shop really allows (the
configured latency is a floor: the HTTP stack on both ends adds to it).

The pass also leaves every page rendered in the shop's cache, so the crawlers
measured after it all meet a shop in the same state.

    python -m bench.bare_client --base http://127.0.0.1:8710 --concurrency 16 --stats out.json
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

_LOC = re.compile(rb"<loc>([^<]+)</loc>")
_WARM, _SAMPLE = 5, 40


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        return await response.read()


async def _locs(session: aiohttp.ClientSession, url: str) -> list[str]:
    body = await _get(session, url)
    if url.endswith(".gz"):
        body = gzip.decompress(body)
    return [loc.decode() for loc in _LOC.findall(body)]


async def _pages(session: aiohttp.ClientSession, base: str) -> tuple[int, list[str]]:
    """(pages asked to find them, the URLs the sitemaps list)."""
    await _get(session, base + "/robots.txt")
    sitemaps = await _locs(session, base + "/sitemap.xml")
    listed = await asyncio.gather(*(_locs(session, url) for url in sitemaps))
    return 2 + len(sitemaps), [url for urls in listed for url in urls]


async def _unloaded_latency_s(session: aiohttp.ClientSession, urls: list[str]) -> list[float]:
    products = [url for url in urls if "/p/" in url][: _WARM + _SAMPLE]
    latencies = []
    for url in products:
        started = time.perf_counter()
        await _get(session, url)
        latencies.append(time.perf_counter() - started)
    return latencies[_WARM:]


async def _fetch_all(session: aiohttp.ClientSession, urls: list[str], concurrency: int) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)

    async def fetcher() -> None:
        while not queue.empty():
            await _get(session, queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(fetcher() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run(base: str, concurrency: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        found_with, urls = await _pages(session, base)
        discovery_s = time.perf_counter() - started
        latencies = await _unloaded_latency_s(session, urls)
        elapsed = await _fetch_all(session, urls, concurrency)
    return {
        "pages": len(urls),
        "discovery_pages": found_with,
        "discovery_s": discovery_s,
        "elapsed_s": elapsed,
        "pages_per_s": len(urls) / elapsed,
        "unloaded_latency_s": {
            "mean": statistics.mean(latencies),
            "median": statistics.median(latencies),
            "samples": len(latencies),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_client")
    parser.add_argument("--base", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    stats = asyncio.run(run(args.base, args.concurrency))
    args.stats.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
