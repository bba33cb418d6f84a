"""The FastAPI application: wiring only. Routes are in api/routes, logic in core/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from api import openapi, outages, problems, request_ids
from api.conditional import SharedReads
from api.idempotency import IdempotencyMiddleware
from api.routes import (
    admin,
    generations,
    jobs,
    looks,
    outputs,
    products,
    search,
    subjects,
    system,
)
from core import logs
from core.blobs.signing import LazySigner
from core.blobs.store import blob_store_from_settings
from core.db.changes import ChangeFeed
from core.db.engine import make_engine, make_sessionmaker
from core.settings import Settings, get_settings
from core.shop.searcher import CatalogSearcher

# Response headers a browser's script may read besides the CORS-safelisted ones
# (Content-Type, Content-Length, Last-Modified, Cache-Control...).
EXPOSED_HEADERS = [
    "ETag", "Location", "Retry-After", "X-Request-ID", "Idempotent-Replayed",
    "Content-Range", "Accept-Ranges", "Content-Disposition", "WWW-Authenticate", "Link",
]  # fmt: skip


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(settings, "api")
        engine = make_engine(settings)
        app.state.settings = settings
        # Timeouts bound how long a request waits on a Redis that does not answer.
        app.state.redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
        )
        app.state.sessions = make_sessionmaker(engine)
        # One LISTEN connection wakes every long-poll and event stream of the process.
        app.state.changes = ChangeFeed(settings.database_url)
        await app.state.changes.start()
        app.state.shared_reads = SharedReads()
        app.state.store = blob_store_from_settings(settings)
        app.state.signer = LazySigner(settings, app.state.sessions)
        app.state.searcher = CatalogSearcher(
            settings, app.state.store, settings.models_dir / "encoder-cache"
        )
        yield
        await app.state.changes.stop()
        await app.state.redis.aclose()
        await engine.dispose()

    app = FastAPI(
        title="atelier",
        summary="Photos + a prompt in; images of that person in clothes they can buy out.",
        version="0.1.0",
        lifespan=lifespan,
    )
    problems.install(app)
    # Inside the request-id, outage and metrics layers: a replay gets this request's id.
    app.add_middleware(IdempotencyMiddleware)
    openapi.install(app, settings)
    outages.install(app)
    request_ids.install(app)
    # search before products: /v1/products/search is not a product id.
    routers = (subjects, looks, generations, jobs, search, outputs, products, admin, system)
    for module in routers:
        app.include_router(module.router)

    # Added last, so outermost: a preflight is answered before anything else runs.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        # Mirrors what a preflight asks for (Authorization included); no cookies
        # are used, so nothing is allowed with credentials.
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    return app


app = create_app()
