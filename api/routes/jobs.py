from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlmodel.ext.asyncio.session import AsyncSession

from api.conditional import MAX_WAIT_S, watched_response
from api.deps import AccountDep, SessionDep, SignerDep
from api.schemas import JobOut, JobPage, OutputOut
from core.blobs.signing import UrlSigner
from core.db.changes import job_topic
from core.db.models import Job, JobKind, JobStatus
from core.generations import job_outputs
from core.jobs import states

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def job_view(session: AsyncSession, signer: UrlSigner, job: Job) -> JobOut:
    outputs = [OutputOut.of(o, signer) for o in await job_outputs(session, job.id)]
    return JobOut.of(job, outputs)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(
    job_id: uuid.UUID,
    request: Request,
    account: AccountDep,
    session: SessionDep,
    signer: SignerDep,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="long-poll: hold the request up to this many seconds until the job"
            " differs from If-None-Match (or from what it is now)",
        ),
    ] = None,
) -> Response:
    """The job. Answers `ETag`; `If-None-Match` gives 304 while unchanged."""

    # An unknown job's first read raises 404 before any wait; an unchanged one's
    # poll reads nothing (the process's rendering cache).
    async def render(own: AsyncSession) -> JobOut:
        return await job_view(own, signer, await states.get_job(own, account, job_id))

    return await watched_response(
        request, session, topic=job_topic(job_id), reader=str(account), render=render, wait=wait
    )


@router.get("", response_model=JobPage)
async def list_jobs(
    account: AccountDep,
    session: SessionDep,
    signer: SignerDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
) -> JobPage:
    page = await states.list_jobs(
        session, account, limit=limit, cursor=cursor, status=status, kind=kind
    )
    items = [await job_view(session, signer, job) for job in page.jobs]
    return JobPage(items=items, next_cursor=page.next_cursor)


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(
    job_id: uuid.UUID, account: AccountDep, session: SessionDep, signer: SignerDep
) -> JobOut:
    job = await states.cancel_job(session, account, job_id)
    await session.commit()
    return await job_view(session, signer, job)
