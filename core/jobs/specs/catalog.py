"""The specs of the catalog jobs: a crawl of one site, embedding the catalog for
the fashion CLIP, fine-tuning the fashion CLIP's heads."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from core.db.models import JobKind
from core.errors import InvalidInput
from core.jobs.specs.base import JobSpec
from core.ml.fashion_clip.profiles import get_clip_profile
from core.settings import Settings

# Site entries and CLIP profiles are short names; longer is a client bug.
MAX_NAME_CHARS = 100
# Bounds a client may ask for (a fine-tune is an operator's action, but a typo
# of 10x the steps should be a 422, not hours of a worker).
MAX_FINETUNE_STEPS = 20_000
MAX_UNFROZEN_BLOCKS = 24

_CLIP_PROFILE_HELP = "fashion-CLIP profile (default and only choice: ATELIER_CLIP_PROFILE)"


def served_clip_profile(requested: str | None, settings: Settings) -> str:
    """The deployment's CLIP profile. The workers load only that one, so a job for
    another (asked for, or queued before the setting changed) would mix versions."""
    if requested is not None and requested != settings.clip_profile:
        raise InvalidInput(
            f"this deployment runs the fashion-CLIP profile {settings.clip_profile!r},"
            f" not {requested!r}",
            field="profile",
        )
    return get_clip_profile(settings.clip_profile).name


class CrawlSpec(JobSpec):
    """A crawl job: the body of POST /v1/admin/crawls and the row. Whether the site
    exists is checked when the job is created (core.handlers.crawl.check_site)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"site": "fixture"}]})

    kind = JobKind.crawl

    site: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="a site entry's name, e.g. 'fixture'"
    )


class CatalogEmbedSpec(JobSpec):
    kind = JobKind.catalog_embed

    profile: str | None = Field(None, max_length=MAX_NAME_CHARS, description=_CLIP_PROFILE_HELP)

    def resolve(self, settings: Settings) -> CatalogEmbedSpec:
        return self.model_copy(update={"profile": served_clip_profile(self.profile, settings)})


class ClipFinetuneSpec(JobSpec):
    """A clip_finetune job's request, row and handler contract; None = the setting."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"steps": 400, "reason": "the spring catalog arrived"}]},
    )

    kind = JobKind.clip_finetune

    steps: int | None = Field(None, ge=1, le=MAX_FINETUNE_STEPS)
    batch_size: int | None = Field(None, ge=2, description="distinct products per batch")
    learning_rate: float | None = Field(None, gt=0, le=1)
    unfreeze_image_blocks: int | None = Field(None, ge=0, le=MAX_UNFROZEN_BLOCKS)
    unfreeze_text_blocks: int | None = Field(None, ge=0, le=MAX_UNFROZEN_BLOCKS)
    holdout_fraction: float | None = Field(None, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    reason: str = Field("requested", max_length=200, description="why it runs (recorded)")
    profile: str | None = Field(None, max_length=MAX_NAME_CHARS, description=_CLIP_PROFILE_HELP)

    def resolve(self, settings: Settings) -> ClipFinetuneSpec:
        profile = get_clip_profile(served_clip_profile(self.profile, settings))
        return self.model_copy(
            update={
                "steps": self.steps or settings.clip_finetune_steps or profile.train_steps,
                "batch_size": self.batch_size or settings.clip_finetune_batch or profile.batch_size,
                "learning_rate": self.learning_rate
                or settings.clip_finetune_lr
                or profile.learning_rate,
                "unfreeze_image_blocks": settings.clip_unfreeze_image_blocks
                if self.unfreeze_image_blocks is None
                else self.unfreeze_image_blocks,
                "unfreeze_text_blocks": settings.clip_unfreeze_text_blocks
                if self.unfreeze_text_blocks is None
                else self.unfreeze_text_blocks,
                "holdout_fraction": self.holdout_fraction or settings.clip_holdout_fraction,
                "profile": profile.name,
            }
        )
