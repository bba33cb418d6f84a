"""Grounding's token budget, garment regions and candidate reranking (no model needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from core.shop.grounding import TEXT_ENCODER_TOKENS, GroundingProduct, enrich_prompt
from core.shop.regions import REGION_BANDS, REGIONS, WHOLE, region_box, region_crops
from core.shop.rerank import RerankWeights, score_candidates


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word, plus start and end."""
    return len(text.split()) + 2


def product(name: str, designer: str = "Valentino", score: float = 0.5) -> GroundingProduct:
    return GroundingProduct("p", designer, name, score)


def test_descriptor_reads_as_a_garment_by_its_maker() -> None:
    assert product("Red  Silk Dress").descriptor == "red silk dress by Valentino"
    assert product("Scarf", designer="").descriptor == "scarf"


def test_descriptors_are_added_best_first_while_they_fit() -> None:
    grounded = enrich_prompt("a wizard", [product("Black Cape"), product("Tall Hat")], words)
    assert grounded.prompt == "a wizard, wearing black cape by Valentino and tall hat by Valentino"
    assert [p.name for p in grounded.used] == ["Black Cape", "Tall Hat"]
    assert grounded.tokens == words(grounded.prompt)


def test_the_prompt_never_goes_over_the_text_encoder_limit() -> None:
    prompt = " ".join(["word"] * 60)  # 62 tokens with start and end
    long_name = " ".join(["long"] * 20)
    products = [product(long_name), product("Boots"), product("Coat")]
    grounded = enrich_prompt(prompt, products, words)
    assert grounded.tokens <= TEXT_ENCODER_TOKENS
    # The long descriptor does not fit; the short ones after it still do.
    assert [p.name for p in grounded.used] == ["Boots", "Coat"]
    assert grounded.prompt.startswith(prompt)


def test_a_prompt_already_too_long_is_left_as_it_is() -> None:
    prompt = " ".join(["word"] * 90)
    grounded = enrich_prompt(prompt, [product("Boots")], words)
    assert grounded.prompt == prompt and grounded.used == []


def test_regions_cover_the_image_top_to_bottom_with_overlaps() -> None:
    assert region_box(WHOLE, 300, 600) == (0, 0, 300, 600)
    bands = [region_box(name, 300, 600) for name in REGION_BANDS]
    assert bands[0][1] < bands[1][1] < bands[2][1]
    assert bands[-1][3] == 600
    for upper, lower in itertools.pairwise(bands):
        assert lower[1] < upper[3], "neighbouring regions overlap"


def test_region_crops_are_padded_squares_of_the_right_part() -> None:
    image = Image.new("RGB", (100, 200), (255, 255, 255))
    image.paste((200, 0, 0), (0, 180, 100, 200))  # red shoes at the bottom
    crops = region_crops(image, 64)
    assert list(crops) == list(REGIONS)
    assert all(crop.size == (64, 64) for crop in crops.values())
    red = [
        np.asarray(crops[name])[..., 0].astype(int) - np.asarray(crops[name])[..., 1]
        for name in REGIONS
    ]
    reds = dict(zip(REGIONS, (int((r > 100).sum()) for r in red), strict=True))
    assert reds["upper"] == 0 and reds["feet"] > reds["whole"] > 0


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_rerank_orders_by_the_weighted_sum_and_keeps_ties_in_order() -> None:
    images = unit([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    prompt = unit([[1, 0, 0]])[0]
    photos = unit([[0, 1, 0]])
    catalog = np.array([0.0, 0.0, 0.0], dtype=np.float32)
    scores = score_candidates(images, prompt, catalog, photos, RerankWeights(1, 1, 0))
    assert [s.index for s in scores] == [0, 2, 1]
    assert [s.rank for s in scores] == [0, 1, 2]
    likeness_first = score_candidates(images, prompt, catalog, photos, RerankWeights(0, 0, 1))
    assert likeness_first[0].index == 1
    assert likeness_first[0].likeness == pytest.approx(1.0)


def test_catalog_match_can_decide() -> None:
    images = unit([[1, 0], [1, 0]])
    scores = score_candidates(
        images, unit([[1, 0]])[0], np.array([0.1, 0.9]), np.zeros((0, 2)), RerankWeights()
    )
    assert scores[0].index == 1 and scores[0].catalog == pytest.approx(0.9)
    assert scores[0].as_dict()["candidates_rank"] == 0
