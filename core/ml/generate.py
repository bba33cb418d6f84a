"""Text-to-image generation with an optional subject LoRA on a resident pipeline."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from core.errors import InvalidInput
from core.ml.pipeline import exclusive
from core.ml.train import Canceled

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

# SD 1.x latents are 1/8 of the image side, so sides must be multiples of 8.
SIDE_MULTIPLE = 8


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


def _png(image: Image.Image) -> bytes:
    # Rebuilt from raw pixels so no text, EXIF or ICC chunk can ride along.
    bare = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_lora(pipe: StableDiffusionPipeline, lora: bytes, adapter: str) -> None:
    from safetensors.torch import load

    try:
        state_dict = load(lora)
    except Exception as error:  # safetensors raises its own untyped errors
        raise InvalidInput(f"the LoRA is not a readable safetensors file: {error}") from error
    pipe.load_lora_weights(state_dict, adapter_name=adapter)


def _one_image(
    pipe: StableDiffusionPipeline,
    params: GenerateParams,
    seed: int,
    on_denoise_step: Callable[[int], None],
) -> GeneratedImage:
    def step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_denoise_step(step + 1)
        return tensors

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
    pipe: StableDiffusionPipeline,
    lora: bytes | None,
    params: GenerateParams,
    on_step: Callable[[int, int], None],
    should_stop: Callable[[], bool],
) -> list[GeneratedImage]:
    """Generate ``params.num_images`` images; image i uses seed ``params.seed + i``.

    Images are denoised one at a time, not as a batch: a batch's numerics may
    differ slightly from a lone image's, and each image must be reproducible from
    its own seed alone. ``on_step(done, total)`` counts denoising steps over all
    images; ``should_stop()`` is asked after each step and raises Canceled.
    """
    _check_params(params)
    total = params.num_images * params.steps
    adapter = f"atelier_gen_{uuid.uuid4().hex}"
    with exclusive(pipe):
        try:
            if lora is not None:
                _load_lora(pipe, lora, adapter)
            images: list[GeneratedImage] = []
            for index in range(params.num_images):
                if should_stop():
                    raise Canceled(f"generation canceled after {index} images")

                def on_denoise_step(step: int, done_before: int = index * params.steps) -> None:
                    on_step(done_before + step, total)
                    if should_stop():
                        raise Canceled("generation canceled")

                images.append(_one_image(pipe, params, params.seed + index, on_denoise_step))
            return images
        finally:
            if lora is not None:
                # Removes the peft wrappers too: the resident UNet is as it was.
                pipe.unload_lora_weights()
