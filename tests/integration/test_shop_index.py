"""The catalog index on real Postgres: versions, stored vectors, stock, look items.

Vectors are made by hand here (one axis per product family), so what is tested
is the index and its stock rules, not a model.
"""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.catalog_models import Product
from core.db.engine import session_scope
from core.db.models import Account, utcnow
from core.db.shop_models import ClipModel, ClipModelStatus, LookItem
from core.jobs.specs import ProductFilters
from core.shop import feature_store
from core.shop.catalog_index import IndexHolder, in_stock_hits, load_index
from core.shop.feature_store import ProductImageRow
from core.shop.look_items import look_item_views
from core.shop.versions import activate_if_better, active_version, create_base_version
from tests.integration.generated_rows import add_generated_output

Sessions = async_sessionmaker[AsyncSession]
DIM = 8
PROFILE = "tiny"
# (designer, name, category, price, currency, axis of its embedding)
CATALOG = [
    ("Valentino", "Red silk dress", "Dresses", "1200.00", "EUR", 0),
    ("Valentino", "Crimson gown", "Dresses", "3400.00", "EUR", 0),
    ("Prada", "Black boots", "Boots", "900.00", "EUR", 1),
    ("Prada", "Ankle boots", "Boots", "700.00", "GBP", 1),
    ("Loewe", "Wool coat", "Coats", "2500.00", "EUR", 2),
]


def axis(i: int, wobble: float = 0.0) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    v[(i + 3) % DIM] = wobble
    return v / np.linalg.norm(v)


@pytest.fixture
async def indexed(sessions: Sessions) -> tuple[ClipModel, list[Product]]:
    """Five products, two image embeddings each, under an active base version."""
    async with session_scope(sessions) as session:
        products = [
            Product(
                site="fixture", external_id=f"P{i}", url=f"https://shop.example/p/{i}",
                designer=d, name=n, category_path=["Women", c], price=Decimal(p), currency=cur,
                content_hash=str(i),
            )
            for i, (d, n, c, p, cur, _) in enumerate(CATALOG)
        ]  # fmt: skip
        session.add_all(products)
        await session.flush()
        version = await create_base_version(session, PROFILE, "tiny:test", None)
        assert version is not None
        pairs, vectors = [], []
        for i, product in enumerate(products):
            for view in range(2):
                pairs.append(ProductImageRow(product.id, f"{i}-{view}".ljust(64, "0")))
                vectors.append(axis(CATALOG[i][5], wobble=0.1 * (i + 1) + 0.05 * view))
        await feature_store.put_embeddings(session, version.id, pairs, np.stack(vectors))
    return version, products


async def test_search_ranks_in_stock_products_and_applies_filters_first(
    sessions: Sessions, indexed: tuple[ClipModel, list[Product]]
) -> None:
    _, products = indexed
    async with sessions() as session:
        index = await load_index(session, PROFILE)
        assert index is not None and len(index) == 5
        dresses = index.search(axis(0), ProductFilters(), 2)
        assert {h.product_id for h in dresses[:2]} == {products[0].id, products[1].id}
        # A narrow filter still gives its product, however far from the query.
        gbp = index.search(axis(0), ProductFilters(currency="gbp"), 3)
        assert [h.product_id for h in gbp] == [products[3].id]
        cheap = index.search(axis(0), ProductFilters(max_price=Decimal("1000")), 5)
        assert {h.product_id for h in cheap} == {products[2].id, products[3].id}
        by_designer = index.search(axis(1), ProductFilters(designer="loewe"), 5)
        assert [h.product_id for h in by_designer] == [products[4].id]


async def test_sold_out_and_gone_products_are_never_returned_as_in_stock(
    sessions: Sessions, indexed: tuple[ClipModel, list[Product]]
) -> None:
    _, products = indexed
    holder = IndexHolder(PROFILE, check_every_s=3600)  # a stale index on purpose
    async with sessions() as session:
        stale = await holder.current(session)
        assert stale is not None
    async with session_scope(sessions) as session:
        await session.execute(
            update(Product).where(col(Product.id) == products[0].id).values(available=False)
        )
        await session.execute(
            update(Product)
            .where(col(Product.id) == products[1].id)
            .values(available=False, gone_at=utcnow())
        )
    async with sessions() as session:
        # The stale index still holds them; the Postgres re-check drops them.
        hits = stale.search(axis(0), ProductFilters(), 5)
        assert products[0].id in {h.product_id for h in hits}
        checked = await in_stock_hits(session, hits, 5)
        assert {h.product_id for h in checked}.isdisjoint({products[0].id, products[1].id})
        # A fresh load knows, and the holder reloads once its fingerprint moves.
        fresh = await load_index(session, PROFILE)
        assert fresh is not None and fresh.fingerprint != stale.fingerprint
        top = fresh.search(axis(0), ProductFilters(), 5)
        assert {h.product_id for h in top}.isdisjoint({products[0].id, products[1].id})


async def test_stale_embeddings_of_gone_products_are_dropped(
    sessions: Sessions, indexed: tuple[ClipModel, list[Product]]
) -> None:
    version, products = indexed
    async with session_scope(sessions) as session:
        await session.execute(
            update(Product).where(col(Product.id) == products[4].id).values(gone_at=utcnow())
        )
        # No product_image rows exist in this fixture, so every row counts as an
        # image no longer shown: all are stale.
        dropped = await feature_store.drop_stale_embeddings(session, version.id)
    assert dropped == 10


async def test_look_items_survive_a_product_going_and_offer_alternatives(
    sessions: Sessions, indexed: tuple[ClipModel, list[Product]]
) -> None:
    version, products = indexed
    async with session_scope(sessions) as session:
        account = Account(name="shopper")
        session.add(account)
        await session.flush()
        output = await add_generated_output(session, account.id, "k", 64, 64)
        session.add(LookItem(output_id=output.id, product_id=products[2].id, region="feet",
                             rank=0, score=0.9, model_id=version.id))  # fmt: skip
    async with session_scope(sessions) as session:
        await session.execute(
            update(Product)
            .where(col(Product.id) == products[2].id)
            .values(available=False, gone_at=utcnow())
        )
    async with sessions() as session:
        index = await load_index(session, PROFILE)
        views = await look_item_views(session, output.id, index, ProductFilters(), 3)
    assert len(views) == 1
    view = views[0]
    assert view.sold_out and view.item.product.id == products[2].id
    # Its nearest in-stock neighbour is the other pair of boots.
    assert view.alternatives[0].product.id == products[3].id
    assert products[2].id not in {a.product.id for a in view.alternatives}


async def test_one_active_version_per_profile_and_activation_only_on_improvement(
    sessions: Sessions, indexed: tuple[ClipModel, list[Product]]
) -> None:
    base, _ = indexed
    async with session_scope(sessions) as session:
        assert await create_base_version(session, PROFILE, "tiny:test", None) is None
    with pytest.raises(IntegrityError):
        async with session_scope(sessions) as session:
            session.add(ClipModel(profile=PROFILE, base_id="x", status=ClipModelStatus.active))
    async with session_scope(sessions) as session:
        worse = ClipModel(profile=PROFILE, base_id="tiny:test")
        better = ClipModel(profile=PROFILE, base_id="tiny:test")
        session.add_all([worse, better])
    judged = {"judged_against": str(base.id), "active": {"t2i_r10": 0.5}}
    async with session_scope(sessions) as session:
        assert not await activate_if_better(
            session, worse, {**judged, "candidate": {"t2i_r10": 0.5}}
        )
    async with session_scope(sessions) as session:
        assert await activate_if_better(session, better, {**judged, "candidate": {"t2i_r10": 0.7}})
    async with sessions() as session:
        active = await active_version(session, PROFILE)
        assert active is not None and active.id == better.id
        assert (await session.get(ClipModel, worse.id)).status == ClipModelStatus.rejected  # type: ignore[union-attr]
        assert (await session.get(ClipModel, base.id)).status == ClipModelStatus.retired  # type: ignore[union-attr]
    # A candidate judged against the base, which is no longer active: stale, rejected.
    async with session_scope(sessions) as session:
        late = ClipModel(profile=PROFILE, base_id="tiny:test")
        session.add(late)
    async with session_scope(sessions) as session:
        assert not await activate_if_better(
            session, late, {**judged, "candidate": {"t2i_r10": 0.9}}
        )
    async with sessions() as session:
        row = await session.get(ClipModel, late.id)
        assert row is not None and "another version" in row.metrics["rejected_because"]  # type: ignore[index]
