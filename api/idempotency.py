"""Idempotency-Key on every POST under /v1/, as Stripe does it.

A pure ASGI middleware, so it covers every creating route, present and future,
without the routes knowing: it buffers the request body, fingerprints the
request, claims the key for the caller's account (core/idempotency.py), runs the
route with the buffered body, and stores the response before sending it, so a
retry that arrives after the answer always finds it. A retry gets the stored
response byte for byte, marked ``Idempotent-Replayed: true``.

Responses that say the request never ran, or that a retry may well get a
different answer to (5xx, auth, rate limits, request validation), are not kept:
the key is released so a fixed or later retry runs afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import STATUS_BY_KIND, problem
from core import idempotency
from core.accounts import authenticate
from core.db.engine import session_scope
from core.db.models import utcnow
from core.errors import AtelierError, ErrorKind, Unauthorized
from core.settings import Settings

log = logging.getLogger("atelier.api.idempotency")

REPLAYED_HEADER = "Idempotent-Replayed"
# Multipart framing and form fields on top of the photos (api/routes/subjects.py
# allows the same): no keyed body is buffered beyond what a route would accept.
FORM_OVERHEAD = 64 * 1024
# Statuses a retry must not inherit: the request was refused before it ran
# (malformed, unauthenticated, forbidden, too large, rate limited, invalid) or
# failed on our side (5xx). Anything else ran and is kept: 2xx, 404, 409...
_NOT_KEPT = frozenset({400, 401, 403, 408, 413, 415, 422, 429})
# The first request usually answers within a second; its lease is only the bound
# for a process that died.
_RETRY_AFTER_S = 1


def body_limit(settings: Settings) -> int:
    return settings.max_photos * settings.max_photo_bytes + FORM_OVERHEAD


def kept(status: int) -> bool:
    return status < 500 and status not in _NOT_KEPT


# --- the request's canonical form -------------------------------------------------


def canonical_body(content_type: str | None, body: bytes) -> bytes:
    """The body as far as its meaning goes: JSON with sorted keys, multipart by its
    parts (never the random boundary), anything else as sent; prefixed by the media
    type, so the same bytes as JSON and as text differ."""
    if not body:
        return b""
    media, options = parse_options_header(content_type or "")
    canonical = body
    if media == b"application/json" or media.endswith(b"+json"):
        canonical = _canonical_json(body)
    elif media == b"multipart/form-data" and b"boundary" in options:
        canonical = _canonical_multipart(body, options[b"boundary"]) or body
    return media + b"\n" + canonical


def _canonical_json(body: bytes) -> bytes:
    try:
        value = json.loads(body)
    except ValueError:
        return body  # the route answers 422, and that is not kept
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class _PartHasher:
    """python-multipart callbacks: each part's name, filename, content type and a
    hash of its content, in order."""

    def __init__(self) -> None:
        self.parts: list[list[str | None]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._content = hashlib.sha256()

    def on_part_begin(self) -> None:
        self._headers, self._content = {}, hashlib.sha256()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._content.update(data[start:end])

    def on_part_end(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        ctype = self._headers.get(b"content-type")
        self.parts.append(
            [
                _text(disposition.get(b"name")),
                _text(disposition.get(b"filename")),
                _text(ctype),
                self._content.hexdigest(),
            ]
        )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _canonical_multipart(body: bytes, boundary: bytes) -> bytes | None:
    hasher = _PartHasher()
    callbacks: Any = {
        name: getattr(hasher, name)
        for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_part_data", "on_part_end",
        )
    }  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception:  # malformed: compared as sent; the route refuses it anyway
        return None
    return json.dumps(hasher.parts).encode()


def request_target(scope: Scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    return scope["path"] + (f"?{query}" if query else "")


# --- the middleware -----------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The buffered body, then the client's own channel (for its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _Captured:
    """The route's response, held back until it is stored."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def header_map(self) -> dict[str, str]:
        joined: dict[str, str] = {}
        for name, value in self.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            joined[key] = f"{joined[key]}, {text}" if key in joined else text
        return joined


async def _send_replay(send: Send, stored: idempotency.Replay) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers.items()]
    headers.append((REPLAYED_HEADER.lower().encode(), b"true"))
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body})


async def _bearer_account(
    sessions: async_sessionmaker[AsyncSession], headers: Headers
) -> uuid.UUID | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    async with sessions() as session:
        try:
            return await authenticate(session, token.strip())
        except Unauthorized:
            return None


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        key = headers.get("idempotency-key")
        if key is None or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        settings: Settings = state.settings
        sessions: async_sessionmaker[AsyncSession] = state.sessions
        try:
            idempotency.check_key(key)
        except AtelierError as error:
            return await _answer(scope, receive, send, error)
        try:
            account = await _bearer_account(sessions, headers)
        except Exception as error:  # Postgres down: the app's own 503, not a bare 500
            return await _handled(scope, receive, send, error)
        if account is None:  # the route answers 401 itself; nothing to key
            return await self.app(scope, receive, send)
        limit = body_limit(settings)
        try:
            if int(headers.get("content-length") or 0) > limit:
                raise _BodyTooLarge
            body = await _read_body(receive, limit)
        except _BodyTooLarge:
            too_large = f"a request with an Idempotency-Key may carry at most {limit} bytes"
            return await _answer(scope, receive, send, _RequestTooLarge(too_large))
        except _Disconnected:
            return None
        keyed = _Keyed(self.app, sessions, settings, account, key)
        await keyed(scope, body, receive, send)


class _RequestTooLarge(AtelierError):
    kind = ErrorKind.too_large
    code = "request-too-large"
    title = "Request too large"


async def _answer(scope: Scope, receive: Receive, send: Send, error: AtelierError) -> None:
    status = STATUS_BY_KIND[error.kind]
    response = problem(Request(scope), status, error.code, error.title, error.detail, **error.extra)
    if isinstance(error, idempotency.IdempotencyKeyInUse):
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
    await response(scope, receive, send)


async def _handled(scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
    """Answer with the app's exception handler for ``error`` (api/outages.py's 503
    for a database that is down), as the route would have; re-raise if none."""
    handlers = scope["app"].exception_handlers
    for cls in type(error).__mro__:
        if cls in handlers and cls is not Exception:
            response = await handlers[cls](Request(scope), error)
            return await response(scope, receive, send)
    raise error


class _Keyed:
    """One keyed request: claim, then replay, refuse, or run and store."""

    def __init__(
        self,
        app: ASGIApp,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        account: uuid.UUID,
        key: str,
    ) -> None:
        self.app, self.sessions, self.settings = app, sessions, settings
        self.account, self.key = account, key

    async def __call__(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        request_print = idempotency.fingerprint(
            "POST", request_target(scope), canonical_body(headers.get("content-type"), body)
        )
        try:
            outcome = await self._claim(scope["path"], request_print)
        except Exception as error:
            return await _handled(scope, receive, send, error)
        match outcome:
            case idempotency.Replay():
                await _send_replay(send, outcome)
            case idempotency.Reused():
                detail = "this Idempotency-Key was first used with a different request"
                await _answer(scope, receive, send, idempotency.IdempotencyKeyReused(detail))
            case idempotency.InFlight():
                detail = "a request with this Idempotency-Key is still being processed"
                await _answer(scope, receive, send, idempotency.IdempotencyKeyInUse(detail))
            case idempotency.Proceed():
                await self._run(scope, body, receive, send, outcome.lease)

    async def _claim(self, path: str, request_print: str) -> idempotency.Claim:
        async with session_scope(self.sessions) as session:
            return await idempotency.claim(
                session,
                account_id=self.account,
                key=self.key,
                method="POST",
                path=path,
                fingerprint=request_print,
                now=utcnow(),
                lease=timedelta(seconds=self.settings.idempotency_lease_s),
                ttl=timedelta(seconds=self.settings.idempotency_ttl_s),
            )

    async def _run(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, lease: datetime
    ) -> None:
        captured = _Captured()
        try:
            await self.app(scope, _replaying(body, receive), captured.send)
        except BaseException:
            await self._release(lease)
            raise
        if kept(captured.status):
            await self._record(lease, captured)
        else:
            await self._release(lease)
        for message in captured.messages:
            await send(message)

    async def _record(self, lease: datetime, captured: _Captured) -> None:
        try:
            async with session_scope(self.sessions) as session:
                stored = await idempotency.record(
                    session,
                    account_id=self.account,
                    key=self.key,
                    lease=lease,
                    status=captured.status,
                    body=bytes(captured.body),
                    headers=captured.header_map(),
                )
        except Exception:  # the answer still goes out; the lease expires, a retry re-runs
            log.exception("could not store the response for Idempotency-Key %r", self.key)
            return
        if not stored:
            log.warning("Idempotency-Key %r: the request outlived its lease", self.key)

    async def _release(self, lease: datetime) -> None:
        try:
            async with session_scope(self.sessions) as session:
                await idempotency.release(
                    session, account_id=self.account, key=self.key, lease=lease
                )
        except Exception:  # the lease expires on its own
            log.exception("could not release Idempotency-Key %r", self.key)
