"""Response bodies of the look resource."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from api.schemas import OutputOut
from api.shop_schemas import LookItemOut
from core.look_progress import LookStatus, Stage, StageName, StageStatus
from core.looks import LookDetail, LookSpec


class StageOut(BaseModel):
    name: StageName
    status: StageStatus
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None = Field(description="wall seconds, once the stage finished")
    detail: dict[str, Any] = Field(
        description="while running: step, total, loss, eta_s when the stage reports them"
    )

    @classmethod
    def of(cls, stage: Stage) -> StageOut:
        return cls(
            name=stage.name,
            status=stage.status,
            started_at=stage.started_at,
            finished_at=stage.finished_at,
            seconds=stage.seconds,
            detail=stage.detail,
        )


class LookJobsOut(BaseModel):
    """The child jobs, each readable at /v1/jobs/{id}."""

    training: uuid.UUID | None = Field(description="absent when the subject had a LoRA")
    generation: uuid.UUID | None
    video: uuid.UUID | None


class LookImageOut(BaseModel):
    output: OutputOut
    products: list[LookItemOut] = Field(
        description="the products matched to the image per region, best first"
    )


_LOOK_EXAMPLE: JsonDict = {
    "id": "c0a8012e-7f4d-4b8e-9c61-5d2a3e4f6b70",
    "subject_id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41",
    "status": "running", "stage": "generating", "progress": 0.71, "eta_s": 12.4,
    "stages": [
        {"name": "training", "status": "succeeded", "started_at": "2026-12-08T10:00:03Z",
         "finished_at": "2026-12-08T10:02:40Z", "seconds": 157.0, "detail": {}},
        {"name": "generating", "status": "running", "started_at": "2026-12-08T10:02:41Z",
         "finished_at": None, "seconds": None,
         "detail": {"step": "generating", "total": 30, "eta_s": 9.0}},
        {"name": "matching", "status": "pending", "started_at": None, "finished_at": None,
         "seconds": None, "detail": {}},
    ],
    "spec": {"subject_id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41",
             "prompt": "a Harry Potter costume", "num_images": 4, "candidates": 6, "seed": 42},
    "jobs": {"training": "9b1d6f0e-52c3-4c1e-8f7a-0d3e2b6a9c15",
             "generation": "5e7a2c9d-1b3f-4d6e-8a0c-2f4b6d8e0a13", "video": None},
    "images": [], "video": None, "error": None, "created_at": "2026-12-08T10:00:01Z",
    "canceled_at": None, "finished_at": None,
}  # fmt: skip


class LookOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_LOOK_EXAMPLE]})

    id: uuid.UUID
    subject_id: uuid.UUID
    status: LookStatus
    stage: str = Field(
        description="the current stage (training, generating, matching, rendering_video),"
        " or the status once finished"
    )
    progress: float = Field(description="0..1 over the whole look")
    eta_s: float | None = Field(
        description="seconds left while running (the cost model's estimate; not GPU queueing)"
    )
    stages: list[StageOut]
    spec: LookSpec = Field(description="what was asked, every default resolved")
    jobs: LookJobsOut
    images: list[LookImageOut] = Field(description="the kept images once generated, best first")
    video: OutputOut | None = Field(None, description="the spin video, when there is one")
    error: dict[str, Any] | None = Field(description="why the look failed")
    created_at: datetime
    canceled_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, detail: LookDetail, images: list[LookImageOut]) -> LookOut:
        look, state, children = detail.look, detail.state, detail.children
        return cls(
            id=look.id,
            subject_id=look.subject_id,
            status=state.status,
            stage=state.stage,
            progress=state.progress,
            eta_s=state.eta_s,
            stages=[StageOut.of(s) for s in state.stages],
            spec=detail.spec,
            jobs=LookJobsOut(
                training=children.training.id if children.training else None,
                generation=children.generation.id if children.generation else None,
                video=children.video.id if children.video else None,
            ),
            images=images,
            error=state.error,
            created_at=look.created_at,
            canceled_at=look.canceled_at,
            finished_at=state.finished_at,
        )


class LookPage(BaseModel):
    items: list[LookOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")
