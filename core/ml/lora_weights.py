"""What a LoRA is to the cache: its bytes and sha256, its parsed tensors (and the
host-RAM tier that keeps them), and which parameters of a pipeline's adapter
slot those tensors fill."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from core.errors import InvalidInput

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.ml.families import Pipeline

StateDict = dict[str, torch.Tensor]
_LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
TEXT_MODEL_PREFIX = "text_model."
_HEADER_LENGTH_BYTES = 8
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY: its writers put the
# LoraConfig of each component there as JSON (diffusers >= 0.34).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# kohya-ss sd-scripts' training metadata (train_network.py).
KOHYA_NETWORK_ALPHA = "ss_network_alpha"
KOHYA_NETWORK_ARGS = "ss_network_args"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DOWN_UP_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA as core hands it over: its safetensors bytes and their sha256.

    ``data`` may be None when the caller knows the cache holds ``sha256``
    (``LoraCache.local``); a miss then raises ``LoraNotCached``. ``from_disk``:
    ``data`` was read from the disk tier, which checked it against ``sha256``, so
    it is neither hashed nor written back again.
    """

    sha256: str
    data: bytes | None
    from_disk: bool = False

    @classmethod
    def of(cls, data: bytes) -> LoraWeights:
        return cls(hashlib.sha256(data).hexdigest(), data)


class LoraNotCached(KeyError):
    """``LoraWeights.data`` was None and the cache does not hold that sha256."""


@dataclass
class CacheStats:
    resident_hits: int = 0
    host_hits: int = 0
    disk_hits: int = 0  # LoRAs parsed from the disk tier's bytes
    parsed: int = 0  # bytes parsed into a state dict (host-tier misses)
    loads: int = 0  # load_lora_weights calls that created a slot
    copies: int = 0  # LoRAs copied into an existing slot
    hotswaps: int = 0  # load_lora_weights(hotswap=True) into an existing slot
    resident_evictions: int = 0
    host_evictions: int = 0
    wipes_detected: int = 0  # slots found gone from the pipeline (training unloaded them)
    erased: int = 0  # LoRAs removed by evict()


def state_dict_nbytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class HostTier:
    """Parsed state dicts by sha256 in host RAM, least recently used first out once
    their total passes ``max_bytes``; one larger than the whole budget is not kept.
    Not locked: its ``LoraCache`` holds its own lock around every call."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[StateDict, int]] = OrderedDict()

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._entries

    def shas(self) -> list[str]:
        return list(self._entries)

    def get(self, sha256: str) -> StateDict | None:
        """The state dict, marked most recently used; None if not held."""
        entry = self._entries.get(sha256)
        if entry is None:
            return None
        self._entries.move_to_end(sha256)
        return entry[0]

    def keep(self, sha256: str, state: StateDict) -> int:
        """Hold ``state``; return how many others were evicted for it."""
        nbytes = state_dict_nbytes(state)
        if nbytes > self.max_bytes:
            return 0
        self.drop(sha256)
        self._entries[sha256] = (state, nbytes)
        self.nbytes += nbytes
        evicted = 0
        while self.nbytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed
            evicted += 1
        return evicted

    def drop(self, sha256: str) -> bool:
        entry = self._entries.pop(sha256, None)
        if entry is not None:
            self.nbytes -= entry[1]
        return entry is not None

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def parse_lora(data: bytes) -> StateDict:
    """The LoRA's tensors, with any alpha its safetensors header carries applied.

    ``load_lora_weights`` is handed this state dict, not the file, and a state dict
    has no header: diffusers then takes alpha == rank (scale 1). So the alphas the
    header holds become what diffusers reads from tensors: folded into lora_B for
    diffusers' own ``lora_adapter_metadata``, ``.alpha`` tensors for kohya's.
    """
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as error:  # safetensors raises its own untyped errors
        raise InvalidInput(f"the LoRA is not a readable safetensors file: {error}") from error
    metadata = _header_metadata(data)
    return _with_kohya_alphas(_with_diffusers_alphas(state, metadata), metadata)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The file's ``__metadata__``: a safetensors file starts with the byte length of
    its JSON header (u64, little-endian), then the header."""
    size = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + size])
    metadata = header.get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()}


def _lora_pairs(state: StateDict) -> Iterator[tuple[str, str, str]]:
    """(module, down key, up key) of each LoRA layer, in any of the key spellings
    (peft's lora_A/lora_B; diffusers' lora.down/lora.up, and lora_linear_layer for
    text encoders; kohya's lora_down/lora_up)."""
    for key in state:
        for down, up in _DOWN_UP_SUFFIXES:
            if key.endswith(down):
                module = key.removesuffix(down)
                if module + up in state:
                    yield module, key, module + up


def _component_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' adapter metadata (a LoraConfig per component, its fields written
    "<component>.<field>"; a model's own ``save_lora_adapter`` writes them bare) by
    component, "" for the bare ones."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _matching(patterns: dict[str, float], module: str) -> float | None:
    """peft's pattern lookup (``get_pattern_key``): a key that names the module or a
    suffix of it after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _with_diffusers_alphas(state: StateDict, metadata: dict[str, str]) -> StateDict:
    configs = _component_configs(metadata)
    if not configs:
        return state
    scaled = dict(state)
    for module, down_key, up_key in _lora_pairs(state):
        component, _, name = module.partition(".")
        if component not in configs:  # a bare model's file: no component prefix
            component, name = "", module
        config = configs.get(component)
        if not config or "lora_alpha" not in config:
            continue
        alpha = _matching(config.get("alpha_pattern") or {}, name)
        alpha = config["lora_alpha"] if alpha is None else alpha
        rank = state[down_key].shape[0]
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        # peft scales lora_B's output, its bias included.
        for key in (up_key, up_key.removesuffix(".weight") + ".bias"):
            if key in scaled:
                scaled[key] = state[key] * scale
    return scaled


def _with_kohya_alphas(state: StateDict, metadata: dict[str, str]) -> StateDict:
    """kohya's trainer writes each layer's alpha as a tensor and once more in the
    header; a file some tool stripped of the tensors keeps only the header."""
    network_alpha = _number(metadata.get(KOHYA_NETWORK_ALPHA))
    if network_alpha is None:
        return state
    arguments = json.loads(metadata.get(KOHYA_NETWORK_ARGS) or "{}")
    # kohya's networks/lora.py: 3x3 convolutions use conv_alpha (1.0 when conv_dim is
    # given without it), linear layers and 1x1 convolutions network_alpha.
    conv_alpha = _number(arguments.get("conv_alpha")) or 1.0
    filled = dict(state)
    for module, down_key, _ in _lora_pairs(state):
        if module.startswith(_KOHYA_PREFIXES) and module + ".alpha" not in state:
            down = state[down_key]
            alpha = conv_alpha if down.ndim == 4 and down.shape[2:] != (1, 1) else network_alpha
            filled[module + ".alpha"] = torch.tensor(alpha)
    return filled


def _number(value: object) -> float | None:
    """A header number as text ("8", "8.0"); None when absent or not a number
    (kohya writes "Dynamic" for some network types)."""
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None


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


def tuner_layers(pipe: Pipeline) -> list[BaseTunerLayer]:
    """The peft LoRA layers of the pipeline's LoRA-loadable models."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: list[BaseTunerLayer] = []
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            layers.extend(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    return layers


def slot_parameters(pipe: Pipeline, slot: str) -> dict[str, torch.nn.Parameter]:
    """Adapter ``slot``'s parameters, keyed ``"<component>.<parameter name>"``."""
    marker = f".{slot}."
    return {
        f"{component}.{name}": param
        for component in pipe._lora_loadable_modules
        if isinstance(model := getattr(pipe, component, None), torch.nn.Module)
        for name, param in model.named_parameters()
        if marker in name
    }


def parameters_nbytes(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


def copy_into_slot(targets: dict[str, torch.nn.Parameter], source: StateDict | None) -> bool:
    """Copy ``source`` (``slot_parameter_names``' keys) into a slot's parameters;
    False, copying nothing, unless they match name for name and shape for shape."""
    if source is None or source.keys() != targets.keys():
        return False
    if any(source[name].shape != param.shape for name, param in targets.items()):
        return False
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(source[name])
    return True


def freeze_slot(layers: list[BaseTunerLayer], slot: str) -> None:
    """Loading marks a new adapter trainable; generation wants no grads."""
    for layer in layers:
        for attribute in layer.adapter_layer_names:
            weights = getattr(layer, attribute, None)
            if weights is not None and slot in weights:
                weights[slot].requires_grad_(False)


class AdapterSwitch:
    """Makes ``slot`` the one adapter every LoRA layer applies.

    ``pipe.set_adapters([slot])`` (and peft's per-layer ``set_adapter``) also
    switches requires_grad on the weights of every adapter of every layer, which
    is nearly all of its cost (10-20 ms among 8 adapters on SD 1.5, CPU) and means
    nothing under the pipeline's no_grad. This sets what those calls set for
    inference, the layer's active-adapter list, and checks once per layer list
    (``verified`` False after the list changed) that peft still reads it;
    otherwise it takes peft's way from then on.
    """

    def __init__(self) -> None:
        self.direct = True
        self.verified = False

    def apply(self, layers: list[BaseTunerLayer], slot: str) -> None:
        for layer in layers:
            if layer.disable_adapters:
                layer.enable_adapters(True)
        if self.direct and all(hasattr(layer, "_active_adapter") for layer in layers[:1]):
            for layer in layers:
                layer._active_adapter = [slot]
            if not self.verified:
                self.verified = all(layer.active_adapters == [slot] for layer in layers)
                self.direct = self.verified
        if not self.direct:
            for layer in layers:
                layer.set_adapter(slot, inference_mode=True)
