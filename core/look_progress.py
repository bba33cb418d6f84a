"""A look's status, stages, progress and ETA, read from its child jobs.

A look stores no state of its own beyond ``canceled_at``: its children (the
training it waits for, the generation that also grounds, reranks and matches
products, and later the spin video) are the truth, so the look can never
disagree with them. This module is pure: given the children and each one's
expected seconds, it says where the look stands.

Stages, in order: ``training`` (only when the subject had no LoRA),
``generating`` and ``matching`` (both in the generation job: matching is its
last part), ``rendering_video`` (only when asked). Overall progress weighs each
child by its expected seconds (the fleet's cost model, corrected by what
finished jobs measured); the ETA adds what the running child has left (from its
own rate so far) to the expected seconds of the children not started. Time
waiting for a GPU is not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from core.db.models import Job, JobStatus, Look

# The generation job's own stages that belong to the look's "matching" stage.
_MATCHING_STAGES = frozenset({"matching", "saving"})
_GENERATING_TIMINGS = ("load_s", "grounding_s", "generation_s", "reranking_s")
_MATCHING_TIMINGS = ("matching_s", "saving_s")
# Progress below this is too little to extrapolate a running job's rate from.
_MIN_PROGRESS_FOR_RATE = 0.05


class LookStatus(StrEnum):
    queued = "queued"  # no child has started
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in (LookStatus.succeeded, LookStatus.failed, LookStatus.canceled)


class StageName(StrEnum):
    training = "training"
    generating = "generating"
    matching = "matching"
    rendering_video = "rendering_video"


class StageStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


@dataclass(frozen=True)
class Stage:
    name: StageName
    status: StageStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # step, total, loss... while running
    # The handler's own timing of the stage, when it shares a job with another
    # stage (generating and matching): truer than the split of the job's wall time.
    measured_s: float | None = None

    @property
    def seconds(self) -> float | None:
        if self.measured_s is not None:
            return round(self.measured_s, 3)
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds(), 3)


@dataclass(frozen=True)
class Children:
    training: Job | None
    generation: Job | None
    video: Job | None = None


@dataclass(frozen=True)
class LookState:
    status: LookStatus
    stage: str  # the current stage's name, or the status once finished
    progress: float  # 0..1 over the whole look
    eta_s: float | None
    stages: list[Stage]
    error: dict[str, Any] | None
    finished_at: datetime | None


def _job_stage_status(job: Job) -> StageStatus:
    status = JobStatus(job.status)
    if status is JobStatus.running:
        return StageStatus.running
    if status.finished:
        return StageStatus(status.value)
    return StageStatus.pending


def _seconds(timings: dict[str, Any], keys: tuple[str, ...]) -> float:
    return sum(float(timings.get(k) or 0.0) for k in keys)


def _generation_stages(job: Job) -> list[Stage]:
    status = _job_stage_status(job)
    if status is StageStatus.succeeded:
        timings = (job.result or {}).get("timings", {})
        generating, matching = (
            _seconds(timings, _GENERATING_TIMINGS),
            _seconds(timings, _MATCHING_TIMINGS),
        )
        split = job.started_at and job.started_at + timedelta(seconds=generating)
        if split and job.finished_at:
            split = min(split, job.finished_at)
        return [
            Stage(StageName.generating, status, job.started_at, split, measured_s=generating),
            Stage(StageName.matching, status, split, job.finished_at, measured_s=matching),
        ]
    if status is StageStatus.running and job.stage in _MATCHING_STAGES:
        return [
            Stage(StageName.generating, StageStatus.succeeded, job.started_at),
            Stage(StageName.matching, status, detail=dict(job.progress_detail)),
        ]
    if status is StageStatus.running:
        running = Stage(StageName.generating, status, job.started_at,
                        detail={"step": job.stage, **job.progress_detail})  # fmt: skip
        return [running, Stage(StageName.matching, StageStatus.pending)]
    # Pending, failed or canceled: the whole job's outcome is the generating stage's.
    return [
        Stage(StageName.generating, status, job.started_at, job.finished_at),
        Stage(StageName.matching, StageStatus.pending),
    ]


def _stages(children: Children) -> list[Stage]:
    stages = []
    if children.training is not None:
        job = children.training
        detail = dict(job.progress_detail) if job.status == JobStatus.running else {}
        stages.append(Stage(StageName.training, _job_stage_status(job), job.started_at,
                            job.finished_at, detail))  # fmt: skip
    if children.generation is not None:
        stages.extend(_generation_stages(children.generation))
    if children.video is not None:
        job = children.video
        stages.append(Stage(StageName.rendering_video, _job_stage_status(job), job.started_at,
                            job.finished_at, dict(job.progress_detail)))  # fmt: skip
    return stages


def _remaining_s(job: Job, expected_s: float, now: datetime) -> float:
    status = JobStatus(job.status)
    if status.finished:
        return 0.0
    if status is JobStatus.running and job.started_at and job.progress >= _MIN_PROGRESS_FOR_RATE:
        elapsed = (now - job.started_at).total_seconds()
        return max(0.0, elapsed / job.progress * (1 - job.progress))
    return expected_s * (1 - job.progress)


def _status(look: Look, jobs: list[Job], final: Job | None) -> LookStatus:
    statuses = [JobStatus(job.status) for job in jobs]
    if look.canceled_at is not None or JobStatus.canceled in statuses:
        return LookStatus.canceled
    if JobStatus.failed in statuses:
        return LookStatus.failed
    if final is not None and final.status == JobStatus.succeeded:
        return LookStatus.succeeded
    if any(s in (JobStatus.running, JobStatus.succeeded) for s in statuses):
        return LookStatus.running
    return LookStatus.queued


def look_state(
    look: Look, children: Children, expected_s: dict[str, float], now: datetime
) -> LookState:
    """Where the look stands. ``expected_s`` maps a child job's id (str) to the
    seconds the cost model expects it to take."""
    jobs = [j for j in (children.training, children.generation, children.video) if j]
    final = children.video or children.generation
    status = _status(look, jobs, final)
    stages = _stages(children)
    weights = {str(j.id): max(expected_s.get(str(j.id), 1.0), 1e-3) for j in jobs}
    total = sum(weights.values()) or 1.0
    done = sum(weights[str(j.id)] * (1.0 if j.status == JobStatus.succeeded else j.progress)
               for j in jobs)  # fmt: skip
    error = next((j.error for j in jobs if j.status == JobStatus.failed and j.error), None)
    if status.finished:
        finished = max((j.finished_at for j in jobs if j.finished_at), default=look.canceled_at)
        if look.canceled_at is not None:
            finished = look.canceled_at
        progress = 1.0 if status is LookStatus.succeeded else round(done / total, 4)
        return LookState(status, status.value, progress, None, stages, error, finished)
    current = next((s for s in stages if s.status is not StageStatus.succeeded), stages[-1])
    eta = sum(_remaining_s(j, expected_s.get(str(j.id), 0.0), now) for j in jobs)
    return LookState(
        status, current.name.value, round(done / total, 4), round(eta, 1), stages, None, None
    )
