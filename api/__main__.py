"""Operator commands: `python -m api keys create [--account NAME] [--admin [NAME]]`."""

from __future__ import annotations

import argparse
import asyncio

from core.accounts import create_account_with_key
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.settings import get_settings


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
    args = parser.parse_args(argv)
    if args.group == "keys" and args.action == "create":
        is_admin = args.admin is not None
        asyncio.run(_create_key(args.admin or args.account, is_admin=is_admin))


if __name__ == "__main__":
    main()
