"""atelier's side of bench/dreambooth_vs_reference.py, run in its own process.

Loads the checkpoint through core.ml.pipeline like a worker does and trains with
one of two presets:

- ``equal``: the reference's settings (rank from the command line, alpha = rank,
  UNet attention, lr 1e-4 constant, AdamW with weight decay 1e-2, clipping at
  ``--max-grad-norm``, no Min-SNR, no gradient checkpointing, no crop jitter, fp32).
- ``default``: atelier's ``sd15`` preset (``TrainParams.from_profile``) at the
  bench's resolution and step count: rank 8, Min-SNR 5, gradient checkpointing,
  crop jitter; bf16 autocast applies on CUDA only, so on the CPU it runs in the
  pipeline's dtype (``--dtype``).

Writes a JSON report to the file named first: when each step ended, the process's
memory after each step (its peak counted from the call to train, after the model
load), the max_norm of every gradient clipping, how many photos
and class images it trained on, the parameters, and where the LoRA went.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.ml.resident import offline_quiet_env

offline_quiet_env()

# The max_norm of every gradient clipping, counted before core.ml.train is imported
# so that a `from torch.nn.utils import clip_grad_norm_` there binds the wrapper too.
CLIP_NORMS: list[float] = []


def _counted(clip: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def clipping(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        CLIP_NORMS.append(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    return clipping


for _name in ("clip_grad_norm_", "clip_grads_with_norm_"):
    setattr(torch.nn.utils, _name, _counted(getattr(torch.nn.utils, _name)))

from PIL import Image  # noqa: E402

from bench.process_memory import process_memory, reset_peaks  # noqa: E402
from core.ml.pipeline import load_pipeline  # noqa: E402
from core.ml.profiles import SD15  # noqa: E402
from core.ml.train import PriorPreservation, TrainParams, train_dreambooth_lora  # noqa: E402


def preset_params(args: argparse.Namespace) -> TrainParams:
    if args.preset == "default":
        profile = TrainParams.from_profile(SD15, steps=args.steps)
        return dataclasses.replace(profile, resolution=args.resolution)
    return TrainParams(
        steps=args.steps,
        learning_rate=1e-4,
        rank=args.rank,
        alpha=args.rank,  # the reference sets lora_alpha = rank
        target_modules=SD15.lora_target_modules,
        resolution=args.resolution,
        prior_loss_weight=1.0,
        max_grad_norm=args.max_grad_norm,
        weight_decay=1e-2,  # train_dreambooth_lora.py --adam_weight_decay default
    )


def on_step_recorder(stamps: list[float], memory: list[dict[str, int]]) -> Callable[..., None]:
    def record(*_: Any) -> None:
        stamps.append(time.perf_counter())
        memory.append(process_memory())

    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--instance", type=Path, required=True)
    parser.add_argument("--class-dir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--instance-prompt", required=True)
    parser.add_argument("--class-prompt", required=True)
    parser.add_argument("--preset", choices=("equal", "default"), default="equal")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", help="the pipeline's (the worker's)")
    parser.add_argument("--device", default="cpu", help="where the pipeline trains")
    parser.add_argument("--lora-out", type=Path, required=True)
    args = parser.parse_args()

    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    loaded = process_memory()
    photos = [Image.open(p).convert("RGB") for p in sorted(args.instance.iterdir())]
    classes = [Image.open(p).convert("RGB") for p in sorted(args.class_dir.iterdir())]
    params = preset_params(args)
    stamps: list[float] = []
    memory: list[dict[str, int]] = []
    reset_peaks()  # from here on: everything training does, encoding included
    lora = train_dreambooth_lora(
        pipe,
        photos,
        args.instance_prompt,
        params,
        on_step=on_step_recorder(stamps, memory),
        should_stop=lambda: False,
        prior=PriorPreservation(classes, args.class_prompt),
    )
    args.lora_out.write_bytes(lora)
    report = {
        "stamps": stamps,
        "memory": memory,
        "memory_after_load": loaded,
        "clip_norms": CLIP_NORMS,
        "instance_photos": len(photos),
        "class_images": len(classes),
        "params": {k: str(v) for k, v in dataclasses.asdict(params).items()},
        "dtype": args.dtype,
        "device": args.device,
    }
    args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
