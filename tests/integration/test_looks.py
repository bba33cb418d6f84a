"""The look resource over HTTP, served by a real uvicorn on loopback: creation with
its child jobs, ETags and 304s, long-polls woken by Postgres notifications, the
event stream, cancel and listing. The child jobs are moved through their states
the way the scheduler and a worker move them (core.jobs.states), without a model."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import authenticate
from core.db.engine import session_scope
from core.db.models import Job, JobStatus, Output, Subject, utcnow

# A change must reach a long-poll well within the 1 s.
WAKE_LIMIT_S = 1.0


@pytest.fixture
async def http(served: str, auth: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served, headers=auth, timeout=30) as client:
        yield client


async def _subject(sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]) -> str:
    async with session_scope(sessions) as session:
        account = await authenticate(session, auth["Authorization"].removeprefix("Bearer "))
        subject = Subject(account_id=account, class_noun="woman", token="sks")
        session.add(subject)
    return str(subject.id)


async def _set(sessions: async_sessionmaker[AsyncSession], job_id: str, **values: Any) -> None:
    """Write a child job's columns as a worker or the scheduler would, and commit."""
    async with session_scope(sessions) as session:
        where = col(Job.id) == uuid.UUID(job_id)
        await session.execute(update(Job).where(where).values(updated_at=utcnow(), **values))


async def _finish_generation(
    sessions: async_sessionmaker[AsyncSession], look: dict[str, Any], images: int
) -> None:
    job_id = uuid.UUID(look["jobs"]["generation"])
    async with session_scope(sessions) as session:
        job = await session.get(Job, job_id)
        assert job is not None and job.subject_id is not None
        for i in range(images):
            session.add(Output(job_id=job.id, subject_id=job.subject_id, account_id=job.account_id,
                               position=i, blob_key=f"x/{i}.png", width=64, height=64))  # fmt: skip
        job.status = JobStatus.succeeded.value  # type: ignore[assignment]
        job.stage, job.progress, job.finished_at = "done", 1.0, utcnow()
        job.result = {"timings": {"load_s": 0.5, "generation_s": 2.0, "matching_s": 0.25}}


async def _start(http: httpx.AsyncClient, subject_id: str, **extra: Any) -> dict[str, Any]:
    body = {"subject_id": subject_id, "prompt": "a wizard's robe", **extra}
    response = await http.post("/v1/looks", json=body)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/looks/{response.json()['id']}"
    return dict(response.json())


async def test_a_look_starts_training_then_generation(
    http: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    look = await _start(http, await _subject(sessions, auth), num_images=2)
    assert look["status"] == "queued" and look["stage"] == "training"
    assert [s["name"] for s in look["stages"]] == ["training", "generating", "matching"]
    assert look["spec"]["num_images"] == 2 and look["spec"]["candidates"] >= 2
    generation = (await http.get(f"/v1/jobs/{look['jobs']['generation']}")).json()
    assert generation["depends_on"] == look["jobs"]["training"]
    assert look["eta_s"] is not None and look["eta_s"] > 0


async def test_etag_and_304_until_a_child_changes(
    http: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    look = await _start(http, await _subject(sessions, auth))
    first = await http.get(f"/v1/looks/{look['id']}")
    etag = first.headers["etag"]
    again = await http.get(f"/v1/looks/{look['id']}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""
    running = dict(status="running", started_at=utcnow(), stage="training", progress=0.4)
    await _set(sessions, look["jobs"]["training"], **running, progress_detail={"step": 4})
    changed = await http.get(f"/v1/looks/{look['id']}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    body = changed.json()
    assert body["status"] == "running" and body["stages"][0]["detail"]["step"] == 4
    job_url = f"/v1/jobs/{look['jobs']['training']}"
    job_etag = (await http.get(job_url)).headers["etag"]
    job = await http.get(job_url, headers={"If-None-Match": job_etag})
    assert job.status_code == 304


async def test_long_poll_wakes_on_a_change_and_times_out_unchanged(
    http: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    look = await _start(http, await _subject(sessions, auth))
    url = f"/v1/looks/{look['id']}"
    etag = (await http.get(url)).headers["etag"]

    timed_out = await http.get(url, params={"wait": 0.3}, headers={"If-None-Match": etag})
    assert timed_out.status_code == 304
    unchanged = await http.get(url, params={"wait": 0.3})
    assert unchanged.status_code == 200 and unchanged.headers["etag"] == etag

    poll = asyncio.create_task(http.get(url, params={"wait": 30}, headers={"If-None-Match": etag}))
    await asyncio.sleep(0.3)  # let the poll park; it must still be waiting
    assert not poll.done()
    changed_at = time.monotonic()
    await _set(sessions, look["jobs"]["training"], status="running", started_at=utcnow())
    woken = await poll
    assert time.monotonic() - changed_at < WAKE_LIMIT_S
    assert woken.status_code == 200 and woken.json()["status"] == "running"

    job_url = f"/v1/jobs/{look['jobs']['training']}"
    job_etag = (await http.get(job_url)).headers["etag"]
    job_poll = asyncio.create_task(
        http.get(job_url, params={"wait": 30}, headers={"If-None-Match": job_etag})
    )
    await asyncio.sleep(0.3)
    await _set(sessions, look["jobs"]["training"], progress=0.5)
    assert (await job_poll).json()["progress"] == 0.5


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name:
            yield name, json.loads(line.removeprefix("data: "))


@pytest.mark.parametrize("matching_seen", [True, False], ids=["matching-seen", "matching-missed"])
async def test_event_stream_follows_the_look_to_completion(
    http: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
    matching_seen: bool,
) -> None:
    """Every stage arrives in order, also one that began and ended between two of
    the worker's heartbeats (matching on a small model)."""
    look = await _start(http, await _subject(sessions, auth), num_images=2, candidates=2)
    train, gen = look["jobs"]["training"], look["jobs"]["generation"]
    steps = [
        (train, dict(status="running", started_at=utcnow(), stage="training", progress=0.5)),
        (train, dict(status="succeeded", finished_at=utcnow(), progress=1.0, stage="done")),
        (gen, dict(status="running", started_at=utcnow(), stage="generating", progress=0.3)),
        (gen, dict(stage="matching", progress=0.9)),
    ][: None if matching_seen else 3]
    seen: list[tuple[str, Any]] = []
    finished = False
    async with http.stream("GET", f"/v1/looks/{look['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for name, data in _events(response):
            seen.append((name, data))
            if name == "progress" and steps:
                job_id, values = steps.pop(0)
                await _set(sessions, job_id, **values)
            elif name == "progress" and not finished:
                await _finish_generation(sessions, look, images=2)
                finished = True
    names = [n for n, _ in seen]
    stages = [d["stage"] for n, d in seen if n == "stage"]
    assert stages == ["training", "generating", "matching"]
    assert names.count("image") == 2 and names[-1] == "completed"
    assert names.index("image") > names.index("stage", names.index("stage") + 2)
    final = seen[-1][1]
    assert final["status"] == "succeeded" and final["progress"] == 1.0
    assert [s["seconds"] for s in final["stages"]][1:] == [2.5, 0.25]


async def test_cancel_cancels_the_children_but_not_a_shared_training(
    http: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    subject = await _subject(sessions, auth)
    first, second = await _start(http, subject), await _start(http, subject)
    assert first["jobs"]["training"] == second["jobs"]["training"]  # one training for both
    canceled = await http.post(f"/v1/looks/{first['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    gen = (await http.get(f"/v1/jobs/{first['jobs']['generation']}")).json()
    train = (await http.get(f"/v1/jobs/{first['jobs']['training']}")).json()
    assert gen["status"] == "canceled" and train["status"] == "queued"
    again = await http.post(f"/v1/looks/{first['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    await http.post(f"/v1/looks/{second['id']}/cancel")
    train = (await http.get(f"/v1/jobs/{first['jobs']['training']}")).json()
    assert train["status"] == "canceled"  # nobody waits on it any more


async def test_list_pages_and_filters_by_status(
    http: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], auth: dict[str, str]
) -> None:
    subject = await _subject(sessions, auth)
    looks = [await _start(http, subject) for _ in range(3)]
    await http.post(f"/v1/looks/{looks[0]['id']}/cancel")
    page = (await http.get("/v1/looks", params={"limit": 2})).json()
    rest = (await http.get("/v1/looks", params={"limit": 2, "cursor": page["next_cursor"]})).json()
    ids = [item["id"] for item in page["items"] + rest["items"]]
    assert ids == [look["id"] for look in reversed(looks)] and rest["next_cursor"] is None
    canceled = (await http.get("/v1/looks", params={"status": "canceled"})).json()
    assert [item["id"] for item in canceled["items"]] == [looks[0]["id"]]
    queued = (await http.get("/v1/looks", params={"status": "queued"})).json()
    assert len(queued["items"]) == 2


async def test_bad_requests_are_problems(
    http: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
    other_auth: dict[str, str],
) -> None:
    subject = await _subject(sessions, auth)
    video = await http.post("/v1/looks", json={"subject_id": subject, "prompt": "x", "video": True})
    assert video.status_code == 422 and "video" in video.json()["detail"]
    look = await _start(http, subject)
    stranger = await http.get(f"/v1/looks/{look['id']}", headers=other_auth)
    assert stranger.status_code == 404
    assert (await http.get(f"/v1/looks/{look['id']}/events", headers=other_auth)).status_code == 404
    unknown = await http.post("/v1/looks", json={"subject_id": str(uuid.uuid4()), "prompt": "x"})
    assert unknown.status_code == 404
