from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import AccountDep, SessionDep, StoreDep
from core.generations import get_output

router = APIRouter(prefix="/v1/outputs", tags=["outputs"])


@router.get(
    "/{output_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_output_file(
    output_id: uuid.UUID, account: AccountDep, session: SessionDep, store: StoreDep
) -> FileResponse:
    output = await get_output(session, account, output_id)
    return FileResponse(
        store.open_path(output.blob_key),
        media_type=output.media_type,
        filename=f"{output.id}.png",
        content_disposition_type="inline",
    )
