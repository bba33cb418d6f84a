"""The catalog index of one process: the active version's product embeddings in
memory, with what filters need to know about each product.

Loaded from Postgres (``product_embedding`` + ``product``) and reloaded when a
cheap fingerprint query says the catalog or the active version changed, at most
every ``index_check_s``. Stock is re-checked in Postgres for every result list
(``in_stock``), so a product that sold out a moment ago is never returned as in
stock, however fresh the index. Torch-free: the API searches with it too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog.queries import products_by_id
from core.db.catalog_models import Product
from core.jobs.specs import ProductFilters
from core.shop import feature_store
from core.shop.vector_index import Hit, ProductIndex
from core.shop.versions import active_version

# Results are asked of the index with this much slack, so that products the
# Postgres re-check drops (sold out since the last reload) leave k behind.
OVERFETCH = 2

_FINGERPRINT = text(
    "SELECT (SELECT count(*) FROM product_embedding WHERE model_id = :model),"
    " (SELECT max(created_at) FROM product_embedding WHERE model_id = :model),"
    " count(*) FILTER (WHERE available AND gone_at IS NULL), max(changed_at), max(gone_at)"
    " FROM product"
)


@dataclass(frozen=True)
class ProductFacts:
    """Per product of the index, aligned with ``CatalogIndex.product_ids``."""

    in_stock: np.ndarray  # bool
    designer: np.ndarray  # lower-cased names (object array)
    categories: list[frozenset[str]]  # lower-cased levels of the path
    price: np.ndarray  # float64, NaN where the shop shows none
    currency: np.ndarray  # object array, "" where none


class CatalogIndex:
    def __init__(
        self, model_id: uuid.UUID, index: ProductIndex, product_ids: list[uuid.UUID],
        facts: ProductFacts, fingerprint: tuple[Any, ...],
    ) -> None:  # fmt: skip
        self.model_id = model_id
        self.index = index
        self.product_ids = product_ids
        self.position = {pid: i for i, pid in enumerate(product_ids)}
        self.facts = facts
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.product_ids)

    def mask(self, filters: ProductFilters) -> np.ndarray:
        """In-stock products that pass the filters, as a bool per product."""
        f, facts = filters, self.facts
        keep = facts.in_stock.copy()
        if f.designer:
            keep &= facts.designer == f.designer.lower()
        if f.category:
            wanted = f.category.lower()
            keep &= np.fromiter((wanted in c for c in facts.categories), bool, len(keep))
        with np.errstate(invalid="ignore"):  # NaN prices compare False: filtered out
            if f.min_price is not None:
                keep &= facts.price >= float(f.min_price)
            if f.max_price is not None:
                keep &= facts.price <= float(f.max_price)
        if f.currency:
            keep &= facts.currency == f.currency.upper()
        return keep

    def search(self, query: np.ndarray, filters: ProductFilters, k: int) -> list[Hit]:
        if not len(self):
            return []
        return self.index.search(query, k * OVERFETCH, self.mask(filters))

    def alternatives(self, product_id: uuid.UUID, filters: ProductFilters, k: int) -> list[Hit]:
        """In-stock products nearest to one (a sold-out product's stand-ins)."""
        if product_id not in self.position:
            return []
        return self.index.neighbours_of(product_id, k * OVERFETCH, self.mask(filters))


async def _fingerprint(session: AsyncSession, model_id: uuid.UUID) -> tuple[Any, ...]:
    row = (await session.execute(_FINGERPRINT, {"model": model_id})).one()
    return (model_id, *row)


async def _facts(session: AsyncSession, product_ids: list[uuid.UUID]) -> ProductFacts:
    rows = await products_by_id(session, product_ids)
    ordered = [rows[pid] for pid in product_ids]
    return ProductFacts(
        in_stock=np.array([r.available and r.gone_at is None for r in ordered], dtype=bool),
        designer=np.array([r.designer.lower() for r in ordered], dtype=object),
        categories=[frozenset(c.lower() for c in r.category_path) for r in ordered],
        price=np.array(
            [float(r.price) if isinstance(r.price, Decimal) else np.nan for r in ordered]
        ),
        currency=np.array([r.currency or "" for r in ordered], dtype=object),
    )


async def load_index(session: AsyncSession, profile: str) -> CatalogIndex | None:
    """The active version's index, or None when no version is active yet."""
    version = await active_version(session, profile)
    if version is None:
        return None
    fingerprint = await _fingerprint(session, version.id)
    row_products, vectors = await feature_store.product_embeddings(session, version.id)
    index = ProductIndex.from_rows(vectors, row_products)
    product_ids = list(index.product_ids)  # the order its masks follow
    return CatalogIndex(
        version.id, index, product_ids, await _facts(session, product_ids), fingerprint
    )


class IndexHolder:
    """A process's index, reloaded when Postgres says it changed."""

    def __init__(self, profile: str, check_every_s: float) -> None:
        self.profile = profile
        self.check_every_s = check_every_s
        self._index: CatalogIndex | None = None
        self._checked = -float("inf")
        self._lock = asyncio.Lock()

    async def current(self, session: AsyncSession) -> CatalogIndex | None:
        async with self._lock:
            if time.monotonic() - self._checked < self.check_every_s:
                return self._index
            self._checked = time.monotonic()
            version = await active_version(session, self.profile)
            if version is None:
                self._index = None
            elif self._index is None or self._index.fingerprint != await _fingerprint(
                session, version.id
            ):
                self._index = await load_index(session, self.profile)
            return self._index


async def in_stock(session: AsyncSession, product_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of the products are available and listed right now."""
    if not product_ids:
        return set()
    query = select(Product.id).where(
        col(Product.id).in_(product_ids), col(Product.available), col(Product.gone_at).is_(None)
    )
    return set((await session.execute(query)).scalars().all())


async def in_stock_hits(session: AsyncSession, hits: list[Hit], k: int) -> list[Hit]:
    """The first ``k`` hits still in stock, in order."""
    stocked = await in_stock(session, [h.product_id for h in hits])
    return [h for h in hits if h.product_id in stocked][:k]
