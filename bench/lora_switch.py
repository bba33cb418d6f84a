"""How long switching a user's LoRA takes on an SD 1.5-sized pipeline, every way.

One process, one SD 1.5-shaped pipeline with random weights (bench/sd15_checkpoint.py:
SD 1.5's published UNet, VAE and CLIP text encoder configs, saved once with
``save_pretrained`` under var/bench/, so ``from_pretrained`` reads a real 4 GB
checkpoint), 16 random rank-4 LoRAs on the UNet attention projections (the keys
and shapes training exports), and side by side:

  (a) a resident adapter: ``LoraCache`` switch among 8 resident (and stock
      ``pipe.set_adapters`` among the same 8, for reference);
  (b) from host RAM: the cache's default, a copy into the least recently used
      slot; and the brief's stock way, ``delete_adapters`` + ``load_lora_weights``
      from the state dict;
  (c) from host RAM with ``load_lora_weights(..., hotswap=True)`` (the compile path);
  (d) from a safetensors file on disk: stock ``load_lora_weights(dir, weight_name)``,
      the file's bytes through the cache (read, sha256, parse, copy), and the cache's
      own disk tier, with the file in the page cache and read from the device
      (bench/lora_disk_tier.py);
  (e) reloading the whole pipeline (``from_pretrained``, and with its weights touched
      once, since safetensors maps the file and pages it in on first use).

Then the disk tier's bookkeeping (a write after a blob-store fetch, an inventory
scan of 640 files) and, from one 512 px generation with ``--steps`` denoising
steps, what share of a step, an image and a look each switch is.

    .venv/bin/python -m bench.lora_switch [--repeats 15] [--reloads 3] [--steps 4]

Prints the tables and writes bench/results/lora_switch.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.results_file import write_result
from core.ml.resident import offline_quiet_env

offline_quiet_env()

import diffusers  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: E402
    StableDiffusionPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save  # noqa: E402

from bench import lora_disk_tier  # noqa: E402
from bench.sd15_checkpoint import DEFAULT_PATH, build  # noqa: E402
from core.ml.lora_cache import LoraCache, LoraWeights, SwapMode  # noqa: E402
from core.ml.pipeline import load_pipeline  # noqa: E402
from core.ml.profiles import SD1_ATTENTION_MODULES  # noqa: E402

RANK = 4
RESIDENT = 8
LORAS = 16


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def lora_shapes(pipe: StableDiffusionPipeline) -> dict[str, torch.Size]:
    """The keys and shapes of a rank-4 attention LoRA on ``pipe``'s UNet, as exported."""
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(SD1_ATTENTION_MODULES))
    pipe.unet.add_adapter(config, adapter_name="shape")
    try:
        peft_state = get_peft_model_state_dict(pipe.unet, adapter_name="shape")
        return {
            f"unet.{k}": v.shape for k, v in convert_state_dict_to_diffusers(peft_state).items()
        }
    finally:
        pipe.unload_lora_weights()


def make_loras(pipe: StableDiffusionPipeline, count: int) -> list[LoraWeights]:
    """Random LoRAs with the keys and shapes of a rank-4 attention LoRA, as bytes."""
    shapes = lora_shapes(pipe)
    generator = torch.Generator().manual_seed(0)
    return [
        LoraWeights.of(
            save({k: torch.randn(s, generator=generator) * 0.01 for k, s in shapes.items()})
        )
        for _ in range(count)
    ]


def cache_switches(
    pipe: StableDiffusionPipeline,
    loras: list[LoraWeights],
    swap: SwapMode,
    repeats: int,
    resident_only: bool,
) -> list[float]:
    """Switch times through a LoraCache holding RESIDENT adapters, every LoRA in host RAM.

    resident_only: cycle among the resident ones (tier-1 hits); else cycle through
    all LORAS, so each switch brings in one that is not resident (tier-2 hits).
    """
    cache = LoraCache(pipe, max_resident=RESIDENT, max_host_bytes=1 << 30, swap=swap)
    for lora in loras:  # parse all into host RAM; the last RESIDENT stay resident
        cache.activate(lora)
    pool = loras[-RESIDENT:] if resident_only else loras
    times = []
    for i in range(repeats):
        lora = pool[i % len(pool)]
        times.append(timed(partial(cache.activate, lora)))
    if resident_only:
        assert cache.stats.resident_hits >= repeats
    else:
        assert cache.stats.host_hits >= repeats and cache.stats.parsed == len(loras)
    cache.clear()
    return times


def stock_set_adapters(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights], repeats: int
) -> list[float]:
    cache = LoraCache(pipe, max_resident=RESIDENT, swap="load")
    names = [cache.activate(lora) for lora in loras[:RESIDENT]]
    times = [timed(partial(pipe.set_adapters, [names[i % RESIDENT]])) for i in range(repeats)]
    cache.clear()
    return times


def from_file_stock(pipe: StableDiffusionPipeline, files: list[Path], repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):
        path = files[i % len(files)]
        load = partial(
            pipe.load_lora_weights, str(path.parent), weight_name=path.name, adapter_name="disk"
        )
        took = timed(load)
        pipe.unload_lora_weights()
        if i:  # the first read of a file is a cold one
            times.append(took)
    return times


def from_file_cache(pipe: StableDiffusionPipeline, files: list[Path], repeats: int) -> list[float]:
    cache = LoraCache(pipe, max_resident=RESIDENT, max_host_bytes=0)  # nothing kept in RAM
    for path in files[:RESIDENT]:
        cache.activate(LoraWeights.of(path.read_bytes()))

    def switch(path: Path) -> None:
        data = path.read_bytes()
        cache.activate(LoraWeights(hashlib.sha256(data).hexdigest(), data))

    # Cycling through all LORAS files with RESIDENT slots: never resident when asked.
    times = []
    for i in range(repeats):
        path = files[(RESIDENT + i) % len(files)]
        times.append(timed(partial(switch, path)))
    assert cache.stats.resident_hits == 0
    cache.clear()
    return times


def reloads(path: Path, repeats: int) -> tuple[list[float], list[float]]:
    bare, touched = [], []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        pipe = load_pipeline(path, "cpu", "float32")
        bare.append(time.perf_counter() - started)
        with torch.no_grad():
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                for param in module.parameters():
                    param.sum()
        touched.append(time.perf_counter() - started)
        del pipe
    gc.collect()
    return bare, touched


Runs = dict[str, list[float]]


def measure(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights], checkpoint: Path, args: Any
) -> tuple[Runs, Runs]:
    """Every way's switch times, and the disk tier's bookkeeping times."""
    runs: Runs = {}
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as folder:
        files = []
        for index, lora in enumerate(loras):
            files.append(Path(folder) / f"lora_{index}.safetensors")
            files[-1].write_bytes(lora.data or b"")
        runs["(e) full reload: from_pretrained"], runs["(e) reload + weights paged in"] = reloads(
            checkpoint, args.reloads
        )
        runs["(a) resident: cache switch among 8"] = cache_switches(
            pipe, loras, "copy", args.repeats, resident_only=True
        )
        runs["(a) resident: stock pipe.set_adapters among 8"] = stock_set_adapters(
            pipe, loras, args.repeats
        )
        runs["(b) host RAM: cache, copy into LRU slot"] = cache_switches(
            pipe, loras, "copy", args.repeats, resident_only=False
        )
        runs["(b) host RAM: delete_adapters + load_lora_weights"] = cache_switches(
            pipe, loras, "load", args.repeats, resident_only=False
        )
        runs["(c) host RAM: load_lora_weights(hotswap=True)"] = cache_switches(
            pipe, loras, "hotswap", args.repeats, resident_only=False
        )
        runs["(d) disk: stock load_lora_weights(file)"] = from_file_stock(pipe, files, args.repeats)
        runs["(d) disk: file bytes through the cache"] = from_file_cache(pipe, files, args.repeats)
        for cold, name in ((False, "page cache"), (True, "device")):
            runs[f"(d) disk tier: local + activate, from the {name}"] = (
                lora_disk_tier.disk_tier_switches(
                    pipe, loras, Path(folder) / f"tier-{cold}", RESIDENT, args.repeats, cold
                )
            )
        bookkeeping = {
            "put after a blob fetch": lora_disk_tier.disk_puts(
                loras, Path(folder) / "puts", args.repeats
            ),
            f"inventory scan, {lora_disk_tier.INVENTORY_FILES} files": (
                lora_disk_tier.inventory_scans(Path(folder) / "scan", args.repeats)
            ),
        }
    return runs, bookkeeping


def print_tables(
    runs: Runs, bookkeeping: Runs, run: lora_disk_tier.Denoising | None, args: Any, lora_bytes: int
) -> dict[str, dict[str, float]]:
    """The switch table, the disk tier's bookkeeping, and each switch's share of a
    generation; returns the shares."""
    reload = statistics.median(runs["(e) full reload: from_pretrained"])
    medians = {name: statistics.median(times) for name, times in runs.items()}
    print(
        f"\nLoRA switch on an SD 1.5-shaped pipeline (CPU, fp32, torch threads "
        f"{torch.get_num_threads()}), rank-{RANK} attention LoRA of {lora_bytes / 1e6:.1f} MB, "
        f"median of {args.repeats} ({args.reloads} for reloads)\n"
    )
    print(f"{'way':<52}{'ms':>10}{'vs reload':>11}{'speed-up':>10}")
    for name, median in medians.items():
        speed_up = reload / median
        digits = 0 if speed_up >= 10 else 1
        print(f"{name:<52}{median * 1000:>10.2f}{median / reload:>11.4f}{speed_up:>9.{digits}f}x")
    print("\nDisk tier bookkeeping (ms)")
    for name, times in bookkeeping.items():
        print(f"{name:<52}{statistics.median(times) * 1000:>10.2f}")
    if run is None:
        return {}
    compared = ("(a) resident: cache", "(b) host RAM: cache", "(d) disk")
    return lora_disk_tier.print_share(
        {n: t for n, t in medians.items() if n.startswith(compared)}, run
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_switch")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps timed (0: none)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()

    load_before = os.getloadavg()
    checkpoint = build(args.checkpoint)
    pipe = load_pipeline(checkpoint, "cpu", "float32")
    loras = make_loras(pipe, LORAS)
    lora_bytes = len(loras[0].data or b"")
    runs, bookkeeping = measure(pipe, loras, checkpoint, args)
    run = lora_disk_tier.denoising(pipe, loras[0], args.steps) if args.steps > 1 else None
    load_after = os.getloadavg()
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shares = print_tables(runs, bookkeeping, run, args, lora_bytes)
    print(f"\npeak RSS {peak_rss_gib:.1f} GiB; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")  # fmt: skip
    write_result(
        "lora_switch",
        {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "checkpoint": str(checkpoint),
            "lora_rank": RANK,
            "lora_bytes": lora_bytes,
            "resident": RESIDENT,
            "loras": LORAS,
            "peak_rss_gib": round(peak_rss_gib, 2),
            "load_average_before_after": [load_before[0], load_after[0]],
            "median_s": {name: statistics.median(times) for name, times in runs.items()},
            "runs_s": runs,
            "disk_tier_bookkeeping_s": bookkeeping,
            "denoising": asdict(run) if run is not None else None,
            "switch_share": shares,
        },
    )


if __name__ == "__main__":
    main()
