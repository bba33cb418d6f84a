"""Operator actions (admin keys only): starting crawls, seeing how they went."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.catalog_schemas import CrawlIn, CrawlRunList, CrawlRunOut
from api.deps import AdminAccount, SessionDep, SettingsDep
from api.schemas import JobOut
from core.catalog.queries import recent_crawl_runs
from core.crawl_job import create_crawl_job

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/crawls", response_model=JobOut, status_code=201)
async def start_crawl(
    body: CrawlIn, account: AdminAccount, session: SessionDep, settings: SettingsDep
) -> JobOut:
    """A crawl job for the site, pollable at /v1/jobs/{id}; 409 if one is active."""
    job = await create_crawl_job(session, settings, account, body.site)
    await session.commit()
    return JobOut.of(job)


@router.get("/crawls", response_model=CrawlRunList)
async def list_crawls(
    _account: AdminAccount,
    session: SessionDep,
    site: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> CrawlRunList:
    runs = await recent_crawl_runs(session, limit=limit, site=site)
    return CrawlRunList(items=[CrawlRunOut.of(run) for run in runs])
