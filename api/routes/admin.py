"""Operator actions (admin keys only): crawls, catalog embedding, fashion-CLIP fine-tuning."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from api.catalog_schemas import CrawlRunList, CrawlRunOut
from api.deps import AdminAccount, SessionDep, SettingsDep
from api.schemas import JobOut
from api.shop_schemas import ClipModelList, ClipModelOut
from core.catalog.queries import recent_crawl_runs
from core.clip_jobs import request_catalog_embed, request_clip_finetune
from core.db.shop_models import ClipModel
from core.handlers.crawl import create_crawl_job
from core.jobs.specs import ClipFinetuneSpec, CrawlSpec

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    responses={403: {"description": "The key is not an operator's (keys create --admin)"}},
)


@router.post("/crawls", response_model=JobOut, status_code=201)
async def start_crawl(
    body: CrawlSpec, account: AdminAccount, session: SessionDep, settings: SettingsDep
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


@router.post("/clip/finetune", response_model=JobOut, status_code=201)
async def start_clip_finetune(
    body: ClipFinetuneSpec, account: AdminAccount, session: SessionDep, settings: SettingsDep
) -> JobOut:
    """A clip_finetune job (CPU queue). The version it trains becomes active only if
    its held-out text-to-image R@10 beats the active version's; 409 while one runs."""
    job = await request_clip_finetune(session, settings, account, body)
    await session.commit()
    return JobOut.of(job)


@router.post("/clip/embed", response_model=JobOut, status_code=201)
async def start_catalog_embed(
    account: AdminAccount, session: SessionDep, settings: SettingsDep
) -> JobOut:
    """A catalog_embed job (the one already waiting, if any): embeds new and changed
    products for the active version, making the base version first if none is."""
    job = await request_catalog_embed(session, settings, account)
    await session.commit()
    return JobOut.of(job)


@router.get("/clip/versions", response_model=ClipModelList)
async def list_clip_versions(
    _account: AdminAccount,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ClipModelList:
    query = select(ClipModel).order_by(col(ClipModel.created_at).desc()).limit(limit)
    return ClipModelList(items=[ClipModelOut.of(row) for row in (await session.exec(query))])
