"""What a client can ask for: train a subject, generate images of it.

A generation needs the subject's LoRA for the active profile. If there is none,
the generation waits on the subject's training job (an active one, or a new
one created here): the scheduler only hands it out once training succeeded,
and fails it with the reason if training did not.

A training job may learn several subjects of the account at once
(``with_subjects``), each bound to its own token; the job's params list them all
(``subject_ids``), and every one of them gets the LoRA.
"""

from __future__ import annotations

import uuid

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Job, JobKind, Output, Subject
from core.errors import InvalidInput, NotFound
from core.jobs import states
from core.jobs.specs import GenerationSpec, TrainRequest, TrainSpec
from core.settings import Settings
from core.subjects import get_subject, latest_lora, subject_photos


async def _run_subjects(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    subject_id: uuid.UUID,
    with_subjects: list[uuid.UUID],
) -> list[Subject]:
    """The subjects of a training run: the one trained, then ``with_subjects``, all
    the account's, each with photos, each with its own token."""
    field = "with_subjects"
    ids = [subject_id, *with_subjects]
    if len(set(ids)) != len(ids):
        raise InvalidInput("with_subjects lists a subject twice (or the one trained)", field=field)
    if len(ids) > settings.max_subjects_per_run:
        raise InvalidInput(
            f"a run trains at most {settings.max_subjects_per_run} subjects", field=field
        )
    run = [await get_subject(session, account_id, subject_id)]
    for other in with_subjects:
        try:
            run.append(await get_subject(session, account_id, other))
        except NotFound:
            # Another account's subject reads as unknown, as everywhere in the API.
            raise InvalidInput(
                f"subject {other} not found", field=field, subject=str(other)
            ) from None
    for subject in run:
        if not await subject_photos(session, subject.id):
            raise InvalidInput(f"subject {subject.id} has no photos", field=field)
    if len({subject.token for subject in run}) != len(run):
        # Subjects made before tokens were picked per account may share one.
        raise InvalidInput("the subjects of a run need distinct tokens", field=field)
    return run


async def request_training(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    subject_id: uuid.UUID,
    request: TrainRequest | None = None,
    *,
    idempotency_key: str | None = None,
) -> Job:
    request = request or TrainRequest()
    run = await _run_subjects(session, settings, account_id, subject_id, request.with_subjects)
    spec = request.spec([subject.id for subject in run]).resolve(settings)
    job = await states.create_job(
        session,
        account_id=account_id,
        kind=JobKind.train,
        subject_id=subject_id,
        params=spec.params(),
        max_attempts=settings.job_max_attempts,
        idempotency_key=idempotency_key,
    )
    await session.commit()
    return job


async def request_generation(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    request: GenerationSpec,
    *,
    idempotency_key: str | None = None,
) -> Job:
    job = await add_generation(
        session, settings, account_id, request, idempotency_key=idempotency_key
    )
    await session.commit()
    return job


async def add_generation(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    request: GenerationSpec,
    *,
    idempotency_key: str | None = None,
) -> Job:
    """The generation job (and the training it waits for, if the subject has no
    LoRA for the profile), added to the session's transaction, not committed."""
    subject = await get_subject(session, account_id, request.subject_id)
    spec = request.resolve(settings)
    assert spec.profile is not None
    depends_on = None
    if await latest_lora(session, subject.id, spec.profile) is None:
        training = await states.active_job_for_subject(session, subject.id, JobKind.train)
        if training is None:
            training = await states.create_job(
                session,
                account_id=account_id,
                kind=JobKind.train,
                subject_id=subject.id,
                params=TrainSpec(profile=spec.profile).params(),
                max_attempts=settings.job_max_attempts,
            )
        depends_on = training.id
    job = await states.create_job(
        session,
        account_id=account_id,
        kind=JobKind.generate,
        subject_id=subject.id,
        params=spec.params(),
        max_attempts=settings.job_max_attempts,
        depends_on=depends_on,
        idempotency_key=idempotency_key,
    )
    return job


async def job_outputs(session: AsyncSession, job_id: uuid.UUID) -> list[Output]:
    query = select(Output).where(col(Output.job_id) == job_id).order_by(col(Output.position))
    return list((await session.exec(query)).all())


async def get_output(session: AsyncSession, account_id: uuid.UUID, output_id: uuid.UUID) -> Output:
    output = await session.get(Output, output_id)
    if output is None or output.account_id != account_id:
        raise NotFound(f"output {output_id} not found")
    return output


async def job_of_output(session: AsyncSession, output: Output) -> Job:
    job = await session.get(Job, output.job_id)
    assert job is not None  # output.job_id is a foreign key with ON DELETE CASCADE
    return job
