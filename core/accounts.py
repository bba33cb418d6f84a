"""Accounts and API keys. Keys are shown once and stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.models import Account, ApiKey
from core.errors import Forbidden, Unauthorized

KEY_PREFIX = "atl_"
# The account that owns work nobody asked for through the API (periodic crawls).
SYSTEM_ACCOUNT = "atelier-system"
# Characters of the key kept in clear to tell keys apart in listings and logs.
_SHOWN_CHARS = 12
# Keys a process remembers (KeyCache), least recently used dropped first.
_CACHED_KEYS = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    account_id: uuid.UUID
    key_id: uuid.UUID
    key: str  # the only time the whole key exists outside the client


async def create_account_with_key(
    session: AsyncSession, name: str, *, is_admin: bool = False
) -> NewKey:
    account = Account(name=name, is_admin=is_admin)
    session.add(account)
    await session.flush()
    return await create_key(session, account.id)


async def create_key(session: AsyncSession, account_id: uuid.UUID) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(account_id=account_id, prefix=key[:_SHOWN_CHARS], key_hash=hash_key(key))
    session.add(row)
    await session.flush()
    return NewKey(account_id=account_id, key_id=row.id, key=key)


class KeyCache:
    """Accounts of keys found valid in the last ``ttl_s``, by key hash, so a client
    polling does not cost a key lookup per request. A revoked key keeps working up
    to ``ttl_s`` in a process that checked it just before; unknown keys are never
    kept (a new key works at once, and guessing fills no memory)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._accounts: OrderedDict[str, tuple[uuid.UUID, float]] = OrderedDict()

    def get(self, key_hash: str) -> uuid.UUID | None:
        entry = self._accounts.get(key_hash)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def put(self, key_hash: str, account_id: uuid.UUID) -> None:
        if self.ttl_s <= 0:
            return
        self._accounts[key_hash] = (account_id, time.monotonic() + self.ttl_s)
        self._accounts.move_to_end(key_hash)
        if len(self._accounts) > _CACHED_KEYS:
            self._accounts.popitem(last=False)


async def authenticate(
    session: AsyncSession, key: str | None, cache: KeyCache | None = None
) -> uuid.UUID:
    """The account a bearer key belongs to; Unauthorized for anything else."""
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key_hash = hash_key(key)
    if cache is not None and (account_id := cache.get(key_hash)) is not None:
        return account_id
    query = select(ApiKey).where(col(ApiKey.key_hash) == key_hash, col(ApiKey.revoked_at).is_(None))
    row = (await session.exec(query)).first()
    if row is None:
        raise Unauthorized("invalid or revoked API key")
    if cache is not None:
        cache.put(key_hash, row.account_id)
    return row.account_id


async def require_admin(session: AsyncSession, account_id: uuid.UUID) -> None:
    """Forbidden unless the account is an operator's (``keys create --admin``)."""
    account = await session.get(Account, account_id)
    if account is None or not account.is_admin:
        raise Forbidden("this needs an admin API key (python -m api keys create --admin)")


async def system_account(session: AsyncSession) -> uuid.UUID:
    """The admin account owning system work (periodic crawls), created on first use.

    A transaction-scoped advisory lock makes concurrent first uses (two CPU
    workers' cron firing together) create one account, not two.
    """
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(SYSTEM_ACCOUNT))))
    query = select(Account.id).where(col(Account.name) == SYSTEM_ACCOUNT, col(Account.is_admin))
    existing = (await session.exec(query.order_by(col(Account.created_at)))).first()
    if existing is not None:
        return existing
    account = Account(name=SYSTEM_ACCOUNT, is_admin=True)
    session.add(account)
    await session.flush()
    return account.id
