"""Product search as a process serves it: the index, the query encoder, one call.

The API holds one ``CatalogSearcher``. Its encoder is the active version's
ONNX export (text and image towers with their heads), fetched from the blob
store into a local cache directory once per version and run with onnxruntime,
so the web process never imports torch. Encoding is CPU-bound and runs off the
event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from PIL import Image
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.catalog.images import CatalogImageError, checked_padded
from core.errors import IndexNotReady, InvalidInput, SearchImageRejected, SearchImageTooLarge
from core.jobs.specs import ProductFilters
from core.settings import Settings
from core.shop.catalog_index import CatalogIndex, IndexHolder
from core.shop.onnx_encoder import OnnxClipEncoder
from core.shop.search import SearchPage, ranked_page
from core.shop.versions import active_version


class CatalogSearcher:
    def __init__(self, settings: Settings, store: BlobStore, cache_dir: Path) -> None:
        self.settings = settings
        self.store = store
        self.cache_dir = cache_dir
        self.holder = IndexHolder(settings.clip_profile, settings.index_check_s)
        self._encoder: tuple[uuid.UUID, OnnxClipEncoder] | None = None
        self._encoder_lock = asyncio.Lock()

    async def index(self, session: AsyncSession) -> CatalogIndex:
        index = await self.holder.current(session)
        if index is None:
            raise IndexNotReady(
                "no fashion-CLIP version is active yet: the catalog has not been embedded"
                " (a crawl queues a catalog_embed job; POST /v1/admin/clip/embed runs one)"
            )
        return index

    async def encoder(self, session: AsyncSession, model_id: uuid.UUID) -> OnnxClipEncoder:
        async with self._encoder_lock:
            if self._encoder is not None and self._encoder[0] == model_id:
                return self._encoder[1]
            version = await active_version(session, self.settings.clip_profile)
            if version is None or version.id != model_id or not version.onnx_prefix:
                raise IndexNotReady(f"fashion-CLIP version {model_id} has no exported encoder")
            files = [str(name) for name in version.config.get("onnx_files", [])]
            directory = await self._materialise(version.onnx_prefix, files, model_id)
            encoder = await asyncio.to_thread(OnnxClipEncoder.load, directory)
            self._encoder = (model_id, encoder)
            return encoder

    async def _materialise(self, prefix: str, files: list[str], model_id: uuid.UUID) -> Path:
        """The version's encoder files in a local directory (written once, atomically)."""
        target = self.cache_dir / str(model_id)
        if await asyncio.to_thread(target.is_dir):
            return target
        blobs = {name: await self.store.get(f"{prefix}/{name}") for name in files}
        # Tens to hundreds of MB for a real model: written off the event loop.
        await asyncio.to_thread(_write_atomically, self.cache_dir, target, blobs)
        return target

    async def by_text(
        self, session: AsyncSession, q: str, filters: ProductFilters, limit: int,
        cursor: str | None,
    ) -> SearchPage:  # fmt: skip
        text = " ".join(q.split())
        if not text:
            raise InvalidInput("q is empty", field="q")
        if len(text) > self.settings.max_search_query_chars:
            raise InvalidInput(
                f"q is {len(text)} characters; the limit is {self.settings.max_search_query_chars}",
                field="q",
            )
        index = await self.index(session)
        encoder = await self.encoder(session, index.model_id)
        vector = (await asyncio.to_thread(encoder.encode_texts, [text]))[0]
        return await ranked_page(session, index, vector, filters, limit=limit, cursor=cursor)

    async def by_image(
        self, session: AsyncSession, data: bytes, filters: ProductFilters, limit: int,
        cursor: str | None,
    ) -> SearchPage:  # fmt: skip
        image = await asyncio.to_thread(self._checked_image, data)
        index = await self.index(session)
        encoder = await self.encoder(session, index.model_id)
        vector = (await asyncio.to_thread(encoder.encode_images, [image]))[0]
        return await ranked_page(session, index, vector, filters, limit=limit, cursor=cursor)

    def _checked_image(self, data: bytes) -> Image.Image:
        """The upload as the catalog's images are: checked by content, padded square."""
        limit = self.settings.max_search_image_bytes
        if len(data) > limit:
            raise SearchImageTooLarge(f"the image is {len(data)} bytes; the limit is {limit}")
        try:
            _, _, padded = checked_padded(
                data,
                side=self.settings.catalog_image_side,
                max_pixels=self.settings.max_photo_pixels,
            )
        except CatalogImageError as exc:
            raise SearchImageRejected(str(exc)) from exc
        return padded.convert("RGB")


def _write_atomically(cache_dir: Path, target: Path, blobs: dict[str, bytes]) -> None:
    """``blobs`` as files of ``target``, which appears whole or not at all."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    for name, data in blobs.items():
        (staging / name).write_bytes(data)
    try:
        os.rename(staging, target)
    except OSError:  # another request of this process or another process won
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
