"""Signed media URLs: what an ``<img>`` or ``<video>`` tag, which sends no bearer
header, may load.

A signed URL is the API's own URL plus ``expires`` (Unix seconds) and
``signature``: HMAC-SHA256, base64url without padding, over the path, the rest
of its query (the ``variant`` of a catalog image, sorted) and the expiry. It
grants reading that one resource until it expires; it is revoked early by
erasure, which deletes the row and bytes it points at (the URL then answers
404), or for every URL at once by changing the key.

The key is ``ATELIER_URL_SIGNING_KEY``, or else random bytes generated once and
kept in Postgres (the ``secret`` table), so every API process signs and checks
with the same one; ``url_signer`` loads it once per process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.engine import session_scope
from core.db.models import Secret, utcnow
from core.errors import Forbidden
from core.settings import Settings

# The query parameters a signature adds; everything else in the query is signed.
SIGNATURE_PARAMS: Final = frozenset({"expires", "signature"})
# Expiries are rounded up to a multiple of this, so a URL is the same in every
# response for up to five minutes: JSON bodies embedding signed URLs keep their
# ETag (a client's If-None-Match still gets 304) instead of changing every second.
EXPIRY_BUCKET_S: Final = 300
SECRET_NAME: Final = "url-signing-key"
_GENERATED_KEY_BYTES: Final = 32
# Binds a MAC to this use of the key, should the key ever sign anything else.
_CONTEXT: Final = b"atelier-media-url-v1\n"


class InvalidSignature(Forbidden):
    code = "invalid-signature"
    title = "Invalid signature"


class UrlExpired(Forbidden):
    code = "url-expired"
    title = "URL expired"


def signed_path(path: str, query: Iterable[tuple[str, str]] = ()) -> str:
    """What a signature covers: the path, and the query without the signature's own
    parameters, sorted, so the order a client sends them in does not matter."""
    kept = sorted((k, v) for k, v in query if k not in SIGNATURE_PARAMS)
    return f"{path}?{urlencode(kept)}" if kept else path


@dataclass(frozen=True)
class UrlSigner:
    """Signs media URLs under ``base_url`` for ``ttl_s`` seconds, and checks them."""

    key: bytes = field(repr=False)
    base_url: str
    ttl_s: int

    def sign(self, path: str, expires: int) -> str:
        message = _CONTEXT + f"{path}\n{expires}".encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, path: str, expires: int, signature: str, now: float) -> None:
        """Raises InvalidSignature unless ``signature`` is this key's for ``path``
        and ``expires``; UrlExpired if it is, but ``expires`` has passed."""
        expected = self.sign(path, expires).encode()
        # Constant time: a byte-by-byte compare would tell an attacker how much of
        # a forged signature is right. Bytes, since compare_digest refuses non-ASCII str.
        if not hmac.compare_digest(expected, signature.encode()):
            raise InvalidSignature("the URL's signature does not match its path and expiry")
        if now >= expires:
            raise UrlExpired("the signed URL has expired; fetch the resource again for a new one")

    def expiry(self, now: float) -> int:
        """At least ``ttl_s`` from ``now``, rounded up to the bucket."""
        return math.ceil((now + self.ttl_s) / EXPIRY_BUCKET_S) * EXPIRY_BUCKET_S

    def url(
        self, path: str, query: Mapping[str, str] | None = None, *, now: float | None = None
    ) -> str:
        """The absolute signed URL of ``path`` (with ``query``, signed too)."""
        items = sorted((query or {}).items())
        expires = self.expiry(time.time() if now is None else now)
        signature = self.sign(signed_path(path, items), expires)
        params = [*items, ("expires", str(expires)), ("signature", signature)]
        return f"{self.base_url}{path}?{urlencode(params)}"


async def signing_key(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> bytes:
    """The configured key, else the generated one from Postgres, made by whichever
    process asks first: INSERT ... ON CONFLICT DO NOTHING then SELECT, so processes
    starting together all read the one row that won."""
    if settings.url_signing_key is not None:
        return settings.url_signing_key.get_secret_value().encode()
    async with session_scope(sessions) as session:
        new = {"name": SECRET_NAME, "value": secrets.token_bytes(_GENERATED_KEY_BYTES)}
        await session.execute(
            insert(Secret).values(**new, created_at=utcnow()).on_conflict_do_nothing()
        )
        stored = await session.execute(
            select(col(Secret.value)).where(col(Secret.name) == SECRET_NAME)
        )
        return bytes(stored.scalar_one())


async def url_signer(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> UrlSigner:
    key = await signing_key(settings, sessions)
    return UrlSigner(key=key, base_url=settings.public_base_url, ttl_s=settings.signed_url_ttl_s)


class LazySigner:
    """The process's signer, made on first use: a generated key is read from
    Postgres, and the API must start (and answer its 503s) while Postgres is down."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._signer: UrlSigner | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> UrlSigner:
        if self._signer is None:
            async with self._lock:
                if self._signer is None:
                    self._signer = await url_signer(self._settings, self._sessions)
        return self._signer
