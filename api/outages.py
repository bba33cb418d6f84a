"""503 problem+json when Postgres or Redis cannot be reached.

A dependency that is down is not a bug: the client is told which one and when to
retry (Retry-After), instead of a 500. Only connection failures qualify; any
other database error (a syntax error, an integrity violation) is re-raised to
the catch-all 500 handler of api/problems.py, as before this module.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import asyncpg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from api.problems import problem
from core.settings import Settings

log = logging.getLogger("atelier.api")

PROBLEM_CODE = "dependency-unavailable"
# SQLSTATEs of a server that is not there for us: connection exceptions (class
# 08), shutting down or starting up (57P01-57P03), out of connection slots.
_DOWN_SQLSTATE_CLASSES = ("08",)
_DOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "53400"})
# asyncpg raises plain OSErrors (refused, reset, connect timeout) that SQLAlchemy
# passes through unwrapped; they are Postgres's only if raised in these packages.
_POSTGRES_PACKAGES = ("asyncpg", "sqlalchemy")
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

Handler = Callable[[Request, Exception], Response | Awaitable[Response]]


def unavailable(request: Request, settings: Settings, detail: str, **extra: Any) -> JSONResponse:
    response = problem(request, 503, PROBLEM_CODE, "Dependency unavailable", detail, **extra)
    response.headers["Retry-After"] = str(settings.unavailable_retry_after_s)
    return response


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.split(".", 1)[0] in packages:
            return True
        tb = tb.tb_next
    return False


def _sqlstate_says_down(error: BaseException | None) -> bool:
    sqlstate = getattr(error, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    return sqlstate in _DOWN_SQLSTATES or sqlstate.startswith(_DOWN_SQLSTATE_CLASSES)


def postgres_unreachable(exc: BaseException) -> bool:
    """True if ``exc`` means Postgres cannot be reached now, not that a query is wrong."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return True  # no pooled connection freed up in time: overloaded, retry later
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        cause = exc.orig.__cause__ if exc.orig is not None else None
        return _sqlstate_says_down(exc.orig) or _sqlstate_says_down(cause)
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return _sqlstate_says_down(exc)
    if isinstance(exc, OSError):
        return _raised_in(exc, _POSTGRES_PACKAGES)
    return False


async def _postgres_down(request: Request, exc: Exception) -> JSONResponse:
    if not postgres_unreachable(exc):
        raise exc  # a real bug: the catch-all 500 handler answers it
    return _answer(request, "postgres", exc)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    return _answer(request, "redis", exc)


def _answer(request: Request, dependency: str, exc: Exception) -> JSONResponse:
    log.warning(
        "%s unreachable on %s %s: %s: %s",
        dependency,
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    detail = f"{dependency} cannot be reached; retry later"
    return unavailable(request, request.app.state.settings, detail, dependency=dependency)


def _last_resort(fallback: Handler | None) -> Handler:
    """The catch-all handler, answering outages first. Starlette calls it for what
    a middleware raised too (the handlers above only see what routes raise)."""

    async def handle(request: Request, exc: Exception) -> Response:
        if postgres_unreachable(exc):
            return _answer(request, "postgres", exc)
        if isinstance(exc, _REDIS_ERRORS):
            return _answer(request, "redis", exc)
        if fallback is None:
            raise exc
        response = fallback(request, exc)
        return await response if inspect.isawaitable(response) else response

    return handle


def install(app: FastAPI) -> None:
    """Call after problems.install: it wraps that module's catch-all handler."""
    for postgres_error in (
        sqlalchemy.exc.DBAPIError,
        sqlalchemy.exc.TimeoutError,
        asyncpg.PostgresError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        OSError,
    ):
        app.add_exception_handler(postgres_error, _postgres_down)
    for redis_error in _REDIS_ERRORS:
        app.add_exception_handler(redis_error, _redis_down)
    app.add_exception_handler(Exception, _last_resort(app.exception_handlers.get(Exception)))
