"""What a LoRA is to the cache: its bytes and sha256, its parsed tensors, and
which parameters of a pipeline's adapter slot those tensors fill."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.errors import InvalidInput

if TYPE_CHECKING:
    from core.ml.families import Pipeline

StateDict = dict[str, torch.Tensor]
_LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
TEXT_MODEL_PREFIX = "text_model."


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA as core hands it over: its safetensors bytes and their sha256.

    ``data`` may be None when the caller knows the cache holds ``sha256``
    (``LoraCache.contains``); a miss then raises ``LoraNotCached``.
    """

    sha256: str
    data: bytes | None

    @classmethod
    def of(cls, data: bytes) -> LoraWeights:
        return cls(hashlib.sha256(data).hexdigest(), data)


class LoraNotCached(KeyError):
    """``LoraWeights.data`` was None and the cache does not hold that sha256."""


@dataclass
class CacheStats:
    resident_hits: int = 0
    host_hits: int = 0
    parsed: int = 0  # bytes parsed into a state dict (host-tier misses)
    loads: int = 0  # load_lora_weights calls that created a slot
    copies: int = 0  # LoRAs copied into an existing slot
    hotswaps: int = 0  # load_lora_weights(hotswap=True) into an existing slot
    resident_evictions: int = 0
    host_evictions: int = 0
    wipes_detected: int = 0  # slots found gone from the pipeline (training unloaded them)


def state_dict_nbytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def parse_lora(data: bytes) -> StateDict:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:  # safetensors raises its own untyped errors
        raise InvalidInput(f"the LoRA is not a readable safetensors file: {error}") from error


def _as_loaded(component: str, state: StateDict, model: torch.nn.Module) -> StateDict:
    """One component's part of a diffusers LoRA file, keyed as diffusers' loader
    hands it to peft (the same conversions ``load_lora_weights`` applies)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        return state
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(model, "text_model"):
        # Recent transformers flatten CLIPTextModel; the loader strips the prefix then.
        state = {key.removeprefix(TEXT_MODEL_PREFIX): value for key, value in state.items()}
    return state


def with_text_model_prefix(layers: StateDict, encoder: torch.nn.Module) -> StateDict:
    """A CLIP text encoder's LoRA layers keyed as the diffusers file format has them,
    under ``text_model.`` ("text_encoder.text_model.encoder.layers.0...").

    transformers 5 flattened CLIPTextModel (no ``text_model`` submodule), so peft
    names the layers without the prefix; diffusers' current loader strips it again
    for such an encoder (as ``_as_loaded`` does), but loaders on transformers 4,
    and the LoRA files published for SD 1.x and SDXL, have it, and a loader that
    finds no keys it knows skips the text encoder without an error.
    """
    if hasattr(encoder, "text_model"):
        return layers
    return {
        key if key.startswith(TEXT_MODEL_PREFIX) else f"{TEXT_MODEL_PREFIX}{key}": value
        for key, value in layers.items()
    }


def slot_parameter_names(
    pipe: Pipeline, state: StateDict, slot: str
) -> dict[str, torch.Tensor] | None:
    """``state``'s tensors keyed ``"<component>.<parameter name>"`` as
    ``load_lora_weights`` places them in adapter ``slot``; None unless ``state`` is
    a plain LoRA (lora_A/lora_B weights only: no alphas, biases or DoRA) of the
    pipeline's LoRA-loadable components."""
    parts: dict[str, StateDict] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component not in pipe._lora_loadable_modules or not rest:
            return None
        parts.setdefault(component, {})[rest] = value
    named: dict[str, torch.Tensor] = {}
    for component, part in parts.items():
        for key, value in _as_loaded(component, part, getattr(pipe, component)).items():
            if not key.endswith(_LORA_WEIGHT_SUFFIXES):
                return None
            named[f"{component}.{key.removesuffix('.weight')}.{slot}.weight"] = value
    return named or None
