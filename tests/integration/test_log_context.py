"""Traceable lines: X-Request-ID on every response (given or made) and on the
access line; the job id in scope while a worker runs a job's attempt."""

from __future__ import annotations

import logging
import uuid

import pytest
from httpx import ASGITransport, AsyncClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import blob_store_from_settings
from core.db.engine import session_scope
from core.db.models import Account, Job, JobKind, JobStatus
from core.jobs import states
from core.jobs.execution import Executor, JobContext, JobResult
from core.logs import job_id_var, request_id_var
from core.settings import Settings

ACCESS = "atelier.access"


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


async def test_a_sane_client_request_id_is_answered_and_logged(
    client: AsyncClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    response = await client.get(
        f"/v1/jobs/{uuid.uuid4()}", headers={**auth, "X-Request-ID": "client-abc.123"}
    )
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "client-abc.123"
    (line,) = _access_records(caplog)
    assert line.request_id == "client-abc.123"  # type: ignore[attr-defined]
    assert line.getMessage().startswith("GET /v1/jobs/{job_id} 404 ")
    assert line.status == 404 and line.route == "/v1/jobs/{job_id}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("given", [None, "x" * 129, "has space", "new\nline"])
async def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(
    client: AsyncClient, caplog: pytest.LogCaptureFixture, given: str | None
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    headers = {"X-Request-ID": given} if given is not None else {}
    response = await client.get("/no/such/route", headers=headers)
    assert response.status_code == 404
    made = response.headers["x-request-id"]
    assert made != given and len(made) == 32 and int(made, 16) >= 0
    (line,) = _access_records(caplog)
    assert line.request_id == made  # type: ignore[attr-defined]
    assert line.getMessage().startswith("GET /no/such/route 404 ")


async def test_an_unhandled_error_still_carries_the_request_id(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    from api.app import create_app

    seen: list[str | None] = []

    async def boom() -> None:
        seen.append(request_id_var.get())
        raise RuntimeError("a bug")

    app = create_app(settings)
    app.add_api_route("/test/boom", boom)
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        response = await client.get("/test/boom", headers={"X-Request-ID": "trace-500"})
    # Starlette answers a 500 outside all added middleware: the id is there anyway.
    assert response.status_code == 500
    assert response.json()["type"] == "/problems/internal"
    assert response.headers["x-request-id"] == "trace-500"
    assert seen == ["trace-500"]


async def test_the_job_id_is_in_scope_while_its_attempt_runs(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with session_scope(sessions) as session:
        account = Account(name="logs")
        session.add(account)
        await session.flush()
        job = await states.create_job(
            session, account_id=account.id, kind=JobKind.crawl, params={}, max_attempts=1
        )
        await session.execute(
            update(Job).where(col(Job.id) == job.id).values(status=JobStatus.scheduled.value)
        )
    seen: list[str | None] = []

    async def handler(ctx: JobContext) -> JobResult:
        seen.append(job_id_var.get())
        return JobResult(result={})

    store = blob_store_from_settings(settings)
    executor = Executor(settings, sessions, store, "logs-worker", {JobKind.crawl: handler})
    assert await executor.execute(job.id) is JobStatus.succeeded
    assert seen == [str(job.id)]
    assert job_id_var.get() is None  # reset once the attempt is over
