"""How far a window of the latents is from the latents of that pixel crop, on an
SD 1.5-shaped VAE, and what encoding real pixel crops would cost instead.

Training (``core.ml.train_data``) encodes each photo once, enlarged by
``1 + crop_jitter``, and takes random training-size windows out of that latent
grid: a window stands in for the encoding of the matching pixel crop. That is exact
only for a purely convolutional encoder. AutoencoderKL's encoder is not: its
mid-block has a global self-attention over every latent position, and every
ResNet block normalizes with GroupNorm, whose statistics are over the whole
image. This measures, per window position (a corner, the centre, the far corner):

- the relative L2 error of the posterior mean (window vs. the crop's own encoding),
  over the whole window and over its border ring and interior apart;
- the per-element RMS error beside the posterior's own RMS std (the noise every
  training step samples anyway) and beside the change that re-encoding the crop
  as a quality-90 JPEG makes (a difference nobody would see in the photo);
- the same with the mid-block attention removed (same seeded weights otherwise),
  which separates what attention adds from the borders and GroupNorm;
- seconds per VAE encode at the training size and at 256 px on this CPU, and what
  real crops would cost: encoded every step, or K random crops per image up front.

The weights are random (seeded, ``bench.sd15_checkpoint.VAE``'s architecture): the
attention and GroupNorm structure is SD 1.5's, but how much a trained VAE's
attention mixes distant positions, and how small its posterior std is, are
properties of trained weights that random ones do not tell. ``--vae`` measures a
trained VAE where its weights are on the host (none can be downloaded here).

    .venv/bin/python -m bench.vae_crop_error [--photos 2] [--resolution 512]
        [--jitter 0.1] [--crops-per-image 8] [--vae CHECKPOINT] [--threads N]

Prints a table and writes bench/results/vae_crop_error.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.results_file import write_result
from bench.sd15_checkpoint import VAE
from core.ml.profiles import SD15
from core.ml.train_data import PIXEL_SCALE, photo_tensor, view_sides
from core.photos import PhotoLimits, normalize_photo
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "demo" / "sample_subject").glob("*.jpg"))
SEED = 0
# Latents per side of a window's border ring: the positions whose convolutions
# reach past the crop's edge within a few layers.
BORDER = 8
# A JPEG this good is what phones and the tests' photos are saved at: the latent
# change it makes is a yardstick for "a difference nobody would see".
JPEG_QUALITY = 90
# Where the step time to compare against comes from (same machine, 256 px).
STEP_RESULT = ROOT / "bench" / "results" / "dreambooth_vs_reference.json"
SMALL_SIDE = 256
# The most photos a subject may have (core.settings.Settings.max_photos).
MAX_PHOTOS = Settings.model_fields["max_photos"].default


def build_vaes(checkpoint: Path | None) -> dict[str, Any]:
    """SD 1.5's VAE with seeded random weights (or the VAE of ``checkpoint``, a
    diffusers folder), and the same weights without mid-block attention."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    torch.manual_seed(SEED)
    if checkpoint is None:
        full = AutoencoderKL(**VAE).eval()
    else:
        nested = (checkpoint / "vae").is_dir()
        full = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae" if nested else None)
    # Without the bookkeeping keys: "_use_default_values" would reset the override.
    config = {k: v for k, v in full.config.items() if not k.startswith("_")}
    config["mid_block_add_attention"] = False
    plain = AutoencoderKL.from_config(config).eval()
    missing, _ = plain.load_state_dict(full.state_dict(), strict=False)
    assert not missing, missing  # every weight of the plain VAE is the full one's
    return {"with attention": full, "no attention": plain}


def training_crops(count: int) -> list[Image.Image]:
    """What training sees of the demo photos: the square crops around their faces."""
    limits = PhotoLimits.from_settings(Settings())
    crops = []
    for path in PHOTOS[:count]:
        photo = normalize_photo(path.read_bytes(), path.name, limits)
        crops.append(Image.open(io.BytesIO(photo.train_data)).convert("RGB"))
    return crops


class Encoder:
    """One VAE's posterior, timed per call."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.seconds: dict[int, list[float]] = {}

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        posterior = self.vae.encode(pixels.unsqueeze(0)).latent_dist
        side = pixels.shape[-1]
        self.seconds.setdefault(side, []).append(time.perf_counter() - start)
        return posterior.mean[0], posterior.std[0]


def attention_share(vae: Any, pixels: torch.Tensor) -> float:
    """||attention(x) - x|| / ||x|| at the mid-block: how much the random attention
    changes the features it sees (its residual included)."""
    seen: list[float] = []

    def hook(_module: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(float((out - args[0]).norm() / args[0].norm()))

    handle = vae.encoder.mid_block.attentions[0].register_forward_hook(hook)
    with torch.no_grad():
        vae.encode(pixels.unsqueeze(0))
    handle.remove()
    return seen[0]


def jpeg_round_trip(pixels: torch.Tensor) -> torch.Tensor:
    as_bytes = ((pixels.permute(1, 2, 0).numpy() + 1.0) * PIXEL_SCALE).round().clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(as_bytes.astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
    back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / PIXEL_SCALE - 1.0
    return torch.from_numpy(back).permute(2, 0, 1)


def rel_l2(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.norm() / reference.norm())


def rms(values: torch.Tensor) -> float:
    return float(values.pow(2).mean().sqrt())


def compare(window: torch.Tensor, crop: torch.Tensor, std: torch.Tensor) -> dict[str, float]:
    error = window - crop
    inner = (..., slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    ring = torch.ones_like(crop, dtype=torch.bool)
    ring[inner] = False
    return {
        "rel_l2": rel_l2(error, crop),
        "rel_l2_interior": rel_l2(error[inner], crop[inner]),
        "rel_l2_border": rel_l2(error[ring], crop[ring]),
        "rms_error": rms(error),
        "rms_mean": rms(crop),
        "rms_std": rms(std),
    }


def measure_photo(
    encode: Encoder, image: Image.Image, side: int, enlarged: int, factor: int, jpeg: bool
) -> dict[str, dict[str, float]]:
    """Every window position's comparison for one photo; with ``jpeg`` also the
    JPEG yardstick of the centre crop."""
    view = photo_tensor(image, enlarged * factor)
    mean, _ = encode(view)
    slack = enlarged - side
    out: dict[str, dict[str, float]] = {}
    for label, (top, left) in corner_centre_corner(slack).items():
        pixels = view[
            :, top * factor : (top + side) * factor, left * factor : (left + side) * factor
        ]
        crop_mean, crop_std = encode(pixels)
        window = mean[:, top : top + side, left : left + side]
        out[label] = compare(window, crop_mean, crop_std)
        if jpeg and label == "centre":
            jpeg_mean, _ = encode(jpeg_round_trip(pixels))
            out["jpeg q90 (yardstick)"] = compare(jpeg_mean, crop_mean, crop_std)
    return out


def corner_centre_corner(slack: int) -> dict[str, tuple[int, int]]:
    return {"top-left": (0, 0), "centre": (slack // 2, slack // 2), "bottom-right": (slack, slack)}


def averaged(per_photo: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        label: {
            key: statistics.fmean(p[label][key] for p in per_photo) for key in per_photo[0][label]
        }
        for label in per_photo[0]
    }


def costs(seconds: dict[int, float], side_px: int, crops_per_image: int) -> dict[str, Any]:
    """What encoding real crops would cost at SD 1.5's recipe, from measured encodes."""
    images = MAX_PHOTOS + SD15.class_images  # a full subject and its class images
    per_step = 1 + int(SD15.prior_preservation)  # instance (+ class) example per step
    now = images * len(view_sides(side_px // 8, SD15.crop_jitter))
    record: dict[str, Any] = {
        "images": images,
        "encodes_up_front_now": now,
        "encodes_up_front_k_crops": images * crops_per_image,
        "encodes_per_run_every_step": SD15.train_steps * per_step,
        "s_per_encode": seconds[side_px],
    }
    for key in ("encodes_up_front_now", "encodes_up_front_k_crops", "encodes_per_run_every_step"):
        record[key.replace("encodes", "s")] = record[key] * seconds[side_px]
    step = measured_step_s()
    if step is not None and SMALL_SIDE in seconds:
        record["s_per_step_256px_measured"] = step
        record["step_overhead_256px_every_step"] = per_step * seconds[SMALL_SIDE] / step
    return record


def measured_step_s() -> float | None:
    """atelier's seconds per SD 1.5 training step at 256 px (instance + class
    example), from ``bench.dreambooth_vs_reference``'s last run, if there is one."""
    if not STEP_RESULT.is_file():
        return None
    median = json.loads(STEP_RESULT.read_text()).get("median", {})
    # Its atelier side is "atelier", or "atelier equal" (the reference's recipe).
    side = median.get("atelier equal") or median.get("atelier") or {}
    step = side.get("s_per_step")
    return float(step) if step is not None else None


def print_table(errors: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"{'vae':<15} {'window':<21} {'rel L2':>7} {'interior':>8} {'border':>7}"
          f" {'rms err':>8} {'rms mean':>8} {'rms std':>8} {'err/std':>7}")  # fmt: skip
    for variant, rows in errors.items():
        for label, m in rows.items():
            print(
                f"{variant:<15} {label:<21} {m['rel_l2']:>7.4f} {m['rel_l2_interior']:>8.4f}"
                f" {m['rel_l2_border']:>7.4f} {m['rms_error']:>8.4f} {m['rms_mean']:>8.4f}"
                f" {m['rms_std']:>8.4f} {m['rms_error'] / m['rms_std']:>7.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vae_crop_error")
    parser.add_argument("--photos", type=int, default=2, help="demo photos to measure on")
    parser.add_argument("--resolution", type=int, default=SD15.resolution)
    parser.add_argument("--jitter", type=float, default=SD15.crop_jitter)
    parser.add_argument("--crops-per-image", type=int, default=8, help="K, for the cost estimate")
    parser.add_argument(
        "--vae", type=Path, help="a diffusers checkpoint (or VAE) folder: trained weights"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vaes = build_vaes(args.vae)
    factor = 2 ** (len(vaes["with attention"].config.block_out_channels) - 1)
    side = args.resolution // factor
    sides = view_sides(side, args.jitter)
    assert len(sides) == 2, "crop jitter too small for an enlarged view"
    crops = training_crops(args.photos)
    errors: dict[str, dict[str, dict[str, float]]] = {}
    timed = Encoder(vaes["with attention"])
    for variant, vae in vaes.items():
        encode = timed if vae is timed.vae else Encoder(vae)
        per_photo = [
            measure_photo(encode, crop, side, sides[1], factor, jpeg=encode is timed)
            for crop in crops
        ]
        errors[variant] = averaged(per_photo)
    timed(photo_tensor(crops[0], SMALL_SIDE))
    view = photo_tensor(crops[0], sides[1] * factor)
    share = attention_share(vaes["with attention"], view)
    seconds = {s: statistics.median(t) for s, t in timed.seconds.items()}
    cost = costs(seconds, args.resolution, args.crops_per_image)

    weights = f"the weights of {args.vae}" if args.vae else f"random weights (seed {SEED})"
    print(f"\nSD 1.5-shaped VAE, {weights}, {args.resolution} px, crop jitter "
          f"{args.jitter}: latent windows of the {sides[1] * factor} px view vs. the encoded "
          f"{args.resolution} px crop; mean of {len(crops)} demo face crops\n")  # fmt: skip
    print_table(errors)
    print(f"\nmid-block attention changes its input by {share:.3f} (relative L2, {weights})")
    print(f"seconds per encode (median, {torch.get_num_threads()} torch threads): "
          + ", ".join(f"{s} px {t:.2f}" for s, t in sorted(seconds.items())))  # fmt: skip
    print(json.dumps(cost, indent=2))
    write_result(
        "vae_crop_error",
        {
            "settings": {
                **vars(args),
                "vae": weights,
                "torch_threads": torch.get_num_threads(),
                "seed": SEED,
            },
            "weights": str(args.vae) if args.vae else "random (seeded), SD 1.5's architecture",
            "errors": errors,
            "attention_share": share,
            "s_per_encode": {str(s): t for s, t in seconds.items()},
            "cost": cost,
        },
    )


if __name__ == "__main__":
    main()
