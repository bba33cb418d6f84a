"""What a frontend waits for on product search: one API process, timed from an HTTP client.

A database of its own (``atelier_bench_search``, created and migrated as ``make db``
does) holds the fixture shop's catalog, crawled and embedded on the tiny profile
through the demo's stack (API, scheduler, GPU worker on the CPU, CPU worker, shop),
once: a later run reuses it. Then one uvicorn process serves the API as the Procfile's
``web`` line does, and an async httpx client times, per route:
- the first request after the process started (cold: the search routes load the
  index and fetch the active version's ONNX encoder from the blob store into a fresh
  cache directory, then load it);
- one shopper: requests one after the other, the routes interleaved;
- load: ``--concurrency`` requests in flight (keep-alive connections), each route apart,
  with the API process's CPU time per request.
Routes: ``GET /v1/products?limit=20`` (the floor: framework, API-key check, one page from
Postgres), ``GET /v1/products/search?q=`` (text) and ``POST /v1/products/search`` (the
sample subject's portrait as the upload). Each API process runs with
OPENBLAS_NUM_THREADS=1 or with one BLAS thread per core (OpenBLAS's default), processes
alternating round by round on the same database. ``--vit`` adds a version whose encoder is
a ViT-B-16-shaped open_clip with random weights (exported as bench.query_embedding does,
index rows random unit vectors for the same product images), served with
ATELIER_CLIP_PROFILE=vit-b-16.

    .venv/bin/python -m bench.search_latency [--rounds 2] [--vit]

Prints the figures per variant, then one BLAS thread's p50, p95 and CPU over the
default's, and writes bench/results/search_latency.json. The ViT cold text search
depends on start order too (2.9 s in the first process, 1.3-1.6 s after, either setting).
Uses Redis database ``--redis-db`` (12) for the preparing stack's queues, ports 8013
(that stack's API), 8014 (the measured API) and 8713 (shop),
``var/bench-search`` (blobs, the ViT export); drop the database and that directory to
start over. The client shares the machine's cores with the server. The setup lives in
``bench.search_latency_stack``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from bench.bench_stack import HTTP_TIMEOUT_S, bench_environment
from bench.query_embedding import QUERIES, summary
from bench.results_file import write_result
from bench.search_latency_stack import BENCH_DIR, TINY_PROFILE, VIT_PROFILE, ApiProcess, prepare
from core.settings import Settings
from demo.__main__ import PHOTOS, _wait_healthy

PAGE = 20  # results a frontend asks for, the routes' default
UPLOAD = PHOTOS[0]  # a real JPEG, 512 x 512
WARMUP = 3  # requests per route after the cold one, before anything is recorded


@dataclass(frozen=True)
class Variant:
    name: str
    clip_profile: str
    blas_threads: int
    sequential: int  # requests per route, one shopper
    load: int  # requests per route and concurrency


@dataclass(frozen=True)
class Route:
    name: str
    send: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


# --- one API process, measured -----------------------------------------------------------


def make_routes(upload: bytes) -> list[Route]:
    async def floor(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/v1/products", params={"limit": PAGE})

    async def text(client: httpx.AsyncClient, i: int) -> httpx.Response:
        query = QUERIES[i % len(QUERIES)]
        return await client.get("/v1/products/search", params={"q": query, "limit": PAGE})

    async def image(client: httpx.AsyncClient, i: int) -> httpx.Response:
        files = {"image": (UPLOAD.name, upload, "image/jpeg")}
        return await client.post("/v1/products/search", params={"limit": PAGE}, files=files)

    return [Route("list", floor), Route("text", text), Route("image", image)]


async def timed(route: Route, client: httpx.AsyncClient, i: int) -> float:
    """Milliseconds from sending the request to having the whole response body."""
    started = time.perf_counter()
    response = await route.send(client, i)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"{route.name}: HTTP {response.status_code} {response.text[:300]}")
    return elapsed


async def under_load(
    api: ApiProcess, client: httpx.AsyncClient, route: Route, in_flight: int, total: int
) -> dict[str, Any]:
    """``total`` requests with ``in_flight`` shoppers each sending its next one at once."""
    latencies: list[float] = []
    numbers = itertools.count()

    async def shopper() -> None:
        while (i := next(numbers)) < total:
            latencies.append(await timed(route, client, i))

    server_cpu, client_cpu = api.cpu_s(), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(shopper() for _ in range(in_flight)))
    wall = time.perf_counter() - started
    return {
        "samples": latencies,
        "rps": total / wall,
        "server_cpu_ms": (api.cpu_s() - server_cpu) * 1000 / total,
        "client_cpu_ms": (time.process_time() - client_cpu) * 1000 / total,
    }


async def measure(api: ApiProcess, variant: Variant, key: str, args: argparse.Namespace) -> Any:
    routes = make_routes(UPLOAD.read_bytes())
    limits = httpx.Limits(max_connections=max(args.concurrency))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{args.api_port}", headers={"Authorization": f"Bearer {key}"},
        timeout=HTTP_TIMEOUT_S, limits=limits,
    ) as client:  # fmt: skip
        # In this order: the first text search loads the index and the encoder.
        cold = {route.name: await timed(route, client, 0) for route in routes}
        for i, route in itertools.product(range(WARMUP), routes):
            await timed(route, client, i)
        sequential: dict[str, list[float]] = {route.name: [] for route in routes}
        for i, route in itertools.product(range(variant.sequential), routes):
            sequential[route.name].append(await timed(route, client, i))
        load = {
            str(c): {r.name: await under_load(api, client, r, c, variant.load) for r in routes}
            for c in args.concurrency
        }
    return {"cold_ms": cold, "sequential": sequential, "load": load, "threads": api.threads()}


def run_variant(variant: Variant, key: str, args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="search-latency-models-") as models_dir:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ATELIER_PUBLIC_BASE_URL": f"http://127.0.0.1:{args.api_port}",
            "ATELIER_CLIP_PROFILE": variant.clip_profile,
            "OPENBLAS_NUM_THREADS": str(variant.blas_threads),
            # A fresh encoder cache: the first search fetches the encoder as after a deploy.
            "ATELIER_MODELS_DIR": models_dir,
        }
        api = ApiProcess(args.api_port, env)
        api.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{args.api_port}") as http:
                _wait_healthy(http, api)
            result: dict[str, Any] = asyncio.run(measure(api, variant, key, args))
        finally:
            api.stop()
    result["loadavg_start_end"] = [load_start, os.getloadavg()[0]]
    print(f"  {variant.name}: done (load average {result['loadavg_start_end']})")
    return result


# --- the whole run -----------------------------------------------------------------------


def variants(args: argparse.Namespace) -> list[Variant]:
    cores = os.cpu_count() or 1
    made = []
    for profile, sequential, load in (
        (TINY_PROFILE, args.requests, args.load_requests),
        (VIT_PROFILE, args.vit_requests, args.vit_load_requests),
    ):
        if profile == VIT_PROFILE and not args.vit:
            continue
        for threads in (1, cores):
            name = f"{profile}, {threads} BLAS thread{'s' if threads > 1 else ''}"
            made.append(Variant(name, profile, threads, sequential, load))
    return made


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds together: latencies pooled, per-round figures as medians."""
    out: dict[str, Any] = {
        "cold_ms": {r: [run["cold_ms"][r] for run in rounds] for r in rounds[0]["cold_ms"]},
        "sequential": {},
        "load": {},
        "threads": [run["threads"] for run in rounds],
        "loadavg_start_end": [run["loadavg_start_end"] for run in rounds],
    }
    for route in rounds[0]["sequential"]:
        stats = summary([ms for run in rounds for ms in run["sequential"][route]])
        out["sequential"][route] = {**stats, "rps": 1000 / stats["mean"]}
    for c, by_route in rounds[0]["load"].items():
        out["load"][c] = {}
        for route in by_route:
            runs = [run["load"][c][route] for run in rounds]
            medians = {k: float(np.median([run[k] for run in runs])) for k in runs[0]
                       if k != "samples"}  # fmt: skip
            pooled_ms = [ms for run in runs for ms in run["samples"]]
            out["load"][c][route] = {**summary(pooled_ms), **medians}
    return out


def _phases(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Phase label -> route -> figures: one shopper, then each load."""
    loads = {f"{c} inflt": by_route for c, by_route in result["load"].items()}
    return {"1 client": result["sequential"]} | loads


def blas_comparison(
    results: dict[str, dict[str, Any]], made: list[Variant]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per profile, phase and route: the one-BLAS-thread variant's p50, p95 and server
    CPU per request over the default's (below 1: one thread is better)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for one in (v for v in made if v.blas_threads == 1):
        default = next(v for v in made if v.clip_profile == one.clip_profile and v != one)
        ones, defaults = _phases(results[one.name]), _phases(results[default.name])
        for phase, by_route in ones.items():
            for route, s in by_route.items():
                d = defaults[phase][route]
                keys = ["p50", "p95"] + (["server_cpu_ms"] if "server_cpu_ms" in s else [])
                row = {k: s[k] / d[k] for k in keys}
                out.setdefault(one.clip_profile, {})[f"{route}, {phase}"] = row
    return out


def print_comparison(comparison: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\none BLAS thread over the default (OpenBLAS: one per core); below 1 = better")
    print(f"{'profile':<10}{'route, phase':<18}{'p50':>7}{'p95':>7}{'srv cpu':>9}")
    for profile, rows in comparison.items():
        for label, row in rows.items():
            cpu = f"{row['server_cpu_ms']:>9.2f}" if "server_cpu_ms" in row else f"{'-':>9}"
            print(f"{profile:<10}{label:<18}{row['p50']:>7.2f}{row['p95']:>7.2f}{cpu}")


def report(
    results: dict[str, dict[str, Any]], made: list[Variant], args: argparse.Namespace
) -> None:
    print(f"\nsearch latency through one API process, ms; {args.rounds} rounds, client and "
          f"server on the same {os.cpu_count()} CPUs\n")  # fmt: skip
    print(f"{'variant':<24}{'route':<7}{'phase':<10}{'n':>6}{'p50':>8}{'p95':>8}{'p99':>8}"
          f"{'req/s':>8}{'srv cpu':>9}{'ratio':>7}")  # fmt: skip
    for name, result in results.items():
        cold = "  ".join(f"{r} {min(v):.0f}-{max(v):.0f}" for r, v in result["cold_ms"].items())
        print(f"{name:<24}cold (first request, per round): {cold}")
        for phase, by_route in _phases(result).items():
            for route, s in by_route.items():
                ratio = s["p50"] / by_route["list"]["p50"]
                cpu = f"{s['server_cpu_ms']:>9.1f}" if "server_cpu_ms" in s else f"{'-':>9}"
                print(f"{'':<24}{route:<7}{phase:<10}{s['n']:>6}{s['p50']:>8.1f}{s['p95']:>8.1f}"
                      f"{s['p99']:>8.1f}{s['rps']:>8.0f}{cpu}{ratio:>7.1f}")  # fmt: skip
        load = result["loadavg_start_end"]
        print(f"{'':<24}API threads {result['threads']}, load average {load}")
    print("ratio: p50 over the list route's p50 in the same phase (the floor)")
    comparison = blas_comparison(results, made)
    print_comparison(comparison)
    write_result(
        "search_latency",
        {"rounds": args.rounds, "concurrency": args.concurrency, "upload": UPLOAD.name,
         "page": PAGE, "results": results,
         "one_blas_thread_over_default": comparison},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.search_latency")
    parser.add_argument("--rounds", type=int, default=2, help="API processes per variant")
    parser.add_argument("--requests", type=int, default=200, help="one client, per route")
    parser.add_argument("--load-requests", type=int, default=320, help="per route and load")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                        default=[8, 32], help="requests in flight, e.g. 8,32")  # fmt: skip
    parser.add_argument("--vit", action="store_true", help="add the ViT-B-16-shaped encoder")
    parser.add_argument("--vit-requests", type=int, default=30)
    parser.add_argument("--vit-load-requests", type=int, default=96)
    parser.add_argument("--database", default="atelier_bench_search")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--port", type=int, default=8013, help="the preparing stack's API")
    parser.add_argument("--api-port", type=int, default=8014, help="the measured API")
    parser.add_argument("--shop-port", type=int, default=8713)
    args = parser.parse_args()

    started = time.perf_counter()
    bench_environment(args, BENCH_DIR)
    settings = Settings()
    key = prepare(settings, args)
    made = variants(args)
    rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in made}
    for index in range(args.rounds):  # alternating, so drift hits every variant alike
        print(f"round {index + 1} of {args.rounds}")
        for variant in made:
            rounds[variant.name].append(run_variant(variant, key, args))
    report({name: pooled(runs) for name, runs in rounds.items()}, made, args)
    print(f"took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
