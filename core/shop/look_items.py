"""The products of a look: what each kept image was matched to, read back for shoppers.

Look items are written with the generation's success (same transaction as its
outputs). Reading them joins the products as they are *now*: a product that
sold out or went since the look was made is still returned, flagged
``sold_out``, with up to k in-stock alternatives (its nearest in-stock
neighbours in the index, same filters as the look).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog import queries
from core.db.catalog_models import CatalogImage, Product
from core.db.shop_models import LookItem
from core.jobs.specs import ProductFilters
from core.shop.catalog_index import CatalogIndex, in_stock_hits
from core.shop.regions import REGIONS


@dataclass(frozen=True)
class LinkedProduct:
    product: Product
    first_image: CatalogImage | None
    score: float


@dataclass(frozen=True)
class LookItemView:
    region: str
    rank: int
    item: LinkedProduct
    alternatives: list[LinkedProduct] = field(default_factory=list)

    @property
    def sold_out(self) -> bool:
        p = self.item.product
        return not p.available or p.gone_at is not None


async def output_items(session: AsyncSession, output_id: uuid.UUID) -> list[LookItem]:
    query = select(LookItem).where(col(LookItem.output_id) == output_id)
    rows = list((await session.exec(query)).all())
    order = {name: i for i, name in enumerate(REGIONS)}
    return sorted(rows, key=lambda r: (order.get(r.region, len(order)), r.rank))


async def linked_products(
    session: AsyncSession, scored: list[tuple[uuid.UUID, float]]
) -> list[LinkedProduct]:
    """The products of (id, score) pairs, in that order, with their first images."""
    ids = [pid for pid, _ in scored]
    products = await queries.products_by_id(session, ids)
    images = await queries.first_images(ids, session)
    return [
        LinkedProduct(products[pid], images.get(pid), score)
        for pid, score in scored
        if pid in products
    ]


async def look_item_views(
    session: AsyncSession,
    output_id: uuid.UUID,
    index: CatalogIndex | None,
    filters: ProductFilters,
    alternatives_k: int,
) -> list[LookItemView]:
    """The output's look items, best first per region, with stand-ins for sold-out ones."""
    items = await output_items(session, output_id)
    linked = await linked_products(session, [(i.product_id, i.score) for i in items])
    by_id = {lp.product.id: lp for lp in linked}
    views = []
    for item in items:
        lp = by_id.get(item.product_id)
        if lp is None:
            continue
        view = LookItemView(item.region, item.rank, lp)
        if view.sold_out and index is not None:
            hits = index.alternatives(item.product_id, filters, alternatives_k)
            hits = await in_stock_hits(session, hits, alternatives_k)
            alternatives = await linked_products(session, [(h.product_id, h.score) for h in hits])
            view = LookItemView(item.region, item.rank, lp, alternatives)
        views.append(view)
    return views
