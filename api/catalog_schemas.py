"""Response and request bodies of the catalog routes (products, admin crawls)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, Field

from core.blobs.signing import UrlSigner
from core.catalog.queries import ImageView, ProductDetail
from core.db.catalog_models import CatalogImage, CrawlRun, Product, ProductPrice


class ImageVariant(StrEnum):
    padded = "padded"  # square PNG, the garment whole on its own background colour
    original = "original"  # the bytes the shop served


def image_url(signer: UrlSigner, sha256: str, variant: ImageVariant) -> str:
    """Signed, so an <img> tag loads it without an Authorization header."""
    return signer.url(f"/v1/catalog-images/{sha256}", {"variant": variant.value})


class ProductSummaryOut(BaseModel):
    id: uuid.UUID
    site: str
    external_id: str = Field(description="the shop's SKU")
    designer: str
    name: str
    price: Decimal | None
    currency: str | None
    available: bool
    sold_out: bool = Field(description="not available: sold out everywhere, or gone")
    gone_at: datetime | None = Field(description="when the shop stopped listing it")
    category_path: list[str]
    buy_url: str = Field(description="the product page on the shop")
    image_url: str | None = Field(description="the first image, padded to a square")

    @classmethod
    def of(
        cls, p: Product, first_image: CatalogImage | None, signer: UrlSigner
    ) -> ProductSummaryOut:
        return cls(
            id=p.id,
            site=p.site,
            external_id=p.external_id,
            designer=p.designer,
            name=p.name,
            price=p.price,
            currency=p.currency,
            available=p.available,
            sold_out=not p.available,
            gone_at=p.gone_at,
            category_path=p.category_path,
            buy_url=p.url,
            image_url=(
                image_url(signer, first_image.sha256, ImageVariant.padded) if first_image else None
            ),
        )


class ProductPageOut(BaseModel):
    items: list[ProductSummaryOut]
    next_cursor: str | None


class ProductImageOut(BaseModel):
    position: int
    padded_url: str
    original_url: str
    source_url: str = Field(description="where the shop serves it")
    sha256: str
    media_type: str
    width: int
    height: int

    @classmethod
    def of(cls, view: ImageView, signer: UrlSigner) -> ProductImageOut:
        image = view.image
        return cls(
            position=view.position,
            padded_url=image_url(signer, image.sha256, ImageVariant.padded),
            original_url=image_url(signer, image.sha256, ImageVariant.original),
            source_url=view.source_url,
            sha256=image.sha256,
            media_type=image.media_type,
            width=image.width,
            height=image.height,
        )


class PriceOut(BaseModel):
    price: Decimal | None
    currency: str | None
    seen_at: datetime

    @classmethod
    def of(cls, row: ProductPrice) -> PriceOut:
        return cls(price=row.price, currency=row.currency, seen_at=row.seen_at)


class ProductOut(ProductSummaryOut):
    description: str
    sizes: list[str] = Field(description="sizes in stock")
    images: list[ProductImageOut]
    price_history: list[PriceOut] = Field(description="every observed price, oldest first")
    first_seen: datetime
    last_seen: datetime
    changed_at: datetime

    @classmethod
    def of_detail(cls, detail: ProductDetail, signer: UrlSigner) -> ProductOut:
        p = detail.product
        first = detail.images[0].image if detail.images else None
        summary = ProductSummaryOut.of(p, first, signer)
        return cls(
            **summary.model_dump(),
            description=p.description,
            sizes=p.sizes,
            images=[ProductImageOut.of(view, signer) for view in detail.images],
            price_history=[PriceOut.of(row) for row in detail.prices],
            first_seen=p.first_seen,
            last_seen=p.last_seen,
            changed_at=p.changed_at,
        )


class CrawlRunOut(BaseModel):
    id: uuid.UUID
    site: str
    status: str
    job_id: uuid.UUID | None
    complete: bool = Field(description="every discovered page was visited")
    pages: int
    pages_by_status: dict[str, int]
    not_modified: int
    products_new: int
    products_changed: int
    products_unchanged: int
    products_gone: int
    images_new: int
    errors: dict[str, int]
    bytes: int
    duration_s: float
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, run: CrawlRun) -> CrawlRunOut:
        return cls.model_validate(run, from_attributes=True)


class CrawlRunList(BaseModel):
    items: list[CrawlRunOut]
