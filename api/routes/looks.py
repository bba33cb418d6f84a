"""The look resource: the one call a frontend needs, and live progress of it."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel.ext.asyncio.session import AsyncSession

from api.conditional import MAX_WAIT_S, watched_response
from api.deps import AccountDep, SessionDep, SettingsDep, SignerDep
from api.look_events import look_event_stream
from api.look_schemas import LookImageOut, LookOut, LookPage
from api.routes.search import SearcherDep
from api.schemas import OutputOut
from api.shop_schemas import LookItemOut
from core.blobs.signing import UrlSigner
from core.db.changes import look_topic
from core.look_progress import LookStatus
from core.looks import LookDetail, LookSpec, cancel_look, create_look, get_look, list_looks
from core.looks import look_detail as read_detail
from core.settings import Settings
from core.shop.look_items import look_item_views
from core.shop.searcher import CatalogSearcher

router = APIRouter(prefix="/v1/looks", tags=["looks"])

Wait = Annotated[
    float | None,
    Query(
        ge=0,
        le=MAX_WAIT_S,
        description="long-poll: hold the request up to this many seconds until the look"
        " differs from If-None-Match (or from what it is now)",
    ),
]


@dataclass(frozen=True)
class LookReader:
    """Renders an account's looks: their images with signed URLs and their products
    (alternatives for sold-out ones from the process's catalog index)."""

    account: uuid.UUID
    settings: Settings
    signer: UrlSigner
    searcher: CatalogSearcher

    async def view(self, session: AsyncSession, detail: LookDetail) -> LookOut:
        index = await self.searcher.holder.current(session) if detail.outputs else None
        spec = detail.spec
        k = spec.products_per_image or self.settings.products_per_image
        images = []
        for output in detail.outputs:
            views = await look_item_views(session, output.id, index, spec.filters, k)
            products = [LookItemOut.of(v, self.signer) for v in views]
            images.append(LookImageOut(output=OutputOut.of(output, self.signer), products=products))
        return LookOut.of(detail, images)

    async def read(self, session: AsyncSession, look_id: uuid.UUID) -> LookOut:
        look = await get_look(session, self.account, look_id)
        return await self.view(session, await read_detail(session, look))

    def renderer(self, look_id: uuid.UUID) -> Callable[[AsyncSession], Awaitable[LookOut]]:
        """The look's rendering in any session (a long-poll or stream re-reads it)."""
        return lambda session: self.read(session, look_id)


def _reader(
    account: AccountDep, settings: SettingsDep, signer: SignerDep, searcher: SearcherDep
) -> LookReader:
    return LookReader(account, settings, signer, searcher)


ReaderDep = Annotated[LookReader, Depends(_reader)]


@router.post("", status_code=201, response_model=LookOut)
async def start_look(
    body: LookSpec,
    session: SessionDep,
    settings: SettingsDep,
    reader: ReaderDep,
    response: Response,
) -> LookOut:
    """Start a look: trains the subject when it has no LoRA for the profile, then
    generates `num_images` images (of `candidates`, reranked), grounded in in-stock
    products, and matches each to products. Poll it with `GET /v1/looks/{id}`
    (`If-None-Match`, `?wait=`) or follow `GET /v1/looks/{id}/events`."""
    look = await create_look(session, settings, reader.account, body)
    response.headers["Location"] = f"/v1/looks/{look.id}"
    return await reader.read(session, look.id)


@router.get("/{look_id}", response_model=LookOut)
async def get_look_route(
    look_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    reader: ReaderDep,
    wait: Wait = None,
) -> Response:
    """The look: status, stage, progress and ETA, per-stage timings, the images
    with their products. Answers `ETag`; `If-None-Match` gives 304 while unchanged."""

    # An unknown look's first read raises 404 before any wait; an unchanged one's
    # poll reads nothing (the process's rendering cache).
    return await watched_response(
        request,
        session,
        topic=look_topic(look_id),
        reader=str(reader.account),
        render=reader.renderer(look_id),
        wait=wait,
    )


@router.get("/{look_id}/events", response_class=StreamingResponse)
async def look_events(
    look_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    reader: ReaderDep,
) -> StreamingResponse:
    """Server-Sent Events: `progress` (status, stage, progress, ETA), `stage` (a new
    stage began), `image` (an image and its products, once each), then one of
    `completed`, `failed`, `canceled` with the whole look, and the stream ends.
    A reconnecting client gets the current state again (images included)."""
    await get_look(session, reader.account, look_id)  # 404 before the stream starts
    await session.rollback()
    topic, account = look_topic(look_id), str(reader.account)
    return look_event_stream(request, topic, account, reader.renderer(look_id))


@router.get("", response_model=LookPage)
async def list_looks_route(
    session: SessionDep,
    reader: ReaderDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
    status: LookStatus | None = None,
    subject_id: uuid.UUID | None = None,
) -> LookPage:
    """The account's looks, newest first, with cursor pagination."""
    page = await list_looks(
        session, reader.account, limit=limit, cursor=cursor, subject_id=subject_id, status=status
    )
    items = [await reader.view(session, await read_detail(session, look)) for look in page.looks]
    return LookPage(items=items, next_cursor=page.next_cursor)


@router.post("/{look_id}/cancel", response_model=LookOut)
async def cancel_look_route(
    look_id: uuid.UUID,
    session: SessionDep,
    reader: ReaderDep,
) -> LookOut:
    """Cancel the look's work: waiting children now, running ones at their next step;
    409 when it already finished."""
    await cancel_look(session, reader.account, look_id)
    return await reader.read(session, look_id)
