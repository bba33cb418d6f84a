"""RFC 9457 problem+json for every error the API returns; never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from core.errors import AtelierError, ErrorKind

log = logging.getLogger("atelier.api")

MEDIA_TYPE = "application/problem+json"

STATUS_BY_KIND = {
    ErrorKind.invalid: 422,
    ErrorKind.too_large: 413,
    ErrorKind.unsupported: 415,
    ErrorKind.not_found: 404,
    ErrorKind.conflict: 409,
    ErrorKind.unauthorized: 401,
    ErrorKind.forbidden: 403,
    ErrorKind.unavailable: 503,
}


def problem(
    request: Request, status: int, code: str, title: str, detail: str, **extra: Any
) -> JSONResponse:
    # Extension members never override the standard ones.
    body = {
        **extra,
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def _atelier_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AtelierError)
    status = STATUS_BY_KIND[exc.kind]
    return problem(request, status, exc.code, exc.title, exc.detail, **exc.extra)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    return problem(request, 422, "invalid-request", "Invalid request", detail, errors=errors)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
    title = titles.get(exc.status_code, "HTTP error")
    code = title.lower().replace(" ", "-")
    response = problem(request, exc.status_code, code, title, str(exc.detail))
    # Starlette's 405 names the methods the path takes (Allow, RFC 9110 15.5.6).
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(request, 500, "internal", "Internal error", "an unexpected error occurred")


def install(app: FastAPI) -> None:
    app.add_exception_handler(AtelierError, _atelier_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, _unexpected)
