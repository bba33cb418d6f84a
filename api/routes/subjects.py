from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Request, Response, UploadFile

from api.deps import AccountDep, SessionDep, SettingsDep, StoreDep
from api.openapi import NO_NUL
from api.schemas import JobOut, SubjectOut
from core import subjects
from core.errors import PhotoTooLarge
from core.generations import request_training
from core.idempotency import MAX_KEY_CHARS
from core.jobs.specs import TrainRequest
from core.photos import PhotoLimits

router = APIRouter(prefix="/v1/subjects", tags=["subjects"])

# Multipart framing and form fields on top of the photos themselves.
_FORM_OVERHEAD = 64 * 1024


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        name = upload.filename or "photo"
        raise PhotoTooLarge(f"{name}: larger than {limit} bytes", photo=name)
    return data


@router.post(
    "",
    status_code=201,
    response_model=SubjectOut,
    responses={
        413: {"description": "A photo, or the whole upload, is over the size limit"},
        415: {"description": "A photo is not a JPEG, PNG or WebP"},
    },
)
async def create_subject(
    request: Request,
    account: AccountDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    photos: Annotated[list[UploadFile], File(description="3-8 photos of one person")],
    class_noun: Annotated[str, Form()] = "person",
    name: Annotated[str, Form(pattern=NO_NUL)] = "",
    idempotency_key: Annotated[str | None, Header(max_length=MAX_KEY_CHARS)] = None,
) -> SubjectOut:
    limits = PhotoLimits.from_settings(settings)
    declared = int(request.headers.get("content-length") or 0)
    if declared > limits.max_count * limits.max_bytes + _FORM_OVERHEAD:
        raise PhotoTooLarge(f"request body of {declared} bytes is over the upload limit")
    uploads = [
        subjects.Upload(p.filename or f"photo {i + 1}", await _read_limited(p, limits.max_bytes))
        for i, p in enumerate(photos)
    ]
    subject = await subjects.create_subject(
        session,
        store,
        account_id=account,
        uploads=uploads,
        class_noun=class_noun,
        name=name,
        limits=limits,
        idempotency_key=idempotency_key,
    )
    stored = await subjects.subject_photos(session, subject.id)
    return SubjectOut.of(subject, len(stored))


@router.get("/{subject_id}", response_model=SubjectOut)
async def get_subject(
    subject_id: uuid.UUID, account: AccountDep, session: SessionDep
) -> SubjectOut:
    subject = await subjects.get_subject(session, account, subject_id)
    photos = await subjects.subject_photos(session, subject.id)
    return SubjectOut.of(subject, len(photos))


@router.post("/{subject_id}/train", status_code=202, response_model=JobOut)
async def train_subject(
    subject_id: uuid.UUID,
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    body: TrainRequest | None = None,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_KEY_CHARS)] = None,
) -> JobOut:
    job = await request_training(
        session, settings, account, subject_id, body, idempotency_key=idempotency_key
    )
    return JobOut.of(job)


@router.delete("/{subject_id}", status_code=204)
async def delete_subject(
    subject_id: uuid.UUID, account: AccountDep, session: SessionDep, store: StoreDep
) -> Response:
    await subjects.delete_subject(session, store, account, subject_id)
    return Response(status_code=204)
