"""Find, load and keep resident the base diffusion pipeline.

Checkpoints are never downloaded implicitly: ``resolve_checkpoint`` only looks on
disk and names the command that fetches what is missing. The operator command
``python -m core.ml.pipeline download <profile> [--to DIR]`` is that fetch.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from core.errors import CheckpointMissing, InvalidInput
from core.ml.families import MODEL_INDEX, Family, Pipeline, family_of, get_family
from core.ml.profiles import PROFILES, Profile, get_profile

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_FAMILY = "sd1"  # what callers that predate SDXL load


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
        return f"python -m {profile.builder} {target}"
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


def _check_family(path: Path, family: Family) -> None:
    """Refuse a checkpoint of another family: loaded by the wrong pipeline class it
    would fail later and obscurely (or half load)."""
    saved_class = json.loads((path / MODEL_INDEX).read_text()).get("_class_name")
    expected = family.pipeline_class.__name__
    if saved_class != expected:
        raise CheckpointMissing(
            f"{path} holds a {saved_class} checkpoint; the {family.name!r} family "
            f"loads {expected} checkpoints",
            looked_at=[str(path)],
        )


# The pipeline class follows the family: callers that name it get its type.
@overload
def load_pipeline(
    path: Path, device: str, dtype: str, family: Literal["sd1"] = ...
) -> StableDiffusionPipeline: ...
@overload
def load_pipeline(
    path: Path, device: str, dtype: str, family: Literal["sdxl"]
) -> StableDiffusionXLPipeline: ...
@overload
def load_pipeline(path: Path, device: str, dtype: str, family: str) -> Pipeline: ...
def load_pipeline(path: Path, device: str, dtype: str, family: str = DEFAULT_FAMILY) -> Pipeline:
    """Load a ``family`` pipeline for inference, with DPM-Solver++ and every weight
    frozen (text_encoder_2 too, for SDXL)."""
    kind = get_family(family)
    _check_family(path, kind)
    pipe = kind.pipeline_class.from_pretrained(
        path, local_files_only=True, dtype=torch_dtype(dtype), **kind.load_options
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
    for module in kind.modules(pipe).values():
        module.requires_grad_(False)
        module.eval()
    return pipe


_use_locks: weakref.WeakKeyDictionary[Pipeline, threading.Lock] = weakref.WeakKeyDictionary()
_use_locks_guard = threading.Lock()


@contextmanager
def exclusive(pipe: Pipeline) -> Iterator[None]:
    """Hold ``pipe`` alone: training and generation both attach a LoRA adapter to
    the shared UNet, so two jobs on one pipeline at once would see each other's."""
    with _use_locks_guard:
        lock = _use_locks.setdefault(pipe, threading.Lock())
    with lock:
        yield


@dataclass
class _Held:
    pipe: Pipeline
    profile: str
    nbytes: int


def pipeline_bytes(pipe: Pipeline) -> int:
    """The bytes of every weight of the pipeline's models."""
    family = family_of(pipe)
    return sum(
        p.numel() * p.element_size()
        for module in family.modules(pipe).values()
        for p in module.parameters()
    )


def checkpoint_bytes(path: Path) -> int:
    """What loading a checkpoint will take, before it is loaded: its weight files'
    sizes (an upper bound when it is loaded in a smaller dtype than stored)."""
    weights = (".safetensors", ".bin")
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in weights and f.is_file())


class ResidentPipelines:
    """Base pipelines loaded once per process, keyed by (path, device, dtype, family),
    least recently used first. With a ``budget_bytes`` (the device's memory), a job
    evicts the least recently used others until its expected peak (its pipeline
    included) fits beside those left; ``on_evict`` is told of each pipeline dropped."""

    def __init__(
        self, budget_bytes: int = 0, on_evict: Callable[[Pipeline], None] | None = None
    ) -> None:
        self._held: OrderedDict[tuple[str, str, str, str], _Held] = OrderedDict()
        self._budget = budget_bytes
        self._on_evict = on_evict
        # Held while loading too, so two threads never load the same model twice.
        self._lock = threading.Lock()

    def get(
        self,
        path: Path,
        device: str,
        dtype: str,
        family: str = DEFAULT_FAMILY,
        *,
        profile: str = "",
        job_peak_bytes: int = 0,
    ) -> Pipeline:
        """The pipeline, loaded if need be, with room made for a job whose expected
        peak (its pipeline included) is ``job_peak_bytes``."""
        key = (str(Path(path).resolve()), device, dtype, family)
        with self._lock:
            held = self._held.get(key)
            own = held.nbytes if held else checkpoint_bytes(Path(key[0]))
            self._make_room(key, max(own, job_peak_bytes))
            if held is None:
                pipe = load_pipeline(Path(key[0]), device, dtype, family)
                held = _Held(pipe, profile, pipeline_bytes(pipe))
                self._held[key] = held
            self._held.move_to_end(key)
            return held.pipe

    def _make_room(self, keep: tuple[str, str, str, str], needed: int) -> None:
        """Evict the least recently used pipelines but ``keep`` until ``needed`` fits."""
        if not self._budget:
            return
        while True:
            others = [k for k in self._held if k != keep]
            if not others or sum(self._held[k].nbytes for k in others) + needed <= self._budget:
                return
            evicted = self._held.pop(others[0])
            if self._on_evict is not None:
                self._on_evict(evicted.pipe)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the evicted weights back to the device

    def held(self) -> list[tuple[str, int]]:
        """(profile, bytes) of each pipeline held, least recently used first."""
        return [(h.profile, h.nbytes) for h in list(self._held.values())]

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


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
    patterns = get_family(profile.family).download_patterns
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
