"""core.ml.evaluation and its CLI: the metric math exactly, the models on random weights.

Random weights make the metric values meaningless, but not the properties checked
here: an image against itself has cosine 1, a set against itself has FID 0, a
saved checkpoint loads back into the same embeddings.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core.errors import InvalidInput
from core.ml import evaluate as cli
from core.ml.eval_models import MetricModels, MetricWeightsMissing, _read_state_dict
from core.ml.evaluation import (
    PAPER_SD,
    RANDOM_WEIGHTS_WARNING,
    NamedImage,
    clean_prompt,
    evaluate,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    load_images,
    read_prompts,
)

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo" / "sample_subject"
CLIP_MODEL = "ViT-B-32"  # the small CLIP, for speed; the default is ViT-L-14


@pytest.fixture(scope="module")
def models() -> MetricModels:
    torch.set_num_threads(2)
    return MetricModels(clip_model=CLIP_MODEL, random_weights=True, seed=0)


@pytest.fixture(scope="module")
def demo() -> list[NamedImage]:
    return load_images(DEMO_DIR)


def noise_images(n: int, seed: int = 0, side: int = 96) -> list[NamedImage]:
    rng = np.random.default_rng(seed)
    return [
        NamedImage(
            f"noise{i}.png", Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        )
        for i in range(n)
    ]


def flat_images(n: int, side: int = 96) -> list[NamedImage]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    return [
        NamedImage(f"flat{i}.png", Image.new("RGB", (side, side), colours[i % 6])) for i in range(n)
    ]


# --- Fréchet distance: exact values ------------------------------------------------


def test_frechet_distance_1d_closed_form() -> None:
    # N(1, 2^2) vs N(3, 3^2): (1 - 3)^2 + (2 - 3)^2 = 5
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == (pytest.approx(5.0, abs=1e-12))


def test_frechet_distance_2d_non_commuting_covariances() -> None:
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    s2 = np.array([[1.0, 0.0], [0.0, 4.0]])
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    # For 2x2 matrices Tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    # = sqrt(10 + 2 sqrt(12)); so the distance is 5 + 4 + 5 - 2 sqrt(10 + 2 sqrt(12)).
    expected = 14.0 - 2.0 * math.sqrt(10.0 + 2.0 * math.sqrt(12.0))
    assert expected == pytest.approx(5.7712204, abs=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("n1", "n2", "dim"), [(6, 9, 20), (40, 30, 5)])
def test_feature_route_matches_covariance_route(n1: int, n2: int, dim: int) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n1, dim))
    b = rng.normal(loc=0.5, scale=2.0, size=(n2, dim)) @ rng.normal(size=(dim, dim))
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance_of_features(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_of_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_samples_approaches_the_gaussians_distance() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal(1.0, 2.0, size=(20000, 2))
    # per dimension (0 - 1)^2 + (1 - 2)^2 = 2, two dimensions
    assert frechet_distance_of_features(a, b) == pytest.approx(4.0, rel=0.03)


# --- Prompts -----------------------------------------------------------------------


def test_clean_prompt_replaces_the_subject_token_by_the_class_noun() -> None:
    assert (
        clean_prompt("a photo of sks woman, in a robe", "sks", "woman")
        == "a photo of woman, in a robe"
    )
    assert clean_prompt("sks at the beach", "sks", "woman") == "woman at the beach"
    assert clean_prompt("sksx and sks", "sks", "man") == "sksx and man"
    assert clean_prompt("a photo of sks woman", None, "woman") == "a photo of sks woman"


def test_read_prompts(tmp_path: Path) -> None:
    names = ["a.png", "b.png"]
    assert read_prompts("a red hat", names) == ["a red hat", "a red hat"]
    lines = tmp_path / "prompts.txt"
    lines.write_text("one\n\ntwo\n")
    assert read_prompts(str(lines), names) == ["one", "two"]
    mapping = tmp_path / "prompts.json"
    mapping.write_text(json.dumps({"b.png": "bee", "a.png": "ay"}))
    assert read_prompts(str(mapping), names) == ["ay", "bee"]
    three = tmp_path / "three.txt"
    three.write_text("x\ny\nz\n")
    with pytest.raises(InvalidInput, match="3 prompts for 2"):
        read_prompts(str(three), names)
    mapping.write_text(json.dumps({"a.png": "ay"}))
    with pytest.raises(InvalidInput, match=r"no prompt for b\.png"):
        read_prompts(str(mapping), names)


# --- The models on random weights --------------------------------------------------


def test_an_image_against_itself_scores_one(models: MetricModels, demo: list[NamedImage]) -> None:
    one = demo[:1]
    copy = [NamedImage("copy.png", one[0].image.copy())]  # a separate set: embedded again
    report = evaluate(models, one, copy, metrics=("dino", "clip_i"))
    assert report.value("dino") == pytest.approx(1.0, abs=1e-5)
    assert report.value("clip_i") == pytest.approx(1.0, abs=1e-5)
    assert report.random_weights and report.warning == RANDOM_WEIGHTS_WARNING
    # a different photo of the subject is not the same embedding
    other = evaluate(models, demo[1:2], one, metrics=("dino",))
    assert other.value("dino") is not None and other.value("dino") < 1.0 - 1e-4


def test_clip_t_is_a_cosine_per_image(models: MetricModels, demo: list[NamedImage]) -> None:
    prompts = ["a photo of woman", "a photo of a dog"]
    report = evaluate(models, demo[:2], demo, prompts=prompts, metrics=("clip_t",))
    clip = models.clip()
    img, txt = clip.embed_images([d.image for d in demo[:2]]), clip.embed_texts(prompts)
    expected = torch.nn.functional.cosine_similarity(img.double(), txt.double()).mean().item()
    assert report.value("clip_t") == pytest.approx(expected, abs=1e-6)


def test_fid_of_a_set_against_itself_and_a_different_set(models: MetricModels) -> None:
    noise, flat = noise_images(4), flat_images(4)
    report = evaluate(models, noise, flat, metrics=("fid",))
    fid = next(m for m in report.metrics if m.name == "fid")
    assert (fid.n_generated, fid.n_reference) == (4, 4)
    assert fid.note is not None and "n < 50" in fid.note
    feats = models.inception().embed([n.image for n in noise]).numpy()
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    scale = float(feats.astype(np.float64).var(axis=0, ddof=1).sum())  # Tr(sigma)
    assert scale > 1e-3  # the random weights keep the features alive
    assert abs(frechet_distance_of_features(feats, feats)) < 1e-9 * scale
    # the same set passed twice is embedded once and scores 0 through the report too
    assert abs(evaluate(models, noise, noise, metrics=("fid",)).value("fid") or 0.0) < 1e-9 * scale
    assert (fid.value or 0.0) > 0.1 * scale


# --- Real weights from local files, and the errors when they are missing -----------


def test_missing_weights_name_the_path_and_what_belongs_there(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dino.safetensors"
    with pytest.raises(MetricWeightsMissing) as err:
        MetricModels(dino_weights=missing).dino()
    assert str(missing) in err.value.detail and "vit_small_patch16_224.dino" in err.value.detail
    assert "never downloaded" in err.value.detail
    with pytest.raises(MetricWeightsMissing, match=r"no CLIP weights configured.*--clip-weights"):
        MetricModels(clip_model=CLIP_MODEL).clip()
    with pytest.raises(MetricWeightsMissing, match=r"not found in directory .*model\.safetensors"):
        MetricModels(inception_weights=tmp_path).inception()


def test_dino_weights_load_from_a_local_file(
    tmp_path: Path, models: MetricModels, demo: list[NamedImage]
) -> None:
    source = models.dino()
    path = tmp_path / "dino" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    # a directory holding model.safetensors, as the Hugging Face repository has it
    loaded = MetricModels(dino_weights=path.parent, seed=99).dino()
    images = [demo[0].image]
    assert torch.allclose(loaded.embed(images), source.embed(images), atol=1e-5)


def test_inception_weights_load_from_a_local_file(
    tmp_path: Path, models: MetricModels, demo: list[NamedImage]
) -> None:
    source = models.inception()
    state = dict(source.model.state_dict())
    # a torchvision checkpoint carries the classifier, which the encoder drops
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    loaded = MetricModels(inception_weights=path, seed=99).inception()
    images = [demo[0].image]
    assert torch.allclose(loaded.embed(images), source.embed(images), atol=1e-4)


def test_dino_training_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "full.pth"
    torch.save(
        {"teacher": {"module.backbone.cls_token": torch.ones(1), "module.head.w": torch.ones(1)}},
        path,
    )
    assert list(_read_state_dict(path)) == ["cls_token"]


# --- The CLI -----------------------------------------------------------------------


def test_cli_end_to_end_with_random_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generated = tmp_path / "generated"
    generated.mkdir()
    for photo in sorted(DEMO_DIR.glob("*.jpg"))[:2]:
        shutil.copy(photo, generated / photo.name)
    out = tmp_path / "report.json"
    rc = cli.main(
        [
            "--generated", str(generated), "--real", str(DEMO_DIR),
            "--prompts", "a photo of sks woman in a wizard robe",
            "--subject-token", "sks", "--class-noun", "woman",
            "--random-weights", "--clip-model", CLIP_MODEL, "--json", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM WEIGHTS: THESE NUMBERS MEAN NOTHING" in printed
    assert "0.668" in printed and "0.803" in printed and "0.305" in printed
    report = json.loads(out.read_text())
    assert report["random_weights"] is True and report["warning"] == RANDOM_WEIGHTS_WARNING
    assert report["prompts"] == ["a photo of woman in a wizard robe"] * 2
    for name in ("dino", "clip_i", "clip_t", "fid"):
        assert isinstance(report["metrics"][name]["value"], float)
        assert report["metrics"][name]["paper_sd"] == PAPER_SD.get(name)
    assert report["metrics"]["dino"]["n_generated"] == 2
    assert report["metrics"]["dino"]["n_reference"] == 4
    assert "n < 50" in report["metrics"]["fid"]["note"]


def test_cli_missing_weights_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "dino.pth"
    rc = cli.main(
        ["--generated", str(DEMO_DIR), "--real", str(DEMO_DIR), "--metrics", "dino",
         "--dino-weights", str(missing), "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"DINO weights not found at {missing}" in err and "--dino-weights" in err
    assert not (tmp_path / "r.json").exists()
    # every weights file is checked before any model loads: the bogus DINO file is never read
    bogus = tmp_path / "bogus.pth"
    bogus.write_text("not a checkpoint")
    with pytest.raises(MetricWeightsMissing, match="no Inception-v3 weights configured"):
        evaluate(
            MetricModels(dino_weights=bogus),
            noise_images(2),
            noise_images(2),
            metrics=("dino", "fid"),
        )
