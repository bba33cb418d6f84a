"""End to end on a fleet: the HTTP API, a real scheduler and two real GPU-worker
processes on the CPU, declared as an RTX 4090 (24 GiB) and an RTX 5090 (32 GiB),
each with its own local LoRA cache, sharing one S3 store (SeaweedFS).

- A training expected to peak at 20 GiB goes to the 4090 (best fit); that worker
  has 16 GiB in truth (``--oom-above``), runs out of memory, and the job is placed
  again on the 5090, where it succeeds; the user's generation then goes to the
  5090, which holds the LoRA.
- A worker killed with SIGKILL mid-training: the job is placed on the other GPU
  and resumes there from the checkpoint the first one wrote to the shared store.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient
from pydantic import SecretStr
from sqlmodel import col, select

from core.db.engine import session_scope
from core.db.models import Job, Worker
from core.settings import Settings
from tests.conftest import S3Server
from tests.e2e.conftest import Processes
from tests.e2e.test_look_flow import _finished, _subject, _wait

pytestmark = pytest.mark.e2e

COSTS = {"train:tiny:64:default": 20, "generate:tiny:64:default": 3}  # peak GiB


def _cost_table(path: Path) -> Path:
    rows = {
        shape: {"peak_vram_gib": gib, "seconds_per_unit": 0.2, "unit": "step", "source": "test"}
        for shape, gib in COSTS.items()
    }
    path.write_text(json.dumps({"rows": rows}))
    return path


@pytest.fixture
async def fleet_settings(
    settings: Settings, seaweedfs: S3Server, tmp_path: Path
) -> AsyncIterator[Settings]:
    yield settings.model_copy(
        update={
            "blob_url": f"s3://{seaweedfs.bucket}/fleet-{uuid.uuid4().hex}",
            "s3_endpoint_url": seaweedfs.endpoint_url,
            "s3_region": "us-east-1",
            "s3_access_key_id": "atelier-test",
            "s3_secret_access_key": SecretStr("atelier-test"),
            "cost_table": _cost_table(tmp_path / "costs.json"),
            "checkpoint_every": 2,
        }
    )


@pytest.fixture
async def fleet_client(fleet_settings: Settings, sessions: object) -> AsyncIterator[AsyncClient]:
    from api.app import create_app

    app = create_app(fleet_settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


@pytest.fixture
def fleet(fleet_settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(fleet_settings, tmp_path)
    yield procs
    procs.stop_all()


def _start_gpus(fleet: Processes, tmp_path: Path, oom_on_4090: bool) -> dict[str, Any]:
    fleet.scheduler()
    extra = ("--oom-above", "16GiB") if oom_on_4090 else ()
    return {
        name: fleet.worker(
            name, gpu=name, vram=vram, extra=extra if name == "rtx4090" else (),
            env={"ATELIER_LORA_DISK_DIR": str(tmp_path / f"lora-cache-{name}")},
        )
        for name, vram in (("rtx4090", "24GiB"), ("rtx5090", "32GiB"))
    }  # fmt: skip


async def _worker_ids(sessions: Any, within: float = 120) -> dict[str, str]:
    """GPU name -> worker id, once both workers have registered."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with session_scope(sessions) as session:
            rows = (await session.exec(select(Worker).where(col(Worker.pool) == "gpu"))).all()
        ids = {row.name: row.id for row in rows if row.stopped_at is None}
        if len(ids) == 2:
            return ids
        await asyncio.sleep(0.5)
    raise AssertionError("the two GPU workers never registered")


async def _row(sessions: Any, job_id: str) -> Job:
    async with sessions() as session:
        job = await session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


async def _published(sessions: Any, sha: str) -> list[str]:
    """The workers whose published inventory lists the LoRA, in any tier."""
    async with session_scope(sessions) as session:
        rows = (await session.exec(select(Worker).where(col(Worker.pool) == "gpu"))).all()
    return [w.id for w in rows if any(sha in held for held in (w.loras or {}).values())]


def _on_disk(dirs: list[Path], sha: str) -> list[str]:
    """Files under the workers' LoRA directories named for the LoRA (temp files too)."""
    return [str(p) for d in dirs if d.exists() for p in d.rglob("*") if sha in p.name]


async def test_out_of_memory_moves_training_to_the_5090_and_the_look_follows_its_lora(
    fleet_client: AsyncClient, auth: dict[str, str], sample_photos: list,
    fleet: Processes, sessions: Any, redis: Any, tmp_path: Path,
) -> None:  # fmt: skip
    _start_gpus(fleet, tmp_path, oom_on_4090=True)
    ids = await _worker_ids(sessions)
    subject = await _subject(fleet_client, auth, sample_photos)
    body = {"subject_id": subject, "prompt": "a wool coat", "num_images": 1, "seed": 7}
    generation = (await fleet_client.post("/v1/generations", headers=auth, json=body)).json()
    training = await _wait(fleet_client, auth, generation["depends_on"], _finished)
    assert training["status"] == "succeeded", (training, fleet.log("rtx4090"))
    # The 4090 ran out of memory; the job was placed again, on the 5090 only.
    assert "ran out of device memory" in fleet.log("rtx4090")
    assert training["attempts"] == 1  # the out-of-memory spent no attempt

    done = await _wait(fleet_client, auth, generation["id"], _finished)
    assert done["status"] == "succeeded", (done, fleet.log("rtx5090"))
    train_row, gen_row = await _row(sessions, training["id"]), await _row(sessions, done["id"])
    assert train_row.placed_on == ids["rtx5090"] and train_row.vram_floor_bytes > 24 * 2**30
    placed_log = [line for line in fleet.log("scheduler").splitlines() if "placed on" in line]
    async with session_scope(sessions) as session:
        rows = (await session.exec(select(Worker))).all()
    seen = [(w.name, w.profiles, w.loras, w.inventory_at, w.last_seen) for w in rows]
    assert gen_row.placed_on == ids["rtx5090"], (gen_row.placement, placed_log, seen)
    assert gen_row.placement and gen_row.placement["reason"].startswith("affinity-lora")
    assert gen_row.peak_vram_bytes == 3 * 2**30  # the declared peak: a CPU host measures none

    # Erasing the subject evicts its LoRA from every tier of every worker: the
    # published inventories forget it and no LoRA file holds its bytes any more.
    sha = gen_row.result["lora_sha256"] if gen_row.result else ""
    lora_dirs = [tmp_path / f"lora-cache-{name}" for name in ("rtx4090", "rtx5090")]
    assert any((d / f"{sha}.safetensors").exists() for d in lora_dirs)  # the 5090 kept it
    assert await _published(sessions, sha)
    assert (await fleet_client.delete(f"/v1/subjects/{subject}", headers=auth)).status_code == 204
    deadline = time.monotonic() + 30
    while await _published(sessions, sha) or _on_disk(lora_dirs, sha):
        assert time.monotonic() < deadline, (fleet.log("rtx5090"), _on_disk(lora_dirs, sha))
        await asyncio.sleep(0.2)


async def test_a_killed_workers_training_resumes_on_the_other_gpu(
    fleet_client: AsyncClient, auth: dict[str, str], sample_photos: list,
    fleet: Processes, sessions: Any, redis: Any, tmp_path: Path,
) -> None:  # fmt: skip
    workers = _start_gpus(fleet, tmp_path, oom_on_4090=False)
    ids = await _worker_ids(sessions)
    subject = await _subject(fleet_client, auth, sample_photos)
    train = f"/v1/subjects/{subject}/train"
    job_id = (await fleet_client.post(train, headers=auth, json={"steps": 40})).json()["id"]
    await _wait(fleet_client, auth, job_id, lambda j: j["progress_detail"].get("step", 0) >= 4)
    assert (await _row(sessions, job_id)).worker_id == ids["rtx4090"]  # best fit for 20 GiB
    workers["rtx4090"].send_signal(signal.SIGKILL)
    done = await _wait(fleet_client, auth, job_id, _finished, within=300)
    assert done["status"] == "succeeded", (done, fleet.log("rtx5090"))
    assert (await _row(sessions, job_id)).worker_id == ids["rtx5090"] and done["attempts"] == 2
    # It resumed from the checkpoint the 4090 wrote to the shared store.
    assert done["result"]["resumed_from_step"] >= 2


async def test_a_waiting_look_preempts_a_long_training_which_resumes_losing_no_step(
    fleet_client: AsyncClient, auth: dict[str, str], sample_photos: list,
    fleet_settings: Settings, sessions: Any, redis: Any, tmp_path: Path, tiny_model_dir: Path,
) -> None:  # fmt: skip
    quick = fleet_settings.model_copy(
        update={"placement_preempt_after_s": 2.0, "placement_preempt_min_remaining_s": 5.0}
    )
    procs = Processes(quick, tmp_path)
    try:
        procs.scheduler()
        procs.worker("rtx5090", gpu="rtx5090", vram="32GiB")
        shopper = await _subject(fleet_client, auth, sample_photos)  # has a LoRA first
        first = f"/v1/subjects/{shopper}/train"
        ready = (await fleet_client.post(first, headers=auth, json={"steps": 2})).json()
        trained_first = await _wait(fleet_client, auth, ready["id"], _finished)
        assert trained_first["status"] == "succeeded", trained_first["error"]
        other = await _subject(fleet_client, auth, sample_photos)
        train = f"/v1/subjects/{other}/train"
        long = (await fleet_client.post(train, headers=auth, json={"steps": 400})).json()["id"]
        await _wait(fleet_client, auth, long, lambda j: j["progress_detail"].get("step", 0) >= 3)
        body = {"subject_id": shopper, "prompt": "a coat", "num_images": 1, "seed": 3}
        look = (await fleet_client.post("/v1/generations", headers=auth, json=body)).json()
        assert look["depends_on"] is None  # runnable at once, but the GPU is busy
        done = await _wait(fleet_client, auth, look["id"], _finished, within=120)
        assert done["status"] == "succeeded", (done, procs.log("rtx5090"))
        yielded = await _row(sessions, long)
        assert yielded.status != "succeeded"  # the look did not wait for it to end
        assert "yielded its GPU to a look" in procs.log("rtx5090")
        trained = await _wait(fleet_client, auth, long, _finished, within=600)
        assert trained["status"] == "succeeded" and trained["attempts"] == 1
        assert trained["result"]["resumed_from_step"] >= 3  # from the yield's checkpoint
    finally:
        procs.stop_all()
