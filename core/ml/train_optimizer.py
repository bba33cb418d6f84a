"""The optimizer side of a DreamBooth-LoRA run: AdamW's parameter groups, gradient
accumulation and gradient clipping.

One optimizer step, as diffusers' scripts count them (a progress step, a
checkpoint boundary), is ``gradient_accumulation_steps`` batches: each batch's loss
is divided by that count before its backward pass, so the summed gradients are
those of the mean loss over the batches, as one batch of all of them would give
(``--gradient_accumulation_steps``). The global norm of the summed LoRA gradients
is then clipped to ``max_grad_norm`` (``--max_grad_norm``, 1.0) before AdamW steps;
under fp16 loss scaling the gradients are unscaled first, so the clipping sees
their true norm.

The UNet's LoRA and the text encoders' are two AdamW groups, each with its own
learning rate and weight decay (SDXL's script: ``--text_encoder_lr``,
``--adam_weight_decay_text_encoder``); with the text encoders frozen there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from core.errors import InvalidInput

if TYPE_CHECKING:
    from core.ml.train import TrainParams

log = logging.getLogger("atelier.ml.train")

UNET_COMPONENT = "unet"  # the prefix of the UNet's trainable names (see add_adapters)


def _adam_8bit() -> Callable[..., torch.optim.Optimizer] | None:
    """bitsandbytes' AdamW8bit, or None where it is not installed (the ``gpu`` extra)."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    adam: Callable[..., torch.optim.Optimizer] = bitsandbytes.optim.AdamW8bit
    return adam


def check_optimizer_params(params: TrainParams) -> None:
    if params.gradient_accumulation_steps < 1:
        raise InvalidInput("gradient_accumulation_steps must be at least 1")
    if params.max_grad_norm is not None and params.max_grad_norm <= 0:
        raise InvalidInput(f"max_grad_norm must be positive, not {params.max_grad_norm}")
    rate = params.text_encoder_learning_rate
    decays = (params.weight_decay, params.text_encoder_weight_decay)
    if (rate is not None and rate <= 0) or any(d is not None and d < 0 for d in decays):
        raise InvalidInput(f"invalid optimizer parameters: {params}")


def parameter_groups(
    trainable: list[tuple[str, torch.nn.Parameter]], params: TrainParams
) -> list[dict[str, Any]]:
    """AdamW's groups: the UNet's LoRA with ``learning_rate`` and ``weight_decay``,
    then, when the text encoders train, theirs with the text-encoder values (None
    falls back to the UNet's)."""
    unet = [p for name, p in trainable if name.split(".", 1)[0] == UNET_COMPONENT]
    text = [p for name, p in trainable if name.split(".", 1)[0] != UNET_COMPONENT]
    groups = [{"params": unet, "lr": params.learning_rate, "weight_decay": params.weight_decay}]
    if text:
        lr = params.text_encoder_learning_rate
        decay = params.text_encoder_weight_decay
        groups.append(
            {
                "params": text,
                "lr": params.learning_rate if lr is None else lr,
                "weight_decay": params.weight_decay if decay is None else decay,
            }
        )
    return groups


def make_optimizer(
    trainable: list[tuple[str, torch.nn.Parameter]], params: TrainParams, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``; bitsandbytes' 8-bit AdamW when the profile
    asks for it and it can run (installed, CUDA device)."""
    groups = parameter_groups(trainable, params)
    if params.use_8bit_adam:
        adam_8bit = _adam_8bit()
        if adam_8bit is not None and device.type == "cuda":
            log.info("training with bitsandbytes' 8-bit AdamW")
            return adam_8bit(groups)
        reason = (
            "bitsandbytes is not installed (pip install 'atelier[gpu]')"
            if adam_8bit is None
            else f"it needs a CUDA device, training runs on {device.type}"
        )
        log.warning("8-bit Adam was asked for but %s: falling back to torch.optim.AdamW", reason)
    return torch.optim.AdamW(groups)


def optimizer_step(
    batch_loss: Callable[[int], torch.Tensor],
    accumulation: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float | None,
) -> float:
    """One optimizer step over ``accumulation`` batches (``batch_loss(i)`` for i in
    0..accumulation-1); returns the mean of their losses. The gradients it stepped
    with (summed, unscaled, clipped) stay on the parameters until the next step."""
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for index in range(accumulation):
        loss = batch_loss(index)
        # A disabled scaler passes the loss and the step through unchanged.
        scaler.scale(loss / accumulation).backward()
        losses.append(float(loss.detach()))
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        # An inf or NaN norm (fp16 overflow) is left to the scaler, which skips the step.
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return sum(losses) / accumulation
