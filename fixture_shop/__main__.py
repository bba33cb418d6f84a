"""``python -m fixture_shop --port 8710 --seed 7 --products 2000 --latency-ms 50``."""

from __future__ import annotations

import argparse

from aiohttp import web

from fixture_shop.app import build_app
from fixture_shop.config import ShopConfig


def parse_config(argv: list[str] | None = None) -> tuple[ShopConfig, str, int]:
    defaults = ShopConfig()
    parser = argparse.ArgumentParser(prog="python -m fixture_shop", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8710)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--products", type=int, default=defaults.products)
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument("--no-trouble", action="store_true", help="serve a clean shop")
    parser.add_argument("--epoch", type=int, default=defaults.epoch)
    parser.add_argument("--image-side", type=int, default=defaults.image_side)
    parser.add_argument("--page-size", type=int, default=defaults.page_size)
    args = parser.parse_args(argv)
    config = ShopConfig(
        seed=args.seed,
        products=args.products,
        latency_ms=args.latency_ms,
        trouble=not args.no_trouble,
        epoch=args.epoch,
        image_side=args.image_side,
        page_size=args.page_size,
    )
    return config, args.host, args.port


def main(argv: list[str] | None = None) -> None:
    config, host, port = parse_config(argv)
    print(f"fixture shop: http://{host}:{port}/ ({config})", flush=True)
    web.run_app(build_app(config), host=host, port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
