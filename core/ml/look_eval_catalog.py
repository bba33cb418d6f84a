"""The shop and the judges ``core.ml.look_eval`` needs, in process: no Postgres, no services.

- ``build_catalog``: the fixture shop's catalog rendered directly (as
  ``core.ml.clip_eval --fixture-shop`` renders it), the fashion CLIP's base
  features of every image and caption, heads fine-tuned on the training side of
  a by-product split (as a ``clip_finetune`` job trains them), and the whole
  catalog indexed by the version's embeddings, products in stock as the shop
  lists them. The held-out R@10 of base and heads is kept beside it, so a
  reader can see that grounding matches on a learned signal, not on chance.
- ``ground``: what ``core.shop.look.ground`` does minus the Postgres stock
  re-check (in process the index's facts are the shop's truth).
- ``judge_encoder``: the model CLIP-T is judged by; see ``JUDGES``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.jobs.specs import ProductFilters
from core.ml import clip_eval
from core.ml.fashion_clip.finetune import ClipTrainConfig, train_heads
from core.ml.fashion_clip.model import (
    ClipHeads,
    FashionClip,
    base_identity,
    base_logit_scale,
    load_base,
    tokenizer_for,
)
from core.ml.fashion_clip.profiles import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ClipProfile
from core.ml.fashion_clip.retrieval_metrics import normalized, retrieval_report
from core.ml.fashion_clip.runtime import ClipRuntime, VersionEncoder
from core.shop.catalog_index import CatalogIndex, ProductFacts
from core.shop.grounding import GroundedPrompt, GroundingProduct, enrich_prompt
from core.shop.vector_index import ProductIndex

# Fixture product ids ("P000123") as the uuids the index keys products by.
_PRODUCT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "atelier:look_eval:fixture_shop")
NO_FILTERS = ProductFilters()
PROGRESS_EVERY = 4  # progress lines per heads training

# An independent judge for real hosts: open_clip's ViT-L-14 with LAION-2B weights
# (open_clip's pretrained.py tag laion2b_s32b_b82k points at this Hugging Face
# repository). The files' names were not checked from this host (no internet);
# a missing file is a CheckpointMissing naming the path and this command.
JUDGE_VIT_L_14 = ClipProfile(
    name="vit-l-14",
    embed_dim=768,
    image_size=224,
    open_clip_arch="ViT-L-14",
    model_dir="clip-vit-l-14",
    weights_file=OPEN_CLIP_WEIGHTS,
    fetch_command=(
        "huggingface-cli download laion/CLIP-ViT-L-14-laion2B-s32B-b82K "
        f"{OPEN_CLIP_CONFIG} {OPEN_CLIP_WEIGHTS} --local-dir {{path}}"
    ),
)
# What each judge is, as the report states it beside the figures.
JUDGES = {
    "base": "the fashion CLIP's base towers without the version's heads: the reranker "
    "scores with those towers plus heads, so this judge is related to its scorer, "
    "not independent of it",
    "version": "EXACTLY the reranker's CLIP-T term (the active version): reranking-on "
    "wins by construction; a check of the path, not a measurement",
    "vit-l-14": "an independent open_clip ViT-L-14 (LAION-2B), trained apart from "
    "the reranker's model",
}


@dataclass
class ShopCatalog:
    """The in-process catalog: its index and each product's facts for grounding."""

    index: CatalogIndex
    products: dict[uuid.UUID, tuple[str, str, str]]  # uuid -> (fixture id, designer, name)
    info: dict[str, Any] = field(default_factory=dict)


def product_uuid(fixture_id: str) -> uuid.UUID:
    return uuid.uuid5(_PRODUCT_NAMESPACE, fixture_id)


def _progress(quiet: bool) -> Callable[[int, int, float], None]:
    def report(step: int, total: int, loss: float) -> None:
        if not quiet and (step == total or step % max(1, total // PROGRESS_EVERY) == 0):
            print(f"  [heads] step {step}/{total} loss {loss:.4f}", file=sys.stderr)

    return report


def _never() -> bool:
    return False


def _train_version(
    runtime: ClipRuntime,
    pairs: clip_eval.ClipPairs,
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    config: ClipTrainConfig,
    holdout: float,
    seed: int,
    quiet: bool,
) -> tuple[VersionEncoder, dict[str, float]]:
    """Heads trained on the split's training products; held-out t2i R@10 before and after."""
    train_products, test_products = clip_eval.split_products(pairs.text_products, holdout, seed)
    train, train_images, train_texts = clip_eval.subset(pairs, train_products)
    test, test_images, test_texts = clip_eval.subset(pairs, test_products)
    heads = train_heads(
        image_feats[train_images], text_feats[train_texts], train.image_products,
        train.text_products, config, _progress(quiet), _never, seed,
        init_logit_scale=base_logit_scale(runtime.base),
        device=next(runtime.base.parameters()).device,
    ).model  # fmt: skip
    assert isinstance(heads, ClipHeads)
    version = VersionEncoder(runtime, FashionClip(runtime.base, heads))

    def r10(images: np.ndarray, texts: np.ndarray) -> float:
        report = retrieval_report(images, test.image_products, texts, test.text_products)
        return report["text_to_image"].recall[10]

    held_out = {
        "base": r10(normalized(image_feats[test_images]), normalized(text_feats[test_texts])),
        "heads": r10(
            version.heads_over_image_features(image_feats[test_images]),
            version.heads_over_text_features(text_feats[test_texts]),
        ),
    }
    return version, held_out


def _index(
    version: VersionEncoder, pairs: clip_eval.ClipPairs, image_feats: np.ndarray, products: Any
) -> CatalogIndex:
    """Every image of the catalog under the version, with the shop's stock and facts."""
    rows = ProductIndex.from_rows(
        version.heads_over_image_features(image_feats),
        [product_uuid(p) for p in pairs.image_products],
    )
    by_uuid = {product_uuid(p.id): p for p in products}
    ordered = [by_uuid[pid] for pid in rows.product_ids]
    facts = ProductFacts(
        in_stock=np.array([p.available and p.is_live for p in ordered], dtype=bool),
        designer=np.array([p.designer.lower() for p in ordered], dtype=object),
        categories=[frozenset(c.lower() for c in p.category_path) for p in ordered],
        price=np.array([float(p.price) for p in ordered]),
        currency=np.array([p.currency for p in ordered], dtype=object),
    )
    model_id = uuid.uuid5(_PRODUCT_NAMESPACE, "version")
    return CatalogIndex(model_id, rows, list(rows.product_ids), facts, fingerprint=())


def build_catalog(
    runtime: ClipRuntime,
    n_products: int,
    *,
    heads_steps: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    quiet: bool = False,
) -> tuple[VersionEncoder, ShopCatalog]:
    """The fixture shop's first ``n_products`` with a version fine-tuned on them."""
    from fixture_shop.catalog import catalog_at
    from fixture_shop.config import ShopConfig

    profile = runtime.profile
    pairs = clip_eval.pairs_from_fixture_shop(n_products, image_side=profile.image_size)
    shop = catalog_at(ShopConfig(seed=clip_eval.FIXTURE_SHOP_SEED, products=n_products), 0)
    image_feats = runtime.base_image_features(pairs.images)
    text_feats = runtime.base_text_features(pairs.texts)
    config = ClipTrainConfig.from_profile(profile, steps=heads_steps)
    version, held_out = _train_version(
        runtime, pairs, image_feats, text_feats, config, holdout, seed, quiet
    )
    index = _index(version, pairs, image_feats, shop)
    catalog = ShopCatalog(
        index,
        {product_uuid(p.id): (p.id, p.designer, p.name) for p in shop},
        {
            "source": "fixture_shop (rendered in process)",
            "products": len(pairs.text_products),
            "images": len(pairs.images),
            "in_stock": int(index.facts.in_stock.sum()),
            "heads_steps": config.steps,
            "held_out_t2i_r10": held_out,
        },
    )
    return version, catalog


def ground(
    encoder: Any,
    catalog: ShopCatalog,
    prompt: str,
    products: int,
    count_tokens: Callable[[str], int],
) -> GroundedPrompt:
    """``prompt`` enriched with the in-stock products nearest to it, as many as fit."""
    query = encoder.encode_texts([prompt])[0]
    hits = catalog.index.search(query, NO_FILTERS, products)[:products]
    found = [
        GroundingProduct(catalog.products[h.product_id][0], catalog.products[h.product_id][1],
                         catalog.products[h.product_id][2], h.score)
        for h in hits
    ]  # fmt: skip
    return enrich_prompt(prompt, found, count_tokens)


def judge_encoder(
    name: str, runtime: ClipRuntime, version: VersionEncoder, models_dir: Path, path: Path | None
) -> tuple[VersionEncoder, str]:
    """The judge's encoder (L2-normalised embeddings) and its identity."""
    if name == "base":
        return runtime.base_encoder(), runtime.base_id
    if name == "version":
        return version, f"{runtime.base_id}+heads"
    if name != JUDGE_VIT_L_14.name:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    where = path or models_dir / JUDGE_VIT_L_14.model_dir
    device = next(runtime.base.parameters()).device
    base, preprocess = load_base(JUDGE_VIT_L_14, where, device)
    identity = base_identity(JUDGE_VIT_L_14, where)
    judge = ClipRuntime(JUDGE_VIT_L_14, base, preprocess, tokenizer_for(JUDGE_VIT_L_14), identity)
    return judge.base_encoder(), identity
