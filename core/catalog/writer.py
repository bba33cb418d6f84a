"""The crawl's database writes, batched: one transaction per batch of pages.

Page handlers hand their outcome (a product read, a 304, a 404, a listing's
links...) to the writer and go on to the next page; the writer collects them
for up to ``crawl_write_batch`` pages or ``crawl_write_batch_s`` seconds and
writes each batch in one transaction of a few multi-row statements
(store.write_batch). A crawl stopped at any point leaves every page of a batch
either as it was or fully written; products are counted (new, changed,
unchanged, gone) when their batch commits.

A batch that fails is written again page by page, so one bad row costs one
page (counted as an internal error, unvisited), not its whole batch; pages
failing like that many times in a row stop the crawl (CrawlAborted).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Final

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from core.catalog import store
from core.catalog.context import MAX_FAILURES_IN_A_ROW, CrawlAborted, CrawlTally
from core.catalog.fetch import CrawlErrorKind
from core.catalog.records import ChangeKind
from core.catalog.store import Gone, PageRow, ProductWrite, Touch

log = logging.getLogger("atelier.catalog")

Outcome = ProductWrite | Touch | Gone | PageRow
_MAX_PENDING_BATCHES: Final = 4  # handlers wait when the writer falls this far behind


class CatalogWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        site: str,
        run_id: uuid.UUID,
        tally: CrawlTally,
        *,
        batch_size: int,
        max_wait_s: float,
    ) -> None:
        self.engine, self.site, self.run_id, self.tally = engine, site, run_id, tally
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self._pending: list[Outcome] = []
        self._first_at = 0.0  # when the oldest pending outcome came
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = False
        self._failures_in_a_row = 0

    async def put(self, outcome: Outcome) -> None:
        """Queue one page's outcome; waits while the writer is far behind."""
        while len(self._pending) >= _MAX_PENDING_BATCHES * self.batch_size:
            self._room.clear()
            await self._room.wait()
        if not self._pending:
            self._first_at = time.monotonic()
        self._pending.append(outcome)
        if len(self._pending) >= self.batch_size:
            self._arrived.set()

    def close(self) -> None:
        """No more outcomes: write what is pending and let ``run`` return."""
        self._closed = True
        self._arrived.set()

    async def run(self) -> None:
        """The writing loop, as a task beside the crawl's workers."""
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            wait_s = self._first_at + self.max_wait_s - time.monotonic()
            if len(self._pending) < self.batch_size and not self._closed and wait_s > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait_s)
                except TimeoutError:
                    pass
                continue
            batch = self._pending[: self.batch_size]
            del self._pending[: self.batch_size]
            self._first_at = time.monotonic()
            self._room.set()
            await self._write(batch)

    async def _write(self, batch: list[Outcome]) -> None:
        try:
            outcome = await self._transaction(batch)
        except Exception:
            if len(batch) == 1:
                raise
            log.warning("writing a batch of %d pages failed; writing them one by one",
                        len(batch), exc_info=True)  # fmt: skip
            for one in batch:
                await self._write_alone(one)
            return
        self._count(outcome)

    async def _write_alone(self, one: Outcome) -> None:
        try:
            outcome = await self._transaction([one])
        except Exception as exc:
            url = one.url if isinstance(one, PageRow) else _url_of(one)
            log.exception("writing %s failed", url)
            self.tally.error(CrawlErrorKind.internal, url, repr(exc), unvisited=True)
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                failed = f"{self._failures_in_a_row} page writes in a row failed"
                raise CrawlAborted(failed) from exc
            return
        self._count(outcome)

    async def _transaction(self, batch: Sequence[Outcome]) -> store.BatchOutcome:
        # Within a batch an external id is written once: a later page of the same
        # product (two URLs, one SKU) waits for the next round.
        rounds: list[list[Outcome]] = [[]]
        skus: list[set[str]] = [set()]
        for outcome in batch:
            if isinstance(outcome, ProductWrite):
                sku = outcome.record.external_id
                at = next((i for i, s in enumerate(skus) if sku not in s), None)
                if at is None:
                    rounds.append([])
                    skus.append(set())
                    at = len(rounds) - 1
                skus[at].add(sku)
                rounds[at].append(outcome)
            else:
                rounds[0].append(outcome)
        total = store.BatchOutcome([])
        async with store.driver_connection(self.engine) as conn, conn.transaction():
            for outcomes in rounds:
                done = await self._round(conn, outcomes)
                total.changes += done.changes
                total.gone += done.gone
                total.touched_gone += done.touched_gone
        return total

    async def _round(self, conn: asyncpg.Connection, outcomes: list[Outcome]) -> store.BatchOutcome:
        writes = [o for o in outcomes if isinstance(o, ProductWrite)]
        touches = [o for o in outcomes if isinstance(o, Touch)]
        gones = [o for o in outcomes if isinstance(o, Gone)]
        pages = [o.page for o in outcomes if isinstance(o, ProductWrite | Gone)]
        pages += [o.page for o in touches if o.page is not None]
        pages += [o for o in outcomes if isinstance(o, PageRow)]
        return await store.write_batch(conn, self.site, self.run_id, writes, touches, gones, pages)

    def _count(self, outcome: store.BatchOutcome) -> None:
        self._failures_in_a_row = 0
        for change in ChangeKind:
            count = outcome.changes.count(change)
            if count:
                self.tally.product(change, count)
        if outcome.gone:
            self.tally.product(ChangeKind.gone, outcome.gone)
        if outcome.touched_gone:
            log.warning("%d products answered 304 but were marked gone meanwhile; their "
                        "pages are read in full next time", outcome.touched_gone)  # fmt: skip


def _url_of(outcome: ProductWrite | Touch | Gone) -> str:
    if isinstance(outcome, ProductWrite):
        return outcome.page.url
    return outcome.page.url if outcome.page is not None else str(outcome.product_id)
