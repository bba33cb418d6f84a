"""An SDXL base 1.0-shaped checkpoint with seeded random weights, for benchmarks.

Same architecture as ``stabilityai/stable-diffusion-xl-base-1.0`` (so the same
FLOPs and memory at 1024 px), built from its published configs, written below as
data, and saved with ``save_pretrained`` so it loads through
``StableDiffusionXLPipeline.from_pretrained`` like the real checkpoint (profile
``sdxl``: ``ATELIER_PROFILE=sdxl ATELIER_MODEL_PATH=var/bench/sdxl-random``).
About 14 GB in fp32 and as much host RAM while it is built: a GPU host's job.

    .venv/bin/python -m bench.sdxl_checkpoint [PATH]    (default var/bench/sdxl-random)
    .venv/bin/python -m bench.sdxl_checkpoint --dry-run

``--dry-run`` builds every model on the meta device (no memory, no disk) and
prints parameter counts: UNet ~2.57 B, CLIP ViT-L ~123 M, OpenCLIP bigG ~695 M,
VAE ~84 M, and the profile's LoRA on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from bench.sd15_checkpoint import TEXT as CLIP_VIT_L
from bench.sd15_checkpoint import VAE as SD_VAE

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "var" / "bench" / "sdxl-random"
PROFILE = "sdxl"

# SDXL base 1.0's UNet (unet/config.json): three levels, no attention in the first,
# 2 and 10 transformer blocks in the others, cross-attending to both text encoders'
# hidden states (768 + 1280 = 2048), with the pooled text (1280) and six size/crop
# numbers embedded 256 wide each (6 * 256 + 1280 = 2816) added to the time embedding.
UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# SDXL's VAE (vae/config.json): SD's architecture at 1024 px, its own latent scale,
# and the flag that makes the pipeline decode in fp32 (it overflows in fp16).
VAE: dict[str, Any] = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# text_encoder: OpenAI CLIP ViT-L/14's text tower, the one SD 1.5 has.
TEXT: dict[str, Any] = dict(CLIP_VIT_L)
# text_encoder_2: OpenCLIP ViT-bigG/14's text tower, with its text projection, on
# the same vocabulary and 77 positions.
TEXT_2: dict[str, Any] = dict(
    CLIP_VIT_L,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=0,  # "!", OpenCLIP's padding
)


class Models(TypedDict):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


def _models() -> Models:
    """Every model of the pipeline, on torch's current default device."""
    # Real module paths: `from diffusers import X` resolves to placeholders for mypy.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return Models(
        unet=UNet2DConditionModel(**UNET),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)),
    )


def lora_parameters(unet: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of a rank-``rank`` LoRA on the ``targets`` linears: r * (in + out)."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in targets))
    )


def dry_run() -> dict[str, int]:
    """Build every model on the meta device and print its parameter count."""
    from core.ml.profiles import get_profile

    with torch.device("meta"):
        models = _models()
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in models.items()
        if isinstance(module, torch.nn.Module)  # all are; a TypedDict's values are `object`
    }
    profile = get_profile(PROFILE)
    lora = lora_parameters(models["unet"], profile.lora_rank, profile.lora_target_modules)
    counts[f"unet LoRA (rank {profile.lora_rank})"] = lora
    for name, count in counts.items():
        print(f"{name:<22} {count:>15,} parameters  ({count / 1e6:,.1f} M)")
    return counts


def _save(out_dir: Path, seed: int) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler

    from core.ml.tiny_sdxl import SCHEDULE
    from core.ml.tokenizer import OPENCLIP_PAD_TOKEN, build_clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        **_models(),
        # Built in place: the slow tokenizer files stay beside tokenizer.json.
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"),
        tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2", pad_token=OPENCLIP_PAD_TOKEN),
        scheduler=EulerDiscreteScheduler(**SCHEDULE),  # SDXL base's, as tiny-sdxl's
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build(path: Path = DEFAULT_PATH, seed: int = 0) -> Path:
    """Build once (atomically); an existing complete checkpoint is reused."""
    from core.ml.local_checkpoint import build_atomically
    from core.ml.tiny_sdxl import REQUIRED_FILES

    return build_atomically(path, _save, REQUIRED_FILES, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sdxl_checkpoint")
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument(
        "--dry-run", action="store_true", help="count parameters on the meta device, write nothing"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run()
    else:
        print(build(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
