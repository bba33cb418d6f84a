from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def health(session: SessionDep) -> dict[str, str]:
    """Liveness and readiness: the API answers and reaches Postgres."""
    await session.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
