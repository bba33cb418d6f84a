"""atelier's crawler against Scrapy on the fixture shop, side by side in one run.

Each side runs in its own process against the same fixture shop (its own
process too, 50 ms per response by default, no troubles so both sides see the
same pages), at the same per-host concurrency, AutoThrottle target and robots
policy. Per page, Scrapy parses and writes a JSON Lines feed; atelier parses,
upserts into Postgres and records validators, as in production. Images are
off on both sides for the comparison (Scrapy's spider fetches none); one more
atelier run with images on is reported for information.

Before the crawlers, ``bench.bare_client`` fetches the same pages doing nothing
else: it measures the shop's unloaded latency (the "measured" bound is
concurrency / that latency, beside the nominal concurrency / configured latency),
gives the rate any client could reach here, and leaves every page rendered in
the shop's cache, so the sides measured after it meet the same warm shop.

Pages are counted by the shop (``/_admin/stats``), not by either crawler (the
bare client counts its own). CPU seconds and peak RSS come from ``wait4`` on
each side's process.

    python -m bench.crawl_vs_scrapy --products 5000 --memory-sizes 1000,10000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.crawl_agreement import (
    agreement_table,
    atelier_products,
    last_crawl_seconds,
    scrapy_products,
)
from bench.results_file import write_result

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/atelier_bench_crawl"
PAGE_KINDS = ("robots", "home", "listing", "sitemap", "product")


@dataclass(frozen=True)
class SideRun:
    side: str
    products: int
    wall_s: float  # the process, from start to exit
    crawl_s: float  # the crawl itself, as the crawler reports it (no interpreter start)
    cpu_s: float
    peak_rss_mib: float
    db_cpu_s: float  # the Postgres server's CPU during the run
    pages: int  # pages (not images) the shop served to this side
    not_modified: int
    images: int

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.crawl_s

    @property
    def cpu_s_per_1k_pages(self) -> float:
        return 1000 * self.cpu_s / max(self.pages, 1)

    @property
    def db_cpu_s_per_1k_pages(self) -> float:
        return 1000 * self.db_cpu_s / max(self.pages, 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _admin(base: str, path: str, data: dict[str, Any] | None = None) -> Any:
    body = None if data is None else json.dumps(data).encode()
    method = "GET" if data is None else "POST"
    request = urllib.request.Request(
        base + path, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


@contextmanager
def fixture_shop(products: int, latency_ms: float) -> Any:
    port = _free_port()
    command = [sys.executable, "-m", "fixture_shop", "--port", str(port), "--products",
               str(products), "--latency-ms", str(latency_ms), "--no-trouble"]  # fmt: skip
    shop = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                _admin(base, "/_admin/stats")
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        shop.terminate()
        shop.wait(10)


def _measured(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run to completion; (wall s, user+sys CPU s, peak RSS MiB) of that process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} exited with {process.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def postgres_cpu_seconds() -> float:
    """CPU seconds of the Postgres server so far: live processes plus the exited
    backends their parent (the postmaster) has reaped. atelier's writes cost the
    server CPU that its own process does not show; Scrapy's feed costs none."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    oldest: tuple[int, list[str]] | None = None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        except (OSError, ValueError):
            continue
        if comm != "postgres":
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        pid = int(stat.parent.name)
        if oldest is None or pid < oldest[0]:
            oldest = (pid, fields)
    if oldest is not None:
        total += (int(oldest[1][13]) + int(oldest[1][14])) / ticks  # cutime, cstime
    return total


def _shop_counts(base: str) -> tuple[int, int, int]:
    stats = _admin(base, "/_admin/stats")
    by_kind: dict[str, int] = stats["by_kind"]
    pages = sum(by_kind.get(kind, 0) for kind in PAGE_KINDS)
    images = by_kind.get("image", 0)
    return pages, int(stats.get("not_modified", 0)), images


def _atelier_env(base: str, concurrency: int, images: bool, blob_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": BENCH_DB,
        "ATELIER_BLOB_DIR": str(blob_dir),
        "ATELIER_CRAWL_BASE_URLS": json.dumps({"fixture": base}),
        "ATELIER_CRAWL_CONCURRENCY_PER_HOST": str(concurrency),
        "ATELIER_CRAWL_TARGET_CONCURRENCY": str(concurrency),
        "ATELIER_CRAWL_IMAGES": "true" if images else "false",
        "ATELIER_CPU_WORKER_METRICS_PORT": "0",
    }


def run_atelier(base: str, products: int, side: str, env: dict[str, str]) -> SideRun:
    _admin(base, "/_admin/stats/reset", {})
    db_before = postgres_cpu_seconds()
    wall, cpu, rss = _measured([sys.executable, "-m", "worker", "crawl", "fixture"], env)
    db_cpu = postgres_cpu_seconds() - db_before
    pages, not_modified, images = _shop_counts(base)
    crawl_s = last_crawl_seconds(BENCH_DB, "fixture")
    return SideRun(side, products, wall, crawl_s, cpu, rss, db_cpu, pages, not_modified, images)


def run_scrapy(base: str, products: int, concurrency: int, work: Path) -> SideRun:
    _admin(base, "/_admin/stats/reset", {})
    command = [sys.executable, "-m", "bench.scrapy_side", "--base", base,
               "--out", str(work / "feed.jsonl"), "--stats", str(work / "scrapy-stats.json"),
               "--concurrency", str(concurrency)]  # fmt: skip
    wall, cpu, rss = _measured(command, dict(os.environ))
    pages, not_modified, images = _shop_counts(base)
    crawl_s = float(json.loads((work / "scrapy-stats.json").read_text())["elapsed_time_seconds"])
    return SideRun("scrapy", products, wall, crawl_s, cpu, rss, 0.0, pages, not_modified, images)


def run_bare(base: str, products: int, concurrency: int, work: Path) -> tuple[SideRun, float]:
    """The fetch-only ceiling (bench/bare_client.py), and the shop's unloaded latency."""
    stats_file = work / "bare-stats.json"
    command = [sys.executable, "-m", "bench.bare_client", "--base", base,
               "--concurrency", str(concurrency), "--stats", str(stats_file)]  # fmt: skip
    wall, cpu, rss = _measured(command, dict(os.environ))
    stats = json.loads(stats_file.read_text())
    run = SideRun("bare aiohttp", products, wall, stats["elapsed_s"], cpu, rss, 0.0,
                  stats["pages"], 0, 0)  # fmt: skip
    return run, float(stats["unloaded_latency_s"]["mean"])


def reset_database() -> None:
    from bench.crawl_agreement import recreate_and_migrate

    recreate_and_migrate(BENCH_DB)


def print_runs(runs: list[SideRun], bound: float, measured: dict[int, float]) -> None:
    """``measured``: the bound at the shop's measured latency, by catalog size."""
    print(f"\n{'side':<22}{'products':>9}{'pages':>8}{'304s':>7}{'crawl s':>8}{'pages/s':>9}"
          f"{'of bound':>9}{'of meas.':>9}{'CPU s/1k':>10}{'+PG s/1k':>10}"
          f"{'peak MiB':>10}")  # fmt: skip
    for run in runs:
        print(f"{run.side:<22}{run.products:>9}{run.pages:>8}{run.not_modified:>7}"
              f"{run.crawl_s:>8.1f}{run.pages_per_s:>9.1f}{run.pages_per_s / bound:>9.1%}"
              f"{run.pages_per_s / measured[run.products]:>9.1%}"
              f"{run.cpu_s_per_1k_pages:>10.2f}{run.db_cpu_s_per_1k_pages:>10.2f}"
              f"{run.peak_rss_mib:>10.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crawl_vs_scrapy")
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--memory-sizes", default="1000,10000")
    args = parser.parse_args(argv)
    bound = args.concurrency / (args.latency_ms / 1000)
    runs: list[SideRun] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        reset_database()
        measured: dict[int, float] = {}  # catalog size -> bound at the measured latency
        with fixture_shop(args.products, args.latency_ms) as base:
            # First: the shop's real latency, and every page rendered in its cache,
            # so that every side measured after meets the shop in the same state.
            bare, latency_s = run_bare(base, args.products, args.concurrency, work)
            measured[args.products] = args.concurrency / latency_s
            env = _atelier_env(base, args.concurrency, False, work / "blobs")
            first = run_atelier(base, args.products, "atelier first", env)
            refresh = run_atelier(base, args.products, "atelier refresh", env)
            scrapy = run_scrapy(base, args.products, args.concurrency, work)
            truth = _admin(base, "/_admin/catalog")
            reset_database()
            with_images = run_atelier(
                base, args.products, "atelier + images",
                _atelier_env(base, args.concurrency, True, work / "blobs-images"),
            )  # fmt: skip
            # Read after the run with images, so atelier's image URLs are compared too.
            agreement = agreement_table(
                truth, atelier_products(BENCH_DB, "fixture"), scrapy_products(work / "feed.jsonl")
            )
        runs += [bare, first, refresh, scrapy, with_images]
        memory: list[SideRun] = []
        for size in (int(s) for s in args.memory_sizes.split(",") if s):
            reset_database()
            with fixture_shop(size, args.latency_ms) as base:
                sized_bare, latency_s = run_bare(base, size, args.concurrency, work)
                measured[size] = args.concurrency / latency_s
                memory.append(sized_bare)
                env = _atelier_env(base, args.concurrency, False, work / f"blobs-{size}")
                memory.append(run_atelier(base, size, f"atelier {size}", env))
                memory.append(run_scrapy(base, size, args.concurrency, work))
    print(f"bound: {args.concurrency} in flight / {args.latency_ms:.0f} ms = {bound:.0f} pages/s")
    for size, value in measured.items():
        latency_ms = 1000 * args.concurrency / value
        print(f"measured bound ({size} products): {args.concurrency} in flight / "
              f"{latency_ms:.2f} ms unloaded = {value:.0f} pages/s")  # fmt: skip
    print_runs(runs, bound, measured)
    print("\nmemory against catalog size (first crawls):")
    print_runs(memory, bound, measured)
    ratios = {
        "pages_per_s_atelier_over_scrapy": first.pages_per_s / scrapy.pages_per_s,
        "atelier_share_of_bound": first.pages_per_s / bound,
        "atelier_share_of_measured_bound": first.pages_per_s / measured[args.products],
        "atelier_over_bare_client": first.pages_per_s / bare.pages_per_s,
        "cpu_per_page_atelier_over_scrapy": first.cpu_s_per_1k_pages / scrapy.cpu_s_per_1k_pages,
        "cpu_per_page_atelier_with_postgres_over_scrapy": (
            (first.cpu_s + first.db_cpu_s) / max(first.pages, 1)
        )
        / (scrapy.cpu_s / max(scrapy.pages, 1)),
        "refresh_speedup": first.crawl_s / refresh.crawl_s,
    }
    print("\nratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    print("\nfield agreement (share of ground-truth products whose field matches):")
    for field, row in agreement.items():
        print(f"  {field:<15} atelier {row['atelier']:.3f}   scrapy {row['scrapy']:.3f}")
    write_result(
        "crawl_vs_scrapy",
        {
            "settings": vars(args),
            "bound_pages_per_s": bound,
            "measured_bound_pages_per_s": {str(k): v for k, v in measured.items()},
            "runs": [run.__dict__ | {"pages_per_s": run.pages_per_s} for run in runs],
            "memory": [run.__dict__ for run in memory],
            "ratios": ratios,
            "agreement": agreement,
        },
    )


if __name__ == "__main__":
    main()
