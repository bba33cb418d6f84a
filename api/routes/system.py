from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.outages import PROBLEM_CODE, unavailable
from api.problems import MEDIA_TYPE
from core.settings import Settings

router = APIRouter(tags=["system"])
log = logging.getLogger("atelier.api")

HEALTH_PROBE_KEY = "healthz/probe"  # never written: exists() only proves the store answers


async def _postgres(request: Request) -> None:
    async with request.app.state.sessions() as session:
        await session.execute(text("SELECT 1"))


async def _redis(request: Request) -> None:
    await request.app.state.redis.ping()


async def _blobs(request: Request) -> None:
    await request.app.state.store.exists(HEALTH_PROBE_KEY)


CHECKS: dict[str, Callable[[Request], Awaitable[None]]] = {
    "postgres": _postgres,
    "redis": _redis,
    "blobs": _blobs,
}


async def _check(name: str, request: Request, settings: Settings) -> str:
    try:
        async with asyncio.timeout(settings.health_check_timeout_s):
            await CHECKS[name](request)
    except Exception as exc:  # any failure, timeout included, means "down" here
        log.warning("healthz: %s down: %s: %s", name, type(exc).__name__, exc)
        return "down"
    return "ok"


@router.get(
    "/healthz",
    responses={
        503: {
            "description": f"a dependency is down (`/problems/{PROBLEM_CODE}`)",
            "content": {MEDIA_TYPE: {}},
        }
    },
)
async def health(request: Request) -> JSONResponse:
    """Liveness and readiness: the API answers and reaches Postgres, Redis and the
    blob store, each checked concurrently within ``health_check_timeout_s``."""
    settings: Settings = request.app.state.settings
    names = list(CHECKS)
    results = await asyncio.gather(*(_check(name, request, settings) for name in names))
    checks = dict(zip(names, results, strict=True))
    down = [name for name, result in checks.items() if result != "ok"]
    if down:
        detail = f"unreachable: {', '.join(down)}"
        return unavailable(request, settings, detail, dependency=down[0], checks=checks)
    return JSONResponse({"status": "ok", "checks": checks})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
