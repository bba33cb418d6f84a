"""End to end: the HTTP API, a real scheduler and a real worker process, tiny profile.

photos + prompt -> training -> 4 images, plus the failures the service must
survive: a worker killed with SIGKILL mid-training, Redis losing its data,
and a cancel while running.
"""

from __future__ import annotations

import asyncio
import io
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from httpx import AsyncClient
from PIL import Image
from redis.asyncio import Redis
from sqlmodel import col, select

from core.db.engine import session_scope
from core.db.models import Worker
from core.ml.profiles import get_profile
from core.settings import Settings
from tests.conftest import photo_files
from tests.e2e.conftest import Processes

pytestmark = pytest.mark.e2e

FINAL = {"succeeded", "failed", "canceled"}


async def _subject(client: AsyncClient, auth: dict[str, str], photos: list) -> str:
    response = await client.post("/v1/subjects", headers=auth, files=photo_files(photos))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _train(
    client: AsyncClient, auth: dict[str, str], subject_id: str, steps: int
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/subjects/{subject_id}/train", headers=auth, json={"steps": steps}
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


async def _wait(
    client: AsyncClient,
    auth: dict[str, str],
    job_id: str,
    until: Callable[[dict[str, Any]], bool],
    within: float = 180,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        if until(job):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the state; last seen: {job}")


async def _registered(sessions: Any, within: float = 60) -> None:
    """Until a GPU worker has registered (and so can be placed on)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with session_scope(sessions) as session:
            if (await session.exec(select(Worker).where(col(Worker.pool) == "gpu"))).first():
                return
        await asyncio.sleep(0.2)
    raise AssertionError("no GPU worker registered")


def _finished(job: dict[str, Any]) -> bool:
    return job["status"] in FINAL


async def test_photos_and_prompt_to_four_images(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    stack: int,
    settings: Settings,
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    response = await client.post(
        "/v1/generations",
        headers=auth,
        json={"subject_id": subject_id, "prompt": "a Harry Potter costume", "seed": 1234},
    )
    assert response.status_code == 202, response.text
    generation = response.json()

    training = await _wait(client, auth, generation["depends_on"], _finished)
    assert training["status"] == "succeeded", training
    assert training["result"]["steps"] == settings.train_steps
    assert training["attempts"] == 1 and training["progress"] == 1.0

    done = await _wait(client, auth, generation["id"], _finished)
    assert done["status"] == "succeeded", done
    assert [o["seed"] for o in done["outputs"]] == [1234, 1235, 1236, 1237]
    pixels = set()
    for output in done["outputs"]:
        image = await client.get(output["url"].removeprefix("http://testserver"), headers=auth)
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.content)) as png:
            assert png.format == "PNG" and png.size == (output["width"], output["height"])
            pixels.add(png.tobytes())
    assert len(pixels) == 4  # four different images, not one copied

    async with AsyncClient() as plain:
        metrics = (await plain.get(f"http://127.0.0.1:{stack}/metrics")).text
    assert 'atelier_job_duration_seconds_count{kind="generate",outcome="succeeded"} 1.0' in metrics
    assert 'atelier_job_duration_seconds_count{kind="train",outcome="succeeded"} 1.0' in metrics

    # Erasing the subject removes its photos, LoRA and outputs, rows and bytes.
    assert (await client.delete(f"/v1/subjects/{subject_id}", headers=auth)).status_code == 204
    first = done["outputs"][0]["url"].removeprefix("http://testserver")
    assert (await client.get(first, headers=auth)).status_code == 404
    assert not (settings.blob_dir / "subjects" / subject_id).exists()


async def test_worker_killed_mid_training_is_retried(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    processes: Processes,
    sessions: object,
    redis: Redis,
    settings: Settings,
) -> None:
    every = settings.checkpoint_every or get_profile(settings.profile).checkpoint_every
    total = 3 * every  # the kill lands after the first checkpoint, well before the end
    assert every > 0
    processes.scheduler()
    victim = processes.worker("victim")
    subject_id = await _subject(client, auth, sample_photos)
    train = await _train(client, auth, subject_id, steps=total)
    # Past the first checkpoint, which is written before its step is reported.
    running = await _wait(
        client, auth, train["id"], lambda j: j["progress_detail"].get("step", 0) >= every + 1
    )
    assert running["status"] == "running" and running["progress_detail"]["total"] == total
    checkpoints = settings.blob_dir / "subjects" / subject_id / "checkpoints"
    assert (checkpoints / train["id"] / "latest").is_file()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    processes.worker("rescuer")

    def retried(job: dict[str, Any]) -> bool:
        training = job["attempts"] == 2 and job["stage"] == "training"
        return _finished(job) or (training and job["progress_detail"].get("step", 0) > 0)

    second = await _wait(client, auth, train["id"], retried)
    if not _finished(second):  # progress counts the whole run's steps, not the attempt's
        assert every < second["progress_detail"]["step"] <= total, second
        assert second["progress_detail"]["total"] == total
    done = await _wait(client, auth, train["id"], _finished)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    # The second attempt went on from the victim's last checkpoint, to the same total.
    assert done["result"]["resumed_from_step"] >= every
    assert done["result"]["resumed_from_step"] % every == 0
    assert done["result"]["steps"] == total
    assert "lost" in processes.log("scheduler")
    assert "resuming from step" in processes.log("rescuer")
    assert not checkpoints.exists()  # deleted once the job succeeded


async def test_redis_flush_loses_no_job(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    processes: Processes,
    sessions: object,
    redis: Redis,
) -> None:
    processes.scheduler()
    worker = processes.worker()
    subject_id = await _subject(client, auth, sample_photos)
    await _registered(sessions)
    # Paused (well within the heartbeat's staleness), the worker cannot take the
    # message the scheduler sends it: the job waits in Redis.
    worker.send_signal(signal.SIGSTOP)
    try:
        train = await _train(client, auth, subject_id, steps=3)
        await _wait(client, auth, train["id"], lambda j: j["status"] == "scheduled", within=3)
        await redis.flushdb()  # everything the service had in Redis is gone
    finally:
        worker.send_signal(signal.SIGCONT)
    done = await _wait(client, auth, train["id"], _finished)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert "re-sent" in processes.log("scheduler")


async def test_cancel_stops_a_running_job(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    stack: int,
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    train = await _train(client, auth, subject_id, steps=2000)
    await _wait(client, auth, train["id"], lambda j: j["progress_detail"].get("step", 0) >= 1)
    response = await client.post(f"/v1/jobs/{train['id']}/cancel", headers=auth)
    assert response.status_code == 200 and response.json()["cancel_requested"]
    done = await _wait(client, auth, train["id"], _finished, within=30)
    assert done["status"] == "canceled"
    assert done["progress_detail"]["step"] < 2000
    # Nothing was trained, so a generation must train first.
    gen = await client.post(
        "/v1/generations", headers=auth, json={"subject_id": subject_id, "prompt": "a scarf"}
    )
    assert gen.json()["depends_on"] is not None


async def test_stopping_a_worker_hands_its_job_back(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    processes: Processes,
    sessions: object,
    redis: Redis,
) -> None:
    processes.scheduler()
    leaving = processes.worker("leaving")
    subject_id = await _subject(client, auth, sample_photos)
    train = await _train(client, auth, subject_id, steps=20)
    await _wait(client, auth, train["id"], lambda j: j["progress_detail"].get("step", 0) >= 2)
    leaving.send_signal(signal.SIGTERM)  # a deploy, not a crash
    back = await _wait(client, auth, train["id"], lambda j: j["status"] != "running", within=30)
    # Handed back at once, well before the reaper's staleness limit, no attempt spent.
    handed_back = back["status"] in ("queued", "scheduled") and back["attempts"] == 0
    # Seen once in a fresh-clone run (attempts 1): the worker's log says which path it took.
    assert handed_back, (back, processes.log("leaving")[-4000:])
    processes.worker("next")
    done = await _wait(client, auth, train["id"], _finished)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
