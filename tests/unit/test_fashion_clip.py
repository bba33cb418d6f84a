"""The fashion CLIP model package: profiles, the tiny checkpoint and its loader, the
heads, version state, base features and retrieval metrics (tiny profile, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from core.errors import CheckpointMissing, InvalidInput
from core.ml import clip_eval
from core.ml.fashion_clip.features import image_features, product_text, text_features
from core.ml.fashion_clip.model import (
    FashionClip,
    base_identity,
    load_base,
    load_version_state,
    save_version_state,
    tokenizer_for,
)
from core.ml.fashion_clip.profiles import (
    CLIP_PROFILES,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    TINY_CLIP,
    VIT_B_16,
    get_clip_profile,
)
from core.ml.fashion_clip.retrieval_metrics import (
    image_to_text,
    product_ranks,
    text_to_image,
)
from core.ml.fashion_clip.tiny import build_tiny_clip
from tests.unit.ml_helpers import random_photos

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Prada Silk midi dress: A relaxed fit. | Women > Clothing > Dresses", "Gucci loafers"]


def test_profiles_are_data_and_importing_them_loads_no_torch() -> None:
    assert get_clip_profile("vit-b-16").open_clip_arch == "ViT-B-16"
    assert VIT_B_16.embed_dim == 512 and VIT_B_16.image_size == 224
    assert "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in VIT_B_16.fetch_command
    assert set(CLIP_PROFILES) >= {"tiny", "vit-b-16"}
    with pytest.raises(InvalidInput, match="known profiles"):
        get_clip_profile("vit-huge")
    code = (
        "import sys; import core.ml.fashion_clip.profiles, core.ml.fashion_clip.features, "
        "core.ml.fashion_clip.retrieval_metrics; assert 'torch' not in sys.modules, 'torch'; "
        "assert 'open_clip' not in sys.modules, 'open_clip'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_product_text_is_the_export_caption_plus_the_category_path() -> None:
    path = ("Women", "Clothing", "Dresses")
    assert (
        product_text("Khaite", "Silk slip dress", "Cut from ivory silk.", path)
        == "Khaite Silk slip dress: Cut from ivory silk. | Women > Clothing > Dresses"
    )
    assert product_text("Khaite", "Belt", "Leather.", ()) == "Khaite Belt: Leather."


def test_tiny_checkpoint_builds_once_and_loads_through_the_real_loader(
    tiny_clip_dir: Path, tiny_clip: tuple[Any, Any], tmp_path: Path
) -> None:
    config = json.loads((tiny_clip_dir / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["embed_dim"] == TINY_CLIP.embed_dim
    assert config["preprocess_cfg"]["size"] == TINY_CLIP.image_size
    base, preprocess = tiny_clip
    assert isinstance(base, open_clip.CLIP) and not base.training
    assert not any(p.requires_grad for p in base.parameters())
    pixels = preprocess(random_photos(1)[0])
    assert pixels.shape == (3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    identity = base_identity(TINY_CLIP, tiny_clip_dir)
    assert identity.startswith("tiny:") and len(identity) == len("tiny:") + 16
    # Idempotent, and the weights are a pure function of the seed.
    mtime = (tiny_clip_dir / OPEN_CLIP_WEIGHTS).stat().st_mtime_ns
    assert build_tiny_clip(tiny_clip_dir) == tiny_clip_dir
    assert (tiny_clip_dir / OPEN_CLIP_WEIGHTS).stat().st_mtime_ns == mtime
    assert base_identity(TINY_CLIP, build_tiny_clip(tmp_path / "again")) == identity
    assert base_identity(TINY_CLIP, build_tiny_clip(tmp_path / "other", seed=1)) != identity


def test_a_missing_checkpoint_names_the_path_and_the_fetch_command(tmp_path: Path) -> None:
    missing = tmp_path / "clip-tiny"
    with pytest.raises(CheckpointMissing) as caught:
        load_base(TINY_CLIP, missing)
    assert str(missing) in caught.value.detail
    assert f"python -m core.ml.fashion_clip.tiny {missing}" in caught.value.detail
    half = tmp_path / "clip-vit-b-16"
    half.mkdir()
    (half / OPEN_CLIP_CONFIG).write_text("{}")
    with pytest.raises(CheckpointMissing) as caught:
        load_base(VIT_B_16, half)
    assert str(half / OPEN_CLIP_WEIGHTS) in caught.value.detail
    assert "huggingface-cli download laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in caught.value.detail
    assert caught.value.extra["command"].endswith(f"--local-dir {half}")


def test_fresh_heads_embed_exactly_as_the_base(tiny_clip: tuple[Any, Any]) -> None:
    base, preprocess = tiny_clip
    model = FashionClip(base)
    assert model.heads.bottleneck == TINY_CLIP.embed_dim // 4
    assert model.heads.logit_scale.item() == pytest.approx(base.logit_scale.item())
    photos = random_photos(3)
    tokenizer = tokenizer_for(TINY_CLIP)
    image_feats = image_features(base, preprocess, photos, batch_size=2)
    text_feats = text_features(base, tokenizer, TEXTS)
    assert image_feats.dtype == np.float32 and image_feats.shape == (3, TINY_CLIP.embed_dim)
    with torch.no_grad():
        pixels = torch.stack([preprocess(p) for p in photos])
        expected_images = base.encode_image(pixels, normalize=True)
        expected_texts = base.encode_text(tokenizer(TEXTS), normalize=True)
        torch.testing.assert_close(model.encode_images(pixels), expected_images)
        torch.testing.assert_close(model.encode_texts(tokenizer(TEXTS)), expected_texts)
        from_features = model.embed_image_features(torch.from_numpy(image_feats))
        torch.testing.assert_close(from_features, expected_images)
        torch.testing.assert_close(
            model.embed_text_features(torch.from_numpy(text_feats)), expected_texts
        )


def _perturbed(model: FashionClip, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def test_version_state_round_trips_exactly_and_leaves_the_base_alone(
    tiny_clip: tuple[Any, Any], tiny_clip_dir: Path
) -> None:
    base, preprocess = tiny_clip
    before = {k: v.clone() for k, v in base.state_dict().items()}
    version = FashionClip(base, unfreeze_image_blocks=1, unfreeze_text_blocks=1)
    _perturbed(version, seed=3)
    identity = base_identity(TINY_CLIP, tiny_clip_dir)
    state = save_version_state(version, identity)
    assert json.loads(json.dumps(state.config))["unfreeze_image_blocks"] == 1
    names = set(version.trainable_state())
    assert "base.visual.transformer.resblocks.1.attn.in_proj_weight" in names
    assert "base.transformer.resblocks.1.mlp.c_fc.weight" in names
    assert not any(".resblocks.0." in name for name in names)
    loaded_version = load_version_state(base, state.weights, state.config, identity)
    for name, tensor in version.trainable_state().items():
        assert torch.equal(loaded_version.trainable_state()[name], tensor), name
    pixels = torch.stack([preprocess(p) for p in random_photos(2)])
    with torch.no_grad():
        assert torch.equal(loaded_version.encode_images(pixels), version.encode_images(pixels))
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), f"base {name} changed"
    # Frozen tensors are shared with the base, not copied.
    assert version.base.visual.conv1.weight is base.visual.conv1.weight
    assert version.base.visual.transformer.resblocks[1].attn.in_proj_weight is not (
        base.visual.transformer.resblocks[1].attn.in_proj_weight
    )
    with pytest.raises(InvalidInput, match="trained on base"):
        load_version_state(base, state.weights, state.config, "tiny:0000000000000000")


def test_a_head_only_state_holds_heads_and_temperature_only(
    tiny_clip: tuple[Any, Any],
) -> None:
    base, _ = tiny_clip
    version = FashionClip(base)
    _perturbed(version, seed=4)
    state = save_version_state(version)
    assert all(name.startswith("heads.") for name in version.trainable_state())
    restored = load_version_state(base, state.weights, state.config)
    features = torch.randn(5, TINY_CLIP.embed_dim)
    with torch.no_grad():
        assert torch.equal(
            restored.embed_text_features(features), version.embed_text_features(features)
        )
    wrong = {**state.config, "unfreeze_text_blocks": 1}
    with pytest.raises(InvalidInput, match="does not match"):
        load_version_state(base, state.weights, wrong)


def test_retrieval_metrics_rank_products_by_their_best_image() -> None:
    # Texts of products a, b, c; images: a has two (the second matches its text), b one
    # (matching text c better), c one (matching its text).
    texts = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    text_products = ["a", "b", "c"]
    images = np.array(
        [[0.0, 0.6, 0.8], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]], dtype=np.float32
    )
    image_products = ["a", "a", "b", "c"]
    # text a: a's best image scores 1.0 -> rank 1. text b: a 0.6, b 0.6 (tie against),
    # c 0 -> rank 2. text c: c 1.0 -> rank 1.
    ranks = product_ranks(texts, text_products, images, image_products)
    assert ranks.tolist() == [1, 2, 1]
    t2i = text_to_image(texts, text_products, images, image_products, ks=(1, 2))
    assert t2i.recall == {1: pytest.approx(2 / 3), 2: 1.0}
    assert t2i.mrr == pytest.approx((1 + 0.5 + 1) / 3)
    # image -> text: a0 ranks c (0.8) > b (0.6) > a (0) -> 3; a1 -> 1; b -> 2 (c above);
    # c -> 1.
    i2t = image_to_text(images, image_products, texts, text_products, ks=(1,))
    assert i2t.recall[1] == pytest.approx(2 / 4)
    assert i2t.mrr == pytest.approx((1 / 3 + 1 + 1 / 2 + 1) / 4)
    assert t2i.as_dict()["R@1"] == pytest.approx(2 / 3)


def test_constant_embeddings_score_last_not_first() -> None:
    same = np.ones((4, 2), dtype=np.float32)
    assert product_ranks(same, list("abcd"), same, list("abcd")).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="at least one row"):
        product_ranks(same[:1], ["z"], same, list("abcd"))


def test_image_features_of_an_export_read_its_files_lazily(
    tiny_clip: tuple[Any, Any], tmp_path: Path
) -> None:
    base, preprocess = tiny_clip
    photos = random_photos(5, seed=2)
    lines = []
    for index, photo in enumerate(photos):
        product = f"p{index % 2}"
        (tmp_path / product).mkdir(exist_ok=True)
        photo.save(tmp_path / product / f"{index}.png")
        text = f"Designer {product}: a product."
        pair = {"image": f"{product}/{index}.png", "text": text, "product_id": product}
        lines.append(json.dumps({**pair, "sha256": "0" * 64}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = clip_eval.pairs_from_export(tmp_path)
    assert pairs.text_products == ["p0", "p1"] and pairs.image_products == ["p0", "p1"] * 2 + ["p0"]
    assert not isinstance(pairs.images, list)  # opened on access, not held
    feats = image_features(base, preprocess, pairs.images, batch_size=2)
    with torch.no_grad():
        pixels = torch.stack([preprocess(p) for p in photos])
        expected = base.encode_image(pixels).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
