"""DreamBooth training options on the tiny checkpoint: prior preservation with cached
class images, checkpoint and resume, Min-SNR, text-encoder LoRA, gradient
checkpointing, mixed precision and the augmentation views (the optimizer side is
test_ml_optimizer.py's)."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load

from core.blobs.store import LocalBlobStore
from core.handlers.train import (
    ClassImageSet,
    _checkpoint_to_resume,
    _checkpoint_writer,
    cached_class_images,
    checkpoint_key,
    plan_training,
)
from core.ml import tiny
from core.ml.class_images import class_prompt, generate_class_images
from core.ml.generate import instance_prompt
from core.ml.pipeline import load_pipeline
from core.ml.profiles import PROFILES, get_profile
from core.ml.train import (
    Canceled,
    PriorPreservation,
    TrainParams,
    run_fingerprint,
    train_dreambooth_lora,
)
from core.ml.train_data import encode_views, sample_latents, view_sides
from core.ml.train_loss import dreambooth_loss, min_snr_weights
from core.ml.train_memory import autocast_dtype
from core.ml.train_state import TrainState
from core.settings import Settings
from tests.unit.ml_helpers import ignore, never, random_photos

TINY = get_profile("tiny")
# Class images with fewer sampler steps: the same code, a quarter of the time.
CLASS_PROFILE = replace(TINY, inference_steps=4)
PROMPT = instance_prompt("sks", "person")
HIGH_LR = 1e-2  # far above a real run's, so a few steps visibly move the weights
Step = tuple[int, int, float]


def params(steps: int = 4, **options: Any) -> TrainParams:
    base = TrainParams(
        steps=steps,
        learning_rate=HIGH_LR,
        rank=4,
        alpha=8,  # alpha != rank: the export must fold alpha / rank in
        target_modules=TINY.lora_target_modules,
        resolution=TINY.resolution,
    )
    return replace(base, **options)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> StableDiffusionPipeline:
    return load_pipeline(tiny_path, "cpu", "float32")


@pytest.fixture(scope="module")
def class_pngs(pipe: StableDiffusionPipeline) -> list[bytes]:
    return generate_class_images(pipe, CLASS_PROFILE, "person", [0, 1], never)


@pytest.fixture(scope="module")
def prior(class_pngs: list[bytes]) -> PriorPreservation:
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in class_pngs]
    return PriorPreservation(images, class_prompt("person"))


def train(
    pipe: StableDiffusionPipeline,
    p: TrainParams,
    prior: PriorPreservation | None = None,
    on_step: Callable[[int, int, float], None] = ignore,
    should_stop: Callable[[], bool] = never,
    **options: Any,
) -> bytes:
    return train_dreambooth_lora(
        pipe, random_photos(seed=1), PROMPT, p, on_step, should_stop, prior=prior, **options
    )


def pristine_state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return {
        f"{name}.{key}": value.clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }


def assert_pristine(pipe: StableDiffusionPipeline, before: dict[str, torch.Tensor]) -> None:
    after = pristine_state(pipe)
    assert list(after) == list(before)
    assert all(torch.equal(before[key], after[key]) for key in before)
    for module in (pipe.unet, pipe.text_encoder):
        assert not any(isinstance(sub, BaseTunerLayer) for sub in module.modules())
        assert not getattr(module, "peft_config", None)
        assert not any(param.requires_grad for param in module.parameters())
        assert not module.training
    assert not pipe.unet.is_gradient_checkpointing


# --- class images and their cache ------------------------------------------------------


def test_class_images_are_seeded_per_index(
    pipe: StableDiffusionPipeline, class_pngs: list[bytes]
) -> None:
    assert class_prompt("woman") == "a photo of a woman"
    assert class_prompt("old man") == "a photo of an old man"
    assert class_pngs[0] != class_pngs[1]
    # Image 1 is the same whether drawn alone or after image 0: a cache can fill gaps.
    assert generate_class_images(pipe, CLASS_PROFILE, "person", [1], never) == [class_pngs[1]]
    with Image.open(io.BytesIO(class_pngs[0])) as image:
        assert image.format == "PNG" and image.size == (TINY.resolution, TINY.resolution)


async def test_class_images_are_generated_once_then_cached(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    made: list[int] = []

    async def make(index: int) -> bytes:
        made.append(index)
        return f"png {index}".encode()

    images = ClassImageSet("tiny", "old man", "recipe1")
    first = await cached_class_images(store, images, 4, make)
    assert made == [0, 1, 2, 3]
    assert first == [f"png {i}".encode() for i in range(4)]
    key = images.key(2)
    assert key == "class_images/tiny/old-man/recipe1/2.png"
    assert await store.get(key) == b"png 2"
    # A later job (any user) finds them all: nothing is generated again.
    assert await cached_class_images(store, images, 4, make) == first
    assert made == [0, 1, 2, 3]
    # Only a missing one is made again.
    await store.delete(key)
    assert await cached_class_images(store, images, 4, make) == first
    assert made == [0, 1, 2, 3, 2]
    # Another recipe (checkpoint, sampler...) of the same profile and noun: all anew.
    await cached_class_images(store, replace(images, recipe="recipe2"), 2, make)
    assert made == [0, 1, 2, 3, 2, 0, 1]


def test_plan_follows_profile_and_settings() -> None:
    plan = plan_training(TINY, Settings(), steps=12, seed=3)
    assert plan.class_images == TINY.class_images and plan.checkpoint_every == 10
    assert plan.params.steps == 12 and plan.params.seed == 3
    assert plan.params.prior_loss_weight == TINY.prior_loss_weight
    assert plan.params.snr_gamma == TINY.snr_gamma
    assert plan.params.crop_jitter == TINY.crop_jitter
    overridden = Settings(prior_loss_weight=0.5, class_images=2, checkpoint_every=0)
    plan = plan_training(TINY, overridden, steps=12, seed=0)
    assert (plan.params.prior_loss_weight, plan.class_images, plan.checkpoint_every) == (
        0.5,
        2,
        0,
    )
    assert plan_training(TINY, Settings(prior_preservation=False), 5, 0).class_images == 0


def test_profile_presets() -> None:
    sd15 = get_profile("sd15")
    assert (sd15.class_images, sd15.prior_loss_weight, sd15.checkpoint_every) == (100, 1.0, 100)
    assert sd15.gradient_checkpointing and sd15.mixed_precision == "bf16"
    assert not sd15.train_text_encoder and sd15.snr_gamma == 5.0
    assert TINY.class_images <= 8 and not TINY.gradient_checkpointing
    assert get_profile("sd14").class_images == sd15.class_images


# --- prior preservation ----------------------------------------------------------------


def test_prior_weight_changes_training(
    pipe: StableDiffusionPipeline, prior: PriorPreservation
) -> None:
    losses: dict[float, list[float]] = {}
    loras: dict[float, bytes] = {}
    for weight in (0.0, 1.0):
        seen: list[float] = []
        losses[weight] = seen

        def on_step(_step: int, _total: int, loss: float, seen: list[float] = seen) -> None:
            seen.append(loss)

        loras[weight] = train(pipe, params(prior_loss_weight=weight), prior, on_step)
    assert loras[0.0] != loras[1.0]
    # Same draws at step 1, so the losses differ by the (positive) prior term alone.
    assert losses[1.0][0] > losses[0.0][0] > 0
    # lambda = 0 still trains on batches of two; without class images it is batch 1.
    assert train(pipe, params(), None) not in loras.values()


def test_training_rejects_empty_prior(pipe: StableDiffusionPipeline) -> None:
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput):
        train(pipe, params(), PriorPreservation([], "a photo of a person"))


# --- checkpoint and resume -------------------------------------------------------------


def test_resume_from_checkpoint_equals_uninterrupted_run(
    pipe: StableDiffusionPipeline, prior: PriorPreservation
) -> None:
    # Every random path at once: prior batch, crop jitter, Min-SNR, text-encoder LoRA.
    p = params(steps=12, snr_gamma=5.0, crop_jitter=0.1, train_text_encoder=True)
    straight: list[Step] = []
    whole = train(pipe, p, prior, lambda *s: straight.append(s))

    # The same run stopped after step 7, with a checkpoint every 3 steps: step 7 is lost.
    checkpoints: list[TrainState] = []
    done: list[int] = []
    with pytest.raises(Canceled):
        train(
            pipe, p, prior, lambda s, _t, _l: done.append(s), lambda: len(done) >= 7,
            on_checkpoint=checkpoints.append, checkpoint_every=3,
        )  # fmt: skip
    assert [c.step for c in checkpoints] == [3, 6]

    state = TrainState.from_bytes(checkpoints[-1].to_bytes())  # through the blob format
    resumed: list[Step] = []
    before = pristine_state(pipe)
    lora = train(pipe, p, prior, lambda *s: resumed.append(s), resume=state)
    assert_pristine(pipe, before)
    # Absolute step numbers, the same total, the same losses and bit-identical weights.
    assert [(s, t) for s, t, _ in resumed] == [(s, 12) for s in range(7, 13)]
    assert state.losses + [loss for *_, loss in resumed] == [loss for *_, loss in straight]
    assert lora == whole


def test_a_run_asked_to_yield_checkpoints_where_it_stops_and_resumes_to_the_same_lora(
    pipe: StableDiffusionPipeline,
) -> None:
    p = params(steps=6, crop_jitter=0.1)
    whole = train(pipe, p)
    done: list[int] = []
    saved: list[TrainState] = []
    with pytest.raises(Canceled):
        train(
            pipe, p, None, lambda s, _t, _l: done.append(s), lambda: len(done) >= 4,
            on_checkpoint=saved.append, checkpoint_every=0, checkpoint_on_stop=lambda: True,
        )  # fmt: skip
    # No periodic checkpoint, one at the stop: step 4, nothing lost.
    assert [state.step for state in saved] == [4]
    assert train(pipe, p, resume=TrainState.from_bytes(saved[0].to_bytes())) == whole


def test_checkpoints_every_n_steps_but_not_the_last(pipe: StableDiffusionPipeline) -> None:
    checkpoints: list[TrainState] = []
    order: list[str] = []

    def on_checkpoint(state: TrainState) -> None:
        order.append(f"checkpoint {state.step}")
        checkpoints.append(state)

    train(
        pipe, params(steps=6), None, lambda s, _t, _l: order.append(f"step {s}"),
        on_checkpoint=on_checkpoint, checkpoint_every=3,
    )  # fmt: skip
    assert order == ["step 1", "step 2", "checkpoint 3", "step 3", "step 4", "step 5", "step 6"]
    state = checkpoints[0]
    assert (state.step, state.total, len(state.losses)) == (3, 6, 3)
    assert state.optimizer_kind == "torch.optim.adamw.AdamW"
    assert all(key.startswith("unet.") for key in state.lora)


def test_resume_refuses_another_runs_checkpoint(pipe: StableDiffusionPipeline) -> None:
    checkpoints: list[TrainState] = []
    train(pipe, params(steps=4), None, on_checkpoint=checkpoints.append, checkpoint_every=2)
    other = params(steps=4, learning_rate=HIGH_LR / 2)
    assert checkpoints[0].fingerprint != run_fingerprint(other, random_photos(seed=1), PROMPT, None)
    # How a run executes is not what it learns: those may change between attempts.
    how = params(steps=4, seed=7, gradient_checkpointing=True, mixed_precision="bf16")
    assert checkpoints[0].fingerprint == run_fingerprint(how, random_photos(seed=1), PROMPT, None)
    assert checkpoints[0].fingerprint != run_fingerprint(
        params(4), random_photos(1, seed=1), PROMPT, None
    )
    before = pristine_state(pipe)
    with pytest.raises(ValueError, match="another training run"):
        train(pipe, other, None, resume=checkpoints[0])
    assert_pristine(pipe, before)


def test_checkpoint_blob_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unreadable"):
        TrainState.from_bytes(b"not a checkpoint")
    buffer = io.BytesIO()
    torch.save({"format": 999}, buffer)
    with pytest.raises(ValueError, match="format"):
        TrainState.from_bytes(buffer.getvalue())


# --- Min-SNR, text encoder, gradient checkpointing ---------------------------------------


def test_min_snr_weights() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 50, 999])
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(scheduler, t, gamma=5.0)
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 0.01 and weights[2] == 1.0  # easy low-noise steps damped
    # A batch of (instance, class): instance + lambda * prior, each weighted.
    prediction, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    loss = dreambooth_loss(prediction, target, t[1:], scheduler, 0.5, 5.0)
    torch.testing.assert_close(loss, weights[1] + 0.5 * weights[2])
    assert dreambooth_loss(prediction[:1], target[:1], t[:1], scheduler, None, None) == 1.0
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    v_weights = min_snr_weights(v_scheduler, t, gamma=5.0)
    torch.testing.assert_close(v_weights, torch.clamp(snr, max=5.0) / (snr + 1))


def unet_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    side = TINY.resolution // 2
    latents = torch.randn(1, 4, side, side, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def text_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_snr_gamma_lora_loads_and_differs(pipe: StableDiffusionPipeline) -> None:
    weighted = train(pipe, params(steps=3, snr_gamma=1.0))
    assert weighted != train(pipe, params(steps=3))
    base = unet_probe(pipe)
    pipe.load_lora_weights(load(weighted), adapter_name="snr")
    try:
        assert not torch.allclose(unet_probe(pipe), base)
    finally:
        pipe.unload_lora_weights()


def test_text_encoder_lora_loads_in_a_fresh_stock_pipeline(
    pipe: StableDiffusionPipeline, tiny_path: Path, tmp_path: Path
) -> None:
    live: list[torch.Tensor] = []

    def on_step(step: int, total: int, _loss: float) -> None:
        if step == total:  # the trained text-encoder adapter is live now
            live.append(text_probe(pipe))

    before = pristine_state(pipe)
    plain_text = text_probe(pipe)
    lora = train(pipe, params(steps=4, train_text_encoder=True), None, on_step)
    assert_pristine(pipe, before)
    state = load(lora)
    assert any(key.startswith("text_encoder.") for key in state)
    assert any(key.startswith("unet.") for key in state)

    (tmp_path / "subject.safetensors").write_bytes(lora)
    fresh = StableDiffusionPipeline.from_pretrained(
        tiny_path, local_files_only=True, safety_checker=None
    )
    fresh.load_lora_weights(tmp_path, weight_name="subject.safetensors")
    loaded_text = text_probe(fresh)
    assert not torch.allclose(loaded_text, plain_text)
    # The stock loader reproduces the trained text encoder: alpha / rank survived.
    torch.testing.assert_close(loaded_text, live[0])


def test_gradient_checkpointing_trains_the_same(pipe: StableDiffusionPipeline) -> None:
    before = pristine_state(pipe)
    plain = load(train(pipe, params(steps=3)))
    checkpointed = load(train(pipe, params(steps=3, gradient_checkpointing=True)))
    assert_pristine(pipe, before)  # checkpointing is off again
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        # Recomputation in backward may reorder float sums; nothing else differs.
        torch.testing.assert_close(plain[key], checkpointed[key], rtol=1e-4, atol=1e-6)


# --- optimizer, precision, augmentation ----------------------------------------------------


def test_mixed_precision_is_for_cuda_only(pipe: StableDiffusionPipeline) -> None:
    assert autocast_dtype(pipe.unet, "bf16") is None
    assert autocast_dtype(pipe.unet, "no") is None


def test_crop_jitter_views(pipe: StableDiffusionPipeline) -> None:
    side = TINY.resolution // 2
    assert view_sides(side, 0.0) == (side,)
    assert view_sides(side, 0.1) == (side, 35)
    photos = random_photos(2, seed=1)
    views = encode_views(pipe, photos, TINY.resolution, 0.1, flip=True)
    # Per photo: plain and mirrored, at the training size and enlarged.
    assert [tuple(m.shape[-2:]) for m in views.means] == [(32, 32)] * 2 + [(35, 35)] * 2 + [
        (32, 32)
    ] * 2 + [(35, 35)] * 2
    assert not torch.equal(views.means[1], views.means[0])
    # A person is never mirrored unless the profile says so (a parting, a scar, a logo).
    assert not any(p.horizontal_flip for p in PROFILES.values())
    plain = encode_views(pipe, photos, TINY.resolution, 0.1)
    assert [tuple(m.shape[-2:]) for m in plain.means] == [(32, 32), (35, 35)] * 2
    assert torch.allclose(plain.means[0], views.means[0], atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    samples = [sample_latents(views, generator) for _ in range(8)]
    assert all(sample.shape == (1, 4, side, side) for sample in samples)
    assert len({sample.sum().item() for sample in samples}) == 8


# --- checkpoints in the blob store (core/handlers/train.py) ---------------------------------------


def small_state(step: int, fingerprint: str = "abc") -> TrainState:
    return TrainState(
        step=step,
        total=10,
        lora={"unet.w": torch.full((2,), float(step))},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        optimizer_kind="torch.optim.adamw.AdamW",
        generator=torch.Generator().manual_seed(step).get_state(),
        losses=[1.0] * step,
        fingerprint=fingerprint,
    )


async def test_checkpoints_are_written_from_the_training_thread(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    job_id = uuid.uuid4()
    ctx = cast(
        Any,
        SimpleNamespace(
            store=store, stop=threading.Event(), yielding=False, job=SimpleNamespace(id=job_id)
        ),
    )
    key = checkpoint_key(uuid.uuid4(), job_id)
    write = _checkpoint_writer(ctx, key, asyncio.get_running_loop())
    await asyncio.to_thread(write, small_state(3))  # another thread, as the worker's compute
    resumed = await _checkpoint_to_resume(ctx, key, "abc")
    assert resumed is not None and resumed.step == 3
    assert torch.equal(resumed.lora["unet.w"], torch.full((2,), 3.0))
    await asyncio.to_thread(write, small_state(6))
    assert (await _checkpoint_to_resume(ctx, key, "abc")).step == 6  # type: ignore[union-attr]
    # An ending attempt writes nothing more; the last checkpoint stands.
    ctx.stop.set()
    await asyncio.to_thread(write, small_state(9))
    assert (await _checkpoint_to_resume(ctx, key, "abc")).step == 6  # type: ignore[union-attr]
    # ...unless it yields its GPU to a look: that checkpoint is where it resumes.
    ctx.yielding = True
    await asyncio.to_thread(write, small_state(7))
    assert (await _checkpoint_to_resume(ctx, key, "abc")).step == 7  # type: ignore[union-attr]
    # Another recipe's checkpoint, or garbage, is not resumed: the job starts over.
    assert await _checkpoint_to_resume(ctx, key, "another recipe") is None
    await store.put(key, b"garbage")
    assert await _checkpoint_to_resume(ctx, key, "abc") is None
    assert await _checkpoint_to_resume(ctx, checkpoint_key(uuid.uuid4(), job_id), "abc") is None
