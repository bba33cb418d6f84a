"""store.write_batch, the crawl's batched writes, against the real Postgres."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.catalog import store
from core.catalog.context import CrawlTally
from core.catalog.records import ChangeKind, ProductRecord
from core.catalog.store import Gone, PageRow, ProductWrite, Touch
from core.catalog.writer import CatalogWriter
from core.db.catalog_models import CrawlPage, Product, ProductPrice
from core.db.engine import session_scope
from core.db.models import utcnow

Sessions = async_sessionmaker[AsyncSession]
SITE = "shop"


def record(sku: str, price: str = "100.00", **more: object) -> ProductRecord:
    values = dict(external_id=sku, url=f"https://shop.test/p/{sku}", name=f"Coat {sku}",
                  price=Decimal(price), currency="EUR", sizes=("S", "M"))  # fmt: skip
    return ProductRecord(**(values | more))  # type: ignore[arg-type]


def write(sku: str, price: str = "100.00", **more: object) -> ProductWrite:
    rec = record(sku, price, **more)
    return ProductWrite(rec, utcnow(), PageRow(rec.url, "product", 200, utcnow(), etag=f'"{sku}"'))


async def batch(sessions: Sessions, run_id: uuid.UUID, *outcomes: object) -> store.BatchOutcome:
    writes = [o for o in outcomes if isinstance(o, ProductWrite)]
    touches = [o for o in outcomes if isinstance(o, Touch)]
    gones = [o for o in outcomes if isinstance(o, Gone)]
    pages = [o.page for o in outcomes if isinstance(o, ProductWrite | Gone)]
    pages += [o.page for o in touches if o.page is not None]
    async with store.driver_connection(store.engine_of(sessions)) as conn, conn.transaction():
        return await store.write_batch(conn, SITE, run_id, writes, touches, gones, pages)


async def products(sessions: Sessions) -> dict[str, Product]:
    async with sessions() as session:
        return {p.external_id: p for p in (await session.exec(select(Product))).all()}


async def test_a_batch_classifies_new_changed_unchanged_and_keeps_price_history(
    sessions: Sessions,
) -> None:
    run1, run2 = uuid.uuid4(), uuid.uuid4()
    done = await batch(sessions, run1, write("A"), write("B"), write("C", sizes=()))
    assert done.changes == [ChangeKind.new] * 3
    first = await products(sessions)
    assert first["C"].sizes == [] and first["A"].sizes == ["S", "M"]
    assert first["A"].price == Decimal("100.00") and first["A"].last_run_id == run1

    # A repriced, B unchanged, C back after being marked gone.
    async with session_scope(sessions) as session:
        assert await store.mark_gone(session, first["C"].id, utcnow())
    done = await batch(sessions, run2, write("A", "90.00"), write("B"), write("C", sizes=()))
    assert done.changes == [ChangeKind.changed, ChangeKind.unchanged, ChangeKind.changed]
    after = await products(sessions)
    assert after["A"].price == Decimal("90.00") and after["A"].changed_at > first["A"].changed_at
    assert after["B"].changed_at == first["B"].changed_at
    assert after["B"].last_seen > first["B"].last_seen
    assert after["C"].gone_at is None and all(p.last_run_id == run2 for p in after.values())
    async with sessions() as session:
        history = (await session.exec(
            select(ProductPrice).where(col(ProductPrice.product_id) == after["A"].id)
            .order_by(col(ProductPrice.seen_at))
        )).all()  # fmt: skip
        assert [h.price for h in history] == [Decimal("100.00"), Decimal("90.00")]
        pages = {p.url: p for p in (await session.exec(select(CrawlPage))).all()}
    assert pages["https://shop.test/p/A"].product_id == after["A"].id
    assert pages["https://shop.test/p/B"].product_id == after["B"].id


async def test_touches_and_gone_in_a_batch(sessions: Sessions) -> None:
    run1, run2 = uuid.uuid4(), uuid.uuid4()
    await batch(sessions, run1, write("A"), write("B"), write("C"))
    known = await products(sessions)
    async with session_scope(sessions) as session:
        assert await store.mark_gone(session, known["C"].id, utcnow())
    now = utcnow()
    stale = PageRow("https://shop.test/p/C", "product", 304, now, '"C"', None, None, known["C"].id)
    done = await batch(
        sessions, run2,
        Touch(known["A"].id, now),  # a trusted lastmod: the page row stays
        Gone(known["B"].id, now, PageRow("https://shop.test/p/B", "product", 404, now)),
        Touch(known["C"].id, now, stale),  # gone meanwhile: not counted, validators dropped
    )  # fmt: skip
    assert done.changes == [ChangeKind.unchanged] and done.gone == 1 and done.touched_gone == 1
    after = await products(sessions)
    assert after["A"].last_run_id == run2 and after["A"].gone_at is None
    assert after["B"].gone_at is not None and after["B"].available is False
    assert after["C"].last_run_id == run1
    async with sessions() as session:
        pages = {p.url: p for p in (await session.exec(select(CrawlPage))).all()}
    assert pages["https://shop.test/p/A"].status == 200  # not rewritten
    assert pages["https://shop.test/p/B"].status == 404
    gone_meanwhile = pages["https://shop.test/p/C"]
    assert gone_meanwhile.etag is None and gone_meanwhile.status == 304


async def test_the_writer_batches_splits_repeated_skus_and_isolates_a_bad_row(
    sessions: Sessions,
) -> None:
    tally = CrawlTally(SITE)
    writer = CatalogWriter(store.engine_of(sessions), SITE, uuid.uuid4(), tally,
                           batch_size=10, max_wait_s=0.05)  # fmt: skip
    running = asyncio.create_task(writer.run())
    orphan = PageRow("https://shop.test/p/X", "product", 200, utcnow(), product_id=uuid.uuid4())
    twice = write("B", "80.00")
    twice.page.url = "https://shop.test/p/B-alias"  # another URL showing the same SKU
    for outcome in (write("A"), write("B"), orphan, twice, write("C")):
        await writer.put(outcome)
    writer.close()
    await asyncio.wait_for(running, 10)
    # The orphan page (its product unknown: a foreign key violation) sank its batch;
    # written one by one, everything else made it.
    assert tally.errors["internal"] == 1 and tally.unvisited == 1
    assert tally.products[ChangeKind.new] == 3 and tally.products[ChangeKind.changed] == 1
    stored = await products(sessions)
    assert stored.keys() == {"A", "B", "C"} and stored["B"].price == Decimal("80.00")
    async with sessions() as session:
        urls = set((await session.exec(select(CrawlPage.url))).all())
    assert urls == {f"https://shop.test/p/{p}" for p in ("A", "B", "B-alias", "C")}
