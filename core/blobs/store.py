"""The blob store: photos, LoRA weights and generated images, by key.

Keys are "/"-separated relative paths (``subjects/<uuid>/photos/0.png``). They
are validated before they touch a filesystem, so a key can never name anything
outside the store. ``LocalBlobStore`` keeps blobs as files under one root;
``core.blobs.s3.S3BlobStore`` keeps them in an S3 bucket, chosen by the
``blob_url`` setting. A "prefix" means whole path segments (``subjects/a``
covers ``subjects/a/x`` but not ``subjects/ab``), which an object store honours
by listing ``prefix + "/"``.

Blobs are served through the API (``BlobStore.stream``), never by handing out a
file path or a presigned URL: the API's key and ownership checks stay the only
way to read them, and the object store need not be reachable by clients. (A
signed media URL, ``core.blobs.signing``, is the API's own URL too.)
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Final, Protocol

from core.errors import NotFound
from core.settings import Settings

_FORBIDDEN_SEGMENTS: Final = frozenset({"", ".", ".."})
_FORBIDDEN_CHARS: Final = ("\\", "\x00")
# put() may race a concurrent delete that prunes the directory it just created;
# recreating it a couple of times settles that without looping forever.
_PUT_ATTEMPTS: Final = 3
_TEMP_SUFFIX: Final = ".tmp"
# Bytes per chunk a stream yields: Starlette's FileResponse.chunk_size, which
# served blobs before they were streamed through the store.
STREAM_CHUNK_BYTES: Final = 64 * 1024


class BlobNotFound(NotFound):
    """A row points at bytes that are gone: the API answers 404, a job fails for good."""

    def __init__(self, key: str) -> None:
        super().__init__("the stored file is missing")
        self.key = key


class RangeNotSatisfiable(Exception):
    """No byte of a requested range lies within the blob, of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested byte lies within the blob's {size}")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    """One span of a blob, asked for before its size is known (HTTP's byte ranges):
    bytes ``first``..``last`` inclusive (``last`` None: to the end), or with
    ``suffix`` the final ``suffix`` bytes. With ``if_etag``, the span only of that
    version of the blob; any other version is read whole (HTTP's If-Range)."""

    first: int = 0
    last: int | None = None
    suffix: int | None = None
    if_etag: str | None = None

    def resolve(self, size: int) -> tuple[int, int]:
        """The ``[start, stop)`` offsets within ``size`` bytes; a span reaching past
        the end is cut short. Raises RangeNotSatisfiable when nothing is left."""
        if self.suffix is not None:
            start, stop = max(size - self.suffix, 0), size if self.suffix else 0
        else:
            start = self.first
            stop = size if self.last is None else min(self.last + 1, size)
        if start >= stop:
            raise RangeNotSatisfiable(size)
        return start, stop


@dataclass(frozen=True)
class BlobStream:
    """An opened blob. Size, time and ETag are known before the first byte, so a
    response can carry them as headers, and a missing blob is a 404 rather than a
    response broken halfway."""

    size: int
    modified: datetime
    etag: str | None  # quoted, as in an HTTP ETag header
    chunks: AsyncIterator[bytes]
    # The [start, stop) offsets the chunks cover when a range was read; None: all.
    span: tuple[int, int] | None = None


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes:
        """Raises BlobNotFound."""
        ...

    async def stream(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Open the blob, or the span of it ``byte_range`` asks for, for reading in
        chunks. Raises BlobNotFound, RangeNotSatisfiable."""
        ...

    async def delete(self, key: str) -> None:
        """Deleting a missing blob is not an error."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix``; return how many were deleted."""
        ...

    async def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str: ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative path, else raise ValueError."""
    if any(c in key for c in _FORBIDDEN_CHARS):
        raise ValueError(f"invalid blob key {key!r}: backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"invalid blob key {key!r}: absolute path")
    if any(segment in _FORBIDDEN_SEGMENTS for segment in key.split("/")):
        raise ValueError(f"invalid blob key {key!r}: empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is a key, optionally ending in "/"; the empty prefix (the whole
    store) is refused so a bug cannot wipe everything in one call."""
    return check_key(prefix.removesuffix("/"))


class LocalBlobStore:
    """Blobs as files under ``root``. Writes are atomic: a reader sees the old
    blob or the new one, and a crash never leaves half a file under a key."""

    def __init__(self, root: Path) -> None:
        # Absolute, so file:// URLs and the pruning boundary are well defined.
        self.root = Path(root).resolve()

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_atomic, self._path(key), data)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    async def stream(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        path = self._path(key)
        try:
            # Opened now, not when the first chunk is read: a blob deleted while
            # it is being sent still reads to its end.
            file = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc
        stat = os.fstat(file.fileno())
        etag = _stat_etag(stat)
        span = None
        if byte_range is not None and byte_range.if_etag in (None, etag):
            try:
                span = byte_range.resolve(stat.st_size)
            except RangeNotSatisfiable:
                file.close()
                raise
            file.seek(span[0])
        return BlobStream(
            size=stat.st_size,
            modified=datetime.fromtimestamp(stat.st_mtime, UTC),
            etag=etag,
            chunks=_file_chunks(file, span[1] - span[0] if span else stat.st_size),
            span=span,
        )

    def open_path(self, key: str) -> Path:
        """The file holding the blob, for local tools; not part of ``BlobStore``.
        Raises BlobNotFound."""
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete_file, self._path(key))

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete_tree, self._path(check_prefix(prefix)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    # --- synchronous helpers, run in a worker thread ---------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = _temp_file_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name is
            # Same directory as the target, so this is a rename within one
            # filesystem: readers see the old blob or the new one, never half.
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _delete_file(self, path: Path) -> None:
        with suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
            self._prune(path.parent)

    def _delete_tree(self, path: Path) -> int:
        if path.is_file():
            path.unlink()
            self._prune(path.parent)
            return 1
        if not path.is_dir():
            return 0
        deleted = 0
        # Bottom-up, so each directory is empty by the time it is removed.
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for filename in filenames:
                with suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, filename))
                    deleted += 1
            for dirname in dirnames:
                _remove_dir_entry(os.path.join(dirpath, dirname))
        _rmdir_if_empty(path)
        self._prune(path.parent)
        return deleted

    def _prune(self, directory: Path) -> None:
        """Remove ``directory`` and its ancestors while empty, stopping at root."""
        while directory != self.root and directory.is_relative_to(self.root):
            if not _rmdir_if_empty(directory):
                return
            directory = directory.parent


def _temp_file_beside(path: Path) -> tuple[int, str]:
    attempts_left = _PUT_ATTEMPTS
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
        except FileNotFoundError:
            # A concurrent delete pruned the directory we just made; remake it.
            attempts_left -= 1
            if not attempts_left:
                raise


def _rmdir_if_empty(directory: str | Path) -> bool:
    """True if removed (or already gone); False if something is still in it,
    e.g. a put() that landed while we were deleting around it."""
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _remove_dir_entry(path: str) -> None:
    # os.walk lists a symlink to a directory among the directories without
    # descending into it; unlink the link itself, never what it points to.
    if os.path.islink(path):
        os.unlink(path)
    else:
        _rmdir_if_empty(path)


def _stat_etag(stat: os.stat_result) -> str:
    # Starlette's FileResponse ETag (md5 of "mtime-size"), so the local backend's
    # validators did not change when blobs moved from FileResponse to stream().
    base = f"{stat.st_mtime}-{stat.st_size}"
    return f'"{hashlib.md5(base.encode(), usedforsecurity=False).hexdigest()}"'


async def _file_chunks(file: BufferedReader, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes from the file's position on, at most: a range stops short of
    the end, and a whole blob stops at the size its headers announced."""
    try:
        while length > 0 and (
            chunk := await asyncio.to_thread(file.read, min(STREAM_CHUNK_BYTES, length))
        ):
            length -= len(chunk)
            yield chunk
    finally:
        file.close()


def blob_store_from_settings(s: Settings) -> BlobStore:
    """The S3 store when ``blob_url`` names one (``s3://bucket/prefix``), else
    local files under ``blob_dir``. Call it once per process: an S3 store holds
    its connection pool."""
    if s.blob_url is None:
        return LocalBlobStore(s.blob_dir)
    # Imported here: core.blobs.s3 builds on this module's types.
    from core.blobs.s3 import S3BlobStore

    return S3BlobStore.from_settings(s)
