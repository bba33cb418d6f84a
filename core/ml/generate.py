"""Text-to-image generation with an optional subject LoRA on a resident pipeline.

The pipeline is loaded once per process; what changes per request changes on it
in place and is put back: the sampler (``SCHEDULERS``, built from the
checkpoint's own noise schedule) and the subject's LoRA (through a ``LoraCache``,
or loaded and removed again when the caller has none).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from PIL import Image

from core.errors import InvalidInput
from core.ml.lora_cache import LoraCache, LoraWeights
from core.ml.pipeline import exclusive
from core.ml.profiles import TimestepSpacing
from core.ml.train import Canceled

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from core.ml.families import Pipeline

# SD 1.x and SDXL latents are 1/8 of the image side, so sides must be multiples of 8.
SIDE_MULTIPLE = 8

# Sampler name -> class and the options that make it that sampler. Each is built
# with from_config on the pipeline's scheduler config, so the checkpoint's betas,
# prediction type and timestep spacing carry over; nothing is reloaded. The API's
# list of names is core.generations.SCHEDULERS (it must not import torch).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    # DPM-Solver++ (2M): good images in 20-30 steps; the default.
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # Euler ancestral: adds fresh noise each step (drawn from the seeded generator).
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    # PLMS without the Runge-Kutta warm-up steps, as SD pipelines use it.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
DEFAULT_SCHEDULER = "dpmpp_2m"
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    num_images: int
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    negative_prompt: str = ""
    scheduler: str = DEFAULT_SCHEDULER
    # A profile's ``timestep_spacing``; None keeps the checkpoint's scheduler config's.
    timestep_spacing: str | None = None


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int


def instance_prompt(token: str, class_noun: str) -> str:
    """The training caption: a rare token bound to the subject, plus its class."""
    return f"a photo of {token} {class_noun}"


def subject_prompt(token: str, class_noun: str, prompt: str) -> str:
    """The user's prompt with the subject put first, as it was captioned in training:
    ``"a photo of {token} {class_noun}, {prompt}"`` (just the caption when empty)."""
    scene = prompt.strip()
    subject = instance_prompt(token, class_noun)
    return f"{subject}, {scene}" if scene else subject


def _check_params(params: GenerateParams) -> None:
    if params.num_images < 1 or params.steps < 1:
        raise InvalidInput("num_images and steps must be at least 1")
    if params.width % SIDE_MULTIPLE or params.height % SIDE_MULTIPLE:
        raise InvalidInput(f"width and height must be multiples of {SIDE_MULTIPLE}")
    if params.width < SIDE_MULTIPLE or params.height < SIDE_MULTIPLE:
        raise InvalidInput("width and height must be positive")
    if params.scheduler not in SCHEDULERS:
        raise InvalidInput(
            f"unknown scheduler {params.scheduler!r}; known: {', '.join(SCHEDULERS)}",
            field="scheduler",
        )
    spacing = params.timestep_spacing
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise InvalidInput(
            f"unknown timestep spacing {spacing!r}; known: {', '.join(TIMESTEP_SPACINGS)}",
            field="timestep_spacing",
        )


def make_scheduler(name: str, config: Any, timestep_spacing: str | None = None) -> SchedulerMixin:
    """A fresh ``name`` sampler on the noise schedule in ``config``, its timesteps
    spaced by ``timestep_spacing`` (None: as ``config`` says)."""
    cls, options = SCHEDULERS[name]
    if timestep_spacing is not None:
        options = {**options, "timestep_spacing": timestep_spacing}
    scheduler: SchedulerMixin = cls.from_config(config, **options)  # type: ignore[attr-defined]
    return scheduler


def _png(image: Image.Image) -> bytes:
    # Rebuilt from raw pixels so no text, EXIF or ICC chunk can ride along.
    bare = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def _lora_applied(
    pipe: Pipeline, lora: LoraWeights | None, cache: LoraCache | None
) -> Iterator[None]:
    """``lora`` active on ``pipe`` (None: every adapter disabled) for the block.

    With a cache the adapter stays resident afterwards. Without one the LoRA is
    loaded for this call only and removed after it, peft wrappers included.
    """
    if cache is not None:
        if cache.pipe is not pipe:
            raise ValueError("the LoRA cache belongs to another pipeline")
        with cache.applied(lora):
            yield
        return
    one_shot = LoraCache(pipe, max_resident=1, max_host_bytes=0, swap="load")
    try:
        with one_shot.applied(lora):
            yield
    finally:
        one_shot.forget_resident()


@contextmanager
def _scheduler_kept(pipe: Pipeline) -> Iterator[None]:
    """Put the pipeline's own scheduler back after the block swapped samplers."""
    original = pipe.scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def _one_image(
    pipe: Pipeline,
    params: GenerateParams,
    seed: int,
    on_denoise_step: Callable[[int], None],
    schedule: Any,
) -> GeneratedImage:
    def step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_denoise_step(step + 1)
        return tensors

    # A fresh sampler per image: no state (solver history, step index) carries
    # over, so image i depends on its seed and the parameters only.
    pipe.scheduler = make_scheduler(params.scheduler, schedule, params.timestep_spacing)
    # A CPU generator gives the same starting noise for a seed on every device.
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        width=params.width,
        height=params.height,
        generator=generator,
        output_type="pil",
        callback_on_step_end=step_end,
    )
    return GeneratedImage(_png(result.images[0]), seed, params.width, params.height)


def generate_images(
    pipe: Pipeline,
    lora: bytes | LoraWeights | None,
    params: GenerateParams,
    on_step: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    *,
    cache: LoraCache | None = None,
) -> list[GeneratedImage]:
    """Generate ``params.num_images`` images; image i uses seed ``params.seed + i``.

    Same seed, LoRA, parameters and device give the same PNG bytes. Images are
    denoised one at a time, not as a batch: a batch's numerics may differ slightly
    from a lone image's, and each image must be reproducible from its own seed
    alone. ``on_step(done, total)`` counts denoising steps over all images;
    ``should_stop()`` is asked after each step and raises Canceled.

    ``lora`` is the subject's LoRA (bytes, or bytes with their sha256) or None for
    the base model. With ``cache`` (the pipeline's ``LoraCache``) the adapter stays
    resident for the next call; without, the pipeline is left as it was found.
    """
    _check_params(params)
    weights = LoraWeights.of(lora) if isinstance(lora, bytes) else lora
    total = params.num_images * params.steps
    with exclusive(pipe), _lora_applied(pipe, weights, cache), _scheduler_kept(pipe):
        schedule = pipe.scheduler.config
        images: list[GeneratedImage] = []
        for index in range(params.num_images):
            if should_stop():
                raise Canceled(f"generation canceled after {index} images")

            def on_denoise_step(step: int, done_before: int = index * params.steps) -> None:
                on_step(done_before + step, total)
                if should_stop():
                    raise Canceled("generation canceled")

            images.append(_one_image(pipe, params, params.seed + index, on_denoise_step, schedule))
        return images
