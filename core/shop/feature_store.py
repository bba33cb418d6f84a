"""Vectors in Postgres: base features per image and per product text, and each
version's product embeddings (the index's rows).

Vectors travel as float32 bytes. Reads come back as one numpy matrix, so the
index and the head-only re-embed never build a Python object per vector.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, exists
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.catalog_models import Product, ProductImage
from core.db.shop_models import ImageFeature, ProductEmbedding, TextFeature

FLOAT = np.dtype("<f4")
# Rows per INSERT: asyncpg caps a statement at 32,767 bind parameters.
WRITE_CHUNK = 2000


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=FLOAT).tobytes()


def to_matrix(blobs: Sequence[bytes], dim: int | None = None) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim or 0), dtype=FLOAT)
    return np.frombuffer(b"".join(blobs), dtype=FLOAT).reshape(len(blobs), -1).copy()


def text_sha256(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()


@dataclass(frozen=True)
class ProductImageRow:
    product_id: uuid.UUID
    image_sha256: str


async def live_product_images(session: AsyncSession) -> list[ProductImageRow]:
    """Every (product, image) of products the shop still lists (not gone)."""
    query = (
        select(ProductImage.product_id, ProductImage.image_sha256)
        .join(Product, col(Product.id) == col(ProductImage.product_id))
        .where(col(Product.gone_at).is_(None))
        .order_by(col(ProductImage.product_id), col(ProductImage.position))
    )
    return [ProductImageRow(p, s) for p, s in (await session.execute(query)).all()]


async def images_without_features(session: AsyncSession, base_id: str) -> list[str]:
    """Images of live products whose base features are not stored yet."""
    stored = exists().where(
        col(ImageFeature.base_id) == base_id,
        col(ImageFeature.image_sha256) == col(ProductImage.image_sha256),
    )
    query = (
        select(ProductImage.image_sha256)
        .join(Product, col(Product.id) == col(ProductImage.product_id))
        .where(col(Product.gone_at).is_(None), ~stored)
        .distinct()
    )
    return list((await session.execute(query)).scalars().all())


async def image_features(
    session: AsyncSession, base_id: str, shas: Sequence[str]
) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(shas), WRITE_CHUNK):
        chunk = list(shas[start : start + WRITE_CHUNK])
        rows = await session.execute(
            select(ImageFeature.image_sha256, ImageFeature.vector).where(
                col(ImageFeature.base_id) == base_id, col(ImageFeature.image_sha256).in_(chunk)
            )
        )
        for sha, blob in rows.all():
            found[sha] = np.frombuffer(blob, dtype=FLOAT)
    return found


async def put_image_features(
    session: AsyncSession, base_id: str, features: dict[str, np.ndarray]
) -> None:
    rows = [
        {"base_id": base_id, "image_sha256": sha, "vector": to_bytes(v)}
        for sha, v in features.items()
    ]
    for start in range(0, len(rows), WRITE_CHUNK):
        stmt = insert(ImageFeature).values(rows[start : start + WRITE_CHUNK])
        await session.execute(stmt.on_conflict_do_nothing())


async def text_features(
    session: AsyncSession, base_id: str, product_ids: Iterable[uuid.UUID] | None = None
) -> dict[uuid.UUID, tuple[str, np.ndarray]]:
    """product id -> (caption sha256, feature) for the base (all, or those asked)."""
    query = select(TextFeature.product_id, TextFeature.text_sha256, TextFeature.vector).where(
        col(TextFeature.base_id) == base_id
    )
    if product_ids is not None:
        query = query.where(col(TextFeature.product_id).in_(list(product_ids)))
    rows = (await session.execute(query)).all()
    return {pid: (sha, np.frombuffer(blob, dtype=FLOAT)) for pid, sha, blob in rows}


async def put_text_features(
    session: AsyncSession, base_id: str, features: dict[uuid.UUID, tuple[str, np.ndarray]]
) -> None:
    rows = [
        {"base_id": base_id, "product_id": pid, "text_sha256": sha, "vector": to_bytes(v)}
        for pid, (sha, v) in features.items()
    ]
    for start in range(0, len(rows), WRITE_CHUNK):
        stmt = insert(TextFeature).values(rows[start : start + WRITE_CHUNK])
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["base_id", "product_id"],
                set_={"text_sha256": stmt.excluded.text_sha256, "vector": stmt.excluded.vector},
            )
        )


async def embedded_pairs(session: AsyncSession, model_id: uuid.UUID) -> set[tuple[uuid.UUID, str]]:
    rows = await session.execute(
        select(ProductEmbedding.product_id, ProductEmbedding.image_sha256).where(
            col(ProductEmbedding.model_id) == model_id
        )
    )
    return {(pid, sha) for pid, sha in rows.all()}


async def put_embeddings(
    session: AsyncSession,
    model_id: uuid.UUID,
    pairs: Sequence[ProductImageRow],
    vectors: np.ndarray,
) -> None:
    rows = [
        {
            "model_id": model_id,
            "product_id": pair.product_id,
            "image_sha256": pair.image_sha256,
            "vector": to_bytes(vector),
        }
        for pair, vector in zip(pairs, vectors, strict=True)
    ]
    for start in range(0, len(rows), WRITE_CHUNK):
        stmt = insert(ProductEmbedding).values(rows[start : start + WRITE_CHUNK])
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["model_id", "product_id", "image_sha256"],
                set_={"vector": stmt.excluded.vector},
            )
        )


async def drop_stale_embeddings(session: AsyncSession, model_id: uuid.UUID) -> int:
    """Remove rows of gone products and of images a product no longer shows."""
    shown = exists().where(
        col(ProductImage.product_id) == col(ProductEmbedding.product_id),
        col(ProductImage.image_sha256) == col(ProductEmbedding.image_sha256),
    )
    gone = exists().where(
        col(Product.id) == col(ProductEmbedding.product_id), col(Product.gone_at).is_not(None)
    )
    result = await session.execute(
        delete(ProductEmbedding).where(col(ProductEmbedding.model_id) == model_id, ~shown | gone)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def product_embeddings(
    session: AsyncSession, model_id: uuid.UUID
) -> tuple[list[uuid.UUID], np.ndarray]:
    """Every row of the version's index: the product of each row, and the vectors."""
    rows = (
        await session.execute(
            select(ProductEmbedding.product_id, ProductEmbedding.vector)
            .where(col(ProductEmbedding.model_id) == model_id)
            .order_by(col(ProductEmbedding.product_id), col(ProductEmbedding.image_sha256))
        )
    ).all()
    return [pid for pid, _ in rows], to_matrix([blob for _, blob in rows])
