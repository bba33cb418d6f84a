"""`python -m core.db.create`: create the database named in DATABASE_URL if missing."""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy.engine import make_url

from core.settings import Settings


async def main() -> None:
    url = make_url(Settings().database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database="postgres"
    )
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database):
            await conn.execute(f'CREATE DATABASE "{url.database}"')
            print(f"created database {url.database}")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
