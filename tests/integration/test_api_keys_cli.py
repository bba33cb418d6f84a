"""`python -m api keys create` makes a key that the API accepts; only its hash is stored.

Also: admin accounts (`--admin`) and the system account periodic work belongs to.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

from httpx import AsyncClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import SYSTEM_ACCOUNT, hash_key, system_account
from core.db.engine import session_scope
from core.db.models import Account, ApiKey
from core.settings import Settings
from tests.conftest import ROOT


async def keys_create(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "api", "keys", "create", *args],
        cwd=ROOT,
        env={"DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


async def test_keys_create_prints_a_working_key(
    client: AsyncClient, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    run = await keys_create(settings, "--account", "shop")
    key = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("key"))
    response = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    async with sessions() as session:
        rows = (await session.execute(select(ApiKey))).scalars().all()
    assert [row.key_hash for row in rows] == [hash_key(key)]
    assert rows[0].prefix == key[:12] and len(key) > 40


async def test_keys_create_admin_makes_an_operator_account(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    run = await keys_create(settings, "--admin", "ops")
    assert "(admin)" in run.stdout
    async with sessions() as session:
        accounts = (await session.execute(select(Account))).scalars().all()
    assert [(a.name, a.is_admin) for a in accounts] == [("ops", True)]


async def test_system_account_is_created_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    async def get() -> uuid.UUID:
        async with session_scope(sessions) as session:
            return await system_account(session)

    ids = await asyncio.gather(*(get() for _ in range(4)))
    assert len(set(ids)) == 1
    async with sessions() as session:
        account = await session.get(Account, ids[0])
    assert account is not None and account.is_admin and account.name == SYSTEM_ACCOUNT
