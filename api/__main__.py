"""Operator commands: `python -m api keys create [--account NAME] [--admin [NAME]]`,
and `python -m api serve`: the API under uvicorn, tuned for many waiting clients."""

from __future__ import annotations

import argparse
import asyncio
import gc

from core.accounts import create_account_with_key
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.settings import get_settings

# Thousands of parked long-polls keep millions of objects alive; with CPython's
# default thresholds (700, 10, 10) each full collection walks them all, and
# waking 10,000 waiters spent most of its time in the collector
# (docs/benchmarks.md). Collections every 50,000 allocations, full ones rarely:
# nearly every object dies by reference count, cycles wait a little longer.
GC_THRESHOLDS = (50_000, 20, 100)
# Connections the kernel queues before uvicorn accepts them (its default is
# 2048): a burst of reconnecting waiters would otherwise be refused.
BACKLOG = 16_384


async def _create_key(account_name: str, *, is_admin: bool) -> None:
    engine = make_engine(get_settings())
    try:
        async with session_scope(make_sessionmaker(engine)) as session:
            new = await create_account_with_key(session, account_name, is_admin=is_admin)
    finally:
        await engine.dispose()
    print(f"account {new.account_id}{' (admin)' if is_admin else ''}")
    print(f"key     {new.key}")
    print("Store the key now: only its hash is kept.")


def serve(host: str, port: int) -> None:
    """One uvicorn process on uvloop and httptools, the collector tuned."""
    import uvicorn

    import api.app

    gc.set_threshold(*GC_THRESHOLDS)
    # What importing made (modules, routes, schemas) lives as long as the process:
    # out of every collection's walk.
    gc.freeze()
    uvicorn.run(api.app.app, host=host, port=port, loop="uvloop", http="httptools", backlog=BACKLOG)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api")
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create an account and its first API key")
    create.add_argument("--account", default="default", help="account name")
    create.add_argument(
        "--admin",
        nargs="?",
        const="",
        metavar="NAME",
        help="an operator account (may start crawls); NAME, if given, replaces --account",
    )
    server = groups.add_parser("serve", help="serve the API (one uvicorn process)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.group == "serve":
        serve(args.host, args.port)
    if args.group == "keys" and args.action == "create":
        is_admin = args.admin is not None
        asyncio.run(_create_key(args.admin or args.account, is_admin=is_admin))


if __name__ == "__main__":
    main()
