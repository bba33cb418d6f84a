"""The worker's resident models: one base pipeline per profile, loaded once."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from core.ml.profiles import Profile

_resident: Any = None


def offline_quiet_env() -> None:
    """Call before importing diffusers/transformers: weights are only ever read from
    local files, and the console shows job progress, not library progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def resident_pipeline(settings: Settings, profile: Profile) -> Any:
    """Load (first call) or return this process's pipeline for the profile."""
    global _resident
    from core.ml.pipeline import ResidentPipelines, resolve_checkpoint

    if _resident is None:
        _resident = ResidentPipelines()
    model_path = settings.model_path if profile.name == settings.profile else None
    path = resolve_checkpoint(profile, settings.models_dir, model_path)
    return _resident.get(path, settings.device, settings.dtype)


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
