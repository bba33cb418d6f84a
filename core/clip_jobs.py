"""Creating the fashion-CLIP jobs: catalog embedding and fine-tuning.

``catalog_embed`` (GPU queue: it runs the towers) embeds new and changed
products for the active version and drops gone ones; one waiting job is enough
however many crawls ask, so a request joins a queued one. ``clip_finetune``
(CPU queue: heads train over stored features, no tower pass) runs on demand
(``POST /v1/admin/clip/finetune``) and after a crawl that changed more than
``clip_finetune_after_change`` of the catalog; one at a time (409 otherwise).
Both are serialized per kind by a transaction-scoped advisory lock, so two
requests at once make one job.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.catalog_models import CrawlRun, Product
from core.db.models import ACTIVE, Job, JobKind, JobStatus
from core.errors import Conflict
from core.jobs import states
from core.jobs.specs import CatalogEmbedSpec, ClipFinetuneSpec
from core.settings import Settings


async def live_product_count(session: AsyncSession) -> int:
    query = select(func.count()).select_from(Product).where(col(Product.gone_at).is_(None))
    return int((await session.exec(query)).one())


async def _lock(session: AsyncSession, kind: JobKind) -> None:
    key = func.hashtext(f"atelier:job-kind:{kind.value}")
    await session.execute(select(func.pg_advisory_xact_lock(key)))


async def _active(session: AsyncSession, kind: JobKind, statuses: set[JobStatus]) -> Job | None:
    query = select(Job).where(
        col(Job.kind) == kind.value, col(Job.status).in_([s.value for s in statuses])
    )
    return (await session.exec(query.order_by(col(Job.created_at)).limit(1))).first()


async def request_catalog_embed(
    session: AsyncSession, settings: Settings, account_id: uuid.UUID
) -> Job:
    """A queued catalog_embed job: the one already waiting, or a new one.

    A running one does not count: it may have read the catalog before the
    change that asks for this one.
    """
    await _lock(session, JobKind.catalog_embed)
    waiting = await _active(session, JobKind.catalog_embed, {JobStatus.queued})
    if waiting is not None:
        return waiting
    return await states.create_job(
        session,
        account_id=account_id,
        kind=JobKind.catalog_embed,
        params=CatalogEmbedSpec().resolve(settings).params(),
        max_attempts=settings.job_max_attempts,
    )


async def request_clip_finetune(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    spec: ClipFinetuneSpec,
    *,
    depends_on: uuid.UUID | None = None,
) -> Job:
    """A queued clip_finetune job; Conflict while one is waiting or running.

    ``depends_on`` (an embed job) makes it wait until the catalog's features are
    stored; without, the job computes the missing ones itself.
    """
    await _lock(session, JobKind.clip_finetune)
    active = await _active(session, JobKind.clip_finetune, set(ACTIVE))
    if active is not None:
        raise Conflict(
            f"a CLIP fine-tune is already {active.status} (job {active.id})",
            job_id=str(active.id),
        )
    return await states.create_job(
        session,
        account_id=account_id,
        kind=JobKind.clip_finetune,
        params=spec.resolve(settings).params(),
        max_attempts=settings.job_max_attempts,
        depends_on=depends_on,
    )


async def after_crawl(
    session: AsyncSession, settings: Settings, account_id: uuid.UUID, run: CrawlRun
) -> list[Job]:
    """Follow-ups of a successful crawl: embed what changed, maybe fine-tune."""
    touched = run.products_new + run.products_changed
    if not touched and not run.products_gone and not run.images_new:
        return []
    embed = await request_catalog_embed(session, settings, account_id)
    created = [embed]
    live = await live_product_count(session)
    if live and touched / live > settings.clip_finetune_after_change:
        spec = ClipFinetuneSpec(reason=f"crawl {run.id} changed {touched} of {live} products")
        try:
            created.append(
                await request_clip_finetune(
                    session, settings, account_id, spec, depends_on=embed.id
                )
            )
        except Conflict:
            pass  # one is waiting or running: it will see this crawl's products
    return created
