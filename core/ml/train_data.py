"""What DreamBooth training sees: latent views of the images, and prompt token ids.

Every image is VAE-encoded once, before the first step, in every view the
augmentation can pick: as it is and mirrored, and (with crop jitter) also
enlarged by ``1 + jitter``. A step then picks one view, takes a random window
of the training size out of its latent grid and samples from the posterior.
Picking a mirrored view is a random horizontal flip; a window of the enlarged
view is a random zoom and crop. Cropping the latent grid stands in for cropping
pixels: the VAE encoder is convolutional, so away from the borders the latents
of a crop are the crop of the latents, and no step pays for a VAE pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

PIXEL_SCALE = 127.5  # maps 0..255 to -1..1


@dataclass(frozen=True)
class LatentViews:
    """Posterior mean and std of every view, each (1, C, h, w) with h, w >= ``side``."""

    means: list[torch.Tensor]
    stds: list[torch.Tensor]
    side: int  # latent side of one training example


def photo_tensor(photo: Image.Image, side: int) -> torch.Tensor:
    """Center-crop to a square, resize to ``side``, scale to [-1, 1], CHW."""
    square = ImageOps.fit(photo.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.float32) / PIXEL_SCALE - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def vae_downscale(pipe: StableDiffusionPipeline) -> int:
    """Pixels per latent along a side: the VAE halves the side once per extra block."""
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


def view_sides(latent_side: int, crop_jitter: float) -> tuple[int, ...]:
    """Latent sides of the encoded views: the training size, plus an enlarged one."""
    enlarged = round(latent_side * (1 + max(crop_jitter, 0.0)))
    return (latent_side,) if enlarged <= latent_side else (latent_side, enlarged)


@torch.no_grad()
def encode_views(
    pipe: StableDiffusionPipeline, images: list[Image.Image], resolution: int, crop_jitter: float
) -> LatentViews:
    vae = pipe.vae
    factor = vae_downscale(pipe)
    side = resolution // factor
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    for image in images:
        for latent_side in view_sides(side, crop_jitter):
            pixels = photo_tensor(image, latent_side * factor)
            # Two images per VAE call, not all at once: at 512 px a batch of 2N
            # images would cost gigabytes of activations.
            pair = torch.stack([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
            posterior = vae.encode(pair).latent_dist
            means.extend(posterior.mean.float().split(1))
            stds.extend(posterior.std.float().split(1))
    return LatentViews(means, stds, side)


def randn(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator so a seed means the same noise on every device.
    return torch.randn(shape, generator=generator).to(like.device)


def _draw(bound: int, generator: torch.Generator) -> int:
    """Uniform in [0, bound), from ``generator`` (always one draw, even for bound 1)."""
    return int(torch.randint(bound, (1,), generator=generator))


def sample_latents(views: LatentViews, generator: torch.Generator) -> torch.Tensor:
    """One training example, unscaled: a random view, a random window, a posterior sample."""
    pick = _draw(len(views.means), generator)
    mean, std = views.means[pick], views.stds[pick]
    side = views.side
    top = _draw(mean.shape[-2] - side + 1, generator)
    left = _draw(mean.shape[-1] - side + 1, generator)
    window = (..., slice(top, top + side), slice(left, left + side))
    mean, std = mean[window], std[window]
    return mean + std * randn(mean.shape, generator, mean)


def prompt_ids(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(pipe.text_encoder.device)
