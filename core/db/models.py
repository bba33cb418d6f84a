"""SQLModel tables: the source of truth for accounts, subjects, jobs and outputs.

Blobs (photos, LoRA weights, images) live in the blob store; rows hold their keys.
Everything a subject owns sits under the blob prefix ``subjects/<subject id>/`` so
erasing a subject is one row cascade plus one prefix delete.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


TIMESTAMP = DateTime(timezone=True)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=TIMESTAMP)


def _when() -> Any:
    return Field(default=None, sa_type=TIMESTAMP)


def _job_fk() -> Any:
    return Field(
        default=None,
        sa_column=Column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True, index=True),
    )


def _fk(target: str, *, nullable: bool = False, index: bool = True) -> Any:
    # ON DELETE CASCADE: erasing an account or subject erases what hangs off it.
    return Field(
        default=None,
        sa_column=Column(ForeignKey(target, ondelete="CASCADE"), nullable=nullable, index=index),
    )


class JobStatus(StrEnum):
    queued = "queued"  # in Postgres, waiting for the scheduler
    scheduled = "scheduled"  # handed to arq for a worker
    running = "running"  # claimed by a worker that heartbeats
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
ACTIVE = frozenset({JobStatus.queued, JobStatus.scheduled, JobStatus.running})


class JobKind(StrEnum):
    train = "train"
    generate = "generate"
    crawl = "crawl"  # a catalog crawl of one site, on a CPU worker
    # Embed new and changed products' images for the active fashion-CLIP version.
    catalog_embed = "catalog_embed"
    # Fine-tune fashion-CLIP heads on the catalog; activated only if it beats the active one.
    clip_finetune = "clip_finetune"


class Account(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str
    # Operators: may start crawls and other /v1/admin actions.
    is_admin: bool = False
    created_at: datetime = _created()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    account_id: uuid.UUID = _fk("account.id")
    # The first characters of the key, shown to humans to tell keys apart.
    prefix: str = Field(index=True)
    # sha256 of the whole key: keys are 256-bit random, so a fast hash is enough.
    key_hash: str = Field(unique=True)
    created_at: datetime = _created()
    revoked_at: datetime | None = _when()


class Subject(SQLModel, table=True):
    __table_args__ = (
        # A retried upload whose first answer was lost returns the first subject.
        UniqueConstraint("account_id", "idempotency_key", name="uq_subject_idempotency"),
    )
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    account_id: uuid.UUID = _fk("account.id")
    name: str = ""
    class_noun: str
    # The rare-token identifier DreamBooth binds this person to.
    token: str
    idempotency_key: str | None = None
    created_at: datetime = _created()


class SubjectPhoto(SQLModel, table=True):
    __tablename__ = "subject_photo"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subject_id: uuid.UUID = _fk("subject.id")
    position: int
    blob_key: str
    width: int
    height: int
    sha256: str
    # The one face found in the stored photo, in its pixels. Null for photos
    # stored before faces were detected.
    face_x: int | None = None
    face_y: int | None = None
    face_w: int | None = None
    face_h: int | None = None
    # The square crop around the face that training uses (same null rule).
    train_blob_key: str | None = None


class Lora(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subject_id: uuid.UUID = _fk("subject.id")
    job_id: uuid.UUID | None = Field(default=None)
    profile: str
    rank: int
    steps: int
    blob_key: str
    bytes: int = Field(sa_type=BigInteger)
    sha256: str
    # Every subject (ids as strings) the LoRA was trained on, this one included: a
    # run of several subjects leaves one copy per subject, and erasing any of them
    # erases every copy. Rows from before runs of several subjects hold [].
    trained_with: list[str] = Field(
        default_factory=list, sa_type=JSONB, sa_column_kwargs={"server_default": text("'[]'")}
    )
    created_at: datetime = _created()


class Job(SQLModel, table=True):
    __table_args__ = (
        # The scheduler's hot query: the oldest dispatchable jobs.
        Index("ix_job_status_created", "status", "created_at"),
        # A client retrying a POST with the same Idempotency-Key gets the same job.
        UniqueConstraint("account_id", "idempotency_key", name="uq_job_idempotency"),
    )
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    account_id: uuid.UUID = _fk("account.id")
    subject_id: uuid.UUID | None = _fk("subject.id", nullable=True)
    kind: JobKind = Field(sa_type=String(16))
    status: JobStatus = Field(default=JobStatus.queued, sa_type=String(16), index=True)
    priority: int = 0
    idempotency_key: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # A job that needs another to succeed first (generation waiting for training).
    depends_on: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True, index=True),
    )
    stage: str = "queued"
    progress: float = 0.0
    # Stage details: step/total, loss, eta_s... whatever the stage reports.
    progress_detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    attempts: int = 0
    max_attempts: int = 3
    worker_id: str | None = None
    # GPU jobs: the worker the scheduler placed the current attempt on, and why
    # (reason, the cost it placed by, the job's shape); cleared when requeued.
    placed_on: str | None = Field(default=None, index=True)
    placement: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    # The peak device memory the successful attempt measured (the declared cost on
    # a CPU host), and the least VRAM a GPU needs after an out-of-memory.
    peak_vram_bytes: int | None = Field(default=None, sa_type=BigInteger)
    vram_floor_bytes: int = Field(default=0, sa_type=BigInteger)
    # The scheduler asks a running training to yield its GPU to a waiting look: it
    # saves a checkpoint at its next step and goes back to the queue.
    preempt_requested: bool = False
    # The transport's message id for the current dispatch (arq job id).
    transport_id: str | None = None
    cancel_requested: bool = False
    error: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    result: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    created_at: datetime = _created()
    updated_at: datetime = _created()
    scheduled_at: datetime | None = _when()
    started_at: datetime | None = _when()
    heartbeat_at: datetime | None = _when()
    finished_at: datetime | None = _when()


class Output(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    job_id: uuid.UUID = _fk("job.id")
    subject_id: uuid.UUID = _fk("subject.id")
    account_id: uuid.UUID = _fk("account.id")
    kind: str = "image"
    position: int
    blob_key: str
    media_type: str = "image/png"
    seed: int | None = None
    width: int
    height: int
    # How the image was chosen among the generation's candidates: its scores
    # (prompt match, catalog match, likeness, combined) and its rank among them.
    scores: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    candidate_rank: int | None = None
    created_at: datetime = _created()


class Worker(SQLModel, table=True):
    """A worker process that announced itself; last_seen is its heartbeat."""

    id: str = Field(primary_key=True)
    name: str
    pool: str = Field(default="gpu", sa_type=String(8))  # core.jobs.routing.Pool
    device: str
    vram_bytes: int = Field(default=0, sa_type=BigInteger)
    queue: str
    # The inventory a GPU worker publishes with each heartbeat: free device memory,
    # the base pipelines it holds (profile names), the LoRAs (sha256) in each cache
    # tier ({"vram": [...], "host": [...], "disk": [...]}) and when its running job
    # is expected to end.
    vram_free_bytes: int | None = Field(default=None, sa_type=BigInteger)
    profiles: list[str] = Field(default_factory=list, sa_type=JSONB)
    loras: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    busy_until: datetime | None = _when()
    # When the published inventory was taken: an older snapshot written late (the
    # heartbeat racing a job's outcome) never replaces a newer one.
    inventory_at: datetime | None = _when()
    started_at: datetime = _created()
    last_seen: datetime = _created()
    stopped_at: datetime | None = _when()
    # Set by the scheduler when the heartbeat stopped: never placed on again.
    gone_at: datetime | None = _when()


class JobCostRow(SQLModel, table=True):
    """What finished jobs of one shape measured (core.fleet.costs.ObservedCost)."""

    __tablename__ = "job_cost"
    shape: str = Field(primary_key=True)
    samples: int
    seconds_per_unit: float
    peak_vram_bytes: int = Field(sa_type=BigInteger)
    oom_floor_bytes: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = _created()


class Look(SQLModel, table=True):
    """One shopper request: photos' subject + prompt in; images, their products and
    (on request) a spin video out. The work is child jobs; the look names them, and
    its status, stage and progress are read from them (``core.looks``)."""

    __table_args__ = (Index("ix_look_account_created", "account_id", "created_at"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    account_id: uuid.UUID = _fk("account.id", index=False)
    subject_id: uuid.UUID = _fk("subject.id")
    # The resolved core.looks.LookSpec: what was asked, every default filled.
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # The children. A training may be shared with other looks of the subject (it
    # was running when this look came); SET NULL keeps the look readable if a job
    # row is ever removed.
    train_job_id: uuid.UUID | None = _job_fk()
    generate_job_id: uuid.UUID | None = _job_fk()
    video_job_id: uuid.UUID | None = _job_fk()
    canceled_at: datetime | None = _when()
    created_at: datetime = _created()


class IdempotencyKey(SQLModel, table=True):
    """A POST's Idempotency-Key (Stripe's semantics): the request it was first used
    with (a fingerprint of method, path and body) and, once answered, the response
    to replay; while ``locked_until`` is ahead the first request is still running."""

    __tablename__ = "idempotency_key"
    account_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("account.id", ondelete="CASCADE"), primary_key=True)
    )
    key: str = Field(primary_key=True, max_length=255)
    method: str = Field(sa_type=String(8))
    path: str
    fingerprint: str
    locked_until: datetime | None = _when()
    response_status: int | None = None
    response_body: bytes | None = None
    response_headers: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    created_at: datetime = Field(default_factory=utcnow, sa_type=TIMESTAMP, index=True)


class Secret(SQLModel, table=True):
    """A key atelier generated for itself (the media-URL signing key when no setting
    gives one): made once by whichever process needs it first, shared by all."""

    name: str = Field(primary_key=True, max_length=64)
    value: bytes
    created_at: datetime = _created()
