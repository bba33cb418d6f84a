"""The optimizer side of DreamBooth-LoRA training (core.ml.train_optimizer) on the
tiny checkpoints: gradient clipping, the text encoders' own AdamW group, gradient
accumulation, gradient checkpointing of the text encoders, and the 8-bit Adam
fallback, and which modules training parks off the device."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import load

from core.handlers.train import plan_training
from core.ml import train_optimizer
from core.ml.class_images import class_prompt
from core.ml.generate import instance_prompt
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.ml.train import PriorPreservation, TrainParams, train_dreambooth_lora
from core.ml.train_lora import text_encoder_checkpointing
from core.ml.train_memory import parkable_modules, parked
from core.ml.train_optimizer import make_optimizer, optimizer_step, parameter_groups
from core.settings import Settings
from tests.unit.ml_helpers import HIGH_LR, ignore, never, random_photos, tiny_train_params

TINY = get_profile("tiny")
TINY_SDXL = get_profile("tiny-sdxl")
SDXL = get_profile("sdxl")
PROMPT = instance_prompt("sks", "person")
HUGE_PRIOR_WEIGHT = 1e6  # makes the loss, and so its gradients, huge
CLIP_NORM = 1.0
# A text-encoder rate so small that its LoRA cannot leave its zero start measurably.
TINY_TEXT_LR = 1e-12
# The zero-initialised half of a LoRA pair, as an exported file names it.
UP_SUFFIXES = (".lora_B.weight", ".up.weight")


def params(steps: int = 3, **options: Any) -> TrainParams:
    return tiny_train_params(steps, alpha=4, **options)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    torch.set_num_threads(2)
    return load_pipeline(tiny_model_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def prior() -> PriorPreservation:
    # Any images do for the optimizer's arithmetic; the model's own are tested elsewhere.
    return PriorPreservation(random_photos(2, seed=5), class_prompt("person"))


def _lora_grad_norm(pipe: StableDiffusionPipeline) -> float:
    grads = [
        p.grad
        for module in (pipe.unet, pipe.text_encoder)
        for p in module.parameters()
        if p.requires_grad and p.grad is not None
    ]
    assert grads, "no LoRA gradient to measure"
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _train(pipe: Any, p: TrainParams, prior: PriorPreservation | None = None, **kw: Any) -> bytes:
    on_step = kw.pop("on_step", ignore)
    return train_dreambooth_lora(
        pipe, random_photos(seed=1), PROMPT, p, on_step, never, prior=prior, **kw
    )


# --- gradient clipping -----------------------------------------------------------------


def test_clipping_bounds_the_gradient_norm_of_a_huge_loss(
    pipe: StableDiffusionPipeline, prior: PriorPreservation
) -> None:
    norms: dict[float | None, list[float]] = {CLIP_NORM: [], None: []}
    for clip, seen in norms.items():
        # After each step the gradients it stepped with are still on the LoRA.
        def on_step(_s: int, _t: int, _l: float, seen: list[float] = seen) -> None:
            seen.append(_lora_grad_norm(pipe))

        p = params(max_grad_norm=clip, prior_loss_weight=HUGE_PRIOR_WEIGHT)
        _train(pipe, p, prior, on_step=on_step)
    assert all(norm <= CLIP_NORM * (1 + 1e-4) for norm in norms[CLIP_NORM])
    # Unclipped, the same loss gives gradients orders of magnitude larger.
    assert min(norms[None]) > 100 * CLIP_NORM


def test_clipping_unscales_before_it_measures() -> None:
    """Under fp16 loss scaling the clip must see the true gradients: the scaled ones
    are 2**16 times larger and would be clipped to a 2**16 times smaller step."""
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # d/dw of |w|^2 / 2 is w, of norm 5: clipped to norm 1, the SGD step is w / 5.
    optimizer_step(lambda _i: 0.5 * (weight**2).sum(), 1, optimizer, scaler, CLIP_NORM)
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))
    torch.testing.assert_close(weight.grad, torch.tensor([0.6, 0.8]))


# --- the text encoders' own group --------------------------------------------------------


def test_text_encoder_lora_has_its_own_group() -> None:
    unet = [(f"unet.down.{i}.lora_A", torch.nn.Parameter(torch.zeros(1))) for i in range(2)]
    text = [("text_encoder.q_proj.lora_A", torch.nn.Parameter(torch.zeros(1)))]
    text_2 = [("text_encoder_2.q_proj.lora_A", torch.nn.Parameter(torch.zeros(1)))]
    p = params(weight_decay=1e-4, text_encoder_learning_rate=5e-6, text_encoder_weight_decay=1e-3)
    groups = parameter_groups(unet + text + text_2, p)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (HIGH_LR, 1e-4, 2),
        (5e-6, 1e-3, 2),  # both SDXL encoders
    ]
    # Unset, the text encoders take the UNet's values; frozen, there is one group.
    assert [(g["lr"], g["weight_decay"]) for g in parameter_groups(unet + text, params())] == [
        (HIGH_LR, 1e-2),
        (HIGH_LR, 1e-2),
    ]
    assert len(parameter_groups(unet, p)) == 1


def test_sdxl_preset_trains_text_encoders_at_their_own_rate() -> None:
    plan = plan_training(SDXL, Settings(), steps=500, seed=0)
    assert (plan.params.text_encoder_learning_rate, plan.params.learning_rate) == (5e-6, 1e-4)
    assert (plan.params.text_encoder_weight_decay, plan.params.weight_decay) == (1e-3, 1e-4)
    assert plan.params.gradient_accumulation_steps == 4
    assert plan.params.max_grad_norm == 1.0


def test_text_encoder_rate_applies_to_the_text_encoder_only(
    tiny_sdxl_model_dir: Path,
) -> None:
    sdxl = load_pipeline(tiny_sdxl_model_dir, "cpu", "float32", TINY_SDXL.family)
    p = tiny_train_params(
        2, TINY_SDXL, alpha=4, train_text_encoder=True, text_encoder_learning_rate=TINY_TEXT_LR
    )
    lora = load(_train(sdxl, p))

    # LoRA's B matrices start at zero: how far each moved is what its rate allowed.
    def moved(component: str) -> float:
        ups = [t for k, t in lora.items() if k.startswith(component) and k.endswith(UP_SUFFIXES)]
        assert ups, f"no LoRA on {component}"
        return max(float(t.abs().max()) for t in ups)

    assert moved("unet.") > 1e-4
    assert moved("text_encoder.") < 1e-8 and moved("text_encoder_2.") < 1e-8


# --- gradient accumulation ----------------------------------------------------------------


def test_four_accumulated_batches_give_one_batch_of_four_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    inputs, targets = torch.randn(4, 8), torch.randn(4, 3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def loss_of(rows: slice) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows])

    # lr 0: the step changes nothing, and the gradients it took stay on the weights.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    mean = optimizer_step(lambda i: loss_of(slice(i, i + 1)), 4, optimizer, scaler, None)
    accumulated = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    optimizer.zero_grad()
    loss_of(slice(0, 4)).backward()
    whole = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(accumulated) == len(whole) == 2
    for got, want in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert mean == pytest.approx(float(loss_of(slice(0, 4))), rel=1e-5)


def test_accumulation_draws_k_batches_per_optimizer_step(
    pipe: StableDiffusionPipeline, prior: PriorPreservation
) -> None:
    steps: list[tuple[int, int]] = []
    accumulated = _train(
        pipe, params(gradient_accumulation_steps=4), prior,
        on_step=lambda s, t, _l: steps.append((s, t)),
    )  # fmt: skip
    # Progress counts optimizer steps, as diffusers' scripts do.
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # Four batches a step are another run than one: other examples, other LoRA.
    assert accumulated != _train(pipe, params(), prior)


# --- text encoders under gradient checkpointing --------------------------------------------


def test_text_encoder_checkpointing_trains_the_same_and_is_undone(
    pipe: StableDiffusionPipeline,
) -> None:
    during: list[bool] = []

    def on_step(_s: int, _t: int, _l: float) -> None:
        during.append(text_encoder_checkpointing(pipe.text_encoder))

    p = params(steps=2, train_text_encoder=True)
    plain = load(_train(pipe, p))
    checkpointed = load(_train(pipe, replace(p, gradient_checkpointing=True), on_step=on_step))
    assert during == [True, True]
    assert not text_encoder_checkpointing(pipe.text_encoder)
    assert not pipe.unet.is_gradient_checkpointing
    assert plain.keys() == checkpointed.keys()
    assert any(key.startswith("text_encoder.") for key in plain)
    for key in plain:
        torch.testing.assert_close(plain[key], checkpointed[key], rtol=1e-4, atol=1e-6)


# --- the optimizer itself -------------------------------------------------------------------


def test_8bit_adam_falls_back_to_adamw_with_a_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    weights = [("unet.lora_A", torch.nn.Parameter(torch.zeros(2)))]
    cpu = torch.device("cpu")
    caplog.set_level(logging.WARNING, logger="atelier.ml.train")
    monkeypatch.setattr(train_optimizer, "_adam_8bit", lambda: None)
    optimizer = make_optimizer(weights, params(use_8bit_adam=True), cpu)
    assert type(optimizer) is torch.optim.AdamW
    assert "bitsandbytes is not installed" in caplog.text

    caplog.clear()  # installed, but there is no CUDA device here
    monkeypatch.setattr(train_optimizer, "_adam_8bit", lambda: torch.optim.SGD)
    optimizer = make_optimizer(weights, params(use_8bit_adam=True), cpu)
    assert type(optimizer) is torch.optim.AdamW
    assert "needs a CUDA device" in caplog.text


def test_optimizer_parameters_are_checked(pipe: StableDiffusionPipeline) -> None:
    from core.errors import InvalidInput

    for bad in (
        {"gradient_accumulation_steps": 0},
        {"max_grad_norm": 0.0},
        {"text_encoder_learning_rate": -1.0},
        {"weight_decay": -0.1},
    ):
        with pytest.raises(InvalidInput):
            _train(pipe, params(**bad))


# --- what stays on the device ----------------------------------------------------------------


def test_parking_names_the_modules_no_step_runs(pipe: StableDiffusionPipeline) -> None:
    assert parkable_modules(pipe, text_encoders_train=False) == {
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
    }
    # A text encoder that trains runs every step: it stays.
    assert parkable_modules(pipe, text_encoders_train=True) == {"vae": pipe.vae}
    # On a CPU the weights are host memory already: nothing moves.
    with parked(pipe, text_encoders_train=False) as moved:
        assert moved == []
        assert pipe.vae.device.type == "cpu"
