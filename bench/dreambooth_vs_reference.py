"""atelier's DreamBooth-LoRA training beside diffusers' own reference script, same settings.

Both sides train an SD 1.5-shaped checkpoint with random weights
(bench/sd15_checkpoint.py) on the 4 demo photos at the same resolution, batch 1,
LoRA rank 4 on the UNet attention, prior preservation with the same 4 ready class
images (so neither side generates any), AdamW, fp32 on the CPU. Each runs in its
own process under /usr/bin/time (peak RSS); seconds per step are the median of
the per-step times after the first steps (warm-up excluded).

The reference is diffusers' examples/dreambooth/train_dreambooth_lora.py, run
unmodified from a checkout of the diffusers repository (not part of this repo):

    .venv/bin/python -m bench.dreambooth_vs_reference \\
        --reference-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py

Prints a table and writes bench/results/dreambooth_vs_reference.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.results_file import write_result

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "demo" / "sample_subject").glob("*.jpg"))
INSTANCE_PROMPT = "a photo of sks person"
CLASS_PROMPT = "a photo of person"
WARMUP_STEPS = 2  # first steps pay for lazy init and allocator growth

# Run inside the reference's process: record when each optimizer step ends by
# wrapping the progress bar it updates once per step. The script is not modified.
REFERENCE_RUNNER = """
import json, runpy, sys, time
import tqdm.auto
stamps = []
class StampedBar(tqdm.auto.tqdm):
    def update(self, n=1):
        stamps.append(time.perf_counter())
        return super().update(n)
tqdm.auto.tqdm = StampedBar
out, script = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    json.dump(stamps, open(out, "w"))
"""


def class_images(folder: Path, count: int, side: int) -> Path:
    """Ready class images: seeded noise is enough, neither side looks at content."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class_{i}.png")
    return folder


def instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


def timed(cmd: list[str], env: dict[str, str]) -> int:
    """Run under /usr/bin/time; returns the peak RSS in bytes."""
    with tempfile.NamedTemporaryFile(suffix=".time") as stats:
        run = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", stats.name, *cmd],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise SystemExit(f"{cmd[:4]} failed:\n{run.stderr[-3000:]}")
        return int(Path(stats.name).read_text().split()[-1]) * 1024


def step_seconds(stamps: list[float]) -> float:
    deltas = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(deltas[WARMUP_STEPS - 1 :])


def run_reference(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    stamps = work / "reference_stamps.json"
    cmd = [
        sys.executable, "-c", REFERENCE_RUNNER, str(stamps), str(args.reference_script),
        "--pretrained_model_name_or_path", str(args.checkpoint),
        "--instance_data_dir", str(work / "instance"),
        "--class_data_dir", str(work / "class"),
        "--with_prior_preservation", "--prior_loss_weight", "1.0",
        "--num_class_images", str(args.class_images),
        "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--resolution", str(args.resolution), "--train_batch_size", "1",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(args.steps), "--rank", str(args.rank),
        "--checkpointing_steps", "1000000", "--seed", "0", "--mixed_precision", "no",
        "--dataloader_num_workers", "0", "--report_to", "tensorboard",
        "--output_dir", str(work / "reference_out"),
    ]  # fmt: skip
    peak = timed(cmd, env)
    return {"s_per_step": step_seconds(json.loads(stamps.read_text())), "peak_rss_bytes": peak}


def run_atelier(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    stamps = work / "atelier_stamps.json"
    cmd = [
        sys.executable, "-m", "bench.dreambooth_atelier_side", str(stamps),
        "--checkpoint", str(args.checkpoint), "--instance", str(work / "instance"),
        "--class-dir", str(work / "class"), "--resolution", str(args.resolution),
        "--steps", str(args.steps), "--rank", str(args.rank),
        "--instance-prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT,
    ]  # fmt: skip
    peak = timed(cmd, env)
    return {"s_per_step": step_seconds(json.loads(stamps.read_text())), "peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dreambooth_vs_reference")
    parser.add_argument("--reference-script", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.checkpoint is None:
        from bench.sd15_checkpoint import build

        args.checkpoint = build()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "atelier": []}
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        work = Path(tmp)
        instance_images(work / "instance")
        class_images(work / "class", args.class_images, args.resolution)
        for _ in range(args.repeats):  # alternate, so drift hits both sides
            runs["reference"].append(run_reference(args, work, env))
            runs["atelier"].append(run_atelier(args, work, env))
    report(runs, args)


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    med = {
        side: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for side, rs in runs.items()
    }
    ref, ours = med["reference"], med["atelier"]
    print(f"\nSD 1.5-shaped DreamBooth-LoRA, {args.resolution} px, batch 1, rank {args.rank}, "
          f"prior preservation, {args.steps} steps, CPU fp32\n")  # fmt: skip
    print(f"{'':<16}{'reference':>12}{'atelier':>12}{'atelier/ref':>13}")
    print(f"{'s/step':<16}{ref['s_per_step']:>12.2f}{ours['s_per_step']:>12.2f}"
          f"{ours['s_per_step'] / ref['s_per_step']:>13.2f}")  # fmt: skip
    gib = 2**30
    print(f"{'peak RSS GiB':<16}{ref['peak_rss_bytes'] / gib:>12.2f}"
          f"{ours['peak_rss_bytes'] / gib:>12.2f}"
          f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:>13.2f}")  # fmt: skip
    write_result(
        "dreambooth_vs_reference",
        {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "median": med,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
