"""The LoRA adapters of a training run: added to the shared pipeline, exported in
the file format stock diffusers loads, and removed again without a trace."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from core.ml.families import family_of
from core.ml.lora_weights import with_text_model_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from core.ml.families import Pipeline
    from core.ml.train import TrainParams

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# LoRA init as diffusers' DreamBooth script: A gaussian, B zero (adapter starts as identity).
LORA_INIT: Literal["gaussian"] = "gaussian"


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


# Non-reentrant checkpointing: it needs no input that requires grad (the frozen
# token embeddings give none), and it is transformers 5's default, not 4's.
CHECKPOINT_OPTIONS = {"use_reentrant": False}


def enable_text_encoder_checkpointing(encoder: PreTrainedModel) -> None:
    """Recompute the text encoder's layer activations in backward, as the UNet's.
    transformers also hooks the token embeddings to require grad (for peft);
    ``restored`` removes the hook again."""
    # transformers 5 renamed gradient_checkpointing_enable (still there, deprecated).
    enable = getattr(encoder, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=CHECKPOINT_OPTIONS)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_OPTIONS)


def text_encoder_checkpointing(encoder: PreTrainedModel) -> bool:
    active = getattr(type(encoder), "is_activation_checkpointing", None)
    return bool(
        encoder.is_activation_checkpointing if active else encoder.is_gradient_checkpointing
    )


def _disable_text_encoder_checkpointing(encoder: PreTrainedModel) -> None:
    disable = getattr(encoder, "activation_checkpointing_disable", None)
    if disable is not None:
        disable()
    else:
        encoder.gradient_checkpointing_disable()
    # Only undone by transformers for models peft-loaded its own way; ours are not.
    encoder.disable_input_require_grads()


@contextmanager
def restored(pipe: Pipeline) -> Iterator[None]:
    """Undo everything training does to the pipeline, even on error or cancel."""
    family = family_of(pipe)
    modules = family.modules(pipe)
    saved = {name: _ModuleState.of(module) for name, module in modules.items()}
    checkpointing = pipe.unet.is_gradient_checkpointing
    encoders = family.text_encoders(pipe)
    encoders_checkpointing = {
        name: text_encoder_checkpointing(encoder) for name, encoder in encoders.items()
    }
    peft_flags = {
        name: getattr(encoder, "_hf_peft_config_loaded", False)
        for name, encoder in encoders.items()
    }
    try:
        yield
    finally:
        if pipe.unet.is_gradient_checkpointing and not checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for name, encoder in encoders.items():
            if text_encoder_checkpointing(encoder) and not encoders_checkpointing[name]:
                _disable_text_encoder_checkpointing(encoder)
        # Removes the peft wrappers themselves, not only the adapter weights, so the
        # modules and state-dict keys are the original ones again (text encoders too).
        pipe.unload_lora_weights()
        for name, encoder in encoders.items():
            encoder._hf_peft_config_loaded = peft_flags[name]
        for name, module in modules.items():
            saved[name].restore(module)


def add_adapters(
    pipe: Pipeline, params: TrainParams, adapter: str
) -> list[tuple[str, torch.nn.Parameter]]:
    """Add the LoRA adapters; return the trainable parameters, named by component
    ("unet", and "text_encoder", "text_encoder_2" when they train)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets: dict[str, tuple[Any, tuple[str, ...]]] = {"unet": (pipe.unet, params.target_modules)}
    if params.train_text_encoder:
        for name, encoder in family_of(pipe).text_encoders(pipe).items():
            targets[name] = (encoder, params.text_encoder_target_modules)
    device = pipe.unet.device
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    # peft initialises the new weights from torch's global RNG: seed it locally.
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(params.seed)
        for module, modules in targets.values():
            config = LoraConfig(
                r=params.rank,
                lora_alpha=params.alpha,
                init_lora_weights=LORA_INIT,
                target_modules=list(modules),
            )
            if module is pipe.unet:
                module.add_adapter(config, adapter_name=adapter)
            else:
                # peft directly: transformers' add_adapter wants a newer peft than
                # diffusers supports; diffusers' own loader injects the same way.
                inject_adapter_in_model(config, module, adapter_name=adapter)
    # Named without the adapter's run-unique name, so another run's snapshot matches.
    trainable = [
        (f"{component}.{name}".replace(f".{adapter}.", "."), param)
        for component, (module, _) in targets.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    ]
    for _, param in trainable:
        # Optimizer state and updates in fp32 even when the base model is half precision.
        param.data = param.data.float()
    return trainable


def _lora_layers(module: torch.nn.Module, adapter: str, scale: float) -> dict[str, Any]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=adapter)
    folded = {
        key: (value * scale if ".lora_B." in key else value)
        .detach()
        .to("cpu", torch.float32)
        .contiguous()
        for key, value in state.items()
    }
    return dict(convert_state_dict_to_diffusers(folded))


def export_lora(pipe: Pipeline, adapter: str, params: TrainParams) -> bytes:
    """The adapters as one diffusers LoRA safetensors file (keys "unet." and, when
    the text encoders trained, "text_encoder.text_model." and for SDXL
    "text_encoder_2.text_model."), alpha folded into lora_B.

    Diffusers' file format has no alpha unless a metadata header carries it, and a
    state dict loaded from bytes loses that header; a loader then assumes
    alpha == rank. Scaling lora_B by alpha / rank makes any loader apply it right.
    """
    scale = params.alpha / params.rank
    layers: dict[str, Any] = {"unet_lora_layers": _lora_layers(pipe.unet, adapter, scale)}
    if params.train_text_encoder:
        # save_lora_weights takes "<component>_lora_layers" for each of its components.
        for name, encoder in family_of(pipe).text_encoders(pipe).items():
            encoder_layers = _lora_layers(encoder, adapter, scale)
            layers[f"{name}_lora_layers"] = with_text_model_prefix(encoder_layers, encoder)
    with tempfile.TemporaryDirectory(prefix="atelier-lora-") as folder:
        # The pipeline class's own writer: the file layout its load_lora_weights reads.
        type(pipe).save_lora_weights(folder, weight_name=LORA_WEIGHT_NAME, **layers)
        return (Path(folder) / LORA_WEIGHT_NAME).read_bytes()
