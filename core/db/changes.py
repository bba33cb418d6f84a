"""Change notifications: one Postgres LISTEN per process wakes every waiter.

Migration 0007's triggers announce each committed change to a job or a look on
the ``atelier_change`` channel ("job <id>", "look <id>"). A process that serves
long-polls and event streams holds one ``ChangeFeed``: a single connection
listens, and each notification wakes the waiters of that resource only, so ten
thousand waiters cost ten thousand parked coroutines and no query at all until
their resource changes.

Notifications are not durable: while the connection is down (Postgres restarting)
they are lost. The feed reconnects, then wakes every waiter so each re-reads its
resource; meanwhile waits return after ``fallback_poll_s`` so a waiter still sees
changes, only later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import asyncpg

log = logging.getLogger("atelier.changes")

CHANNEL = "atelier_change"
# Reconnection backoff while Postgres is unreachable, doubling up to the cap.
_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 10.0
# How often the idle listening connection is probed, and how long a probe may take.
_PROBE_EVERY_S, _PROBE_TIMEOUT_S = 30.0, 5.0


def job_topic(job_id: object) -> str:
    return f"job {job_id}"


def look_topic(look_id: object) -> str:
    return f"look {look_id}"


@dataclass
class _Topic:
    version: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)
    watchers: int = 0

    def bump(self) -> None:
        self.version += 1
        self.event.set()
        self.event = asyncio.Event()


class Watch:
    """A waiter's view of one topic: ``wait`` returns once the topic changed since
    the previous ``wait`` returned (or since the watch began), so a change that
    lands between a read and the next wait is never missed."""

    def __init__(self, feed: ChangeFeed, topic: _Topic) -> None:
        self._feed = feed
        self._topic = topic
        self._seen = topic.version

    @property
    def version(self) -> int:
        """The topic's version this watch has seen."""
        return self._seen

    async def wait(self, seconds: float) -> bool:
        """True if the topic changed, False if ``seconds`` passed first."""
        topic = self._topic
        if topic.version == self._seen:
            limit = seconds if self._feed.connected else min(seconds, self._feed.fallback_poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(topic.event.wait(), limit)
            if topic.version == self._seen:
                return not self._feed.connected  # unknown while disconnected: re-read
        self._seen = topic.version
        return True


class ChangeFeed:
    def __init__(self, dsn: str, *, fallback_poll_s: float = 1.0) -> None:
        # SQLAlchemy's URL names its driver ("postgresql+asyncpg://"); asyncpg does not.
        self._dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.fallback_poll_s = fallback_poll_s
        self._topics: dict[str, _Topic] = {}
        self._connection: asyncpg.Connection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._listening = asyncio.Event()
        self._listeners: list[Callable[[str | None], None]] = []
        self.notifications = 0

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    @property
    def watchers(self) -> int:
        return sum(t.watchers for t in self._topics.values())

    async def start(self, *, wait_s: float = 2.0) -> None:
        """Start listening; waits up to ``wait_s`` for the first connection (the
        process serves without it meanwhile: waits fall back to polling)."""
        self._runner = asyncio.create_task(self._run(), name="change-feed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), wait_s)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def watch(self, topic_name: str) -> Iterator[Watch]:
        """Watch one topic; enter before reading the resource."""
        topic = self._topics.setdefault(topic_name, _Topic())
        topic.watchers += 1
        try:
            yield Watch(self, topic)
        finally:
            topic.watchers -= 1
            if topic.watchers == 0:
                del self._topics[topic_name]

    def add_listener(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener`` with every changed topic, watched or not, before its
        waiters wake; with None when any topic may have changed unannounced (the
        connection was gained or lost). A cache of renderings forgets by this."""
        self._listeners.append(listener)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        for listener in self._listeners:
            listener(payload)
        topic = self._topics.get(payload)
        if topic is not None:
            topic.bump()

    def _wake_all(self) -> None:
        for listener in self._listeners:
            listener(None)
        for topic in self._topics.values():
            topic.bump()

    async def _run(self) -> None:
        delay = _RETRY_FIRST_S
        while True:
            try:
                await self._listen_until_lost()
                delay = _RETRY_FIRST_S
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("change feed: cannot listen (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def _listen_until_lost(self) -> None:
        connection = await asyncpg.connect(self._dsn)
        self._lost.clear()
        connection.add_termination_listener(lambda _conn: self._lost.set())
        await connection.add_listener(CHANNEL, self._notified)
        self._connection = connection
        self._listening.set()
        # Changes made while no connection listened went unannounced.
        self._wake_all()
        try:
            await self._until_lost(connection)
            log.warning("change feed: connection lost; reconnecting")
        finally:
            self._connection = None
            with contextlib.suppress(Exception):
                await connection.close()
            self._wake_all()

    async def _until_lost(self, connection: asyncpg.Connection) -> None:
        """Returns when the connection closes, or stops answering: a peer that
        vanished without closing (a network partition) sends no termination."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), _PROBE_EVERY_S)
                return
            except TimeoutError:
                pass
            try:
                await asyncio.wait_for(connection.fetchval("SELECT 1"), _PROBE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return


@contextlib.asynccontextmanager
async def running_feed(dsn: str, *, fallback_poll_s: float = 1.0) -> AsyncIterator[ChangeFeed]:
    feed = ChangeFeed(dsn, fallback_poll_s=fallback_poll_s)
    await feed.start()
    try:
        yield feed
    finally:
        await feed.stop()
