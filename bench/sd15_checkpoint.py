"""A Stable Diffusion 1.5-shaped checkpoint with seeded random weights, for benchmarks.

Same architecture as SD 1.5 (so the same FLOPs and memory), built from the
published config values and saved with ``save_pretrained`` so every side of a
benchmark loads it through ``from_pretrained`` like a real checkpoint. 4.0 GB in fp32.

    .venv/bin/python -m bench.sd15_checkpoint [PATH]    (default var/bench/sd15-random)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "var" / "bench" / "sd15-random"

# SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, as in its published configs.
UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    skip_prk_steps=True,
)


def build(path: Path = DEFAULT_PATH, seed: int = 0) -> Path:
    """Build once; an existing checkpoint is reused."""
    if (path / "model_index.json").is_file():
        return path
    # Real module paths: `from diffusers import X` resolves to placeholders for mypy.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.ml.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / "checkpoint"
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
            # Built in place: the slow tokenizer files stay beside tokenizer.json.
            tokenizer=build_clip_tokenizer(staged / "tokenizer"),
            unet=UNet2DConditionModel(**UNET),
            scheduler=PNDMScheduler(**SCHEDULER),
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staged)
        staged.rename(path)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH))
