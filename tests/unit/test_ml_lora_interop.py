"""SD 1.x LoRA files between atelier and plain diffusers, text encoder included.

atelier writes text-encoder layers under ``text_encoder.text_model.``, as the
diffusers file format has them (transformers 5 flattened CLIPTextModel, so peft
alone names them without it); plain diffusers loads such a file with both
adapters, and atelier loads diffusers' files with or without the prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load, save

from core.ml.lora_cache import LoraCache, LoraWeights
from core.ml.lora_weights import TEXT_MODEL_PREFIX
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.ml.train import TrainParams, train_dreambooth_lora

TINY = get_profile("tiny")
PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir: Path) -> Path:
    torch.set_num_threads(2)
    return tiny_model_dir


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> StableDiffusionPipeline:
    return load_pipeline(tiny_path, "cpu", "float32")


@pytest.fixture(scope="module")
def trained(pipe: StableDiffusionPipeline) -> bytes:
    rng = np.random.default_rng(4)
    photos = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))] * 2
    p = TrainParams(
        steps=3,
        learning_rate=1e-2,
        rank=4,
        alpha=8,
        target_modules=TINY.lora_target_modules,
        resolution=TINY.resolution,
        train_text_encoder=True,
    )
    return train_dreambooth_lora(pipe, photos, PROMPT, p, lambda *_: None, lambda: False)


def stock(path: Path) -> StableDiffusionPipeline:
    """Plain diffusers, as anyone would load the checkpoint."""
    loaded = StableDiffusionPipeline.from_pretrained(
        path, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    loaded.set_progress_bar_config(disable=True)
    return loaded


def image(pipe: StableDiffusionPipeline) -> np.ndarray[Any, Any]:
    out = pipe(
        PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    return np.asarray(out.images[0])


def text_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_keys_have_the_diffusers_prefix(trained: bytes) -> None:
    text_keys = [key for key in load(trained) if not key.startswith("unet.")]
    assert text_keys
    assert all(key.startswith(f"text_encoder.{TEXT_MODEL_PREFIX}encoder.") for key in text_keys)


def test_atelier_lora_loads_both_adapters_in_plain_diffusers(
    trained: bytes, tiny_path: Path, tmp_path: Path
) -> None:
    state = load(trained)
    unet_only = {key: value for key, value in state.items() if key.startswith("unet.")}
    (tmp_path / "full.safetensors").write_bytes(trained)
    (tmp_path / "unet.safetensors").write_bytes(save(unet_only))

    plain = stock(tiny_path)
    plain.load_lora_weights(tmp_path, weight_name="unet.safetensors")
    assert set(plain.get_list_adapters()) == {"unet"}
    unet_image = image(plain)

    full = stock(tiny_path)
    base_text = text_probe(full)
    full.load_lora_weights(tmp_path, weight_name="full.safetensors")
    assert set(full.get_list_adapters()) == {"unet", "text_encoder"}
    assert not torch.allclose(text_probe(full), base_text)
    assert not np.array_equal(image(full), unet_image)


def _diffusers_saved(pipe: StableDiffusionPipeline, tmp_path: Path, prefixed: bool) -> bytes:
    """A text-encoder LoRA made with plain peft and saved by diffusers' own writer, its
    keys as transformers 5 names them or (``prefixed``) as transformers 4 did."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False  # non-zero B, so the adapter changes the output
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        inject_adapter_in_model(config, pipe.text_encoder, adapter_name="theirs")
    try:
        state = get_peft_model_state_dict(pipe.text_encoder, adapter_name="theirs")
        layers = {key: value.detach().clone() for key, value in state.items()}
    finally:
        pipe.unload_lora_weights()
    if prefixed:
        layers = {f"{TEXT_MODEL_PREFIX}{key}": value for key, value in layers.items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        weight_name="theirs.safetensors",
        text_encoder_lora_layers=convert_state_dict_to_diffusers(layers),
    )
    return (tmp_path / "theirs.safetensors").read_bytes()


@pytest.mark.parametrize("prefixed", [False, True])
def test_diffusers_saved_text_encoder_lora_loads_in_atelier(
    pipe: StableDiffusionPipeline, tiny_path: Path, tmp_path: Path, prefixed: bool
) -> None:
    lora = _diffusers_saved(stock(tiny_path), tmp_path, prefixed)
    assert all(key.startswith("text_encoder.") for key in load(lora))
    reference = stock(tiny_path)
    base = text_probe(reference)
    reference.load_lora_weights(tmp_path, weight_name="theirs.safetensors")
    expected = text_probe(reference)
    assert not torch.allclose(expected, base)

    cache = LoraCache(pipe, max_resident=1)
    try:
        cache.activate(LoraWeights.of(lora))
        torch.testing.assert_close(text_probe(pipe), expected)
    finally:
        cache.clear()
    torch.testing.assert_close(text_probe(pipe), base)
