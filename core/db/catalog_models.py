"""SQLModel tables of the product catalog the crawler keeps current.

A product is never deleted: looks made last month keep their links and show
"sold out". Identity is (site, external id), the shop's own SKU, so a product
that moves URL or changes its name stays one row. Image blobs are stored once
per content hash (``catalog_image``) however many products show them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Numeric, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from core.db.models import TIMESTAMP, utcnow

MONEY = Numeric(12, 2)


class CrawlStatus:
    running = "running"
    succeeded = "succeeded"  # every discovered page was visited (a "complete" crawl)
    failed = "failed"  # stopped on an error; the catalog is consistent but not complete
    interrupted = "interrupted"  # stopped by a signal or cancel; the next run picks up


class CrawlRun(SQLModel, table=True):
    """One crawl of one site, with the counts an operator needs to judge it."""

    __tablename__ = "crawl_run"
    __table_args__ = (Index("ix_crawl_run_site_started", "site", "started_at"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    site: str = Field(sa_type=String(64))
    status: str = Field(default=CrawlStatus.running, sa_type=String(16))
    # The job that ran it; null when an operator ran it from the command line.
    job_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True),
    )
    complete: bool = False  # gone-marking happens only after a complete crawl
    pages: int = 0
    pages_by_status: dict[str, int] = Field(default_factory=dict, sa_type=JSONB)
    not_modified: int = 0  # 304 answers to conditional requests
    products_new: int = 0
    products_changed: int = 0
    products_unchanged: int = 0
    products_gone: int = 0
    images_new: int = 0
    errors: dict[str, int] = Field(default_factory=dict, sa_type=JSONB)  # by kind
    bytes: int = Field(default=0, sa_type=BigInteger)
    duration_s: float = 0.0
    started_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    finished_at: datetime | None = Field(default=None, sa_type=TIMESTAMP)


class Product(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("site", "external_id", name="uq_product_site_external"),
        Index("ix_product_designer", "designer"),
        Index("ix_product_available_price", "available", "price"),
    )
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    site: str = Field(sa_type=String(64))
    external_id: str
    url: str
    designer: str = ""
    name: str = ""
    description: str = ""
    price: Decimal | None = Field(default=None, sa_type=MONEY)
    currency: str | None = Field(default=None, sa_type=String(3))
    available: bool = True
    sizes: list[str] = Field(default_factory=list, sa_type=JSONB)  # sizes in stock
    category_path: list[str] = Field(default_factory=list, sa_type=JSONB)
    # sha256 of the normalised extracted fields: a changed hash is a changed product.
    content_hash: str
    first_seen: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    last_seen: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    changed_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    # Set when the shop answered 404/410 or a complete crawl no longer found it.
    gone_at: datetime | None = Field(default=None, sa_type=TIMESTAMP)
    last_run_id: uuid.UUID | None = Field(default=None, index=True)


class ProductPrice(SQLModel, table=True):
    """Price history: one row per observed price change (the first price too)."""

    __tablename__ = "product_price"
    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    product_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("product.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    price: Decimal | None = Field(default=None, sa_type=MONEY)
    currency: str | None = Field(default=None, sa_type=String(3))
    seen_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    run_id: uuid.UUID | None = None


class CatalogImage(SQLModel, table=True):
    """One image by content: the original bytes and the 512x512 padded copy."""

    __tablename__ = "catalog_image"
    sha256: str = Field(primary_key=True)  # of the original bytes
    blob_key: str  # the original, as downloaded
    padded_blob_key: str  # pad_to_square output, PNG
    media_type: str
    width: int
    height: int
    bytes: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)


class ProductImage(SQLModel, table=True):
    __tablename__ = "product_image"
    __table_args__ = (UniqueConstraint("product_id", "position", name="uq_product_image_position"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    product_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("product.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    position: int
    source_url: str
    image_sha256: str = Field(
        sa_column=Column(ForeignKey("catalog_image.sha256"), nullable=False, index=True)
    )


class CrawlPage(SQLModel, table=True):
    """What the last fetch of a URL returned: validators for conditional GETs.

    A listing or sitemap answering 304 replays ``links`` (what it held last
    time), so a refresh of an unchanged shop still discovers every product.
    """

    __tablename__ = "crawl_page"
    __table_args__ = (UniqueConstraint("site", "url", name="uq_crawl_page_site_url"),)
    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    site: str = Field(sa_type=String(64))
    url: str
    kind: str = Field(sa_type=String(16))  # listing, sitemap, product
    etag: str | None = None
    last_modified: str | None = None
    status: int
    links: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    product_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(ForeignKey("product.id", ondelete="SET NULL"), nullable=True),
    )
    fetched_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
