"""ingest_image and set_product_images against the real Postgres and blob store."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import LocalBlobStore
from core.catalog.images import CatalogImageError, ingest_image, set_product_images
from core.db.catalog_models import CatalogImage, Product, ProductImage
from core.db.engine import session_scope


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def blob_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def image_rows(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return (await session.exec(select(func.count()).select_from(CatalogImage))).one()


async def test_same_bytes_twice_is_one_row_and_one_pair_of_blobs(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    data = jpeg((200, 30, 30))
    async with session_scope(sessions) as session:
        first = await ingest_image(session, blobs, data, side=64, max_pixels=10**6)
    files = blob_files(tmp_path)
    mtimes = [(tmp_path / f).stat().st_mtime_ns for f in files]
    async with session_scope(sessions) as session:
        second = await ingest_image(session, blobs, data, side=64, max_pixels=10**6)

    assert second.sha256 == first.sha256
    assert await image_rows(sessions) == 1
    sha = first.sha256
    assert files == [f"catalog/images/{sha[:2]}/{sha}.jpg", f"catalog/padded/{sha[:2]}/{sha}.png"]
    assert [(tmp_path / f).stat().st_mtime_ns for f in files] == mtimes  # not rewritten
    assert (first.width, first.height, first.media_type) == (120, 200, "image/jpeg")
    assert first.bytes == len(data)
    assert await blobs.get(first.blob_key) == data
    assert Image.open(io.BytesIO(await blobs.get(first.padded_blob_key))).size == (64, 64)


async def test_a_known_image_whose_blobs_were_lost_is_stored_again(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    data = jpeg((20, 160, 90))
    async with session_scope(sessions) as session:
        first = await ingest_image(session, blobs, data, side=64, max_pixels=10**6)
    files = blob_files(tmp_path)
    for name in files:
        (tmp_path / name).unlink()  # the blob store wiped, the database kept
    async with session_scope(sessions) as session:
        again = await ingest_image(session, blobs, data, side=64, max_pixels=10**6)

    assert again.sha256 == first.sha256 and await image_rows(sessions) == 1
    assert blob_files(tmp_path) == files
    assert await blobs.get(first.blob_key) == data


async def test_concurrent_ingests_of_the_same_bytes(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    data = jpeg((30, 30, 200))

    async def ingest() -> str:
        async with session_scope(sessions) as session:
            return (await ingest_image(session, blobs, data, side=64, max_pixels=10**6)).sha256

    shas = await asyncio.gather(*(ingest() for _ in range(4)))
    assert len(set(shas)) == 1
    assert await image_rows(sessions) == 1
    assert len(blob_files(tmp_path)) == 2


async def test_a_corrupt_image_leaves_no_row_and_no_blob(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    with pytest.raises(CatalogImageError):
        async with session_scope(sessions) as session:
            await ingest_image(session, blobs, jpeg((1, 2, 3))[:300], side=64, max_pixels=10**6)
    assert await image_rows(sessions) == 0
    assert blob_files(tmp_path) == []


async def test_set_product_images_replaces_in_page_order(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    async with session_scope(sessions) as session:
        product = Product(site="s", external_id="P1", url="https://s/p/1", content_hash="h")
        session.add(product)
        await session.flush()
        shas = [
            (await ingest_image(session, blobs, jpeg(c), side=32, max_pixels=10**6)).sha256
            for c in [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
        ]
        await set_product_images(session, product.id, [("u0", shas[0]), ("u1", shas[1])])
    async with session_scope(sessions) as session:
        await set_product_images(
            session, product.id, [("u2", shas[2]), ("u0", shas[0]), ("u0b", shas[0])]
        )

    async with sessions() as session:
        rows = (
            await session.exec(
                select(ProductImage)
                .where(col(ProductImage.product_id) == product.id)
                .order_by(col(ProductImage.position))
            )
        ).all()
    assert [(r.position, r.source_url, r.image_sha256) for r in rows] == [
        (0, "u2", shas[2]),
        (1, "u0", shas[0]),
        (2, "u0b", shas[0]),
    ]
    async with session_scope(sessions) as session:
        await set_product_images(session, product.id, [])
    async with sessions() as session:
        left = (await session.exec(select(func.count()).select_from(ProductImage))).one()
    assert left == 0
