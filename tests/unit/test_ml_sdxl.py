"""SDXL on the tiny-sdxl checkpoint: real StableDiffusionXLPipeline, random weights.

Loading by family, DreamBooth-LoRA training with prior preservation (both text
encoders' embeddings, pooled text and size/crop time ids), LoRA files that stock
diffusers loads and the other way round, reproducible generation, resume, and
the missing-checkpoint error.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load, save

from core.errors import CheckpointMissing
from core.ml import pipeline as ml_pipeline
from core.ml import tiny_sdxl
from core.ml.class_images import class_prompt, generate_class_images
from core.ml.families import FAMILIES, family_of
from core.ml.generate import (
    GenerateParams,
    generate_images,
    instance_prompt,
    make_scheduler,
    subject_prompt,
)
from core.ml.lora_cache import LoraCache, LoraWeights
from core.ml.pipeline import load_pipeline, resolve_checkpoint
from core.ml.profiles import PROFILES, get_profile
from core.ml.resident import resident_lora_cache, resident_pipeline
from core.ml.train import Canceled, PriorPreservation, TrainParams, train_dreambooth_lora
from core.ml.train_data import encode_views, sample_example
from core.ml.train_state import TrainState
from core.settings import Settings
from tests.unit.ml_helpers import ignore, never, random_photos

TINY_SDXL = get_profile("tiny-sdxl")
SDXL = get_profile("sdxl")
PROMPT = instance_prompt("sks", "person")
HIGH_LR = 1e-2  # far above a real run's, so a few steps visibly move the weights
TRAIN_STEPS = 6
LORA_RANK, LORA_ALPHA = 4, 8  # alpha != rank: the export must fold alpha / rank in
MICRO_CONDITIONS = 6  # SDXL's time ids: original (h, w), crop (top, left), target (h, w)
ENCODERS = ("text_encoder", "text_encoder_2")
Step = tuple[int, int, float]


def params(steps: int = TRAIN_STEPS, **options: Any) -> TrainParams:
    base = TrainParams(
        steps=steps,
        learning_rate=HIGH_LR,
        rank=LORA_RANK,
        alpha=LORA_ALPHA,
        target_modules=TINY_SDXL.lora_target_modules,
        resolution=TINY_SDXL.resolution,
        snr_gamma=TINY_SDXL.snr_gamma,
        crop_jitter=TINY_SDXL.crop_jitter,
    )
    return replace(base, **options)


def gen_params(seed: int = 3, num_images: int = 1, **options: Any) -> GenerateParams:
    base = GenerateParams(
        prompt=subject_prompt("sks", "person", "in a wizard robe"),
        num_images=num_images,
        seed=seed,
        steps=4,
        guidance_scale=TINY_SDXL.guidance_scale,
        width=TINY_SDXL.resolution,
        height=TINY_SDXL.resolution,
        negative_prompt="blurry",
    )
    return replace(base, **options)


def pngs(
    pipe: StableDiffusionXLPipeline,
    lora: LoraWeights | bytes | None,
    p: GenerateParams,
    cache: LoraCache | None = None,
) -> list[bytes]:
    return [image.png for image in generate_images(pipe, lora, p, ignore, never, cache=cache)]


def train(
    pipe: StableDiffusionXLPipeline,
    p: TrainParams,
    prior: PriorPreservation | None,
    on_step: Callable[[int, int, float], None] = ignore,
    should_stop: Callable[[], bool] = never,
    **options: Any,
) -> bytes:
    return train_dreambooth_lora(
        pipe, random_photos(seed=2), PROMPT, p, on_step, should_stop, prior=prior, **options
    )


def base_state(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, module in family_of(pipe).modules(pipe).items()
        for key, value in module.state_dict().items()
    }


def assert_pristine(pipe: StableDiffusionXLPipeline, before: dict[str, torch.Tensor]) -> None:
    after = base_state(pipe)
    assert list(after) == list(before)
    assert all(torch.equal(before[key], after[key]) for key in before)
    for module in family_of(pipe).modules(pipe).values():
        assert not any(isinstance(sub, BaseTunerLayer) for sub in module.modules())
        assert not any(param.requires_grad for param in module.parameters())
        assert not module.training
    assert not pipe.unet.is_gradient_checkpointing


def stock_pipeline(path: Path) -> StableDiffusionXLPipeline:
    """Plain diffusers, as a user of the checkpoint would load it, with the sampler
    atelier uses (a fresh one per image) so images can be compared byte for byte."""
    pipe = StableDiffusionXLPipeline.from_pretrained(
        path, local_files_only=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_png(pipe: StableDiffusionXLPipeline, p: GenerateParams) -> bytes:
    """What atelier's generate_images draws for image 0 of ``p``, drawn by plain diffusers."""
    pipe.scheduler = make_scheduler(p.scheduler, pipe.scheduler.config)
    out = pipe(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        width=p.width,
        height=p.height,
        generator=torch.Generator().manual_seed(p.seed),
    )
    image = out.images[0]
    buffer = io.BytesIO()
    Image.frombytes(image.mode, image.size, image.tobytes()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sdxl_path(tiny_sdxl_model_dir: Path) -> Path:
    torch.set_num_threads(2)
    return tiny_sdxl_model_dir


@pytest.fixture(scope="module")
def pipe(sdxl_path: Path) -> StableDiffusionXLPipeline:
    loaded = load_pipeline(sdxl_path, "cpu", "float32", TINY_SDXL.family)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    return loaded


@pytest.fixture(scope="module")
def prior(pipe: StableDiffusionXLPipeline) -> PriorPreservation:
    # Class images from the SDXL base model itself, with fewer sampler steps.
    pngs = generate_class_images(
        pipe, replace(TINY_SDXL, inference_steps=3), "person", [0, 1], never
    )
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return PriorPreservation(images, class_prompt("person"))


@dataclass
class Trained:
    lora: bytes
    steps: list[Step]


@pytest.fixture(scope="module")
def trained(pipe: StableDiffusionXLPipeline, prior: PriorPreservation) -> Trained:
    """Prior preservation and a LoRA on the UNet and both text encoders."""
    steps: list[Step] = []
    before = base_state(pipe)
    lora = train(pipe, params(train_text_encoder=True), prior, lambda *s: steps.append(s))
    assert_pristine(pipe, before)
    return Trained(lora, steps)


# --- profiles, checkpoint, loading ------------------------------------------------------


def test_sdxl_profiles_are_data() -> None:
    assert (SDXL.family, SDXL.hub_id) == ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    assert SDXL.resolution == 1024 and SDXL.learning_rate == 1e-4 and SDXL.train_steps == 500
    # The low-memory preset: checkpointing, bf16 autocast, cached embeddings (text
    # encoders frozen); 8-bit Adam is available but would save ~70 MB here.
    assert SDXL.gradient_checkpointing and SDXL.mixed_precision == "bf16"
    assert not SDXL.train_text_encoder and not SDXL.use_8bit_adam and SDXL.prior_preservation
    assert TINY_SDXL.family == "sdxl" and TINY_SDXL.hub_id is None
    assert TINY_SDXL.resolution == 64 and TINY_SDXL.builder == "core.ml.tiny_sdxl"
    for profile in PROFILES.values():
        assert profile.family in FAMILIES
        assert (profile.hub_id is None) == (profile.builder is not None), profile.name


def test_tiny_sdxl_has_sdxl_wiring(sdxl_path: Path, pipe: StableDiffusionXLPipeline) -> None:
    assert tiny_sdxl.is_complete_checkpoint(sdxl_path)
    index = json.loads((sdxl_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert unet.cross_attention_dim == sum(widths) and widths[0] != widths[1]
    pooled = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == (
        MICRO_CONDITIONS * unet.addition_time_embed_dim + pooled
    )
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.model_max_length == 77
    # Loaded as every pipeline is: DPM-Solver++ and every model frozen, text_encoder_2 too.
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    for name, module in family_of(pipe).modules(pipe).items():
        assert not any(param.requires_grad for param in module.parameters()), name
    # Building again leaves the complete checkpoint alone.
    weights = sdxl_path / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny_sdxl.build_tiny_sdxl_checkpoint(sdxl_path) == sdxl_path
    assert weights.stat().st_mtime_ns == stamp


def test_prompt_encoding_matches_the_sdxl_pipeline(pipe: StableDiffusionXLPipeline) -> None:
    family = family_of(pipe)
    prompts = [PROMPT, class_prompt("person")]
    with torch.no_grad():
        ours = family.encode(pipe, family.tokenize(pipe, prompts))
        # diffusers annotates `prompt` as str; it takes a list like its __call__ does.
        encoded = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)  # type: ignore[arg-type]
        hidden, _, pooled, _ = encoded
    assert ours.pooled is not None
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


def test_missing_sdxl_checkpoint_names_path_and_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ml_pipeline, "_cached_snapshot", lambda _hub_id: None)
    with pytest.raises(CheckpointMissing) as missing:
        resolve_checkpoint(SDXL, tmp_path, None)
    assert str(tmp_path / "sdxl") in missing.value.detail
    assert "python -m core.ml.pipeline download sdxl" in missing.value.detail
    with pytest.raises(CheckpointMissing) as missing:
        resolve_checkpoint(TINY_SDXL, tmp_path, None)
    assert f"python -m core.ml.tiny_sdxl {tmp_path / 'tiny-sdxl'}" in missing.value.detail


def test_checkpoint_of_another_family_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(CheckpointMissing, match="StableDiffusionXLPipeline"):
        load_pipeline(tmp_path, "cpu", "float32", "sdxl")


def test_download_fetches_sdxl_safetensors_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    asked: dict[str, Any] = {}

    def fake_download(hub_id: str, **options: Any) -> str:
        asked.update(options, hub_id=hub_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert ml_pipeline.main(["download", "sdxl", "--to", str(tmp_path)]) == 0
    patterns = asked["allow_patterns"]
    assert asked["hub_id"] == SDXL.hub_id
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert f"{component}/config.json" in patterns
    assert {"tokenizer/*", "tokenizer_2/*", "scheduler/*.json"} <= set(patterns)
    weights = [p for p in patterns if not p.endswith((".json", "/*"))]
    assert len(weights) == 4 and all(p.endswith(".safetensors") for p in weights)


# --- training ------------------------------------------------------------------------------


def test_training_with_prior_preservation(
    pipe: StableDiffusionXLPipeline, trained: Trained
) -> None:
    assert [(step, total) for step, total, _ in trained.steps] == [
        (step, TRAIN_STEPS) for step in range(1, TRAIN_STEPS + 1)
    ]
    assert all(np.isfinite(loss) for _, _, loss in trained.steps)
    keys = load(trained.lora)
    assert {key.split(".")[0] for key in keys} == {"unet", *ENCODERS}
    plain = pngs(pipe, None, gen_params())
    assert pngs(pipe, trained.lora, gen_params()) != plain
    # Unloaded after the call: the base model draws what it drew before.
    assert pngs(pipe, None, gen_params()) == plain


def test_examples_carry_size_and_crop(pipe: StableDiffusionXLPipeline) -> None:
    views = encode_views(
        pipe, random_photos(1, seed=2), TINY_SDXL.resolution, TINY_SDXL.crop_jitter
    )
    generator = torch.Generator().manual_seed(0)
    micro = [sample_example(views, generator).time_ids for _ in range(16)]
    side = TINY_SDXL.resolution
    # The photo's own size, the window's corner in the (enlarged) view, the training size.
    assert all(m[:2] == (90, 120) and m[4:] == (side, side) for m in micro)
    corners = {m[2:4] for m in micro}
    assert (0, 0) in corners and len(corners) > 1
    slack = views.means[-1].shape[-1] - views.side  # enlarged view minus the window
    assert all(
        0 <= c <= slack * views.factor and c % views.factor == 0 for m in micro for c in m[2:4]
    )


def test_fp16_vae_encodes_in_fp32(pipe: StableDiffusionXLPipeline) -> None:
    """SDXL's VAE overflows in fp16 (force_upcast): latents are encoded in fp32 and
    the VAE is handed back in fp16."""
    vae = copy.deepcopy(pipe.vae).to(dtype=torch.float16)
    assert vae.config.force_upcast
    seen: list[torch.dtype] = []
    vae.encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
    fp16_pipe = cast(Any, SimpleNamespace(vae=vae))
    views = encode_views(fp16_pipe, random_photos(1, seed=2), TINY_SDXL.resolution, 0.0)
    expected = encode_views(pipe, random_photos(1, seed=2), TINY_SDXL.resolution, 0.0)
    assert seen == [torch.float32] and vae.dtype == torch.float16
    # The fp16-rounded weights, computed in fp32: close to the fp32 VAE's latents.
    torch.testing.assert_close(views.means[0], expected.means[0], rtol=1e-2, atol=1e-2)


def test_training_cancel_leaves_pipeline_unchanged(pipe: StableDiffusionXLPipeline) -> None:
    before = base_state(pipe)
    done: list[int] = []
    with pytest.raises(Canceled):
        train(
            pipe, params(train_text_encoder=True, gradient_checkpointing=True), None,
            lambda s, _t, _l: done.append(s), lambda: len(done) >= 2,
        )  # fmt: skip
    assert done == [1, 2]
    assert_pristine(pipe, before)


def test_resume_from_checkpoint_equals_uninterrupted_run(
    pipe: StableDiffusionXLPipeline, prior: PriorPreservation
) -> None:
    p = params(steps=5, train_text_encoder=True)
    straight: list[Step] = []
    whole = train(pipe, p, prior, lambda *s: straight.append(s))
    # The same run stopped after step 3, with a checkpoint every 2 steps: step 3 is lost.
    checkpoints: list[TrainState] = []
    done: list[int] = []
    with pytest.raises(Canceled):
        train(
            pipe, p, prior, lambda s, _t, _l: done.append(s), lambda: len(done) >= 3,
            on_checkpoint=checkpoints.append, checkpoint_every=2,
        )  # fmt: skip
    assert [c.step for c in checkpoints] == [2]
    assert {name.split(".")[0] for name in checkpoints[0].lora} == {"unet", *ENCODERS}
    state = TrainState.from_bytes(checkpoints[0].to_bytes())
    resumed: list[Step] = []
    lora = train(pipe, p, prior, lambda *s: resumed.append(s), resume=state)
    assert resumed == straight[2:]
    assert lora == whole


# --- LoRA interop ---------------------------------------------------------------------------


def test_atelier_lora_loads_in_stock_diffusers(
    pipe: StableDiffusionXLPipeline, sdxl_path: Path, trained: Trained, tmp_path: Path
) -> None:
    (tmp_path / "subject.safetensors").write_bytes(trained.lora)
    stock = stock_pipeline(sdxl_path)
    plain = stock_png(stock, gen_params())
    assert plain == pngs(pipe, None, gen_params())[0]
    stock.load_lora_weights(tmp_path, weight_name="subject.safetensors")
    assert set(stock.get_list_adapters()) == {"unet", *ENCODERS}
    # The same image as atelier draws with it: UNet and both encoders, alpha included.
    with_lora = stock_png(stock, gen_params())
    assert with_lora != plain
    assert with_lora == pngs(pipe, trained.lora, gen_params())[0]


def _random_lora_config(targets: list[str]) -> LoraConfig:
    # Non-zero B (peft starts it at zero) so the adapter changes the output; rank 2,
    # other targets than atelier's, as someone else's LoRA would have.
    return LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False)


def _stock_lora(stock: StableDiffusionXLPipeline, tmp_path: Path) -> bytes:
    """A LoRA made with plain peft on a plain pipeline, saved by diffusers' own writer."""
    from peft import inject_adapter_in_model

    layers: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):  # seeded, the session's RNG untouched
        torch.manual_seed(7)
        stock.unet.add_adapter(_random_lora_config(["to_q", "to_v"]))
        layers["unet_lora_layers"] = get_peft_model_state_dict(stock.unet)
        for name, encoder in family_of(stock).text_encoders(stock).items():
            inject_adapter_in_model(_random_lora_config(["q_proj"]), encoder)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
    layers = {key: convert_state_dict_to_diffusers(state) for key, state in layers.items()}
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, weight_name="stock.safetensors", **layers)
    return (tmp_path / "stock.safetensors").read_bytes()


def test_stock_diffusers_lora_loads_in_atelier(
    pipe: StableDiffusionXLPipeline, sdxl_path: Path, trained: Trained, tmp_path: Path
) -> None:
    stock = stock_pipeline(sdxl_path)
    lora = _stock_lora(stock, tmp_path)
    assert {key.split(".")[0] for key in load(lora)} == {"unet", *ENCODERS}
    expected = stock_png(stock, gen_params())  # the adapters are live in the stock pipeline
    assert expected != pngs(pipe, None, gen_params())[0]
    # Through the worker's LoRA cache, evicting a LoRA of other targets and ranks.
    cache = LoraCache(pipe, max_resident=1)
    pngs(pipe, trained.lora, gen_params(), cache)
    assert pngs(pipe, lora, gen_params(), cache) == [expected]
    cache.clear()


def test_lora_cache_copies_into_sdxl_slots(
    pipe: StableDiffusionXLPipeline, trained: Trained
) -> None:
    """Another LoRA of the same shapes is copied into the slot (UNet and both
    encoders' tensors) and draws what a fresh load draws."""
    generator = torch.Generator().manual_seed(5)
    other = {
        key: torch.randn(value.shape, generator=generator) * 0.3
        for key, value in load(trained.lora).items()
    }
    other_lora = LoraWeights.of(save(other))
    fresh = pngs(pipe, other_lora, gen_params())
    cache = LoraCache(pipe, max_resident=1)
    pngs(pipe, trained.lora, gen_params(), cache)
    assert pngs(pipe, other_lora, gen_params(), cache) == fresh
    assert cache.stats.copies == 1 and cache.stats.loads == 1
    cache.clear()


# --- generation -----------------------------------------------------------------------------


def test_four_images_reproducible_per_seed(pipe: StableDiffusionXLPipeline) -> None:
    first = pngs(pipe, None, gen_params(seed=11, num_images=4))
    assert len(set(first)) == 4
    assert pngs(pipe, None, gen_params(seed=11, num_images=4)) == first
    assert pngs(pipe, None, gen_params(seed=13)) == [first[2]]  # image i is seed + i alone
    # Negative prompt, sampler and size all reach the SDXL pipeline.
    assert pngs(pipe, None, gen_params(seed=11, negative_prompt="")) != first[:1]
    assert pngs(pipe, None, gen_params(seed=11, scheduler="euler_a")) != first[:1]
    wide = generate_images(pipe, None, gen_params(width=96, height=48), ignore, never)[0]
    assert Image.open(io.BytesIO(wide.png)).size == (96, 48)


def test_worker_runtime_serves_tiny_sdxl(sdxl_path: Path, tmp_path: Path) -> None:
    settings = Settings(
        profile=TINY_SDXL.name, models_dir=sdxl_path.parent, lora_disk_dir=tmp_path / "loras"
    )
    resident = resident_pipeline(settings, TINY_SDXL)
    assert isinstance(resident, StableDiffusionXLPipeline)
    assert resident_pipeline(settings, TINY_SDXL) is resident
    cache = resident_lora_cache(settings, resident, TINY_SDXL)
    assert cache.pipe is resident
