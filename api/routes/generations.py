from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header

from api.deps import AccountDep, SessionDep, SettingsDep
from api.schemas import GenerationIn, JobOut
from core.generations import GenerationRequest, request_generation

router = APIRouter(prefix="/v1/generations", tags=["generations"])


@router.post("", status_code=202, response_model=JobOut)
async def create_generation(
    body: GenerationIn,
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Start generating images of a subject; trains the subject first if needed
    (the job then has `depends_on` set to the training job)."""
    job = await request_generation(
        session,
        settings,
        account,
        GenerationRequest(**body.model_dump()),
        idempotency_key=idempotency_key,
    )
    return JobOut.of(job)
