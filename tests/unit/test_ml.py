"""The ML layer on the tiny checkpoint: real diffusers code paths, random weights."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load

from core.errors import CheckpointMissing, InvalidInput
from core.ml import pipeline as ml_pipeline
from core.ml import tiny
from core.ml.generate import (
    GeneratedImage,
    GenerateParams,
    generate_images,
    instance_prompt,
    subject_prompt,
)
from core.ml.pipeline import ResidentPipelines, load_pipeline, resolve_checkpoint
from core.ml.profiles import PROFILES, get_profile
from core.ml.tokenizer import build_clip_tokenizer
from core.ml.train import Canceled, TrainingCanceled, TrainParams, train_dreambooth_lora
from tests.unit.ml_helpers import ignore, never, random_photos

PROMPT = instance_prompt("sks", "person")
TRAIN_STEPS = 6
# A learning rate far above a real run's, so six steps visibly change the images.
HIGH_LR = 1e-2
# alpha != rank, so the export has to carry the alpha / rank scale correctly.
LORA_RANK, LORA_ALPHA = 4, 8
TINY = get_profile("tiny")
LATENT_SIDE = TINY.resolution // 2  # the tiny VAE downsamples once


def unet_state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in pipe.unet.state_dict().items()}


def assert_pristine(pipe: StableDiffusionPipeline, before: dict[str, torch.Tensor]) -> None:
    after = pipe.unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(isinstance(module, BaseTunerLayer) for module in pipe.unet.modules())
    assert not getattr(pipe.unet, "peft_config", None)
    assert not any(param.requires_grad for param in pipe.unet.parameters())
    assert not pipe.unet.training


def unet_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """The UNet's prediction for a fixed input: a fingerprint of its weights."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, LATENT_SIDE, LATENT_SIDE, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def params(steps: int = TRAIN_STEPS) -> TrainParams:
    return TrainParams(
        steps=steps,
        learning_rate=HIGH_LR,
        rank=LORA_RANK,
        alpha=LORA_ALPHA,
        target_modules=TINY.lora_target_modules,
        resolution=TINY.resolution,
    )


def gen_params(seed: int = 3, num_images: int = 2) -> GenerateParams:
    return GenerateParams(
        prompt=subject_prompt("sks", "person", "on a beach"),
        num_images=num_images,
        seed=seed,
        steps=8,
        guidance_scale=TINY.guidance_scale,
        width=TINY.resolution,
        height=TINY.resolution,
    )


def generate(
    pipe: StableDiffusionPipeline, lora: bytes | None, p: GenerateParams
) -> list[GeneratedImage]:
    return generate_images(pipe, lora, p, ignore, never)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def pipe(tiny_path: Path) -> StableDiffusionPipeline:
    return load_pipeline(tiny_path, "cpu", "float32")


@dataclass
class Trained:
    lora: bytes
    steps_seen: list[tuple[int, int, float]]
    probe_at_end: torch.Tensor  # the UNet with the live adapter, after the last step


@pytest.fixture(scope="session")
def trained(pipe: StableDiffusionPipeline) -> Trained:
    seen: list[tuple[int, int, float]] = []
    probes: list[torch.Tensor] = []

    def on_step(step: int, total: int, loss: float) -> None:
        seen.append((step, total, loss))
        if step == total:  # the adapter's final weights are in place now
            probes.append(unet_probe(pipe))

    lora = train_dreambooth_lora(pipe, random_photos(seed=0), PROMPT, params(), on_step, never)
    return Trained(lora, seen, probes[0])


# --- profiles, tokenizer, checkpoint ------------------------------------------------


def test_profiles_table_and_unknown_name() -> None:
    assert {"tiny", "sd15", "sd14"} <= set(PROFILES)
    assert get_profile("sd15").hub_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert TINY.hub_id is None and TINY.resolution == 64
    with pytest.raises(InvalidInput, match="sd15"):
        get_profile("sdxxl")


def test_tokenizer_builds_offline(tmp_path: Path) -> None:
    tokenizer = build_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    ids = tokenizer(PROMPT).input_ids
    assert ids == [49406, 320, 1125, 539, 48136, 2533, 49407]
    padded = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)


def test_tiny_checkpoint_is_idempotent(tiny_path: Path) -> None:
    assert tiny.is_complete_checkpoint(tiny_path)
    weights = tiny_path / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny.build_tiny_checkpoint(tiny_path) == tiny_path
    assert weights.stat().st_mtime_ns == stamp
    # No staging directory left beside it.
    assert [entry.name for entry in tiny_path.parent.iterdir()] == ["tiny"]


def test_tiny_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match=str(target)):
        tiny.build_tiny_checkpoint(target)


def test_tiny_command_reports_existing(tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny.main([str(tiny_path)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_resolve_checkpoint(
    tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_checkpoint(TINY, tiny_path.parent, None) == tiny_path
    assert resolve_checkpoint(TINY, tmp_path, tiny_path) == tiny_path
    with pytest.raises(CheckpointMissing) as missing:
        resolve_checkpoint(TINY, tmp_path, None)
    assert str(tmp_path / "tiny") in missing.value.detail
    assert f"python -m core.ml.tiny {tmp_path / 'tiny'}" in missing.value.detail
    # A hub profile also looks in the HF cache; keep this test independent of the host's.
    monkeypatch.setattr(ml_pipeline, "_cached_snapshot", lambda _hub_id: None)
    with pytest.raises(CheckpointMissing) as missing:
        resolve_checkpoint(get_profile("sd15"), tmp_path, None)
    assert str(tmp_path / "sd15") in missing.value.detail
    assert "python -m core.ml.pipeline download sd15" in missing.value.detail


def test_download_command_refuses_local_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert ml_pipeline.main(["download", "tiny", "--to", "/nowhere/tiny"]) == 2
    assert "python -m core.ml.tiny /nowhere/tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ml_pipeline.main(["download", "no-such-profile"])


def test_loaded_pipeline_is_frozen_with_dpm_solver_pp(pipe: StableDiffusionPipeline) -> None:
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not any(param.requires_grad for param in module.parameters())


def test_resident_pipelines_load_once(tiny_path: Path) -> None:
    resident = ResidentPipelines()
    got: list[StableDiffusionPipeline] = []
    threads = [
        threading.Thread(target=lambda: got.append(resident.get(tiny_path, "cpu", "float32")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 3 and all(each is got[0] for each in got)
    assert resident.get(tiny_path, "cpu", "float32") is got[0]


# --- training ----------------------------------------------------------------------------


def test_training_returns_diffusers_lora(trained: Trained) -> None:
    assert [(step, total) for step, total, _ in trained.steps_seen] == [
        (step, TRAIN_STEPS) for step in range(1, TRAIN_STEPS + 1)
    ]
    assert all(np.isfinite(loss) for _, _, loss in trained.steps_seen)
    state = load(trained.lora)
    assert state and all(key.startswith("unet.") for key in state)
    assert any("lora.down" in key or "lora_A" in key for key in state)
    assert any("lora.up" in key or "lora_B" in key for key in state)


def test_exported_lora_reproduces_the_trained_adapter(
    pipe: StableDiffusionPipeline, trained: Trained
) -> None:
    base = unet_probe(pipe)
    pipe.load_lora_weights(load(trained.lora), adapter_name="probe")
    try:
        loaded = unet_probe(pipe)
    finally:
        pipe.unload_lora_weights()
    assert not torch.allclose(loaded, base)
    # Same outputs as the live adapter: alpha / rank survived the export.
    torch.testing.assert_close(loaded, trained.probe_at_end)


def test_training_leaves_pipeline_unchanged(pipe: StableDiffusionPipeline) -> None:
    before = unet_state(pipe)
    train_dreambooth_lora(pipe, random_photos(1, seed=0), PROMPT, params(steps=2), ignore, never)
    assert_pristine(pipe, before)


def test_training_cancel(pipe: StableDiffusionPipeline) -> None:
    before = unet_state(pipe)
    seen: list[int] = []
    with pytest.raises(TrainingCanceled):
        train_dreambooth_lora(
            pipe,
            random_photos(1, seed=0),
            PROMPT,
            params(),
            lambda s, _t, _l: seen.append(s),
            lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]
    assert_pristine(pipe, before)


def test_training_rejects_no_photos(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(InvalidInput):
        train_dreambooth_lora(pipe, [], PROMPT, params(), ignore, never)


# --- generation -----------------------------------------------------------------------


def test_generation_is_reproducible_per_seed(pipe: StableDiffusionPipeline) -> None:
    steps: list[tuple[int, int]] = []
    first = generate_images(pipe, None, gen_params(), lambda d, t: steps.append((d, t)), never)
    assert steps == [(done, 16) for done in range(1, 17)]
    assert [image.seed for image in first] == [3, 4]
    assert [image.png for image in generate(pipe, None, gen_params())] == [
        image.png for image in first
    ]
    assert first[0].png != first[1].png
    # Image i is reproducible alone from seed + i.
    assert generate(pipe, None, gen_params(seed=4, num_images=1))[0].png == first[1].png
    assert generate(pipe, None, gen_params(seed=99, num_images=1))[0].png != first[0].png


def test_png_is_bare(pipe: StableDiffusionPipeline) -> None:
    image = generate(pipe, None, gen_params(num_images=1))[0]
    decoded = Image.open(io.BytesIO(image.png))
    assert decoded.format == "PNG" and decoded.size == (64, 64)
    assert (image.width, image.height) == (64, 64)
    assert decoded.info == {}


def test_lora_changes_generation_and_is_unloaded(
    pipe: StableDiffusionPipeline, trained: Trained
) -> None:
    before = unet_state(pipe)
    plain = generate(pipe, None, gen_params())
    with_lora = generate(pipe, trained.lora, gen_params())
    assert [image.png for image in with_lora] != [image.png for image in plain]
    assert [image.png for image in generate(pipe, trained.lora, gen_params())] == [
        i.png for i in with_lora
    ]
    assert_pristine(pipe, before)
    assert [image.png for image in generate(pipe, None, gen_params())] == [i.png for i in plain]


def test_generation_cancel_unloads_lora(pipe: StableDiffusionPipeline, trained: Trained) -> None:
    before = unet_state(pipe)
    done: list[int] = []
    with pytest.raises(Canceled):
        generate_images(
            pipe, trained.lora, gen_params(), lambda d, _t: done.append(d), lambda: bool(done)
        )
    assert done == [1]
    assert_pristine(pipe, before)


def test_generation_rejects_bad_sizes(pipe: StableDiffusionPipeline) -> None:
    bad = GenerateParams(
        prompt="x", num_images=1, seed=0, steps=2, guidance_scale=1.0, width=60, height=64
    )
    with pytest.raises(InvalidInput):
        generate(pipe, None, bad)


def test_prompts() -> None:
    assert instance_prompt("sks", "dog") == "a photo of sks dog"
    assert subject_prompt("sks", "dog", " on the moon ") == "a photo of sks dog, on the moon"
    assert subject_prompt("sks", "dog", "") == "a photo of sks dog"


# --- interop ----------------------------------------------------------------------------


def test_lora_loads_in_a_fresh_stock_pipeline(
    tiny_path: Path, trained: Trained, tmp_path: Path
) -> None:
    (tmp_path / "subject.safetensors").write_bytes(trained.lora)
    fresh = StableDiffusionPipeline.from_pretrained(
        tiny_path, local_files_only=True, safety_checker=None
    )
    fresh.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        out = fresh(PROMPT, num_inference_steps=4, generator=generator, output_type="np")
        return np.asarray(out.images)

    plain = render()
    fresh.load_lora_weights(tmp_path, weight_name="subject.safetensors")
    assert not np.array_equal(render(), plain)
