"""FastAPI dependencies, as Annotated aliases the routes use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import authenticate, require_admin
from core.blobs.store import BlobStore
from core.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="API key from `python -m api keys create`")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


def _store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
StoreDep = Annotated[BlobStore, Depends(_store)]


async def _account(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> uuid.UUID:
    return await authenticate(session, credentials.credentials if credentials else None)


AccountDep = Annotated[uuid.UUID, Depends(_account)]


async def _admin_account(session: SessionDep, account_id: AccountDep) -> uuid.UUID:
    await require_admin(session, account_id)
    return account_id


# An operator's account: 401 without a valid key, 403 with a non-admin one.
AdminAccount = Annotated[uuid.UUID, Depends(_admin_account)]
