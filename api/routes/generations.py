from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header

from api.deps import AccountDep, SessionDep, SettingsDep
from api.schemas import JobOut
from core.generations import request_generation
from core.idempotency import MAX_KEY_CHARS
from core.jobs.specs import GenerationSpec

router = APIRouter(prefix="/v1/generations", tags=["generations"])


@router.post("", status_code=202, response_model=JobOut)
async def create_generation(
    body: GenerationSpec,
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_KEY_CHARS)] = None,
) -> JobOut:
    """Start generating images of a subject; trains the subject first if needed
    (the job then has `depends_on` set to the training job).

    Options: `negative_prompt`, `steps`, `guidance_scale`, `width` and `height`
    (multiples of 8, 64-1024; default the profile's resolution) and `scheduler`
    (`dpmpp_2m`, `euler_a`, `ddim`, `pndm`). The job records the resolved values
    and the seed; image i uses seed + i, and the same seed, LoRA and values give
    the same images on the same device."""
    job = await request_generation(
        session,
        settings,
        account,
        body,
        idempotency_key=idempotency_key,
    )
    return JobOut.of(job)
