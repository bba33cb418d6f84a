"""Reading the catalog: product search with keyset pages, one product in full,
catalog images, recent crawl runs. Every account sees the same catalog."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, exists, func, literal_column, or_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.cursor import newest_first
from core.db.catalog_models import CatalogImage, CrawlRun, Product, ProductImage, ProductPrice
from core.errors import NotFound


@dataclass(frozen=True)
class ProductFilter:
    """Every field narrows the search; None means "any"."""

    designer: str | None = None  # case-insensitive, whole name
    category: str | None = None  # any level of the category path, case-insensitive
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    currency: str | None = None
    available: bool | None = None
    site: str | None = None
    q: str | None = None  # a substring of the name or description


@dataclass(frozen=True)
class ImageView:
    position: int
    source_url: str
    image: CatalogImage


@dataclass(frozen=True)
class ProductPage:
    products: Sequence[Product]
    # The first image of each product on the page that has one.
    first_images: dict[uuid.UUID, CatalogImage]
    next_cursor: str | None


@dataclass(frozen=True)
class ProductDetail:
    product: Product
    images: list[ImageView]
    prices: list[ProductPrice]  # oldest first


def _conditions(f: ProductFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if f.designer:
        conditions.append(func.lower(col(Product.designer)) == f.designer.lower())
    if f.category:
        # One element of the JSONB array equals the category, ignoring case.
        element = func.jsonb_array_elements_text(col(Product.category_path)).table_valued("value")
        conditions.append(
            exists(select(literal_column("1")).select_from(element)).where(
                func.lower(element.c.value) == f.category.lower()
            )
        )
    if f.min_price is not None:
        conditions.append(col(Product.price) >= f.min_price)
    if f.max_price is not None:
        conditions.append(col(Product.price) <= f.max_price)
    if f.currency:
        conditions.append(col(Product.currency) == f.currency.upper())
    if f.available is not None:
        conditions.append(col(Product.available) == f.available)
    if f.site:
        conditions.append(col(Product.site) == f.site)
    if f.q:
        pattern = f"%{_escape_like(f.q)}%"
        conditions.append(
            or_(
                col(Product.name).ilike(pattern, escape="\\"),
                col(Product.description).ilike(pattern, escape="\\"),
            )
        )
    return conditions


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def search_products(
    session: AsyncSession, f: ProductFilter, *, limit: int, cursor: str | None = None
) -> ProductPage:
    """Newest first (first seen, then id): a stable order a cursor can resume."""
    query = select(Product).where(*_conditions(f))
    rows, next_cursor = await newest_first(
        session, query, col(Product.first_seen), col(Product.id), limit=limit, cursor=cursor
    )
    return ProductPage(rows, await first_images([p.id for p in rows], session), next_cursor)


async def products_by_id(
    session: AsyncSession, product_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Product]:
    """The products with these ids (any state: gone and sold-out ones too), by id."""
    if not product_ids:
        return {}
    query = select(Product).where(col(Product.id).in_(product_ids))
    return {product.id: product for product in (await session.exec(query)).all()}


async def first_images(
    product_ids: list[uuid.UUID], session: AsyncSession
) -> dict[uuid.UUID, CatalogImage]:
    if not product_ids:
        return {}
    query = (
        select(ProductImage.product_id, CatalogImage)
        .join(CatalogImage, col(CatalogImage.sha256) == col(ProductImage.image_sha256))
        .where(col(ProductImage.product_id).in_(product_ids), col(ProductImage.position) == 0)
    )
    return {product_id: image for product_id, image in (await session.exec(query)).all()}


async def get_product(session: AsyncSession, product_id: uuid.UUID) -> ProductDetail:
    product = await session.get(Product, product_id)
    if product is None:
        raise NotFound(f"product {product_id} not found")
    images = await session.exec(
        select(ProductImage, CatalogImage)
        .join(CatalogImage, col(CatalogImage.sha256) == col(ProductImage.image_sha256))
        .where(col(ProductImage.product_id) == product_id)
        .order_by(col(ProductImage.position))
    )
    prices = await session.exec(
        select(ProductPrice)
        .where(col(ProductPrice.product_id) == product_id)
        .order_by(col(ProductPrice.seen_at), col(ProductPrice.id))
    )
    return ProductDetail(
        product=product,
        images=[ImageView(row.position, row.source_url, image) for row, image in images.all()],
        prices=list(prices.all()),
    )


async def get_catalog_image(session: AsyncSession, sha256: str) -> CatalogImage:
    image = await session.get(CatalogImage, sha256)
    if image is None:
        raise NotFound(f"catalog image {sha256} not found")
    return image


async def recent_crawl_runs(
    session: AsyncSession, *, limit: int, site: str | None = None
) -> list[CrawlRun]:
    query: Any = select(CrawlRun)
    if site:
        query = query.where(col(CrawlRun.site) == site)
    query = query.order_by(col(CrawlRun.started_at).desc(), col(CrawlRun.id).desc())
    return list((await session.exec(query.limit(limit))).all())
