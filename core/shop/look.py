"""What shop-the-look does for one generation, over any encoder and the index.

1. ``ground``: the user's prompt matched to in-stock products (the request's
   filters), the best ones' descriptors appended while the prompt fits.
2. ``rerank``: every candidate image scored (prompt match, catalog match,
   likeness to the subject's photos); the best ``keep`` survive.
3. ``match``: each kept image, whole and by garment region, to its top-k
   in-stock products, as look-item rows to commit with the outputs.

The encoder is whatever the process holds: the GPU worker's torch model or an
onnxruntime export; both give L2-normalised embeddings of one version.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog.queries import products_by_id
from core.db.shop_models import LookItem
from core.jobs.specs import ProductFilters
from core.shop.catalog_index import CatalogIndex, Hit, in_stock_hits
from core.shop.grounding import GroundedPrompt, GroundingProduct, enrich_prompt
from core.shop.regions import REGIONS, region_crops
from core.shop.rerank import CandidateScores, RerankWeights, score_candidates


class Encoder(Protocol):
    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


async def ground(
    session: AsyncSession,
    index: CatalogIndex,
    query: np.ndarray,
    prompt: str,
    filters: ProductFilters,
    products: int,
    count_tokens: Callable[[str], int],
) -> GroundedPrompt:
    """``prompt`` enriched with the descriptors of the in-stock products nearest to
    ``query`` (the user's words embedded by the text tower), as many as fit."""
    hits = await in_stock_hits(session, index.search(query, filters, products), products)
    rows = await products_by_id(session, [h.product_id for h in hits])
    candidates = [
        GroundingProduct(str(h.product_id), rows[h.product_id].designer,
                         rows[h.product_id].name, h.score)
        for h in hits
        if h.product_id in rows
    ]  # fmt: skip
    return enrich_prompt(prompt, candidates, count_tokens)


def rerank(
    encoder: Encoder,
    candidates: Sequence[Image.Image],
    prompt: str,
    photos: Sequence[Image.Image],
    index: CatalogIndex | None,
    filters: ProductFilters,
    weights: RerankWeights,
) -> list[CandidateScores]:
    """Every candidate's scores, best first (see ``core.shop.rerank``).

    Catalog match uses the in-memory index only (stock as of its last reload):
    it ranks images, it links nothing, so a product sold out a second ago
    changes no link. With no index the term is 0 for every candidate.
    """
    images = encoder.encode_images(list(candidates))
    query = encoder.encode_texts([prompt])[0]
    subject = encoder.encode_images(list(photos)) if photos else np.zeros((0, images.shape[1]))
    best = np.zeros(len(images), dtype=np.float32)
    if index is not None and len(index):
        for i, vector in enumerate(images):
            hits = index.search(vector, filters, 1)
            best[i] = hits[0].score if hits else 0.0
    return score_candidates(images, query, best, subject, weights)


@dataclass(frozen=True)
class RegionMatches:
    region: str
    hits: list[Hit]


def region_images(image: Image.Image, side: int) -> list[Image.Image]:
    """The crops ``match`` expects embedded, in ``REGIONS`` order."""
    crops = region_crops(image, side)
    return [crops[name] for name in REGIONS]


async def match(
    session: AsyncSession,
    index: CatalogIndex,
    region_vectors: np.ndarray,
    filters: ProductFilters,
    k: int,
) -> list[RegionMatches]:
    """Top-k in-stock products for the whole image and each garment region, from
    the embeddings of ``region_images`` (one row per region, in order)."""
    matches = []
    for name, vector in zip(REGIONS, region_vectors, strict=True):
        hits = await in_stock_hits(session, index.search(vector, filters, k), k)
        matches.append(RegionMatches(name, hits))
    return matches


def look_item_rows(
    output_id: uuid.UUID, matches: list[RegionMatches], model_id: uuid.UUID
) -> list[LookItem]:
    return [
        LookItem(
            output_id=output_id,
            product_id=hit.product_id,
            region=m.region,
            rank=rank,
            score=hit.score,
            model_id=model_id,
        )
        for m in matches
        for rank, hit in enumerate(m.hits)
    ]
