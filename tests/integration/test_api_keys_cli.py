"""`python -m api keys create` makes a key that the API accepts; only its hash is stored."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from httpx import AsyncClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import hash_key
from core.db.models import ApiKey
from core.settings import Settings
from tests.conftest import ROOT


async def test_keys_create_prints_a_working_key(
    client: AsyncClient, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "api", "keys", "create", "--account", "shop"],
        cwd=ROOT,
        env={"DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("key"))
    response = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    async with sessions() as session:
        rows = (await session.execute(select(ApiKey))).scalars().all()
    assert [row.key_hash for row in rows] == [hash_key(key)]
    assert rows[0].prefix == key[:12] and len(key) > 40
