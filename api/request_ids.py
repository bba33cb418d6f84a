"""The one per-request layer: request ids, the access line and the HTTP metrics.

The id is the client's X-Request-ID if sane, else a new one; it is answered on
every response and stamped on every log line (core/logs.py) while the request
runs. One access line per request, and the request counted and timed by route
template. Pure ASGI: this runs on every poll, and Starlette's BaseHTTPMiddleware
(``@app.middleware("http")``) costs a task and a stream per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logs import request_id_var
from core.metrics import HTTP_LATENCY, HTTP_REQUESTS

HEADER = "X-Request-ID"
# RFC 9110 token characters, at most 128: a client's id is echoed in a header and
# written to logs, so nothing that could split a line or a header is taken.
_SANE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")

access_log = logging.getLogger("atelier.access")


def current() -> str | None:
    """The id of the request being served, if any."""
    return request_id_var.get()


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _SANE.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): streaming responses pass through
    untouched and the contextvar is set in the request's own task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering
        first_byte: float | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                first_byte = time.perf_counter() - started
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            took = time.perf_counter() - started
            _log_access(scope, status, took, request_id)
            # Latency to the response's start: an event stream's whole life is
            # not its latency.
            _count(scope, status, took if first_byte is None else first_byte)
            request_id_var.reset(token)


def _count(scope: Scope, status: int, seconds: float) -> None:
    # Label by route template, not raw path, so ids don't explode cardinality.
    route = getattr(scope.get("route"), "path", "unmatched")
    HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
    HTTP_LATENCY.labels(scope["method"], route).observe(seconds)


def _log_access(scope: Scope, status: int, seconds: float, request_id: str) -> None:
    # The route template (set on the scope by the router) keeps ids out of the
    # message; a request no route matched is logged by its path.
    route = getattr(scope.get("route"), "path", None)
    ms = round(seconds * 1000, 1)
    access_log.info(
        "%s %s %d %.1fms",
        scope["method"],
        route or scope["path"],
        status,
        ms,
        extra={
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "duration_ms": ms,
        },
    )


def install(app: FastAPI) -> None:
    """Wrap the whole middleware stack, Starlette's ServerErrorMiddleware included:
    ``add_middleware`` would put us inside it, and its 500 responses would then go
    out without the id."""
    build: Callable[[], ASGIApp] = app.build_middleware_stack

    def build_with_request_ids() -> ASGIApp:
        return RequestIdMiddleware(build())

    app.build_middleware_stack = build_with_request_ids  # type: ignore[method-assign]
