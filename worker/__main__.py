"""`python -m worker gpu --device cuda:0 --name rtx4090 --vram 24GiB`

On a dev box without a GPU: `python -m worker gpu --device cpu --name rtx4090
--vram 24GiB` runs the same code on the CPU with the `tiny` profile, declaring
the GPU it stands in for.
"""

from __future__ import annotations

import argparse
import logging

from prometheus_client import start_http_server

from core.ml_runtime import offline_quiet_env
from core.settings import get_settings
from core.workers import parse_bytes
from worker.app import Device, build_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    sub = parser.add_subparsers(dest="kind", required=True)
    gpu = sub.add_parser("gpu", help="run training and generation jobs on one device")
    gpu.add_argument("--device", default=None, help="torch device (default: ATELIER_DEVICE)")
    gpu.add_argument("--name", default="rtx4090", help="GPU model this worker is, or stands in for")
    gpu.add_argument("--vram", default="24GiB", help="memory the device offers, e.g. 24GiB")
    gpu.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    gpu.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default: settings)"
    )
    args = parser.parse_args(argv)

    offline_quiet_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        start_http_server(port)
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    device = Device(name=args.name, device=settings.device, vram_bytes=parse_bytes(args.vram))
    build_worker(settings, device, burst=args.burst).run()


if __name__ == "__main__":
    main()
