"""What a cached set of class images is keyed by: the checkpoint's contents and every
sampler setting (core.ml.checkpoint_identity, core.ml.class_images), and the
sampler's timestep spacing that profiles and requests may set."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from core.errors import InvalidInput
from core.jobs.specs import GenerationSpec
from core.ml.checkpoint_identity import (
    SAMPLE_BYTES,
    cached_checkpoint_identity,
    checkpoint_identity,
)
from core.ml.class_images import class_image_params, class_image_recipe
from core.ml.generate import GenerateParams, generate_images, make_scheduler
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.settings import Settings
from tests.unit.ml_helpers import ignore, never

TINY = get_profile("tiny")
SD15 = get_profile("sd15")
SDXL = get_profile("sdxl")


@pytest.fixture()
def checkpoint_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def _weights(root: Path) -> Path:
    return next(root.glob("unet/*.safetensors"))


def test_identity_follows_the_contents_not_the_path(
    tiny_model_dir: Path, checkpoint_copy: Path
) -> None:
    original = checkpoint_identity(tiny_model_dir)
    # Another host, another path, the same files: the same identity (shared cache).
    assert checkpoint_identity(checkpoint_copy) == original
    # One weight changed in the UNet: another checkpoint.
    weights = _weights(checkpoint_copy)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert checkpoint_identity(checkpoint_copy) != original


def test_identity_samples_large_weight_files(tmp_path: Path) -> None:
    """Weight files over the sampled windows are read in windows: a change inside a
    window changes the identity; files are never read whole."""
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(torch.randint(0, 256, (SAMPLE_BYTES * 10,), dtype=torch.uint8).numpy())
    weights.write_bytes(bytes(data))
    before = checkpoint_identity(root)
    data[len(data) // 3] ^= 0xFF  # the second of four evenly spaced windows
    weights.write_bytes(bytes(data))
    assert checkpoint_identity(root) != before
    # A config change is always seen: configs are hashed whole.
    (root / "model_index.json").write_text('{"_class_name": "x"}')
    assert checkpoint_identity(root) != before


def test_cached_identity_notices_a_changed_file(checkpoint_copy: Path) -> None:
    first = cached_checkpoint_identity(checkpoint_copy)
    assert cached_checkpoint_identity(checkpoint_copy) == first
    config = checkpoint_copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))
    assert cached_checkpoint_identity(checkpoint_copy) != first


def test_recipe_misses_when_the_checkpoint_or_sampler_changes() -> None:
    recipe = class_image_recipe(SD15, "woman", "checkpoint-a")
    assert class_image_recipe(SD15, "woman", "checkpoint-a") == recipe
    changed = [
        class_image_recipe(SD15, "woman", "checkpoint-b"),  # another checkpoint
        class_image_recipe(replace(SD15, inference_steps=50), "woman", "checkpoint-a"),
        class_image_recipe(replace(SD15, guidance_scale=5.0), "woman", "checkpoint-a"),
        class_image_recipe(replace(SD15, resolution=768), "woman", "checkpoint-a"),
        class_image_recipe(replace(SD15, timestep_spacing="trailing"), "woman", "checkpoint-a"),
        class_image_recipe(SD15, "man", "checkpoint-a"),
    ]
    assert len({recipe, *changed}) == len(changed) + 1
    # Training knobs do not change what the base model draws: the set is reused.
    assert class_image_recipe(replace(SD15, train_steps=900), "woman", "checkpoint-a") == recipe
    assert class_image_params(SDXL, "woman", 0).timestep_spacing == SDXL.timestep_spacing


# --- timestep spacing ------------------------------------------------------------------------


def test_scheduler_takes_the_spacing(tiny_model_dir: Path) -> None:
    pipe: StableDiffusionPipeline = load_pipeline(tiny_model_dir, "cpu", "float32")
    config = pipe.scheduler.config
    default: Any = make_scheduler("dpmpp_2m", config)
    assert default.config.timestep_spacing == config.timestep_spacing
    trailing: Any = make_scheduler("dpmpp_2m", config, "trailing")
    trailing.set_timesteps(4)
    # "trailing" starts at the last training timestep, "leading" short of it.
    assert int(trailing.timesteps[0]) == config.num_train_timesteps - 1
    leading: Any = make_scheduler("dpmpp_2m", config, "leading")
    leading.set_timesteps(4)
    assert int(leading.timesteps[0]) < config.num_train_timesteps - 1

    def draw(spacing: str | None) -> bytes:
        params = GenerateParams(
            prompt="a photo", num_images=1, seed=1, steps=4, guidance_scale=5.0,
            width=64, height=64, timestep_spacing=spacing,
        )  # fmt: skip
        return generate_images(pipe, None, params, ignore, never)[0].png

    assert draw("trailing") != draw("leading")
    with pytest.raises(InvalidInput, match="timestep spacing"):
        draw("sideways")


def test_generation_spec_resolves_the_profiles_spacing() -> None:
    spec = GenerationSpec(subject_id=uuid.uuid4(), prompt="a coat")
    assert spec.resolve(Settings(profile="tiny")).timestep_spacing is None  # the checkpoint's
    picked = spec.model_copy(update={"timestep_spacing": "trailing"})
    assert picked.resolve(Settings(profile="tiny")).timestep_spacing == "trailing"
    trailing_profile = replace(TINY, timestep_spacing="trailing")
    assert class_image_params(trailing_profile, "man", 0).timestep_spacing == "trailing"
