"""The floor bench.api_polling compares with: a bare Starlette app, no middleware, no
database, answering a fixed job-sized JSON body with its ETag, or 304 for it. What it
costs is uvicorn's and Starlette's per-request overhead on this machine, nothing else.
"""

from __future__ import annotations

import hashlib
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# About the size of the benchmark job's representation.
BODY = json.dumps(
    {"id": "0" * 36, "kind": "generate", "status": "running", "stage": "denoising",
     "progress": 0.5, "progress_detail": {"step": 15, "total": 30, "eta_s": 12.5},
     "outputs": [], "error": None, "created_at": "2025-01-01T00:00:00Z"}
).encode()  # fmt: skip
ETAG = '"' + hashlib.sha256(BODY).hexdigest()[:32] + '"'


async def healthz(_request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def job(request: Request) -> Response:
    headers = {"ETag": ETAG, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == ETAG:
        return Response(status_code=304, headers=headers)
    return Response(BODY, media_type="application/json", headers=headers)


app = Starlette(routes=[Route("/healthz", healthz), Route("/job", job)])
