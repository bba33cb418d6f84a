"""crawl_site: one crawl of one site, from the advisory lock to the finished run row.

    lock the site -> crawl_run row (running) -> discovery walkers ─┐ bounded queue
                                                 fetch workers <───┘ of product URLs
                                                 writer (batches of page outcomes)
    -> all pages visited? mark unseen products gone -> run row (status, counts)

A crawl is *complete* when every page it discovered got a definitive answer
(a 200, 304, 404/410, or content we could not read); known product pages that
nothing links to any more are asked again first (a removed product answers
404/410). Only then are products it did not see marked gone, and only then is
it ``succeeded``. One that ends with
pages unanswered (timeouts, 5xx after retries) is ``failed``: the catalog is
consistent, just not known to be complete; the next run picks up. A stop event
or a cancellation ends it promptly as ``interrupted``: the batch being written
rolls back (with what waited to be written, it is fetched again next time),
written ones stay.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.catalog import store
from core.catalog.context import CrawlAborted, CrawlContext, CrawlProgress, CrawlTally
from core.catalog.discover import discover
from core.catalog.fetch import CrawlErrorKind, Fetcher
from core.catalog.product_pages import ProductVisit, visit_product
from core.catalog.records import ChangeKind
from core.catalog.sites import known_sites, load_site
from core.catalog.writer import CatalogWriter
from core.db.catalog_models import CrawlRun, CrawlStatus, Product
from core.db.engine import session_scope
from core.db.models import utcnow
from core.metrics import CRAWL_DURATION
from core.settings import Settings

__all__ = ["CrawlProgress", "crawl_site", "known_sites"]

log = logging.getLogger("atelier.catalog")

ProgressCallback = Callable[[CrawlProgress], Awaitable[None] | None]
_PROGRESS_PERIOD_S: Final = 1.0
_RUN_ROW_PERIOD_S: Final = 5.0  # the crawl_run row's counts, for operators watching
_WALKERS: Final = 4  # listing/sitemap pages fetched at once; products dominate


async def crawl_site(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    site: str,
    *,
    job_id: uuid.UUID | None = None,
    progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> CrawlRun:
    """Crawl ``site`` once. Raises Conflict if a crawl of it is already running."""
    entry = load_site(settings, site)
    async with store.site_lock(store.engine_of(sessions), site):
        run_id = await _create_run(sessions, site, job_id)
        tally = CrawlTally(site)
        reporter = asyncio.create_task(_report(sessions, run_id, tally, progress))
        status, complete = CrawlStatus.failed, False
        log.info("crawl of %s started (run %s, %s)", site, run_id, entry.base_url)
        try:
            async with Fetcher(settings) as fetcher:
                ctx = CrawlContext(settings, entry, sessions, blobs, fetcher, run_id, tally)
                finished = await _crawl_unless_stopped(ctx, stop)
            if not finished:
                status = CrawlStatus.interrupted
            else:
                complete = tally.unvisited == 0 and await _mark_unseen_gone(ctx)
                status = CrawlStatus.succeeded if complete else CrawlStatus.failed
        except CrawlAborted as exc:
            log.error("crawl of %s stopped: %s", site, exc)  # status stays failed
        except asyncio.CancelledError:
            status = CrawlStatus.interrupted
            raise
        except Exception:
            log.exception("crawl of %s failed", site)
            raise
        finally:
            reporter.cancel()
            run = await _finish(sessions, run_id, tally, status, complete)
            await _call(progress, tally.progress())
            log.info("crawl of %s %s: %s", site, status, tally.progress().line())
    return run


async def _crawl_unless_stopped(ctx: CrawlContext, stop: asyncio.Event | None) -> bool:
    """True if the crawl ran to its end, False if ``stop`` was set first."""
    crawl = asyncio.create_task(_crawl(ctx))
    stopper = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        waiting = {crawl} if stopper is None else {crawl, stopper}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if crawl in done:
            crawl.result()  # its exception, if any
            return True
        log.info("crawl of %s stopping", ctx.site.name)
        return False
    finally:
        for task in (crawl, stopper):
            if task is not None and not task.done():
                task.cancel()
        # Let the workers roll back what they were writing before the run row is closed.
        await asyncio.gather(crawl, return_exceptions=True)


async def _crawl(ctx: CrawlContext) -> None:
    settings = ctx.settings
    # Enough that the host's slots never wait for a worker: a worker also waits for
    # its start time (the throttle's delay), parses, and fetches images.
    workers = (3 if settings.crawl_images else 2) * settings.crawl_concurrency_per_host
    queue: asyncio.Queue[ProductVisit | None] = asyncio.Queue(maxsize=2 * workers)
    writer = CatalogWriter(store.engine_of(ctx.sessions), ctx.site.name, ctx.run_id, ctx.tally,
                           batch_size=settings.crawl_write_batch,
                           max_wait_s=settings.crawl_write_batch_s)  # fmt: skip
    ctx.writer = writer
    try:
        async with asyncio.TaskGroup() as group:
            writing = group.create_task(writer.run())
            async with asyncio.TaskGroup() as pages:
                for _ in range(workers):
                    pages.create_task(_work(ctx, queue))
                await discover(ctx, queue, walkers=_WALKERS)
                for _ in range(workers):
                    await queue.put(None)
            writer.close()
            await writing
    except ExceptionGroup as failed:
        raise _first_cause(failed) from failed


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that failed a task group (nested groups unwrapped): what a
    caller of crawl_site can act on, rather than a group of one."""
    first = group.exceptions[0]
    return _first_cause(first) if isinstance(first, BaseExceptionGroup) else first


async def _work(ctx: CrawlContext, queue: asyncio.Queue[ProductVisit | None]) -> None:
    while (visit := await queue.get()) is not None:
        await ctx.guarded(visit.url, visit_product(ctx, visit))


async def _mark_unseen_gone(ctx: CrawlContext) -> bool:
    """After a complete crawl; False (and nothing marked) when it would take more
    than settings.crawl_max_gone_fraction of the site's live products at once:
    that is a broken site entry or a broken shop, not a season's end."""
    site, now = ctx.site.name, utcnow()
    async with session_scope(ctx.sessions) as session:
        unseen_filter = col(Product.last_run_id).is_distinct_from(ctx.run_id)
        counts = select(func.count(), func.count().filter(unseen_filter)).where(
            col(Product.site) == site, col(Product.gone_at).is_(None)
        )
        live, unseen = (await session.exec(counts)).one()
        if unseen > max(1, ctx.settings.crawl_max_gone_fraction * live):
            ctx.tally.error(CrawlErrorKind.too_many_gone, site,
                            f"{unseen} of {live} live products unseen: none marked gone",
                            unvisited=True)  # fmt: skip
            return False
        gone = await store.mark_unseen_gone(session, site, ctx.run_id, now)
    ctx.tally.product(ChangeKind.gone, gone)
    return True


async def _create_run(
    sessions: async_sessionmaker[AsyncSession], site: str, job_id: uuid.UUID | None
) -> uuid.UUID:
    run = CrawlRun(site=site, job_id=job_id, status=CrawlStatus.running)
    async with session_scope(sessions) as session:
        session.add(run)
    return run.id


async def _save_counts(
    sessions: async_sessionmaker[AsyncSession], run_id: uuid.UUID, tally: CrawlTally, **more: object
) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            update(CrawlRun).where(col(CrawlRun.id) == run_id).values(**tally.run_columns(), **more)
        )


async def _finish(
    sessions: async_sessionmaker[AsyncSession],
    run_id: uuid.UUID,
    tally: CrawlTally,
    status: str,
    complete: bool,
) -> CrawlRun:
    await _save_counts(sessions, run_id, tally, status=status, complete=complete,
                       finished_at=utcnow())  # fmt: skip
    CRAWL_DURATION.labels(site=tally.site, outcome=status).observe(tally.elapsed_s)
    async with sessions() as session:
        run = await session.get(CrawlRun, run_id)
    assert run is not None
    return run


async def _report(
    sessions: async_sessionmaker[AsyncSession],
    run_id: uuid.UUID,
    tally: CrawlTally,
    progress: ProgressCallback | None,
) -> None:
    """The progress callback once a second, the run row's counts every few seconds."""
    ticks = 0
    per_row = round(_RUN_ROW_PERIOD_S / _PROGRESS_PERIOD_S)
    while True:
        await asyncio.sleep(_PROGRESS_PERIOD_S)
        ticks += 1
        await _call(progress, tally.progress())
        if ticks % per_row == 0:
            try:
                await _save_counts(sessions, run_id, tally)
            except Exception:
                log.warning("could not save the counts of run %s", run_id, exc_info=True)


async def _call(progress: ProgressCallback | None, snapshot: CrawlProgress) -> None:
    if progress is None:
        return
    try:
        maybe = progress(snapshot)
        if inspect.isawaitable(maybe):
            await maybe
    except Exception:  # a broken progress display must not break the crawl
        log.warning("progress callback failed", exc_info=True)
