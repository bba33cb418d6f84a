"""Postgres or Redis down: 503 problem+json with Retry-After naming the dependency,
and recovery without a restart. The real servers stay up; a TCP proxy in front of
each is cut (connections aborted, port closed or silent) and restored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest
from fastapi import FastAPI, Request
from httpx import ASGITransport, AsyncClient, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Receive, Scope, Send

from core.settings import Settings

PROBLEM = "application/problem+json"
_PIPE_CHUNK = 65536


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a server. ``cut()`` aborts every connection and
    either closes the port (connection refused, as a stopped server) or, with
    ``stall=True``, accepts connections and never answers (as a hung host)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.stalled = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self, *, stall: bool = False) -> None:
        self._abort_connections()
        self.stalled = stall
        if not stall and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def restore(self) -> None:
        self._abort_connections()  # stalled ones: their clients gave up already
        self.stalled = False
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    def _abort_connections(self) -> None:
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        if self.stalled:
            return  # held open, never answered, until restore() or cut() aborts it
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._open.add(up_writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # the other side was aborted by cut()
    finally:
        writer.transport.abort()


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{port}"))


@asynccontextmanager
async def _proxied(url: str) -> AsyncIterator[CuttableProxy]:
    parts = urlsplit(url)
    proxy = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 0))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _redis_route(request: Request) -> dict[str, bool]:
    return {"pong": bool(await request.app.state.redis.ping())}


async def _broken_sql(request: Request, case: str) -> None:
    async with request.app.state.sessions() as session:
        if case == "syntax":
            await session.execute(text("SELEC 1"))
        elif case == "integrity":
            await session.execute(text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
            await session.execute(text("INSERT INTO t VALUES (1), (1)"))
        else:  # an OSError that is not Postgres's: the disk, say
            raise OSError(28, "No space left on device")


class _TouchesPostgresFirst:
    """A middleware that reads Postgres before any route runs, as the
    Idempotency-Key one does: its errors never reach the routes' handlers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/test/middleware":
            async with scope["app"].state.sessions() as session:
                await session.execute(text("SELECT 1"))
        await self.app(scope, receive, send)


@pytest.fixture
async def proxies(settings: Settings) -> AsyncIterator[dict[str, CuttableProxy]]:
    async with _proxied(settings.database_url) as pg, _proxied(settings.redis_url) as redis:
        yield {"postgres": pg, "redis": redis}


@pytest.fixture
async def proxied_client(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    proxies: dict[str, CuttableProxy],
) -> AsyncIterator[AsyncClient]:
    """The app with Postgres and Redis reached through the proxies, and two routes
    of the tests' own: one that uses Redis, one that fails on purpose."""
    from api.app import create_app

    proxied = settings.model_copy(
        update={
            "database_url": _through(settings.database_url, proxies["postgres"].port),
            "redis_url": _through(settings.redis_url, proxies["redis"].port),
            "database_connect_timeout_s": 1.0,
            "redis_timeout_s": 1.0,
            "health_check_timeout_s": 1.0,
        }
    )
    app: FastAPI = create_app(proxied)
    app.add_api_route("/test/redis", _redis_route)
    app.add_api_route("/test/broken/{case}", _broken_sql)
    app.add_api_route("/test/middleware", _redis_route)
    app.add_middleware(_TouchesPostgresFirst)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def _assert_unavailable(response: Response, dependency: str) -> dict[str, object]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["retry-after"] == "5"
    body: dict[str, object] = response.json()
    assert body["type"] == "/problems/dependency-unavailable"
    assert body["status"] == 503
    assert body["dependency"] == dependency
    assert dependency in str(body["detail"])
    return body


async def _assert_healthy(client: AsyncClient, auth: dict[str, str]) -> None:
    health = await client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json() == {
        "status": "ok",
        "checks": {"postgres": "ok", "redis": "ok", "blobs": "ok"},
    }
    jobs = await client.get("/v1/jobs", headers=auth)
    assert jobs.status_code == 200, jobs.text
    assert (await client.get("/test/redis")).json() == {"pong": True}


async def test_postgres_down_answers_503_and_the_api_recovers_alone(
    proxied_client: AsyncClient, auth: dict[str, str], proxies: dict[str, CuttableProxy]
) -> None:
    await _assert_healthy(proxied_client, auth)

    await proxies["postgres"].cut()
    body = _assert_unavailable(await proxied_client.get("/healthz"), "postgres")
    assert body["checks"] == {"postgres": "down", "redis": "ok", "blobs": "ok"}
    _assert_unavailable(await proxied_client.get("/v1/jobs", headers=auth), "postgres")
    _assert_unavailable(await proxied_client.get("/test/middleware"), "postgres")

    await proxies["postgres"].restore()
    await _assert_healthy(proxied_client, auth)
    assert (await proxied_client.get("/test/middleware")).status_code == 200


async def test_a_postgres_that_does_not_answer_fails_within_the_connect_timeout(
    proxied_client: AsyncClient, auth: dict[str, str], proxies: dict[str, CuttableProxy]
) -> None:
    await _assert_healthy(proxied_client, auth)

    await proxies["postgres"].cut(stall=True)
    started = time.monotonic()
    _assert_unavailable(await proxied_client.get("/v1/jobs", headers=auth), "postgres")
    # database_connect_timeout_s is 1 s here; asyncpg's default would be 60 s.
    assert time.monotonic() - started < 15

    await proxies["postgres"].restore()
    await _assert_healthy(proxied_client, auth)


async def test_redis_down_answers_503_and_the_api_recovers_alone(
    proxied_client: AsyncClient, auth: dict[str, str], proxies: dict[str, CuttableProxy]
) -> None:
    await _assert_healthy(proxied_client, auth)

    await proxies["redis"].cut()
    body = _assert_unavailable(await proxied_client.get("/healthz"), "redis")
    assert body["checks"] == {"postgres": "ok", "redis": "down", "blobs": "ok"}
    _assert_unavailable(await proxied_client.get("/test/redis"), "redis")
    # Routes that do not need Redis are unaffected.
    assert (await proxied_client.get("/v1/jobs", headers=auth)).status_code == 200

    await proxies["redis"].restore()
    await _assert_healthy(proxied_client, auth)


@pytest.mark.parametrize("case", ["syntax", "integrity", "disk"])
async def test_bugs_are_still_500s_not_outages(proxied_client: AsyncClient, case: str) -> None:
    response = await proxied_client.get(f"/test/broken/{case}")
    assert response.status_code == 500, response.text
    assert response.json()["type"] == "/problems/internal"
    assert "retry-after" not in response.headers


async def test_the_api_starts_while_postgres_is_down_and_serves_once_it_is_back(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    proxies: dict[str, CuttableProxy],
    auth: dict[str, str],
) -> None:
    """Nothing at startup needs Postgres (the URL-signing key and the change feed
    come later), so a restart during an outage answers 503s, not connection refused."""
    from api.app import create_app

    await proxies["postgres"].cut()
    proxied = settings.model_copy(
        update={
            "database_url": _through(settings.database_url, proxies["postgres"].port),
            "redis_url": _through(settings.redis_url, proxies["redis"].port),
            "database_connect_timeout_s": 1.0,
            "health_check_timeout_s": 1.0,
        }
    )
    app = create_app(proxied)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as client:
            _assert_unavailable(await client.get("/healthz"), "postgres")
            _assert_unavailable(await client.get("/v1/jobs", headers=auth), "postgres")
            await proxies["postgres"].restore()
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/v1/jobs", headers=auth)).status_code == 200
