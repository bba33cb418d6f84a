"""The blob store in an S3 bucket: AWS, or any S3-compatible server (SeaweedFS in
the tests; MinIO, R2...), chosen by ``ATELIER_BLOB_URL=s3://bucket/prefix``.

The client is obstore (bindings to Rust's ``object_store``), not aiobotocore:
one wheel with no dependencies where aiobotocore brings botocore pinned to its
own narrow range plus four more packages; it ships type stubs; its client runs
on its own Tokio runtime, so one store serves every event loop and thread of a
process with nothing to enter or close (its connection pool goes with the
object), where an aiobotocore client lives in one loop's ``async with``. It also
pages listings and batches deletes (DeleteObjects, 1000 keys a request) itself.

Keys are validated with the same rules as the local store's, so a key means the
same blob in either backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import obstore
from obstore.exceptions import GenericError, PreconditionError
from obstore.store import S3Store

from core.blobs.store import (
    STREAM_CHUNK_BYTES,
    BlobNotFound,
    BlobStream,
    ByteRange,
    check_key,
    check_prefix,
)
from core.settings import Settings

if TYPE_CHECKING:
    from obstore import GetOptions, GetResult, OffsetRange, SuffixRange
    from obstore.store import ClientConfig, S3Config

S3_SCHEME: Final = "s3://"
# Keys per listing page and per delete request: the most S3 returns in one
# ListObjectsV2 page and accepts in one DeleteObjects request.
_PAGE_KEYS: Final = 1000


class S3BlobStore:
    """Blobs as objects under ``prefix`` in one bucket. A PUT replaces an object
    whole, so a reader sees the old blob or the new one, as with local files."""

    def __init__(self, store: S3Store, *, page_keys: int = _PAGE_KEYS) -> None:
        self._store = store
        self._page_keys = page_keys
        bucket = store.config.get("bucket")
        if not bucket:
            raise ValueError("an S3 blob store needs a bucket")
        self._base = f"{S3_SCHEME}{bucket}/" + (f"{store.prefix}/" if store.prefix else "")

    @classmethod
    def from_settings(cls, s: Settings, *, page_keys: int = _PAGE_KEYS) -> S3BlobStore:
        url = s.blob_url or ""
        if not url.startswith(S3_SCHEME):
            raise ValueError(f"ATELIER_BLOB_URL must be {S3_SCHEME}bucket/prefix, not {url!r}")
        config: S3Config = {}
        if s.s3_endpoint_url:
            config["endpoint"] = s.s3_endpoint_url
        if s.s3_region:
            config["region"] = s.s3_region
        if s.s3_access_key_id:
            config["access_key_id"] = s.s3_access_key_id
        if s.s3_secret_access_key:
            config["secret_access_key"] = s.s3_secret_access_key.get_secret_value()
        # A plain-HTTP endpoint is a local S3 server (SeaweedFS, MinIO in dev);
        # object_store refuses http:// unless told.
        client: ClientConfig = {"allow_http": (s.s3_endpoint_url or "").startswith("http://")}
        return cls(S3Store.from_url(url, config=config, client_options=client), page_keys=page_keys)

    async def put(self, key: str, data: bytes) -> None:
        await obstore.put_async(self._store, check_key(key), data)

    async def get(self, key: str) -> bytes:
        try:
            result = await obstore.get_async(self._store, check_key(key))
            return bytes(await result.bytes_async())
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    async def stream(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        try:
            # Returns once the response headers are in: a missing object fails
            # here, before the caller has sent anything.
            result, ranged = await self._get(check_key(key), byte_range)
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc
        meta = result.meta
        return BlobStream(
            size=meta["size"],
            modified=meta["last_modified"],
            etag=meta["e_tag"],
            chunks=result.stream(min_chunk_size=STREAM_CHUNK_BYTES),
            span=result.range if ranged else None,
        )

    async def _get(self, path: str, byte_range: ByteRange | None) -> tuple[GetResult, bool]:
        """The object, or the span of it asked for (a ranged GET: only those bytes
        leave the bucket); True when it is the span."""
        if byte_range is None:
            return await obstore.get_async(self._store, path), False
        options: GetOptions = {"range": _obstore_range(byte_range)}
        if byte_range.if_etag is not None:
            options["if_match"] = byte_range.if_etag
        try:
            return await obstore.get_async(self._store, path, options=options), True
        except PreconditionError:
            # Another version than the client's: it gets the whole of this one.
            return await obstore.get_async(self._store, path), False
        except GenericError:
            # S3's 416 reaches us as a generic error: the object's size tells
            # whether that was the range (RangeNotSatisfiable) or something else.
            byte_range.resolve((await obstore.head_async(self._store, path))["size"])
            raise

    async def delete(self, key: str) -> None:
        # S3 answers a DELETE of a missing key with success.
        await obstore.delete_async(self._store, check_key(key))

    async def delete_prefix(self, prefix: str) -> int:
        segment = check_prefix(prefix)
        deleted = 0
        if await self.exists(segment):  # a blob named exactly the prefix
            await self.delete(segment)
            deleted += 1
        # Listing "segment/" keeps the whole-segment meaning: "subjects/a" never
        # reaches "subjects/ab/...". Each page is deleted as it comes; S3 pages by
        # key order after the last key seen, so deleting behind the listing is safe.
        async for page in obstore.list(self._store, f"{segment}/", chunk_size=self._page_keys):
            paths = [meta["path"] for meta in page]
            await obstore.delete_async(self._store, paths)
            deleted += len(paths)
        return deleted

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, check_key(key))
        except FileNotFoundError:
            return False
        return True

    def url(self, key: str) -> str:
        return self._base + check_key(key)


def _obstore_range(byte_range: ByteRange) -> tuple[int, int] | OffsetRange | SuffixRange:
    if byte_range.suffix is not None:
        return {"suffix": byte_range.suffix}
    if byte_range.last is None:
        return {"offset": byte_range.first}
    return (byte_range.first, byte_range.last + 1)  # obstore's end is exclusive
