"""The DreamBooth training objective: denoising loss, prior term, Min-SNR weights."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler


def noise_target(
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


def random_timesteps(
    scheduler: DDPMScheduler, count: int, generator: torch.Generator, device: torch.device
) -> torch.IntTensor:
    """One timestep per example, uniform over the schedule the model was trained on."""
    steps = scheduler.config["num_train_timesteps"]
    drawn = torch.randint(steps, (count,), generator=generator).to(device)
    # diffusers annotates timesteps as IntTensor; any integer tensor works (this is int64).
    return cast(torch.IntTensor, drawn)


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556), one per example.

    The paper weights the x0 error by min(SNR, gamma). The noise error is SNR
    times the x0 error and the velocity error (SNR + 1) times it, so the weights
    of those losses are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
    (diffusers' scripts use min(SNR, gamma) / SNR + 1 for velocity instead.)
    Low-noise timesteps, whose easy targets would otherwise dominate the gradient,
    are damped; noisy ones keep weight 1.
    """
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1.0 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config["prediction_type"] == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    scheduler: DDPMScheduler,
    prior_weight: float | None,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Denoising loss of a batch holding the instance example first and, when
    ``prior_weight`` is not None, the class example second:
    ``instance + prior_weight * prior``, each a mean squared error over its own
    example, each Min-SNR-weighted by its own timestep when ``snr_gamma`` is set.
    (diffusers' SDXL script weights only the instance term; the weight depends on
    the example's timestep, not on whose example it is, so both get it here.)
    """
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = errors.mean(dim=tuple(range(1, errors.ndim)))
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(scheduler, t, snr_gamma)
    loss = per_example[0]
    if prior_weight is not None:
        loss = loss + prior_weight * per_example[1]
    return loss
