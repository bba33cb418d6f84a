"""atelier's side of bench/dreambooth_vs_reference.py, run in its own process.

Loads the checkpoint through core.ml.pipeline like a worker does and trains with
the reference's settings: no Min-SNR, no gradient checkpointing, fp32, AdamW.
Writes the time at which each step ended to the file named first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.ml_runtime import offline_quiet_env

offline_quiet_env()

from PIL import Image  # noqa: E402

from core.ml.pipeline import load_pipeline  # noqa: E402
from core.ml.profiles import SD15  # noqa: E402
from core.ml.train import PriorPreservation, TrainParams, train_dreambooth_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stamps", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--instance", type=Path, required=True)
    parser.add_argument("--class-dir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--instance-prompt", required=True)
    parser.add_argument("--class-prompt", required=True)
    args = parser.parse_args()

    pipe = load_pipeline(args.checkpoint, "cpu", "float32")
    photos = [Image.open(p).convert("RGB") for p in sorted(args.instance.iterdir())]
    classes = [Image.open(p).convert("RGB") for p in sorted(args.class_dir.iterdir())]
    params = TrainParams(
        steps=args.steps,
        learning_rate=1e-4,
        rank=args.rank,
        alpha=args.rank,  # the reference sets lora_alpha = rank
        target_modules=SD15.lora_target_modules,
        resolution=args.resolution,
        prior_loss_weight=1.0,
    )
    stamps: list[float] = []
    train_dreambooth_lora(
        pipe,
        photos,
        args.instance_prompt,
        params,
        on_step=lambda *_: stamps.append(time.perf_counter()),
        should_stop=lambda: False,
        prior=PriorPreservation(classes, args.class_prompt),
    )
    args.stamps.write_text(json.dumps(stamps))


if __name__ == "__main__":
    main()
