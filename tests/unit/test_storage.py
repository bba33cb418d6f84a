"""core.blobs.store: the local blob store, its key rules, and choosing a backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.blobs.s3 import S3BlobStore
from core.blobs.store import (
    STREAM_CHUNK_BYTES,
    BlobNotFound,
    BlobStore,
    LocalBlobStore,
    blob_store_from_settings,
    check_key,
)
from core.settings import Settings

PHOTO = "subjects/abc/photos/0.png"


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.asyncio
async def test_put_get_exists_delete_roundtrip(store: LocalBlobStore) -> None:
    assert not await store.exists(PHOTO)

    await store.put(PHOTO, b"first")
    assert await store.exists(PHOTO)
    assert await store.get(PHOTO) == b"first"
    assert store.open_path(PHOTO).read_bytes() == b"first"

    await store.put(PHOTO, b"second")  # overwrite
    assert await store.get(PHOTO) == b"second"

    await store.delete(PHOTO)
    assert not await store.exists(PHOTO)
    await store.delete(PHOTO)  # deleting what is gone is fine


@pytest.mark.asyncio
async def test_put_leaves_no_temp_files(store: LocalBlobStore) -> None:
    for i in range(3):
        await store.put(f"subjects/abc/photos/{i}.png", bytes([i]) * 1000)
        await store.put(f"subjects/abc/photos/{i}.png", bytes([i + 1]) * 10)

    assert files_under(store.root) == [f"subjects/abc/photos/{i}.png" for i in range(3)]


@pytest.mark.asyncio
async def test_failed_write_keeps_the_old_blob_and_no_temp_file(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put(PHOTO, b"old")

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        await store.put(PHOTO, b"new and half written")

    assert await store.get(PHOTO) == b"old"
    assert files_under(store.root) == [PHOTO]


@pytest.mark.asyncio
async def test_missing_blob_raises_blob_not_found(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFound) as info:
        await store.get(PHOTO)
    assert info.value.key == PHOTO
    with pytest.raises(BlobNotFound):
        store.open_path(PHOTO)

    await store.put(PHOTO, b"x")
    with pytest.raises(BlobNotFound):  # a "directory" is not a blob
        await store.get("subjects/abc")
    with pytest.raises(BlobNotFound):
        store.open_path("subjects/abc/photos")


@pytest.mark.asyncio
async def test_delete_prefix_removes_the_tree_and_prunes_empty_parents(
    store: LocalBlobStore,
) -> None:
    keys = [
        "subjects/abc/photos/0.png",
        "subjects/abc/photos/1.png",
        "subjects/abc/loras/tiny/job.safetensors",
    ]
    for key in keys:
        await store.put(key, b"x")
    await store.put("subjects/abcd/photos/0.png", b"keep")  # shares a string prefix only

    assert await store.delete_prefix("subjects/abc/") == len(keys)

    assert files_under(store.root) == ["subjects/abcd/photos/0.png"]
    assert not (store.root / "subjects" / "abc").exists()

    assert await store.delete_prefix("subjects/abcd") == 1
    assert not (store.root / "subjects").exists()  # emptied parents pruned
    assert store.root.is_dir()  # never the root itself
    assert await store.delete_prefix("subjects/nothing-here") == 0


@pytest.mark.asyncio
async def test_delete_prunes_empty_parents(store: LocalBlobStore) -> None:
    await store.put(PHOTO, b"x")
    await store.put("subjects/abc/notes.txt", b"y")

    await store.delete(PHOTO)
    assert not (store.root / "subjects" / "abc" / "photos").exists()
    assert (store.root / "subjects" / "abc" / "notes.txt").is_file()


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside.png",
        "subjects/../../outside.png",
        "subjects/./abc.png",
        "subjects//abc.png",
        "subjects/abc/",
        "subjects\\abc.png",
        "..\\outside.png",
        "subjects/a\x00b.png",
    ],
)
@pytest.mark.asyncio
async def test_bad_keys_are_refused(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        store.url(key)
    assert not store.root.exists()  # nothing was written anywhere


@pytest.mark.parametrize("prefix", ["", "/", "..", "../x", "subjects//"])
@pytest.mark.asyncio
async def test_bad_prefixes_are_refused(store: LocalBlobStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        await store.delete_prefix(prefix)


def test_url_is_an_absolute_file_url(store: LocalBlobStore) -> None:
    url = store.url("subjects/abc/photo 1.png")
    assert url.startswith("file:///")
    assert url.endswith("/subjects/abc/photo%201.png")
    assert url == (store.root / "subjects" / "abc" / "photo 1.png").as_uri()


def test_store_from_settings_uses_blob_dir(tmp_path: Path) -> None:
    store: BlobStore = blob_store_from_settings(Settings(blob_dir=tmp_path / "b"))
    assert isinstance(store, LocalBlobStore)
    assert store.root == (tmp_path / "b").resolve()


@pytest.mark.asyncio
async def test_stream_reads_in_chunks_and_survives_a_delete(store: LocalBlobStore) -> None:
    data = os.urandom(2 * STREAM_CHUNK_BYTES + 1)
    await store.put(PHOTO, data)
    blob = await store.stream(PHOTO)
    await store.delete(PHOTO)  # after opening: what was opened is still read whole

    chunks = [chunk async for chunk in blob.chunks]
    assert [len(c) for c in chunks] == [STREAM_CHUNK_BYTES, STREAM_CHUNK_BYTES, 1]
    assert b"".join(chunks) == data and blob.size == len(data)
    with pytest.raises(BlobNotFound):
        await store.stream(PHOTO)
    await store.put(PHOTO, b"x")
    with pytest.raises(BlobNotFound):  # a "directory" is not a blob
        await store.stream("subjects/abc/photos")


def test_store_from_settings_uses_s3_when_blob_url_is_set() -> None:
    store = blob_store_from_settings(
        Settings(blob_url="s3://atelier/blobs", s3_endpoint_url="http://127.0.0.1:1")
    )
    assert isinstance(store, S3BlobStore)  # no request is made until a blob is used
    assert store.url(PHOTO) == f"s3://atelier/blobs/{PHOTO}"
    with pytest.raises(ValueError, match="ATELIER_BLOB_URL"):
        blob_store_from_settings(Settings(blob_url="/var/blobs"))
