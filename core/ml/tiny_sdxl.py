"""Build the "tiny-sdxl" checkpoint: a real SDXL pipeline with small random weights.

The same classes and wiring as SDXL base 1.0, shrunk: a UNet2DConditionModel
with ``addition_embed_type="text_time"`` that cross-attends to two CLIP text
encoders' hidden states side by side (a CLIPTextModel and a
CLIPTextModelWithProjection whose pooled projection, with six size/crop numbers,
feeds the UNet's added embedding), an AutoencoderKL with SDXL's latent scale,
two offline CLIP tokenizers and SDXL's Euler scheduler. Saved with
``save_pretrained``, it loads through ``StableDiffusionXLPipeline.from_pretrained``
exactly as the real checkpoint does, in a second on a CPU. Its images are noise.

Run ``python -m core.ml.tiny_sdxl [PATH]`` to build it (default:
<models_dir>/tiny-sdxl).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from core.ml import tiny
from core.ml.local_checkpoint import build_atomically, builder_main, is_complete
from core.ml.profiles import get_profile
from core.ml.tokenizer import OPENCLIP_PAD_TOKEN, build_clip_tokenizer

PROFILE_NAME = "tiny-sdxl"

# Architecture, in one place. The first text encoder and the VAE are tiny's.
TEXT_2_WIDTH = 64  # the second (OpenCLIP-style) encoder is the wider one, as in SDXL
TEXT_2_MLP_WIDTH = 128
POOLED_WIDTH = TEXT_2_WIDTH  # its projection keeps the width, as bigG's does
# Each of the six size/crop numbers is embedded this wide (SDXL: 256).
TIME_EMBED_WIDTH = 8
MICRO_CONDITIONS = 6  # original (h, w), crop (top, left), target (h, w)
ATTENTION_HEADS = (2, 4)  # per UNet level (SDXL: 5, 10, 20)
# Transformer blocks per UNet level; SDXL's first level has none (a DownBlock2D).
TRANSFORMER_LAYERS = (1, 2)
SDXL_LATENT_SCALE = 0.13025  # SDXL's VAE scaling_factor (SD 1.x: 0.18215)
# SDXL base 1.0's scheduler: Euler on SD's scaled-linear betas, "leading" spacing.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

REQUIRED_FILES = (
    *tiny.REQUIRED_FILES,
    "tokenizer_2/tokenizer_config.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
)


def is_complete_checkpoint(path: Path) -> bool:
    return is_complete(path, REQUIRED_FILES)


def _unet(side: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=side,
        in_channels=tiny.LATENT_CHANNELS,
        out_channels=tiny.LATENT_CHANNELS,
        block_out_channels=tiny.CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=TRANSFORMER_LAYERS,
        attention_head_dim=ATTENTION_HEADS,
        use_linear_projection=True,
        # Cross-attention reads both encoders' hidden states concatenated.
        cross_attention_dim=tiny.TEXT_WIDTH + TEXT_2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=MICRO_CONDITIONS * TIME_EMBED_WIDTH + POOLED_WIDTH,
    )


def _text_encoders(pad_id_2: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    first = tiny.text_config(
        tiny.TEXT_WIDTH, tiny.TEXT_MLP_WIDTH, tiny.TEXT_WIDTH, tiny.CLIP_EOS_ID
    )
    # OpenCLIP's tower uses exact GELU where OpenAI's CLIP uses quick GELU.
    second = tiny.text_config(
        TEXT_2_WIDTH, TEXT_2_MLP_WIDTH, POOLED_WIDTH, pad_id_2, hidden_act="gelu"
    )
    return CLIPTextModel(first), CLIPTextModelWithProjection(second)


def _save_pipeline(out_dir: Path, seed: int) -> None:
    resolution = get_profile(PROFILE_NAME).resolution
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(out_dir / "tokenizer_2", pad_token=OPENCLIP_PAD_TOKEN)
    # Seed the global RNG (module init uses it) without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(tiny.latent_side(resolution))
        autoencoder = tiny.vae(resolution, scaling_factor=SDXL_LATENT_SCALE)
        text_encoder, text_encoder_2 = _text_encoders(tokenizer_2.pad_token_id)
    pipe = StableDiffusionXLPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE),
        force_zeros_for_empty_prompt=True,  # SDXL base's setting
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """Build the tiny-sdxl checkpoint at ``path`` unless a complete one is there
    (atomically: see ``core.ml.local_checkpoint``)."""
    return build_atomically(path, _save_pipeline, REQUIRED_FILES, seed)


def main(argv: list[str] | None = None) -> int:
    return builder_main(argv, PROFILE_NAME, build_tiny_sdxl_checkpoint, REQUIRED_FILES)


if __name__ == "__main__":
    sys.exit(main())
