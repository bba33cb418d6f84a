"""The catalog through the fashion CLIP, as the CLIP jobs use it: base features
stored once per base model, a version's encoder (its heads on the resident base),
its ONNX export in the blob store, and its rows of the index.

Shared by ``catalog_embed`` (incremental, after crawls) and ``clip_finetune``
(a new version's rows for the whole catalog, before it is activated).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlmodel import col, select

from core.db.catalog_models import CatalogImage, Product
from core.db.engine import session_scope
from core.db.shop_models import ClipModel
from core.jobs.execution import JobContext
from core.shop import feature_store
from core.shop.feature_store import text_sha256

# Images per tower batch: bounds host memory for decoded images (64 x 512 x 512 x 3
# bytes is 50 MB) while keeping a GPU busy.
IMAGE_BATCH = 64


def onnx_prefix(model_id: uuid.UUID) -> str:
    return f"clip/{model_id}/onnx"


def state_key(model_id: uuid.UUID) -> str:
    return f"clip/{model_id}/state.safetensors"


async def _padded_png(ctx: JobContext, shas: list[str]) -> dict[str, bytes]:
    async with ctx.sessions() as session:
        rows = await session.exec(
            select(CatalogImage.sha256, CatalogImage.padded_blob_key).where(
                col(CatalogImage.sha256).in_(shas)
            )
        )
        keys = dict(rows.all())
    return {sha: await ctx.store.get(keys[sha]) for sha in dict.fromkeys(shas)}


def _decoded(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


async def _padded_images(ctx: JobContext, shas: list[str]) -> list[Image.Image]:
    files = await _padded_png(ctx, shas)
    return [_decoded(files[sha]) for sha in shas]


class PaddedImages(Sequence[Image.Image]):
    """Padded catalog images in row order, kept as their PNG files and decoded on
    access: a training run over a catalog draws each many times, and decoded
    512 x 512 images would hold 0.75 MB each."""

    def __init__(self, shas: list[str], files: dict[str, bytes]) -> None:
        self._shas, self._files = shas, files

    def __len__(self) -> int:
        return len(self._shas)

    def __getitem__(self, index: int) -> Image.Image:  # type: ignore[override]
        return _decoded(self._files[self._shas[index]])


async def padded_images(ctx: JobContext, shas: list[str]) -> PaddedImages:
    return PaddedImages(shas, await _padded_png(ctx, shas))


async def ensure_image_features(ctx: JobContext, runtime: Any) -> int:
    """Base features for every live image that lacks them; returns how many were made."""
    async with ctx.sessions() as session:
        missing = await feature_store.images_without_features(session, runtime.base_id)
    for start in range(0, len(missing), IMAGE_BATCH):
        ctx.raise_if_stopped()
        shas = missing[start : start + IMAGE_BATCH]
        images = await _padded_images(ctx, shas)
        vectors = await ctx.compute(runtime.base_image_features, images)
        async with session_scope(ctx.sessions) as session:
            await feature_store.put_image_features(
                session, runtime.base_id, dict(zip(shas, vectors, strict=True))
            )
        ctx.progress.step(min(start + IMAGE_BATCH, len(missing)), len(missing))
    return len(missing)


def product_caption(product: Product) -> str:
    from core.ml.fashion_clip.features import product_text

    return product_text(product.designer, product.name, product.description, product.category_path)


async def ensure_text_features(ctx: JobContext, runtime: Any) -> int:
    """Base features of every live product's caption that is new or changed."""
    async with ctx.sessions() as session:
        products = (await session.exec(select(Product).where(col(Product.gone_at).is_(None)))).all()
        stored = await feature_store.text_features(session, runtime.base_id)
    todo = [
        (p.id, caption)
        for p in products
        if (caption := product_caption(p))
        and (p.id not in stored or stored[p.id][0] != text_sha256(caption))
    ]
    for start in range(0, len(todo), IMAGE_BATCH):
        chunk = todo[start : start + IMAGE_BATCH]
        vectors = await ctx.compute(runtime.base_text_features, [c for _, c in chunk])
        features = {
            pid: (text_sha256(caption), v) for (pid, caption), v in zip(chunk, vectors, strict=True)
        }
        async with session_scope(ctx.sessions) as session:
            await feature_store.put_text_features(session, runtime.base_id, features)
    return len(todo)


def _exported_files(encoder: Any) -> dict[str, bytes]:
    """The version's ONNX encoder as files (name -> bytes), made in a scratch dir."""
    directory = Path(tempfile.mkdtemp(prefix="atelier-onnx-"))
    try:
        encoder.export_onnx(directory)
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def export_encoder(ctx: JobContext, encoder: Any, model_id: uuid.UUID) -> list[str]:
    """The version's ONNX encoder into the blob store (the version row owns the files,
    not the attempt: they are written with the store, not ``ctx.put_blob``)."""
    files = await ctx.compute(_exported_files, encoder)
    try:
        for name, data in files.items():
            await ctx.store.put(f"{onnx_prefix(model_id)}/{name}", data)
    except BaseException:
        await delete_encoder(ctx, model_id, list(files))
        raise
    return list(files)


async def delete_encoder(ctx: JobContext, model_id: uuid.UUID, names: list[str]) -> None:
    for name in names:
        await ctx.store.delete(f"{onnx_prefix(model_id)}/{name}")


async def version_encoder(ctx: JobContext, runtime: Any, version: ClipModel) -> Any:
    """The version's heads on the resident base (cached by the runtime per version)."""
    state = await ctx.store.get(version.blob_key) if version.blob_key else None
    return await ctx.compute(runtime.version_encoder, version.id, state, version.config)


async def write_index_rows(
    ctx: JobContext,
    runtime: Any,
    version: ClipModel,
    *,
    everything: bool = False,
    encoder: Any = None,
) -> int:
    """The version's rows for every live (product, image) it lacks (all with
    ``everything``), from stored features through its heads alone."""
    async with ctx.sessions() as session:
        pairs = await feature_store.live_product_images(session)
        done = set() if everything else await feature_store.embedded_pairs(session, version.id)
        todo = [p for p in pairs if (p.product_id, p.image_sha256) not in done]
        features = await feature_store.image_features(
            session, version.base_id, sorted({p.image_sha256 for p in todo})
        )
    todo = [p for p in todo if p.image_sha256 in features]  # an image without blob: skipped
    if not todo:
        return 0
    encoder = encoder or await version_encoder(ctx, runtime, version)
    if encoder.recomputes:
        return await _write_rows_through_towers(ctx, version, encoder, todo)
    matrix = np.stack([features[p.image_sha256] for p in todo])
    vectors = await ctx.compute(encoder.heads_over_image_features, matrix)
    async with session_scope(ctx.sessions) as session:
        await feature_store.put_embeddings(session, version.id, todo, vectors)
    return len(todo)


async def _write_rows_through_towers(
    ctx: JobContext, version: ClipModel, encoder: Any, todo: list[feature_store.ProductImageRow]
) -> int:
    """A version with unfrozen blocks: its own towers over the padded images, in
    batches (the stored base features are not its towers' outputs)."""
    for start in range(0, len(todo), IMAGE_BATCH):
        ctx.raise_if_stopped()
        chunk = todo[start : start + IMAGE_BATCH]
        images = await _padded_images(ctx, [p.image_sha256 for p in chunk])
        vectors = await ctx.compute(encoder.encode_images, images)
        async with session_scope(ctx.sessions) as session:
            await feature_store.put_embeddings(session, version.id, chunk, vectors)
        ctx.progress.step(min(start + IMAGE_BATCH, len(todo)), len(todo))
    return len(todo)
