"""core.catalog.export: the seed layout, pairs.jsonl, incremental exports."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore, blob_store_from_settings
from core.catalog.export import OWNER_FILE, export_catalog, folder_name, suffixed
from core.catalog.images import ingest_image, set_product_images
from core.db.catalog_models import CatalogImage, CrawlRun, Product, ProductImage
from core.db.engine import session_scope
from core.db.models import utcnow
from core.settings import Settings
from tests.conftest import ROOT

Sessions = async_sessionmaker[AsyncSession]
T0 = utcnow() - timedelta(days=2)


# Every image of the module a colour of its own: images are deduplicated by content,
# so two products sharing one by chance would change what the export holds.
_IMAGE_NUMBERS = itertools.count()


def _png() -> bytes:
    n = next(_IMAGE_NUMBERS)
    buf = io.BytesIO()
    Image.new("RGB", (40, 70), (n % 256, (n // 256) % 256, 128)).save(buf, "PNG")
    return buf.getvalue()


async def _product(
    sessions: Sessions,
    blobs: BlobStore,
    designer: str,
    description: str,
    *,
    images: int = 3,
    site: str = "fixture",
    category_path: list[str] | None = None,
) -> Product:
    async with session_scope(sessions) as session:
        product = Product(
            site=site,
            external_id=uuid.uuid4().hex[:8],
            url="https://shop.example/p",
            designer=designer,
            name=f"{designer} piece",
            description=description,
            category_path=category_path or [],
            content_hash="h",
            changed_at=T0,
        )
        session.add(product)
        await session.flush()
        shas = []
        for k in range(images):
            image = await ingest_image(session, blobs, _png(), side=32, max_pixels=10**6)
            shas.append((f"https://shop.example/i/{k}", image.sha256))
        await set_product_images(session, product.id, shas)
    return product


def _pairs(to: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (to / "pairs.jsonl").read_text().splitlines()]


def _folders(to: Path) -> set[str]:
    return {p.name for p in to.iterdir() if p.is_dir()}


@pytest.fixture
def blobs(settings: Settings) -> BlobStore:
    return blob_store_from_settings(settings)


def test_folder_names_are_safe_and_bounded() -> None:
    assert folder_name("Erdem", "Floral midi dress") == "Erdem Floral midi dress"
    assert folder_name("AC/DC", 'a "b": c*?<>|\\d\n\te') == "AC DC a b c d e"
    assert folder_name("", "...hidden") == "hidden"
    assert folder_name("Maison", "dress.") == "Maison dress"
    assert folder_name("", "  ") == "product"
    long = folder_name("Désigner", "très " * 100)
    assert len(long.encode()) <= 160 and long.endswith("très")
    assert folder_name("Ünïcödé", "e\u0301") == "Ünïcödé \u00e9"  # NFC


async def test_export_layout_pairs_and_manifest(
    sessions: Sessions, blobs: BlobStore, tmp_path: Path
) -> None:
    a = await _product(sessions, blobs, "Erdem", "Floral midi dress", images=3)
    coat_path = ["Women", "Clothing", "Coats"]
    b = await _product(sessions, blobs, "Khaite", "Wool coat", images=5, category_path=coat_path)
    twin = await _product(sessions, blobs, "Erdem", "Floral midi dress", images=4)
    await _product(sessions, blobs, "Toteme", "No pictures", images=0)
    await _product(sessions, blobs, "Other", "Elsewhere", site="other")

    summary = await export_catalog(sessions, blobs, tmp_path, site="fixture", chunk=2)

    assert (summary.products, summary.images, summary.pairs) == (3, 12, 12)
    first, second = sorted([a, twin], key=lambda p: p.id)
    folders = _folders(tmp_path)
    base = "Erdem Floral midi dress"
    assert folders == {base, suffixed(base, second.id), "Khaite Wool coat"}
    assert sorted(f.name for f in (tmp_path / "Khaite Wool coat").glob("*.png")) == [
        f"{i}.png" for i in range(5)
    ]
    assert (tmp_path / base / OWNER_FILE).read_text().strip() == str(first.id)
    padded = Image.open(tmp_path / "Khaite Wool coat" / "0.png")
    assert padded.size == (32, 32)

    pairs = _pairs(tmp_path)
    assert len(pairs) == 12
    coat = [p for p in pairs if p["product_id"] == str(b.id)]
    assert [p["image"] for p in coat] == [f"Khaite Wool coat/{i}.png" for i in range(5)]
    # The caption clip_finetune jobs train on (core.ml.fashion_clip.features.product_text).
    assert coat[0]["text"] == "Khaite Khaite piece: Wool coat | Women > Clothing > Coats"
    assert all((tmp_path / p["image"]).is_file() for p in pairs)
    assert len({p["sha256"] for p in pairs}) == 12

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["products"] == 3 and manifest["site"] == "fixture"
    assert manifest["since_run"] is None and manifest["last_run_id"] is None


async def test_incremental_export_redoes_only_changed_products(
    sessions: Sessions, blobs: BlobStore, tmp_path: Path
) -> None:
    kept = await _product(sessions, blobs, "Khaite", "Wool coat")
    renamed = await _product(sessions, blobs, "Erdem", "Floral midi dress")
    async with session_scope(sessions) as session:
        run = CrawlRun(site="fixture", started_at=T0 + timedelta(hours=1))
        session.add(run)
    first = await export_catalog(sessions, blobs, tmp_path)
    assert first.last_run_id == str(run.id)
    kept_file = tmp_path / "Khaite Wool coat" / "0.png"
    kept_mtime = kept_file.stat().st_mtime_ns

    async with session_scope(sessions) as session:
        await session.execute(
            update(Product)
            .where(col(Product.id) == renamed.id)
            .values(description="Floral maxi dress", changed_at=utcnow())
        )
    again = await export_catalog(sessions, blobs, tmp_path, since_run=run.id)

    assert (again.products, again.images, again.pairs, again.folders_removed) == (1, 3, 6, 1)
    assert not (tmp_path / "Erdem Floral midi dress").exists()
    assert (tmp_path / "Erdem Floral maxi dress" / "2.png").is_file()
    assert kept_file.stat().st_mtime_ns == kept_mtime  # untouched
    pairs = _pairs(tmp_path)
    assert {p["image"].split("/")[0] for p in pairs} == {
        "Khaite Wool coat",
        "Erdem Floral maxi dress",
    }
    assert sum(p["product_id"] == str(kept.id) for p in pairs) == 3
    assert all("midi" not in p["text"] for p in pairs)

    nothing = await export_catalog(sessions, blobs, tmp_path, since_run=run.id)
    assert nothing.products == 1  # changed_at is still after the run started
    assert len(_pairs(tmp_path)) == 6


async def test_cli_since_last(
    sessions: Sessions, blobs: BlobStore, settings: Settings, tmp_path: Path
) -> None:
    await _product(sessions, blobs, "Khaite", "Wool coat")
    env = {
        "DATABASE_URL": settings.database_url,
        "ATELIER_BLOB_DIR": str(settings.blob_dir),
        "PATH": "/usr/bin:/bin",
    }

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "core.catalog.export", "--to", str(tmp_path), *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)

    refused = await asyncio.to_thread(export, "--since-last")
    assert refused.returncode != 0 and "no manifest.json" in refused.stderr
    done = await asyncio.to_thread(export)
    assert done.returncode == 0, done.stderr
    assert "exported 1 products, 3 images" in done.stdout
    async with session_scope(sessions) as session:
        session.add(CrawlRun(site="fixture"))
    await asyncio.to_thread(export)  # records that run
    incremental = await asyncio.to_thread(export, "--since-last")
    assert incremental.returncode == 0, incremental.stderr
    assert "exported 0 products" in incremental.stdout
    assert len(_pairs(tmp_path)) == 3


async def _padded_keys(sessions: Sessions, product: Product) -> list[str]:
    async with sessions() as session:
        rows = await session.exec(
            select(CatalogImage.padded_blob_key)
            .join(ProductImage, col(ProductImage.image_sha256) == col(CatalogImage.sha256))
            .where(col(ProductImage.product_id) == product.id)
            .order_by(col(ProductImage.position))
        )
        return list(rows.all())


async def test_images_missing_from_the_blob_store_are_left_out_and_counted(
    sessions: Sessions, blobs: BlobStore, tmp_path: Path
) -> None:
    dress = await _product(sessions, blobs, "Erdem", "Floral midi dress", images=3)
    coat = await _product(sessions, blobs, "Khaite", "Wool coat", images=2)
    dress_keys = await _padded_keys(sessions, dress)
    for key in [dress_keys[1], *await _padded_keys(sessions, coat)]:
        await blobs.delete(key)  # the blob store lost them, the rows stayed

    summary = await export_catalog(sessions, blobs, tmp_path, site="fixture")

    assert (summary.products, summary.images, summary.images_missing) == (1, 2, 3)
    assert _folders(tmp_path) == {"Erdem Floral midi dress"}
    pairs = _pairs(tmp_path)
    assert [p["image"] for p in pairs] == [f"Erdem Floral midi dress/{i}.png" for i in (0, 1)]
    kept = [(tmp_path / p["image"]).read_bytes() for p in pairs]
    assert kept == [await blobs.get(dress_keys[0]), await blobs.get(dress_keys[2])]
    assert json.loads((tmp_path / "manifest.json").read_text())["images_missing"] == 3
