"""FastAPI dependencies, as Annotated aliases the routes use."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import KeyCache, authenticate, require_admin
from core.blobs.signing import InvalidSignature, LazySigner, UrlSigner, signed_path
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


async def _signer(request: Request) -> UrlSigner:
    lazy: LazySigner = request.app.state.signer
    return await lazy.get()


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
StoreDep = Annotated[BlobStore, Depends(_store)]
# Signs the media URLs a response embeds (OutputOut.of(output, signer), image_url).
SignerDep = Annotated[UrlSigner, Depends(_signer)]


def _key_cache(request: Request) -> KeyCache:
    """The process's cache of checked keys, made on first use."""
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    if cache is None:
        cache = request.app.state.key_cache = KeyCache(request.app.state.settings.key_cache_s)
    return cache


async def _account(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> uuid.UUID:
    key = credentials.credentials if credentials else None
    return await authenticate(session, key, _key_cache(request))


AccountDep = Annotated[uuid.UUID, Depends(_account)]


async def _media_reader(
    request: Request,
    session: SessionDep,
    signer: SignerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    expires: Annotated[
        int | None, Query(description="signed URL: when it stops working (Unix seconds)")
    ] = None,
    signature: Annotated[
        str | None, Query(description="signed URL: HMAC-SHA256 of path and expiry, base64url")
    ] = None,
) -> uuid.UUID | None:
    """A media URL's reader: the key's account, or None when the URL's own signature
    grants it (an <img> or <video> tag sends no Authorization header). A signed URL
    is checked even when a key comes with it: 403 if bad or expired."""
    if expires is None and signature is None:
        return await _account(request, session, credentials)
    if expires is None or signature is None:
        raise InvalidSignature("a signed URL needs both expires and signature")
    path = signed_path(request.url.path, request.query_params.multi_items())
    signer.verify(path, expires, signature, now=time.time())
    return None


# The account reading a media URL, or None for a signed URL.
MediaReader = Annotated[uuid.UUID | None, Depends(_media_reader)]


async def _admin_account(session: SessionDep, account_id: AccountDep) -> uuid.UUID:
    await require_admin(session, account_id)
    return account_id


# An operator's account: 401 without a valid key, 403 with a non-admin one.
AdminAccount = Annotated[uuid.UUID, Depends(_admin_account)]
