"""One typed request spec per job kind, shared by the route (its body, or the
body's public part), the job row (``spec.params()``) and the handler
(``Spec.of_job(job)``, or ``spec_of(job)`` for any kind).

``SPECS`` names each kind's spec so generic code (the scheduler's cost model, a
look) can read any job's params typed.
"""

from __future__ import annotations

from core.db.models import Job, JobKind
from core.jobs.specs.base import JobSpec
from core.jobs.specs.catalog import (
    CatalogEmbedSpec,
    ClipFinetuneSpec,
    CrawlSpec,
    served_clip_profile,
)
from core.jobs.specs.generation import (
    DEFAULT_SCHEDULER,
    MAX_SEED,
    SCHEDULERS,
    GenerationSpec,
    ProductFilters,
    SchedulerName,
    generation_spec_of,
    normalized_prompt,
    served_profile,
)
from core.jobs.specs.training import TrainRequest, TrainSpec

SPECS: dict[JobKind, type[JobSpec]] = {
    spec.kind: spec
    for spec in (TrainSpec, GenerationSpec, CrawlSpec, CatalogEmbedSpec, ClipFinetuneSpec)
}


def spec_of(job: Job) -> JobSpec:
    """Any job's spec as its row holds it; a ValidationError for params that are
    not its kind's."""
    return SPECS[JobKind(job.kind)].of_job(job)


__all__ = [
    "DEFAULT_SCHEDULER",
    "MAX_SEED",
    "SCHEDULERS",
    "SPECS",
    "CatalogEmbedSpec",
    "ClipFinetuneSpec",
    "CrawlSpec",
    "GenerationSpec",
    "JobSpec",
    "ProductFilters",
    "SchedulerName",
    "TrainRequest",
    "TrainSpec",
    "generation_spec_of",
    "normalized_prompt",
    "served_clip_profile",
    "served_profile",
    "spec_of",
]
