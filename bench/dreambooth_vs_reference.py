"""atelier's DreamBooth-LoRA training beside diffusers' own reference script.

Both sides train an SD 1.5-shaped checkpoint with random weights
(bench/sd15_checkpoint.py) on the 4 demo photos at the same resolution, with prior
preservation on the same ready class images (so neither side generates any), on
the CPU. Each runs in its own process under /usr/bin/time (peak RSS); seconds per
step are the median of the per-step times after the first steps (warm-up excluded).

Sides (``--preset``):

- ``reference``: diffusers' examples/dreambooth/train_dreambooth_lora.py, run
  unmodified from a checkout of the diffusers repository (not part of this repo):
  batch 1 (+ 1 class image), LoRA rank ``--rank`` on the UNet attention, AdamW
  lr 1e-4 constant, weight decay 1e-2, clipping at --max_grad_norm 1.0 (it always
  clips), fp32. Always run.
- ``atelier``: the same settings (``--preset equal``). The bench checks that both
  did the same work: the same number of steps, LoRA files with the same keys and
  shapes, the same photos and class images, the gradient norm clipped at every
  step on both sides; a difference is printed and the exit status is 1.
- ``atelier default``: atelier's sd15 preset at the bench's resolution and steps
  (``--preset default``): rank 8, Min-SNR 5, gradient checkpointing, crop jitter.

    .venv/bin/python -m bench.dreambooth_vs_reference --preset both \\
        --reference-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py

Memory is reported as the peak RSS and as what it is made of at the last step:
pages mapped from files (the checkpoint's weights, which diffusers loads without a
copy when the dtype matches, and shared libraries) and anonymous memory (everything
allocated). Prints a table and writes bench/results/dreambooth_vs_reference.json.
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
MAX_GRAD_NORM = 1.0  # train_dreambooth_lora.py --max_grad_norm default, on both sides
LORA_FILE = "pytorch_lora_weights.safetensors"  # what the reference writes
GIB = 2**30
# Each side's figures that the report takes the median of, over repeats.
NUMERIC_FIGURES = ("s_per_step", "peak_rss_bytes", "file_backed_bytes", "anonymous_bytes")

# Run inside the reference's process: record when each optimizer step ends, and the
# process's memory then, by wrapping the progress bar it updates once per step (the
# one named "Steps": loading pipelines has bars too), and the max_norm of every
# gradient clipping (accelerate calls torch's clip_grad_norm_, or get_total_norm and
# clip_grads_with_norm_ where torch.distributed is built). The script itself is not
# modified.
REFERENCE_RUNNER = """
import json, runpy, sys, time
import torch
import tqdm.auto
stamps, memory, clips = [], [], []
def status():
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    rows = (line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(v.split()[0]) * 1024 for k, v in rows if k in keys}
class StampedBar(tqdm.auto.tqdm):
    def update(self, n=1):
        if self.desc == "Steps":
            stamps.append(time.perf_counter())
            memory.append(status())
        return super().update(n)
tqdm.auto.tqdm = StampedBar
def counted(clip):
    def clipping(parameters, max_norm, *args, **kwargs):
        clips.append(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)
    return clipping
for name in ("clip_grad_norm_", "clip_grads_with_norm_"):
    setattr(torch.nn.utils, name, counted(getattr(torch.nn.utils, name)))
out, script = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    json.dump({"stamps": stamps, "memory": memory, "clip_norms": clips}, open(out, "w"))
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


def side_result(report: dict[str, Any], peak: int) -> dict[str, Any]:
    last = report["memory"][-1]
    return {
        "s_per_step": step_seconds(report["stamps"]),
        "peak_rss_bytes": peak,
        "file_backed_bytes": last["RssFile"],  # at the last step
        "anonymous_bytes": last["RssAnon"],
        "steps": len(report["stamps"]),
        "clip_norms": report["clip_norms"],  # max_norm of each clipping
    }


def run_reference(
    args: argparse.Namespace, work: Path, env: dict[str, str]
) -> tuple[dict[str, Any], Path]:
    """The reference's figures and the LoRA file it wrote."""
    out = work / "reference_out"
    report = work / "reference_report.json"
    cmd = [
        sys.executable, "-c", REFERENCE_RUNNER, str(report), str(args.reference_script),
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
        "--max_grad_norm", str(MAX_GRAD_NORM), "--adam_weight_decay", "1e-2",
        "--checkpointing_steps", "1000000", "--seed", "0", "--mixed_precision", "no",
        "--dataloader_num_workers", "0", "--report_to", "tensorboard",
        "--output_dir", str(out),
    ]  # fmt: skip
    peak = timed(cmd, env)
    return side_result(json.loads(report.read_text()), peak), out / LORA_FILE


def run_atelier(
    args: argparse.Namespace, work: Path, env: dict[str, str], preset: str
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """atelier's figures, its full report (photos, class images, parameters) and LoRA."""
    report = work / f"atelier_{preset}_report.json"
    lora = work / f"atelier_{preset}.safetensors"
    cmd = [
        sys.executable, "-m", "bench.dreambooth_atelier_side", str(report),
        "--checkpoint", str(args.checkpoint), "--instance", str(work / "instance"),
        "--class-dir", str(work / "class"), "--resolution", str(args.resolution),
        "--steps", str(args.steps), "--rank", str(args.rank),
        "--instance-prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT,
        "--preset", preset, "--max-grad-norm", str(MAX_GRAD_NORM),
        "--dtype", args.dtype if preset == "default" else "float32", "--lora-out", str(lora),
    ]  # fmt: skip
    peak = timed(cmd, env)
    full = json.loads(report.read_text())
    return side_result(full, peak), full, lora


def lora_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as tensors:
        return {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}


def same_work(
    args: argparse.Namespace,
    reference: tuple[dict[str, Any], Path],
    atelier: tuple[dict[str, Any], dict[str, Any], Path],
) -> list[str]:
    """How the equal run's two sides did different work (empty when they did not)."""
    (ref, ref_lora), (ours, full, our_lora) = reference, atelier
    differences = []
    if not ref["steps"] == ours["steps"] == args.steps:
        differences.append(f"steps: reference {ref['steps']}, atelier {ours['steps']}")
    for side, figures in (("reference", ref), ("atelier", ours)):
        if figures["clip_norms"] != [MAX_GRAD_NORM] * figures["steps"]:
            norms = sorted(set(figures["clip_norms"]))
            differences.append(
                f"gradient clipping: {side} clipped {len(figures['clip_norms'])} times "
                f"in {figures['steps']} steps (max_norm {norms}), not once a step at "
                f"{MAX_GRAD_NORM}"
            )
    ref_shapes, our_shapes = lora_shapes(ref_lora), lora_shapes(our_lora)
    if ref_shapes != our_shapes:
        unmatched = ref_shapes.items() ^ our_shapes.items()
        differences.append(
            f"LoRA tensors: {len(ref_shapes)} in the reference's file, {len(our_shapes)} in "
            f"atelier's, {len(unmatched)} (name, shape) pairs in only one, e.g. "
            f"{sorted(unmatched)[:2]}"
        )
    if full["class_images"] != args.class_images or full["instance_photos"] != len(PHOTOS):
        differences.append(
            f"images: atelier trained on {full['instance_photos']} photos and "
            f"{full['class_images']} class images, the reference on {len(PHOTOS)} and "
            f"{args.class_images}"
        )
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dreambooth_vs_reference")
    parser.add_argument("--reference-script", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--preset", choices=("equal", "default", "both"), default="both")
    parser.add_argument(
        "--dtype", default="float32", help="the pipeline dtype of the default-preset side"
    )
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    if args.checkpoint is None:
        from bench.sd15_checkpoint import build

        args.checkpoint = build()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    presets = ("equal", "default") if args.preset == "both" else (args.preset,)
    runs: dict[str, list[dict[str, Any]]] = {"reference": []}
    differences: list[str] = []
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        work = Path(tmp)
        instance_images(work / "instance")
        class_images(work / "class", args.class_images, args.resolution)
        for _ in range(args.repeats):  # alternate, so drift hits every side
            reference = run_reference(args, work, env)
            runs["reference"].append(reference[0])
            for preset in presets:
                atelier = run_atelier(args, work, env, preset)
                runs.setdefault(f"atelier {preset}", []).append(atelier[0])
                if preset == "equal":
                    differences += same_work(args, reference, atelier)
    report(runs, differences, args)
    if differences:
        raise SystemExit(1)


def table_cells(side: dict[str, float], ref: dict[str, float]) -> list[str]:
    """s/step, its ratio to the reference's, peak RSS, its ratio, and the last step's
    file-backed and anonymous memory."""
    return [
        f"{side['s_per_step']:.2f}",
        f"{side['s_per_step'] / ref['s_per_step']:.2f}",
        f"{side['peak_rss_bytes'] / GIB:.2f}",
        f"{side['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}",
        f"{side['file_backed_bytes'] / GIB:.2f}",
        f"{side['anonymous_bytes'] / GIB:.2f}",
    ]


def report(
    runs: dict[str, list[dict[str, Any]]], differences: list[str], args: argparse.Namespace
) -> None:
    med = {
        side: {key: statistics.median(r[key] for r in rs) for key in NUMERIC_FIGURES}
        for side, rs in runs.items()
    }
    ref = med["reference"]
    print(f"\nSD 1.5-shaped DreamBooth-LoRA, {args.resolution} px, prior preservation, "
          f"{args.steps} steps, CPU; reference and 'atelier equal': rank {args.rank}, "
          f"fp32, clipping at {MAX_GRAD_NORM}; 'atelier default': the sd15 preset "
          f"({args.dtype} weights)\n")  # fmt: skip
    print("| side | s/step | x ref | peak RSS GiB | x ref | file-backed GiB | anonymous GiB |")
    print("|---|---|---|---|---|---|---|")
    for side, m in med.items():
        print(f"| {side} | " + " | ".join(table_cells(m, ref)) + " |")
    for difference in differences:
        print(f"NOT THE SAME WORK: {difference}")
    write_result(
        "dreambooth_vs_reference",
        {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "same_work_differences": differences,
            "median": med,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
