"""What DreamBooth training sees: latent views of the images.

Every image is VAE-encoded once, before the first step, in every view the
augmentation can pick: as it is, mirrored when the profile flips (off for
people), and (with crop jitter) also enlarged by ``1 + jitter``. A step then picks
one view, takes a random window of the training size out of its latent grid and
samples from the posterior. Picking a mirrored view is a random horizontal flip; a
window of the enlarged view is a random zoom and crop. Cropping the latent grid
stands in for cropping pixels, so no step pays for a VAE pass. It is an
approximation: AutoencoderKL's encoder has a global self-attention block and
GroupNorms over the whole image, so a window of the latents is not the latents of
that crop. `python -m bench.vae_crop_error` measured a relative L2 error of the
posterior mean of 0.12-0.14 on an SD 1.5-shaped VAE with random weights at 512 px (a
JPEG q90 round trip: 0.023), nearly all of it with the attention block removed too.
Encoding exact crops would cost a VAE pass per example per step; docs/recipes.md
("Latent crops") has the figures and why the approximation stays.

Each example also carries SDXL's micro-conditioning (``core.ml.families.time_ids``),
as diffusers' SDXL script records it: the size of the image it came from, the
top-left corner of its window in the resized view, and the training size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from core.ml.families import time_ids

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from core.ml.families import Pipeline

PIXEL_SCALE = 127.5  # maps 0..255 to -1..1


@dataclass(frozen=True)
class LatentViews:
    """Posterior mean and std of every view, each (1, C, h, w) with h, w >= ``side``."""

    means: list[torch.Tensor]
    stds: list[torch.Tensor]
    side: int  # latent side of one training example
    # (height, width) in pixels of the image each view was encoded from.
    original_sizes: list[tuple[int, int]]
    factor: int  # pixels per latent along a side


@dataclass(frozen=True)
class Example:
    """One training example: unscaled latents (1, C, side, side) and its time ids."""

    latents: torch.Tensor
    time_ids: tuple[int, ...]


def photo_tensor(photo: Image.Image, side: int) -> torch.Tensor:
    """Center-crop to a square, resize to ``side``, scale to [-1, 1], CHW."""
    square = ImageOps.fit(photo.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.float32) / PIXEL_SCALE - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def vae_downscale(pipe: Pipeline) -> int:
    """Pixels per latent along a side: the VAE halves the side once per extra block."""
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


def view_sides(latent_side: int, crop_jitter: float) -> tuple[int, ...]:
    """Latent sides of the encoded views: the training size, plus an enlarged one."""
    enlarged = round(latent_side * (1 + max(crop_jitter, 0.0)))
    return (latent_side,) if enlarged <= latent_side else (latent_side, enlarged)


@contextmanager
def _encoding_precision(vae: AutoencoderKL) -> Iterator[None]:
    """Encode in fp32 with an fp16 VAE whose config says ``force_upcast`` (SDXL's
    overflows in fp16; its pipeline upcasts it the same way to decode), and cast it
    back after."""
    upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    # diffusers' wrapper around ModelMixin.to hides its signature from mypy.
    if upcast:
        vae.to(dtype=torch.float32)  # type: ignore[call-arg]
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)  # type: ignore[call-arg]


@torch.no_grad()
def encode_views(
    pipe: Pipeline,
    images: list[Image.Image],
    resolution: int,
    crop_jitter: float,
    flip: bool = False,
) -> LatentViews:
    vae = pipe.vae
    factor = vae_downscale(pipe)
    side = resolution // factor
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    with _encoding_precision(vae):
        for image in images:
            for latent_side in view_sides(side, crop_jitter):
                pixels = photo_tensor(image, latent_side * factor)
                # One image (and its mirror) per VAE call, not all at once: at 512 px
                # a batch of 2N images would cost gigabytes of activations.
                sides = [pixels, pixels.flip(-1)] if flip else [pixels]
                pair = torch.stack(sides).to(vae.device, vae.dtype)
                posterior = vae.encode(pair).latent_dist
                means.extend(posterior.mean.float().split(1))
                stds.extend(posterior.std.float().split(1))
                sizes.extend([(image.height, image.width)] * len(pair))
    return LatentViews(means, stds, side, sizes, factor)


def randn(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator so a seed means the same noise on every device.
    return torch.randn(shape, generator=generator).to(like.device)


def _draw(bound: int, generator: torch.Generator) -> int:
    """Uniform in [0, bound), from ``generator`` (always one draw, even for bound 1)."""
    return int(torch.randint(bound, (1,), generator=generator))


def sample_example(views: LatentViews, generator: torch.Generator) -> Example:
    """One training example: a random view, a random window, a posterior sample."""
    pick = _draw(len(views.means), generator)
    mean, std = views.means[pick], views.stds[pick]
    side = views.side
    top = _draw(mean.shape[-2] - side + 1, generator)
    left = _draw(mean.shape[-1] - side + 1, generator)
    window = (..., slice(top, top + side), slice(left, left + side))
    mean, std = mean[window], std[window]
    pixels = side * views.factor
    micro = time_ids(
        views.original_sizes[pick], (top * views.factor, left * views.factor), (pixels, pixels)
    )
    return Example(mean + std * randn(mean.shape, generator, mean), micro)


def sample_latents(views: LatentViews, generator: torch.Generator) -> torch.Tensor:
    """One training example's unscaled latents (see ``sample_example``)."""
    return sample_example(views, generator).latents
