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
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core import jobs
from core.db.models import Job, JobKind, Output, Subject
from core.errors import InvalidInput, NotFound
from core.ml.profiles import get_profile
from core.settings import Settings
from core.subjects import get_subject, latest_lora, subject_photos

# Seeds are recorded per image as seed + i; keep them in a range every generator takes.
MAX_SEED = 2**31 - 1

# Samplers a client may pick (core.ml.generate.SCHEDULERS maps them to diffusers
# classes; kept here too so the API validates them without importing torch).
SchedulerName = Literal["dpmpp_2m", "euler_a", "ddim", "pndm"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
DEFAULT_SCHEDULER: SchedulerName = "dpmpp_2m"
# Image sides: SD 1.x latents are 1/8 of the image, so multiples of 8. The bounds
# are module constants until settings grow ATELIER_MIN_SIDE / ATELIER_MAX_SIDE:
# below 64 px nothing recognisable comes out; 1024 px, twice SD 1.5's training
# side, caps a request's cost at 4x the pixels and memory of 512 px.
SIDE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SIDE = 1024


@dataclass(frozen=True)
class GenerationRequest:
    subject_id: uuid.UUID
    prompt: str
    num_images: int = 4
    seed: int | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None  # None: the profile's resolution
    height: int | None = None
    scheduler: str | None = None  # None: DEFAULT_SCHEDULER


def check_side(value: int, field: str) -> int:
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidInput(
            f"{field} must be {MIN_SIDE}-{MAX_SIDE} pixels (got {value})", field=field
        )
    if value % SIDE_MULTIPLE:
        raise InvalidInput(
            f"{field} must be a multiple of {SIDE_MULTIPLE} pixels (got {value})", field=field
        )
    return value


def check_scheduler(name: str | None) -> str:
    if name is None:
        return DEFAULT_SCHEDULER
    if name not in SCHEDULERS:
        raise InvalidInput(
            f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}", field="scheduler"
        )
    return name


def check_prompt(prompt: str, settings: Settings, field: str = "prompt") -> str:
    text = " ".join(prompt.split())
    if not text:
        raise InvalidInput(f"{field} is empty", field=field)
    if len(text) > settings.max_prompt_chars:
        raise InvalidInput(
            f"{field} is {len(text)} characters; the limit is {settings.max_prompt_chars}",
            field=field,
        )
    return text


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
    *,
    steps: int | None = None,
    with_subjects: list[uuid.UUID] | None = None,
    idempotency_key: str | None = None,
) -> Job:
    run = await _run_subjects(session, settings, account_id, subject_id, with_subjects or [])
    if steps is not None and not 1 <= steps <= settings.max_train_steps:
        raise InvalidInput(f"steps must be 1-{settings.max_train_steps}", field="steps")
    params: dict[str, Any] = {"profile": settings.profile}
    if steps is not None:
        params["steps"] = steps
    if len(run) > 1:
        params["subject_ids"] = [str(subject.id) for subject in run]
    job = await jobs.create_job(
        session,
        account_id=account_id,
        kind=JobKind.train,
        subject_id=subject_id,
        params=params,
        max_attempts=settings.job_max_attempts,
        idempotency_key=idempotency_key,
    )
    await session.commit()
    return job


async def request_generation(
    session: AsyncSession,
    settings: Settings,
    account_id: uuid.UUID,
    request: GenerationRequest,
    *,
    idempotency_key: str | None = None,
) -> Job:
    subject = await get_subject(session, account_id, request.subject_id)
    prompt = check_prompt(request.prompt, settings)
    negative = (
        check_prompt(request.negative_prompt, settings, "negative_prompt")
        if (request.negative_prompt.strip())
        else ""
    )
    if not 1 <= request.num_images <= settings.max_images:
        raise InvalidInput(f"num_images must be 1-{settings.max_images}", field="num_images")
    seed = request.seed if request.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4]) >> 1
    if not 0 <= seed <= MAX_SEED - settings.max_images:
        raise InvalidInput(f"seed must be 0-{MAX_SEED - settings.max_images}", field="seed")
    resolution = get_profile(settings.profile).resolution
    width = check_side(request.width if request.width is not None else resolution, "width")
    height = check_side(request.height if request.height is not None else resolution, "height")
    scheduler = check_scheduler(request.scheduler)

    depends_on = None
    if await latest_lora(session, subject.id, settings.profile) is None:
        training = await jobs.active_job_for_subject(session, subject.id, JobKind.train)
        if training is None:
            training = await jobs.create_job(
                session,
                account_id=account_id,
                kind=JobKind.train,
                subject_id=subject.id,
                params={"profile": settings.profile},
                max_attempts=settings.job_max_attempts,
            )
        depends_on = training.id
    params: dict[str, Any] = {
        "profile": settings.profile,
        "prompt": prompt,
        "negative_prompt": negative,
        "num_images": request.num_images,
        "seed": seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": scheduler,
    }
    job = await jobs.create_job(
        session,
        account_id=account_id,
        kind=JobKind.generate,
        subject_id=subject.id,
        params=params,
        max_attempts=settings.job_max_attempts,
        depends_on=depends_on,
        idempotency_key=idempotency_key,
    )
    await session.commit()
    return job


async def job_outputs(session: AsyncSession, job_id: uuid.UUID) -> list[Output]:
    query = select(Output).where(col(Output.job_id) == job_id).order_by(col(Output.position))
    return list((await session.exec(query)).all())


async def get_output(session: AsyncSession, account_id: uuid.UUID, output_id: uuid.UUID) -> Output:
    output = await session.get(Output, output_id)
    if output is None or output.account_id != account_id:
        raise NotFound(f"output {output_id} not found")
    return output
