"""The catalog index: exact max-over-rows top-k, masks before top-k, neighbours, no torch."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import numpy.typing as npt
import pytest

from core.shop.vector_index import Hit, ProductIndex

DIM = 16


def _ids(n: int, seed: int) -> list[uuid.UUID]:
    rng = np.random.default_rng(seed)
    return [uuid.UUID(bytes=rng.bytes(16)) for _ in range(n)]


def _catalog(
    n_products: int, seed: int = 0
) -> tuple[npt.NDArray[np.float32], list[uuid.UUID], list[uuid.UUID]]:
    """1-5 images per product, rows shuffled so a product's rows are not adjacent."""
    rng = np.random.default_rng(seed)
    products = _ids(n_products, seed)
    row_ids = [pid for pid in products for _ in range(int(rng.integers(1, 6)))]
    order = rng.permutation(len(row_ids))
    vectors = rng.standard_normal((len(row_ids), DIM)).astype(np.float32)
    return vectors[order], [row_ids[i] for i in order], products


def _reference(
    vectors: npt.NDArray[np.float32],
    row_ids: list[uuid.UUID],
    queries: npt.NDArray[np.float32],
    k: int,
    allowed: set[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """Brute force in float64: every row, max per product, filter, full sort."""
    unit = vectors.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    row_scores = (unit @ np.atleast_2d(queries).astype(np.float64).T).max(axis=1)
    best: dict[uuid.UUID, float] = {}
    for pid, score in zip(row_ids, row_scores, strict=True):
        if allowed is None or pid in allowed:
            best[pid] = max(best.get(pid, -np.inf), float(score))
    return sorted(best, key=lambda pid: (-best[pid], pid))[:k]


def test_search_is_the_exact_top_k_with_max_over_rows() -> None:
    vectors, row_ids, _ = _catalog(300)
    index = ProductIndex.from_rows(vectors, row_ids)
    assert (index.n_rows, index.n_products, index.dim) == (len(row_ids), 300, DIM)
    queries = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    for query in queries:
        hits = index.search(query, 10)
        assert [h.product_id for h in hits] == _reference(vectors, row_ids, query, 10)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_product_score_is_its_best_row_not_a_sum_or_mean() -> None:
    query = np.eye(DIM, dtype=np.float32)[0]
    one, two = _ids(2, 2)
    near = np.eye(DIM, dtype=np.float32)[0] + 0.1 * np.eye(DIM, dtype=np.float32)[1]
    # `one` has a single close image and a far one; `two` two middling images.
    vectors = np.stack([near, -query, query + np.eye(DIM)[2], query + np.eye(DIM)[3]])
    index = ProductIndex.from_rows(vectors, [one, one, two, two])
    hits = index.search(query, 2)
    assert [h.product_id for h in hits] == [one, two]
    assert hits[0].score == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert hits[1].score == pytest.approx(1 / np.sqrt(2), abs=1e-6)


def test_mask_is_applied_before_top_k() -> None:
    vectors, row_ids, products = _catalog(400, seed=3)
    rng = np.random.default_rng(4)
    query = rng.standard_normal(DIM).astype(np.float32)
    index = ProductIndex.from_rows(vectors, row_ids)
    # 5% allowed takes the gathered path, 60% the full pass with -inf for the rest.
    for fraction in (0.05, 0.6):
        allowed = set(rng.choice(np.array(products), int(fraction * 400), replace=False))
        hits = index.search(query, 10, index.mask_of(allowed))
        assert len(hits) == 10
        assert [h.product_id for h in hits] == _reference(vectors, row_ids, query, 10, allowed)


def test_k_larger_than_the_allowed_set_returns_all_allowed() -> None:
    vectors, row_ids, products = _catalog(100, seed=5)
    index = ProductIndex.from_rows(vectors, row_ids)
    allowed = set(products[:3])
    query = vectors[0]
    hits = index.search(query, 50, index.mask_of(allowed))
    assert [h.product_id for h in hits] == _reference(vectors, row_ids, query, 50, allowed)
    assert len(hits) == 3
    assert index.search(query, 50, index.mask_of([])) == []
    assert len(index.search(query, 500)) == 100


def test_ties_are_broken_by_product_id_whatever_the_row_order() -> None:
    ids = _ids(6, 6)
    axis = np.eye(DIM, dtype=np.float32)
    vectors = np.stack([axis[0]] * 5 + [axis[1]])  # five products tied at score 1
    for order in (list(range(6)), list(reversed(range(6)))):
        rows = [vectors[i] for i in order]
        row_ids = [ids[i] for i in order]
        hits = ProductIndex.from_rows(np.stack(rows), row_ids).search(axis[0], 3)
        assert [h.product_id for h in hits] == sorted(ids[:5])[:3]
        assert [h.score for h in hits] == [1.0, 1.0, 1.0]


def test_empty_index_and_k_zero() -> None:
    index = ProductIndex.from_rows(np.empty((0, DIM), np.float32), [])
    assert index.n_products == 0
    assert index.search(np.ones(DIM), 5) == []
    assert index.search_batch(np.ones((2, DIM)), 5) == [[], []]
    vectors, row_ids, _ = _catalog(10)
    assert ProductIndex.from_rows(vectors, row_ids).search(vectors[0], 0) == []


def test_neighbours_of_excludes_the_product_and_respects_the_mask() -> None:
    vectors, row_ids, products = _catalog(200, seed=7)
    index = ProductIndex.from_rows(vectors, row_ids)
    sold_out = products[0]
    own_rows = vectors[[i for i, pid in enumerate(row_ids) if pid == sold_out]]
    own_rows = own_rows / np.linalg.norm(own_rows, axis=1, keepdims=True)
    others = set(products) - {sold_out}
    hits = index.neighbours_of(sold_out, 5)
    assert sold_out not in {h.product_id for h in hits}
    assert [h.product_id for h in hits] == _reference(vectors, row_ids, own_rows, 5, others)
    in_stock = set(products[1:21])
    mask = index.mask_of(in_stock | {sold_out})  # itself allowed by the filter: still excluded
    hits = index.neighbours_of(sold_out, 5, mask)
    assert [h.product_id for h in hits] == _reference(vectors, row_ids, own_rows, 5, in_stock)
    with pytest.raises(KeyError):
        index.neighbours_of(uuid.UUID(int=0), 5)


def test_batch_matches_single_queries_with_shared_and_per_query_masks() -> None:
    vectors, row_ids, products = _catalog(300, seed=8)
    # A small score buffer forces several query blocks.
    index = ProductIndex.from_rows(vectors, row_ids, score_buffer_bytes=4 * len(row_ids) * 3)
    queries = np.random.default_rng(9).standard_normal((7, DIM)).astype(np.float32)
    shared = index.mask_of(products[::10])
    per_query = np.random.default_rng(10).random((7, index.n_products)) < 0.5
    for mask in (None, shared):
        single = [index.search(q, 8, mask) for q in queries]
        _assert_same_hits(index.search_batch(queries, 8, mask), single)
    single = [index.search(q, 8, m) for q, m in zip(queries, per_query, strict=True)]
    _assert_same_hits(index.search_batch(queries, 8, per_query), single)


def _assert_same_hits(batch: list[list[Hit]], single: list[list[Hit]]) -> None:
    # Matrix-matrix and matrix-vector BLAS may differ in the last bits of a score.
    assert [[h.product_id for h in hits] for hits in batch] == [
        [h.product_id for h in hits] for hits in single
    ]
    for got, want in zip(batch, single, strict=True):
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)


def test_several_query_vectors_score_the_max_over_them() -> None:
    vectors, row_ids, _ = _catalog(150, seed=11)
    index = ProductIndex.from_rows(vectors, row_ids)
    queries = np.random.default_rng(12).standard_normal((3, DIM)).astype(np.float32)
    hits = index.search(queries, 10)
    assert [h.product_id for h in hits] == _reference(vectors, row_ids, queries, 10)


def test_bad_inputs_are_rejected() -> None:
    vectors, row_ids, _ = _catalog(20)
    with pytest.raises(ValueError, match="shape"):
        ProductIndex.from_rows(vectors, row_ids[:-1])
    zero = vectors.copy()
    zero[0] = 0
    with pytest.raises(ValueError, match="non-zero"):
        ProductIndex.from_rows(zero, row_ids)
    index = ProductIndex.from_rows(vectors, row_ids)
    with pytest.raises(ValueError, match="D = 16"):
        index.search(np.ones(DIM + 1), 3)
    with pytest.raises(ValueError, match="product_mask"):
        index.search(vectors[0], 3, np.ones(index.n_products, np.int8))
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[0], -1)


def test_importing_the_index_leaves_torch_unimported() -> None:
    code = (
        "import sys, core.shop.vector_index; "
        "print([m for m in ('torch', 'open_clip', 'transformers', 'diffusers', 'faiss') "
        "if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
