"""Generation options over HTTP: validation, defaults, and a job run in-process that
honours them (size, sampler) and reproduces its images from the recorded values."""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from httpx import AsyncClient
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import blob_store_from_settings
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus, Lora, Subject
from core.errors import InvalidInput
from core.generations import request_generation
from core.handlers.generate import run_generation
from core.jobs.execution import Executor
from core.jobs.specs import GenerationSpec
from core.ml.profiles import get_profile
from core.settings import Settings
from core.subjects import lora_key
from tests.conftest import photo_files

Sessions = async_sessionmaker[AsyncSession]
TINY = get_profile("tiny")


async def _subject(client: AsyncClient, auth: dict[str, str], photos: list) -> str:
    response = await client.post("/v1/subjects", headers=auth, files=photo_files(photos))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _generate(
    client: AsyncClient, auth: dict[str, str], subject_id: str, **extra: Any
) -> dict[str, Any]:
    body = {"subject_id": subject_id, "prompt": "a wizard robe", **extra}
    response = await client.post("/v1/generations", headers=auth, json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"width": 500}, "width", "multiple of 8"),
        ({"height": 100}, "height", "multiple of 8"),
        ({"width": 32}, "width", "greater than or equal to 64"),
        ({"height": 2048}, "height", "less than or equal to 1024"),
        ({"width": "wide"}, "width", "integer"),
        ({"scheduler": "karras_magic"}, "scheduler", "dpmpp_2m"),
    ],
)
async def test_invalid_options_are_422_naming_the_field(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    extra: dict[str, Any],
    field: str,
    says: str,
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    response = await client.post(
        "/v1/generations", headers=auth, json={"subject_id": subject_id, "prompt": "a hat", **extra}
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["detail"].startswith(f"body.{field}:"), problem
    assert says in problem["detail"], problem
    assert problem["errors"][0]["loc"] == ["body", field]


def test_the_spec_checks_options_for_callers_other_than_http() -> None:
    """The route's body is the spec itself: a caller in core meets the same checks."""
    subject_id = uuid.uuid4()
    for kwargs, field in [
        ({"width": 72 + 4}, "width"),
        ({"height": 8}, "height"),
        ({"width": 1032}, "width"),
        ({"scheduler": "lms"}, "scheduler"),
        ({"candidates": 0}, "candidates"),
        ({"filters": {"currency": "EURO"}}, "filters"),
    ]:
        with pytest.raises(ValidationError) as refused:
            GenerationSpec(subject_id=subject_id, prompt="a hat", **kwargs)
        assert refused.value.errors()[0]["loc"][0] == field


async def test_limits_of_the_deployment_are_checked_once_when_resolved(
    sessions: Sessions,
    settings: Settings,
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
) -> None:
    subject_id = uuid.UUID(await _subject(client, auth, sample_photos))
    async with sessions() as session:
        subject = await session.get(Subject, subject_id)
        assert subject is not None
        for kwargs, field in [
            ({"num_images": settings.max_images + 1}, "num_images"),
            ({"num_images": 4, "candidates": 3}, "candidates"),
            ({"candidates": settings.max_candidates + 1}, "candidates"),
            ({"profile": "sdxl"}, "profile"),
            ({"prompt": "   "}, "prompt"),
        ]:
            request = GenerationSpec.model_validate(
                {"subject_id": subject_id, "prompt": "a hat", **kwargs}
            )
            with pytest.raises(InvalidInput) as refused:
                await request_generation(session, settings, subject.account_id, request)
            assert refused.value.extra == {"field": field}


async def test_defaults_and_choices_are_recorded(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    default = await _generate(client, auth, subject_id)
    assert default["params"]["width"] == default["params"]["height"] == TINY.resolution
    assert default["params"]["scheduler"] == "dpmpp_2m"
    chosen = await _generate(
        client,
        auth,
        subject_id,
        width=96,
        height=128,
        scheduler="euler_a",
        negative_prompt="blurry",
        guidance_scale=3.5,
        steps=7,
        seed=11,
    )
    recorded = chosen["params"]
    assert (recorded["width"], recorded["height"], recorded["scheduler"]) == (96, 128, "euler_a")
    assert (recorded["negative_prompt"], recorded["guidance_scale"], recorded["steps"]) == (
        "blurry",
        3.5,
        7,
    )
    assert recorded["seed"] == 11


# --- a generation job run in-process ---------------------------------------------------


async def _give_subject_a_lora(
    sessions: Sessions, settings: Settings, subject_id: uuid.UUID, lora: bytes
) -> None:
    job_id = uuid.uuid4()
    key = lora_key(subject_id, TINY.name, job_id)
    await blob_store_from_settings(settings).put(key, lora)
    async with session_scope(sessions) as session:
        session.add(
            Lora(
                subject_id=subject_id,
                job_id=job_id,
                profile=TINY.name,
                rank=TINY.lora_rank,
                steps=1,
                blob_key=key,
                bytes=len(lora),
                sha256=hashlib.sha256(lora).hexdigest(),
            )
        )


def _random_tiny_lora(settings: Settings) -> bytes:
    """A LoRA with the tiny profile's keys and shapes and random values."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    from core.ml.pipeline import exclusive
    from core.ml.resident import forget_resident_loras, resident_pipeline

    pipe = resident_pipeline(settings, TINY)
    config = LoraConfig(
        r=TINY.lora_rank, lora_alpha=TINY.lora_alpha, target_modules=list(TINY.lora_target_modules)
    )
    with exclusive(pipe):
        forget_resident_loras(pipe)
        pipe.unet.add_adapter(config, adapter_name="shape")
        try:
            state = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(pipe.unet, adapter_name="shape")
            )
        finally:
            pipe.unload_lora_weights()
    generator = torch.Generator().manual_seed(3)
    return save(
        {f"unet.{k}": torch.randn(v.shape, generator=generator) * 0.3 for k, v in state.items()}
    )


async def _run(sessions: Sessions, settings: Settings, job_id: str) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))  # type: ignore[arg-type]
            .values(status=JobStatus.scheduled.value)
        )
    executor = Executor(
        settings,
        sessions,
        blob_store_from_settings(settings),
        "test-worker",
        {JobKind.generate: run_generation},
    )
    assert await executor.execute(uuid.UUID(job_id)) is JobStatus.succeeded


async def _pngs(client: AsyncClient, auth: dict[str, str], job_id: str) -> list[tuple[bytes, dict]]:
    job = (await client.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert job["status"] == "succeeded", job
    out = []
    for output in job["outputs"]:
        response = await client.get(output["url"].removeprefix("http://testserver"), headers=auth)
        assert response.status_code == 200
        out.append((response.content, output))
    return out


async def test_job_honours_size_and_sampler_and_reproduces_its_images(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    sessions: Sessions,
    settings: Settings,
    tiny_model_dir: Path,
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    lora = await asyncio.to_thread(_random_tiny_lora, settings)
    await _give_subject_a_lora(sessions, settings, uuid.UUID(subject_id), lora)
    options = {"width": 96, "height": 64, "steps": 3, "num_images": 2, "seed": 21}

    first = await _generate(client, auth, subject_id, scheduler="euler_a", **options)
    assert first["depends_on"] is None
    await _run(sessions, settings, first["id"])
    images = await _pngs(client, auth, first["id"])
    assert [output["seed"] for _, output in images] == [21, 22]
    for png, output in images:
        assert Image.open(io.BytesIO(png)).size == (96, 64)
        assert (output["width"], output["height"]) == (96, 64)
    result = (await client.get(f"/v1/jobs/{first['id']}", headers=auth)).json()["result"]
    assert result["scheduler"] == "euler_a" and (result["width"], result["height"]) == (96, 64)
    assert result["lora_sha256"] == hashlib.sha256(lora).hexdigest()

    # The same request again (the LoRA now resident in the worker's cache): same bytes.
    again = await _generate(client, auth, subject_id, scheduler="euler_a", **options)
    await _run(sessions, settings, again["id"])
    assert [png for png, _ in await _pngs(client, auth, again["id"])] == [png for png, _ in images]

    # Another sampler, same seed: different images.
    ddim = await _generate(client, auth, subject_id, scheduler="ddim", **options)
    await _run(sessions, settings, ddim["id"])
    assert [png for png, _ in await _pngs(client, auth, ddim["id"])] != [png for png, _ in images]
