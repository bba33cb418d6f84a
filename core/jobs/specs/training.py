"""The spec of a training job, and the public part a client sends.

A client asks to train one subject (the route's path names it) with optional
steps, profile and ``with_subjects`` (other subjects of the account learnt in the
same run). The row records the resolved profile, the steps only when asked for
(otherwise ATELIER_TRAIN_STEPS, else the profile's, read when the job runs) and,
for a run of several subjects, all of them, the job's own first. A run of one
subject has no ``subject_ids``: the rows always had that shape, and the
``subject_ids`` containment queries (core.jobs.states, core.subjects) rely on it.
"""

from __future__ import annotations

import uuid

from pydantic import ConfigDict, Field

from core.db.models import JobKind
from core.errors import InvalidInput
from core.jobs.specs.base import JobSpec, NumbersAreNumbers
from core.jobs.specs.generation import served_profile
from core.settings import Settings

# Profile names are short identifiers (core.ml.profiles); longer is a client bug.
MAX_PROFILE_CHARS = 64

_PROFILE_HELP = "model profile (default ATELIER_PROFILE; any of ATELIER_PROFILES)"


class TrainRequest(NumbersAreNumbers):
    """The body of POST /v1/subjects/{id}/train: the public part of a TrainSpec
    (``with_subjects`` excludes the subject the path names; the row lists them all)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"steps": 400}]})

    steps: int | None = Field(
        None, ge=1, description="training steps (default: the profile's; at most"
        " ATELIER_MAX_TRAIN_STEPS)",
    )  # fmt: skip
    with_subjects: list[uuid.UUID] = Field(
        default_factory=list,
        description="other subjects of the account to learn in the same run, each bound to"
        " its own token; every subject of the run gets the LoRA (at most"
        " ATELIER_MAX_SUBJECTS_PER_RUN subjects in all)",
    )
    profile: str | None = Field(None, max_length=MAX_PROFILE_CHARS, description=_PROFILE_HELP)

    def spec(self, run: list[uuid.UUID]) -> TrainSpec:
        """The job's spec for a run of these subjects (the trained one first)."""
        return TrainSpec(
            profile=self.profile, steps=self.steps, subject_ids=run if len(run) > 1 else None
        )


class TrainSpec(JobSpec):
    """A train job's row and handler contract."""

    kind = JobKind.train

    profile: str | None = Field(None, max_length=MAX_PROFILE_CHARS, description=_PROFILE_HELP)
    steps: int | None = Field(None, ge=1, description="None: decided when the job runs")
    subject_ids: list[uuid.UUID] | None = Field(
        None, min_length=2, description="a run of several subjects: all of them, its own first"
    )

    def resolve(self, settings: Settings) -> TrainSpec:
        if self.steps is not None and self.steps > settings.max_train_steps:
            raise InvalidInput(f"steps must be 1-{settings.max_train_steps}", field="steps")
        if self.subject_ids and len(self.subject_ids) > settings.max_subjects_per_run:
            raise InvalidInput(
                f"a run trains at most {settings.max_subjects_per_run} subjects",
                field="with_subjects",
            )
        return self.model_copy(update={"profile": served_profile(self.profile, settings)})

    def run_subject_ids(self, own: uuid.UUID) -> list[uuid.UUID]:
        """The subjects the job learns, its own (the row's subject) first."""
        return list(self.subject_ids) if self.subject_ids else [own]
