"""Idempotency-Key records, with Stripe's semantics.

A POST that carries a key claims it for the account before running: the first
request inserts the key's row with a lease (``locked_until``) and commits at
once, so a request racing it sees the row. Once the first request has answered,
its response is stored and every retry with the same key and the same request
(method, path and body, as a fingerprint) gets that response back, for the TTL;
the same key with another request is refused. A key whose holder died (its lease
ran out with no response stored) may be taken over by a retry of the same
request. A row older than the TTL counts as absent.

Nothing here knows HTTP: api/idempotency.py turns requests into fingerprints and
outcomes into responses.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import IdempotencyKey, Job, Subject
from core.errors import AtelierError, ErrorKind

MAX_KEY_CHARS = 255
# A row deleted between our failed insert and our read (its holder released it)
# sends us round again; more rounds than this means constant churn: report busy.
_CLAIM_ROUNDS = 3


class IdempotencyKeyReused(AtelierError):
    """The key was first used with another request (method, path or body)."""

    kind = ErrorKind.invalid
    code = "idempotency-key-reused"
    title = "Idempotency-Key reused"


class IdempotencyKeyInUse(AtelierError):
    """A request with this key is still running; retry once it has answered."""

    kind = ErrorKind.conflict
    code = "idempotency-key-in-use"
    title = "Idempotency-Key in use"


class InvalidIdempotencyKey(AtelierError):
    kind = ErrorKind.invalid
    code = "invalid-idempotency-key"
    title = "Invalid Idempotency-Key"


def check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} characters, not {len(key)}"
        )


def fingerprint(method: str, target: str, canonical_body: bytes) -> str:
    """What makes two requests the same one: method, path with query, and the body
    in a canonical form (the caller's: JSON key order or a multipart boundary must
    not count)."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), target.encode(), canonical_body):
        # Length-prefixed, so no two different triples hash the same bytes.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class Proceed:
    """The key is ours until ``lease``: run the request, then record or release.
    The lease doubles as a fencing token: record and release only touch the row
    while it still holds this lease (a request that outlived it lost the key)."""

    lease: datetime


@dataclass(frozen=True)
class Replay:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Reused:
    pass


@dataclass(frozen=True)
class InFlight:
    locked_until: datetime


Claim = Proceed | Replay | Reused | InFlight


async def claim(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    key: str,
    method: str,
    path: str,
    fingerprint: str,
    now: datetime,
    lease: timedelta,
    ttl: timedelta,
) -> Claim:
    """Take the key, or say why not. The caller commits right after a Proceed, so
    racing requests see the row."""
    locked_until = now + lease
    expired = now - ttl
    for _ in range(_CLAIM_ROUNDS):
        fresh = dict(
            account_id=account_id, key=key, method=method, path=path, fingerprint=fingerprint,
            locked_until=locked_until, response_status=None, response_body=None,
            response_headers=None, created_at=now,
        )  # fmt: skip
        stmt = insert(IdempotencyKey).values(**fresh)
        stmt = stmt.on_conflict_do_update(
            index_elements=["account_id", "key"],
            set_={k: v for k, v in fresh.items() if k not in ("account_id", "key")},
            # Past the TTL the old row is as good as absent; a dead holder's key
            # goes to a retry of the same request only. (Columns here are the existing row's.)
            where=or_(
                col(IdempotencyKey.created_at) < expired,
                col(IdempotencyKey.response_status).is_(None)
                & (col(IdempotencyKey.locked_until) < now)
                & (col(IdempotencyKey.fingerprint) == fingerprint),
            ),
        )
        if (await session.execute(stmt.returning(col(IdempotencyKey.key)))).first() is not None:
            await _free_expired_job_key(session, account_id, key, expired)
            return Proceed(lease=locked_until)
        row = (
            await session.exec(
                select(IdempotencyKey).where(
                    col(IdempotencyKey.account_id) == account_id, col(IdempotencyKey.key) == key
                )
            )
        ).first()
        if row is None:
            continue  # released between our insert and our read
        if row.fingerprint != fingerprint:
            return Reused()
        if row.response_status is not None:
            assert row.response_body is not None
            return Replay(row.response_status, row.response_body, row.response_headers or {})
        assert row.locked_until is not None
        return InFlight(locked_until=row.locked_until)
    return InFlight(locked_until=locked_until)


async def _free_expired_job_key(
    session: AsyncSession, account_id: uuid.UUID, key: str, expired: datetime
) -> None:
    """Jobs and subjects keep the key they were made with (the backstop for a
    request whose process died before its response was stored). Past the TTL the
    key is the client's again, so a row that old lets go of it."""
    for table in (Job, Subject):
        await session.execute(
            update(table)
            .where(
                col(table.account_id) == account_id,
                col(table.idempotency_key) == key,
                col(table.created_at) < expired,
            )
            .values(idempotency_key=None)
        )


def _held(account_id: uuid.UUID, key: str, lease: datetime) -> Any:
    return (
        (col(IdempotencyKey.account_id) == account_id)
        & (col(IdempotencyKey.key) == key)
        & (col(IdempotencyKey.locked_until) == lease)
    )


async def record(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    key: str,
    lease: datetime,
    status: int,
    body: bytes,
    headers: dict[str, str],
) -> bool:
    """Store the response retries will get; False if the lease was lost."""
    stmt = (
        update(IdempotencyKey)
        .where(_held(account_id, key, lease))
        .values(
            response_status=status, response_body=body, response_headers=headers, locked_until=None
        )
        .returning(col(IdempotencyKey.key))
    )
    return (await session.execute(stmt)).first() is not None


async def release(
    session: AsyncSession, *, account_id: uuid.UUID, key: str, lease: datetime
) -> None:
    """Forget the key: the request failed in a way a retry should not inherit."""
    await session.execute(delete(IdempotencyKey).where(_held(account_id, key, lease)))


async def sweep_expired(session: AsyncSession, *, now: datetime, ttl: timedelta) -> int:
    """Delete keys older than the TTL (claim already ignores them); how many."""
    result = await session.execute(
        delete(IdempotencyKey).where(col(IdempotencyKey.created_at) < now - ttl)
    )
    return int(getattr(result, "rowcount", 0))
