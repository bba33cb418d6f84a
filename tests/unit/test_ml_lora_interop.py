"""SD 1.x LoRA files between atelier and plain diffusers, text encoder included.

atelier writes text-encoder layers under ``text_encoder.text_model.``, as the
diffusers file format has them (transformers 5 flattened CLIPTextModel, so peft
alone names them without it); plain diffusers loads such a file with both
adapters, and atelier loads diffusers' files with or without the prefix.

A LoRA whose alpha lives only in the safetensors header (diffusers' own
``lora_adapter_metadata``, kohya's ``ss_network_alpha``) loads at alpha / rank,
as plain diffusers loads the file from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_unet_state_dict_to_peft,
)
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
RANK, ALPHA = 4, 8  # the trained LoRA's; its file has lora_B scaled by ALPHA / RANK
# diffusers' spellings of lora_B: the UNet's, then the text encoder's.
UP_WEIGHTS = (".lora.up.weight", ".lora_linear_layer.up.weight")


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
        rank=RANK,
        alpha=ALPHA,
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


# --- alpha only in the header ----------------------------------------------------------


def unet_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """The UNet's output on fixed inputs (the LoRA's UNet layers, nothing else)."""
    generator = torch.Generator().manual_seed(3)
    config = pipe.unet.config
    latents = torch.randn(
        1, config.in_channels, config.sample_size, config.sample_size, generator=generator
    )
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, 10, encoder_hidden_states=context).sample


def through_atelier(pipe: StableDiffusionPipeline, lora: bytes) -> tuple[torch.Tensor, ...]:
    cache = LoraCache(pipe, max_resident=1)
    try:
        cache.activate(LoraWeights.of(lora))
        return unet_probe(pipe), text_probe(pipe)
    finally:
        cache.clear()


def _unscaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained layers with alpha / rank taken back out of lora_B."""
    return {k: v / (ALPHA / RANK) if k.endswith(UP_WEIGHTS) else v for k, v in state.items()}


def _diffusers_metadata_only(trained: bytes, tmp_path: Path) -> Path:
    """The trained LoRA as diffusers writes one with its LoraConfig in the header."""
    state = _unscaled(load(trained))
    parts = {
        component: {k.removeprefix(f"{component}."): v for k, v in state.items()
                    if k.startswith(f"{component}.")}
        for component in ("unet", "text_encoder")
    }  # fmt: skip
    targets = {"unet": TINY.lora_target_modules, "text_encoder": TINY.text_encoder_target_modules}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        weight_name="header.safetensors",
        unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts["text_encoder"],
        unet_lora_adapter_metadata=LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(targets["unet"])
        ).to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(targets["text_encoder"])
        ).to_dict(),
    )
    return tmp_path / "header.safetensors"


def test_diffusers_header_alpha_loads_at_alpha_over_rank(
    pipe: StableDiffusionPipeline, trained: bytes, tiny_path: Path, tmp_path: Path
) -> None:
    path = _diffusers_metadata_only(trained, tmp_path)
    rewritten = path.read_bytes()
    assert not any(k.endswith("alpha") for k in load(rewritten))
    expected = through_atelier(pipe, trained)

    # Plain diffusers reads the header from the file: the same LoRA as the original.
    reference = stock(tiny_path)
    reference.load_lora_weights(tmp_path, weight_name=path.name)
    torch.testing.assert_close(unet_probe(reference), expected[0])
    torch.testing.assert_close(text_probe(reference), expected[1])

    # Without the header the layers load at scale 1: the probe can tell.
    bare = through_atelier(pipe, save(load(rewritten)))
    assert not torch.allclose(bare[0], expected[0])

    got = through_atelier(pipe, rewritten)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_kohya_header_alpha_loads_at_alpha_over_rank(
    pipe: StableDiffusionPipeline, trained: bytes
) -> None:
    """kohya keys with the ``.alpha`` tensors stripped, alpha in ``ss_network_alpha``."""
    unet = {k.removeprefix("unet."): v for k, v in _unscaled(load(trained)).items()
            if k.startswith("unet.")}  # fmt: skip
    kohya = convert_state_dict_to_kohya(
        {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()}
    )
    with_tensors = {k: torch.tensor(float(ALPHA)) if k.endswith(".alpha") else v
                    for k, v in kohya.items()}  # fmt: skip
    header_only = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}
    metadata = {"ss_network_dim": str(RANK), "ss_network_alpha": str(float(ALPHA))}

    expected = through_atelier(pipe, trained)[0]
    # kohya's own file (alpha tensors) is what diffusers converts at alpha / rank.
    torch.testing.assert_close(through_atelier(pipe, save(with_tensors))[0], expected)
    assert not torch.allclose(through_atelier(pipe, save(header_only))[0], expected)
    got = through_atelier(pipe, save(header_only, metadata=metadata))[0]
    torch.testing.assert_close(got, expected)
