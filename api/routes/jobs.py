from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import AccountDep, SessionDep, SettingsDep
from api.schemas import JobOut, JobPage, OutputOut
from core.db.models import Job, JobKind, JobStatus
from core.generations import job_outputs
from core.jobs import states
from core.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def job_view(session: AsyncSession, settings: Settings, job: Job) -> JobOut:
    outputs = [
        OutputOut.of(o, settings.public_base_url) for o in await job_outputs(session, job.id)
    ]
    return JobOut.of(job, outputs)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(
    job_id: uuid.UUID, account: AccountDep, session: SessionDep, settings: SettingsDep
) -> JobOut:
    return await job_view(session, settings, await states.get_job(session, account, job_id))


@router.get("", response_model=JobPage)
async def list_jobs(
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
) -> JobPage:
    page = await states.list_jobs(
        session, account, limit=limit, cursor=cursor, status=status, kind=kind
    )
    items = [await job_view(session, settings, job) for job in page.jobs]
    return JobPage(items=items, next_cursor=page.next_cursor)


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(
    job_id: uuid.UUID, account: AccountDep, session: SessionDep, settings: SettingsDep
) -> JobOut:
    job = await states.cancel_job(session, account, job_id)
    await session.commit()
    return await job_view(session, settings, job)
