"""Model profiles: every per-model number lives in the ``PROFILES`` table.

A profile names a base checkpoint and the hyper-parameters that suit it. Code
never branches on a profile's name; it reads these fields. Adding a model is
adding a row (``family`` leaves room for SDXL, whose pipeline differs).

This module imports nothing heavy, so the API can validate profile names
without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.errors import InvalidInput

# The UNet attention projections LoRA adapts in every SD 1.x profile: the usual
# DreamBooth-LoRA choice (query, key, value and output of each attention block).
SD1_ATTENTION_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Profile:
    name: str
    family: str  # pipeline family: "sd1" today, "sdxl" later
    resolution: int  # training and default generation side, in pixels
    train_steps: int  # default number of optimizer steps for a training job
    learning_rate: float
    lora_rank: int
    lora_alpha: int
    lora_target_modules: tuple[str, ...]
    inference_steps: int  # DPM-Solver++ steps per image
    guidance_scale: float
    hub_id: str | None  # Hugging Face repository; None when built locally


TINY = Profile(
    # Random weights built on this host by `python -m core.ml.tiny`: fast enough
    # for tests and CPU-only development, its images are noise by design.
    name="tiny",
    family="sd1",
    resolution=64,
    train_steps=40,
    learning_rate=1e-3,
    lora_rank=4,
    lora_alpha=4,
    lora_target_modules=SD1_ATTENTION_MODULES,
    inference_steps=15,
    guidance_scale=5.0,
    hub_id=None,
)
SD15 = Profile(
    name="sd15",
    family="sd1",
    resolution=512,
    train_steps=500,
    learning_rate=1e-4,
    lora_rank=8,
    lora_alpha=8,
    lora_target_modules=SD1_ATTENTION_MODULES,
    inference_steps=30,
    guidance_scale=7.5,
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
)
# SD v1.4 shares v1.5's architecture and recipe; only the weights differ.
SD14 = replace(SD15, name="sd14", hub_id="CompVis/stable-diffusion-v1-4")

PROFILES: dict[str, Profile] = {p.name: p for p in (TINY, SD15, SD14)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise InvalidInput(
            f"unknown model profile {name!r}; known profiles: {known}", profile=name
        ) from None
