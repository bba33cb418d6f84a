"""Generation options and the LoRA cache on the tiny checkpoint (real diffusers/peft)."""

from __future__ import annotations

import gc
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save

from core.errors import InvalidInput
from core.jobs import specs
from core.ml import tiny
from core.ml.generate import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    GenerateParams,
    generate_images,
    instance_prompt,
    subject_prompt,
)
from core.ml.lora_cache import (
    SLOT_PREFIX,
    LoraCache,
    LoraNotCached,
    LoraWeights,
    SwapMode,
    parse_lora,
)
from core.ml.lora_weights import state_dict_nbytes
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.ml.resident import forget_resident_loras, resident_lora_cache
from core.ml.train import TrainParams, train_dreambooth_lora
from core.settings import Settings
from tests.unit.ml_helpers import ignore, never

TINY = get_profile("tiny")
StateDict = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("gen-models") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> StableDiffusionPipeline:
    return load_pipeline(tiny_path, "cpu", "float32")


@pytest.fixture(scope="module")
def pristine(tiny_path: Path) -> StableDiffusionPipeline:
    """A second pipeline that never sees a LoRA."""
    return load_pipeline(tiny_path, "cpu", "float32")


@pytest.fixture(autouse=True)
def no_adapters_left(pipe: StableDiffusionPipeline) -> Iterator[None]:
    yield
    if pipe.get_list_adapters():
        pipe.unload_lora_weights()


def lora_template(pipe: StableDiffusionPipeline, rank: int = TINY.lora_rank) -> StateDict:
    """Keys and shapes of a real tiny LoRA: the profile's peft config on the UNet,
    exported as training exports it (diffusers keys under ``unet.``)."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TINY.lora_target_modules))
    pipe.unet.add_adapter(config, adapter_name="template")
    try:
        peft_state = get_peft_model_state_dict(pipe.unet, adapter_name="template")
        return {
            f"unet.{key}": value.detach().clone()
            for key, value in convert_state_dict_to_diffusers(peft_state).items()
        }
    finally:
        pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def template(pipe: StableDiffusionPipeline) -> StateDict:
    return lora_template(pipe)


def random_lora(template: StateDict, seed: int, scale: float = 0.3) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * scale for k, v in template.items()}
    return LoraWeights.of(save(state))


@pytest.fixture(scope="module")
def loras(template: StateDict) -> list[LoraWeights]:
    return [random_lora(template, seed) for seed in range(6)]


def params(
    seed: int = 5,
    num_images: int = 1,
    scheduler: str = DEFAULT_SCHEDULER,
    width: int = TINY.resolution,
    height: int = TINY.resolution,
    negative_prompt: str = "",
    guidance_scale: float = TINY.guidance_scale,
) -> GenerateParams:
    return GenerateParams(
        prompt=subject_prompt("sks", "person", "in a wizard robe"),
        num_images=num_images,
        seed=seed,
        steps=4,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
    )


def pngs(
    pipe: StableDiffusionPipeline,
    lora: LoraWeights | bytes | None,
    p: GenerateParams,
    cache: LoraCache | None = None,
) -> list[bytes]:
    images = generate_images(pipe, lora, p, ignore, never, cache=cache)
    return [image.png for image in images]


def tuner_layers(pipe: StableDiffusionPipeline) -> list[BaseTunerLayer]:
    return [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]


def adapters(pipe: StableDiffusionPipeline) -> list[str]:
    return pipe.get_list_adapters().get("unet", [])


def unet_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """The UNet's prediction for a fixed input: a fingerprint of the active weights."""
    generator = torch.Generator().manual_seed(1)
    side = TINY.resolution // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def fresh_probe(pipe: StableDiffusionPipeline, lora: LoraWeights) -> torch.Tensor:
    """The probe with ``lora`` loaded the stock way into a pipeline without adapters."""
    assert not adapters(pipe) and lora.data is not None
    pipe.load_lora_weights(parse_lora(lora.data), adapter_name="fresh")
    try:
        return unet_probe(pipe)
    finally:
        pipe.unload_lora_weights()


# --- generation options -----------------------------------------------------------------


def test_scheduler_names_match_the_api() -> None:
    assert set(SCHEDULERS) == set(specs.SCHEDULERS)
    assert DEFAULT_SCHEDULER == specs.DEFAULT_SCHEDULER == "dpmpp_2m"


def test_each_scheduler_is_reproducible_and_they_differ(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    original = pipe.scheduler
    unet = pipe.unet
    cache = LoraCache(pipe, max_resident=2)
    outputs = {}
    for name in SCHEDULERS:
        first = pngs(pipe, loras[0], params(scheduler=name), cache)
        assert pngs(pipe, loras[0], params(scheduler=name), cache) == first, name
        outputs[name] = first[0]
    assert len(set(outputs.values())) == len(SCHEDULERS)
    # Swapped per call, never reloaded: the same modules, the original sampler back.
    assert pipe.scheduler is original and pipe.unet is unet
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_schedulers_keep_the_checkpoint_schedule(pipe: StableDiffusionPipeline) -> None:
    from core.ml.generate import make_scheduler

    base: Any = pipe.scheduler.config
    for name in SCHEDULERS:
        built: Any = make_scheduler(name, base)
        config = built.config
        for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
            assert config[key] == base[key], (name, key)
    pndm: Any = make_scheduler("pndm", base)
    assert pndm.config.skip_prk_steps is True


def test_unknown_scheduler_is_refused(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(InvalidInput) as refused:
        pngs(pipe, None, params(scheduler="karras_magic"))
    assert refused.value.extra == {"field": "scheduler"}


@pytest.mark.parametrize(("width", "height"), [(96, 64), (64, 128)])
def test_size_is_honoured(pipe: StableDiffusionPipeline, width: int, height: int) -> None:
    images = generate_images(pipe, None, params(width=width, height=height), ignore, never)
    decoded = Image.open(io.BytesIO(images[0].png))
    assert decoded.size == (width, height)
    assert (images[0].width, images[0].height) == (width, height)


def test_negative_prompt_and_guidance_change_the_image(pipe: StableDiffusionPipeline) -> None:
    base = pngs(pipe, None, params())
    assert pngs(pipe, None, params(negative_prompt="blurry, low quality")) != base
    assert pngs(pipe, None, params(guidance_scale=1.5)) != base


def test_same_seed_lora_and_params_give_the_same_png_on_every_path(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    p = params(scheduler="euler_a")
    two = pngs(pipe, loras[0], params(num_images=2, scheduler="euler_a"))  # no cache
    one_shot = two[:1]
    cache = LoraCache(pipe, max_resident=2)
    assert pngs(pipe, loras[0], p, cache) == one_shot  # loaded into a new slot
    assert pngs(pipe, loras[0], p, cache) == one_shot  # resident
    cache.activate(loras[1])
    cache.activate(loras[2])  # copied over the least recently used slot
    assert cache.resident() == [loras[1].sha256, loras[2].sha256]
    assert pngs(pipe, loras[0], p, cache) == one_shot  # copied back from host RAM
    cache.forget_resident()
    assert pngs(pipe, loras[0], p, cache) == one_shot  # reloaded from host RAM
    assert cache.stats.parsed == 3
    # Image i alone from seed + i.
    assert pngs(pipe, loras[0], params(seed=6, scheduler="euler_a"), cache) == two[1:]
    assert two[0] != two[1]


def test_lora_raw_bytes_are_accepted(pipe: StableDiffusionPipeline, template: StateDict) -> None:
    lora = random_lora(template, 41)
    assert lora.data is not None
    assert pngs(pipe, lora.data, params()) == pngs(pipe, lora, params())


# --- the cache ----------------------------------------------------------------------------


def test_no_lora_generation_equals_a_pipeline_that_never_saw_one(
    pipe: StableDiffusionPipeline, pristine: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    p = params()
    reference = pngs(pristine, None, p)
    cache = LoraCache(pipe, max_resident=3)
    with_lora = pngs(pipe, loras[0], p, cache)
    pngs(pipe, loras[1], p, cache)
    assert len(adapters(pipe)) == 2 and with_lora != reference
    assert pngs(pipe, None, p, cache) == reference
    # Disabled only for that call: the adapters work again afterwards.
    assert not any(layer.disable_adapters for layer in tuner_layers(pipe))
    assert pngs(pipe, loras[0], p, cache) == with_lora


def test_resident_tier_evicts_least_recently_used(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    a, b, c, d = (lora.sha256 for lora in loras[:4])
    cache = LoraCache(pipe, max_resident=2)
    cache.activate(loras[0])
    cache.activate(loras[1])
    cache.activate(loras[0])  # a is now the most recently used
    assert cache.resident() == [b, a]
    slot_of_b = cache.adapter_name(b)
    cache.activate(loras[2])  # evicts b, not a
    assert cache.resident() == [a, c]
    assert cache.adapter_name(c) == slot_of_b
    cache.activate(loras[3])  # evicts a
    assert cache.resident() == [c, d]
    assert sorted(adapters(pipe)) == [f"{cache.slot_prefix}0", f"{cache.slot_prefix}1"]
    assert cache.slot_prefix.startswith(SLOT_PREFIX)
    assert pipe.get_active_adapters() == [cache.adapter_name(d)]
    assert cache.stats.resident_hits == 1 and cache.stats.resident_evictions == 2
    assert cache.stats.loads == 2 and cache.stats.copies == 2


def test_fast_switch_matches_stock_set_adapters(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    cache = LoraCache(pipe, max_resident=3)
    slots = [cache.activate(lora) for lora in loras[:3]]
    # Loaded and switched for inference only: nothing asks for gradients.
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    for lora, slot in zip(loras[:3], slots, strict=True):
        assert cache.activate(lora) == slot
        assert all(layer.active_adapters == [slot] for layer in tuner_layers(pipe))
        ours = unet_probe(pipe)
        pipe.set_adapters([slot])
        assert torch.equal(unet_probe(pipe), ours)
    assert cache._switch.direct  # the fast path was taken, not peft's fallback


@pytest.mark.parametrize("swap", ["load", "hotswap"])
def test_other_swap_modes_give_the_same_weights(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights], swap: SwapMode
) -> None:
    expected = [fresh_probe(pipe, lora) for lora in loras[:3]]
    cache = LoraCache(pipe, max_resident=1, swap=swap, target_rank=TINY.lora_rank)
    for _ in range(2):
        for lora, want in zip(loras[:3], expected, strict=True):
            cache.activate(lora)
            assert torch.equal(unet_probe(pipe), want)
    assert adapters(pipe) == [f"{cache.slot_prefix}0"]
    if swap == "hotswap":
        # Swapping in place must not overwrite the host-tier copy of the first LoRA.
        assert cache.stats.hotswaps == 5 and cache.stats.loads == 1
    else:
        assert cache.stats.loads == 6 and cache.stats.copies == 0


def test_copy_falls_back_to_a_load_for_another_rank(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    other_rank = random_lora(lora_template(pipe, rank=8), 77)
    expected = fresh_probe(pipe, other_rank)
    cache = LoraCache(pipe, max_resident=1)
    cache.activate(loras[0])
    cache.activate(other_rank)
    assert torch.equal(unet_probe(pipe), expected)
    assert cache.stats.copies == 0 and cache.stats.loads == 2
    assert adapters(pipe) == [f"{cache.slot_prefix}0"]


def text_encoder_template(pipe: StableDiffusionPipeline, unet_part: StateDict) -> StateDict:
    """A LoRA on the UNet and on the CLIP text encoder's attention projections, keyed
    as training exports one when it trains the text encoder too."""
    from peft import inject_adapter_in_model

    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    inject_adapter_in_model(config, pipe.text_encoder, adapter_name="te")
    try:
        peft_state = get_peft_model_state_dict(pipe.text_encoder, adapter_name="te")
        text = convert_state_dict_to_diffusers(peft_state)
    finally:
        pipe.unload_lora_weights()
    return {**unet_part, **{f"text_encoder.{k}": v.detach().clone() for k, v in text.items()}}


def text_probe(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer("a photo of sks person", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_loras_are_copied_too(
    pipe: StableDiffusionPipeline, template: StateDict
) -> None:
    both = text_encoder_template(pipe, template)
    first, second = (random_lora(both, seed) for seed in (51, 52))
    expected = []
    for lora in (first, second):
        assert lora.data is not None
        pipe.load_lora_weights(parse_lora(lora.data), adapter_name="fresh")
        expected.append((text_probe(pipe), unet_probe(pipe)))
        pipe.unload_lora_weights()
    cache = LoraCache(pipe, max_resident=1)
    for lora, (text, unet) in [*zip((first, second), expected, strict=True), (first, expected[0])]:
        cache.activate(lora)
        assert torch.equal(text_probe(pipe), text) and torch.equal(unet_probe(pipe), unet)
    assert cache.stats.loads == 1 and cache.stats.copies == 2
    assert not torch.equal(expected[0][0], expected[1][0])


def test_host_tier_keeps_a_byte_budget(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights], template: StateDict
) -> None:
    size = state_dict_nbytes(template)
    cache = LoraCache(pipe, max_resident=1, max_host_bytes=int(2.5 * size))
    for lora in loras[:3]:
        cache.activate(lora)
    assert cache.host() == [loras[1].sha256, loras[2].sha256]
    assert cache.host_bytes == 2 * size <= cache.max_host_bytes
    assert cache.stats.host_evictions == 1 and cache.stats.parsed == 3
    # In host RAM: not parsed again, and the bytes are not needed.
    cache.activate(LoraWeights(loras[1].sha256, None))
    assert cache.stats.host_hits == 1 and cache.stats.parsed == 3
    assert cache.host() == [loras[2].sha256, loras[1].sha256]
    with pytest.raises(LoraNotCached):
        cache.activate(LoraWeights(loras[0].sha256, None))
    cache.activate(loras[0])  # evicted earlier: parsed again
    assert cache.stats.parsed == 4
    assert cache.host() == [loras[1].sha256, loras[0].sha256]
    # A LoRA larger than the whole budget is used but not kept.
    small = LoraCache(pipe, max_resident=1, max_host_bytes=size - 1)
    small.activate(loras[0])
    assert small.host() == [] and small.host_bytes == 0


def test_bad_lora_bytes_are_refused(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    cache = LoraCache(pipe)
    with pytest.raises(InvalidInput, match="sha256"):
        cache.activate(LoraWeights(loras[1].sha256, loras[0].data))
    with pytest.raises(InvalidInput, match="safetensors"):
        cache.activate(LoraWeights.of(b"not a safetensors file"))
    assert cache.resident() == [] and cache.host() == []


def test_a_lora_for_another_model_is_refused_and_not_kept(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights], template: StateDict
) -> None:
    # The same keys with other widths: what a LoRA trained on another base looks like.
    wrong = {
        key: torch.zeros(value.shape[0] + 8, value.shape[1]) for key, value in template.items()
    }
    cache = LoraCache(pipe, max_resident=2)
    cache.activate(loras[0])
    with pytest.raises(InvalidInput, match="does not fit"):
        cache.activate(LoraWeights.of(save(wrong)))
    assert cache.host() == [loras[0].sha256] and cache.resident() == [loras[0].sha256]
    assert adapters(pipe) == [cache.adapter_name(loras[0].sha256)]
    cache.activate(loras[1])
    assert len(cache.resident()) == 2


def test_cache_recovers_when_training_wipes_its_adapters(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    p = params()
    cache = LoraCache(pipe, max_resident=2)
    first = pngs(pipe, loras[0], p, cache)
    second = pngs(pipe, loras[1], p, cache)
    train = TrainParams.from_profile(TINY, steps=2)
    photos = [Image.fromarray(np.full((64, 64, 3), 90 + i, np.uint8)) for i in range(2)]
    # Training ends with unload_lora_weights(): our adapters are gone, unannounced.
    train_dreambooth_lora(
        pipe, photos, instance_prompt("sks", "person"), train, lambda *_: None, never
    )
    assert adapters(pipe) == [] and not tuner_layers(pipe)
    assert pngs(pipe, loras[0], p, cache) == first
    assert pngs(pipe, loras[1], p, cache) == second
    assert cache.stats.wipes_detected == 2 and cache.stats.parsed == 2  # from host RAM


def test_forget_resident_leaves_a_pristine_unet(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    cache = LoraCache(pipe, max_resident=2)
    expected = pngs(pipe, loras[0], params(), cache)
    pngs(pipe, None, params(), cache)
    cache.forget_resident()
    assert cache.resident() == [] and adapters(pipe) == [] and not tuner_layers(pipe)
    after = pipe.unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert pngs(pipe, loras[0], params(), cache) == expected
    assert cache.stats.parsed == 1


def test_training_beside_resident_adapters_gives_the_same_lora(
    pipe: StableDiffusionPipeline, pristine: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    """Resident (and just disabled) adapters must not leak into a training run."""
    train = TrainParams.from_profile(TINY, steps=2)
    photos = [Image.fromarray(np.full((64, 64, 3), 120, np.uint8))]
    prompt = instance_prompt("sks", "person")
    alone = train_dreambooth_lora(pristine, photos, prompt, train, lambda *_: None, never)
    cache = LoraCache(pipe, max_resident=2)
    pngs(pipe, loras[0], params(), cache)
    pngs(pipe, None, params(), cache)  # last call ran with adapters disabled
    beside = train_dreambooth_lora(pipe, photos, prompt, train, lambda *_: None, never)
    assert beside == alone


def test_a_one_shot_generation_leaves_the_resident_cache_alone(
    pipe: StableDiffusionPipeline, loras: list[LoraWeights]
) -> None:
    cache = LoraCache(pipe, max_resident=2)
    cache.activate(loras[0])
    probe = unet_probe(pipe)
    pngs(pipe, loras[1], params())  # no cache given: its own adapter, removed after
    assert adapters(pipe) == [cache.adapter_name(loras[0].sha256)]
    cache.activate(loras[0])
    assert torch.equal(unet_probe(pipe), probe)
    assert cache.stats.resident_hits == 1 and cache.stats.wipes_detected == 0


def test_a_cache_serves_one_pipeline(
    pipe: StableDiffusionPipeline, pristine: StableDiffusionPipeline
) -> None:
    with pytest.raises(ValueError, match="another pipeline"):
        pngs(pristine, None, params(), LoraCache(pipe))


def test_runtime_keeps_one_cache_per_pipeline(
    pipe: StableDiffusionPipeline,
    pristine: StableDiffusionPipeline,
    loras: list[LoraWeights],
    tmp_path: Path,
) -> None:
    settings = Settings(lora_max_resident=3, lora_disk_dir=tmp_path)
    cache = resident_lora_cache(settings, pipe, TINY)
    assert resident_lora_cache(settings, pipe, TINY) is cache
    assert resident_lora_cache(settings, pristine, TINY) is not cache
    assert cache.max_resident == 3
    cache.activate(loras[0])
    forget_resident_loras(pipe)
    assert cache.resident() == [] and adapters(pipe) == []
    cache.clear()


# --- memory over many users -----------------------------------------------------------------

# RSS may move a little without any leak: the allocator keeps freed pages, and
# arenas grow in steps. Measured here it did not move at all over 1,000 switches.
# A leaked LoRA per switch would add 500 x 92 KB = 45 MB between the two readings;
# 8 MiB still catches a leak of ~17 KB (a fifth of a LoRA) per switch.
RSS_SLACK = 8 * 1024 * 1024


def _rss_after_gc() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _check_bounded(pipe: StableDiffusionPipeline, cache: LoraCache, max_resident: int) -> None:
    assert len(adapters(pipe)) <= max_resident
    for layer in tuner_layers(pipe):
        for weights in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})):
            assert len(weights) <= max_resident
    assert cache.host_bytes <= cache.max_host_bytes


def _run_users(
    pipe: StableDiffusionPipeline, cache: LoraCache, template: StateDict, n: int
) -> list[int]:
    """``n`` distinct users' LoRAs through the cache in turn; RSS after each half."""
    readings = []
    seeds = itertools.count(10_000)
    for _half in range(2):
        for _ in range(n // 2):
            cache.activate(random_lora(template, next(seeds)))
        _check_bounded(pipe, cache, cache.max_resident)
        readings.append(_rss_after_gc())
    return readings


def test_memory_stays_flat_over_1000_users(
    pipe: StableDiffusionPipeline, template: StateDict
) -> None:
    size = state_dict_nbytes(template)
    cache = LoraCache(pipe, max_resident=2, max_host_bytes=3 * size)
    first, second = _run_users(pipe, cache, template, 1000)
    assert cache.stats.parsed == 1000 and cache.stats.loads == 2
    assert len(cache.host()) == 3 and len(cache.resident()) == 2
    assert second - first <= RSS_SLACK, (first, second)


def test_memory_stays_flat_when_adapters_are_deleted_and_loaded(
    pipe: StableDiffusionPipeline,
) -> None:
    """The path peft/diffusers users report leaks on: delete_adapters + load_lora_weights
    for every user. Rank-64 LoRAs (1.5 MB each) so that a leak shows in 100 cycles."""
    big = lora_template(pipe, rank=64)
    cache = LoraCache(pipe, max_resident=2, max_host_bytes=3 * state_dict_nbytes(big), swap="load")
    _run_users(pipe, cache, big, 20)  # warm-up: allocator pools, peft's first slots
    first, second = _run_users(pipe, cache, big, 120)
    assert cache.stats.loads == 140
    assert second - first <= RSS_SLACK, (first, second)
