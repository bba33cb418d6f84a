"""The disk tier's rows of bench/lora_switch.py, and what share of a generation a
LoRA switch is (whether overlapping it with the first denoising steps could pay).

Run through ``python -m bench.lora_switch``; nothing here runs on its own.

* disk-tier switches: a ``LoraCache`` whose LoRAs are only in its disk tier
  (``core.ml.lora_disk``; nothing in host RAM, never resident): ``local()`` reads
  the file and checks its sha256, ``activate()`` parses it and copies it into the
  least recently used slot, as a generation does. "Cold" first drops the file from
  the page cache (fsync, then ``posix_fadvise(DONTNEED)``), so the read goes to the
  device.
* the tier's own bookkeeping: ``put`` after a blob-store fetch (sha256, temp file,
  rename, trim) and the directory scan an inventory costs with 640 files (a 4 GiB
  budget of SD 1.5 rank-8 LoRAs).
* a generation's denoising on the same pipeline (512 px, classifier-free guidance,
  DPM-Solver++ through ``generate_images``), timed per step from its step callback.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)

from core.ml.generate import GenerateParams, generate_images
from core.ml.lora_cache import LoraCache, LoraWeights
from core.ml.lora_disk import LoraDiskCache

INVENTORY_FILES = 640
# A look generates this many candidates of this many steps (core/settings.py's
# look_candidates, the sd15 profile's inference_steps), each its own image.
LOOK_IMAGES, IMAGE_STEPS = 6, 30


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def drop_from_page_cache(path: Path) -> None:
    """The file's pages out of the page cache (dirty pages are written first, since
    DONTNEED keeps those), so its next read goes to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_tier_switches(
    pipe: StableDiffusionPipeline,
    loras: list[LoraWeights],
    folder: Path,
    resident: int,
    repeats: int,
    cold: bool,
) -> list[float]:
    disk = LoraDiskCache(folder, 1 << 30)
    cache = LoraCache(pipe, max_resident=resident, max_host_bytes=0, disk=disk)
    for lora in loras:
        disk.put(lora.sha256, lora.data or b"")
    for lora in loras[:resident]:
        cache.activate(lora)

    def switch(sha256: str) -> None:
        weights = cache.local(sha256)
        assert weights is not None and weights.from_disk
        cache.activate(weights)

    times = []
    for i in range(repeats):  # cycling through all LoRAs: never resident when asked
        lora = loras[(resident + i) % len(loras)]
        if cold:
            drop_from_page_cache(disk.path(lora.sha256))
        times.append(timed(partial(switch, lora.sha256)))
    assert cache.stats.resident_hits == 0 and cache.stats.disk_hits == repeats
    cache.clear()
    return times


def disk_puts(loras: list[LoraWeights], folder: Path, repeats: int) -> list[float]:
    """``put`` of a LoRA not there yet, as after a blob-store fetch."""
    disk = LoraDiskCache(folder, 1 << 30)
    times = [timed(partial(disk.put, lora.sha256, lora.data or b"")) for lora in loras[:repeats]]
    assert disk.stats.writes == len(times)
    return times


def inventory_scans(folder: Path, repeats: int) -> list[float]:
    """``inventory()`` over INVENTORY_FILES files (a scan costs per file, not per byte)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(INVENTORY_FILES):
        name = hashlib.sha256(str(i).encode()).hexdigest()
        (folder / f"{name}.safetensors").write_bytes(b"\0" * 64)
    disk = LoraDiskCache(folder, 1 << 30)
    times = [timed(disk.inventory) for _ in range(repeats)]
    assert len(disk.inventory().disk) == INVENTORY_FILES
    return times


@dataclass(frozen=True)
class Denoising:
    steps: int
    step_s: float  # median of one denoising step (two UNet passes: guidance)
    other_s: float  # the rest of the image: text encoding, VAE decode, PNG

    def image_s(self, steps: int = IMAGE_STEPS) -> float:
        return self.other_s + steps * self.step_s


def denoising(pipe: StableDiffusionPipeline, lora: LoraWeights, steps: int) -> Denoising:
    """One 512 px image with ``lora`` resident, timed at each step's end."""
    cache = LoraCache(pipe, max_resident=1)
    cache.activate(lora)
    marks: list[float] = []
    params = GenerateParams(prompt="a photo of sks woman, a wool coat", num_images=1, seed=1,
                            steps=steps, guidance_scale=7.5, width=512, height=512)  # fmt: skip
    started = time.perf_counter()
    generate_images(pipe, lora, params, lambda *_: marks.append(time.perf_counter()),
                    lambda: False, cache=cache)  # fmt: skip
    total = time.perf_counter() - started
    cache.clear()
    step = statistics.median(b - a for a, b in itertools.pairwise(marks))
    return Denoising(steps, step, total - steps * step)


def print_share(medians: dict[str, float], run: Denoising) -> dict[str, dict[str, float]]:
    """Each switch beside one denoising step, one image and one look; returns the shares."""
    image, look = run.image_s(), LOOK_IMAGES * run.image_s()
    print(f"\nOne 512 px denoising step {run.step_s:.2f} s (median of {run.steps - 1}); "
          f"rest of an image {run.other_s:.2f} s; a {IMAGE_STEPS}-step image {image:.1f} s; "
          f"a look ({LOOK_IMAGES} such images, one switch) {look:.0f} s\n")  # fmt: skip
    print(f"{'switch':<52}{'ms':>9}{'of a step':>11}{'of an image':>13}{'of a look':>11}")
    shares = {}
    for name, seconds in medians.items():
        shares[name] = {"step": seconds / run.step_s, "image": seconds / image,
                        "look": seconds / look}  # fmt: skip
        print(f"{name:<52}{seconds * 1000:>9.2f}{seconds / run.step_s:>10.3%}"
              f"{seconds / image:>12.4%}{seconds / look:>11.5%}")  # fmt: skip
    return shares
