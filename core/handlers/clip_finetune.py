"""The `clip_finetune` job: new fashion-CLIP heads, kept only if they retrieve better.

1. Features: whatever the towers have not embedded yet (normally nothing: the
   job waits on the crawl's ``catalog_embed``).
2. Data: every live product's image features and caption feature, split by
   product (seeded), so no product is both trained on and judged on.
3. Training: heads only over the stored features (no tower pass, cheap on a
   CPU worker), or with the towers' last blocks unfrozen (recomputed from the
   padded images and captions every step: slow, and said so in the progress).
4. Judging: the candidate and the active version on the same held-out products;
   text-to-image R@10 decides (``core.shop.versions``).
5. A better candidate's embeddings of the whole catalog are written (a head-only
   version's heads over stored features: seconds; an unfrozen-block version's
   towers over every padded image, in batches), its ONNX encoder exported, and only then is
   it activated, in one transaction; a worse one is kept as ``rejected`` with
   its figures, its blob kept for inspection, no index rows.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
from sqlalchemy import delete
from sqlmodel import col, select

from core.catalog.queries import products_by_id
from core.db.catalog_models import CrawlRun
from core.db.engine import session_scope
from core.db.shop_models import ClipModel, ProductEmbedding
from core.errors import Conflict
from core.handlers.clip_catalog import (
    delete_encoder,
    ensure_image_features,
    ensure_text_features,
    export_encoder,
    onnx_prefix,
    padded_images,
    product_caption,
    state_key,
    version_encoder,
    write_index_rows,
)
from core.jobs.execution import JobContext, JobResult
from core.jobs.specs import ClipFinetuneSpec
from core.ml.resident import resident_clip_runtime
from core.shop import feature_store
from core.shop.versions import activate_if_better, active_version

log = logging.getLogger("atelier.jobs.clip_finetune")

# Fewer held-out products than this make recall@10 meaningless: refuse.
MIN_HELDOUT_PRODUCTS = 20


async def _dataset(ctx: JobContext, base_id: str, with_inputs: bool) -> dict[str, Any]:
    """Every live (product, image) pair's stored features; ``with_inputs`` adds the
    padded images and captions, for versions whose towers run (unfrozen blocks)."""
    async with ctx.sessions() as session:
        pairs = await feature_store.live_product_images(session)
        images = await feature_store.image_features(
            session, base_id, sorted({p.image_sha256 for p in pairs})
        )
        texts = await feature_store.text_features(session, base_id)
    pairs = [p for p in pairs if p.image_sha256 in images and p.product_id in texts]
    products = sorted({p.product_id for p in pairs})
    data: dict[str, Any] = {
        "image_features": np.stack([images[p.image_sha256] for p in pairs]) if pairs else None,
        "image_products": [p.product_id for p in pairs],
        "image_shas": [p.image_sha256 for p in pairs],
        "text_features": np.stack([texts[pid][1] for pid in products]) if products else None,
        "text_products": products,
    }
    if with_inputs:
        data["images"] = await padded_images(ctx, data["image_shas"])
        async with ctx.sessions() as session:
            rows = await products_by_id(session, products)
            captions = {pid: product_caption(p) for pid, p in rows.items()}
        data["captions"] = [captions[pid] for pid in products]
    return data


def _unfrozen(config: dict[str, Any]) -> bool:
    return bool(config.get("unfreeze_image_blocks") or config.get("unfreeze_text_blocks"))


def split_products(
    products: list[uuid.UUID], fraction: float, seed: int
) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """(train, held out) by product, seeded; every product in exactly one."""
    order = sorted(products)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    cut = round(len(order) * fraction)
    return set(order[cut:]), set(order[:cut])


async def _snapshot_run(ctx: JobContext) -> uuid.UUID | None:
    async with ctx.sessions() as session:
        query = select(CrawlRun.id).order_by(col(CrawlRun.started_at).desc()).limit(1)
        return (await session.exec(query)).first()


async def run_clip_finetune(ctx: JobContext) -> JobResult:
    # Resolved again: a row written before a field existed gets today's default.
    spec = ClipFinetuneSpec.of_job(ctx.job).resolve(ctx.settings)
    assert spec.profile is not None
    profile = spec.profile
    ctx.progress.stage("loading the fashion CLIP", start=0.0, weight=0.02)
    runtime = await ctx.compute(resident_clip_runtime, ctx.settings)
    ctx.progress.stage("features", start=0.02, weight=0.08)
    await ensure_image_features(ctx, runtime)
    await ensure_text_features(ctx, runtime)
    async with ctx.sessions() as session:
        active = await active_version(session, profile)
    if active is None:
        raise Conflict("no fashion-CLIP version is active yet: run catalog_embed first")
    towers_run = _unfrozen(spec.model_dump()) or _unfrozen(active.config)
    data = await _dataset(ctx, runtime.base_id, with_inputs=towers_run)
    assert spec.holdout_fraction is not None
    train, held_out = split_products(data["text_products"], spec.holdout_fraction, spec.seed)
    if len(held_out) < MIN_HELDOUT_PRODUCTS:
        raise Conflict(
            f"the catalog has {len(data['text_products'])} embedded products: too few to hold"
            f" out {MIN_HELDOUT_PRODUCTS} for judging (crawl more first)"
        )
    candidate = ClipModel(
        profile=profile,
        base_id=runtime.base_id,
        config={"spec": spec.model_dump(), "reason": spec.reason},
        crawl_run_id=await _snapshot_run(ctx),
        job_id=ctx.job.id,
    )
    async with session_scope(ctx.sessions) as session:
        session.add(candidate)
    try:
        split = (train, held_out)
        return await _train_judge_activate(ctx, runtime, spec, data, split, candidate, active)
    except BaseException:
        async with session_scope(ctx.sessions) as session:
            row = await session.get(ClipModel, candidate.id)
            if row is not None and row.status == "training":
                await session.delete(row)
        raise


async def _train_judge_activate(
    ctx: JobContext,
    runtime: Any,
    spec: ClipFinetuneSpec,
    data: dict[str, Any],
    split: tuple[set[uuid.UUID], set[uuid.UUID]],
    candidate: ClipModel,
    active: ClipModel,
) -> JobResult:
    train, held_out = split
    unfrozen = _unfrozen(spec.model_dump())
    stage = (
        "training heads and the last tower blocks (towers recomputed)"
        if unfrozen
        else ("training heads over stored features")
    )
    ctx.progress.stage(stage, start=0.10, weight=0.70)
    trained = await ctx.compute(
        runtime.train_version,
        data,
        train,
        spec,
        on_step=lambda step, total, loss: ctx.progress.step(step, total, loss=loss),
        should_stop=ctx.stop.is_set,
    )
    ctx.progress.stage("judging on held-out products", start=0.80, weight=0.05)
    current = await version_encoder(ctx, runtime, active)
    metrics = {
        "candidate": await ctx.compute(runtime.held_out_metrics, trained, data, held_out),
        "active": await ctx.compute(runtime.held_out_metrics, current, data, held_out),
        "judged_against": str(active.id),
        "split": {"seed": spec.seed, "held_out": len(held_out), "train": len(train)},
    }
    state, config = await ctx.compute(trained.state)
    await ctx.store.put(state_key(candidate.id), state)
    better_so_far = metrics["candidate"]["t2i_r10"] > metrics["active"]["t2i_r10"]
    files: list[str] = []
    rows = 0
    if better_so_far:
        embedding = (
            "exporting and embedding the catalog through its towers (unfrozen blocks: recomputed)"
            if unfrozen
            else "exporting and embedding the catalog (heads over stored features)"
        )
        ctx.progress.stage(embedding, start=0.85, weight=0.15)
        files = await export_encoder(ctx, trained, candidate.id)
        candidate.onnx_prefix, candidate.blob_key = (
            onnx_prefix(candidate.id),
            state_key(candidate.id),
        )
        candidate.config = {**candidate.config, **config, "onnx_files": files}
        rows = await write_index_rows(ctx, runtime, candidate, everything=True, encoder=trained)
    async with session_scope(ctx.sessions) as session:
        row = await session.get(ClipModel, candidate.id)
        assert row is not None
        row.blob_key, row.onnx_prefix = state_key(candidate.id), candidate.onnx_prefix
        row.config = {**candidate.config, **config}
        session.add(row)
        activated = await activate_if_better(session, row, metrics)
        if not activated:
            await session.execute(
                delete(ProductEmbedding).where(col(ProductEmbedding.model_id) == candidate.id)
            )
    if not activated and files:
        await delete_encoder(ctx, candidate.id, files)
    log.info(
        "clip fine-tune %s: %s %s", candidate.id, "activated" if activated else "rejected", metrics
    )
    return JobResult(
        result={
            "clip_model_id": str(candidate.id),
            "activated": activated,
            "metrics": metrics,
            "index_rows": rows if activated else 0,
            # Unfrozen blocks: trained, judged and embedded through the towers, not
            # over stored features.
            "recomputed": unfrozen,
        }
    )
