"""The worker's resident models: one base pipeline per profile, loaded once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from core.ml.profiles import Profile

_resident: Any = None


def resident_pipeline(settings: Settings, profile: Profile) -> Any:
    """Load (first call) or return this process's pipeline for the profile."""
    global _resident
    from core.ml.pipeline import ResidentPipelines, resolve_checkpoint

    if _resident is None:
        _resident = ResidentPipelines()
    model_path = settings.model_path if profile.name == settings.profile else None
    path = resolve_checkpoint(profile, settings.models_dir, model_path)
    return _resident.get(path, settings.device, settings.dtype)
