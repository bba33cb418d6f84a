"""The `catalog_embed` job: the catalog's images and texts through the fashion CLIP.

Three steps, each incremental, so the job after a crawl costs what the crawl
changed:
1. base features: every live product image and caption the frozen towers have
   not seen (per base model, stored once; a new head version never re-runs
   the towers);
2. the active version: made from the base (identity heads, ONNX export for the
   API) when none is active yet, so looks are grounded from the first crawl on;
3. index rows: the active version's heads over the stored features of every
   (product, image) it lacks, and stale rows (gone products, images a product
   no longer shows) dropped. If another version became active meanwhile (a
   fine-tune finished), step 3 runs again for it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from core.db.engine import session_scope
from core.db.shop_models import ClipModel
from core.handlers.clip_catalog import (
    delete_encoder,
    ensure_image_features,
    ensure_text_features,
    export_encoder,
    onnx_prefix,
    write_index_rows,
)
from core.jobs.execution import JobContext, JobResult
from core.jobs.specs import CatalogEmbedSpec
from core.ml.resident import resident_clip_runtime
from core.shop import feature_store
from core.shop.versions import active_version, create_base_version

log = logging.getLogger("atelier.jobs.embed")

# Versions the index step follows within one job before leaving the rest to the next.
MAX_VERSION_HOPS = 3


async def _ensure_version(ctx: JobContext, runtime: Any, profile: str) -> tuple[ClipModel, bool]:
    async with ctx.sessions() as session:
        version = await active_version(session, profile)
    if version is not None:
        return version, False
    model_id = uuid.uuid4()
    files = await export_encoder(ctx, runtime.base_encoder(), model_id)
    async with session_scope(ctx.sessions) as session:
        made = await create_base_version(
            session, profile, runtime.base_id, onnx_prefix(model_id), files, model_id=model_id
        )
    if made is not None:
        return made, True
    # Another embedder made one first: ours is not needed.
    await delete_encoder(ctx, model_id, files)
    async with ctx.sessions() as session:
        version = await active_version(session, profile)
    assert version is not None
    return version, False


async def run_catalog_embed(ctx: JobContext) -> JobResult:
    profile = CatalogEmbedSpec.of_job(ctx.job).profile or ctx.settings.clip_profile
    ctx.progress.stage("loading the fashion CLIP", start=0.0, weight=0.05)
    runtime = await ctx.compute(resident_clip_runtime, ctx.settings)
    ctx.progress.stage("image features", start=0.05, weight=0.75)
    images = await ensure_image_features(ctx, runtime)
    ctx.progress.stage("text features", start=0.80, weight=0.1)
    texts = await ensure_text_features(ctx, runtime)
    ctx.progress.stage("index rows", start=0.90, weight=0.1)
    version, created = await _ensure_version(ctx, runtime, profile)
    written = dropped = 0
    for _ in range(MAX_VERSION_HOPS):
        written += await write_index_rows(ctx, runtime, version)
        async with session_scope(ctx.sessions) as session:
            dropped += await feature_store.drop_stale_embeddings(session, version.id)
            now = await active_version(session, profile)
        if now is None or now.id == version.id:
            break
        version = now
    result = {
        "clip_model_id": str(version.id),
        "base_id": runtime.base_id,
        "created_base_version": created,
        "images_embedded": images,
        "texts_embedded": texts,
        "rows_written": written,
        "rows_dropped": dropped,
    }
    log.info("catalog embedded: %s", result)
    return JobResult(result=result)
