"""Request and response bodies of the public API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.blobs.signing import UrlSigner
from core.db.models import Job, Output, Subject


class SubjectOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{
            "id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41", "name": "me", "class_noun": "woman",
            "token": "pfw", "photo_count": 4, "created_at": "2026-12-08T10:00:00Z",
        }]}
    )  # fmt: skip

    id: uuid.UUID
    name: str
    class_noun: str
    token: str = Field(description="rare-token identifier the subject's LoRA is bound to")
    photo_count: int
    created_at: datetime

    @classmethod
    def of(cls, subject: Subject, photo_count: int) -> SubjectOut:
        return cls(
            id=subject.id,
            name=subject.name,
            class_noun=subject.class_noun,
            token=subject.token,
            photo_count=photo_count,
            created_at=subject.created_at,
        )


class OutputOut(BaseModel):
    id: uuid.UUID
    url: str = Field(
        description="signed: loads without an Authorization header (an <img> or <video>"
        " src) until its `expires`; byte ranges are served"
    )
    media_type: str
    seed: int | None
    width: int
    height: int

    @classmethod
    def of(cls, output: Output, signer: UrlSigner) -> OutputOut:
        return cls(
            id=output.id,
            url=signer.url(f"/v1/outputs/{output.id}"),
            media_type=output.media_type,
            seed=output.seed,
            width=output.width,
            height=output.height,
        )


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{
            "id": "9b1d6f0e-52c3-4c1e-8f7a-0d3e2b6a9c15", "kind": "train", "status": "running",
            "subject_id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41", "depends_on": None,
            "stage": "training", "progress": 0.42,
            "progress_detail": {"step": 170, "total": 400, "loss": 0.0831, "eta_s": 96.5},
            "attempts": 1, "max_attempts": 3, "cancel_requested": False,
            "params": {"profile": "sdxl", "steps": 400}, "error": None, "result": None,
            "outputs": [], "created_at": "2026-12-08T10:00:01Z",
            "scheduled_at": "2026-12-08T10:00:02Z", "started_at": "2026-12-08T10:00:03Z",
            "finished_at": None, "updated_at": "2026-12-08T10:01:14Z",
        }]}
    )  # fmt: skip

    id: uuid.UUID
    kind: str
    status: str
    subject_id: uuid.UUID | None
    depends_on: uuid.UUID | None
    stage: str
    progress: float = Field(description="0..1 over the whole job")
    progress_detail: dict[str, Any] = Field(
        description="stage details: step, total, loss, eta_s when the stage reports them"
    )
    attempts: int
    max_attempts: int
    cancel_requested: bool
    params: dict[str, Any]
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    outputs: list[OutputOut]
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: Job, outputs: list[OutputOut] | None = None) -> JobOut:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            subject_id=job.subject_id,
            depends_on=job.depends_on,
            stage=job.stage,
            progress=job.progress,
            progress_detail=job.progress_detail,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            params=job.params,
            error=job.error,
            result=job.result,
            outputs=outputs or [],
            created_at=job.created_at,
            scheduled_at=job.scheduled_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
