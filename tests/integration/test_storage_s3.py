"""Both blob stores, the same checks: local files and S3 (a real SeaweedFS
gateway, no mocks), and the API serving outputs and catalog images from each."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient
from obstore.store import S3Store
from PIL import Image
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.s3 import S3BlobStore
from core.blobs.store import (
    STREAM_CHUNK_BYTES,
    BlobNotFound,
    BlobStore,
    BlobStream,
    LocalBlobStore,
    blob_store_from_settings,
)
from core.catalog.images import ingest_image
from core.db.engine import session_scope
from core.settings import Settings
from tests.conftest import S3Server
from tests.integration.generated_rows import add_generated_output

Sessions = async_sessionmaker[AsyncSession]
PHOTO = "subjects/abc/photos/0.png"
BACKENDS = ["local", "s3"]
# SeaweedFS accepts any credentials while it has no identities configured.
# Any credentials do: the test gateway has no identities configured.
TEST_KEY_ID = TEST_SECRET = "atelier-test"
S3_KEY_FIELDS = ("s3_access_key_id", "s3_secret_access_key")


def s3_settings(server: S3Server, prefix: str) -> Settings:
    return Settings(
        blob_url=f"s3://{server.bucket}/{prefix}",
        s3_endpoint_url=server.endpoint_url,
        s3_region="us-east-1",
        s3_access_key_id=TEST_KEY_ID,
        s3_secret_access_key=SecretStr(TEST_SECRET),
    )


async def _empty(server: S3Server, prefix: str) -> None:
    await S3BlobStore.from_settings(s3_settings(server, "")).delete_prefix(prefix)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """Each backend in turn; an S3 store gets a prefix of its own, emptied after."""
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    server: S3Server = request.getfixturevalue("seaweedfs")
    prefix = f"t-{uuid.uuid4().hex}"
    yield S3BlobStore.from_settings(s3_settings(server, prefix))
    await _empty(server, prefix)


@pytest.fixture
async def paged_s3_store(seaweedfs: S3Server) -> AsyncIterator[BlobStore]:
    """Listing pages of two keys, so a few keys take several pages."""
    prefix = f"t-{uuid.uuid4().hex}"
    yield S3BlobStore.from_settings(s3_settings(seaweedfs, prefix), page_keys=2)
    await _empty(seaweedfs, prefix)


async def read_stream(store: BlobStore, key: str) -> tuple[BlobStream, list[bytes]]:
    """The opened blob and its chunks, read to the end (which closes it)."""
    blob = await store.stream(key)
    return blob, [chunk async for chunk in blob.chunks]


async def test_put_get_overwrite_exists_delete(store: BlobStore) -> None:
    assert not await store.exists(PHOTO)
    await store.put(PHOTO, b"first")
    assert await store.exists(PHOTO)
    assert await store.get(PHOTO) == b"first"
    await store.put(PHOTO, b"second")
    assert await store.get(PHOTO) == b"second"
    await store.delete(PHOTO)
    assert not await store.exists(PHOTO)
    await store.delete(PHOTO)  # deleting what is gone is fine


async def test_missing_blob_and_directories_are_not_found(store: BlobStore) -> None:
    for read in (store.get, store.stream):
        with pytest.raises(BlobNotFound) as info:
            await read(PHOTO)
        assert info.value.key == PHOTO
    await store.put(PHOTO, b"x")
    for parent in ("subjects/abc", "subjects/abc/photos"):  # a "directory" is not a blob
        assert not await store.exists(parent)
        with pytest.raises(BlobNotFound):
            await store.get(parent)
        with pytest.raises(BlobNotFound):
            await store.stream(parent)


async def test_delete_prefix_takes_whole_segments(store: BlobStore) -> None:
    under = ["subjects/abc/photos/0.png", "subjects/abc/photos/1.png", "subjects/abc/lora.st"]
    for key in [*under, "subjects/abcd/photos/0.png"]:  # abcd shares a string prefix only
        await store.put(key, b"x")

    assert await store.delete_prefix("subjects/abc/") == len(under)
    assert not any([await store.exists(key) for key in under])
    assert await store.get("subjects/abcd/photos/0.png") == b"x"

    assert await store.delete_prefix("subjects/abcd/photos/0.png") == 1  # one blob
    assert not await store.exists("subjects/abcd/photos/0.png")
    assert await store.delete_prefix("subjects/nothing-here") == 0


async def test_s3_delete_prefix_reads_every_listing_page(paged_s3_store: BlobStore) -> None:
    store = paged_s3_store
    keys = [f"subjects/abc/photos/{i}.png" for i in range(5)]  # three pages of two
    for key in keys:
        await store.put(key, b"x")
    assert await store.delete_prefix("subjects/abc") == len(keys)
    assert not any([await store.exists(key) for key in keys])


async def test_stream_gives_the_bytes_in_chunks_with_metadata(store: BlobStore) -> None:
    data = os.urandom(3 * STREAM_CHUNK_BYTES + 1000)
    before = datetime.now(UTC) - timedelta(seconds=5)  # S3 times are whole seconds
    await store.put(PHOTO, data)

    blob, chunks = await read_stream(store, PHOTO)
    assert b"".join(chunks) == data
    assert len(chunks) > 1  # streamed, not read whole
    assert blob.size == len(data)
    assert blob.etag and blob.etag.startswith('"')
    assert before <= blob.modified <= datetime.now(UTC) + timedelta(seconds=5)

    await store.put(PHOTO, b"changed")
    changed, chunks = await read_stream(store, PHOTO)
    assert changed.etag != blob.etag
    assert b"".join(chunks) == b"changed"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x.png", "a//b.png", "a/./b", "a\\b"])
async def test_bad_keys_are_refused(key: str, store: BlobStore) -> None:
    for call in (store.get, store.stream, store.exists, store.delete):
        with pytest.raises(ValueError):
            await call(key)
    with pytest.raises(ValueError):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        store.url(key)
    with pytest.raises(ValueError):
        await store.delete_prefix("/" if not key else key)


def test_s3_url_names_bucket_prefix_and_key(seaweedfs: S3Server) -> None:
    store = blob_store_from_settings(s3_settings(seaweedfs, "blobs"))
    assert isinstance(store, S3BlobStore)
    assert store.url(PHOTO) == f"s3://{seaweedfs.bucket}/blobs/{PHOTO}"
    bare = S3BlobStore(S3Store(seaweedfs.bucket))
    assert bare.url(PHOTO) == f"s3://{seaweedfs.bucket}/{PHOTO}"


# --- the API, reading from either backend -------------------------------------------


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60, 90), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=BACKENDS)
async def api(
    request: pytest.FixtureRequest, settings: Settings, sessions: Sessions
) -> AsyncIterator[tuple[AsyncClient, BlobStore]]:
    """The app on each backend in turn, and its store for arranging blobs."""
    from api.app import create_app

    server: S3Server | None = None
    prefix = f"t-{uuid.uuid4().hex}"
    if request.param == "s3":
        server = request.getfixturevalue("seaweedfs")
        settings = settings.model_copy(update=s3_settings(server, prefix).model_dump(
            include={"blob_url", "s3_endpoint_url", "s3_region", *S3_KEY_FIELDS}
        ))  # fmt: skip
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert isinstance(app.state.store, S3BlobStore) is (server is not None)
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http, app.state.store
    if server is not None:
        await _empty(server, prefix)


async def _output(sessions: Sessions, blob_key: str) -> tuple[uuid.UUID, dict[str, str]]:
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "shopper")
        output = await add_generated_output(session, new.account_id, blob_key, 60, 90)
        return output.id, {"Authorization": f"Bearer {new.key}"}


async def test_api_serves_an_output_image(
    api: tuple[AsyncClient, BlobStore], sessions: Sessions
) -> None:
    client, store = api
    key, png = f"outputs/{uuid.uuid4()}/0.png", _png((10, 20, 30))
    await store.put(key, png)
    output_id, auth = await _output(sessions, key)

    response = await client.get(f"/v1/outputs/{output_id}", headers=auth)
    assert response.status_code == 200
    assert response.content == png
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-length"] == str(len(png))
    assert response.headers["content-disposition"] == f'inline; filename="{output_id}.png"'
    assert response.headers["etag"] == (await read_stream(store, key))[0].etag
    assert "last-modified" in response.headers

    await store.delete(key)
    gone = await client.get(f"/v1/outputs/{output_id}", headers=auth)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"


async def test_api_serves_a_catalog_image_with_caching_headers(
    api: tuple[AsyncClient, BlobStore], sessions: Sessions
) -> None:
    client, store = api
    # A colour of its own: catalog blobs are content-addressed, and the local
    # store's directory is shared by the session's tests.
    png = _png((os.urandom(1)[0], 100, 100))
    async with session_scope(sessions) as session:
        image = await ingest_image(session, store, png, side=64, max_pixels=10**6)
        auth = {"Authorization": f"Bearer {(await create_account_with_key(session, 'x')).key}"}

    original = await client.get(f"/v1/catalog-images/{image.sha256}?variant=original", headers=auth)
    assert original.status_code == 200 and original.content == png
    padded = await client.get(f"/v1/catalog-images/{image.sha256}", headers=auth)
    assert padded.status_code == 200 and padded.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(padded.content)).size == (64, 64)
    assert padded.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert padded.headers["content-length"] == str(len(padded.content))

    await store.delete(image.padded_blob_key)
    gone = await client.get(f"/v1/catalog-images/{image.sha256}", headers=auth)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"
