"""DreamBooth-LoRA training on a resident pipeline.

The base weights stay frozen; a peft LoRA adapter is added to the UNet's attention
projections, trained with the denoising loss on the subject's photos paired with
the instance prompt, exported in the format stock diffusers loads, and removed.
The pipeline is shared with generation, so it is left exactly as it was found.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from PIL import Image, ImageOps

from core import errors
from core.errors import InvalidInput
from core.ml.pipeline import exclusive

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    from core.ml.profiles import Profile

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# LoRA init as diffusers' DreamBooth script: A gaussian, B zero (adapter starts as identity).
LORA_INIT: Literal["gaussian"] = "gaussian"
PIXEL_SCALE = 127.5  # maps 0..255 to -1..1


class Canceled(errors.Canceled):
    """The job asked to stop (``should_stop()`` returned True); nothing is returned."""


# The worker catches this name for training; generation raises the same class.
TrainingCanceled = Canceled


@dataclass(frozen=True)
class TrainParams:
    steps: int
    learning_rate: float
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    resolution: int
    seed: int = 0

    @classmethod
    def from_profile(cls, profile: Profile, steps: int | None = None, seed: int = 0) -> TrainParams:
        """The profile's hyper-parameters; ``steps`` None or 0 means the profile's."""
        return cls(
            steps=steps or profile.train_steps,
            learning_rate=profile.learning_rate,
            rank=profile.lora_rank,
            alpha=profile.lora_alpha,
            target_modules=profile.lora_target_modules,
            resolution=profile.resolution,
            seed=seed,
        )


def _photo_tensor(photo: Image.Image, resolution: int) -> torch.Tensor:
    """Center-crop to a square, resize to ``resolution``, scale to [-1, 1], CHW."""
    square = ImageOps.fit(photo.convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.float32) / PIXEL_SCALE - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


@torch.no_grad()
def _encode_photos(
    pipe: StableDiffusionPipeline, photos: list[Image.Image], resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every photo and of its mirror image.

    Encoding both orientations once replaces a per-step VAE pass: picking one of
    the 2N latents uniformly is the same as a random horizontal flip.
    """
    vae = pipe.vae
    means, stds = [], []
    for photo in photos:
        pixels = _photo_tensor(photo, resolution)
        # Two images per VAE call, not all photos at once: at 512 px a batch of
        # 2N images would cost gigabytes of activations.
        pair = torch.stack([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
        posterior = vae.encode(pair).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _encode_prompt(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@dataclass(frozen=True)
class _ModuleState:
    """Train/eval mode of every submodule and requires_grad of every parameter."""

    modes: dict[str, bool]
    grads: dict[str, bool]

    @classmethod
    def of(cls, module: torch.nn.Module) -> _ModuleState:
        modes = {name: sub.training for name, sub in module.named_modules()}
        grads = {name: param.requires_grad for name, param in module.named_parameters()}
        return cls(modes, grads)

    def restore(self, module: torch.nn.Module) -> None:
        for name, sub in module.named_modules():
            if name in self.modes:
                sub.training = self.modes[name]
        for name, param in module.named_parameters():
            param.requires_grad_(self.grads.get(name, False))


@contextmanager
def _restored(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """Undo everything training does to the pipeline, even on error or cancel."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    saved = {name: _ModuleState.of(module) for name, module in modules.items()}
    try:
        yield
    finally:
        # Removes the peft wrappers themselves, not only the adapter weights, so the
        # UNet's modules and state-dict keys are the original ones again.
        pipe.unload_lora_weights()
        for name, module in modules.items():
            saved[name].restore(module)


def _add_lora(
    pipe: StableDiffusionPipeline, params: TrainParams, adapter: str
) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    unet = pipe.unet
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        init_lora_weights=LORA_INIT,
        target_modules=list(params.target_modules),
    )
    cuda_devices = [unet.device.index or 0] if unet.device.type == "cuda" else []
    # peft initialises the new weights from torch's global RNG: seed it locally.
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(params.seed)
        unet.add_adapter(config, adapter_name=adapter)
    trainable = [param for param in unet.parameters() if param.requires_grad]
    for param in trainable:
        # Optimizer state and updates in fp32 even when the base model is half precision.
        param.data = param.data.float()
    return trainable


def _noise_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.IntTensor
) -> torch.Tensor:
    """What the UNet learns to predict, as the checkpoint was trained (SD 2.x-style
    checkpoints predict velocity, SD 1.x noise)."""
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    # A property of the checkpoint, not of the request.
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def _randn(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator so a seed means the same noise on every device.
    return torch.randn(shape, generator=generator).to(like.device)


def _training_step(
    pipe: StableDiffusionPipeline,
    noise_scheduler: DDPMScheduler,
    photo_latents: tuple[torch.Tensor, torch.Tensor],
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One denoising-loss evaluation on one randomly chosen (maybe mirrored) photo."""
    means, stds = photo_latents
    pick = int(torch.randint(len(means), (1,), generator=generator))
    mean, std = means[pick : pick + 1], stds[pick : pick + 1]
    latents = (mean + std * _randn(mean.shape, generator, mean)) * pipe.vae.config.scaling_factor
    noise = _randn(latents.shape, generator, latents)
    train_steps = noise_scheduler.config["num_train_timesteps"]
    timestep = torch.randint(train_steps, (1,), generator=generator).to(latents.device)
    # diffusers annotates timesteps as IntTensor; any integer tensor works (this is int64).
    t = cast(torch.IntTensor, timestep)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = _noise_target(noise_scheduler, latents, noise, t)
    unet = pipe.unet
    half = unet.dtype != torch.float32
    with torch.autocast(unet.device.type, dtype=unet.dtype, enabled=half):
        prediction = unet(noisy.to(unet.dtype), t, encoder_hidden_states=text_embeddings).sample
    return F.mse_loss(prediction.float(), target.float())


def _export_lora(pipe: StableDiffusionPipeline, adapter: str, params: TrainParams) -> bytes:
    """The adapter as a diffusers LoRA safetensors file, alpha folded into lora_B.

    Diffusers' file format has no alpha unless a metadata header carries it, and a
    state dict loaded from bytes loses that header; a loader then assumes
    alpha == rank. Scaling lora_B by alpha / rank makes any loader apply it right.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    scale = params.alpha / params.rank
    peft_state = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    folded = {
        key: (value * scale if ".lora_B." in key else value)
        .detach()
        .to("cpu", torch.float32)
        .contiguous()
        for key, value in peft_state.items()
    }
    with tempfile.TemporaryDirectory(prefix="atelier-lora-") as folder:
        # The pipeline class's own writer: the file layout its load_lora_weights reads.
        type(pipe).save_lora_weights(
            folder,
            unet_lora_layers=convert_state_dict_to_diffusers(folded),
            weight_name=LORA_WEIGHT_NAME,
        )
        return (Path(folder) / LORA_WEIGHT_NAME).read_bytes()


def _check_inputs(photos: list[Image.Image], params: TrainParams) -> None:
    if not photos:
        raise InvalidInput("training needs at least one photo")
    if params.steps < 1 or params.rank < 1 or params.alpha < 1 or params.learning_rate <= 0:
        raise InvalidInput(f"invalid training parameters: {params}")


def train_dreambooth_lora(
    pipe: StableDiffusionPipeline,
    photos: list[Image.Image],
    instance_prompt: str,
    params: TrainParams,
    on_step: Callable[[int, int, float], None],
    should_stop: Callable[[], bool],
) -> bytes:
    """Train a LoRA of the subject in ``photos``; return it as safetensors bytes.

    ``on_step(step, total, loss)`` follows each step (1-based); ``should_stop()``
    is asked before each step and raises Canceled when true.
    """
    _check_inputs(photos, params)
    adapter = f"atelier_train_{uuid.uuid4().hex}"
    with exclusive(pipe), _restored(pipe), torch.enable_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        generator = torch.Generator().manual_seed(params.seed)
        # The forward process the model was trained with, from the checkpoint's schedule.
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        photo_latents = _encode_photos(pipe, photos, params.resolution)
        text_embeddings = _encode_prompt(pipe, instance_prompt).to(pipe.unet.dtype)
        trainable = _add_lora(pipe, params, adapter)
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
        pipe.unet.train()
        for step in range(1, params.steps + 1):
            if should_stop():
                raise Canceled(f"training canceled before step {step} of {params.steps}")
            loss = _training_step(pipe, noise_scheduler, photo_latents, text_embeddings, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            on_step(step, params.steps, float(loss.detach()))
        return _export_lora(pipe, adapter, params)
