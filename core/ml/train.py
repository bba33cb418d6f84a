"""DreamBooth-LoRA training on a resident pipeline.

The base weights stay frozen; a peft LoRA adapter is added to the UNet's attention
projections (and, optionally, the CLIP text encoders'), trained with the denoising
loss on the subject's photos paired with the instance prompt, plus DreamBooth's
prior-preservation term on class images paired with the class prompt, exported in
the format stock diffusers loads, and removed. The pipeline is shared with
generation, so it is left exactly as it was found. What SD 1.x and SDXL do
differently (prompt encoding, the UNet's conditioning) is the pipeline's
``Family`` (``core.ml.families``); this module is written once for both.

A step is one optimizer step: ``gradient_accumulation_steps`` batches, each one
photo (and one class image with prior preservation), clipped and applied as
``core.ml.train_optimizer`` has it. ``steps`` is the budget of one subject: one run
may learn several subjects, each bound to its own token, and takes ``steps``
optimizer steps for each (``train_subjects``; ``core.ml.train_subjects`` has how
their examples are drawn). A run can hand out resumable snapshots
(``on_checkpoint`` every ``checkpoint_every`` steps, always between optimizer
steps) and be resumed from one (``resume``): see ``core.ml.train_state``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from PIL import Image

from core import errors
from core.errors import InvalidInput
from core.ml.families import Family, PromptEmbeddings, family_of
from core.ml.pipeline import exclusive
from core.ml.profiles import CLIP_ATTENTION_MODULES, MixedPrecision
from core.ml.train_data import randn
from core.ml.train_lora import (
    add_adapters,
    enable_text_encoder_checkpointing,
    export_lora,
    restored,
)
from core.ml.train_loss import dreambooth_loss, noise_target, random_timesteps
from core.ml.train_memory import autocast, autocast_dtype, parked
from core.ml.train_optimizer import check_optimizer_params, make_optimizer, optimizer_step
from core.ml.train_state import TrainState, cpu_copy, optimizer_kind
from core.ml.train_subjects import (
    InstanceSet,
    PriorPreservation,
    SubjectViews,
    check_subjects,
    encode_subjects,
    prompts,
    select_rows,
    subjects_fingerprint,
)

if TYPE_CHECKING:
    from core.ml.families import Pipeline
    from core.ml.profiles import Profile

log = logging.getLogger("atelier.ml.train")

# TrainParams fields that change how a run executes, not what it learns: a checkpoint
# resumes across them. The seed only starts a run (a resumed one takes its random
# state and weights from the checkpoint); an optimizer of another kind starts its
# moments afresh (see _resume).
HOW_NOT_WHAT = frozenset({"seed", "gradient_checkpointing", "mixed_precision", "use_8bit_adam"})


class Canceled(errors.Canceled):
    """The job asked to stop (``should_stop()`` returned True); nothing is returned."""


# The worker catches this name for training; generation raises the same class.
TrainingCanceled = Canceled


@dataclass(frozen=True)
class TrainParams:
    # Optimizer steps per subject: a run of N subjects takes N times as many
    # (``total_steps``), so each gets what a run of its own would.
    steps: int
    learning_rate: float
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    resolution: int
    seed: int = 0
    prior_loss_weight: float = 1.0  # lambda of the prior term, when class images are given
    snr_gamma: float | None = None  # Min-SNR weighting; None = plain MSE
    train_text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = CLIP_ATTENTION_MODULES
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "no"  # autocast dtype on CUDA
    use_8bit_adam: bool = False
    crop_jitter: float = 0.0
    horizontal_flip: bool = False
    max_grad_norm: float | None = None  # None = no clipping
    gradient_accumulation_steps: int = 1
    weight_decay: float = 1e-2
    text_encoder_learning_rate: float | None = None  # None = learning_rate
    text_encoder_weight_decay: float | None = None  # None = weight_decay

    def total_steps(self, subjects: int) -> int:
        """The optimizer steps of a run of ``subjects`` subjects: ``steps`` each."""
        return self.steps * subjects

    @classmethod
    def from_profile(cls, profile: Profile, steps: int | None = None, seed: int = 0) -> TrainParams:
        """The profile's hyper-parameters; ``steps`` None or 0 means the profile's."""
        return cls(
            steps=steps or profile.train_steps,
            learning_rate=profile.learning_rate,
            rank=profile.lora_rank,
            alpha=profile.lora_alpha,
            target_modules=profile.lora_target_modules,
            resolution=profile.resolution,
            seed=seed,
            prior_loss_weight=profile.prior_loss_weight,
            snr_gamma=profile.snr_gamma,
            train_text_encoder=profile.train_text_encoder,
            text_encoder_target_modules=profile.text_encoder_target_modules,
            gradient_checkpointing=profile.gradient_checkpointing,
            mixed_precision=profile.mixed_precision,
            use_8bit_adam=profile.use_8bit_adam,
            crop_jitter=profile.crop_jitter,
            horizontal_flip=profile.horizontal_flip,
            max_grad_norm=profile.max_grad_norm,
            gradient_accumulation_steps=profile.gradient_accumulation_steps,
            weight_decay=profile.weight_decay,
            text_encoder_learning_rate=profile.text_encoder_learning_rate,
            text_encoder_weight_decay=profile.text_encoder_weight_decay,
        )


@dataclass
class _Run:
    """Everything the steps of one run share."""

    pipe: Pipeline
    family: Family
    params: TrainParams
    noise_scheduler: DDPMScheduler
    views: SubjectViews
    # Token ids per text encoder, each with a row per instance prompt, then one
    # per class prompt (see core.ml.train_subjects.prompts).
    ids: tuple[torch.Tensor, ...]
    embeddings: PromptEmbeddings | None  # precomputed unless the text encoders train
    trainable: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    generator: torch.Generator  # every random draw of every step comes from it
    fingerprint: str
    total: int  # optimizer steps of the whole run (``TrainParams.total_steps``)
    adapter: str  # the run's adapter name in the pipeline


def run_fingerprint(
    params: TrainParams,
    photos: list[Image.Image],
    instance_prompt: str,
    prior: PriorPreservation | None,
) -> str:
    """What a checkpoint must have been trained on to resume this run."""
    return subjects_run_fingerprint(params, [InstanceSet(photos, instance_prompt, prior)])


def subjects_run_fingerprint(params: TrainParams, subjects: list[InstanceSet]) -> str:
    """``run_fingerprint`` of a run of several subjects (the same for one)."""
    return subjects_fingerprint(params, subjects, HOW_NOT_WHAT)


def _prepare(
    pipe: Pipeline, subjects: list[InstanceSet], params: TrainParams, adapter: str
) -> _Run:
    family = family_of(pipe)
    for module in family.modules(pipe).values():
        module.requires_grad_(False)
    if params.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if params.train_text_encoder:
            for encoder in family.text_encoders(pipe).values():
                enable_text_encoder_checkpointing(encoder)
    views = encode_subjects(
        pipe, subjects, params.resolution, params.crop_jitter, params.horizontal_flip
    )
    ids = family.tokenize(pipe, prompts(subjects))
    embeddings = None
    if not params.train_text_encoder:
        with torch.no_grad():
            embeddings = family.encode(pipe, ids)
    trainable = add_adapters(pipe, params, adapter)
    device = pipe.unet.device
    dtype = autocast_dtype(pipe.unet, params.mixed_precision)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaling = device.type == "cuda" and dtype == torch.float16
    pipe.unet.train()
    if params.train_text_encoder:
        for encoder in family.text_encoders(pipe).values():
            encoder.train()
    return _Run(
        pipe=pipe,
        family=family,
        params=params,
        # The forward process the model was trained with, from the checkpoint's schedule.
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        views=views,
        ids=ids,
        embeddings=embeddings,
        trainable=trainable,
        optimizer=make_optimizer(trainable, params, device),
        scaler=torch.amp.GradScaler(device.type, enabled=scaling),
        autocast_dtype=dtype,
        generator=torch.Generator().manual_seed(params.seed),
        fingerprint=subjects_run_fingerprint(params, subjects),
        total=params.total_steps(len(subjects)),
        adapter=adapter,
    )


def _text(run: _Run, rows: list[int]) -> PromptEmbeddings:
    """The conditioning of a step's examples; encoded each step when the text
    encoders train (only the rows the step uses: the others get no gradient)."""
    if run.embeddings is not None:
        return select_rows(run.embeddings, rows)
    return run.family.encode(run.pipe, tuple(ids[rows] for ids in run.ids))


def _loss(run: _Run, batch: int) -> torch.Tensor:
    """The denoising loss of batch ``batch`` (1-based, over the whole run): a random
    view of one photo of its subject (and of one class image of its noun, prior
    preservation's half of the batch), random noise and timesteps."""
    pipe, generator, scheduler = run.pipe, run.generator, run.noise_scheduler
    examples, rows = run.views.batch(batch, generator)
    latents = torch.cat([e.latents for e in examples]) * pipe.vae.config.scaling_factor
    micro = torch.tensor([e.time_ids for e in examples], dtype=torch.float32)
    noise = randn(latents.shape, generator, latents)
    t = random_timesteps(scheduler, len(latents), generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    unet = pipe.unet
    with autocast(unet, run.autocast_dtype):
        conditioning = run.family.unet_kwargs(unet, _text(run, rows), micro)
        prediction = unet(noisy.to(unet.dtype), t, **conditioning)
    prior_weight = run.params.prior_loss_weight if len(examples) > 1 else None
    target = noise_target(scheduler, latents, noise, t)
    return dreambooth_loss(
        prediction.sample, target, t, scheduler, prior_weight, run.params.snr_gamma
    )


def _step(run: _Run, step: int) -> float:
    """Optimizer step ``step`` (1-based): batches (step - 1) * k + 1 .. step * k for
    k accumulation steps; returns their mean loss."""
    accumulation = run.params.gradient_accumulation_steps
    first = (step - 1) * accumulation + 1
    return optimizer_step(
        lambda index: _loss(run, first + index),
        accumulation,
        run.optimizer,
        run.scaler,
        run.params.max_grad_norm,
    )


def _capture(run: _Run, step: int, losses: list[float]) -> TrainState:
    return TrainState(
        step=step,
        total=run.total,
        lora={name: cpu_copy(param) for name, param in run.trainable},
        optimizer=cpu_copy(run.optimizer.state_dict()),
        optimizer_kind=optimizer_kind(run.optimizer),
        generator=run.generator.get_state(),
        losses=list(losses),
        fingerprint=run.fingerprint,
        scaler=cpu_copy(run.scaler.state_dict()) if run.scaler.is_enabled() else None,
    )


def _resume(run: _Run, state: TrainState) -> None:
    if state.fingerprint != run.fingerprint or state.total != run.total:
        raise ValueError("the checkpoint belongs to another training run (see run_fingerprint)")
    if not 0 < state.step < state.total or len(state.losses) != state.step:
        raise ValueError(f"inconsistent checkpoint at step {state.step} of {state.total}")
    if set(state.lora) != {name for name, _ in run.trainable}:
        raise ValueError("the checkpoint's LoRA parameters do not match this run's")
    with torch.no_grad():
        for name, param in run.trainable:
            param.copy_(state.lora[name])
    if state.optimizer_kind == optimizer_kind(run.optimizer):
        run.optimizer.load_state_dict(state.optimizer)
    else:  # e.g. saved by 8-bit Adam on a host with bitsandbytes, resumed on one without
        log.warning(
            "checkpoint optimizer %s, this run uses %s: Adam moments start afresh",
            state.optimizer_kind,
            optimizer_kind(run.optimizer),
        )
    if state.scaler is not None and run.scaler.is_enabled():
        run.scaler.load_state_dict(state.scaler)
    run.generator.set_state(state.generator)


def _check_inputs(subjects: list[InstanceSet], params: TrainParams) -> None:
    check_subjects(subjects)
    if params.steps < 1 or params.rank < 1 or params.alpha < 1 or params.learning_rate <= 0:
        raise InvalidInput(f"invalid training parameters: {params}")
    if params.prior_loss_weight < 0 or not 0 <= params.crop_jitter < 1:
        raise InvalidInput(f"invalid training parameters: {params}")
    if params.snr_gamma is not None and params.snr_gamma <= 0:
        raise InvalidInput(f"snr_gamma must be positive, not {params.snr_gamma}")
    check_optimizer_params(params)


def train_dreambooth_lora(
    pipe: Pipeline,
    photos: list[Image.Image],
    instance_prompt: str,
    params: TrainParams,
    on_step: Callable[[int, int, float], None],
    should_stop: Callable[[], bool],
    *,
    prior: PriorPreservation | None = None,
    resume: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 0,
    checkpoint_on_stop: Callable[[], bool] | None = None,
) -> bytes:
    """Train a LoRA of the subject in ``photos``; return it as safetensors bytes.

    ``on_step(step, total, loss)`` follows each optimizer step (1-based, counted
    from the start of the whole run even after a resume), ``loss`` the mean over
    its ``gradient_accumulation_steps`` batches; ``should_stop()`` is asked before
    each step and raises Canceled when true. With ``prior``, each batch is one
    photo and one class image and its loss is instance + lambda * prior.

    ``on_checkpoint(state)`` gets a resumable snapshot after every
    ``checkpoint_every``-th step but the last, before that step's ``on_step``; it
    runs on the training thread, which waits for it. ``resume`` continues from
    such a snapshot of the same run (same ``run_fingerprint``, else ValueError) up
    to ``params.steps``; the result equals an uninterrupted run's. When a stop comes
    and ``checkpoint_on_stop()`` is true, a snapshot of the steps done goes to
    ``on_checkpoint`` first (a job yielding its GPU resumes from it).
    """
    subject = InstanceSet(photos, instance_prompt, prior)
    return train_subjects(
        pipe, [subject], params, on_step, should_stop,
        resume=resume, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every,
        checkpoint_on_stop=checkpoint_on_stop,
    )  # fmt: skip


def train_subjects(
    pipe: Pipeline,
    subjects: list[InstanceSet],
    params: TrainParams,
    on_step: Callable[[int, int, float], None],
    should_stop: Callable[[], bool],
    *,
    resume: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 0,
    checkpoint_on_stop: Callable[[], bool] | None = None,
) -> bytes:
    """``train_dreambooth_lora`` for one or more subjects, each with its own
    instance prompt (its own token) and the class images of its noun: batch b
    trains subject (b - 1) % N, and N subjects run ``params.total_steps(N)`` =
    N x ``params.steps`` optimizer steps (``on_step``'s total), so each gets a
    single-subject run's. One subject is exactly ``train_dreambooth_lora``;
    checkpoints are matched with ``subjects_run_fingerprint``."""
    _check_inputs(subjects, params)
    adapter = f"atelier_train_{uuid.uuid4().hex}"
    with exclusive(pipe), restored(pipe), torch.enable_grad():
        run = _prepare(pipe, subjects, params, adapter)
        with parked(pipe, params.train_text_encoder):  # the steps need the UNet alone
            hooks = _Hooks(
                on_step, should_stop, on_checkpoint, checkpoint_every, checkpoint_on_stop
            )
            return _steps(run, resume, hooks)


@dataclass(frozen=True)
class _Hooks:
    on_step: Callable[[int, int, float], None]
    should_stop: Callable[[], bool]
    on_checkpoint: Callable[[TrainState], None] | None
    checkpoint_every: int
    # Asked when a stop comes: True for a snapshot at that step first (a job yielding
    # its GPU resumes from it and loses no step).
    checkpoint_on_stop: Callable[[], bool] | None


def _steps(run: _Run, resume: TrainState | None, hooks: _Hooks) -> bytes:
    """The run's optimizer steps (from ``resume`` on), then its LoRA file."""
    pipe, params = run.pipe, run.params
    losses: list[float] = []
    if resume is not None:
        _resume(run, resume)
        losses = list(resume.losses)
    for step in range(len(losses) + 1, run.total + 1):
        if hooks.should_stop():
            keep = hooks.checkpoint_on_stop is not None and hooks.checkpoint_on_stop()
            if keep and hooks.on_checkpoint is not None and losses:
                hooks.on_checkpoint(_capture(run, len(losses), losses))
            raise Canceled(f"training canceled before step {step} of {run.total}")
        losses.append(_step(run, step))
        every = hooks.checkpoint_every
        if hooks.on_checkpoint and every > 0 and step % every == 0 and step < run.total:
            hooks.on_checkpoint(_capture(run, step, losses))
        hooks.on_step(step, run.total, losses[-1])
    return export_lora(pipe, run.adapter, params)
