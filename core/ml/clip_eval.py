"""Evaluate fashion CLIP fine-tuning on catalog pairs: base vs +heads vs +heads+unfrozen.

    python -m core.ml.clip_eval --export DIR [--profile tiny] [--model-dir D]
        [--test-fraction 0.2] [--seed 0] [--steps N] [--no-unfrozen] [--json OUT]
        [--threads N]
    python -m core.ml.clip_eval --fixture-shop N [--views 3] [--image-side S] ...
        (no crawl: the fixture shop's catalog rendered and padded directly)

The pairs are split BY PRODUCT (no product on both sides). Base features are
computed once; the heads train over the training products' stored features, the
unfrozen variant (last blocks of both towers too) recomputes the towers each step.
Each is scored on the held-out products, text->image and image->text R@1/5/10 and
MRR (``core.ml.fashion_clip.retrieval_metrics``: a hit is any image of the right
product / the product's text).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image

from core.errors import AtelierError
from core.ml.fashion_clip.features import image_features, product_text, text_features
from core.ml.fashion_clip.finetune import ClipTrainConfig, train_heads, train_unfrozen
from core.ml.fashion_clip.model import (
    ClipHeads,
    FashionClip,
    base_identity,
    base_logit_scale,
    load_base,
    resolve_model_path,
    tokenizer_for,
)
from core.ml.fashion_clip.profiles import ClipProfile, get_clip_profile
from core.ml.fashion_clip.retrieval_metrics import (
    RetrievalScores,
    normalized,
    retrieval_report,
)

PAIRS_FILE = "pairs.jsonl"  # core.catalog.export.PAIRS
# Marqo's published comparison (marqo.ai/blog/search-model-for-fashion, Aug 2024).
ANCHOR = (
    "Marqo-FashionCLIP reports text-to-image R@10 0.290 vs 0.261 for its ViT-B-16 LAION "
    "base (mean over 6 public fashion datasets)"
)
RANDOM_BASE_NOTE = (
    "the {profile} base has seeded random weights: its own numbers are chance level "
    "(R@10 ~ 10 / {products} held-out products); the gains are what fine-tuning learned "
    "from the catalog alone"
)
FIXTURE_SHOP_SEED = 7  # fixture_shop.config.ShopConfig's default seed: the demo's catalog
FIXTURE_VIEWS = 3  # every fixture product has at least 3 images (fixture_shop.catalog)
PROGRESS_EVERY = 10  # progress lines per training run
VARIANTS = ("base", "+heads", "+heads+unfrozen")


class _ImageFiles(Sequence[Image.Image]):
    """Images opened on access, so an export of any size is never all in memory."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Image.Image]: ...
    def __getitem__(self, index: int | slice) -> Image.Image | Sequence[Image.Image]:
        if isinstance(index, slice):
            return _ImageFiles(self.paths[index])
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")


@dataclass
class ClipPairs:
    """Images with their product, and one caption per product."""

    images: Sequence[Image.Image]
    image_products: list[str]
    texts: list[str]
    text_products: list[str]


def pairs_from_export(directory: Path) -> ClipPairs:
    """A catalog export (``core.catalog.export``): pairs.jsonl lines of image path
    (relative to DIR), text, product id, sha256. A product's first line gives its text."""
    paths: list[Path] = []
    image_products: list[str] = []
    texts: dict[str, str] = {}
    with (directory / PAIRS_FILE).open(encoding="utf-8") as lines:
        for line in lines:
            pair = json.loads(line)
            paths.append(directory / pair["image"])
            image_products.append(pair["product_id"])
            texts.setdefault(pair["product_id"], pair["text"])
    return ClipPairs(_ImageFiles(paths), image_products, list(texts.values()), list(texts))


def pairs_from_fixture_shop(
    n_products: int,
    *,
    views: int = FIXTURE_VIEWS,
    image_side: int = 64,
    seed: int = FIXTURE_SHOP_SEED,
) -> ClipPairs:
    """The fixture shop's first ``n_products`` products, each with up to ``views`` of
    its images rendered at ``image_side`` and padded square as the crawler pads them,
    captioned by ``product_text``. No server, no crawl."""
    from core.catalog.images import pad_to_square
    from fixture_shop.catalog import catalog_at
    from fixture_shop.config import ShopConfig
    from fixture_shop.images import render_jpeg, spec_for

    products = catalog_at(ShopConfig(seed=seed, products=n_products), 0)
    images: list[Image.Image] = []
    image_products: list[str] = []
    for product in products:
        for view in range(1, min(views, len(product.image_paths)) + 1):
            jpeg = render_jpeg(spec_for(product, view), image_side)
            images.append(pad_to_square(Image.open(io.BytesIO(jpeg)), image_side))
            image_products.append(product.id)
    texts = [product_text(p.designer, p.name, p.description, p.category_path) for p in products]
    return ClipPairs(images, image_products, texts, [p.id for p in products])


def split_products(
    products: Sequence[str], test_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """(train, test) products, disjoint, the test side ``test_fraction`` of them."""
    unique = sorted(set(products))
    if not 0 < test_fraction < 1 or len(unique) < 4:
        raise ValueError("need 0 < test fraction < 1 and at least 4 products")
    n_test = min(len(unique) - 2, max(2, round(test_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    test = {unique[i] for i in order[:n_test]}
    return set(unique) - test, test


class _RowView(Sequence[Any]):
    """Some rows of a sequence, read through to it on access (lazy images stay lazy)."""

    def __init__(self, items: Sequence[Any], rows: np.ndarray) -> None:
        self.items, self.rows = items, rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return _RowView(self.items, self.rows[index])
        return self.items[int(self.rows[index])]


def _rows(products: Sequence[str], keep: set[str]) -> np.ndarray:
    return np.array([i for i, product in enumerate(products) if product in keep], dtype=np.int64)


def subset(pairs: ClipPairs, products: set[str]) -> tuple[ClipPairs, np.ndarray, np.ndarray]:
    """The pairs of ``products``, with their image rows and text rows in ``pairs``."""
    image_rows, text_rows = (
        _rows(pairs.image_products, products),
        _rows(pairs.text_products, products),
    )
    part = ClipPairs(
        _RowView(pairs.images, image_rows),
        [pairs.image_products[i] for i in image_rows],
        [pairs.texts[i] for i in text_rows],
        [pairs.text_products[i] for i in text_rows],
    )
    return part, image_rows, text_rows


def _progress(name: str, quiet: bool) -> Callable[[int, int, float], None]:
    def report(step: int, total: int, loss: float) -> None:
        if not quiet and (step == total or step % max(1, total // PROGRESS_EVERY) == 0):
            print(f"  [{name}] step {step}/{total} loss {loss:.4f}", file=sys.stderr)

    return report


def _never() -> bool:
    return False


def _heads_embeddings(
    heads: ClipHeads, image_feats: np.ndarray, text_feats: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        images = heads.embed_images(torch.from_numpy(image_feats)).numpy()
        texts = heads.embed_texts(torch.from_numpy(text_feats)).numpy()
    return images, texts


def _unfrozen_embeddings(
    version: FashionClip, preprocess: Any, tokenizer: Any, test: ClipPairs
) -> tuple[np.ndarray, np.ndarray]:
    """Towers with the version's own last blocks, then its heads."""
    image_feats = image_features(version.base, preprocess, test.images)
    text_feats = text_features(version.base, tokenizer, test.texts)
    return _heads_embeddings(version.heads, image_feats, text_feats)


def evaluate(
    base: Any,
    preprocess: Any,
    tokenizer: Any,
    pairs: ClipPairs,
    config: ClipTrainConfig,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    unfrozen: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Scores of every variant on the held-out products, with counts and timings."""
    train_products, test_products = split_products(pairs.text_products, test_fraction, seed)
    train, train_images, train_texts = subset(pairs, train_products)
    test, test_images, test_texts = subset(pairs, test_products)
    started = time.perf_counter()
    image_feats = image_features(base, preprocess, pairs.images)
    text_feats = text_features(base, tokenizer, pairs.texts)
    timings = {"base_features_s": time.perf_counter() - started}

    def scored(embeddings: tuple[np.ndarray, np.ndarray]) -> dict[str, RetrievalScores]:
        images, texts = embeddings
        return retrieval_report(images, test.image_products, texts, test.text_products)

    base_test = (normalized(image_feats[test_images]), normalized(text_feats[test_texts]))
    results = {"base": scored(base_test)}
    started = time.perf_counter()
    heads = train_heads(
        image_feats[train_images], text_feats[train_texts], train.image_products,
        train.text_products, config, _progress("heads", quiet), _never, seed,
        init_logit_scale=base_logit_scale(base),
    ).model  # fmt: skip
    timings["heads_train_s"] = time.perf_counter() - started
    assert isinstance(heads, ClipHeads)
    results["+heads"] = scored(
        _heads_embeddings(heads, image_feats[test_images], text_feats[test_texts])
    )
    if unfrozen:
        started = time.perf_counter()
        version = train_unfrozen(
            base, preprocess, tokenizer, train.images, train.image_products, train.texts,
            train.text_products, config, _progress("unfrozen", quiet), _never, seed,
        ).model  # fmt: skip
        timings["unfrozen_train_s"] = time.perf_counter() - started
        assert isinstance(version, FashionClip)
        results["+heads+unfrozen"] = scored(
            _unfrozen_embeddings(version, preprocess, tokenizer, test)
        )
    return {
        "split": {
            "train_products": len(train_products), "test_products": len(test_products),
            "train_images": len(train_images), "test_images": len(test_images), "seed": seed,
        },
        "results": {
            variant: {direction: s.as_dict() for direction, s in scores.items()}
            for variant, scores in results.items()
        },
        "timings": timings,
    }  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    metrics = ("R@1", "R@5", "R@10", "MRR")
    header = "".join(f"{m:>7}" for m in metrics)
    lines = [
        f"{'':<18}{'text -> image':^28}   {'image -> text':^28}",
        f"{'':<18}{header}   {header}",
    ]
    for variant, scores in report["results"].items():
        t2i = "".join(f"{scores['text_to_image'][m]:>7.3f}" for m in metrics)
        i2t = "".join(f"{scores['image_to_text'][m]:>7.3f}" for m in metrics)
        lines.append(f"{variant:<18}{t2i}   {i2t}")
    return "\n".join(lines)


def _load_pairs(args: argparse.Namespace, profile: ClipProfile) -> tuple[ClipPairs, dict[str, Any]]:
    if args.export:
        return pairs_from_export(args.export), {"export": str(args.export)}
    side = args.image_side or profile.image_size
    pairs = pairs_from_fixture_shop(args.fixture_shop, views=args.views, image_side=side)
    return pairs, {"fixture_shop": args.fixture_shop, "views": args.views, "image_side": side}


def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = get_clip_profile(args.profile)
    if args.model_dir is None:
        from core.settings import Settings

        model_dir = resolve_model_path(profile, Settings().models_dir, None)
    else:
        model_dir = args.model_dir
    base, preprocess = load_base(profile, model_dir)
    pairs, source = _load_pairs(args, profile)
    config = ClipTrainConfig.from_profile(profile, steps=args.steps)
    print(f"{len(pairs.text_products):,} products, {len(pairs.images):,} images; "
          f"profile {profile.name} from {model_dir}", file=sys.stderr)  # fmt: skip
    report = evaluate(
        base, preprocess, tokenizer_for(profile), pairs, config,
        test_fraction=args.test_fraction, seed=args.seed, unfrozen=not args.no_unfrozen,
    )  # fmt: skip
    notes = [ANCHOR]
    if profile.random_weights:
        test_products = report["split"]["test_products"]
        notes.insert(0, RANDOM_BASE_NOTE.format(profile=profile.name, products=test_products))
    return {
        "profile": profile.name,
        "base": base_identity(profile, model_dir),
        "data": source,
        "config": asdict(config),
        **report,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.ml.clip_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--export", type=Path, help="a catalog export folder (pairs.jsonl)")
    data.add_argument("--fixture-shop", type=int, metavar="N", help="the fixture shop's N products")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--model-dir", type=Path, help="default: <models_dir>/<profile dir>")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="training steps (default: the profile's)")
    parser.add_argument("--no-unfrozen", action="store_true", help="skip the unfrozen variant")
    parser.add_argument("--views", type=int, default=FIXTURE_VIEWS, help="fixture images each")
    parser.add_argument("--image-side", type=int, help="fixture render side (default: model's)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = run(args)
    except AtelierError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    print(format_table(record))
    split = record["split"]
    print(f"\nheld out {split['test_products']:,} products ({split['test_images']:,} images); "
          f"trained on {split['train_products']:,} ({split['train_images']:,} images)")  # fmt: skip
    for note in record["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
