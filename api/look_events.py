"""A look's Server-Sent Events stream.

The stream reads the look, sends what changed since its previous read as events,
then waits on the change feed (no database connection held) until the look
changes or the keep-alive period passes. Events:

- ``progress``: status, stage, progress, eta_s and the running stage's detail,
  whenever one of them changes;
- ``stage``: the look entered a new stage (sent before that stage's progress; every
  stage it went through, in order, even one that began and ended between two reads);
- ``image``: one kept image with its products, once per image;
- ``completed`` / ``failed`` / ``canceled``: the whole look; the stream ends.

Each event has an ``id`` counting up within the stream. A client that reconnects
(``Last-Event-ID``) gets the current state again, images included: image ids
tell it which it already has.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlmodel.ext.asyncio.session import AsyncSession

from api.conditional import SharedReads
from api.look_schemas import LookOut, StageOut
from core.db.changes import ChangeFeed

MEDIA_TYPE = "text/event-stream"


def _event(number: int, name: str, data: Any) -> bytes:
    return f"id: {number}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _progress(look: LookOut) -> dict[str, Any]:
    running = next((s for s in look.stages if s.status == "running"), None)
    return {
        "status": look.status.value,
        "stage": look.stage,
        "progress": look.progress,
        "eta_s": look.eta_s,
        "detail": running.detail if running else {},
    }


def _entered(stage: StageOut) -> bool:
    return stage.status in ("running", "succeeded") or stage.started_at is not None


class _Differ:
    """What changed between two reads of a look, as events."""

    def __init__(self) -> None:
        self.number = 0
        self.progress: dict[str, Any] | None = None
        self.entered: list[str] = []
        self.images: set[str] = set()

    def _next(self, name: str, data: Any) -> bytes:
        self.number += 1
        return _event(self.number, name, data)

    def events(self, look: LookOut) -> list[bytes]:
        out = []
        # Every stage the look entered, in order, once: a stage shorter than a
        # heartbeat (matching, on a small model) is never seen running, but it ran.
        for stage in look.stages:
            if stage.name.value in self.entered or not _entered(stage):
                continue
            previous = self.entered[-1] if self.entered else None
            self.entered.append(stage.name.value)
            out.append(self._next("stage", {"stage": stage.name.value, "previous": previous}))
        progress = _progress(look)
        if progress != self.progress:
            out.append(self._next("progress", progress))
            self.progress = progress
        for image in look.images:
            key = str(image.output.id)
            if key not in self.images:
                self.images.add(key)
                out.append(self._next("image", image.model_dump(mode="json")))
        if look.status.finished:
            name = "completed" if look.status == "succeeded" else look.status.value
            out.append(self._next(name, look.model_dump(mode="json")))
        return out


def look_event_stream(
    request: Request,
    topic: str,
    reader: str,
    render: Callable[[AsyncSession], Awaitable[LookOut]],
) -> StreamingResponse:
    feed: ChangeFeed = request.app.state.changes
    shared: SharedReads = request.app.state.shared_reads
    keepalive = request.app.state.settings.sse_keepalive_s

    async def read_once() -> LookOut:
        async with request.app.state.sessions() as session:
            return await render(session)

    async def stream() -> AsyncIterator[bytes]:
        differ = _Differ()
        with feed.watch(topic) as watch:
            # A comment first: the client sees the stream open before any change.
            yield b": stream open\n\n"
            while True:
                look = await shared.read((topic, watch.version, reader), read_once)
                for event in differ.events(look):
                    yield event
                if look.status.finished:
                    return
                while not await watch.wait(keepalive):
                    yield b": keep-alive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type=MEDIA_TYPE, headers=headers)
