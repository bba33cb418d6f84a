"""Export the catalog as a training set: folders of padded images + pairs.jsonl.

    python -m core.catalog.export --to DIR [--site S] [--since-run RUN_ID | --since-last]

Layout (the seed data's): one folder per product, named by its text descriptor
"<designer> <description>" (made safe for file systems, truncated, and given a
short id suffix when another product already has that name), holding its
padded square images 0.png, 1.png...; ``pairs.jsonl`` with one line per image
(path relative to DIR, the caption the fashion CLIP trains on, "<designer> <name>:
<description> | <category path>" from ``product_text``, product id, sha256) for
CLIP fine-tuning; ``manifest.json`` with what the export covered.

Incremental: ``--since-run`` exports only products changed since that crawl run
started; ``--since-last`` takes the run the previous export recorded. A product
exported again replaces its folder's images and its lines in pairs.jsonl; if its
descriptor changed, its old folder goes. Each folder holds a ``.product_id``
file, so a folder name is known to belong to the product or to another one.

Products are read in keyset chunks, never all at once; what is kept in memory
is one product id and folder name per exported product. An image whose padded
blob is missing from the blob store (a wrong ATELIER_BLOB_DIR, a store restored
without it) is logged, counted in the manifest and left out; a product left
with no image keeps what an earlier export wrote for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobNotFound, BlobStore, blob_store_from_settings
from core.db.catalog_models import CatalogImage, CrawlRun, Product, ProductImage
from core.db.engine import make_engine, make_sessionmaker
from core.db.models import utcnow
from core.errors import NotFound
from core.ml.fashion_clip.features import product_text
from core.settings import get_settings

log = logging.getLogger("atelier.catalog")

PAIRS = "pairs.jsonl"
MANIFEST = "manifest.json"
OWNER_FILE = ".product_id"
CHUNK = 200
# Folder names stay well under the 255-byte limit of common file systems, with
# room for the id suffix.
_MAX_NAME_BYTES = 160
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')
_SPACES = re.compile(r"\s+")


@dataclass
class ExportSummary:
    products: int = 0
    images: int = 0
    pairs: int = 0  # lines in pairs.jsonl after the export
    folders_removed: int = 0
    images_missing: int = 0  # rows whose padded blob the store did not have
    exported_at: str = ""
    site: str | None = None
    since_run: str | None = None
    # The newest crawl run when the export began: where the next one picks up.
    last_run_id: str | None = None


def folder_name(designer: str, description: str) -> str:
    """'<designer> <description>' as a portable folder name."""
    text = unicodedata.normalize("NFC", f"{designer} {description}")
    text = _SPACES.sub(" ", _UNSAFE.sub(" ", text)).strip().lstrip(".")
    encoded = text.encode()
    if len(encoded) > _MAX_NAME_BYTES:
        text = encoded[:_MAX_NAME_BYTES].decode(errors="ignore")
        if " " in text:  # end on a whole word
            text = text.rsplit(" ", 1)[0]
    # Windows refuses names ending in a dot or a space.
    return text.rstrip(". ") or "product"


def suffixed(name: str, product_id: uuid.UUID) -> str:
    return f"{name} [{product_id.hex[:8]}]"


def pair_text(product: Product) -> str:
    """The caption the clip_finetune jobs train on, so an export trains the same model."""
    return product_text(product.designer, product.name, product.description, product.category_path)


async def export_catalog(
    sessions: async_sessionmaker[AsyncSession],
    store: BlobStore,
    to: Path,
    *,
    site: str | None = None,
    since_run: uuid.UUID | None = None,
    chunk: int = CHUNK,
) -> ExportSummary:
    await asyncio.to_thread(to.mkdir, parents=True, exist_ok=True)
    summary = ExportSummary(exported_at=utcnow().isoformat(), site=site)
    async with sessions() as session:
        since = await _run_started(session, since_run) if since_run else None
        summary.since_run = str(since_run) if since_run else None
        summary.last_run_id = await _latest_run(session, site)
    exported: dict[uuid.UUID, str] = {}  # product id -> its folder, this export
    fresh = to / f"{PAIRS}.tmp"
    with fresh.open("w", encoding="utf-8") as pairs:
        async for product, listed in _products(sessions, site, since, chunk):
            images, pngs = await _stored_images(store, listed)
            summary.images_missing += len(listed) - len(images)
            if not images:
                continue
            folder = await asyncio.to_thread(_write_folder, to, product, pngs)
            exported[product.id] = folder
            for position, image in enumerate(images):
                pairs.write(json.dumps(_pair(folder, position, product, image)) + "\n")
            summary.products += 1
            summary.images += len(images)
    kept, summary.folders_removed = await asyncio.to_thread(_merge_old_pairs, to, exported)
    summary.pairs = summary.images + kept
    os.replace(fresh, to / PAIRS)
    manifest = json.dumps(asdict(summary), indent=2) + "\n"
    await asyncio.to_thread((to / MANIFEST).write_text, manifest)
    return summary


async def _stored_images(
    store: BlobStore, images: list[CatalogImage]
) -> tuple[list[CatalogImage], list[bytes]]:
    """The images whose padded blob the store has, with those blobs, in order."""
    kept: list[CatalogImage] = []
    pngs: list[bytes] = []
    for image in images:
        try:
            pngs.append(await store.get(image.padded_blob_key))
        except BlobNotFound:
            # INFO: a wrong blob dir misses every image; the summary gives the count.
            log.info("catalog image %s: no blob %s, left out", image.sha256,
                     image.padded_blob_key)  # fmt: skip
            continue
        kept.append(image)
    return kept, pngs


def _pair(folder: str, position: int, product: Product, image: CatalogImage) -> dict[str, str]:
    return {
        "image": f"{folder}/{position}.png",
        "text": pair_text(product),
        "product_id": str(product.id),
        "sha256": image.sha256,
    }


async def _run_started(session: AsyncSession, run_id: uuid.UUID) -> datetime:
    run = await session.get(CrawlRun, run_id)
    if run is None:
        raise NotFound(f"crawl run {run_id} not found")
    return run.started_at


async def _latest_run(session: AsyncSession, site: str | None) -> str | None:
    query = select(CrawlRun.id).order_by(col(CrawlRun.started_at).desc()).limit(1)
    if site:
        query = query.where(col(CrawlRun.site) == site)
    latest = (await session.exec(query)).first()
    return str(latest) if latest else None


async def _products(
    sessions: async_sessionmaker[AsyncSession],
    site: str | None,
    since: datetime | None,
    chunk: int,
) -> AsyncIterator[tuple[Product, list[CatalogImage]]]:
    """Products with at least one image, by id, a chunk per short transaction."""
    after: uuid.UUID | None = None
    while True:
        query = select(Product).order_by(col(Product.id)).limit(chunk)
        if site:
            query = query.where(col(Product.site) == site)
        if since:
            query = query.where(col(Product.changed_at) >= since)
        if after:
            query = query.where(col(Product.id) > after)
        async with sessions() as session:
            products = list((await session.exec(query)).all())
            images = await _images_of(session, [p.id for p in products])
        for product in products:
            if images.get(product.id):
                yield product, images[product.id]
        if len(products) < chunk:
            return
        after = products[-1].id


async def _images_of(
    session: AsyncSession, product_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[CatalogImage]]:
    query = (
        select(ProductImage.product_id, CatalogImage)
        .join(CatalogImage, col(CatalogImage.sha256) == col(ProductImage.image_sha256))
        .where(col(ProductImage.product_id).in_(product_ids))
        .order_by(col(ProductImage.product_id), col(ProductImage.position))
    )
    found: dict[uuid.UUID, list[CatalogImage]] = {}
    for product_id, image in (await session.exec(query)).all():
        found.setdefault(product_id, []).append(image)
    return found


def _claim_folder(to: Path, product: Product) -> str:
    """The product's folder: its descriptor unless another product owns that name
    (from this export or an earlier one: the owner file says which)."""
    base = folder_name(product.designer, product.description)
    for name in (base, suffixed(base, product.id)):
        if _owner(to / name) in (None, product.id):
            return name
    raise RuntimeError(f"folder {suffixed(base, product.id)!r} belongs to another product")


def _owner(folder: Path) -> uuid.UUID | None:
    try:
        return uuid.UUID((folder / OWNER_FILE).read_text().strip())
    except FileNotFoundError:
        return None


def _write_folder(to: Path, product: Product, pngs: list[bytes]) -> str:
    """Claim the product's folder and make its images exactly ``pngs``."""
    name = _claim_folder(to, product)
    folder = to / name
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    (folder / OWNER_FILE).write_text(f"{product.id}\n")
    for position, png in enumerate(pngs):
        (folder / f"{position}.png").write_bytes(png)
    return name


def _merge_old_pairs(to: Path, exported: dict[uuid.UUID, str]) -> tuple[int, int]:
    """Append the previous export's lines for products not exported now; remove
    the folders of re-exported products whose name changed. Returns (lines kept,
    folders removed)."""
    old = to / PAIRS
    kept = removed = 0
    if not old.exists():
        return kept, removed
    with old.open(encoding="utf-8") as lines, (to / f"{PAIRS}.tmp").open("a") as fresh:
        for line in lines:
            pair = json.loads(line)
            product_id = uuid.UUID(pair["product_id"])
            new_folder = exported.get(product_id)
            if new_folder is None:
                fresh.write(line)
                kept += 1
                continue
            old_folder = to / pair["image"].rsplit("/", 1)[0]
            if old_folder.name != new_folder and _owner(old_folder) == product_id:
                shutil.rmtree(old_folder)
                removed += 1
    return kept, removed


def _previous_run(to: Path) -> uuid.UUID:
    try:
        manifest = json.loads((to / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise SystemExit(f"--since-last: no {MANIFEST} in {to}; export once without it") from exc
    if not manifest.get("last_run_id"):
        raise SystemExit(f"--since-last: {to / MANIFEST} records no crawl run")
    return uuid.UUID(manifest["last_run_id"])


async def _main(args: argparse.Namespace) -> None:
    settings = get_settings()
    since = _previous_run(args.to) if args.since_last else args.since_run
    engine = make_engine(settings)
    try:
        summary = await export_catalog(
            make_sessionmaker(engine),
            blob_store_from_settings(settings),
            args.to,
            site=args.site,
            since_run=since,
        )
    finally:
        await engine.dispose()
    print(
        f"exported {summary.products:,} products, {summary.images:,} images to {args.to}; "
        f"{summary.pairs:,} pairs in {PAIRS}"
        + (f"; {summary.images_missing:,} images missing from the blob store, left out"
           if summary.images_missing else "")
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m core.catalog.export", description=__doc__)
    parser.add_argument("--to", type=Path, required=True, help="the export folder")
    parser.add_argument("--site", help="only this site's products")
    since = parser.add_mutually_exclusive_group()
    since.add_argument("--since-run", type=uuid.UUID, help="only products changed since this run")
    since.add_argument(
        "--since-last", action="store_true", help="since the run the last export recorded"
    )
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
