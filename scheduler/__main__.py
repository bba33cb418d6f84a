"""`python -m scheduler`: dispatch, reap and reconcile jobs until stopped."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import start_http_server

from core import logs
from core.db.engine import make_engine, make_sessionmaker
from core.settings import get_settings
from scheduler.dispatcher import Dispatcher
from transport.queues import connect


async def _main() -> None:
    settings = get_settings()
    engine = make_engine(settings)
    redis = await connect(settings.redis_url)
    try:
        await Dispatcher(settings, make_sessionmaker(engine), redis).run_forever()
    finally:
        await redis.aclose()
        await engine.dispose()


def main() -> None:
    settings = get_settings()
    logs.configure(settings, "scheduler")
    if settings.scheduler_metrics_port:
        start_http_server(settings.scheduler_metrics_port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
