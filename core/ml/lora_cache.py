"""Switch subject LoRAs on a resident pipeline without reloading it.

Two tiers, both keyed by the LoRA file's sha256 (the caller hands over bytes and
their sha; this module knows nothing of where they are stored):

* **resident** (tier 1): up to ``max_resident`` peft adapters ("slots") live in
  the pipeline's UNet, each holding one LoRA. Switching among them only changes
  which adapter the LoRA layers apply: milliseconds, no weights move.
* **host** (tier 2): parsed state dicts in host RAM, least recently used first
  out once their total size passes ``max_host_bytes``. A LoRA found here is not
  parsed (or fetched) again.

A LoRA that is not resident goes into a new slot while there are fewer than
``max_resident`` (``load_lora_weights``), else into the least recently used
slot. How it gets there is ``swap``:

* ``"copy"`` (default): copy its tensors into the slot's own (``Tensor.copy_``).
  Exactly what a fresh load computes when the LoRA is a plain one (lora_A/lora_B
  weights only, no alphas, same targets and ranks as the slot, as every LoRA of a
  profile is; UNet and text encoder alike): no peft wrappers are rebuilt, so it
  takes about 2 ms where ``load_lora_weights`` takes 100-300 (SD 1.5, CPU).
  Anything else falls back to "load".
* ``"load"``: ``delete_adapters`` the slot, then ``load_lora_weights`` into it.
* ``"hotswap"``: ``load_lora_weights(..., hotswap=True)`` into the slot, for a
  torch.compile'd UNet: the module structure never changes, so nothing is
  recompiled. ``enable_lora_hotswap(target_rank)`` pads the slots on the first
  load so LoRAs of any rank up to ``target_rank`` fit. ``compile=True`` selects
  it and compiles the UNet in place (``nn.Module.compile``) once the first slot
  exists; give it ``max_resident=1``, since changing the active adapter is a
  recompile too. The tests run the non-compiled path; the compiled one was
  smoke-checked on CPU (docs/benchmarks.md).

Generation without a LoRA runs with every adapter disabled, which computes
exactly the base layers: the output equals a pipeline that never saw a LoRA.

Training shares the pipeline and ends with ``pipe.unload_lora_weights()``,
which removes every adapter, ours included. The training path may say so with
``forget_resident()``; the cache also checks the pipeline's adapter list before
each switch and reloads from the host tier whatever vanished.

Every method that touches the pipeline must run while the caller holds it alone
(``core.ml.pipeline.exclusive``): the adapters live in the shared UNet.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from core.errors import InvalidInput
from core.ml.lora_weights import (
    CacheStats,
    LoraNotCached,
    LoraWeights,
    StateDict,
    parse_lora,
    slot_parameter_names,
    state_dict_nbytes,
)

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.ml.families import Pipeline

SwapMode = Literal["copy", "load", "hotswap"]

SLOT_PREFIX = "atelier_slot_"
# Slot names carry their cache's number: two caches on one pipeline (the resident
# one, a one-shot one in generate_images) never touch each other's adapters.
_cache_numbers = itertools.count()


@dataclass
class _HostEntry:
    state: StateDict
    nbytes: int


class LoraCache:
    """Resident adapters (tier 1) and host-RAM state dicts (tier 2) for one pipeline."""

    def __init__(
        self,
        pipe: Pipeline,
        *,
        max_resident: int = 4,
        max_host_bytes: int = 1 << 30,
        swap: SwapMode = "copy",
        target_rank: int | None = None,
        compile: bool = False,
    ) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if max_host_bytes < 0:
            raise ValueError("max_host_bytes must not be negative")
        if swap not in ("copy", "load", "hotswap"):
            raise ValueError(f"unknown swap mode {swap!r}")
        self.pipe = pipe
        self.max_resident = max_resident
        self.max_host_bytes = max_host_bytes
        self.compile = compile
        self.swap: SwapMode = "hotswap" if compile else swap
        self.target_rank = target_rank
        self.slot_prefix = f"{SLOT_PREFIX}{next(_cache_numbers)}_"
        self.stats = CacheStats()
        # sha256 -> slot, least recently used first.
        self._resident: OrderedDict[str, str] = OrderedDict()
        self._host: OrderedDict[str, _HostEntry] = OrderedDict()
        self._host_bytes = 0
        # Copy mode: each slot's LoRA parameters by name; None if it cannot take copies.
        self._slot_params: dict[str, dict[str, torch.nn.Parameter] | None] = {}
        self._layers: list[BaseTunerLayer] | None = None
        self._direct_switch = True
        self._switch_verified = False
        self._compiled = False
        # Guards the bookkeeping; the pipeline itself is guarded by exclusive(pipe).
        self._lock = threading.RLock()

    # --- inspection -----------------------------------------------------------------

    def resident(self) -> list[str]:
        """sha256 of the resident LoRAs, least recently used first."""
        with self._lock:
            return list(self._resident)

    def host(self) -> list[str]:
        """sha256 of the LoRAs held in host RAM, least recently used first."""
        with self._lock:
            return list(self._host)

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def contains(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._resident or sha256 in self._host

    def adapter_name(self, sha256: str) -> str | None:
        """The peft adapter (slot) holding ``sha256``, if it is resident."""
        with self._lock:
            return self._resident.get(sha256)

    # --- switching ------------------------------------------------------------------

    def activate(self, lora: LoraWeights) -> str:
        """Make ``lora`` the only active adapter, adapters enabled; return its slot."""
        with self._lock:
            self._check_resident_still_there()
            slot = self._resident.get(lora.sha256)
            if slot is not None:
                self.stats.resident_hits += 1
                self._resident.move_to_end(lora.sha256)
            else:
                state = self._host_state(lora)
                try:
                    slot = self._make_resident(lora.sha256, state)
                except Exception:
                    self._drop_host(lora.sha256)  # do not keep what cannot be loaded
                    raise
            self._set_active(slot)
            return slot

    def deactivate(self) -> None:
        """Disable every adapter: the pipeline computes its base weights only."""
        with self._lock:
            self._check_resident_still_there()
            for layer in self._tuner_layers():
                layer.enable_adapters(False)

    def reenable(self) -> None:
        """Undo ``deactivate``. Training adds its adapter to these same layers and
        would otherwise train with adapters disabled (a zero gradient)."""
        with self._lock:
            for layer in self._tuner_layers():
                if layer.disable_adapters:
                    layer.enable_adapters(True)

    @contextmanager
    def applied(self, lora: LoraWeights | None) -> Iterator[str | None]:
        """``lora`` active (for None: every adapter disabled) during the block."""
        if lora is None:
            self.deactivate()
            try:
                yield None
            finally:
                self.reenable()
        else:
            yield self.activate(lora)

    def forget_resident(self) -> None:
        """The pipeline's adapters are, or are about to be, wiped (training ends with
        ``unload_lora_weights``): forget tier 1 and remove what is left of ours.

        When only our adapters are there, the peft wrappers go too and the UNet is
        pristine. Host-tier state dicts stay, so the next activation needs no
        parsing. Call with the pipeline held (``exclusive``).
        """
        with self._lock:
            present = self._present_adapters()
            ours = [slot for slot in self._resident.values() if slot in present]
            if ours and set(ours) == present:
                self.pipe.unload_lora_weights()
            elif ours:
                self._delete_adapters(ours)
            self._resident.clear()
            self._slot_params.clear()
            self._layers = None

    def clear(self) -> None:
        """Forget both tiers (and remove our adapters from the pipeline)."""
        with self._lock:
            self.forget_resident()
            self._host.clear()
            self._host_bytes = 0

    # --- internals -------------------------------------------------------------------

    def _present_adapters(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def _check_resident_still_there(self) -> None:
        """Drop from tier 1 whatever someone else (training) removed from the pipeline."""
        if not self._resident:
            return
        present = self._present_adapters()
        gone = [sha for sha, slot in self._resident.items() if slot not in present]
        for sha in gone:
            self._slot_params.pop(self._resident.pop(sha), None)
        if gone:
            self.stats.wipes_detected += len(gone)
            self._layers = None

    def _host_state(self, lora: LoraWeights) -> StateDict:
        entry = self._host.get(lora.sha256)
        if entry is not None:
            self.stats.host_hits += 1
            self._host.move_to_end(lora.sha256)
            return entry.state
        if lora.data is None:
            raise LoraNotCached(lora.sha256)
        if hashlib.sha256(lora.data).hexdigest() != lora.sha256:
            raise InvalidInput("the LoRA's bytes do not match its recorded sha256")
        state = parse_lora(lora.data)
        self.stats.parsed += 1
        nbytes = state_dict_nbytes(state)
        if nbytes <= self.max_host_bytes:
            self._host[lora.sha256] = _HostEntry(state, nbytes)
            self._host_bytes += nbytes
            while self._host_bytes > self.max_host_bytes:
                _, evicted = self._host.popitem(last=False)
                self._host_bytes -= evicted.nbytes
                self.stats.host_evictions += 1
        return state

    def _drop_host(self, sha256: str) -> None:
        entry = self._host.pop(sha256, None)
        if entry is not None:
            self._host_bytes -= entry.nbytes

    def _make_resident(self, sha256: str, state: StateDict) -> str:
        if len(self._resident) < self.max_resident:
            used = set(self._resident.values())
            names = (f"{self.slot_prefix}{i}" for i in range(len(used) + 1))
            slot = next(name for name in names if name not in used)
            self._remove_slot(slot)  # a leftover the bookkeeping lost, if any
            self._new_slot(slot, state)
        else:
            _, slot = self._resident.popitem(last=False)
            self.stats.resident_evictions += 1
            if self.swap == "copy" and self._copy_into(slot, state):
                self.stats.copies += 1
            elif self.swap == "hotswap":
                self._hotswap_into(slot, state)
            else:
                self._remove_slot(slot)
                self._new_slot(slot, state)
        self._resident[sha256] = slot
        return slot

    def _new_slot(self, slot: str, state: StateDict) -> None:
        if self.swap == "hotswap" and self.target_rank and not self._present_adapters():
            # Pads every slot to target_rank so LoRAs of any rank up to it swap in
            # without a shape change (which would recompile).
            self.pipe.enable_lora_hotswap(target_rank=self.target_rank, check_compiled="ignore")
        if self.swap != "load":
            # peft assigns the tensors it is given; a slot later overwritten in place
            # must not share storage with a host-tier state dict.
            state = {key: value.clone() for key, value in state.items()}
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first that the model has several.
                warnings.simplefilter("ignore")
                self.pipe.load_lora_weights(state, adapter_name=slot)
        except (ValueError, RuntimeError, KeyError) as error:
            # diffusers/peft refuse a LoRA made for another architecture this way.
            raise InvalidInput(f"the LoRA does not fit this pipeline: {error}") from error
        self.stats.loads += 1
        self._layers = None
        self._freeze(slot)
        if self.swap == "copy":
            self._slot_params[slot] = self._copyable_params(slot)
        if self.compile and not self._compiled:
            self.pipe.unet.compile()
            self._compiled = True

    def _remove_slot(self, slot: str) -> None:
        self._slot_params.pop(slot, None)
        if slot in self._present_adapters():
            self._delete_adapters([slot])
            self._layers = None

    def _delete_adapters(self, names: list[str]) -> None:
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; the next switch sets one anyway.
            warnings.simplefilter("ignore")
            self.pipe.delete_adapters(names)

    def _copyable_params(self, slot: str) -> dict[str, torch.nn.Parameter] | None:
        """The slot's LoRA parameters by name, if a copy into them equals a fresh
        load: every layer at scale 1 (alpha == rank, what a plain state dict gets)."""
        for layer in self._tuner_layers():
            scaling = getattr(layer, "scaling", {})
            if slot in scaling and scaling[slot] != 1.0:
                return None
        marker = f".{slot}."
        return {
            f"{component}.{name}": param
            for component in self.pipe._lora_loadable_modules
            if isinstance(model := getattr(self.pipe, component, None), torch.nn.Module)
            for name, param in model.named_parameters()
            if marker in name
        }

    def _copy_into(self, slot: str, state: StateDict) -> bool:
        targets = self._slot_params.get(slot)
        source = slot_parameter_names(self.pipe, state, slot) if targets else None
        if targets is None or source is None or source.keys() != targets.keys():
            return False
        if any(source[name].shape != param.shape for name, param in targets.items()):
            return False
        with torch.no_grad():
            for name, param in targets.items():
                param.copy_(source[name])
        return True

    def _hotswap_into(self, slot: str, state: StateDict) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.pipe.load_lora_weights(state, adapter_name=slot, hotswap=True)
        except Exception:
            # The slot may be half overwritten: remove it rather than serve a mix.
            self._remove_slot(slot)
            raise
        self.stats.hotswaps += 1

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        """The peft LoRA layers of the pipeline's LoRA-loadable models (cached until
        a slot is added or removed)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers: list[BaseTunerLayer] = []
            for component in self.pipe._lora_loadable_modules:
                model = getattr(self.pipe, component, None)
                if isinstance(model, torch.nn.Module):
                    layers.extend(m for m in model.modules() if isinstance(m, BaseTunerLayer))
            self._layers = layers
            self._switch_verified = False
        return self._layers

    def _set_active(self, slot: str) -> None:
        """Make ``slot`` the one adapter every LoRA layer applies.

        ``pipe.set_adapters([slot])`` (and peft's per-layer ``set_adapter``) also
        switches requires_grad on the weights of every adapter of every layer,
        which is nearly all of its cost (10-20 ms among 8 adapters on SD 1.5, CPU)
        and means nothing under the pipeline's no_grad. This sets what those
        calls set for inference, the layer's active-adapter list, and checks once
        per layer list that peft still reads it; otherwise it takes peft's way.
        """
        layers = self._tuner_layers()
        for layer in layers:
            if layer.disable_adapters:
                layer.enable_adapters(True)
        if self._direct_switch and all(hasattr(layer, "_active_adapter") for layer in layers[:1]):
            for layer in layers:
                layer._active_adapter = [slot]
            if not self._switch_verified:
                self._switch_verified = all(layer.active_adapters == [slot] for layer in layers)
                self._direct_switch = self._switch_verified
        if not self._direct_switch:
            for layer in layers:
                layer.set_adapter(slot, inference_mode=True)

    def _freeze(self, slot: str) -> None:
        """Loading marks a new adapter trainable; generation wants no grads."""
        for layer in self._tuner_layers():
            for attribute in layer.adapter_layer_names:
                weights = getattr(layer, attribute, None)
                if weights is not None and slot in weights:
                    weights[slot].requires_grad_(False)
