"""bench.search_latency's setup: its database, catalog and versions, and one API process.

The catalog is crawled and embedded once through the demo's stack into a database of
its own; ``--vit`` adds a ViT-B-16-shaped version (random weights) beside the tiny one.
``ApiProcess`` is the Procfile's ``web`` line alone, with the environment a variant sets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from bench.bench_stack import crawl_and_embed, migrate, restore_signals
from bench.query_embedding import build_model, export
from core.blobs.store import blob_store_from_settings
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.db.shop_models import ProductEmbedding
from core.handlers.clip_catalog import onnx_prefix
from core.settings import Settings
from core.shop import feature_store
from core.shop.onnx_encoder import CONFIG_FILE, EncoderConfig
from core.shop.versions import active_version, create_base_version
from demo.__main__ import LOG_DIR, ROOT, Stack, _new_key

BENCH_DIR = ROOT / "var" / "bench-search"
TINY_PROFILE = "tiny"
VIT_PROFILE = "vit-b-16"  # a core.ml.fashion_clip.profiles key: the API only reads the name
VIT_BASE_ID = "bench-random-ViT-B-16"
SEED = 0


# --- the database, the catalog and the versions ------------------------------------------


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[AsyncSession]:
    engine = make_engine(settings)
    try:
        async with session_scope(make_sessionmaker(engine)) as session:
            yield session
    finally:
        await engine.dispose()


async def index_rows(settings: Settings, profile: str) -> tuple[uuid.UUID | None, int]:
    """The profile's active version and how many index rows it has."""
    async with _session(settings) as session:
        version = await active_version(session, profile)
        if version is None:
            return None, 0
        count = select(func.count()).where(col(ProductEmbedding.model_id) == version.id)
        return version.id, int((await session.exec(count)).one())


def vit_export() -> dict[str, bytes]:
    """A ViT-B-16-shaped encoder (random weights) exported once into var/bench-search,
    as files (name -> bytes)."""
    target = BENCH_DIR / "vit-b-16-onnx"
    if not (target / CONFIG_FILE).exists():
        shutil.rmtree(target, ignore_errors=True)
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".vit-", dir=BENCH_DIR) as staging:
            print("exporting a ViT-B-16-shaped encoder (random weights) to ONNX")
            export(build_model("ViT-B-16"), Path(staging) / "onnx")
            os.rename(Path(staging) / "onnx", target)
    return {path.name: path.read_bytes() for path in sorted(target.iterdir()) if path.is_file()}


async def ensure_vit_version(
    settings: Settings, files: dict[str, bytes], tiny_id: uuid.UUID
) -> None:
    """An active vit-b-16 version: its exported files in the blob store where a version's
    encoder lives, and a random unit vector for every (product, image) the tiny version
    indexes (latency does not depend on the values)."""
    async with _session(settings) as session:
        if await active_version(session, VIT_PROFILE) is not None:
            return
        model_id = uuid.uuid4()
        store = blob_store_from_settings(settings)
        for name, data in files.items():
            await store.put(f"{onnx_prefix(model_id)}/{name}", data)
        made = await create_base_version(
            session, VIT_PROFILE, VIT_BASE_ID, onnx_prefix(model_id), list(files),
            model_id=model_id,
        )  # fmt: skip
        assert made is not None
        pairs = sorted(await feature_store.embedded_pairs(session, tiny_id))
        dim = EncoderConfig.from_json(files[CONFIG_FILE].decode()).embed_dim
        vectors = np.random.default_rng(SEED).standard_normal((len(pairs), dim), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [feature_store.ProductImageRow(pid, sha) for pid, sha in pairs]
        await feature_store.put_embeddings(session, model_id, rows, vectors)


def prepare(settings: Settings, args: argparse.Namespace) -> str:
    """Migrate, fill the catalog unless it is there; returns an API key."""
    asyncio.run(migrate(settings))
    key = asyncio.run(_new_key(settings))
    tiny_id, rows = asyncio.run(index_rows(settings, TINY_PROFILE))
    if not rows:
        crawl_and_embed(key, args.port, args.shop_port)
        tiny_id, rows = asyncio.run(index_rows(settings, TINY_PROFILE))
    if tiny_id is None or not rows:
        raise SystemExit("the catalog was not embedded; see var/log/")
    print(f"catalog index: {rows:,} rows (tiny version {tiny_id})")
    if args.vit:
        asyncio.run(ensure_vit_version(settings, vit_export(), tiny_id))
    return key


# --- one API process ---------------------------------------------------------------------


class ApiProcess(Stack):
    """The Procfile's web line alone, with an environment of its own."""

    def __init__(self, port: int, env: dict[str, str]) -> None:
        super().__init__(port)
        self.env = env

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        cmd = ["uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(LOG_DIR / "bench-search-web.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", *cmd], cwd=ROOT, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.children.append(child)

    @property
    def pid(self) -> int:
        return self.children[0].pid

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stop(self) -> None:
        super().stop()
        restore_signals()
