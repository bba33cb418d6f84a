"""Several subjects in one DreamBooth-LoRA run, each bound to its own token (tiny and
tiny-sdxl): the step order, the loss, what each token gets, the checkpoint
fingerprint and a bit-identical resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load

from core.errors import InvalidInput
from core.ml.class_images import class_prompt
from core.ml.generate import instance_prompt
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.ml.train import (
    Canceled,
    InstanceSet,
    PriorPreservation,
    TrainParams,
    run_fingerprint,
    subjects_run_fingerprint,
    train_subjects,
)
from core.ml.train_data import encode_views
from core.ml.train_state import TrainState
from core.ml.train_subjects import SubjectViews, check_subjects
from tests.unit.ml_helpers import never, tiny_train_params

TINY = get_profile("tiny")
TINY_SDXL = get_profile("tiny-sdxl")
Step = tuple[int, int, float]


def images(seed: int, count: int) -> list[Image.Image]:
    """Random pictures; class images need not come from the model for these tests."""
    rng = np.random.default_rng(seed)
    shape = (72, 96, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


MAN = PriorPreservation(images(10, 2), class_prompt("man"))
WOMAN = PriorPreservation(images(11, 2), class_prompt("woman"))


def two_subjects(prior: bool = True) -> list[InstanceSet]:
    return [
        InstanceSet(images(1, 3), instance_prompt("pgh", "man"), MAN if prior else None),
        InstanceSet(images(2, 2), instance_prompt("vfx", "woman"), WOMAN if prior else None),
    ]


def params(steps: int = 4, **options: Any) -> TrainParams:
    return tiny_train_params(steps, **options)


def train(pipe: Any, subjects: list[InstanceSet], p: TrainParams, **options: Any) -> bytes:
    on_step = options.pop("on_step", lambda *_: None)
    should_stop = options.pop("should_stop", never)
    return train_subjects(pipe, subjects, p, on_step, should_stop, **options)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    torch.set_num_threads(2)
    return load_pipeline(tiny_model_dir, "cpu", "float32")


def unet_probe(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """The UNet's prediction for fixed latents under ``prompt``."""
    generator = torch.Generator().manual_seed(1)
    side = TINY.resolution // 2
    latents = torch.randn(1, 4, side, side, generator=generator)
    ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def test_steps_take_the_subjects_in_turn(pipe: StableDiffusionPipeline) -> None:
    views = [encode_views(pipe, images(seed, 1), TINY.resolution, 0.0) for seed in range(3)]
    generator = torch.Generator().manual_seed(0)
    # Two subjects of one noun share its class row; the step number alone decides.
    shared = SubjectViews(views[:2], views[2:], [0, 0])
    assert [shared.batch(step, generator)[1] for step in (1, 2, 3, 4)] == [
        [0, 2],
        [1, 2],
        [0, 2],
        [1, 2],
    ]
    alone = SubjectViews(views, [], [None, None, None])
    assert [alone.batch(step, generator)[1] for step in (1, 2, 3)] == [[0], [1], [2]]


def test_inputs_are_checked() -> None:
    a, b = two_subjects()
    with pytest.raises(InvalidInput, match="own instance prompt"):
        check_subjects([a, replace(b, prompt=a.prompt)])
    with pytest.raises(InvalidInput, match="every subject of a run or for none"):
        check_subjects([a, replace(b, prior=None)])
    with pytest.raises(InvalidInput, match="two different class image sets"):
        check_subjects([a, replace(b, prior=replace(WOMAN, prompt=MAN.prompt))])
    with pytest.raises(InvalidInput, match="at least one photo"):
        check_subjects([a, replace(b, photos=[])])
    # Two subjects of one noun: one class set, made once, is fine (equal or the same).
    check_subjects([a, replace(b, prior=PriorPreservation(list(MAN.images), MAN.prompt))])


def test_fingerprint_covers_every_subject() -> None:
    p = params()
    a, b = two_subjects()
    single = run_fingerprint(p, a.photos, a.prompt, a.prior)
    # One subject hashes as single-subject runs always have: their checkpoints resume.
    assert subjects_run_fingerprint(p, [a]) == single
    both = subjects_run_fingerprint(p, [a, b])
    assert both != single
    assert both != subjects_run_fingerprint(p, [b, a])
    # The same photos cut into sets differently are another run.
    moved = [replace(a, photos=a.photos + b.photos[:1]), replace(b, photos=b.photos[1:])]
    assert both != subjects_run_fingerprint(p, moved)
    assert both != subjects_run_fingerprint(p, two_subjects(prior=False))
    assert both == subjects_run_fingerprint(replace(p, seed=9), two_subjects())


def test_n_subjects_get_n_times_the_steps(pipe: StableDiffusionPipeline) -> None:
    """Each subject of a run gets a single-subject run's optimizer steps, and the
    progress total says so; with accumulation, each step draws k batches in turn."""
    drawn: list[int] = []
    batch = SubjectViews.batch

    def counting(views: SubjectViews, index: int, generator: torch.Generator) -> Any:
        drawn.append(index)
        return batch(views, index, generator)

    steps: list[tuple[int, int]] = []
    p = params(steps=3, gradient_accumulation_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SubjectViews, "batch", counting)
        train(pipe, two_subjects(), p, on_step=lambda s, t, _l: steps.append((s, t)))
    assert steps == [(s, 6) for s in range(1, 7)]  # 2 subjects x 3 steps
    assert drawn == list(range(1, 13))  # 6 steps x 2 batches, numbered over the run
    # Batch b trains subject (b - 1) % 2: 6 batches each, as 3 steps alone would draw.
    assert p.total_steps(2) == 6 and p.total_steps(1) == 3


def test_two_subject_run_binds_each_token(pipe: StableDiffusionPipeline) -> None:
    losses: list[float] = []
    subjects = two_subjects()
    lora = train(pipe, subjects, params(), on_step=lambda _s, _t, loss: losses.append(loss))
    assert len(losses) == 8 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    # Both subjects shaped the LoRA: it is neither subject's run alone.
    assert lora != train(pipe, subjects[:1], params())
    assert lora != train(pipe, subjects[1:], params())

    prompts = [subject.prompt for subject in subjects]
    base = [unet_probe(pipe, prompt) for prompt in prompts]
    pipe.load_lora_weights(load(lora), adapter_name="pair")
    try:
        tuned = [unet_probe(pipe, prompt) for prompt in prompts]
    finally:
        pipe.unload_lora_weights()
    deltas = [after - before for after, before in zip(tuned, base, strict=True)]
    assert all(delta.abs().max() > 1e-4 for delta in deltas)
    # Each token gets its own change, not one shared shift.
    assert not torch.allclose(deltas[0], deltas[1], atol=1e-5)


def test_resumed_two_subject_run_equals_an_uninterrupted_one(
    pipe: StableDiffusionPipeline,
) -> None:
    p = params(steps=3, snr_gamma=5.0, crop_jitter=0.1)  # 6 steps for two subjects
    straight: list[Step] = []
    whole = train(pipe, two_subjects(), p, on_step=lambda *s: straight.append(s))

    checkpoints: list[TrainState] = []
    done: list[int] = []
    with pytest.raises(Canceled):
        train(
            pipe, two_subjects(), p, on_step=lambda s, _t, _l: done.append(s),
            should_stop=lambda: len(done) >= 5, on_checkpoint=checkpoints.append,
            checkpoint_every=2,
        )  # fmt: skip
    assert [c.step for c in checkpoints] == [2, 4]
    state = TrainState.from_bytes(checkpoints[-1].to_bytes())
    assert state.fingerprint == subjects_run_fingerprint(p, two_subjects())
    resumed: list[Step] = []
    lora = train(pipe, two_subjects(), p, on_step=lambda *s: resumed.append(s), resume=state)
    assert [s for s, _, _ in resumed] == [5, 6]
    assert state.losses + [loss for *_, loss in resumed] == [loss for *_, loss in straight]
    assert lora == whole
    # A single-subject run's checkpoint is not this run's.
    with pytest.raises(ValueError, match="another training run"):
        train(pipe, two_subjects()[:1], p, resume=state)


def test_tiny_sdxl_two_subject_run(tiny_sdxl_model_dir: Path) -> None:
    sdxl = load_pipeline(tiny_sdxl_model_dir, "cpu", "float32", TINY_SDXL.family)
    p = tiny_train_params(1, TINY_SDXL, train_text_encoder=True)
    losses: list[float] = []
    lora = train(sdxl, two_subjects(), p, on_step=lambda _s, _t, loss: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)  # 1 step each
    components = {key.split(".")[0] for key in load(lora)}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
