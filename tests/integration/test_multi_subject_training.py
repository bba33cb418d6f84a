"""Training several subjects in one run over the API, real Postgres and blob store:
``with_subjects`` validation, one LoRA row and blob copy per subject, generation
with each subject's own token, and erasure of every copy with any one subject."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from httpx import AsyncClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import blob_store_from_settings
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus, Lora, Subject
from core.handlers.generate import run_generation
from core.handlers.train import run_training
from core.jobs.execution import Executor, Handler
from core.settings import Settings
from core.subjects import checkpoint_prefix
from tests.conftest import photo_files

Sessions = async_sessionmaker[AsyncSession]
PROBLEM = "application/problem+json"


async def _subject(
    client: AsyncClient, auth: dict[str, str], photos: list[Any], noun: str
) -> dict[str, Any]:
    files = photo_files(photos[:3])
    response = await client.post(
        "/v1/subjects", headers=auth, files=files, data={"class_noun": noun}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _train(client: AsyncClient, auth: dict[str, str], subject_id: str, **body: Any) -> Any:
    return await client.post(f"/v1/subjects/{subject_id}/train", headers=auth, json=body)


async def _run(sessions: Sessions, settings: Settings, job_id: str, handler: Handler) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            update(Job)
            .where(col(Job.id) == uuid.UUID(job_id))
            .values(status=JobStatus.scheduled.value)
        )
    kind = JobKind.train if handler is run_training else JobKind.generate
    store = blob_store_from_settings(settings)
    executor = Executor(settings, sessions, store, "test-worker", {kind: handler})
    assert await executor.execute(uuid.UUID(job_id)) is JobStatus.succeeded


async def _loras(sessions: Sessions) -> list[Lora]:
    async with sessions() as session:
        return list((await session.exec(select(Lora))).all())


async def test_with_subjects_is_validated(
    client: AsyncClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    sample_photos: list[Any],
    settings: Settings,
) -> None:
    a = (await _subject(client, auth, sample_photos, "woman"))["id"]
    b = (await _subject(client, auth, sample_photos, "man"))["id"]
    theirs = (await _subject(client, other_auth, sample_photos, "man"))["id"]
    cases = {
        "unknown": [str(uuid.uuid4())],
        "other account": [theirs],
        "duplicate": [b, b],
        "the trained one": [a],
        "too many": [b] + [str(uuid.uuid4()) for _ in range(settings.max_subjects_per_run)],
        "not an id": ["nope"],
    }
    for case, others in cases.items():
        response = await _train(client, auth, a, with_subjects=others)
        assert response.status_code == 422, (case, response.text)
        assert response.headers["content-type"] == PROBLEM, case
        problem = response.json()
        assert problem["status"] == 422 and problem["detail"], case
    # Another account's subject reads exactly as an unknown one.
    unknown = (await _train(client, auth, a, with_subjects=[str(uuid.uuid4())])).json()
    other = (await _train(client, auth, a, with_subjects=[theirs])).json()
    assert unknown["field"] == other["field"] == "with_subjects"
    assert unknown["detail"].split()[0] == other["detail"].split()[0] == "subject"

    job = await _train(client, auth, a, steps=2, with_subjects=[b])
    assert job.status_code == 202, job.text
    assert job.json()["params"]["subject_ids"] == [a, b]
    single = await _train(client, auth, a, steps=2)
    assert "subject_ids" not in single.json()["params"]


async def test_subjects_of_an_account_get_distinct_tokens(
    client: AsyncClient, auth: dict[str, str], sample_photos: list[Any], sessions: Sessions
) -> None:
    for noun in ("man", "woman", "person"):
        await _subject(client, auth, sample_photos, noun)
    async with sessions() as session:
        tokens = list((await session.exec(select(Subject.token))).all())
    assert len(set(tokens)) == 3


async def test_two_subject_run_serves_both_and_erasing_one_erases_every_copy(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[Any],
    sessions: Sessions,
    settings: Settings,
    tiny_model_dir: Path,
) -> None:
    a = await _subject(client, auth, sample_photos, "woman")
    b = await _subject(client, auth, sample_photos, "man")
    job = (await _train(client, auth, a["id"], steps=2, with_subjects=[b["id"]])).json()
    # While the run is waiting, a generation for either subject waits on it.
    for subject in (a, b):
        body = {"subject_id": subject["id"], "prompt": "a coat", "num_images": 1, "steps": 2}
        generation = (await client.post("/v1/generations", headers=auth, json=body)).json()
        assert generation["depends_on"] == job["id"]

    fast = settings.model_copy(update={"class_images": 1})  # one per noun
    await _run(sessions, fast, job["id"], run_training)
    result = (await client.get(f"/v1/jobs/{job['id']}", headers=auth)).json()["result"]
    assert result["subject_ids"] == [a["id"], b["id"]] and result["class_images"] == 1

    rows = {str(row.subject_id): row for row in await _loras(sessions)}
    assert set(rows) == {a["id"], b["id"]}
    for subject_id, row in rows.items():
        assert row.trained_with == [a["id"], b["id"]]
        assert row.blob_key.startswith(f"subjects/{subject_id}/")
        blob = settings.blob_dir / row.blob_key
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == row.sha256
    assert rows[a["id"]].sha256 == rows[b["id"]].sha256

    # Generating for B uses B's own copy and B's token.
    body = {"subject_id": b["id"], "prompt": "a coat", "num_images": 1, "steps": 2, "seed": 1}
    generation = (await client.post("/v1/generations", headers=auth, json=body)).json()
    assert generation["depends_on"] is None
    await _run(sessions, settings, generation["id"], run_generation)
    done = (await client.get(f"/v1/jobs/{generation['id']}", headers=auth)).json()["result"]
    assert done["lora_id"] == str(rows[b["id"]].id)
    assert done["prompt"].startswith(f"a photo of {b['token']} man")

    assert (await client.delete(f"/v1/subjects/{b['id']}", headers=auth)).status_code == 204
    # A keeps its photos, but no copy of a LoRA that holds B's likeness.
    assert await _loras(sessions) == []
    assert not (settings.blob_dir / rows[a["id"]].blob_key).exists()
    assert not (settings.blob_dir / "subjects" / b["id"]).exists()
    assert (settings.blob_dir / "subjects" / a["id"] / "photos").is_dir()
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=auth)).status_code == 404
    assert (await client.get(f"/v1/subjects/{a['id']}", headers=auth)).status_code == 200


async def test_erasing_a_subject_erases_waiting_runs_that_include_it(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[Any],
    sessions: Sessions,
    settings: Settings,
) -> None:
    a = await _subject(client, auth, sample_photos, "woman")
    b = await _subject(client, auth, sample_photos, "man")
    run = (await _train(client, auth, a["id"], with_subjects=[b["id"]])).json()
    own = (await _train(client, auth, a["id"])).json()
    # A failed attempt's checkpoint, under A's prefix, holds B's likeness too.
    checkpoint = checkpoint_prefix(uuid.UUID(a["id"]), uuid.UUID(run["id"]))
    await blob_store_from_settings(settings).put(f"{checkpoint}/latest", b"state")

    assert (await client.delete(f"/v1/subjects/{b['id']}", headers=auth)).status_code == 204
    assert (await client.get(f"/v1/jobs/{run['id']}", headers=auth)).status_code == 404
    assert (await client.get(f"/v1/jobs/{own['id']}", headers=auth)).status_code == 200
    assert not (settings.blob_dir / checkpoint).exists()
