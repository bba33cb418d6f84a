from __future__ import annotations

import uuid
from email.utils import format_datetime

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import AccountDep, SessionDep, StoreDep
from core.blobs.store import BlobStore
from core.generations import get_output

router = APIRouter(prefix="/v1/outputs", tags=["outputs"])


async def blob_response(
    store: BlobStore,
    key: str,
    *,
    media_type: str,
    filename: str,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    """The blob under ``key`` streamed through the API, whichever backend holds it,
    with the headers FileResponse gave local files (length, Last-Modified, ETag,
    inline disposition). BlobNotFound, raised before anything is sent, is the
    API's 404 problem."""
    blob = await store.stream(key)
    sent = {
        "Content-Length": str(blob.size),
        "Last-Modified": format_datetime(blob.modified, usegmt=True),
        "Content-Disposition": f'inline; filename="{filename}"',
        **(headers or {}),
    }
    if blob.etag:
        sent["ETag"] = blob.etag
    return StreamingResponse(blob.chunks, media_type=media_type, headers=sent)


@router.get(
    "/{output_id}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_output_file(
    output_id: uuid.UUID, account: AccountDep, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    output = await get_output(session, account, output_id)
    return await blob_response(
        store, output.blob_key, media_type=output.media_type, filename=f"{output.id}.png"
    )
