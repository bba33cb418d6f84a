"""The `crawl` job: one crawl of one site, on a CPU worker.

Creating one checks the site exists and that no crawl job of that site is
waiting or running (a transaction-scoped advisory lock per site makes the check
and the insert one step, so two requests at once make one job). Running one
calls ``core.catalog.crawl.crawl_site``, whose own advisory lock guarantees a
site is never crawled twice at once even by crawls started outside jobs
(``python -m worker crawl``): that ``Conflict`` fails the job for good with the
reason, it is not retried.

Progress (pages, products new/changed/gone, errors, rate) goes into the job row
through the Executor's heartbeat; the result names the ``crawl_run`` row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import system_account
from core.catalog.crawl import CrawlProgress, crawl_site, known_sites
from core.clip_jobs import after_crawl
from core.db.catalog_models import CrawlRun, CrawlStatus
from core.db.engine import session_scope
from core.db.models import ACTIVE, Job, JobKind
from core.errors import AtelierError, Canceled, Conflict, ErrorKind, InvalidInput
from core.jobs import states
from core.jobs.execution import JobContext, JobResult
from core.jobs.specs import CrawlSpec
from core.settings import Settings

log = logging.getLogger("atelier.jobs.crawl")

# How often the crawl looks at the job's cancel flag (set by the heartbeat).
_STOP_POLL_S = 0.2


class CrawlFailed(AtelierError):
    """The crawl ended on an error (the shop down...): worth another attempt."""

    kind = ErrorKind.unavailable
    code = "crawl-failed"
    title = "Crawl failed"


def check_site(settings: Settings, site: str) -> None:
    known = known_sites(settings)
    if site not in known:
        raise InvalidInput(
            f"unknown site {site!r}; known sites: {', '.join(known) or '(none)'}",
            field="site",
            known_sites=known,
        )


async def active_crawl_job(session: AsyncSession, site: str) -> Job | None:
    query = select(Job).where(
        col(Job.kind) == JobKind.crawl.value,
        col(Job.status).in_([s.value for s in ACTIVE]),
        col(Job.params)["site"].astext == site,
    )
    return (await session.exec(query.limit(1))).first()


async def create_crawl_job(
    session: AsyncSession, settings: Settings, account_id: uuid.UUID, site: str
) -> Job:
    """A queued crawl job for ``site``. InvalidInput for an unknown site, Conflict
    when a crawl job of that site is already queued, scheduled or running."""
    check_site(settings, site)
    await _lock_site(session, site)
    active = await active_crawl_job(session, site)
    if active is not None:
        raise Conflict(
            f"a crawl of {site} is already {active.status} (job {active.id})",
            job_id=str(active.id),
            job_status=str(active.status),
        )
    return await states.create_job(
        session,
        account_id=account_id,
        kind=JobKind.crawl,
        params=CrawlSpec(site=site).params(),
        max_attempts=settings.job_max_attempts,
    )


async def _lock_site(session: AsyncSession, site: str) -> None:
    # Held until the transaction ends: the check above and the insert are one step.
    key = func.hashtext(f"atelier:crawl-job:{site}")
    await session.execute(select(func.pg_advisory_xact_lock(key)))


async def create_due_crawl_jobs(session: AsyncSession, settings: Settings) -> list[Job]:
    """The periodic crawl: a job for each of ``settings.crawl_sites`` that has no
    active crawl job and none created within ``settings.crawl_period_s``."""
    created = []
    since = func.now() - timedelta(seconds=settings.crawl_period_s)
    for site in settings.crawl_sites:
        recent = select(Job.id).where(
            col(Job.kind) == JobKind.crawl.value,
            col(Job.params)["site"].astext == site,
            col(Job.created_at) > since,
        )
        if (await session.exec(recent.limit(1))).first() is not None:
            continue
        account = await system_account(session)
        try:
            created.append(await create_crawl_job(session, settings, account, site))
        except Conflict:
            continue  # one is waiting or running: that is the periodic crawl
        except InvalidInput as exc:
            log.warning("ATELIER_CRAWL_SITES: %s", exc.detail)
    return created


async def run_crawl(ctx: JobContext) -> JobResult:
    """The Executor's handler for kind ``crawl``."""
    site = CrawlSpec.of_job(ctx.job).site
    expected = await _expected_pages(ctx, site)
    ctx.progress.stage(f"crawling {site}", start=0.0, weight=1.0)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_forward_stop(ctx.stop, stop))
    try:
        run = await crawl_site(
            ctx.settings,
            ctx.sessions,
            ctx.store,
            site,
            job_id=ctx.job.id,
            progress=lambda p: _report(ctx, p, expected),
            stop=stop,
        )
    except Conflict as exc:
        # Another crawl of the site holds its lock: running again would meet it too.
        raise Conflict(f"{exc.detail}; this job did not start a second one") from exc
    finally:
        watcher.cancel()
    if run.status == CrawlStatus.interrupted and ctx.stop.is_set():
        raise Canceled(f"crawl of {site} stopped (run {run.id})")
    if run.status != CrawlStatus.succeeded:
        raise CrawlFailed(
            f"crawl of {site} ended {run.status} (run {run.id}, errors {run.errors})",
            crawl_run_id=str(run.id),
        )
    async with session_scope(ctx.sessions) as session:
        followups = await after_crawl(session, ctx.settings, ctx.job.account_id, run)
    result = crawl_result(run)
    result["followup_job_ids"] = [str(job.id) for job in followups]
    return JobResult(result=result)


def crawl_result(run: CrawlRun) -> dict[str, Any]:
    return {
        "crawl_run_id": str(run.id),
        "site": run.site,
        "status": run.status,
        "complete": run.complete,
        "pages": run.pages,
        "not_modified": run.not_modified,
        "products_new": run.products_new,
        "products_changed": run.products_changed,
        "products_unchanged": run.products_unchanged,
        "products_gone": run.products_gone,
        "images_new": run.images_new,
        "errors": run.errors,
        "bytes": run.bytes,
        "duration_s": run.duration_s,
    }


def _report(ctx: JobContext, p: CrawlProgress, expected: int | None) -> None:
    counts = {
        "pages": p.pages,
        "products_new": p.products_new,
        "products_changed": p.products_changed,
        "products_unchanged": p.products_unchanged,
        "products_gone": p.products_gone,
        "errors": p.errors,
        "bytes": p.bytes,
        "rate": round(p.rate, 1),
        "elapsed_s": round(p.elapsed_s, 1),
    }
    if expected:
        # The last complete crawl's page count stands in for the unknown total;
        # a grown shop keeps progress just under 1 rather than past it.
        ctx.progress.step(p.pages, max(expected, p.pages + 1), **counts)
    else:
        ctx.progress.report(**counts)


async def _expected_pages(ctx: JobContext, site: str) -> int | None:
    async with ctx.sessions() as session:
        query = (
            select(CrawlRun.pages)
            .where(col(CrawlRun.site) == site, col(CrawlRun.status) == CrawlStatus.succeeded)
            .order_by(col(CrawlRun.started_at).desc())
            .limit(1)
        )
        return (await session.exec(query)).first()


async def _forward_stop(source: threading.Event, target: asyncio.Event) -> None:
    """The heartbeat sets a threading.Event; crawl_site waits on an asyncio one.

    Polled: waiting for a threading.Event in a thread would leave that thread
    blocked forever when the crawl ends first.
    """
    while not source.is_set():  # noqa: ASYNC110
        await asyncio.sleep(_STOP_POLL_S)
    target.set()
