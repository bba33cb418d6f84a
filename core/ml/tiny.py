"""Build the "tiny" checkpoint: a real SD 1.x pipeline with small random weights.

Every component is the genuine class the big models use (UNet2DConditionModel
with cross-attention, AutoencoderKL, CLIPTextModel, the CLIP tokenizer), only
narrow and seeded, so training, LoRA export and generation run the same code
paths as SD 1.5 in seconds on a CPU. Its images are noise; that is the point.

Run ``python -m core.ml.tiny [PATH]`` to build it (default: <models_dir>/tiny).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from core.ml.profiles import get_profile
from core.ml.tokenizer import build_clip_tokenizer

PROFILE_NAME = "tiny"
CHECKPOINT_DIR_MODE = 0o755

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
    return all((path / name).is_file() for name in REQUIRED_FILES)


def _unet(latent_side: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
    )


def _vae(image_side: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(CHANNELS),
        latent_channels=LATENT_CHANNELS,
        sample_size=image_side,
    )


def _text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_POSITIONS,
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_MLP_WIDTH,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )
    return CLIPTextModel(config)


def _save_pipeline(out_dir: Path, seed: int) -> None:
    resolution = get_profile(PROFILE_NAME).resolution
    # The VAE halves the side once per block after the first.
    latent_side = resolution // 2 ** (len(CHANNELS) - 1)
    # Seed the global RNG (module init uses it) without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = _unet(latent_side), _vae(resolution), _text_encoder()
    pipe = StableDiffusionPipeline(
        vae=vae,
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
    """Build the tiny checkpoint at ``path`` unless a complete one is there.

    The build goes to a sibling temporary directory renamed into place at the
    end, so an interrupted build never leaves a half checkpoint at ``path``.
    """
    if is_complete_checkpoint(path):
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but is not a complete checkpoint; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    # mkdtemp makes it private (0700); the checkpoint is meant to be shared read-only.
    staging.chmod(CHECKPOINT_DIR_MODE)
    try:
        _save_pipeline(staging, seed)
        if path.exists():
            path.rmdir()  # empty, checked above
        staging.rename(path)
    except OSError:
        # Another process may have finished the same build first: accept its result.
        if not is_complete_checkpoint(path):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m core.ml.tiny [PATH]", file=sys.stderr)
        return 2
    if args:
        path = Path(args[0])
    else:
        from core.settings import Settings

        path = Settings().models_dir / PROFILE_NAME
    if is_complete_checkpoint(path):
        print(f"tiny checkpoint already complete at {path}; nothing to do")
        return 0
    started = time.monotonic()
    build_tiny_checkpoint(path)
    print(f"built tiny checkpoint at {path} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
