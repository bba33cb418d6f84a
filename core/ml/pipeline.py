"""Find, load and keep resident the base diffusion pipeline.

Checkpoints are never downloaded implicitly: ``resolve_checkpoint`` only looks on
disk and names the command that fetches what is missing. The operator command
``python -m core.ml.pipeline download <profile> [--to DIR]`` is that fetch.
"""

from __future__ import annotations

import argparse
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from core.errors import CheckpointMissing, InvalidInput
from core.ml.profiles import PROFILES, Profile, get_profile

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODEL_INDEX = "model_index.json"
# What an SD 1.x repository needs for StableDiffusionPipeline, in safetensors only:
# the hub repositories also hold .bin, fp16, EMA and single-file copies (tens of GB).
SD1_DOWNLOAD_PATTERNS = (
    MODEL_INDEX,
    "scheduler/*.json",
    "tokenizer/*",
    "feature_extractor/*.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
DOWNLOAD_PATTERNS: dict[str, tuple[str, ...]] = {"sd1": SD1_DOWNLOAD_PATTERNS}


def _is_checkpoint(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file()


def _cached_snapshot(hub_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def fetch_command(profile: Profile, target: Path | None) -> str:
    """The shell command that puts ``profile``'s weights where we look."""
    if profile.hub_id is None:
        return f"python -m core.ml.tiny {target}"
    suffix = f" --to {target}" if target is not None else ""
    return f"python -m core.ml.pipeline download {profile.name}{suffix}"


def resolve_checkpoint(profile: Profile, models_dir: Path, model_path: Path | None) -> Path:
    """The directory holding ``profile``'s pipeline, or CheckpointMissing.

    Order: an explicit ``model_path``; ``models_dir/<profile>``; for hub profiles,
    the Hugging Face cache (offline lookup only).
    """
    if model_path is not None:
        if _is_checkpoint(model_path):
            return model_path
        looked_at = [str(model_path)]
        command = fetch_command(profile, model_path)
    else:
        local = models_dir / profile.name
        if _is_checkpoint(local):
            return local
        looked_at = [str(local)]
        if profile.hub_id is not None:
            snapshot = _cached_snapshot(profile.hub_id)
            if snapshot is not None and _is_checkpoint(snapshot):
                return snapshot
            looked_at.append(f"Hugging Face cache entry for {profile.hub_id}")
            command = fetch_command(profile, None)
        else:
            command = fetch_command(profile, local)
    raise CheckpointMissing(
        f"no {profile.name!r} checkpoint found (looked at: {'; '.join(looked_at)}); "
        f"fetch it with: {command}",
        profile=profile.name,
        looked_at=looked_at,
        command=command,
    )


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown dtype {name!r}; known: {', '.join(TORCH_DTYPES)}", dtype=name
        ) from None


def load_pipeline(path: Path, device: str, dtype: str) -> StableDiffusionPipeline:
    """Load a pipeline for inference, with DPM-Solver++ and every weight frozen."""
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        local_files_only=True,
        dtype=torch_dtype(dtype),
        safety_checker=None,
        requires_safety_checker=False,
    )
    # The checkpoint's own schedule (betas, prediction type) with a better sampler.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++"
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # Attention already uses torch's scaled_dot_product_attention (diffusers'
    # default processor on torch 2). Freezing the base weights lets training add
    # LoRA without any base gradient, and keeps generation allocation-free.
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe


_use_locks: weakref.WeakKeyDictionary[StableDiffusionPipeline, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_use_locks_guard = threading.Lock()


@contextmanager
def exclusive(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """Hold ``pipe`` alone: training and generation both attach a LoRA adapter to
    the shared UNet, so two jobs on one pipeline at once would see each other's."""
    with _use_locks_guard:
        lock = _use_locks.setdefault(pipe, threading.Lock())
    with lock:
        yield


class ResidentPipelines:
    """Pipelines loaded once per process, keyed by (path, device, dtype)."""

    def __init__(self) -> None:
        self._pipelines: dict[tuple[str, str, str], StableDiffusionPipeline] = {}
        # Held while loading too, so two threads never load the same model twice.
        self._lock = threading.Lock()

    def get(self, path: Path, device: str, dtype: str) -> StableDiffusionPipeline:
        key = (str(Path(path).resolve()), device, dtype)
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None:
                pipe = load_pipeline(Path(key[0]), device, dtype)
                self._pipelines[key] = pipe
            return pipe

    def clear(self) -> None:
        with self._lock:
            self._pipelines.clear()


def download(profile: Profile, to: Path | None) -> Path:
    """Fetch ``profile``'s weights from the hub (network needed) and return where."""
    from huggingface_hub import snapshot_download

    if profile.hub_id is None:
        from core.settings import Settings

        target = to or Settings().models_dir / profile.name
        raise InvalidInput(
            f"profile {profile.name!r} is built locally, not downloaded; "
            f"run: {fetch_command(profile, target)}"
        )
    patterns = DOWNLOAD_PATTERNS.get(profile.family)
    if patterns is None:
        raise InvalidInput(f"no download recipe for model family {profile.family!r}")
    where = snapshot_download(profile.hub_id, local_dir=to, allow_patterns=list(patterns))
    return Path(where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.ml.pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download a profile's weights (needs internet)")
    fetch.add_argument("profile", choices=sorted(PROFILES))
    fetch.add_argument("--to", type=Path, default=None, help="directory (default: the HF cache)")
    args = parser.parse_args(argv)
    try:
        where = download(get_profile(args.profile), args.to)
    except InvalidInput as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    except OSError as error:  # network and disk failures from huggingface_hub
        print(f"error: download of {args.profile!r} failed: {error}", file=sys.stderr)
        return 1
    print(f"{args.profile} weights are in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
