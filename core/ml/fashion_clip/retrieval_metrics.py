"""Retrieval metrics over products: recall@K and MRR, text->image and image->text.

numpy only (no torch), so the API and the tests use it as they are.

The gallery is ranked by PRODUCT, as the shop's index returns them: a product's
score for a query is the best score of any of its gallery rows (any of its
images for text->image; its text, or best of its texts, for image->text). A
query's rank is its own product's place among all gallery products, ties
counted against it (so a constant embedding scores chance, not perfect).
R@K is the share of queries ranked K or better; MRR the mean of 1 / rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Queries scored per matrix product: 1024 queries x 100k gallery rows is 400 MB.
QUERY_CHUNK = 1024


@dataclass(frozen=True)
class RetrievalScores:
    recall: dict[int, float]  # K -> share of queries whose product ranks K or better
    mrr: float
    queries: int

    def as_dict(self) -> dict[str, float]:
        return {**{f"R@{k}": v for k, v in self.recall.items()}, "MRR": self.mrr}


def product_ranks(
    query_emb: np.ndarray,
    query_products: Sequence[Any] | np.ndarray,
    gallery_emb: np.ndarray,
    gallery_products: Sequence[Any] | np.ndarray,
    chunk: int = QUERY_CHUNK,
) -> np.ndarray:
    """1-based rank of each query's product among the gallery's products, each
    scored by its best row (dot product: pass normalised embeddings for cosine)."""
    gallery_labels = np.asarray(gallery_products)
    products, row_product = np.unique(gallery_labels, return_inverse=True)
    order = np.argsort(row_product, kind="stable")
    sorted_gallery = np.asarray(gallery_emb, dtype=np.float32)[order]
    starts = np.flatnonzero(np.r_[True, np.diff(row_product[order]) != 0])
    query_labels = np.asarray(query_products)
    own = np.searchsorted(products, query_labels)
    own = np.minimum(own, len(products) - 1)
    if len(products) == 0 or not np.array_equal(products[own], query_labels):
        raise ValueError("every query's product needs at least one row in the gallery")
    queries = np.asarray(query_emb, dtype=np.float32)
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        per_product = np.maximum.reduceat(queries[rows] @ sorted_gallery.T, starts, axis=1)
        own_score = per_product[np.arange(len(per_product)), own[rows]]
        ranks[rows] = (per_product >= own_score[:, None]).sum(axis=1)
    return ranks


def scores_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> RetrievalScores:
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return RetrievalScores({k: 0.0 for k in ks}, 0.0, 0)
    recall = {k: float((ranks <= k).mean()) for k in ks}
    return RetrievalScores(recall, float((1.0 / ranks).mean()), len(ranks))


def text_to_image(
    text_emb: np.ndarray,
    text_products: Sequence[Any] | np.ndarray,
    image_emb: np.ndarray,
    image_products: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Each text finds its product among the images' products (hit: any of its images)."""
    return scores_from_ranks(product_ranks(text_emb, text_products, image_emb, image_products), ks)


def image_to_text(
    image_emb: np.ndarray,
    image_products: Sequence[Any] | np.ndarray,
    text_emb: np.ndarray,
    text_products: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Each image finds its product among the texts' products (hit: the product's text)."""
    return scores_from_ranks(product_ranks(image_emb, image_products, text_emb, text_products), ks)


def retrieval_report(
    image_emb: np.ndarray,
    image_products: Sequence[Any] | np.ndarray,
    text_emb: np.ndarray,
    text_products: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, RetrievalScores]:
    """Both directions over one held-out set of products."""
    return {
        "text_to_image": text_to_image(text_emb, text_products, image_emb, image_products, ks),
        "image_to_text": image_to_text(image_emb, image_products, text_emb, text_products, ks),
    }


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms == 0, 1, norms)
