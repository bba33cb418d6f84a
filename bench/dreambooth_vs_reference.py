"""atelier's DreamBooth-LoRA training beside diffusers' own reference script.

Both sides train an SD 1.5-shaped checkpoint with random weights
(bench/sd15_checkpoint.py) on the 4 demo photos at the same resolution, with prior
preservation on the same ready class images (so neither side generates any), on
the CPU (``--device cuda``: on the GPU, for bench/gpu_suite.sh). Each runs in its own
process; seconds per step are the median of the per-step times after the first steps
(warm-up excluded).

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
  (``--preset default``): rank 8, Min-SNR 5, gradient checkpointing, crop jitter,
  its pipeline in ``--dtype`` (a GPU worker's bfloat16: frozen weights in bf16, the
  LoRA in fp32). With a half ``--dtype`` the reference also runs at that
  ``--mixed_precision`` (``reference bf16``), the same lever on its side.

    .venv/bin/python -m bench.dreambooth_vs_reference --preset both \\
        --reference-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py

Memory is reported as the training's peak (VmHWM restarted once the models are
loaded: what training itself holds, its own encoding included; on CUDA also the
device's peak of allocated memory), the load's peak before it (loading fp32 files
into bf16 holds both for a moment), and what the resident set is made of at the
last step:
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

from bench.process_memory import CUDA_PEAK
from bench.results_file import write_result

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "demo" / "sample_subject").glob("*.jpg"))
INSTANCE_PROMPT = "a photo of sks person"
CLASS_PROMPT = "a photo of person"
WARMUP_STEPS = 2  # first steps pay for lazy init and allocator growth
MAX_GRAD_NORM = 1.0  # train_dreambooth_lora.py --max_grad_norm default, on both sides
LORA_FILE = "pytorch_lora_weights.safetensors"  # what the reference writes
GIB = 2**30
# The reference's --mixed_precision that holds its frozen weights in the dtype the
# default-preset side loads its pipeline in: the same lever on both sides.
REFERENCE_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}
# Each side's figures that the report takes the median of, over repeats.
NUMERIC_FIGURES = (
    "s_per_step",
    "training_peak_bytes",
    "load_peak_bytes",
    "file_backed_bytes",
    "anonymous_bytes",
    "vram_training_peak_bytes",  # on a CUDA device only
)

# Run inside the reference's process: record when each optimizer step ends, and the
# process's memory then (its peak restarted when the step bar is made, after the
# models are loaded), by wrapping the progress bar it updates once per step (the
# one named "Steps": loading pipelines has bars too), and the max_norm of every
# gradient clipping (accelerate calls torch's clip_grad_norm_, or get_total_norm and
# clip_grads_with_norm_ where torch.distributed is built). The script itself is not
# modified.
REFERENCE_RUNNER = """
import json, runpy, sys, time
import torch
import tqdm.auto
from bench.process_memory import process_memory, reset_peaks
stamps, memory, clips, loaded = [], [], [], []
class StampedBar(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.desc == "Steps":  # models loaded: the training's peaks start here
            loaded.append(process_memory())
            reset_peaks()
    def update(self, n=1):
        if self.desc == "Steps":
            stamps.append(time.perf_counter())
            memory.append(process_memory())
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
    report = {"stamps": stamps, "memory": memory, "clip_norms": clips,
              "memory_after_load": loaded[0] if loaded else None}
    json.dump(report, open(out, "w"))
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


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{done.stderr[-3000:]}")


def step_seconds(stamps: list[float]) -> float:
    deltas = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(deltas[WARMUP_STEPS - 1 :])


def side_result(report: dict[str, Any]) -> dict[str, Any]:
    last = report["memory"][-1]
    result = {
        "s_per_step": step_seconds(report["stamps"]),
        "load_peak_bytes": report["memory_after_load"]["VmHWM"],  # up to the models loaded
        "training_peak_bytes": last["VmHWM"],  # from the start of training on
        "file_backed_bytes": last["RssFile"],  # at the last step
        "anonymous_bytes": last["RssAnon"],
        "steps": len(report["stamps"]),
        "clip_norms": report["clip_norms"],  # max_norm of each clipping
    }
    if CUDA_PEAK in last:
        result["vram_training_peak_bytes"] = last[CUDA_PEAK]
    return result


def run_reference(
    args: argparse.Namespace, work: Path, env: dict[str, str], precision: str = "no"
) -> tuple[dict[str, Any], Path]:
    """The reference's figures and the LoRA file it wrote, at ``precision``
    (--mixed_precision: "no", or "bf16": frozen weights in bf16, LoRA in fp32)."""
    out = work / f"reference_{precision}_out"
    report = work / f"reference_{precision}_report.json"
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
        "--checkpointing_steps", "1000000", "--seed", "0", "--mixed_precision", precision,
        "--dataloader_num_workers", "0", "--report_to", "tensorboard",
        "--output_dir", str(out),
    ]  # fmt: skip
    run(cmd, env)
    return side_result(json.loads(report.read_text())), out / LORA_FILE


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
        "--device", args.device,
    ]  # fmt: skip
    run(cmd, env)
    full = json.loads(report.read_text())
    return side_result(full), full, lora


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
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train"
    )
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    if args.checkpoint is None:
        from bench.sd15_checkpoint import build

        args.checkpoint = build()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would take a GPU where there is one
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
            if "default" in presets and args.dtype in REFERENCE_PRECISION:
                precision = REFERENCE_PRECISION[args.dtype]
                runs.setdefault(f"reference {precision}", []).append(
                    run_reference(args, work, env, precision)[0]
                )
            for preset in presets:
                atelier = run_atelier(args, work, env, preset)
                runs.setdefault(f"atelier {preset}", []).append(atelier[0])
                if preset == "equal":
                    differences += same_work(args, reference, atelier)
    report(runs, differences, args)
    if differences:
        raise SystemExit(1)


def table_cells(side: dict[str, float], ref: dict[str, float]) -> list[str]:
    """s/step and the training's peaks (host, and device where there is one), each
    beside its ratio to ``ref``; the load's peak, the last step's file-backed and
    anonymous memory."""
    keys = ["s_per_step", "training_peak_bytes"]
    keys += ["vram_training_peak_bytes"] if "vram_training_peak_bytes" in side else []
    cells = []
    for key in keys:
        scale = 1.0 if key == "s_per_step" else GIB
        cells += [f"{side[key] / scale:.2f}", f"{side[key] / ref[key]:.2f}"]
    memory = (
        side[key] / GIB for key in ("load_peak_bytes", "file_backed_bytes", "anonymous_bytes")
    )
    return [*cells, *(f"{gib:.2f}" for gib in memory)]


def report(
    runs: dict[str, list[dict[str, Any]]], differences: list[str], args: argparse.Namespace
) -> None:
    med = {
        side: {
            key: statistics.median(r[key] for r in rs) for key in NUMERIC_FIGURES if key in rs[0]
        }
        for side, rs in runs.items()
    }
    print(f"\nSD 1.5-shaped DreamBooth-LoRA, {args.resolution} px, prior preservation, "
          f"{args.steps} steps, CPU; reference and 'atelier equal': rank {args.rank}, "
          f"fp32, clipping at {MAX_GRAD_NORM}; 'atelier default': the sd15 preset "
          f"({args.dtype} weights)\n")  # fmt: skip
    vram = "| VRAM peak GiB | x " if args.device == "cuda" else ""
    header = f"| side | vs | s/step | x | training peak GiB | x {vram}"
    print(f"{header}| load peak GiB | file-backed GiB | anonymous GiB |")
    print("|---" * header.count("|") + "|---|---|---|")
    for side, m in med.items():
        # Each side beside the reference; the reference in a half precision beside
        # the fp32 one, and the default preset beside both.
        bases = ["reference"]
        if side == "atelier default":
            bases += [base for base in med if base.startswith("reference ")]
        for base in bases:
            print(f"| {side} | {base} | " + " | ".join(table_cells(m, med[base])) + " |")
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
