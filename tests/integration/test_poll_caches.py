"""The polling caches: checked API keys (core/accounts.py KeyCache) and renderings of
watched resources (api/conditional.py RenderedCache), against the real Postgres and
its change notifications."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from httpx import ASGITransport, AsyncClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import authenticate
from core.db.engine import session_scope
from core.db.models import Job, JobKind, JobStatus
from core.settings import Settings

KEY_TTL_S = 0.5
RENDER_TTL_S = 0.8
NOTIFIED_WITHIN_S = 1.0


@pytest.fixture
async def polling_client(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncClient]:
    from api.app import create_app

    short = settings.model_copy(update={"key_cache_s": KEY_TTL_S, "watched_cache_s": RENDER_TTL_S})
    app = create_app(short)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            http.app = app  # type: ignore[attr-defined]  # the feed, for the disconnect test
            yield http


async def _job(sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]) -> uuid.UUID:
    async with session_scope(sessions) as session:
        account = await authenticate(session, auth["Authorization"].removeprefix("Bearer "))
        job = Job(account_id=account, kind=JobKind.generate, status=JobStatus.running)
        session.add(job)
        await session.flush()
        return job.id


async def _set_progress(
    sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, progress: float, *, notify: bool
) -> None:
    """Commit a change of the job; ``notify=False`` skips the triggers (as a change
    no trigger announces would), so only the cache's time limit can reveal it."""
    async with session_scope(sessions) as session:
        if not notify:
            await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(
            text("UPDATE job SET progress = :p WHERE id = :id"), {"p": progress, "id": job_id}
        )


async def test_a_revoked_key_stops_working_within_the_ttl(
    polling_client: AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
) -> None:
    assert (await polling_client.get("/v1/jobs", headers=auth)).status_code == 200
    async with session_scope(sessions) as session:
        await session.execute(text("UPDATE api_key SET revoked_at = now()"))
    # Still trusted by this process for up to the TTL, not longer.
    assert (await polling_client.get("/v1/jobs", headers=auth)).status_code == 200
    await asyncio.sleep(KEY_TTL_S + 0.1)
    assert (await polling_client.get("/v1/jobs", headers=auth)).status_code == 401


async def test_an_unknown_key_is_checked_every_time(
    polling_client: AsyncClient, auth: dict[str, str]
) -> None:
    wrong = {"Authorization": auth["Authorization"] + "x"}
    for _ in range(2):
        assert (await polling_client.get("/v1/jobs", headers=wrong)).status_code == 401


async def test_a_304_turns_into_a_200_once_the_change_is_announced(
    polling_client: AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
) -> None:
    job_id = await _job(sessions, auth)
    first = await polling_client.get(f"/v1/jobs/{job_id}", headers=auth)
    current = {**auth, "If-None-Match": first.headers["etag"]}
    assert (await polling_client.get(f"/v1/jobs/{job_id}", headers=current)).status_code == 304
    await _set_progress(sessions, job_id, 0.25, notify=True)
    deadline = time.monotonic() + NOTIFIED_WITHIN_S
    while (
        answer := await polling_client.get(f"/v1/jobs/{job_id}", headers=current)
    ).status_code == 304:
        assert time.monotonic() < deadline, "the change was not seen within 1 s"
        await asyncio.sleep(0.01)
    assert answer.status_code == 200 and answer.json()["progress"] == 0.25
    assert answer.headers["etag"] != first.headers["etag"]


async def test_an_unannounced_change_shows_after_the_ttl(
    polling_client: AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
) -> None:
    job_id = await _job(sessions, auth)
    first = await polling_client.get(f"/v1/jobs/{job_id}", headers=auth)
    current = {**auth, "If-None-Match": first.headers["etag"]}
    await _set_progress(sessions, job_id, 0.5, notify=False)
    # The rendering is remembered (no read: the 304 is stale) ...
    assert (await polling_client.get(f"/v1/jobs/{job_id}", headers=current)).status_code == 304
    await asyncio.sleep(RENDER_TTL_S + 0.1)
    # ... for the TTL at most.
    answer = await polling_client.get(f"/v1/jobs/{job_id}", headers=current)
    assert answer.status_code == 200 and answer.json()["progress"] == 0.5


async def test_without_the_feed_every_poll_reads(
    polling_client: AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
) -> None:
    job_id = await _job(sessions, auth)
    first = await polling_client.get(f"/v1/jobs/{job_id}", headers=auth)
    await polling_client.app.state.changes.stop()  # type: ignore[attr-defined]
    await _set_progress(sessions, job_id, 0.75, notify=False)
    current = {**auth, "If-None-Match": first.headers["etag"]}
    answer = await polling_client.get(f"/v1/jobs/{job_id}", headers=current)
    assert answer.status_code == 200 and answer.json()["progress"] == 0.75
