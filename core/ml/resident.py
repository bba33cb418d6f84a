"""The worker's resident models: one base pipeline per profile, loaded once, and
one LoRA cache per resident pipeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import MiB, Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable

    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlmodel.ext.asyncio.session import AsyncSession

    from core.ml.lora_disk import LoraDiskCache, LoraInventory
    from core.ml.profiles import Profile

_resident: Any = None
_lora_caches: dict[int, Any] = {}
_lora_caches_guard = threading.Lock()
_lora_disks: dict[tuple[Path, int], LoraDiskCache] = {}
_clip_runtime: Any = None
_index_holder: Any = None


def offline_quiet_env() -> None:
    """Call before importing diffusers/transformers: weights are only ever read from
    local files, and the console shows job progress, not library progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _checkpoint_path(settings: Settings, profile: Profile) -> Path:
    from core.ml.pipeline import resolve_checkpoint

    model_path = settings.model_path if profile.name == settings.profile else None
    return resolve_checkpoint(profile, settings.models_dir, model_path)


def resident_pipeline(settings: Settings, profile: Profile, job_peak_bytes: int = 0) -> Any:
    """Load (first call) or return this process's pipeline for the profile. The least
    recently used others are evicted while the device's memory (``device_vram_bytes``)
    cannot hold them beside a job whose expected peak is ``job_peak_bytes``."""
    global _resident
    from core.ml.pipeline import ResidentPipelines

    if _resident is None:
        _resident = ResidentPipelines(settings.device_vram_bytes, on_evict=_forget_pipeline)
    path = _checkpoint_path(settings, profile)
    return _resident.get(
        path,
        settings.device,
        settings.dtype,
        profile.family,
        profile=profile.name,
        job_peak_bytes=job_peak_bytes,
    )


def _forget_pipeline(pipe: Any) -> None:
    """An evicted pipeline's LoRA cache goes with it (it holds the pipeline)."""
    with _lora_caches_guard:
        _lora_caches.pop(id(pipe), None)


def held_pipelines() -> list[tuple[str, int]]:
    """(profile, bytes) of the base pipelines this process holds, least recent first."""
    return _resident.held() if _resident is not None else []


def resident_checkpoint_identity(settings: Settings, profile: Profile) -> str:
    """The contents digest of the checkpoint the profile's pipeline loads from
    (``core.ml.checkpoint_identity``; computed once per process and checkpoint)."""
    from core.ml.checkpoint_identity import cached_checkpoint_identity

    return cached_checkpoint_identity(_checkpoint_path(settings, profile))


def resident_lora_cache(settings: Settings, pipe: Any, profile: Profile) -> Any:
    """The ``LoraCache`` of a resident pipeline (created on first use), its disk tier
    the settings' (``resident_lora_disk``)."""
    from core.ml.lora_cache import LoraCache

    disk = resident_lora_disk(settings)
    with _lora_caches_guard:
        cache = _lora_caches.get(id(pipe))
        if cache is None or cache.pipe is not pipe:
            cache = LoraCache(
                pipe,
                # A compiled UNet hotswaps every user into one adapter slot.
                max_resident=1 if settings.compile_unet else settings.lora_max_resident,
                max_host_bytes=settings.lora_host_mib * MiB,
                compile=settings.compile_unet,
                target_rank=profile.lora_rank,
            )
            _lora_caches[id(pipe)] = cache
        # The same object every call in a worker; tests pass settings of their own.
        cache.disk = disk
        return cache


def resident_lora_disk(settings: Settings) -> LoraDiskCache:
    """This process's disk tier over ``lora_disk_dir`` (swept on first use: see
    ``core.ml.lora_disk``); with ``lora_disk_mib`` 0 it holds nothing."""
    from core.ml.lora_disk import LoraDiskCache

    key = (settings.lora_disk_dir.resolve(), settings.lora_disk_mib * MiB)
    with _lora_caches_guard:
        disk = _lora_disks.get(key)
        if disk is None:
            disk = _lora_disks[key] = LoraDiskCache(*key)
        return disk


def _lora_cache_list() -> list[Any]:
    with _lora_caches_guard:
        return list(_lora_caches.values())


def lora_inventory(settings: Settings) -> LoraInventory:
    """What this worker holds in every LoRA tier, for its heartbeat: the resident
    and host tiers of each pipeline's cache, and the disk tier. Waits for a LoRA
    switch in progress: call it off the event loop (``asyncio.to_thread``)."""
    inventory = resident_lora_disk(settings).inventory()
    for cache in _lora_cache_list():
        inventory = inventory.merged(cache.inventory(with_disk=False))
    return inventory


def evict_loras(settings: Settings, shas: Iterable[str]) -> list[str]:
    """Remove these LoRAs from every tier of this worker (the adapters, the state
    dicts, the files); return the sha256s some tier held. The files go first, at
    once; then each pipeline is held (``exclusive``) to delete the adapters, which
    waits for a running job on it: call it off the event loop, and never from code
    that holds a pipeline already."""
    from core.ml.pipeline import exclusive

    doomed = set(shas)
    erased = set(resident_lora_disk(settings).evict(doomed))
    for cache in _lora_cache_list():
        with exclusive(cache.pipe):
            erased.update(cache.evict(doomed))
    return sorted(erased)


async def live_lora_shas(session: AsyncSession, shas: Collection[str]) -> set[str]:
    """Those of ``shas`` some ``lora`` row still has (its subject not erased)."""
    from sqlmodel import col, select

    from core.db.models import Lora

    if not shas:
        return set()
    query = select(Lora.sha256).where(col(Lora.sha256).in_(list(shas))).distinct()
    return set((await session.exec(query)).all())


async def erase_orphaned_loras(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    compute: Callable[..., Awaitable[Any]] | None = None,
) -> list[str]:
    """Evict from every tier each LoRA this worker holds that no ``lora`` row has any
    more (``core.subjects.delete_subject`` erased its subject); return them.

    Any worker may run it, at any time (its heartbeat, say): Postgres says what is
    live. ``compute`` runs the tier work (default ``asyncio.to_thread``; a GPU
    worker passes its model thread's runner).
    """
    import asyncio

    run = compute or asyncio.to_thread
    # The inventory reads the caches' own records (thread-safe): no model thread needed.
    held = (await asyncio.to_thread(lora_inventory, settings)).held()
    async with sessions() as session:
        live = await live_lora_shas(session, held)
    orphans = held - live - _pinned(live)
    if not orphans:
        return []
    erased: list[str] = await run(evict_loras, settings, orphans)
    return erased


# LoRAs a running training put in the cache before its ``lora`` row commits with the
# job's success (sha256 -> monotonic expiry): the sweep must not take them for an
# erased subject's. A pin ends once the row is seen, or after PIN_S if it never comes.
_pins: dict[str, float] = {}
_pins_guard = threading.Lock()
PIN_S = 600.0


def pin_lora(sha256: str) -> None:
    with _pins_guard:
        _pins[sha256] = time.monotonic() + PIN_S


def _pinned(live: set[str]) -> set[str]:
    """The pinned LoRAs still waiting for their row (dropping the others' pins)."""
    now = time.monotonic()
    with _pins_guard:
        for sha in [s for s, until in _pins.items() if s in live or until < now]:
            del _pins[sha]
        return set(_pins)


def forget_resident_loras(pipe: Any) -> None:
    """For the training path: the pipeline's adapters are about to be wiped (training
    ends with ``unload_lora_weights``). Call with the pipeline held, or before
    training on the worker's single model thread."""
    with _lora_caches_guard:
        cache = _lora_caches.get(id(pipe))
    if cache is not None and cache.pipe is pipe:
        cache.forget_resident()


def resident_clip_runtime(settings: Settings) -> Any:
    """This process's fashion-CLIP base (loaded once) and its versions' heads."""
    global _clip_runtime
    from core.ml.fashion_clip.runtime import ClipRuntime

    if _clip_runtime is None:
        _clip_runtime = ClipRuntime.load(settings)
    return _clip_runtime


async def resident_catalog_index(settings: Settings, session: Any) -> Any:
    """This process's catalog index (reloaded when Postgres says it changed)."""
    global _index_holder
    from core.shop.catalog_index import IndexHolder

    if _index_holder is None:
        _index_holder = IndexHolder(settings.clip_profile, settings.index_check_s)
    return await _index_holder.current(session)


def warm_up(settings: Settings) -> None:
    """Import the model stack and load the profile's pipeline before taking jobs.

    Importing torch and diffusers holds the GIL for seconds; done inside a job it
    would starve the heartbeat. A missing checkpoint is not fatal here: jobs fail
    with the error that names it.
    """
    import logging

    from core.errors import CheckpointMissing
    from core.ml import generate, train  # noqa: F401  (imported for their import cost)
    from core.ml.profiles import get_profile

    try:
        resident_pipeline(settings, get_profile(settings.profile))
    except CheckpointMissing as exc:
        logging.getLogger("atelier.worker").warning("%s", exc.detail)
