"""ETags, If-None-Match and long-polls for resources that change while a client
watches them (jobs, looks).

Every representation carries a strong ETag: a digest of its JSON bytes. A client
that sends ``If-None-Match`` with it gets ``304`` while nothing changed; with
``?wait=N`` as well the request waits up to N seconds for the resource to change
and answers the moment it does. Waiters are woken by the process's change feed
(Postgres LISTEN/NOTIFY), never by polling the database per waiter, and hold no
database connection while they wait. Waiters of one resource share each
re-read: ten thousand clients watching one look cost one read per change.

Each process also remembers its last rendering of each (resource, reader) while
its change feed is connected, dropped the moment the feed announces a change (or
loses its connection) and after ``watched_cache_s`` at most: parts of a
representation no trigger announces (signed URLs' expiry, catalog matches) are
that stale at worst. A poll of an unchanged resource, 200 or 304, then reads
nothing; a change committed elsewhere is seen once its notification arrives
(milliseconds on one host), not before.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict
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
# Resources whose renderings a process remembers, least recently read dropped
# first: a few MB at most (a rendering is a few KB).
CACHED_TOPICS = 2048


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


class RenderedCache:
    """The last rendering of each (topic, reader), valid while the change feed is
    connected and has announced no change of the topic, for ``ttl_s`` at most."""

    def __init__(self, feed: ChangeFeed, ttl_s: float) -> None:
        self._feed = feed
        self._ttl_s = ttl_s
        # topic -> reader -> (rendering, monotonic time it expires)
        self._topics: OrderedDict[str, dict[str, tuple[Rendered, float]]] = OrderedDict()
        # Changes seen, and when each topic being read (or all) last changed: a
        # read that a change overtook is returned, never kept.
        self._changes = 0
        self._all_changed_at = 0
        self._changed_at: dict[str, int] = {}
        self._reading: Counter[str] = Counter()
        feed.add_listener(self._changed)

    def get(self, topic: str, reader: str) -> Rendered | None:
        if not self._feed.connected:  # changes would go unannounced
            return None
        entry = self._topics.get(topic, {}).get(reader)
        if entry is None or entry[1] <= time.monotonic():
            return None
        self._topics.move_to_end(topic)
        return entry[0]

    async def read(
        self, topic: str, reader: str, render: Callable[[], Awaitable[Rendered]]
    ) -> Rendered:
        """``render()``, kept unless the topic changed (or the feed was down) meanwhile."""
        started, connected = self._changes, self._feed.connected
        self._reading[topic] += 1
        try:
            result = await render()
        finally:
            changed_at = max(self._changed_at.get(topic, 0), self._all_changed_at)
            self._reading[topic] -= 1
            if not self._reading[topic]:
                del self._reading[topic]
                self._changed_at.pop(topic, None)
        if connected and self._feed.connected and changed_at <= started and self._ttl_s > 0:
            self._keep(topic, reader, result)
        return result

    def _keep(self, topic: str, reader: str, result: Rendered) -> None:
        readers = self._topics.setdefault(topic, {})
        readers[reader] = (result, time.monotonic() + self._ttl_s)
        self._topics.move_to_end(topic)
        if len(self._topics) > CACHED_TOPICS:
            self._topics.popitem(last=False)

    def _changed(self, topic: str | None) -> None:
        self._changes += 1
        if topic is None:
            self._all_changed_at = self._changes
            self._topics.clear()
            return
        if topic in self._reading:
            self._changed_at[topic] = self._changes
        self._topics.pop(topic, None)


def _rendered_cache(request: Request) -> RenderedCache:
    """The process's cache, made on first use: it needs the feed the app started."""
    state = request.app.state
    cache: RenderedCache | None = getattr(state, "rendered_cache", None)
    if cache is None:
        cache = state.rendered_cache = RenderedCache(state.changes, state.settings.watched_cache_s)
    return cache


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

    cache = _rendered_cache(request)

    async def render_own() -> Rendered:
        # A session of its own: a read shared by several waiters outlives none of
        # their requests' sessions.
        async with request.app.state.sessions() as own:
            return rendered(await render(own))

    async def read() -> Rendered:
        return cache.get(topic, reader) or await cache.read(topic, reader, render_own)

    # The request's session only authenticated: give its connection back, so a
    # waiter holds none while it waits.
    await session.rollback()
    with feed.watch(topic) as watch:
        # Shared too: when a rendering expires, the polls that miss together read
        # once (twenty clients' misses at one instant were the latency's tail).
        current = await shared.read((topic, watch.version, reader), read)
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
