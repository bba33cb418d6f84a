"""Rows a finished generation leaves, written directly for tests that need an
output to exist without running the model."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from core.db.models import Job, JobKind, Output, Subject


async def add_generated_output(
    session: AsyncSession, account_id: uuid.UUID, blob_key: str, width: int, height: int
) -> Output:
    """A subject of the account, a generate job of it, and the job's first output
    image stored under ``blob_key``; flushed, so every id is set."""
    subject = Subject(account_id=account_id, class_noun="woman", token="sks")
    session.add(subject)
    await session.flush()
    job = Job(account_id=account_id, subject_id=subject.id, kind=JobKind.generate)
    session.add(job)
    await session.flush()
    output = Output(job_id=job.id, subject_id=subject.id, account_id=account_id,
                    position=0, blob_key=blob_key, width=width, height=height)  # fmt: skip
    session.add(output)
    await session.flush()
    return output
