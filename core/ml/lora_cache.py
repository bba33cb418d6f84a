"""Switch subject LoRAs on a resident pipeline without reloading it.

Three tiers, all keyed by the LoRA file's sha256 (the sha recorded at training;
the caller hands over bytes and that sha, and knows where they are stored):

* **resident** (tier 1): up to ``max_resident`` peft adapters ("slots") live in
  the pipeline's UNet, each holding one LoRA. Switching among them only changes
  which adapter the LoRA layers apply: milliseconds, no weights move.
* **host** (tier 2): parsed state dicts in host RAM, least recently used first
  out once their total size passes ``max_host_bytes``; not parsed again.
* **disk** (tier 3, optional): the files on the worker's disk (``core.ml.lora_disk``,
  shared by the process's pipelines, kept across restarts). ``local(sha)`` tells
  the caller whether it must fetch the bytes at all; fetched bytes go there.

Bytes enter a tier only once their sha256 matched the one asked for (the disk
tier checks its files at every read): each tier serves the bytes recorded at
training. ``inventory()`` lists each tier; ``evict(shas)`` empties all three.

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
  recompile too. Tests run the non-compiled path; the compiled one was
  smoke-checked on CPU (docs/benchmarks.md).

Generation without a LoRA runs with every adapter disabled, which computes
exactly the base layers: the output equals a pipeline that never saw a LoRA.
Training shares the pipeline and ends with ``pipe.unload_lora_weights()``, which
removes every adapter, ours included; it may say so with ``forget_resident()``,
and the cache also checks the pipeline's adapter list before each switch and
reloads from the lower tiers whatever vanished. Every method that touches the
pipeline must run while the caller holds it alone (``core.ml.pipeline.exclusive``).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch

from core.errors import InvalidInput
from core.ml.lora_disk import LoraDiskCache, LoraInventory
from core.ml.lora_weights import (
    AdapterSwitch,
    CacheStats,
    HostTier,
    LoraNotCached,
    LoraWeights,
    StateDict,
    copy_into_slot,
    freeze_slot,
    parameters_nbytes,
    parse_lora,
    slot_parameter_names,
    slot_parameters,
    tuner_layers,
)

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.ml.families import Pipeline

SwapMode = Literal["copy", "load", "hotswap"]

SLOT_PREFIX = "atelier_slot_"
# Slot names carry their cache's number: two caches on one pipeline (the resident
# one, a one-shot one in generate_images) never touch each other's adapters.
_cache_numbers = itertools.count()


class LoraCache:
    """Resident adapters (tier 1), host-RAM state dicts (tier 2) and, given ``disk``,
    LoRA files (tier 3) for one pipeline."""

    def __init__(
        self,
        pipe: Pipeline,
        *,
        max_resident: int = 4,
        max_host_bytes: int = 1 << 30,
        swap: SwapMode = "copy",
        target_rank: int | None = None,
        compile: bool = False,
        disk: LoraDiskCache | None = None,
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
        self.disk = disk
        self.slot_prefix = f"{SLOT_PREFIX}{next(_cache_numbers)}_"
        self.stats = CacheStats()
        # sha256 -> slot, least recently used first.
        self._resident: OrderedDict[str, str] = OrderedDict()
        self._host = HostTier(max_host_bytes)
        # Copy mode: each slot's LoRA parameters by name; None if it cannot take copies.
        self._slot_params: dict[str, dict[str, torch.nn.Parameter] | None] = {}
        self._slot_bytes: dict[str, int] = {}  # each slot's parameters, for inventory()
        self._layers: list[BaseTunerLayer] | None = None
        self._switch = AdapterSwitch()
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
            return self._host.shas()

    @property
    def host_bytes(self) -> int:
        return self._host.nbytes

    def contains(self, sha256: str) -> bool:
        """Resident or in host RAM (the disk tier aside: see ``local``)."""
        with self._lock:
            return sha256 in self._resident or sha256 in self._host

    def local(self, sha256: str) -> LoraWeights | None:
        """What to hand ``activate`` for ``sha256`` without fetching its bytes: no
        bytes when resident or in host RAM, the checked file's bytes from the disk
        tier; None when no tier holds it (the caller fetches it then)."""
        if self.contains(sha256):
            return LoraWeights(sha256, None)
        data = self.disk.get(sha256) if self.disk is not None else None
        return None if data is None else LoraWeights(sha256, data, from_disk=True)

    def inventory(self, *, with_disk: bool = True) -> LoraInventory:
        """What each tier holds, least recently used first, and its bytes, from the
        bookkeeping alone: the pipeline is not touched, so any thread may ask
        (training says it wipes the adapters: ``forget_resident``). Waits for a
        switch in progress (a load takes up to ~0.3 s): call it off the event loop."""
        with self._lock:
            memory = LoraInventory(
                vram=tuple(self._resident),
                host=tuple(self._host.shas()),
                vram_bytes=sum(self._slot_bytes.get(slot, 0) for slot in self._resident.values()),
                host_bytes=self._host.nbytes,
            )
        return memory.merged(self.disk.inventory()) if with_disk and self.disk else memory

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
                except Exception as error:
                    self._host.drop(lora.sha256)  # do not keep what cannot be loaded
                    if isinstance(error, InvalidInput) and self.disk is not None:
                        self.disk.evict([lora.sha256])  # nor its file, if the LoRA is at fault
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
            self._remove_adapters(list(self._resident.values()))
            self._resident.clear()

    def clear(self) -> None:
        """Forget the resident and host tiers (and remove our adapters from the
        pipeline). The disk tier keeps its files: it outlives the process."""
        with self._lock:
            self.forget_resident()
            self._host.clear()

    def evict(self, shas: Iterable[str]) -> list[str]:
        """Remove these LoRAs from every tier: their adapters deleted from the
        pipeline (a compiled UNet recompiles at its next load), their state dicts
        dropped, their files deleted. Returns the sha256s some tier held. Call
        with the pipeline held (``exclusive``)."""
        doomed = set(shas)
        with self._lock:
            self._check_resident_still_there()
            slots = {sha: slot for sha, slot in self._resident.items() if sha in doomed}
            self._remove_adapters(list(slots.values()))
            for sha in slots:
                del self._resident[sha]
            in_host = [sha for sha in doomed if self._host.drop(sha)]
        on_disk = self.disk.evict(doomed) if self.disk is not None else []
        erased = sorted({*slots, *in_host, *on_disk})
        self.stats.erased += len(erased)
        return erased

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
            self._forget_slot(self._resident.pop(sha))
        if gone:
            self.stats.wipes_detected += len(gone)
            self._layers = None

    def _host_state(self, lora: LoraWeights) -> StateDict:
        state = self._host.get(lora.sha256)
        if state is not None:
            self.stats.host_hits += 1
            return state
        if lora.data is None and self.disk is not None:
            # Evicted from RAM since the caller's local(): the disk may still have it.
            lora = self.local(lora.sha256) or lora
        if lora.data is None:
            raise LoraNotCached(lora.sha256)
        if not lora.from_disk and hashlib.sha256(lora.data).hexdigest() != lora.sha256:
            raise InvalidInput("the LoRA's bytes do not match its recorded sha256")
        state = parse_lora(lora.data)
        self.stats.parsed += 1
        if lora.from_disk:
            self.stats.disk_hits += 1
        elif self.disk is not None:
            self.disk.put(lora.sha256, lora.data)
        self.stats.host_evictions += self._host.keep(lora.sha256, state)
        return state

    def _make_resident(self, sha256: str, state: StateDict) -> str:
        if len(self._resident) < self.max_resident:
            used = set(self._resident.values())
            names = (f"{self.slot_prefix}{i}" for i in range(len(used) + 1))
            slot = next(name for name in names if name not in used)
            self._remove_adapters([slot])  # a leftover the bookkeeping lost, if any
            self._new_slot(slot, state)
        else:
            _, slot = self._resident.popitem(last=False)
            self.stats.resident_evictions += 1
            if self.swap == "copy" and self._copy_into(slot, state):
                self.stats.copies += 1
            elif self.swap == "hotswap":
                self._hotswap_into(slot, state)
            else:
                self._remove_adapters([slot])
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
        except torch.OutOfMemoryError:
            raise  # the device is full, the LoRA not at fault: the job's OOM handling decides
        except (ValueError, RuntimeError, KeyError) as error:
            # diffusers/peft refuse a LoRA made for another architecture this way.
            raise InvalidInput(f"the LoRA does not fit this pipeline: {error}") from error
        self.stats.loads += 1
        self._layers = None
        freeze_slot(self._tuner_layers(), slot)
        params = slot_parameters(self.pipe, slot)
        self._slot_bytes[slot] = parameters_nbytes(params)
        if self.swap == "copy":
            self._slot_params[slot] = params if self._copyable(slot) else None
        if self.compile and not self._compiled:
            self.pipe.unet.compile()
            self._compiled = True

    def _remove_adapters(self, slots: list[str]) -> None:
        """Delete these slots; when they are all the pipeline has, unload instead,
        which removes the peft wrappers too and leaves the UNet pristine."""
        present = self._present_adapters()
        ours = [slot for slot in slots if slot in present]
        if ours and set(ours) == present:
            self.pipe.unload_lora_weights()
        elif ours:
            self._delete_adapters(ours)
        for slot in slots:
            self._forget_slot(slot)
        self._layers = None

    def _forget_slot(self, slot: str) -> None:
        self._slot_params.pop(slot, None)
        self._slot_bytes.pop(slot, None)

    def _delete_adapters(self, names: list[str]) -> None:
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; the next switch sets one anyway.
            warnings.simplefilter("ignore")
            self.pipe.delete_adapters(names)

    def _copyable(self, slot: str) -> bool:
        """A copy into the slot equals a fresh load: every layer at scale 1
        (alpha == rank, what a plain state dict gets)."""
        for layer in self._tuner_layers():
            scaling = getattr(layer, "scaling", {})
            if slot in scaling and scaling[slot] != 1.0:
                return False
        return True

    def _copy_into(self, slot: str, state: StateDict) -> bool:
        targets = self._slot_params.get(slot)
        source = slot_parameter_names(self.pipe, state, slot) if targets else None
        return targets is not None and copy_into_slot(targets, source)

    def _hotswap_into(self, slot: str, state: StateDict) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.pipe.load_lora_weights(state, adapter_name=slot, hotswap=True)
        except Exception:
            # The slot may be half overwritten: remove it rather than serve a mix.
            self._remove_adapters([slot])
            raise
        self.stats.hotswaps += 1

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        """The peft LoRA layers of the pipeline's LoRA-loadable models (cached until
        a slot is added or removed)."""
        if self._layers is None:
            self._layers = tuner_layers(self.pipe)
            self._switch.verified = False
        return self._layers

    def _set_active(self, slot: str) -> None:
        self._switch.apply(self._tuner_layers(), slot)
