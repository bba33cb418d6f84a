"""ETags, If-None-Match and long-polls for resources that change while a client
watches them (jobs, looks).

Every representation carries a strong ETag: a digest of its JSON bytes. A client
that sends ``If-None-Match`` with it gets ``304`` while nothing changed; with
``?wait=N`` as well the request waits up to N seconds for the resource to change
and answers the moment it does. Waiters are woken by the process's change feed
(Postgres LISTEN/NOTIFY), never by polling the database per waiter, and hold no
database connection while they wait. Waiters of one resource share each
re-read: ten thousand clients watching one look cost one read per change.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import BaseModel
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.changes import ChangeFeed

T = TypeVar("T")

# The longest ?wait= the schema admits; ATELIER_MAX_WAIT_S may lower it.
MAX_WAIT_S = 60.0
# What every watched representation tells caches: keep it, but revalidate (ETag).
CACHE_CONTROL = "private, no-cache"


@dataclass(frozen=True)
class Rendered:
    body: bytes
    etag: str


def rendered(model: BaseModel) -> Rendered:
    body = model.model_dump_json().encode()
    return Rendered(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class SharedReads:
    """One read per (resource, version, reader) however many waiters want it."""

    def __init__(self) -> None:
        self._reads: dict[tuple[str, int, str], asyncio.Future[Any]] = {}

    async def read(self, key: tuple[str, int, str], render: Callable[[], Awaitable[T]]) -> T:
        task = self._reads.get(key)
        if task is None:
            task = asyncio.ensure_future(render())
            self._reads[key] = task
            task.add_done_callback(lambda _t: self._reads.pop(key, None))
        return await asyncio.shield(task)


async def watched_response(
    request: Request,
    session: AsyncSession,
    *,
    topic: str,
    reader: str,
    render: Callable[[AsyncSession], Awaitable[BaseModel]],
    wait: float | None,
) -> Response:
    """The resource's JSON with its ETag; 304 if the client's is current; with
    ``wait``, held until it changes from the client's ETag (or, without one, from
    what it is now), at most ``wait`` seconds (capped by the setting)."""
    feed: ChangeFeed = request.app.state.changes
    shared: SharedReads = request.app.state.shared_reads
    if_none_match = request.headers.get("if-none-match")

    async def read() -> Rendered:
        # A session of its own: a read shared by several waiters outlives none of
        # their requests' sessions.
        async with request.app.state.sessions() as own:
            return rendered(await render(own))

    # The request's session only authenticated: give its connection back, so a
    # waiter holds none while it waits.
    await session.rollback()
    with feed.watch(topic) as watch:
        current = await read()
        limit = min(wait or 0.0, request.app.state.settings.max_wait_s)
        if limit > 0:
            baseline = if_none_match if if_none_match else current.etag
            deadline = time.monotonic() + limit
            while _matches(baseline, current.etag):
                left = deadline - time.monotonic()
                if left <= 0 or not await watch.wait(left):
                    break
                current = await shared.read((topic, watch.version, reader), read)
    headers = {"ETag": current.etag, "Cache-Control": CACHE_CONTROL}
    if _matches(if_none_match, current.etag):
        return Response(status_code=304, headers=headers)
    return Response(current.body, media_type="application/json", headers=headers)
