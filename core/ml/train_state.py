"""A resumable snapshot of a DreamBooth-LoRA training run, and its file format.

A ``TrainState`` holds everything the remaining steps depend on: the values of
the trainable LoRA parameters, the optimizer's state (Adam moments and step
counts), the gradient scaler's state (fp16 only), the state of the one random
generator every step draws from, the step reached and the loss history. Resuming
from it and running to the end gives the same LoRA as an uninterrupted run (bit
for bit on CPU, where every kernel here is deterministic).

No other random source matters: the base weights are frozen, SD 1.x, SDXL and CLIP
have no active dropout, LoRA dropout is 0, the adapter's initial values are
overwritten by the snapshot, and gradient checkpointing restores torch's global
RNG around its recomputation. So the process-wide RNG is neither saved nor
touched: the worker shares it with everything else it runs.

On disk it is one ``torch.save`` blob, read back with ``weights_only=True`` (no
arbitrary pickles: only tensors, numbers, strings and containers). One blob, so
one atomic write replaces the previous checkpoint; tensors and the JSON-like
metadata could not be updated together atomically as two files.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

FORMAT = 1


@dataclass
class TrainState:
    step: int  # optimizer steps done
    total: int  # steps the run will have in all
    lora: dict[str, torch.Tensor]  # trainable values by "<component>.<name>" ("unet", ...)
    optimizer: dict[str, Any]  # the optimizer's state_dict(), tensors on the CPU
    optimizer_kind: str  # e.g. "torch.optim.AdamW": a state only loads into the same kind
    generator: torch.Tensor  # get_state() of the CPU generator the steps draw from
    losses: list[float]  # one per step done
    fingerprint: str  # what was trained: a resume must match it (see ``fingerprint``)
    scaler: dict[str, Any] | None = None  # torch.amp.GradScaler state (fp16 on CUDA)
    format: int = field(default=FORMAT)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({name: getattr(self, name) for name in self.__dataclass_fields__}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainState:
        """Raises ValueError for anything that is not a readable checkpoint of this format."""
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip and runtime errors alike
            raise ValueError(f"unreadable training checkpoint: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError("training checkpoint of an unknown format")
        try:
            state = cls(**payload)
        except TypeError as error:
            raise ValueError(f"training checkpoint with unexpected fields: {error}") from error
        if not 0 < state.step < state.total or len(state.losses) != state.step:
            raise ValueError(f"inconsistent training checkpoint at step {state.step}")
        return state


def fingerprint(
    params: Any,
    prompts: list[str],
    images: list[Image.Image],
    extra: dict[str, Any],
    ignore: frozenset[str] = frozenset(),
) -> str:
    """A digest of what a run learns: hyper-parameters (``params``, a dataclass,
    minus the fields in ``ignore``), prompts and the pixels of every training
    image. A checkpoint is only resumed by a run with the same digest."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(params).items() if k not in ignore}
    digest.update(json.dumps([settings, prompts, extra], sort_keys=True, default=str).encode())
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def cpu_copy(value: Any) -> Any:
    """A deep copy of a state_dict-like value with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(item) for item in value)
    return value


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
