"""`python -m worker crawl <site>`: one crawl in the foreground, for operators.

No job, no queue: the crawl runs in this process (under the same per-site lock
as crawl jobs, so it never overlaps one), its progress line rewritten once a
second, then the crawl_run's summary. Ctrl-C stops it cleanly: the run is
recorded as interrupted and the catalog stays consistent.

Exit codes: 0 the crawl succeeded, 1 it failed or was interrupted (or another
crawl of the site is running), 2 unknown site.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import TextIO

from core.blobs.store import blob_store_from_settings
from core.catalog.crawl import CrawlProgress, crawl_site, known_sites
from core.db.catalog_models import CrawlRun, CrawlStatus
from core.db.engine import make_engine, make_sessionmaker
from core.errors import Conflict
from core.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_UNKNOWN_SITE = 0, 1, 2
# Without a terminal (a log file) the line is printed anew, less often.
_TTY_PERIOD_S, _LOG_PERIOD_S = 1.0, 10.0
_CLEAR_TO_END = "\033[K"
_MB = 1_000_000


async def crawl_in_foreground(settings: Settings, site: str, out: TextIO = sys.stdout) -> int:
    known = known_sites(settings)
    if site not in known:
        print(f"unknown site {site!r}; known sites: {', '.join(known) or '(none)'}", file=out)
        return EXIT_UNKNOWN_SITE
    engine = make_engine(settings)
    latest: list[CrawlProgress] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    printer = asyncio.create_task(_print_progress(latest, out))
    try:
        run = await crawl_site(
            settings,
            make_sessionmaker(engine),
            blob_store_from_settings(settings),
            site,
            progress=latest.append,
            stop=stop,
        )
    except Conflict as exc:
        print(exc.detail, file=out)
        return EXIT_FAILED
    finally:
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await engine.dispose()
    if latest:
        _show(latest[-1], out, final=True)
    print(run_summary(run), file=out)
    return EXIT_OK if run.status == CrawlStatus.succeeded else EXIT_FAILED


async def _print_progress(latest: list[CrawlProgress], out: TextIO) -> None:
    period = _TTY_PERIOD_S if out.isatty() else _LOG_PERIOD_S
    while True:
        await asyncio.sleep(period)
        if latest:
            del latest[:-1]  # only the newest matters
            _show(latest[-1], out, final=False)


def _show(progress: CrawlProgress, out: TextIO, *, final: bool) -> None:
    if out.isatty():
        out.write(f"\r{progress.line()}{_CLEAR_TO_END}" + ("\n" if final else ""))
    elif not final:
        out.write(progress.line() + "\n")
    out.flush()


def run_summary(run: CrawlRun) -> str:
    statuses = ", ".join(f"{code}: {n:,}" for code, n in sorted(run.pages_by_status.items()))
    errors = ", ".join(f"{kind} {n:,}" for kind, n in sorted(run.errors.items())) or "none"
    return "\n".join(
        [
            f"crawl of {run.site} {run.status} in {run.duration_s:.1f}s"
            f" (run {run.id}{', complete' if run.complete else ', incomplete'})",
            f"  pages     {run.pages:,} ({statuses or 'none'}); {run.not_modified:,} not modified;"
            f" {run.bytes / _MB:.1f} MB",
            f"  products  {run.products_new:,} new, {run.products_changed:,} changed,"
            f" {run.products_unchanged:,} unchanged, {run.products_gone:,} gone;"
            f" {run.images_new:,} new images",
            f"  errors    {errors}",
        ]
    )
