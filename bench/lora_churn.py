"""Memory while 1,000 different users' LoRAs pass through one SD 1.5-sized pipeline.

peft and diffusers users report leaks when adapters are loaded and unloaded over
and over. This drives 1,000 distinct random rank-4 LoRAs (the keys and shapes
training exports) through a ``LoraCache`` as a worker's generation path does
(``activate``, then the next user's), and, side by side in the same process,
stock diffusers (``load_lora_weights`` from the state dict, then
``delete_adapters``) for fewer users, since each stock cycle costs ~0.1-0.3 s.
RSS is read from /proc after every 100 users; a leak shows as a climb after the
cache's tiers are full (resident adapters and the host-RAM budget).

    .venv/bin/python -m bench.lora_churn [--users 1000] [--stock-users 200]

Needs the SD 1.5-shaped checkpoint (built by bench.sd15_checkpoint if missing).
Prints a table and writes bench/results/lora_churn.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from bench.results_file import write_result
from core.ml.resident import offline_quiet_env

offline_quiet_env()

import torch  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: E402
    StableDiffusionPipeline,
)
from safetensors.torch import load, save  # noqa: E402

from bench.lora_switch import lora_shapes  # noqa: E402
from bench.sd15_checkpoint import DEFAULT_PATH, build  # noqa: E402
from core.ml.lora_cache import LoraCache, LoraWeights  # noqa: E402
from core.ml.pipeline import load_pipeline  # noqa: E402

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# A worker's defaults (core/settings.py): 4 resident adapters, 512 MiB of parsed
# LoRAs in host RAM. 1,000 rank-4 LoRAs (3.2 MB each) are six times that budget.
RESIDENT = 4
HOST_BYTES = 512 * MiB


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / MiB


def user_lora(shapes: dict[str, torch.Size], user: int) -> bytes:
    """User ``user``'s LoRA: distinct random weights, drawn when needed (not kept)."""
    generator = torch.Generator().manual_seed(user)
    return save({k: torch.randn(s, generator=generator) * 0.01 for k, s in shapes.items()})


def churn_cache(pipe: StableDiffusionPipeline, shapes: dict[str, torch.Size], users: int,
                every: int) -> tuple[list[tuple[int, float]], float]:  # fmt: skip
    cache = LoraCache(pipe, max_resident=RESIDENT, max_host_bytes=HOST_BYTES)
    readings: list[tuple[int, float]] = [(0, rss_mib())]
    spent = 0.0
    for user in range(1, users + 1):
        lora = LoraWeights.of(user_lora(shapes, user))
        started = time.perf_counter()
        cache.activate(lora)
        spent += time.perf_counter() - started
        if user % every == 0:
            gc.collect()
            readings.append((user, rss_mib()))
    cache.clear()
    return readings, spent / users


def churn_stock(pipe: StableDiffusionPipeline, shapes: dict[str, torch.Size], users: int,
                every: int) -> tuple[list[tuple[int, float]], float]:  # fmt: skip
    readings: list[tuple[int, float]] = [(0, rss_mib())]
    spent = 0.0
    for user in range(1, users + 1):
        state = load(user_lora(shapes, user))
        started = time.perf_counter()
        pipe.load_lora_weights(state, adapter_name=f"user{user}")
        pipe.delete_adapters([f"user{user}"])
        spent += time.perf_counter() - started
        if user % every == 0:
            gc.collect()
            readings.append((user, rss_mib()))
    return readings, spent / users


def growth(readings: list[tuple[int, float]], settled_after: int) -> float:
    """RSS change from the first reading at or after ``settled_after`` users to the last."""
    settled = next(mib for user, mib in readings if user >= settled_after)
    return readings[-1][1] - settled


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_churn")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--stock-users", type=int, default=200)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    if not (DEFAULT_PATH / "model_index.json").is_file():
        build(DEFAULT_PATH)
    pipe = load_pipeline(DEFAULT_PATH, "cpu", "float32")
    shapes = lora_shapes(pipe)
    lora_mib = len(user_lora(shapes, 0)) / MiB
    cache_readings, cache_s = churn_cache(pipe, shapes, args.users, args.every)
    stock_readings, stock_s = churn_stock(pipe, shapes, args.stock_users, args.every)
    # The host tier holds HOST_BYTES / lora size LoRAs; after that it only evicts.
    settled = min(args.users, args.every * (1 + int(HOST_BYTES / MiB / lora_mib) // args.every))
    cache_growth = growth(cache_readings, settled)
    stock_growth = growth(stock_readings, args.every)
    print(f"SD 1.5-sized pipeline, rank-4 LoRA of {lora_mib:.1f} MiB, "
          f"cache: {RESIDENT} resident + {HOST_BYTES // MiB} MiB host RAM")  # fmt: skip
    print(f"\n{'users':>7}{'cache RSS MiB':>15}{'stock RSS MiB':>15}")
    stock = dict(stock_readings)
    for user, mib in cache_readings:
        other = f"{stock[user]:>15.0f}" if user in stock else f"{'':>15}"
        print(f"{user:>7}{mib:>15.0f}{other}")
    print(f"\ncache: {cache_s * 1000:.1f} ms per new user (parse + copy into a slot); "
          f"RSS change from {settled} to {args.users} users: {cache_growth:+.0f} MiB")  # fmt: skip
    print(f"stock: {stock_s * 1000:.1f} ms per user (load + delete); RSS change from "
          f"{args.every} to {args.stock_users} users: {stock_growth:+.0f} MiB")  # fmt: skip
    write_result(
        "lora_churn",
        {
            "settings": vars(args) | {"resident": RESIDENT, "host_mib": HOST_BYTES // MiB},
            "lora_mib": lora_mib,
            "cache": {"rss_mib": cache_readings, "s_per_user": cache_s,
                      "growth_mib_after_settled": cache_growth, "settled_at_users": settled},
            "stock": {"rss_mib": stock_readings, "s_per_user": stock_s,
                      "growth_mib": stock_growth},
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
