"""Generated files, and the way every media route sends a blob: whole or by byte
range (RFC 9110 section 14), so a ``<video>`` tag can seek and resume."""

from __future__ import annotations

import mimetypes
import re
import uuid
from email.utils import format_datetime
from typing import Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel.ext.asyncio.session import AsyncSession

from api import problems
from api.deps import MediaReader, SessionDep, StoreDep
from core.blobs.store import BlobStore, ByteRange, RangeNotSatisfiable
from core.db.models import Output
from core.errors import NotFound
from core.generations import get_output

router = APIRouter(prefix="/v1/outputs", tags=["outputs"])

# One range of bytes; several ranges, other units or bad syntax are answered with
# the whole body, which RFC 9110 allows (a server may ignore Range).
_ONE_BYTE_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


def requested_range(range_header: str | None, if_range: str | None) -> ByteRange | None:
    """The single byte range a request asks for, or None to send the whole blob."""
    if range_header is None:
        return None
    # If-Range with a date: we validate by ETag only, so send the whole (allowed).
    if if_range is not None and not if_range.startswith('"'):
        return None
    match = _ONE_BYTE_RANGE.fullmatch(range_header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        return ByteRange(suffix=int(last), if_etag=if_range) if last else None
    if last and int(last) < int(first):
        return None  # invalid: the whole Range header is ignored
    return ByteRange(first=int(first), last=int(last) if last else None, if_etag=if_range)


async def blob_response(
    request: Request,
    store: BlobStore,
    key: str,
    *,
    media_type: str,
    filename: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """The blob under ``key`` streamed through the API, whichever backend holds it,
    with the headers FileResponse gave local files (length, Last-Modified, ETag,
    inline disposition); a Range request gets 206 and only its bytes, or 416.
    BlobNotFound, raised before anything is sent, is the API's 404 problem."""
    byte_range = requested_range(request.headers.get("range"), request.headers.get("if-range"))
    try:
        blob = await store.stream(key, byte_range)
    except RangeNotSatisfiable as exc:
        refused = problems.problem(
            request, 416, "range-not-satisfiable", "Range not satisfiable",
            f"the file has {exc.size} bytes",
        )  # fmt: skip
        refused.headers["Content-Range"] = f"bytes */{exc.size}"
        return refused
    sent = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(blob.size),
        "Last-Modified": format_datetime(blob.modified, usegmt=True),
        "Content-Disposition": f'inline; filename="{filename}"',
        **(headers or {}),
    }
    if blob.etag:
        sent["ETag"] = blob.etag
    if blob.span is None:
        return StreamingResponse(blob.chunks, media_type=media_type, headers=sent)
    start, stop = blob.span
    sent["Content-Length"] = str(stop - start)
    sent["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
    return StreamingResponse(blob.chunks, status_code=206, media_type=media_type, headers=sent)


async def readable_output(
    session: AsyncSession, reader: uuid.UUID | None, output_id: uuid.UUID
) -> Output:
    """The output, for its account; with a signed URL (no account) for anyone,
    while it exists: erasing its subject deletes it, and the URL answers 404."""
    if reader is not None:
        return await get_output(session, reader, output_id)
    output = await session.get(Output, output_id)
    if output is None:
        raise NotFound(f"output {output_id} not found")
    return output


@router.get(
    "/{output_id}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_output_file(
    output_id: uuid.UUID,
    request: Request,
    reader: MediaReader,
    session: SessionDep,
    store: StoreDep,
) -> Response:
    output = await readable_output(session, reader, output_id)
    extension = mimetypes.guess_extension(output.media_type) or ""  # .png, .mp4...
    return await blob_response(
        request, store, output.blob_key, media_type=output.media_type,
        filename=f"{output.id}{extension}",
    )  # fmt: skip
