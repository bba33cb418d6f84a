"""Each job kind's typed spec: one per kind, rows round-trip through it, old rows
read back with defaults, and the routes refuse fields no spec has."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from httpx import AsyncClient
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.db.engine import session_scope
from core.db.models import Job, JobKind
from core.errors import InvalidInput
from core.fleet.costs import job_shape, job_units
from core.jobs.specs import (
    SPECS,
    CatalogEmbedSpec,
    ClipFinetuneSpec,
    CrawlSpec,
    GenerationSpec,
    JobSpec,
    TrainRequest,
    TrainSpec,
    spec_of,
)
from core.settings import Settings

SUBJECT = uuid.UUID(int=1)
OTHERS = [uuid.UUID(int=2), uuid.UUID(int=3)]


def _job(kind: JobKind, params: dict[str, Any]) -> Job:
    return Job(account_id=uuid.uuid4(), kind=kind, subject_id=SUBJECT, params=params)


def _resolved(settings: Settings) -> dict[JobKind, JobSpec]:
    run = TrainRequest(steps=5, with_subjects=OTHERS).spec([SUBJECT, *OTHERS])
    return {
        JobKind.train: run.resolve(settings),
        JobKind.generate: GenerationSpec(subject_id=SUBJECT, prompt="a red dress").resolve(
            settings
        ),
        JobKind.crawl: CrawlSpec(site="fixture").resolve(settings),
        JobKind.catalog_embed: CatalogEmbedSpec().resolve(settings),
        JobKind.clip_finetune: ClipFinetuneSpec(steps=3).resolve(settings),
    }


def test_every_job_kind_has_a_spec_that_refuses_unknown_fields() -> None:
    assert set(SPECS) == set(JobKind)
    for kind, spec in SPECS.items():
        assert spec.kind is kind
        assert spec.model_config.get("extra") == "forbid", spec


def test_a_rows_params_round_trip_through_its_spec(settings: Settings) -> None:
    for kind, spec in _resolved(settings).items():
        job = _job(kind, spec.params())
        assert type(spec_of(job)) is SPECS[kind]
        assert spec_of(job) == spec, kind
        assert spec_of(_job(kind, spec_of(job).params())).params() == job.params


def test_a_multi_subject_run_lists_every_subject_and_a_single_one_none(
    settings: Settings,
) -> None:
    run = _resolved(settings)[JobKind.train]
    assert run.params() == {
        "profile": "tiny",
        "steps": 5,
        "subject_ids": [str(s) for s in (SUBJECT, *OTHERS)],
    }
    assert TrainRequest().spec([SUBJECT]).resolve(settings).params() == {"profile": "tiny"}


def test_old_rows_read_back_with_defaults(settings: Settings) -> None:
    train = TrainSpec.of_job(_job(JobKind.train, {"profile": "tiny"}))
    assert (train.steps, train.run_subject_ids(SUBJECT)) == (None, [SUBJECT])
    # Generation rows from before the spec: no subject_id, sampler or grounding.
    old = {"prompt": "a dress", "num_images": 2, "seed": 7, "steps": 3, "profile": "tiny"}
    generation = spec_of(_job(JobKind.generate, old))
    assert isinstance(generation, GenerationSpec)
    assert (generation.subject_id, generation.scheduler, generation.grounding) == (
        SUBJECT,
        None,
        None,
    )
    assert CrawlSpec.of_job(_job(JobKind.crawl, {"site": "fixture"})).site == "fixture"
    assert CatalogEmbedSpec.of_job(_job(JobKind.catalog_embed, {})).profile is None
    finetune = ClipFinetuneSpec.of_job(_job(JobKind.clip_finetune, {"profile": "tiny"}))
    assert (finetune.seed, finetune.reason) == (0, "requested")
    assert finetune.resolve(settings).steps is not None


def test_rows_of_another_kinds_params_are_refused() -> None:
    with pytest.raises(ValidationError):
        spec_of(_job(JobKind.crawl, {"site": "fixture", "profile": "tiny"}))
    with pytest.raises(ValidationError):
        spec_of(_job(JobKind.train, {"profile": "tiny", "subject_ids": ["not-a-uuid", "x"]}))


def test_resolve_enforces_the_deployments_limits(settings: Settings) -> None:
    with pytest.raises(InvalidInput):
        TrainSpec(steps=settings.max_train_steps + 1).resolve(settings)
    with pytest.raises(InvalidInput):
        TrainSpec(profile="not-served").resolve(settings)
    with pytest.raises(InvalidInput):
        ClipFinetuneSpec(profile="another-clip").resolve(settings)


def test_the_cost_model_reads_typed_specs(settings: Settings) -> None:
    specs = _resolved(settings)
    # 3 subjects x 5 steps; candidates x the resolved denoising steps.
    assert job_units(_job(JobKind.train, specs[JobKind.train].params())) == 15
    generation = specs[JobKind.generate]
    assert isinstance(generation, GenerationSpec)
    assert generation.candidates is not None and generation.steps is not None
    job = _job(JobKind.generate, generation.params())
    assert job_units(job) == generation.candidates * generation.steps
    assert job_shape(job).side == generation.width
    assert job_shape(_job(JobKind.catalog_embed, {"profile": "tiny"})).profile == "clip"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/subjects/{subject}/train", {"steps": 5, "stepz": 5}),
        ("/v1/admin/crawls", {"site": "fixture", "depth": 2}),
    ],
)
async def test_the_routes_refuse_unknown_fields(
    client: AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    path: str,
    body: dict[str, Any],
) -> None:
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "ops", is_admin=True)
    # Without the typo the train body is valid (the unknown subject is a 404) and
    # the crawl one makes a job (201): the 422 is the unknown field's.
    headers = {"Authorization": f"Bearer {new.key}"}
    response = await client.post(path.format(subject=uuid.uuid4()), headers=headers, json=body)
    assert response.status_code == 422, response.text
    assert "extra" in response.text.lower() or "not permitted" in response.text.lower()


def test_numbers_take_json_numbers_only() -> None:
    """As the OpenAPI document says: true is not 1 and "3" is not 3; 3.0 is 3."""
    assert ClipFinetuneSpec.model_validate({"steps": 3.0}).steps == 3
    for bad in ({"seed": False}, {"steps": "3"}, {"learning_rate": True}):
        with pytest.raises(ValidationError):
            ClipFinetuneSpec.model_validate(bad)
    with pytest.raises(ValidationError):
        TrainRequest.model_validate({"steps": True})
