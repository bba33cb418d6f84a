"""What a GPU job costs: its peak VRAM and its seconds, per job shape.

A job's *shape* is what its cost depends on: kind, profile, image side, memory
preset. The checked-in table (``cost_table.json`` beside this module) gives each
shape's peak VRAM and seconds per *unit* of work (a training step, one denoising
step of one image, one embedding job), with where the figure comes from: a
benchmark's measurement, a public figure, or a declared one (the tiny profiles,
whose CPU runs have no VRAM to measure). A job's cost is its shape's row times its
units (``units_of``).

Finished jobs correct the table online (``ObservedCost``, kept in Postgres by
``core.fleet.inventory``): seconds per unit follow an exponential moving average of
what jobs took, and the peak is the largest a job of the shape measured
(``torch.cuda.max_memory_allocated``; on a CPU host the declared figure). An
out-of-memory raises the shape's floor to more than the GPU it failed on.

Torch-free: the scheduler imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.db.models import Job
from core.fleet.placement import GIB, JobCost
from core.jobs.specs import CatalogEmbedSpec, GenerationSpec, JobSpec, TrainSpec, spec_of
from core.ml.profiles import PROFILES, Profile

COST_TABLE = Path(__file__).with_name("cost_table.json")
DEFAULT_PRESET = "default"
# How fast observed seconds replace the table's: the weight of each new job.
EWMA_WEIGHT = 0.3
# The fashion CLIP's shape in the cost table (catalog_embed jobs name no profile).
CLIP_PROFILE, CLIP_SIDE = "clip", 224


@dataclass(frozen=True)
class JobShape:
    kind: str
    profile: str
    side: int  # image side in pixels (the training resolution for training)
    preset: str = DEFAULT_PRESET

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.profile}:{self.side}:{self.preset}"


@dataclass(frozen=True)
class CostRow:
    peak_vram_bytes: int
    seconds_per_unit: float
    unit: str  # "step" (training), "image-step" (generation), "job"
    source: str


@dataclass(frozen=True)
class ObservedCost:
    """What finished jobs of one shape measured."""

    samples: int
    seconds_per_unit: float
    peak_vram_bytes: int
    oom_floor_bytes: int = 0  # a GPU must be larger than this (an OOM happened on it)


class UnknownShape(LookupError):
    pass


@dataclass(frozen=True)
class CostTable:
    rows: dict[str, CostRow]

    def row(self, shape: JobShape) -> CostRow:
        """The shape's row; else the same kind and profile at the nearest larger side
        (then the largest): a guess that errs on the side of more VRAM."""
        exact = self.rows.get(shape.key)
        if exact is not None:
            return exact
        prefix = f"{shape.kind}:{shape.profile}:"
        near = [(int(k.split(":")[2]), r) for k, r in self.rows.items()
                if k.startswith(prefix) and k.endswith(f":{shape.preset}")]  # fmt: skip
        if not near:
            raise UnknownShape(f"no cost row for {shape.key} in the cost table")
        larger = [item for item in near if item[0] >= shape.side]
        by_side = lambda item: item[0]  # noqa: E731
        return (min(larger, key=by_side) if larger else max(near, key=by_side))[1]

    def cost(self, shape: JobShape, units: float, observed: ObservedCost | None = None) -> JobCost:
        row = self.row(shape)
        peak, per_unit = row.peak_vram_bytes, row.seconds_per_unit
        if observed is not None and observed.samples > 0:
            peak = max(peak, observed.peak_vram_bytes)
            per_unit = observed.seconds_per_unit
        return JobCost(peak, per_unit * units)


def observe(before: ObservedCost | None, seconds_per_unit: float, peak: int) -> ObservedCost:
    """``before`` updated with one finished job's measurement."""
    if before is None or before.samples == 0:
        return ObservedCost(1, seconds_per_unit, peak, before.oom_floor_bytes if before else 0)
    seconds = (1 - EWMA_WEIGHT) * before.seconds_per_unit + EWMA_WEIGHT * seconds_per_unit
    return ObservedCost(
        before.samples + 1, seconds, max(before.peak_vram_bytes, peak), before.oom_floor_bytes
    )


def shape_of(spec: JobSpec, profile: str, side: int) -> JobShape:
    """A job's shape: its profile and side (a generation's larger image side when
    its spec names one). No spec names a memory preset yet: the default one."""
    sides = [s for s in (spec.width, spec.height) if s] if isinstance(spec, GenerationSpec) else []
    return JobShape(spec.kind.value, profile, max(sides) if sides else side)


def units_of(spec: JobSpec, default_steps: int) -> float:
    """How many of its row's units a job is: training steps (every subject takes
    the steps), images x denoising steps for a generation, else one."""
    if isinstance(spec, TrainSpec):
        return float((spec.steps or default_steps) * (len(spec.subject_ids or ()) or 1))
    if isinstance(spec, GenerationSpec):
        return float((spec.candidates or spec.num_images) * (spec.steps or default_steps))
    return 1.0


def _diffusion_profile(spec: JobSpec) -> Profile | None:
    name = spec.profile if isinstance(spec, TrainSpec | GenerationSpec) else None
    return PROFILES.get(name) if name else None


def job_shape(job: Job) -> JobShape:
    """The shape of a job row (its profile's side unless its spec says)."""
    try:
        spec = spec_of(job)
    except ValidationError as exc:
        raise UnknownShape(f"job {job.id}: its params are not a {job.kind} spec") from exc
    if isinstance(spec, CatalogEmbedSpec):
        return JobShape(job.kind, CLIP_PROFILE, CLIP_SIDE)
    profile = _diffusion_profile(spec)
    if profile is None:
        raise UnknownShape(f"job {job.id} ({job.kind}) names no diffusion profile")
    return shape_of(spec, profile.name, profile.resolution)


def job_units(job: Job) -> float:
    """The units of work of a job row (its profile's step counts by default)."""
    spec = spec_of(job)
    profile = _diffusion_profile(spec)
    if profile is None:
        return 1.0
    steps = profile.train_steps if isinstance(spec, TrainSpec) else profile.inference_steps
    return units_of(spec, steps)


def _row(data: dict[str, Any]) -> CostRow:
    return CostRow(
        peak_vram_bytes=int(float(data["peak_vram_gib"]) * GIB),
        seconds_per_unit=float(data["seconds_per_unit"]),
        unit=str(data["unit"]),
        source=str(data["source"]),
    )


def load_cost_table(path: Path = COST_TABLE) -> CostTable:
    rows = json.loads(path.read_text())["rows"]
    return CostTable({key: _row(row) for key, row in rows.items()})


@lru_cache(maxsize=4)
def cached_cost_table(path: Path = COST_TABLE) -> CostTable:
    return load_cost_table(path)
