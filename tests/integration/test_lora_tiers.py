"""The worker's LoRA tiers on real Postgres, through the generation handler: a LoRA
held in any tier (resident adapter, host RAM, disk) is never read from the blob
store again, and erasing a subject removes its LoRA from every tier of a worker
that ran ``erase_orphaned_loras``."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.store import LocalBlobStore
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus, Lora, Output, Subject
from core.generations import request_generation
from core.handlers.generate import run_generation
from core.jobs.execution import Executor
from core.jobs.specs import GenerationSpec
from core.ml.profiles import get_profile
from core.settings import Settings
from core.subjects import delete_subject, latest_lora, lora_key

Sessions = async_sessionmaker[AsyncSession]
TINY = get_profile("tiny")


class CountingStore(LocalBlobStore):
    """The local blob store, counting the reads of each key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    async def get(self, key: str) -> bytes:
        self.gets.append(key)
        return await super().get(key)


@pytest.fixture
def tiers(settings: Settings, tmp_path: Path) -> Settings:
    """The session's settings with a disk tier of this test's own."""
    return settings.model_copy(update={"lora_disk_dir": tmp_path / "lora-cache"})


@pytest.fixture
def store(settings: Settings) -> CountingStore:
    return CountingStore(settings.blob_dir)


def _tiny_lora(settings: Settings, seed: int) -> bytes:
    """A LoRA with the tiny profile's keys and shapes and random values."""
    import torch
    from safetensors.torch import save

    from core.ml.pipeline import exclusive
    from core.ml.resident import resident_pipeline
    from tests.unit.test_ml_generation import lora_template

    pipe = resident_pipeline(settings, TINY)
    with exclusive(pipe):
        template = lora_template(pipe)
    generator = torch.Generator().manual_seed(seed)
    return save({k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in template.items()})


async def _subject_with_lora(
    sessions: Sessions, store: CountingStore, account_id: uuid.UUID, lora: bytes
) -> tuple[uuid.UUID, Lora]:
    async with session_scope(sessions) as session:
        subject = Subject(account_id=account_id, class_noun="woman", token="sks")
        session.add(subject)
        await session.flush()
        job_id = uuid.uuid4()
        key = lora_key(subject.id, TINY.name, job_id)
        await store.put(key, lora)
        row = Lora(subject_id=subject.id, job_id=job_id, profile=TINY.name, rank=TINY.lora_rank,
                   steps=1, blob_key=key, bytes=len(lora),
                   sha256=hashlib.sha256(lora).hexdigest())  # fmt: skip
        session.add(row)
    return subject.id, row


async def _generate(
    sessions: Sessions, settings: Settings, store: CountingStore, account: uuid.UUID, subject: Any
) -> bytes:
    """Run one small generation of the subject through the handler; its PNG."""
    spec = GenerationSpec(subject_id=subject, prompt="a wool coat", num_images=1, candidates=1,
                          seed=7, steps=2, width=64, height=64, grounding=False)  # fmt: skip
    async with sessions() as session:
        job = await request_generation(session, settings, account, spec)
        await session.execute(
            update(Job).where(col(Job.id) == job.id).values(status=JobStatus.scheduled.value)
        )
        await session.commit()
    executor = Executor(
        settings, sessions, store, "tier-worker", {JobKind.generate: run_generation}
    )
    assert await executor.execute(job.id) is JobStatus.succeeded
    async with sessions() as session:
        output = (await session.exec(select(Output).where(col(Output.job_id) == job.id))).one()
    return await LocalBlobStore(settings.blob_dir).get(output.blob_key)


async def _account(sessions: Sessions) -> uuid.UUID:
    async with session_scope(sessions) as session:
        return (await create_account_with_key(session, f"tiers-{uuid.uuid4().hex[:6]}")).account_id


def _cache(settings: Settings) -> Any:
    from core.ml.resident import resident_lora_cache, resident_pipeline

    return resident_lora_cache(settings, resident_pipeline(settings, TINY), TINY)


def _forget(settings: Settings, *, host_too: bool) -> None:
    """Drop the resident tier (as a training job does), or the resident and host
    tiers (as a restart does), with the pipeline held as the model thread does."""
    from core.ml.pipeline import exclusive

    cache = _cache(settings)
    with exclusive(cache.pipe):
        if host_too:
            cache.clear()
        else:
            cache.forget_resident()


async def test_a_lora_in_any_local_tier_is_never_fetched_again(
    sessions: Sessions, tiers: Settings, store: CountingStore, tiny_model_dir: Path
) -> None:
    from core.ml.resident import lora_inventory

    account = await _account(sessions)
    lora = await asyncio.to_thread(_tiny_lora, tiers, 11)
    subject, row = await _subject_with_lora(sessions, store, account, lora)
    disk_file = tiers.lora_disk_dir / f"{row.sha256}.safetensors"

    first = await _generate(sessions, tiers, store, account, subject)  # from the blob store
    assert store.gets == [row.blob_key]
    assert disk_file.read_bytes() == lora  # fetched bytes went to the disk tier
    held = await asyncio.to_thread(lora_inventory, tiers)
    assert row.sha256 in set(held.vram) & set(held.host) & set(held.disk)
    stats = _cache(tiers).stats

    assert await _generate(sessions, tiers, store, account, subject) == first  # resident
    _forget(tiers, host_too=False)
    hits = stats.host_hits
    assert await _generate(sessions, tiers, store, account, subject) == first  # host RAM
    assert stats.host_hits == hits + 1
    _forget(tiers, host_too=True)  # only the disk tier is left
    disk_hits = stats.disk_hits
    assert await _generate(sessions, tiers, store, account, subject) == first  # disk
    assert stats.disk_hits == disk_hits + 1
    assert store.gets == [row.blob_key]  # one fetch over four generations

    # A damaged file is never used: the blob store serves it and the file is rewritten.
    disk_file.write_bytes(lora[:-4] + b"oops")
    _forget(tiers, host_too=True)
    assert await _generate(sessions, tiers, store, account, subject) == first
    assert store.gets == [row.blob_key] * 2 and disk_file.read_bytes() == lora

    # The blob gone, and a "restarted" disk tier (a fresh scan of the same directory,
    # budget changed): the disk alone still serves the LoRA.
    await store.delete(row.blob_key)
    _forget(tiers, host_too=True)
    restarted = tiers.model_copy(update={"lora_disk_mib": tiers.lora_disk_mib + 1})
    assert await _generate(sessions, restarted, store, account, subject) == first
    assert store.gets == [row.blob_key] * 2


async def test_erasing_a_subject_removes_its_lora_from_every_tier(
    sessions: Sessions, tiers: Settings, store: CountingStore, tiny_model_dir: Path
) -> None:
    from core.ml.resident import erase_orphaned_loras, lora_inventory

    # LoRAs earlier tests left in this process's host tier have no rows any more.
    await erase_orphaned_loras(tiers, sessions)
    account = await _account(sessions)
    gone_bytes, kept_bytes = await asyncio.gather(
        asyncio.to_thread(_tiny_lora, tiers, 21), asyncio.to_thread(_tiny_lora, tiers, 22)
    )
    gone, gone_row = await _subject_with_lora(sessions, store, account, gone_bytes)
    kept, kept_row = await _subject_with_lora(sessions, store, account, kept_bytes)
    await _generate(sessions, tiers, store, account, gone)
    kept_png = await _generate(sessions, tiers, store, account, kept)
    cache = _cache(tiers)
    slot = cache.adapter_name(gone_row.sha256)
    assert slot is not None and cache.adapter_name(kept_row.sha256) is not None
    held = await asyncio.to_thread(lora_inventory, tiers)
    assert {gone_row.sha256, kept_row.sha256} <= set(held.vram) & set(held.host) & set(held.disk)
    assert await erase_orphaned_loras(tiers, sessions) == []  # both live: nothing evicted

    async with sessions() as session:
        await delete_subject(session, store, account, gone)
        assert await latest_lora(session, gone, TINY.name) is None
    assert await erase_orphaned_loras(tiers, sessions) == [gone_row.sha256]

    # Disk: the file is gone, and no file in the directory holds its bytes, whole
    # or any 4 KiB of its tensor data.
    files = [path for path in tiers.lora_disk_dir.rglob("*") if path.is_file()]
    assert not (tiers.lora_disk_dir / f"{gone_row.sha256}.safetensors").exists()
    assert [path.name for path in files] == [f"{kept_row.sha256}.safetensors"]
    middle = len(gone_bytes) // 2
    pieces = [gone_bytes, gone_bytes[middle : middle + 4096], gone_bytes[-4096:]]
    assert not any(piece in path.read_bytes() for path in files for piece in pieces)
    # Host RAM and the pipeline's adapters, and the inventory a heartbeat publishes.
    after = await asyncio.to_thread(lora_inventory, tiers)
    assert gone_row.sha256 not in after.held()
    assert kept_row.sha256 in set(after.vram) & set(after.host) & set(after.disk)
    assert cache.adapter_name(gone_row.sha256) is None and gone_row.sha256 not in cache.host()
    assert slot not in {name for names in cache.pipe.get_list_adapters().values() for name in names}
    assert after.disk_bytes == len(kept_bytes)

    # The other subject is untouched: same image, still no fetch.
    fetched = len(store.gets)
    assert await _generate(sessions, tiers, store, account, kept) == kept_png
    assert len(store.gets) == fetched


async def test_a_freshly_trained_lora_is_not_taken_for_an_erased_one(
    tiers: Settings, sessions: Sessions, tiny_model_dir: Path
) -> None:
    """A training puts its LoRA in the cache before its row commits with the job:
    the sweep in between must leave it alone (it raced the commit before the pin)."""
    from core.ml.lora_cache import LoraWeights
    from core.ml.pipeline import exclusive
    from core.ml.resident import erase_orphaned_loras, lora_inventory, pin_lora

    fresh = _tiny_lora(tiers, seed=41)
    sha = hashlib.sha256(fresh).hexdigest()
    pin_lora(sha)
    cache = _cache(tiers)
    with exclusive(cache.pipe):
        cache.activate(LoraWeights(sha, fresh))
        cache.deactivate()
    # No row yet, but pinned (earlier tests' erased LoRAs may go in the same sweep).
    assert sha not in await erase_orphaned_loras(tiers, sessions)
    assert sha in lora_inventory(tiers).held()
    # Unpinned and still without a row (the job failed after training): swept.
    from core.ml import resident

    resident._pins.pop(sha)
    assert sha in await erase_orphaned_loras(tiers, sessions)
    assert sha not in lora_inventory(tiers).held()
