"""The catalog's nearest-neighbour index: exact top-k products for image embeddings.

Each row is one product image's L2-normalised embedding; a product may have several
rows (up to ~5 images). A query scores every row by dot product, a product scores the
MAX over its rows, a boolean product mask (the query's filters) is applied BEFORE top-k,
so a narrow filter still yields k products when k exist. numpy only: the API imports it.

Why exact and not a graph index (bench/vector_index.py, bench/results/vector_index.json,
2-vCPU dev machine): a query is one memory-bound BLAS pass over the rows, 13 ms at 100k
rows (33k products), ~200 ms at 1M; with a filter only the allowed products' rows are
read (10% allowed: 1.8 ms at 100k rows, ~40 ms at 1M). It is always exact, builds in
0.3 s at 100k rows (faiss HNSW: 14 s, and its recall with a 10% filter is 0.5-0.9), and
costs no memory beyond the vectors. Unfiltered queries pass 50 ms near 250k rows: past
that, batch them (:meth:`ProductIndex.search_batch`) or move to an approximate index.

Threads: run the process with OPENBLAS_NUM_THREADS=1. On the 2-vCPU machine a second
OpenBLAS thread never made a pass faster and made small calls 2-20x slower.

Layout, chosen so that "max over a product's rows" is a few contiguous numpy ops:
products are ordered by number of rows (descending), then by id; rows are stored
slot-major: first every product's first image (row p = product p), then the second
image of every product that has one (again in product order), and so on. Products that
have a j-th image form a prefix of the product order, so the max over rows is
``best[:n_j] = max(best[:n_j], slot_j_scores)`` for each slot j. A sorted subset of
products keeps the same prefix property, which the filtered path relies on.

float32 is kept (not float16): numpy has no float16 BLAS, and float16 storage measured
6-20x slower per query than float32 BLAS here, whatever the halved memory traffic.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.intp]
ProductMask = npt.NDArray[np.bool_]

# Below this fraction of allowed products, reading only their rows beats a full pass
# with the mask applied after: at 500k rows on the 2-vCPU dev machine a gathered 30%
# still took ~60% of a full pass, 10% ~20%, 1% ~1.5%.
GATHER_MAX_FRACTION = 0.3
# Rows gathered per BLAS call on the filtered path: 256 x 512 float32 = 512 KiB stays
# in L2; 512-4096 measured 15-30% slower, 128 no faster, and from 1024 rows OpenBLAS
# (at its default two threads) switched to threaded gemv, 20x slower at 100k rows.
GATHER_BLOCK_ROWS = 256
# Upper bound on the [rows, queries] score block of a batch search; it sets how many
# queries share one pass over the rows (64 queries at 500k rows).
SCORE_BUFFER_BYTES = 128 * 2**20
_FLOAT32_BYTES = 4


class Hit(NamedTuple):
    product_id: uuid.UUID
    score: float  # max over the product's rows (and over the query vectors) of the dot


class ProductIndex:
    """Exact max-over-rows product search over L2-normalised float32 rows.

    Build with :meth:`from_rows`. Masks are boolean arrays over products, aligned with
    :attr:`product_ids` (build them from a set of ids with :meth:`mask_of`, or from
    per-product attribute arrays in :attr:`product_ids` order). Results are sorted by
    score descending, ties broken by product id ascending. Immutable: rebuild after a
    crawl. Concurrent searches are safe (nothing is mutated; BLAS releases the GIL).
    """

    def __init__(
        self,
        rows: FloatArray,
        product_ids: tuple[uuid.UUID, ...],
        row_counts: npt.NDArray[np.int64],
        id_rank: npt.NDArray[np.int64],
        *,
        gather_max_fraction: float = GATHER_MAX_FRACTION,
        gather_block_rows: int = GATHER_BLOCK_ROWS,
        score_buffer_bytes: int = SCORE_BUFFER_BYTES,
    ) -> None:
        """Take rows already in the slot-major layout; use :meth:`from_rows` instead."""
        self._rows = rows
        self._product_ids = product_ids
        self._position = {pid: p for p, pid in enumerate(product_ids)}
        self._row_counts = row_counts  # per product position, non-increasing
        self._id_rank = id_rank  # rank of each position's id in id order: the tie-break
        self._slot_sizes, self._slot_offsets = _slots(row_counts)
        self._gather_max_fraction = gather_max_fraction
        self._gather_block_rows = gather_block_rows
        self._score_buffer_bytes = score_buffer_bytes

    @classmethod
    def from_rows(
        cls,
        vectors: npt.ArrayLike,
        product_ids: Sequence[uuid.UUID],
        *,
        gather_max_fraction: float = GATHER_MAX_FRACTION,
        gather_block_rows: int = GATHER_BLOCK_ROWS,
        score_buffer_bytes: int = SCORE_BUFFER_BYTES,
    ) -> ProductIndex:
        """Index ``vectors`` [N, D] (row i an image of ``product_ids[i]``).

        Rows are copied as float32 and L2-normalised (a zero row is an error), so a
        score is a cosine whenever the query is normalised too.
        """
        matrix = np.asarray(vectors, dtype=np.float32)  # no copy when already float32
        if matrix.ndim != 2 or matrix.shape[0] != len(product_ids):
            raise ValueError(
                f"vectors must be [N, D] with N = len(product_ids) = {len(product_ids)}, "
                f"got shape {matrix.shape}"
            )
        rank_of_row, first_row = _id_ranks(product_ids)
        counts = np.bincount(rank_of_row, minlength=len(first_row)).astype(np.int64)
        # Position order: more rows first (the slot prefix property), then id.
        rank_at = np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)
        position_of_rank = np.empty_like(rank_at)
        position_of_rank[rank_at] = np.arange(len(rank_at))
        row_counts = counts[rank_at]
        destination = _slot_major_rows(rank_of_row, position_of_rank, row_counts)
        source = np.empty_like(destination)
        source[destination] = np.arange(len(destination))
        # np.take, not matrix[source]: 7x faster for a million rows (numpy 2.4).
        rows = np.take(matrix, source, axis=0)
        _normalise_in_place(rows)
        return cls(
            rows,
            tuple(product_ids[first_row[r]] for r in rank_at),
            row_counts,
            rank_at,
            gather_max_fraction=gather_max_fraction,
            gather_block_rows=gather_block_rows,
            score_buffer_bytes=score_buffer_bytes,
        )

    # --- what it holds ---------------------------------------------------------------

    @property
    def product_ids(self) -> tuple[uuid.UUID, ...]:
        """The products, in mask order: ``mask[p]`` allows ``product_ids[p]``."""
        return self._product_ids

    @property
    def dim(self) -> int:
        return int(self._rows.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self._rows.shape[0])

    @property
    def n_products(self) -> int:
        return len(self._product_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held (the id dictionary and UUID objects not counted)."""
        arrays = (self._rows, self._row_counts, self._id_rank, self._slot_sizes)
        return sum(a.nbytes for a in arrays)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._position

    def mask_of(self, allowed: Iterable[uuid.UUID]) -> ProductMask:
        """The mask allowing exactly ``allowed``; ids not in the index are ignored."""
        mask = np.zeros(self.n_products, dtype=np.bool_)
        positions = [p for pid in allowed if (p := self._position.get(pid)) is not None]
        mask[positions] = True
        return mask

    # --- searching --------------------------------------------------------------------

    def search(
        self, query: npt.ArrayLike, k: int, product_mask: ProductMask | None = None
    ) -> list[Hit]:
        """Top-``k`` allowed products for ``query``, best first.

        ``query`` is one vector [D] or several [Q, D] searched as one: then a product
        scores the max over query vectors and its rows ("like any of these images").
        Fewer than ``k`` hits only when fewer products are allowed.
        """
        queries = self._as_queries(query)
        self._check(k, product_mask)
        scores, positions = self._product_scores(queries, product_mask)
        return self._top_k(_max_over_queries(scores), positions, k)

    def search_batch(
        self, queries: npt.ArrayLike, k: int, product_mask: ProductMask | None = None
    ) -> list[list[Hit]]:
        """Independent top-``k`` for each row of ``queries`` [Q, D], one list per query.

        ``product_mask`` is one mask [P] shared by all queries or one per query [Q, P].
        Queries share passes over the rows (BLAS matrix-matrix), several times cheaper
        per query than calling :meth:`search` in a loop.
        """
        batch = self._as_queries(queries)
        self._check(k, product_mask, batch=len(batch))
        shared = None if product_mask is None or product_mask.ndim == 2 else product_mask
        per_query_bytes = _FLOAT32_BYTES * max(self.n_rows, 1)
        block = max(1, self._score_buffer_bytes // per_query_bytes)
        results: list[list[Hit]] = []
        for start in range(0, len(batch), block):
            scores, positions = self._product_scores(batch[start : start + block], shared)
            by_query = np.ascontiguousarray(scores.T)  # [Q, P']: one contiguous row per query
            if shared is None and product_mask is not None:
                by_query[~product_mask[start : start + len(by_query)]] = -np.inf
            results.extend(self._top_k(row, positions, k) for row in by_query)
        return results

    def neighbours_of(
        self, product_id: uuid.UUID, k: int, product_mask: ProductMask | None = None
    ) -> list[Hit]:
        """The ``k`` allowed products most like ``product_id``, itself excluded.

        Its rows are the queries (max over its images and the other product's images):
        the in-stock alternatives to a sold-out product. KeyError for an unknown id.
        """
        position = self._position[product_id]
        self._check(k, product_mask)
        queries = self._rows[self._slot_offsets[: self._row_counts[position]] + position]
        allowed = (
            np.ones(self.n_products, np.bool_) if product_mask is None else product_mask.copy()
        )
        allowed[position] = False
        scores, positions = self._product_scores(queries, allowed)
        return self._top_k(_max_over_queries(scores), positions, k)

    # --- internals --------------------------------------------------------------------

    def _as_queries(self, query: npt.ArrayLike) -> FloatArray:
        queries = np.atleast_2d(np.asarray(query, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [D] or [Q, D] with D = {self.dim}")
        return queries

    def _check(self, k: int, mask: ProductMask | None, batch: int | None = None) -> None:
        """Reject a negative k or a mask of the wrong type or shape ([P], or [Q, P] in a batch)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if mask is None:
            return
        shapes = {(self.n_products,)} | ({(batch, self.n_products)} if batch else set())
        if mask.dtype != np.bool_ or mask.shape not in shapes:
            raise ValueError(f"product_mask must be bool of shape {sorted(shapes)}")

    def _product_scores(
        self, queries: FloatArray, allowed: ProductMask | None
    ) -> tuple[FloatArray, IndexArray | None]:
        """Max-over-rows scores [P', Q] and the positions they belong to (None: all P).

        A narrow mask reads only the allowed products' rows; a wide one reads every row
        and sets disallowed products to -inf, which top-k then never picks.
        """
        n_allowed = self.n_products if allowed is None else int(np.count_nonzero(allowed))
        if allowed is None or n_allowed > self._gather_max_fraction * self.n_products:
            best = _max_over_slots(self._score_all_rows(queries), self._slot_sizes)
            if allowed is not None:
                best[~allowed] = -np.inf
            return best, None
        positions = np.flatnonzero(allowed)
        # The allowed products having a j-th row are a prefix of the sorted positions.
        sizes = np.searchsorted(positions, self._slot_sizes)
        rows = np.concatenate(
            [start + positions[:n] for start, n in zip(self._slot_offsets, sizes, strict=True)]
            or [np.empty(0, np.intp)]
        )
        return _max_over_slots(self._score_rows(queries, rows), sizes), positions

    def _score_all_rows(self, queries: FloatArray) -> FloatArray:
        if len(queries) == 1:  # matrix-vector: BLAS gemv, no [N, 1] gemm
            return (self._rows @ queries[0])[:, None]
        return self._rows @ queries.T

    def _score_rows(self, queries: FloatArray, rows: IndexArray) -> FloatArray:
        """Scores [len(rows), Q] of a subset of rows, gathered a cache-sized block at a time."""
        out = np.empty((len(rows), len(queries)), np.float32)
        transposed = queries.T
        step = self._gather_block_rows
        for start in range(0, len(rows), step):
            block = np.take(self._rows, rows[start : start + step], axis=0)
            np.matmul(block, transposed, out=out[start : start + step])
        return out

    def _top_k(self, scores: FloatArray, positions: IndexArray | None, k: int) -> list[Hit]:
        """The k best finite scores, ties (also at the k-th place) broken by id."""
        n_valid = int(np.count_nonzero(np.isfinite(scores)))
        take = min(k, n_valid)
        if take == 0:
            return []
        if take < len(scores):
            kth = scores[np.argpartition(scores, len(scores) - take)[len(scores) - take :]].min()
            candidates = np.flatnonzero(scores >= kth)  # every product tied at the k-th
        else:
            candidates = np.arange(len(scores))
        where = candidates if positions is None else positions[candidates]
        order = np.lexsort((self._id_rank[where], -scores[candidates]))[:take]
        return [Hit(self._product_ids[where[i]], float(scores[candidates[i]])) for i in order]


def _id_ranks(product_ids: Sequence[uuid.UUID]) -> tuple[IndexArray, IndexArray]:
    """Each row's product rank in id order, and the first row of each ranked product.

    Sorting the 16 id bytes as two big-endian words is UUID order, vectorised (a
    Python sort of a million UUID objects takes seconds).
    """
    words = np.frombuffer(b"".join(pid.bytes for pid in product_ids), dtype=">u8")
    words = words.reshape(-1, 2).astype(np.uint64)
    by_id = np.lexsort((np.arange(len(words)), words[:, 1], words[:, 0]))
    ordered = words[by_id]
    starts = np.ones(len(ordered), np.bool_)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    rank_of_row = np.empty(len(words), np.intp)
    rank_of_row[by_id] = np.cumsum(starts) - 1
    return rank_of_row, by_id[starts]


def _slot_major_rows(
    rank_of_row: IndexArray,
    position_of_rank: npt.NDArray[np.int64],
    row_counts: npt.NDArray[np.int64],
) -> IndexArray:
    """Where each input row goes: slot j of the product at position p -> offset_j + p."""
    position = position_of_rank[rank_of_row]
    # A row's slot is how many earlier rows (input order) its product already has.
    by_position = np.argsort(position, kind="stable")
    first_of_group = np.concatenate([[0], np.cumsum(row_counts)[:-1]])
    slot = np.empty(len(position), np.intp)
    slot[by_position] = np.arange(len(position)) - first_of_group[position[by_position]]
    _, offsets = _slots(row_counts)
    return np.asarray(offsets[slot] + position, dtype=np.intp)


def _slots(row_counts: npt.NDArray[np.int64]) -> tuple[IndexArray, IndexArray]:
    """Size n_j and first row of each slot j: n_j products have more than j rows."""
    more_than = np.bincount(row_counts)[::-1].cumsum()[::-1]
    sizes = more_than[1:].astype(np.intp)
    offsets = (np.cumsum(sizes) - sizes).astype(np.intp)
    return sizes, offsets


def _normalise_in_place(rows: FloatArray) -> None:
    # einsum, not np.linalg.norm: no temporary the size of the matrix.
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("every row must be a finite, non-zero vector")
    rows /= norms[:, None]


def _max_over_queries(scores: FloatArray) -> FloatArray:
    """[P, Q] -> [P]: a product's best score over the query vectors."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    return scores.max(axis=1, initial=-np.inf)


def _max_over_slots(row_scores: FloatArray, slot_sizes: IndexArray) -> FloatArray:
    """Per-product max of slot-major row scores [R, Q] -> [slot_sizes[0], Q]."""
    if len(slot_sizes) == 0:
        return np.empty((0, row_scores.shape[1]), np.float32)
    best = row_scores[: slot_sizes[0]].copy()
    offset = int(slot_sizes[0])
    for size in slot_sizes[1:]:
        np.maximum(best[:size], row_scores[offset : offset + size], out=best[:size])
        offset += int(size)
    return best
