"""Build the "tiny" checkpoint: a real SD 1.x pipeline with small random weights.

Every component is the genuine class the big models use (UNet2DConditionModel
with cross-attention, AutoencoderKL, CLIPTextModel, the CLIP tokenizer), only
narrow and seeded, so training, LoRA export and generation run the same code
paths as SD 1.5 in seconds on a CPU. Its images are noise; that is the point.

Run ``python -m core.ml.tiny [PATH]`` to build it (default: <models_dir>/tiny).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from core.ml.local_checkpoint import build_atomically, builder_main, is_complete
from core.ml.profiles import get_profile
from core.ml.tokenizer import build_clip_tokenizer

PROFILE_NAME = "tiny"

# Architecture of the tiny model, in one place.
CHANNELS = (32, 64)  # UNet and VAE block widths: the smallest that GroupNorm(32) allows
LATENT_CHANNELS = 4  # as SD 1.x, so latents have the familiar shape
TEXT_WIDTH = 32  # CLIP hidden size, also the UNet's cross-attention width
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_MLP_WIDTH = 64
CLIP_VOCAB_SIZE = 49408
CLIP_POSITIONS = 77
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
# The noise schedule of SD 1.x, so the DDPM/DPM-Solver maths match the real models.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# The files whose presence makes a checkpoint directory usable.
REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


def is_complete_checkpoint(path: Path) -> bool:
    return is_complete(path, REQUIRED_FILES)


def _unet(side: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=side,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
    )


def vae(image_side: int, **options: float) -> AutoencoderKL:
    """The tiny VAE; ``options`` are further config values (SDXL's scaling factor)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(CHANNELS),
        latent_channels=LATENT_CHANNELS,
        sample_size=image_side,
        **options,
    )


def latent_side(image_side: int) -> int:
    """The VAE halves the side once per block after the first."""
    return image_side // 2 ** (len(CHANNELS) - 1)


def text_config(
    width: int, mlp_width: int, projection_dim: int, pad_id: int, **options: Any
) -> CLIPTextConfig:
    """A tiny CLIP text tower on CLIP's real vocabulary and 77 positions;
    ``options`` are further config values (SDXL's second encoder's activation)."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_POSITIONS,
        hidden_size=width,
        intermediate_size=mlp_width,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        projection_dim=projection_dim,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=pad_id,
        **options,
    )


def _text_encoder() -> CLIPTextModel:
    return CLIPTextModel(text_config(TEXT_WIDTH, TEXT_MLP_WIDTH, TEXT_WIDTH, CLIP_EOS_ID))


def _save_pipeline(out_dir: Path, seed: int) -> None:
    resolution = get_profile(PROFILE_NAME).resolution
    # Seed the global RNG (module init uses it) without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, autoencoder = _unet(latent_side(resolution)), vae(resolution)
        text_encoder = _text_encoder()
    pipe = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"),
        unet=unet,
        scheduler=DDPMScheduler(**SCHEDULE),
        # diffusers documents None for both but annotates them as required.
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Build the tiny checkpoint at ``path`` unless a complete one is there
    (atomically: see ``core.ml.local_checkpoint``)."""
    return build_atomically(path, _save_pipeline, REQUIRED_FILES, seed)


def main(argv: list[str] | None = None) -> int:
    return builder_main(argv, PROFILE_NAME, build_tiny_checkpoint, REQUIRED_FILES)


if __name__ == "__main__":
    sys.exit(main())
