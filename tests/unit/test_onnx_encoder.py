"""The torch-free encoder: the tokenizer against open_clip's, ONNX towers against torch.

A tiny open_clip CLIP (seeded random weights) with random heads is exported once per
module through the real exporter; the API-side encoder must give the same unit vectors
as torch with open_clip's own tokenizer and eval transform.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transform import image_transform
from PIL import Image
from torch import nn

from core.ml.fashion_clip.onnx_export import export_onnx
from core.shop.clip_tokenizer import ClipTokenizer, bundled_vocab_path
from core.shop.onnx_encoder import CONFIG_FILE, EncoderFilesMissing, OnnxClipEncoder

ROOT = Path(__file__).resolve().parents[2]
EMBED_DIM = 32
IMAGE_SIZE = 32
TINY_VISION = {
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "width": 64,
    "head_width": 32,
    "layers": 2,
}
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
# fp32 graph vs fp32 eager on unit vectors: measured ~2e-7.
EMBEDDING_TOLERANCE = 1e-5

TRICKY_TEXTS = [
    "",
    "Dolce & Gabbana",
    "Dolce &amp;amp; Gabbana",  # unescaped twice, as open_clip does
    "Café crème — Maison Margiela, naïve façade, Ångström",
    "Levi\u2019s 501\u00ae \u201coriginal\u201d jeans\u2026",  # curly quotes: ftfy uncurls
    "cafÃ© au lait",  # mojibake, fixed by ftfy
    "👗✨ summer dress 🌞",
    "東京 ドレス 원피스",
    "size 38½ EU, 100% wool; 24cm x 15cm!!!",
    "  multiple\n\tspaces   and CAPITALS  ",
    "\uff24\uff32\uff25\uff33\uff33 \ufb01ne \ufb02annel",  # full-width, ligatures
    "don't WON'T it's we'll",
    "<start_of_text> literal specials <end_of_text>",
    "x" * 300,
]


class ResidualAdapter(nn.Module):
    """The shape of the fashion CLIP heads: x + up(act(down(x)))."""

    def __init__(self, dim: int, bottleneck: int = 8) -> None:
        super().__init__()
        self.down, self.up, self.act = (
            nn.Linear(dim, bottleneck),
            nn.Linear(bottleneck, dim),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


@pytest.fixture(scope="module")
def tiny() -> tuple[CLIP, nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = CLIP(EMBED_DIM, TINY_VISION, TINY_TEXT).eval()
    return base, ResidualAdapter(EMBED_DIM).eval(), nn.Linear(EMBED_DIM, EMBED_DIM).eval()


@pytest.fixture(scope="module")
def exported(
    tiny: tuple[CLIP, nn.Module, nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base, image_head, text_head = tiny
    out = tmp_path_factory.mktemp("encoder")
    export_onnx(base, image_head, text_head, out, IMAGE_SIZE, MEAN, STD)
    return out


@pytest.fixture(scope="module")
def encoder(exported: Path) -> OnnxClipEncoder:
    return OnnxClipEncoder.load(exported, intra_op_threads=1)


def test_tokenizer_gives_open_clips_ids() -> None:
    ours = ClipTokenizer(bundled_vocab_path())(TRICKY_TEXTS)
    theirs = open_clip.get_tokenizer("ViT-B-16")(TRICKY_TEXTS).numpy()
    assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(TRICKY_TEXTS), 77)
    for text, mine, reference in zip(TRICKY_TEXTS, ours, theirs, strict=True):
        assert mine.tolist() == reference.tolist(), text


def test_tokenizer_truncates_and_keeps_the_end_token() -> None:
    tokenizer = ClipTokenizer(bundled_vocab_path())
    long = " ".join(["oversized cashmere cardigan"] * 40)
    (ids,) = tokenizer([long])
    assert ids[0] == tokenizer.sot_token_id and ids[-1] == tokenizer.eot_token_id
    assert (ids != 0).all()
    assert ids.tolist() == open_clip.get_tokenizer("ViT-B-16")([long])[0].tolist()
    (empty,) = tokenizer("")
    assert empty[:3].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id, 0]


def test_export_is_a_self_contained_directory(exported: Path, encoder: OnnxClipEncoder) -> None:
    assert (exported / "bpe_simple_vocab_16e6.txt.gz").read_bytes() == (
        bundled_vocab_path().read_bytes()
    )
    config = encoder.config
    assert (config.context_length, config.image_size, config.embed_dim) == (77, IMAGE_SIZE, 32)
    assert config.mean == MEAN and config.std == STD
    assert max(config.provenance["check_max_abs_error"].values()) < EMBEDDING_TOLERANCE
    for tower in (config.text, config.image):
        assert tower.data_files and all((exported / name).is_file() for name in tower.data_files)


def test_text_embeddings_match_torch(
    tiny: tuple[CLIP, nn.Module, nn.Module], encoder: OnnxClipEncoder
) -> None:
    base, _, text_head = tiny
    texts = ["a black wool coat", "Dolce & Gabbana", "x " * 100]  # 3 rows: not the traced 2
    with torch.no_grad():
        features = base.encode_text(open_clip.get_tokenizer("ViT-B-16")(texts))
        expected = F.normalize(text_head(features), dim=-1).numpy()
        headless = F.normalize(features, dim=-1).numpy()
    got = encoder.encode_texts(texts)
    assert got.shape == (3, EMBED_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert np.abs(got - headless).max() > 0.01  # the head is in the graph
    np.testing.assert_allclose(encoder.encode_texts(texts[1:2]), got[1:2], atol=1e-6)


def test_image_preprocessing_and_embeddings_match_torch(
    tiny: tuple[CLIP, nn.Module, nn.Module], encoder: OnnxClipEncoder
) -> None:
    base, image_head, _ = tiny
    rng = np.random.default_rng(0)
    shapes = [(90, 120), (33, 31), (IMAGE_SIZE, IMAGE_SIZE), (500, 37)]
    images = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    images.append(images[0].convert("L"))
    images.append(Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA"))
    transform = image_transform(IMAGE_SIZE, is_train=False, mean=MEAN, std=STD)
    pixels = torch.stack([transform(image) for image in images])
    np.testing.assert_allclose(encoder.preprocess(images), pixels.numpy(), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = F.normalize(image_head(base.encode_image(pixels)), dim=-1).numpy()
    got = encoder.encode_images(images)
    np.testing.assert_allclose(got, expected, atol=EMBEDDING_TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_empty_batches_give_empty_arrays(encoder: OnnxClipEncoder) -> None:
    assert encoder.encode_texts([]).shape == (0, EMBED_DIM)
    assert encoder.encode_images([]).shape == (0, EMBED_DIM)


def test_api_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys, core.shop.onnx_encoder, core.shop.clip_tokenizer; "
        "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'diffusers') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_loading_a_missing_or_incomplete_directory_says_what_is_missing(
    exported: Path, tmp_path: Path
) -> None:
    with pytest.raises(EncoderFilesMissing, match=r"encoder\.json is missing"):
        OnnxClipEncoder.load(tmp_path / "no-such-model")
    (tmp_path / CONFIG_FILE).write_bytes((exported / CONFIG_FILE).read_bytes())
    with pytest.raises(EncoderFilesMissing, match=r"text\.onnx.*image\.onnx"):
        OnnxClipEncoder.load(tmp_path)
