"""Idempotency-Key over HTTP, against real Postgres: replays, reuse, races, expiry.

The race and the failure cases use routes added to the app for the test (a route
held on an asyncio.Event the test controls, a route that fails once): the
middleware is generic over POST routes, so these exercise exactly what the real
ones get, deterministically.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from httpx import ASGITransport, AsyncClient, Response
from redis.asyncio import Redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from api.app import create_app
from core.db.engine import session_scope
from core.db.models import IdempotencyKey, Job, Subject, utcnow
from core.settings import Settings
from scheduler.dispatcher import Dispatcher
from tests.conftest import photo_files
from transport.queues import connect

REUSED = "/problems/idempotency-key-reused"
IN_USE = "/problems/idempotency-key-in-use"


@dataclass
class ControlledRoutes:
    """Routes whose timing and failures the test decides."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/v1/test/held", self.held, methods=["POST"], status_code=201)
        app.add_api_route("/v1/test/fails-once", self.fails_once, methods=["POST"])

    async def held(self) -> JSONResponse:
        """The first call waits inside the route until the test lets it go."""
        self.calls += 1
        call = self.calls
        if call == 1:
            self.entered.set()
            await self.proceed.wait()
        return JSONResponse({"call": call}, status_code=201)

    async def fails_once(self) -> JSONResponse:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the first call fails")
        return JSONResponse({"call": self.calls}, status_code=201)


@pytest.fixture
async def routes() -> ControlledRoutes:
    return ControlledRoutes()


@pytest.fixture
async def test_client(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], routes: ControlledRoutes
) -> AsyncIterator[AsyncClient]:
    app = create_app(settings)
    routes.install(app)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def _keyed(auth: dict[str, str], key: str) -> dict[str, str]:
    return {**auth, "Idempotency-Key": key}


async def _subject(client: AsyncClient, auth: dict[str, str], photos: list) -> str:
    response = await client.post("/v1/subjects", headers=auth, files=photo_files(photos))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _count(sessions: async_sessionmaker[AsyncSession], model: type, *where: object) -> int:
    async with sessions() as session:
        query = select(func.count()).select_from(model).where(*where)  # type: ignore[arg-type]
        return int(await session.scalar(query) or 0)


def _replayed(response: Response) -> bool:
    return response.headers.get("Idempotent-Replayed") == "true"


async def test_same_key_and_body_replay_the_first_response(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    headers = _keyed(auth, "gen-1")
    first = await client.post(
        "/v1/generations", headers=headers, json={"subject_id": subject_id, "prompt": "a hat"}
    )
    assert first.status_code == 202, first.text
    # The same request, its JSON keys in another order.
    again = await client.post(
        "/v1/generations",
        headers={**headers, "Content-Type": "application/json"},
        content=f'{{"prompt": "a hat",\n "subject_id": "{subject_id}"}}',
    )
    assert again.status_code == 202
    assert again.content == first.content
    assert _replayed(again) and not _replayed(first)
    assert await _count(sessions, Job, col(Job.kind) == "generate") == 1


async def test_same_key_with_another_body_or_route_is_refused(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    headers = _keyed(auth, "gen-2")
    body = {"subject_id": subject_id, "prompt": "a hat"}
    assert (await client.post("/v1/generations", headers=headers, json=body)).status_code == 202
    other = await client.post("/v1/generations", headers=headers, json={**body, "prompt": "a cap"})
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"] == REUSED
    elsewhere = await client.post(f"/v1/subjects/{subject_id}/train", headers=headers)
    assert elsewhere.status_code == 422 and elsewhere.json()["type"] == REUSED


async def test_a_request_racing_one_in_flight_gets_409(
    test_client: AsyncClient, auth: dict[str, str], routes: ControlledRoutes
) -> None:
    headers = _keyed(auth, "race")
    first = asyncio.create_task(test_client.post("/v1/test/held", headers=headers, json={}))
    await routes.entered.wait()
    racing = await test_client.post("/v1/test/held", headers=headers, json={})
    assert racing.status_code == 409
    assert racing.json()["type"] == IN_USE
    assert racing.headers["Retry-After"] == "1"
    routes.proceed.set()
    answered = await first
    assert answered.status_code == 201 and answered.json() == {"call": 1}
    later = await test_client.post("/v1/test/held", headers=headers, json={})
    assert later.content == answered.content and _replayed(later)
    assert routes.calls == 1


async def test_a_dead_holders_key_is_taken_over_after_its_lease(
    test_client: AsyncClient,
    auth: dict[str, str],
    routes: ControlledRoutes,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    headers = _keyed(auth, "lease")
    stuck = asyncio.create_task(test_client.post("/v1/test/held", headers=headers, json={}))
    await routes.entered.wait()
    # As if the process holding the key had died a lease ago.
    async with session_scope(sessions) as session:
        await session.execute(
            update(IdempotencyKey).values(locked_until=utcnow() - timedelta(seconds=1))
        )
    other = await test_client.post("/v1/test/held", headers=headers, json={"x": 1})
    assert other.status_code == 422 and other.json()["type"] == REUSED
    retry = await test_client.post("/v1/test/held", headers=headers, json={})
    assert retry.status_code == 201 and retry.json() == {"call": 2}
    routes.proceed.set()
    await stuck  # it lost the key: its late answer does not replace the retry's
    replay = await test_client.post("/v1/test/held", headers=headers, json={})
    assert replay.json() == {"call": 2} and _replayed(replay)


async def test_keys_are_per_account(
    client: AsyncClient, auth: dict[str, str], other_auth: dict[str, str], sample_photos: list
) -> None:
    mine = await _subject(client, auth, sample_photos)
    theirs = await _subject(client, other_auth, sample_photos)
    a = await client.post(
        "/v1/generations", headers=_keyed(auth, "shared"), json={"subject_id": mine, "prompt": "x"}
    )
    b = await client.post(
        "/v1/generations",
        headers=_keyed(other_auth, "shared"),
        json={"subject_id": theirs, "prompt": "y"},
    )
    assert a.status_code == b.status_code == 202, b.text
    assert not _replayed(b) and a.json()["id"] != b.json()["id"]
    # Each account's retry replays its own first response.
    a_again = await client.post(
        "/v1/generations", headers=_keyed(auth, "shared"), json={"subject_id": mine, "prompt": "x"}
    )
    assert _replayed(a_again) and a_again.content == a.content


async def test_a_key_is_free_again_after_the_ttl(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    headers = _keyed(auth, "day-old")
    first = await client.post(
        "/v1/generations", headers=headers, json={"subject_id": subject_id, "prompt": "a hat"}
    )
    past = utcnow() - timedelta(seconds=settings.idempotency_ttl_s + 1)
    async with session_scope(sessions) as session:
        await session.execute(update(IdempotencyKey).values(created_at=past))
        await session.execute(update(Job).values(created_at=past))
    later = await client.post(
        "/v1/generations", headers=headers, json={"subject_id": subject_id, "prompt": "a cap"}
    )
    assert later.status_code == 202, later.text
    assert not _replayed(later) and later.json()["id"] != first.json()["id"]
    assert later.json()["params"]["prompt"] == "a cap"


async def test_server_errors_are_not_kept(
    test_client: AsyncClient,
    auth: dict[str, str],
    routes: ControlledRoutes,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    headers = _keyed(auth, "boom")
    failed = await test_client.post("/v1/test/fails-once", headers=headers, json={})
    assert failed.status_code == 500
    assert await _count(sessions, IdempotencyKey) == 0
    retry = await test_client.post("/v1/test/fails-once", headers=headers, json={})
    assert retry.status_code == 201 and retry.json() == {"call": 2} and not _replayed(retry)
    # The success is what the key keeps.
    replay = await test_client.post("/v1/test/fails-once", headers=headers, json={})
    assert _replayed(replay) and replay.json() == {"call": 2}


async def test_validation_failures_are_not_kept(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    headers = _keyed(auth, "fix-and-retry")
    invalid = await client.post("/v1/generations", headers=headers, json={"subject_id": subject_id})
    assert invalid.status_code == 422 and invalid.json()["type"] == "/problems/invalid-request"
    body = {"subject_id": subject_id, "prompt": "a hat"}
    fixed = await client.post("/v1/generations", headers=headers, json=body)
    assert fixed.status_code == 202, fixed.text
    replay = await client.post("/v1/generations", headers=headers, json=body)
    assert _replayed(replay) and replay.content == fixed.content


async def test_an_overlong_key_is_refused(client: AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post("/v1/generations", headers=_keyed(auth, "k" * 256), json={})
    assert response.status_code == 422
    assert response.json()["type"] == "/problems/invalid-idempotency-key"


async def test_a_subject_upload_replays_whatever_the_multipart_boundary(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def upload(boundary: str, photos: list) -> Response:
        content_type = f"multipart/form-data; boundary={boundary}"
        headers = {**_keyed(auth, "upload"), "Content-Type": content_type}
        files = photo_files(photos)
        return await client.post("/v1/subjects", headers=headers, files=files, data={"name": "me"})

    first = await upload("first-boundary", sample_photos)
    assert first.status_code == 201, first.text
    again = await upload(uuid.uuid4().hex, sample_photos)
    assert again.status_code == 201 and again.content == first.content and _replayed(again)
    assert await _count(sessions, Subject) == 1
    other = await upload("first-boundary", list(reversed(sample_photos)))
    assert other.status_code == 422 and other.json()["type"] == REUSED


async def test_a_subject_whose_answer_was_lost_is_not_made_twice(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The process died after committing the subject, before its answer was kept:
    the key's record is gone (here: deleted) and the retry runs the route again,
    which finds the subject the key made instead of making a second one."""
    headers, files = _keyed(auth, "lost-answer"), photo_files(sample_photos)
    first = await client.post("/v1/subjects", headers=headers, files=files)
    assert first.status_code == 201, first.text
    async with session_scope(sessions) as session:
        await session.execute(
            delete(IdempotencyKey).where(col(IdempotencyKey.key) == "lost-answer")
        )
    retry = await client.post("/v1/subjects", headers=headers, files=files)
    assert retry.status_code == 201 and not _replayed(retry)
    assert retry.json()["id"] == first.json()["id"]
    assert retry.json()["photo_count"] == len(sample_photos)
    assert await _count(sessions, Subject) == 1


async def test_the_scheduler_sweeps_only_keys_past_the_ttl(
    test_client: AsyncClient,
    redis: Redis,
    auth: dict[str, str],
    routes: ControlledRoutes,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    routes.proceed.set()
    for key in ("old", "new"):
        response = await test_client.post("/v1/test/held", headers=_keyed(auth, key))
        assert response.status_code == 201
    ttl = timedelta(seconds=settings.idempotency_ttl_s)
    async with session_scope(sessions) as session:
        await session.execute(
            update(IdempotencyKey)
            .where(col(IdempotencyKey.key) == "old")
            .values(created_at=utcnow() - ttl - timedelta(seconds=1))
        )
    # The scheduler's tick sweeps (its first tick, then once a minute).
    arq = await connect(settings.redis_url)
    try:
        await Dispatcher(settings, sessions, arq).tick()
    finally:
        await arq.aclose()
    async with sessions() as session:
        left = (await session.execute(select(col(IdempotencyKey.key)))).scalars().all()
    assert left == ["new"]


async def test_a_keyed_body_over_what_any_route_takes_is_refused(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    small = settings.model_copy(update={"max_photos": 1, "max_photo_bytes": 1024})
    app = create_app(small)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            response = await http.post(
                "/v1/generations", headers=_keyed(auth, "big"), json={"prompt": "x" * 70_000}
            )
    assert response.status_code == 413
    assert response.json()["type"] == "/problems/request-too-large"
    assert await _count(sessions, IdempotencyKey) == 0
