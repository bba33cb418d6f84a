"""Why the worker runs model code on its main thread: torch on CPU, main vs. other threads.

The same 40-step tiny DreamBooth-LoRA training, side by side in one process:
on the main thread, on a plain secondary thread, through asyncio.to_thread, and on
a secondary thread limited to one torch thread.

    .venv/bin/python -m bench.torch_threads [--steps 40] [--repeats 3]

Prints a table and writes bench/results/torch_threads.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.results_file import write_result
from core.ml.resident import offline_quiet_env

offline_quiet_env()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.ml.pipeline import load_pipeline, resolve_checkpoint  # noqa: E402
from core.ml.profiles import get_profile  # noqa: E402
from core.ml.train import TrainParams, train_dreambooth_lora  # noqa: E402
from core.settings import get_settings  # noqa: E402

PHOTOS = sorted((Path(__file__).resolve().parent.parent / "demo" / "sample_subject").glob("*.jpg"))


def on_thread(fn: Callable[[], float], torch_threads: int | None = None) -> float:
    out: list[float] = []

    def target() -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        out.append(fn())

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_threads")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = get_settings()
    profile = get_profile("tiny")
    pipe = load_pipeline(resolve_checkpoint(profile, settings.models_dir, None), "cpu", "float32")
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    params = TrainParams.from_profile(profile, steps=args.steps)

    def train() -> float:
        started = time.perf_counter()
        train_dreambooth_lora(
            pipe, photos, "a photo of sks woman", params, lambda *_: None, lambda: False
        )
        return time.perf_counter() - started

    train()  # warm-up
    ways: dict[str, Callable[[], float]] = {
        "main thread": train,
        "secondary thread": lambda: on_thread(train),
        "asyncio.to_thread": lambda: asyncio.run(asyncio.to_thread(train)),
        "secondary, 1 torch thread": lambda: on_thread(train, torch_threads=1),
    }
    default_threads = torch.get_num_threads()
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant
        for name, way in ways.items():
            runs[name].append(way())
            torch.set_num_threads(default_threads)
    base = statistics.median(runs["main thread"])
    print(f"\n{args.steps} tiny training steps, torch threads {default_threads}, median of "
          f"{args.repeats}\n")  # fmt: skip
    print(f"{'where':<28}{'seconds':>9}{'vs main':>9}")
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"{name:<28}{med:>9.2f}{med / base:>9.2f}")
    write_result(
        "torch_threads",
        {
            "torch": torch.__version__,
            "steps": args.steps,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
