"""What embedding the catalog costs, and what a head-only version saves (CPU).

For the tiny profile and a ViT-B-16-shaped open_clip CLIP with random weights
(ViT-B-16's cost without its download), on the same padded catalog images:
- tower throughput: images/s (preprocess + image tower) and texts/s (tokenise +
  text tower), batches of ``core.ml.fashion_clip.features``;
- re-embedding N images for a new version: a full re-embed (preprocess, towers,
  heads) vs a head-only version's (its heads over the stored base features; the
  read of those features from Postgres is not in it).

    .venv/bin/python -m bench.clip_embed [--images 64] [--tiny-images 512] [--repeats 3]
        [--threads N]

Prints a table and writes bench/results/clip_embed.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from bench.results_file import write_result
from core.catalog.images import pad_to_square
from core.ml.fashion_clip.features import image_features, product_text, text_features
from core.ml.fashion_clip.model import FashionClip, load_base, tokenizer_for
from core.ml.fashion_clip.profiles import TINY_CLIP, VIT_B_16
from core.ml.fashion_clip.tiny import build_tiny_clip
from fixture_shop.catalog import catalog_at
from fixture_shop.config import ShopConfig
from fixture_shop.images import render_jpeg, spec_for

PADDED_SIDE = 512  # the crawler's padded square (core.catalog.images, ATELIER_CATALOG_IMAGE_SIDE)
HEADS_SEED = 0


def catalog_images(count: int) -> tuple[list[Image.Image], list[str]]:
    """``count`` fixture-shop images padded as the crawler stores them, and captions."""
    products = catalog_at(ShopConfig(products=count), 0)
    images = [
        pad_to_square(Image.open(io.BytesIO(render_jpeg(spec_for(p, 1), PADDED_SIDE))), PADDED_SIDE)
        for p in products
    ]
    texts = [product_text(p.designer, p.name, p.description, p.category_path) for p in products]
    return images, texts


def trained_like(base: Any) -> FashionClip:
    """A version whose heads are not the identity (their cost does not depend on it)."""
    model = FashionClip(base)
    generator = torch.Generator().manual_seed(HEADS_SEED)
    with torch.no_grad():
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval()


def median_s(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(
    name: str, base: Any, preprocess: Any, tokenizer: Any, n_images: int, repeats: int
) -> dict[str, Any]:
    images, texts = catalog_images(n_images)
    model = trained_like(base)

    def full_reembed() -> np.ndarray:
        feats = image_features(base, preprocess, images)
        with torch.inference_mode():
            return model.embed_image_features(torch.from_numpy(feats)).numpy()

    stored = image_features(base, preprocess, images)  # what the feature store holds

    def head_only_reembed() -> np.ndarray:
        with torch.inference_mode():
            return model.embed_image_features(torch.from_numpy(stored)).numpy()

    full_reembed()  # warm-up: first-call allocations, lazy inits
    image_s = median_s(lambda: image_features(base, preprocess, images), repeats)
    text_s = median_s(lambda: text_features(base, tokenizer, texts), repeats)
    full_s = median_s(full_reembed, repeats)
    head_s = median_s(head_only_reembed, repeats)
    return {
        "model": name,
        "embed_dim": int(stored.shape[1]),
        "images": n_images,
        "images_per_s": n_images / image_s,
        "texts_per_s": len(texts) / text_s,
        "full_reembed_s": full_s,
        "head_only_reembed_s": head_s,
        "speedup": full_s / head_s,
    }


def vit_b_16_random() -> tuple[Any, Any]:
    """open_clip's ViT-B-16 architecture with random weights (nothing downloaded)."""
    model, _, preprocess = open_clip.create_model_and_transforms(VIT_B_16.open_clip_arch or "")
    model.eval()
    model.requires_grad_(False)
    return model, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clip_embed")
    parser.add_argument("--images", type=int, default=64, help="images for ViT-B-16")
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as models:
        tiny_dir = build_tiny_clip(Path(models) / "clip-tiny")
        base, preprocess = load_base(TINY_CLIP, tiny_dir)
        tokenizer = tokenizer_for(TINY_CLIP)
        rows.append(measure("tiny", base, preprocess, tokenizer, args.tiny_images, args.repeats))
    base, preprocess = vit_b_16_random()
    rows.append(
        measure(
            "vit-b-16 (random)",
            base,
            preprocess,
            tokenizer_for(VIT_B_16),
            args.images,
            args.repeats,
        )
    )
    report(rows, args)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nCPU, {torch.get_num_threads()} torch threads, median of {args.repeats}; images "
          f"padded to {PADDED_SIDE} px as the crawler stores them\n")  # fmt: skip
    print(f"{'model':<20}{'images':>7}{'images/s':>10}{'texts/s':>10}"
          f"{'full s':>9}{'heads s':>10}{'speed-up':>10}")  # fmt: skip
    for row in rows:
        print(f"{row['model']:<20}{row['images']:>7}{row['images_per_s']:>10.1f}"
              f"{row['texts_per_s']:>10.1f}{row['full_reembed_s']:>9.3f}"
              f"{row['head_only_reembed_s']:>10.5f}{row['speedup']:>9.0f}x")  # fmt: skip
    write_result(
        "clip_embed",
        {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "padded_side": PADDED_SIDE,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
