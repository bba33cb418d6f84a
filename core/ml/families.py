"""What differs between model families, in one small object per family.

A profile's ``family`` ("sd1", "sdxl") picks a ``Family`` from ``FAMILIES``; a
loaded pipeline finds its own with ``family_of``. Everything else (loading,
training, LoRA export, generation) is written once against this interface:

- which pipeline class loads the checkpoint, with which options, and which files
  of its hub repository it needs;
- its text encoders and tokenizers (one for SD 1.x, two for SDXL);
- how prompts become the UNet's conditioning: SD 1.x cross-attends to CLIP's last
  hidden state; SDXL to the concatenated penultimate hidden states of both
  encoders, and also takes the second encoder's pooled embedding and the
  example's size and crop ("micro-conditioning", Podell et al. 2023,
  arXiv:2307.01952) through ``added_cond_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import PreTrainedModel

# Any pipeline a family loads; annotations use it where both families pass.
Pipeline: TypeAlias = StableDiffusionPipeline | StableDiffusionXLPipeline

MODEL_INDEX = "model_index.json"
HIDDEN_LAYER_FROM_END = 2  # SDXL cross-attends to the penultimate layer's states


@dataclass(frozen=True)
class PromptEmbeddings:
    """The UNet's text conditioning for a batch of prompts, one row per prompt."""

    hidden: torch.Tensor  # (prompts, tokens, cross_attention_dim)
    pooled: torch.Tensor | None = None  # (prompts, projection_dim); SDXL only


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning of one example, all (height, width) / (top, left) in
    pixels: the size of the image it came from, where its crop starts, its size."""
    return (*original_size, *crop_top_left, *target_size)


class Sd1Family:
    """Stable Diffusion 1.x: one CLIP text encoder, its last hidden state."""

    name: ClassVar[str] = "sd1"
    pipeline_class: ClassVar[type[Pipeline]] = StableDiffusionPipeline
    # Pipeline attributes, the i-th tokenizer feeding the i-th text encoder.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # from_pretrained options: SD 1.x checkpoints name a safety checker we never load.
    load_options: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    # What a hub repository must provide, in safetensors only: the repositories also
    # hold .bin, fp16, EMA and single-file copies (tens of GB).
    download_patterns: ClassVar[tuple[str, ...]] = (
        MODEL_INDEX,
        "scheduler/*.json",
        "tokenizer/*",
        "feature_extractor/*.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    )

    def text_encoders(self, pipe: Pipeline) -> dict[str, PreTrainedModel]:
        return {name: getattr(pipe, name) for name in self.text_encoder_names}

    def modules(self, pipe: Pipeline) -> dict[str, torch.nn.Module]:
        """Every model of the pipeline, by attribute name."""
        return {"unet": pipe.unet, "vae": pipe.vae, **self.text_encoders(pipe)}

    def tokenize(self, pipe: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """Token ids of ``prompts`` for each text encoder, padded to its length."""
        ids = []
        for tokenizer_name, encoder_name in zip(
            self.tokenizer_names, self.text_encoder_names, strict=True
        ):
            tokenizer = getattr(pipe, tokenizer_name)
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            ids.append(tokens.to(getattr(pipe, encoder_name).device))
        return tuple(ids)

    def encode(self, pipe: Pipeline, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
        return PromptEmbeddings(pipe.text_encoder(ids[0])[0])

    def unet_kwargs(
        self, unet: UNet2DConditionModel, embeddings: PromptEmbeddings, micro: torch.Tensor
    ) -> dict[str, Any]:
        """The UNet's conditioning arguments for a batch; ``micro`` holds one row of
        ``time_ids`` per example (SD 1.x has no use for them)."""
        return {"encoder_hidden_states": embeddings.hidden.to(unet.dtype)}


class SdxlFamily(Sd1Family):
    """SDXL: two CLIP text encoders, pooled text and size/crop conditioning."""

    name: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[type[Pipeline]] = StableDiffusionXLPipeline
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    # Generated images are PNG bytes users own: no invisible watermark (and none is
    # installed); diffusers would add one whenever the package is present.
    load_options: ClassVar[dict[str, Any]] = {"add_watermarker": False}
    download_patterns: ClassVar[tuple[str, ...]] = (
        MODEL_INDEX,
        "scheduler/*.json",
        "tokenizer/*",
        "tokenizer_2/*",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    )

    def encode(self, pipe: Pipeline, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
        """Both encoders' penultimate hidden states side by side, and the pooled,
        projected embedding of text_encoder_2 (a CLIPTextModelWithProjection; the
        first encoder's pooled output goes unused, as in SDXL's own pipeline)."""
        encoders = self.text_encoders(pipe).values()
        outputs = [
            encoder(tokens, output_hidden_states=True)
            for encoder, tokens in zip(encoders, ids, strict=True)
        ]
        hidden = [output.hidden_states[-HIDDEN_LAYER_FROM_END] for output in outputs]
        return PromptEmbeddings(torch.cat(hidden, dim=-1), outputs[-1].text_embeds)

    def unet_kwargs(
        self, unet: UNet2DConditionModel, embeddings: PromptEmbeddings, micro: torch.Tensor
    ) -> dict[str, Any]:
        if embeddings.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding")
        added = {
            "text_embeds": embeddings.pooled.to(unet.dtype),
            "time_ids": micro.to(unet.device, unet.dtype),
        }
        return {**super().unet_kwargs(unet, embeddings, micro), "added_cond_kwargs": added}


Family = Sd1Family  # the interface; SdxlFamily overrides what SDXL does differently
FAMILIES: dict[str, Family] = {family.name: family for family in (Sd1Family(), SdxlFamily())}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(pipe: Pipeline) -> Family:
    """The family whose pipeline class ``pipe`` is."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    raise ValueError(f"no model family loads {type(pipe).__name__}")
