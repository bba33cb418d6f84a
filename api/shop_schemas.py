"""Response bodies of shop-the-look: product search, an output's products, CLIP versions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.catalog_schemas import ProductSummaryOut
from core.blobs.signing import UrlSigner
from core.db.shop_models import ClipModel
from core.shop.look_items import LinkedProduct, LookItemView


class ScoredProductOut(ProductSummaryOut):
    score: float = Field(description="cosine similarity under the active fashion-CLIP version")
    sizes: list[str] = Field(description="sizes in stock")

    @classmethod
    def of_linked(cls, linked: LinkedProduct, signer: UrlSigner) -> ScoredProductOut:
        summary = ProductSummaryOut.of(linked.product, linked.first_image, signer)
        return cls(**summary.model_dump(), score=linked.score, sizes=linked.product.sizes)


class SearchPageOut(BaseModel):
    items: list[ScoredProductOut] = Field(description="available products, best first")
    next_cursor: str | None
    model_id: uuid.UUID = Field(description="the fashion-CLIP version that ranked them")


class LookItemOut(BaseModel):
    region: str = Field(description="whole, upper, lower or feet")
    rank: int = Field(description="0 = best match in its region")
    product: ScoredProductOut
    sold_out: bool = Field(description="sold out or no longer listed since the look was made")
    alternatives: list[ScoredProductOut] = Field(
        description="in-stock stand-ins for a sold-out product, nearest first"
    )

    @classmethod
    def of(cls, view: LookItemView, signer: UrlSigner) -> LookItemOut:
        return cls(
            region=view.region,
            rank=view.rank,
            product=ScoredProductOut.of_linked(view.item, signer),
            sold_out=view.sold_out,
            alternatives=[ScoredProductOut.of_linked(a, signer) for a in view.alternatives],
        )


class OutputProductsOut(BaseModel):
    output_id: uuid.UUID
    items: list[LookItemOut]


class ClipModelOut(BaseModel):
    id: uuid.UUID
    profile: str
    base_id: str
    status: str = Field(description="training, active, rejected or retired")
    config: dict[str, Any]
    metrics: dict[str, Any] | None = Field(
        description="held-out retrieval figures of this version and of the one it was judged"
        " against"
    )
    crawl_run_id: uuid.UUID | None = Field(description="the catalog snapshot it trained on")
    job_id: uuid.UUID | None
    created_at: datetime
    activated_at: datetime | None

    @classmethod
    def of(cls, row: ClipModel) -> ClipModelOut:
        return cls.model_validate(row, from_attributes=True)


class ClipModelList(BaseModel):
    items: list[ClipModelOut]
