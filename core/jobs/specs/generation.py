"""The typed request spec of a generation: defined once, shared by the route (its
body), the job row (its ``params``, resolved) and the handler (which reads it back).

A client sends the spec with what it cares about; ``resolve`` checks it against
the deployment's limits once and fills every default (seed, sides, sampler,
candidates, grounding...), so the row says exactly what was run and a handler
never guesses. Rows written before a field existed read back with its default.

Imports nothing heavy: the API validates with it.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field

from core.db.models import Job, JobKind
from core.errors import InvalidInput
from core.jobs.specs.base import JobSpec
from core.ml.profiles import TimestepSpacing, get_profile
from core.settings import Settings

# Seeds are recorded per image as seed + i; keep them in a range every generator takes.
MAX_SEED = 2**31 - 1
# Samplers a client may pick (core.ml.generate.SCHEDULERS maps them to diffusers
# classes; named here too so the API validates them without importing torch).
SchedulerName = Literal["dpmpp_2m", "euler_a", "ddim", "pndm"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
DEFAULT_SCHEDULER: SchedulerName = "dpmpp_2m"
# Image sides: SD latents are 1/8 of the image, so multiples of 8. Below 64 px
# nothing recognisable comes out; 1024 px, SDXL's side and twice SD 1.5's, caps
# a request's cost at 4x the pixels of 512 px on SD 1.5.
SIDE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SIDE = 1024
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
# Products a client may ask for per image and region (shop-the-look's top-k).
MAX_PRODUCTS_PER_IMAGE = 20

Side = Field(
    None,
    ge=MIN_SIDE,
    le=MAX_SIDE,
    multiple_of=SIDE_MULTIPLE,
    description="pixels, a multiple of 8 (default: the profile's resolution)",
)


class ProductFilters(BaseModel):
    """Which products may ground a look and be matched to it (in-stock ones only)."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(
        None, max_length=100, description="any level of the category path, e.g. 'Dresses'"
    )
    designer: str | None = Field(None, max_length=100, description="the whole name, any case")
    min_price: Decimal | None = Field(None, ge=0, max_digits=12, decimal_places=2)
    max_price: Decimal | None = Field(None, ge=0, max_digits=12, decimal_places=2)
    currency: str | None = Field(None, min_length=3, max_length=3, description="ISO 4217")


class GenerationSpec(JobSpec):
    kind = JobKind.generate
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "subject_id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41",
                    "prompt": "a Harry Potter costume",
                    "num_images": 4,
                    "seed": 42,
                }
            ]
        },
    )

    subject_id: uuid.UUID
    prompt: str = Field(description="what the subject wears, e.g. 'a Harry Potter costume'")
    num_images: int = Field(4, ge=1, description="images kept (at most ATELIER_MAX_IMAGES)")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="candidate i uses seed + i (default: random)",
    )
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="default: the profile's")
    guidance_scale: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE, description="default: the profile's"
    )
    width: int | None = Side
    height: int | None = Side
    scheduler: SchedulerName | None = Field(
        None, description=f"sampler (default: {DEFAULT_SCHEDULER}, DPM-Solver++ 2M)"
    )
    timestep_spacing: TimestepSpacing | None = Field(
        None,
        description="how the sampler spaces its timesteps (default: the profile's, else"
        " the checkpoint's scheduler config); 'trailing' reaches the noisiest step",
    )
    candidates: int | None = Field(
        None,
        ge=1,
        description="images generated to keep the best num_images (default:"
        " ATELIER_LOOK_CANDIDATES, at least num_images, at most ATELIER_MAX_CANDIDATES)",
    )
    grounding: bool | None = Field(
        None,
        strict=True,
        description="enrich the prompt with the best-matching in-stock products"
        " (default: ATELIER_GROUNDING)",
    )
    products_per_image: int | None = Field(
        None,
        ge=1,
        le=MAX_PRODUCTS_PER_IMAGE,
        description="in-stock products matched per image and region (default:"
        " ATELIER_PRODUCTS_PER_IMAGE)",
    )
    filters: ProductFilters = Field(default_factory=ProductFilters)
    profile: str | None = Field(
        None,
        description="model profile (default ATELIER_PROFILE; any of ATELIER_PROFILES too); "
        "the subject's LoRA for it is trained first when it has none",
    )

    def resolve(self, settings: Settings) -> GenerationSpec:
        """Check the spec against the deployment's limits and fill every default."""
        profile = get_profile(served_profile(self.profile, settings))
        if self.num_images > settings.max_images:
            raise InvalidInput(f"num_images must be 1-{settings.max_images}", field="num_images")
        seed = self.seed if self.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4]) >> 1
        candidates = self.candidates or max(settings.look_candidates, self.num_images)
        if not self.num_images <= candidates <= settings.max_candidates:
            raise InvalidInput(
                f"candidates must be {self.num_images} (num_images)-{settings.max_candidates}",
                field="candidates",
            )
        if seed > MAX_SEED - settings.max_candidates:
            raise InvalidInput(f"seed must be 0-{MAX_SEED - settings.max_candidates}", field="seed")
        f = self.filters
        if f.min_price is not None and f.max_price is not None and f.min_price > f.max_price:
            raise InvalidInput("min_price is above max_price", field="filters")
        negative = self.negative_prompt
        return self.model_copy(
            update={
                "prompt": normalized_prompt(self.prompt, settings),
                "negative_prompt": normalized_prompt(negative, settings, "negative_prompt")
                if negative.strip()
                else "",
                "seed": seed,
                "steps": self.steps or profile.inference_steps,
                "guidance_scale": profile.guidance_scale
                if self.guidance_scale is None
                else self.guidance_scale,
                "width": self.width or profile.resolution,
                "height": self.height or profile.resolution,
                "scheduler": self.scheduler or DEFAULT_SCHEDULER,
                "timestep_spacing": self.timestep_spacing or profile.timestep_spacing,
                "candidates": candidates,
                "grounding": settings.grounding if self.grounding is None else self.grounding,
                "products_per_image": self.products_per_image or settings.products_per_image,
                "filters": f.model_copy(update={"currency": f.currency and f.currency.upper()}),
                "profile": profile.name,
            }
        )

    def params(self) -> dict[str, object]:
        """The job row's ``params``: the resolved spec as JSON, nulls included (a
        resolved spec has every default filled; clients read the row as is)."""
        return self.model_dump(mode="json")

    @classmethod
    def of_job(cls, job: Job) -> Self:
        """Rows from before the spec carried no subject_id in their params; the
        column has it."""
        return cls.model_validate({"subject_id": job.subject_id, **job.params})


def generation_spec_of(job: Job) -> GenerationSpec:
    """A generate job's spec as its row holds it."""
    return GenerationSpec.of_job(job)


def served_profile(requested: str | None, settings: Settings) -> str:
    """The profile a request runs on: the one it names if this deployment serves it,
    else the default."""
    served = settings.served_profiles
    if requested is not None and requested not in served:
        raise InvalidInput(
            f"this deployment serves the profiles {', '.join(served)}, not {requested!r}",
            field="profile",
        )
    return requested or settings.profile


def normalized_prompt(prompt: str, settings: Settings, field: str = "prompt") -> str:
    text = " ".join(prompt.split())
    if not text:
        raise InvalidInput(f"{field} is empty", field=field)
    if len(text) > settings.max_prompt_chars:
        raise InvalidInput(
            f"{field} is {len(text)} characters; the limit is {settings.max_prompt_chars}",
            field=field,
        )
    return text
