"""Subjects: one person's photo set, its rare-token identifier, and its erasure.

Creation is all-or-nothing: photos are validated, normalized and checked for
one face first, then each photo and its training crop around the face are
written to the blob store, then the rows are committed; any failure removes the
blobs already written. Everything a subject owns lives under one blob prefix.

A LoRA trained on several subjects at once holds each one's likeness: every
subject of the run gets its own copy (a ``lora`` row and a blob under its prefix,
``trained_with`` naming the whole run), and erasing any one of them erases all
the copies, and the training jobs of runs that included it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.db.models import Job, Lora, Subject, SubjectPhoto
from core.errors import InvalidInput, NotFound, PhotoRejected
from core.photos import NormalizedPhoto, PhotoLimits, check_photo_count, normalize_photo
from core.rare_tokens import RARE_TOKENS

if TYPE_CHECKING:
    from PIL import Image

    from core.ml.profiles import Profile

MAX_NAME_CHARS = 100


def subject_prefix(subject_id: uuid.UUID) -> str:
    return f"subjects/{subject_id}/"


def photo_key(subject_id: uuid.UUID, position: int) -> str:
    return f"{subject_prefix(subject_id)}photos/{position}.png"


def train_photo_key(subject_id: uuid.UUID, position: int) -> str:
    """The square crop around the face that training uses, next to its photo."""
    return f"{subject_prefix(subject_id)}photos/{position}.train.png"


def lora_key(subject_id: uuid.UUID, profile: str, job_id: uuid.UUID) -> str:
    return f"{subject_prefix(subject_id)}loras/{profile}/{job_id}.safetensors"


def output_key(subject_id: uuid.UUID, job_id: uuid.UUID, position: int) -> str:
    return f"{subject_prefix(subject_id)}outputs/{job_id}/{position}.png"


def checkpoint_prefix(subject_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """A training job's resumable checkpoints, under the subject the job belongs to
    (the first subject of a run of several)."""
    return f"{subject_prefix(subject_id)}checkpoints/{job_id}"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


CLASS_NOUN = re.compile(r"[a-z][a-z ]{0,30}[a-z]")


def check_class_noun(class_noun: str) -> str:
    noun = class_noun.strip().lower()
    if not CLASS_NOUN.fullmatch(noun):
        raise InvalidInput(
            "class_noun must be 2-32 lowercase letters (e.g. 'person', 'woman', 'man')",
            field="class_noun",
        )
    return noun


def _normalize_all(uploads: Sequence[Upload], limits: PhotoLimits) -> list[NormalizedPhoto]:
    check_photo_count(len(uploads), limits)
    return [normalize_photo(u.data, u.filename, limits) for u in uploads]


async def create_subject(
    session: AsyncSession,
    store: BlobStore,
    *,
    account_id: uuid.UUID,
    uploads: Sequence[Upload],
    class_noun: str,
    name: str,
    limits: PhotoLimits,
    idempotency_key: str | None = None,
) -> Subject:
    """A subject from its photos, checked and stored. With an Idempotency-Key, the
    subject an earlier request with that key made is returned instead (the API's
    idempotency layer replays answers; this covers a process that died after the
    commit and before its answer was recorded)."""
    if idempotency_key is not None:
        earlier = await _subject_with_key(session, account_id, idempotency_key)
        if earlier is not None:
            return earlier
    noun = check_class_noun(class_noun)
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"name is longer than {MAX_NAME_CHARS} characters", field="name")
    # Decoding photos is CPU work: keep it off the event loop.
    photos = await asyncio.to_thread(_normalize_all, uploads, limits)
    token = await _free_token(session, account_id)
    subject = Subject(account_id=account_id, name=name, class_noun=noun, token=token,
                      idempotency_key=idempotency_key)  # fmt: skip
    try:
        for position, photo in enumerate(photos):
            key = photo_key(subject.id, position)
            train_key = train_photo_key(subject.id, position)
            await store.put(key, photo.data)
            await store.put(train_key, photo.train_data)
            session.add(
                SubjectPhoto(
                    subject_id=subject.id,
                    position=position,
                    blob_key=key,
                    width=photo.width,
                    height=photo.height,
                    sha256=photo.sha256,
                    face_x=photo.face.x,
                    face_y=photo.face.y,
                    face_w=photo.face.w,
                    face_h=photo.face.h,
                    train_blob_key=train_key,
                )
            )
        session.add(subject)
        await session.commit()
    except BaseException:
        await session.rollback()
        await store.delete_prefix(subject_prefix(subject.id))
        raise
    return subject


async def _subject_with_key(
    session: AsyncSession, account_id: uuid.UUID, key: str
) -> Subject | None:
    query = select(Subject).where(
        col(Subject.account_id) == account_id, col(Subject.idempotency_key) == key
    )
    return (await session.exec(query)).first()


async def _free_token(session: AsyncSession, account_id: uuid.UUID) -> str:
    """A rare token none of the account's subjects has, so any of them can train
    together (one token per person in a run); any token once all are taken."""
    query = select(Subject.token).where(col(Subject.account_id) == account_id)
    used = set((await session.exec(query)).all())
    return secrets.choice([t for t in RARE_TOKENS if t not in used] or RARE_TOKENS)


def check_training_photos(
    run: Sequence[tuple[Subject, Sequence[Image.Image]]], profile: Profile
) -> None:
    """Refuse a training run (PhotoRejected, reason "crop-too-small") when a
    subject's stored training pictures are smaller than ``profile`` trains on.

    Uploads are checked against the deployment's profile, so this catches subjects
    made while it was a smaller one (sd15 then sdxl), and photos stored before
    crops were checked. Training centre-crops each picture to a square, so its
    shorter side is what gets resized to the profile's resolution.
    """
    for subject, photos in run:
        small = [
            (i, min(p.size)) for i, p in enumerate(photos) if min(p.size) < profile.min_crop_side
        ]
        if not small:
            continue
        named = f"{subject.id}" + (f" ({subject.name})" if subject.name else "")
        listed = ", ".join(f"photo {i + 1} is {side} px" for i, side in small)
        raise PhotoRejected(
            f"{len(small)} of the {len(photos)} training photos of subject {named} are too "
            f"small for the {profile.name} profile, which trains at {profile.resolution} px and "
            f"needs at least {profile.min_crop_side} px: {listed}; create the subject again "
            "with larger or closer photos",
            subject_id=str(subject.id),
            reason="crop-too-small",
            crop_sides=[side for _, side in small],
            min_crop_side=profile.min_crop_side,
            profile=profile.name,
            resolution=profile.resolution,
        )


async def get_subject(
    session: AsyncSession, account_id: uuid.UUID, subject_id: uuid.UUID
) -> Subject:
    subject = await session.get(Subject, subject_id)
    if subject is None or subject.account_id != account_id:
        raise NotFound(f"subject {subject_id} not found")
    return subject


async def subject_photos(session: AsyncSession, subject_id: uuid.UUID) -> list[SubjectPhoto]:
    query = (
        select(SubjectPhoto)
        .where(col(SubjectPhoto.subject_id) == subject_id)
        .order_by(col(SubjectPhoto.position))
    )
    return list((await session.execute(query)).scalars().all())


async def latest_lora(session: AsyncSession, subject_id: uuid.UUID, profile: str) -> Lora | None:
    query = (
        select(Lora)
        .where(col(Lora.subject_id) == subject_id, col(Lora.profile) == profile)
        .order_by(col(Lora.created_at).desc())
        .limit(1)
    )
    return (await session.exec(query)).one_or_none()


async def delete_subject(
    session: AsyncSession, store: BlobStore, account_id: uuid.UUID, subject_id: uuid.UUID
) -> None:
    """Erase the subject: rows cascade (photos, LoRAs, jobs, outputs), then the bytes;
    with them every copy of a LoRA it was trained into with other subjects, and
    the training jobs (and their checkpoints) of runs that included it.

    A worker still running one of its jobs finds the job gone at its next
    heartbeat, stops, and removes whatever it wrote under the prefix.
    """
    subject = await get_subject(session, account_id, subject_id)
    # The runs first: deleting a job waits for a worker committing its success, so
    # the copies that success wrote are seen by the query after.
    checkpoints = await _delete_runs_including(session, subject_id)
    copies = await _delete_shared_copies(session, subject_id)
    await session.delete(subject)
    await session.commit()
    await store.delete_prefix(subject_prefix(subject_id))
    for key in copies:
        await store.delete(key)
    for prefix in checkpoints:
        await store.delete_prefix(prefix)


async def _delete_runs_including(session: AsyncSession, subject_id: uuid.UUID) -> list[str]:
    """Delete other subjects' training jobs that also train on this one; return
    their checkpoint prefixes (the subject's own jobs go with it by cascade)."""
    member = col(Job.params).contains({"subject_ids": [str(subject_id)]})
    query = (
        delete(Job)
        .where(member, col(Job.subject_id) != subject_id)
        .returning(col(Job.id), col(Job.subject_id))
    )
    rows = (await session.execute(query)).all()
    return [checkpoint_prefix(owner, job_id) for job_id, owner in rows if owner is not None]


async def _delete_shared_copies(session: AsyncSession, subject_id: uuid.UUID) -> list[str]:
    """Delete the other subjects' copies of LoRAs trained on this one too; return
    their blob keys."""
    shared = col(Lora.trained_with).contains([str(subject_id)])
    query = (
        delete(Lora).where(shared, col(Lora.subject_id) != subject_id).returning(col(Lora.blob_key))
    )
    return list((await session.execute(query)).scalars().all())
