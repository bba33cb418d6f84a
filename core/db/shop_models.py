"""SQLModel tables of shop-the-look: fashion CLIP versions, stored features, the
catalog's embeddings and the products linked to every kept image.

Vectors are float32 bytes (``bytea``): there is no pgvector here, and search runs
in-process over numpy arrays (``core.shop.vector_index``). A base model's features
are stored once per image and per product text, keyed by the base's identity
(profile + weights hash), so a new head version re-embeds the catalog by running
only its heads over them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Float, ForeignKey, Index, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from core.db.models import TIMESTAMP, utcnow

BASE_ID = String(120)


class ClipModelStatus:
    training = "training"  # a clip_finetune job is making it
    active = "active"  # the one the index, grounding and matching use (one per profile)
    rejected = "rejected"  # held-out recall did not beat the active version's
    retired = "retired"  # was active; a better version replaced it


class ClipModel(SQLModel, table=True):
    """One fashion-CLIP version: a base model plus trained heads (and blocks)."""

    __tablename__ = "clip_model"
    __table_args__ = (
        # Activation is one UPDATE pair in one transaction; this makes two at once fail.
        Index(
            "uq_clip_model_active",
            "profile",
            unique=True,
            postgresql_where=text("status = 'active'"),
        ),
    )
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    profile: str = Field(sa_type=String(32))  # a core.ml.fashion_clip.profiles key
    base_id: str = Field(sa_type=BASE_ID)  # whose stored features this version reads
    status: str = Field(default=ClipModelStatus.training, sa_type=String(16))
    # Heads and training configuration (bottleneck, unfrozen blocks, steps, lr...).
    config: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # The trainable state (safetensors); None for the base version (identity heads).
    blob_key: str | None = None
    # Where the exported ONNX encoder lives (text.onnx, image.onnx, encoder.json...).
    onnx_prefix: str | None = None
    # Held-out retrieval metrics of this version and, beside them, of the version
    # that was active when it was judged (same split, same run).
    metrics: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    # The data snapshot: the newest crawl run when training started.
    crawl_run_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(ForeignKey("crawl_run.id", ondelete="SET NULL"), nullable=True),
    )
    job_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True)
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
    activated_at: datetime | None = Field(default=None, sa_type=TIMESTAMP)


class ImageFeature(SQLModel, table=True):
    """The frozen base image tower's output for one catalog image."""

    __tablename__ = "clip_image_feature"
    base_id: str = Field(sa_type=BASE_ID, primary_key=True)
    image_sha256: str = Field(
        sa_column=Column(ForeignKey("catalog_image.sha256", ondelete="CASCADE"), primary_key=True)
    )
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)


class TextFeature(SQLModel, table=True):
    """The frozen base text tower's output for one product's caption."""

    __tablename__ = "clip_text_feature"
    base_id: str = Field(sa_type=BASE_ID, primary_key=True)
    product_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("product.id", ondelete="CASCADE"), primary_key=True)
    )
    # sha256 of the caption: a product whose caption changed is embedded again.
    text_sha256: str = Field(sa_type=String(64))
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)


class ProductEmbedding(SQLModel, table=True):
    """A product image's embedding under one version: a row of the index."""

    __tablename__ = "product_embedding"
    model_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("clip_model.id", ondelete="CASCADE"), primary_key=True)
    )
    product_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("product.id", ondelete="CASCADE"), primary_key=True, index=True)
    )
    image_sha256: str = Field(sa_type=String(64), primary_key=True)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)


class LookItem(SQLModel, table=True):
    """A product matched to a kept image, in one garment region, at one rank."""

    __tablename__ = "look_item"
    __table_args__ = (
        UniqueConstraint("output_id", "region", "rank", name="uq_look_item_output_region_rank"),
    )
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    output_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("output.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    # Products are never deleted; a gone one stays linked and reads as sold out.
    product_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("product.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    region: str = Field(sa_type=String(16))  # core.shop.regions: whole, upper, lower, feet
    rank: int  # 0 = best in its region
    score: float = Field(sa_column=Column(Float, nullable=False))
    model_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(ForeignKey("clip_model.id", ondelete="SET NULL"), nullable=True),
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP)
