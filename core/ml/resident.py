"""The worker's resident models: one base pipeline per profile, loaded once, and
one LoRA cache per resident pipeline."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import MiB, Settings

if TYPE_CHECKING:
    from core.ml.profiles import Profile

_resident: Any = None
_lora_caches: dict[int, Any] = {}
_lora_caches_guard = threading.Lock()
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


def resident_pipeline(settings: Settings, profile: Profile) -> Any:
    """Load (first call) or return this process's pipeline for the profile."""
    global _resident
    from core.ml.pipeline import ResidentPipelines

    if _resident is None:
        _resident = ResidentPipelines()
    path = _checkpoint_path(settings, profile)
    return _resident.get(path, settings.device, settings.dtype, profile.family)


def resident_checkpoint_identity(settings: Settings, profile: Profile) -> str:
    """The contents digest of the checkpoint the profile's pipeline loads from
    (``core.ml.checkpoint_identity``; computed once per process and checkpoint)."""
    from core.ml.checkpoint_identity import cached_checkpoint_identity

    return cached_checkpoint_identity(_checkpoint_path(settings, profile))


def resident_lora_cache(settings: Settings, pipe: Any, profile: Profile) -> Any:
    """The ``LoraCache`` of a resident pipeline (created on first use)."""
    from core.ml.lora_cache import LoraCache

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
        return cache


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
