"""The catalog's nearest-neighbour index: atelier's exact ProductIndex vs. faiss, side by side.

One run, one data set per size, every engine on the same queries and filters:
- atelier: core.shop.vector_index.ProductIndex (numpy, exact, max over a product's rows);
- faiss IndexFlatIP (exact): k x MAX_IMAGES rows fetched then reduced to products, which is
  exact (a top-k product's best row has at most MAX_IMAGES x (k - 1) rows above it);
- faiss IndexHNSWFlat (approximate graph), the same reduction.
Filtered queries allow a random FILTER_FRACTION of the products: atelier takes the mask,
faiss an IDSelectorBitmap over rows built from it per query (Flat and HNSW), or HNSW
over-fetches k x MAX_IMAGES / fraction rows unfiltered and drops the disallowed ones.

Data, dim 512 (ViT-B-16): a Gaussian mixture around unit centres, one per
--products-per-centre products (a kind of garment; 67 / 670 / 6,700 centres at 10k /
100k / 1M rows), products near a centre, a product's 1-MAX_IMAGES images near it;
queries are fresh points near a product's centre, like a text query for a kind of
garment. Measures build time, index bytes and RSS delta, single-query p50/p99,
per-query time in one batch, recall@10 of products against atelier's exact answer.

    .venv/bin/python -m bench.vector_index [--sizes 10000,100000,1000000] [--queries 200]
        [--hnsw-m 32] [--ef-construction 40] [--ef-search 64,256]
        [--hnsw-max-rows 100000] [--faiss-threads 1]

Prints two tables and writes bench/results/vector_index.json. numpy's OpenBLAS runs one
thread unless OPENBLAS_NUM_THREADS says otherwise (why: below); faiss runs
--faiss-threads OpenMP threads. Needs faiss-cpu (the `bench` extra).
"""

from __future__ import annotations

import os

# Before numpy loads: on the 2-vCPU dev machine a second OpenBLAS thread never helped
# (a 4096^2 sgemm ran at the same speed) and made many small calls 2-10x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ctypes
import gc
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import psutil

from bench.results_file import write_result
from core.shop.vector_index import ProductIndex

# faiss' bundled type stubs lag its SWIG API (no SearchParametersHNSW, no `sel=`).
FAISS: Any = faiss

DIM = 512  # ViT-B-16's embedding width
MAX_IMAGES = 5  # images per product, 1..5 uniformly (a listing shows a handful)
K = 10
FILTER_FRACTION = 0.1  # "in stock, this category": a tenth of the catalog allowed
# Mixture spreads (noise norms relative to a unit centre): a product sits at cosine
# ~0.8 from its centre, an image ~0.9 from its product, a query ~0.7 from a centre;
# chosen so neighbours are neither trivial nor noise, not fitted to real embeddings.
PRODUCT_SPREAD, IMAGE_SPREAD, QUERY_SPREAD = 0.75, 0.5, 1.0
CHUNK_ROWS = 65_536  # rows generated at a time: no float64 or full-size temporaries
# Stop timing one (engine, mode) after this long if at least MIN_QUERIES ran: an
# unfiltered exact query at 1M rows takes ~0.2 s, 200 of them per engine add minutes.
LATENCY_BUDGET_S = 10.0
MIN_QUERIES = 20

Products = list[int]  # dense product numbers, best first


@dataclass
class Catalog:
    vectors: npt.NDArray[np.float32]  # [N, DIM], unit rows
    product_of_row: npt.NDArray[np.intp]
    product_ids: list[uuid.UUID]  # by product number
    queries: npt.NDArray[np.float32]
    allowed: npt.NDArray[np.bool_]  # the filter, by product number


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _noise(rng: np.random.Generator, rows: int, spread: float) -> npt.NDArray[np.float32]:
    return rng.standard_normal((rows, DIM), dtype=np.float32) * np.float32(spread / DIM**0.5)


def make_catalog(n_rows: int, products_per_centre: int, n_queries: int, seed: int) -> Catalog:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, MAX_IMAGES + 1, n_rows)  # over-long; cut at n_rows rows
    product_of_row = np.repeat(np.arange(n_rows), images)[:n_rows]
    n_products = int(product_of_row[-1]) + 1
    n_centres = max(1, n_products // products_per_centre)
    centres = _unit(_noise(rng, n_centres, 1.0))
    centre_of_product = rng.integers(0, n_centres, n_products)
    products = _unit(centres[centre_of_product] + _noise(rng, n_products, PRODUCT_SPREAD))
    vectors = np.empty((n_rows, DIM), np.float32)
    for start in range(0, n_rows, CHUNK_ROWS):
        rows = product_of_row[start : start + CHUNK_ROWS]
        vectors[start : start + len(rows)] = _unit(
            products[rows] + _noise(rng, len(rows), IMAGE_SPREAD)
        )
    query_centres = centre_of_product[rng.integers(0, n_products, n_queries)]
    queries = _unit(centres[query_centres] + _noise(rng, n_queries, QUERY_SPREAD))
    ids = [uuid.UUID(bytes=rng.bytes(16)) for _ in range(n_products)]
    allowed = rng.random(n_products) < FILTER_FRACTION
    return Catalog(vectors, product_of_row, ids, queries, allowed)


class Engine:
    """One index under test: build, search (optionally filtered) in product numbers."""

    name = ""
    index: Any = None

    def build(self, catalog: Catalog) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Drop the index, so the next engine builds in the memory this one held."""
        self.index = None

    def nbytes(self) -> int:
        raise NotImplementedError

    def search(self, query: npt.NDArray[np.float32], filtered: bool) -> Products:
        raise NotImplementedError

    def search_batch(self, queries: npt.NDArray[np.float32]) -> list[Products]:
        return [self.search(q, filtered=False) for q in queries]


class Atelier(Engine):
    name = "atelier exact"

    def build(self, catalog: Catalog) -> None:
        row_ids = [catalog.product_ids[p] for p in catalog.product_of_row]
        self.index = ProductIndex.from_rows(catalog.vectors, row_ids)
        number = {pid: n for n, pid in enumerate(catalog.product_ids)}
        self.number_at = np.array([number[pid] for pid in self.index.product_ids])
        self.number = number
        # In the service the mask comes in index order (ProductIndex.product_ids).
        self.mask = catalog.allowed[self.number_at]

    def nbytes(self) -> int:
        return self.index.nbytes

    def search(self, query: npt.NDArray[np.float32], filtered: bool) -> Products:
        hits = self.index.search(query, K, self.mask if filtered else None)
        return [self.number[h.product_id] for h in hits]

    def search_batch(self, queries: npt.NDArray[np.float32]) -> list[Products]:
        batch = self.index.search_batch(queries, K)
        return [[self.number[h.product_id] for h in hits] for hits in batch]


def _best_products(rows: npt.NDArray[np.int64], catalog: Catalog, allowed_only: bool) -> Products:
    """Rows best first -> the first K distinct products (the first row of each is its max)."""
    seen: dict[int, None] = {}
    for row in rows[rows >= 0]:  # faiss pads missing results with -1
        product = int(catalog.product_of_row[row])
        if allowed_only and not catalog.allowed[product]:
            continue
        seen.setdefault(product, None)
        if len(seen) == K:
            break
    return list(seen)


class FaissEngine(Engine):
    """Shared by Flat and HNSW: row results reduced to products, filters via IDSelector."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def _new_index(self) -> Any:
        raise NotImplementedError

    def _params(self, selector: Any) -> Any:
        return FAISS.SearchParameters(sel=selector)

    def build(self, catalog: Catalog) -> None:
        faiss.omp_set_num_threads(self.threads)
        self.catalog = catalog
        self.index = self._new_index()
        self.index.add(catalog.vectors)

    def search(self, query: npt.NDArray[np.float32], filtered: bool) -> Products:
        if not filtered:
            _, rows = self.index.search(query[None], K * MAX_IMAGES)
            return _best_products(rows[0], self.catalog, allowed_only=False)
        # Filters change per query, so the row bitmap is built per query (and timed)
        # from the product mask, as the service would have to.
        allowed_rows = self.catalog.allowed[self.catalog.product_of_row]
        bitmap = np.packbits(allowed_rows, bitorder="little")  # read via a raw pointer
        selector = faiss.IDSelectorBitmap(len(allowed_rows), faiss.swig_ptr(bitmap))
        _, rows = self.index.search(query[None], K * MAX_IMAGES, params=self._params(selector))
        return _best_products(rows[0], self.catalog, allowed_only=False)

    def search_batch(self, queries: npt.NDArray[np.float32]) -> list[Products]:
        _, rows = self.index.search(queries, K * MAX_IMAGES)
        return [_best_products(r, self.catalog, allowed_only=False) for r in rows]


class FaissFlat(FaissEngine):
    name = "faiss Flat"

    def _new_index(self) -> Any:
        return faiss.IndexFlatIP(DIM)

    def nbytes(self) -> int:
        return int(self.index.ntotal) * DIM * 4


class FaissHNSW(FaissEngine):
    name = "faiss HNSW"

    def __init__(self, threads: int, m: int, ef_construction: int, ef_search: int) -> None:
        super().__init__(threads)
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search

    def set_ef_search(self, ef_search: int) -> None:
        """Search wider or narrower on the same graph (no rebuild)."""
        self.ef_search = self.index.hnsw.efSearch = ef_search

    def _new_index(self) -> Any:
        index = faiss.IndexHNSWFlat(DIM, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def _params(self, selector: Any) -> Any:
        return FAISS.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)

    def nbytes(self) -> int:
        hnsw = self.index.hnsw
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        return int(self.index.ntotal) * DIM * 4 + int(graph)

    def search_over_fetch(self, query: npt.NDArray[np.float32]) -> Products:
        """Unfiltered search for 1/fraction as many rows, the disallowed ones dropped."""
        fetch = int(K * MAX_IMAGES / FILTER_FRACTION)
        params = FAISS.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        _, rows = self.index.search(query[None], fetch, params=params)
        return _best_products(rows[0], self.catalog, allowed_only=True)


def _time_queries(
    search: Callable[[npt.NDArray[np.float32]], Products], queries: npt.NDArray[np.float32]
) -> tuple[list[float], list[Products]]:
    search(queries[0])  # warm-up: first touch of the index, lazy allocations
    times, results = [], []
    started = time.perf_counter()
    for query in queries:
        begin = time.perf_counter()
        results.append(search(query))
        times.append(time.perf_counter() - begin)
        if len(times) >= MIN_QUERIES and time.perf_counter() - started > LATENCY_BUDGET_S:
            break
    return times, results


def _recall(got: list[Products], exact: list[Products]) -> float:
    found = sum(len(set(g) & set(e)) for g, e in zip(got, exact, strict=False))
    return found / max(1, sum(len(e) for e in exact[: len(got)]))


def _latency(times: list[float]) -> dict[str, float | int]:
    ms = sorted(t * 1e3 for t in times)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": statistics.median(ms), "p99_ms": p99, "queries": len(ms)}


def _rss() -> int:
    gc.collect()
    # Hand freed heap pages back first, or the next engine's build reuses the previous
    # engine's memory and its RSS delta reads near zero.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


# (engine, mode) -> how the filter is applied, for the second table.
FILTER_HOW = {
    ("atelier exact", "filtered"): "boolean product mask",
    ("faiss Flat", "filtered"): "IDSelectorBitmap",
    ("faiss HNSW", "filtered"): "IDSelectorBitmap",
    ("faiss HNSW", "over-fetch"): f"over-fetch x{1 / FILTER_FRACTION:.0f}, post-filter",
}


def measure_build(engine: Engine, catalog: Catalog) -> dict[str, Any]:
    before = _rss()
    started = time.perf_counter()
    engine.build(catalog)
    build_s = time.perf_counter() - started
    return {"build_s": build_s, "index_bytes": engine.nbytes(), "rss_delta_bytes": _rss() - before}


def measure_queries(
    engine: Engine, catalog: Catalog, exact: dict[str, list[Products]] | None
) -> tuple[dict[str, Any], dict[str, list[Products]]]:
    """Time every mode; recall against ``exact`` (None: this engine is the exact one)."""
    modes: dict[str, Callable[[npt.NDArray[np.float32]], Products]] = {
        "unfiltered": lambda q: engine.search(q, filtered=False),
        "filtered": lambda q: engine.search(q, filtered=True),
    }
    if isinstance(engine, FaissHNSW):
        modes["over-fetch"] = engine.search_over_fetch
    out: dict[str, Any] = {}
    answers: dict[str, list[Products]] = {}
    for mode, search in modes.items():
        times, answers[mode] = _time_queries(search, catalog.queries)
        reference = answers if exact is None else exact
        right = reference[mode.replace("over-fetch", "filtered")]
        out[mode] = {**_latency(times), "recall": _recall(answers[mode], right)}
    started = time.perf_counter()
    engine.search_batch(catalog.queries)
    out["batch_ms_per_query"] = (time.perf_counter() - started) * 1e3 / len(catalog.queries)
    return out, answers


def measure_size(size: int, args: argparse.Namespace, run_started: float) -> dict[str, Any]:
    """Every engine on one catalog, one after the other (each freed before the next)."""
    catalog = make_catalog(size, args.products_per_centre, args.queries, args.seed)
    engines: list[Engine] = [Atelier(), FaissFlat(args.faiss_threads)]
    ef_searches = [int(ef) for ef in args.ef_search.split(",")]
    if size <= args.hnsw_max_rows:
        engines.append(
            FaissHNSW(args.faiss_threads, args.hnsw_m, args.ef_construction, ef_searches[0])
        )
    exact: dict[str, list[Products]] | None = None  # atelier's answers, measured first
    records: dict[str, Any] = {}
    for engine in engines:
        built = measure_build(engine, catalog)
        for ef in ef_searches if isinstance(engine, FaissHNSW) else [0]:
            name = engine.name
            if isinstance(engine, FaissHNSW):
                engine.set_ef_search(ef)
                name = f"{engine.name} ef={ef}"
            queried, answers = measure_queries(engine, catalog, exact)
            records[name] = {**built, **queried}
            exact = exact or answers
        engine.release()
        elapsed = time.perf_counter() - run_started
        print(f"  {size:>9,} rows  {engine.name:<14} done at {elapsed:.0f}s")
    return {"products": len(catalog.product_ids), "engines": records}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vector_index")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="rows (vectors)")
    parser.add_argument("--queries", type=int, default=200)
    # ~50 products per kind of garment: with a fixed few thousand centres a 10k-row
    # catalog has 1-2 products per centre and a query's neighbours are mostly noise.
    parser.add_argument("--products-per-centre", type=int, default=50)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=40)  # faiss' default
    # Several efSearch values are measured on the same graph: recall against latency.
    parser.add_argument("--ef-search", default="64,256", help="comma-separated")
    # An HNSW build at 1M rows takes ~400 s on the 2-vCPU machine, 4x the rest of the
    # run: larger sizes skip HNSW unless asked (--hnsw-max-rows 1000000).
    parser.add_argument("--hnsw-max-rows", type=int, default=100_000)
    # One: on the 2-vCPU dev machine two OpenMP threads made a Flat query 3x slower
    # (42 vs 14 ms at 100k rows) and an HNSW build no faster (6.1 vs 5.7 s at 20k).
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run_started = time.perf_counter()
    results = {size: measure_size(int(size), args, run_started) for size in args.sizes.split(",")}
    report(results, args, time.perf_counter() - run_started)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, total_s: float) -> None:
    print(f"\n{K} nearest products, dim {DIM}, clustered data, {args.queries} queries; "
          f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}, built up to "
          f"{args.hnsw_max_rows:,} rows; OpenBLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, "
          f"faiss threads {args.faiss_threads}\n")  # fmt: skip
    print(f"{'rows':>9} {'products':>8}  {'engine':<18}{'build s':>8}{'index MB':>9}{'RSS+ MB':>8}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'recall':>7}{'n':>5}{'batch ms/q':>11}")  # fmt: skip
    for size, at_size in results.items():
        for name, r in at_size["engines"].items():
            u = r["unfiltered"]
            print(f"{int(size):>9,} {at_size['products']:>8,}  {name:<18}{r['build_s']:>8.2f}"
                  f"{r['index_bytes'] / 2**20:>9.0f}{r['rss_delta_bytes'] / 2**20:>8.0f}"
                  f"{u['p50_ms']:>8.2f}{u['p99_ms']:>8.2f}{u['recall']:>7.3f}{u['queries']:>5}"
                  f"{r['batch_ms_per_query']:>11.2f}")  # fmt: skip
    print(f"\nfiltered: {FILTER_FRACTION:.0%} of products allowed, applied before top-k\n")
    print(f"{'rows':>9}  {'engine':<18}{'filter':<30}{'p50 ms':>8}{'p99 ms':>8}{'recall':>7}"
          f"{'n':>5}")  # fmt: skip
    for size, at_size in results.items():
        for name, r in at_size["engines"].items():
            for mode in ("filtered", "over-fetch"):
                if mode in r:
                    f, how = r[mode], FILTER_HOW[(name.split(" ef=")[0], mode)]
                    print(f"{int(size):>9,}  {name:<18}{how:<30}{f['p50_ms']:>8.2f}"
                          f"{f['p99_ms']:>8.2f}{f['recall']:>7.3f}{f['queries']:>5}")  # fmt: skip
    print(f"\nwhole run {total_s:.0f}s")
    write_result(
        "vector_index",
        {
            "k": K,
            "dim": DIM,
            "filter_fraction": FILTER_FRACTION,
            "max_images_per_product": MAX_IMAGES,
            "args": vars(args),
            "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
            "faiss_version": faiss.__version__,
            "numpy_version": np.__version__,
            "total_s": total_s,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
