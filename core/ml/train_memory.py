"""What a training run keeps on the accelerator, and in which precision it runs.

Training encodes every image with the VAE and (unless they train) every prompt
with the text encoders once, before step 1 (``core.ml.train``). From then on the
steps need only the UNet and the LoRA: the VAE and frozen text encoders are
parked in host memory for the rest of the run and put back when it ends, even on
error or cancel, so generation finds the pipeline as it was. On SD 1.5 in half
precision that is ~0.4 GB of device memory for the steps' activations; on SDXL,
whose second text encoder alone is 695 M parameters, ~1.6 GB.

On a CPU the weights are already in host memory, so nothing moves (and nothing
is freed): the device-memory saving exists on CUDA only, where ``bench/gpu_suite.sh``
measures it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from core.ml.families import family_of

if TYPE_CHECKING:
    from core.ml.families import Pipeline

log = logging.getLogger("atelier.ml.train")

HOST = torch.device("cpu")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(unet: torch.nn.Module, mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of the forward passes, None for plain fp32: the
    profile's ``mixed_precision`` on CUDA; elsewhere the base weights' own dtype
    when it is a half precision (they meet the fp32 LoRA weights), else none."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    if device.type == "cuda" and mixed_precision != "no":
        return AUTOCAST_DTYPES[mixed_precision]
    if dtype != torch.float32:
        return dtype
    if mixed_precision != "no":
        log.info("mixed precision applies on CUDA only; training on %s in fp32", device)
    return None


def autocast(unet: torch.nn.Module, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    device_type = next(unet.parameters()).device.type
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def parkable_modules(pipe: Pipeline, text_encoders_train: bool) -> dict[str, torch.nn.Module]:
    """The modules no training step runs: the VAE, and the text encoders when
    their embeddings were computed up front."""
    family = family_of(pipe)
    modules: dict[str, torch.nn.Module] = {"vae": pipe.vae}
    if not text_encoders_train:
        modules.update(family.text_encoders(pipe))
    return modules


@contextmanager
def parked(pipe: Pipeline, text_encoders_train: bool) -> Iterator[list[str]]:
    """Move the parkable modules off an accelerator for the block; yields the
    names of those moved (none on a CPU)."""
    device = pipe.unet.device
    if device.type == HOST.type:
        yield []
        return
    modules = parkable_modules(pipe, text_encoders_train)
    for module in modules.values():
        module.to(HOST)
    try:
        yield list(modules)
    finally:
        for module in modules.values():
            module.to(device)
