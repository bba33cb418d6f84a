"""Response bodies of the look resource."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

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


class LookOut(BaseModel):
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
