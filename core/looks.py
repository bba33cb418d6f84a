"""The look: the one resource a shopper's frontend needs.

``POST /v1/looks`` names a subject and a prompt; atelier trains the subject when
it has no LoRA for the profile (or joins the training already running), then
generates, grounds, reranks and matches products in one generation job. The
look row names its child jobs; where it stands is read from them
(``core.look_progress``). Cancelling a look cancels its children, except a
training another look or generation still waits on.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import ConfigDict, Field
from sqlalchemy import and_, exists, or_
from sqlalchemy.orm import aliased
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.cursor import newest_first
from core.db.models import ACTIVE, Job, JobStatus, Look, Output, utcnow
from core.errors import Conflict, InvalidInput, NotFound
from core.fleet.cost_store import observed_costs
from core.fleet.costs import UnknownShape, cached_cost_table, job_shape, job_units
from core.generations import add_generation, job_outputs
from core.jobs import states
from core.jobs.specs import GenerationSpec
from core.look_progress import Children, LookState, LookStatus, look_state
from core.settings import Settings


class LookSpec(GenerationSpec):
    """What a look asks for: a generation's spec (prompt, images, candidates,
    filters...) and whether to render the spin video of the image the shopper
    picks first."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "subject_id": "3f2c1a9e-8d4b-4c59-9a57-1f0e6d2b7c41",
            "prompt": "my next Halloween costume for a Harry Potter themed party",
            "num_images": 4,
            "filters": {"category": "Coats", "max_price": "800.00", "currency": "EUR"},
        }]},
    )  # fmt: skip

    video: bool = Field(
        False,
        strict=True,
        description="also render a spin video of the first image (not available yet)",
    )

    def resolve(self, settings: Settings) -> LookSpec:
        if self.video:
            # The spin video (its motion module, ControlNet and job kind) is not
            # built yet; refusing beats accepting a flag that does nothing.
            raise InvalidInput("the spin video is not available yet", field="video")
        resolved = super().resolve(settings)
        return LookSpec.model_validate({**resolved.model_dump(), "video": self.video})

    def generation(self) -> GenerationSpec:
        return GenerationSpec.model_validate(self.model_dump(exclude={"video"}))


async def create_look(
    session: AsyncSession, settings: Settings, account_id: uuid.UUID, request: LookSpec
) -> Look:
    """The look and its child jobs, in one transaction."""
    spec = request.resolve(settings)
    generation = await add_generation(session, settings, account_id, spec.generation())
    look = Look(
        account_id=account_id,
        subject_id=spec.subject_id,
        spec=spec.params(),
        train_job_id=generation.depends_on,
        generate_job_id=generation.id,
    )
    session.add(look)
    await session.commit()
    return look


async def get_look(session: AsyncSession, account_id: uuid.UUID, look_id: uuid.UUID) -> Look:
    look = await session.get(Look, look_id, populate_existing=True)
    if look is None or look.account_id != account_id:
        raise NotFound(f"look {look_id} not found")
    return look


async def children_of(session: AsyncSession, look: Look) -> Children:
    ids = [i for i in (look.train_job_id, look.generate_job_id, look.video_job_id) if i]
    # populate_existing: the session may hold them from an earlier read (a long-poll).
    query = select(Job).where(col(Job.id).in_(ids)).execution_options(populate_existing=True)
    rows = (await session.exec(query)).all() if ids else []
    jobs = {job.id: job for job in rows}
    return Children(
        training=jobs.get(look.train_job_id) if look.train_job_id else None,
        generation=jobs.get(look.generate_job_id) if look.generate_job_id else None,
        video=jobs.get(look.video_job_id) if look.video_job_id else None,
    )


async def expected_seconds(session: AsyncSession, jobs: Sequence[Job]) -> dict[str, float]:
    """Each job's expected seconds under the cost model (observed costs first)."""
    table = cached_cost_table()
    shapes = {}
    for job in jobs:
        try:
            shapes[str(job.id)] = job_shape(job)
        except (KeyError, UnknownShape):
            continue
    observed = await observed_costs(session, [s.key for s in shapes.values()])
    expected = {}
    for job in jobs:
        shape = shapes.get(str(job.id))
        if shape is None:
            continue
        try:
            cost = table.cost(shape, job_units(job), observed.get(shape.key))
        except UnknownShape:
            continue
        expected[str(job.id)] = cost.seconds
    return expected


@dataclass(frozen=True)
class LookDetail:
    look: Look
    spec: LookSpec
    state: LookState
    children: Children
    outputs: list[Output]


async def look_detail(session: AsyncSession, look: Look, now: datetime | None = None) -> LookDetail:
    children = await children_of(session, look)
    jobs = [j for j in (children.training, children.generation, children.video) if j]
    state = look_state(look, children, await expected_seconds(session, jobs), now or utcnow())
    generation = children.generation
    outputs = await job_outputs(session, generation.id) if generation else []
    return LookDetail(look, LookSpec.model_validate(look.spec), state, children, outputs)


@dataclass(frozen=True)
class LookPage:
    looks: Sequence[Look]
    next_cursor: str | None


def _status_filter(status: LookStatus) -> object:
    """SQL for a look's derived status (``core.look_progress``), for listing."""
    final = aliased(Job)
    child = aliased(Job)
    of_look = or_(
        col(child.id) == col(Look.train_job_id),
        col(child.id) == col(Look.generate_job_id),
        col(child.id) == col(Look.video_job_id),
    )
    any_child = lambda *states_: exists().where(  # noqa: E731
        of_look, col(child.status).in_([s.value for s in states_])
    )
    final_is = lambda s: exists().where(  # noqa: E731
        col(final.id) == col(Look.generate_job_id), col(final.status) == s.value
    )
    canceled = or_(col(Look.canceled_at).is_not(None), any_child(JobStatus.canceled))
    failed = and_(~canceled, any_child(JobStatus.failed))
    settled = or_(canceled, failed)
    if status is LookStatus.canceled:
        return canceled
    if status is LookStatus.failed:
        return failed
    if status is LookStatus.succeeded:
        return and_(~settled, final_is(JobStatus.succeeded))
    started = any_child(JobStatus.running, JobStatus.succeeded)
    active = and_(~settled, ~final_is(JobStatus.succeeded))
    return and_(active, started if status is LookStatus.running else ~started)


async def list_looks(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None = None,
    subject_id: uuid.UUID | None = None,
    status: LookStatus | None = None,
) -> LookPage:
    """Newest first, keyset-paged like jobs."""
    query = select(Look).where(col(Look.account_id) == account_id)
    if subject_id is not None:
        query = query.where(col(Look.subject_id) == subject_id)
    if status is not None:
        query = query.where(_status_filter(status))  # type: ignore[arg-type]
    rows, after = await newest_first(
        session, query, col(Look.created_at), col(Look.id), limit=limit, cursor=cursor
    )
    return LookPage(rows, after)


async def _shared(session: AsyncSession, training: Job, look: Look) -> bool:
    """Whether an active job outside this look still waits on the training."""
    query = select(Job.id).where(
        col(Job.depends_on) == training.id,
        col(Job.id) != look.generate_job_id,
        col(Job.status).in_([s.value for s in ACTIVE]),
    )
    return (await session.exec(query.limit(1))).first() is not None


async def cancel_look(session: AsyncSession, account_id: uuid.UUID, look_id: uuid.UUID) -> Look:
    """Cancel the look and its active children (a running one stops at its next
    step); a training another request waits on keeps running for it."""
    look = await get_look(session, account_id, look_id)
    await session.refresh(look, with_for_update=True)
    detail = await look_detail(session, look)
    if detail.state.status.finished:
        raise Conflict(
            f"look {look_id} already {detail.state.status.value}", look_status=detail.state.status
        )
    children = detail.children
    for job in (children.video, children.generation, children.training):
        if job is None or JobStatus(job.status).finished:
            continue
        if job is children.training and await _shared(session, job, look):
            continue
        await states.cancel_job(session, account_id, job.id)
    look.canceled_at = utcnow()
    await session.commit()
    return look
