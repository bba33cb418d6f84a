"""`python -m worker gpu --device cuda:0 --name rtx4090 --vram 24GiB`

On a dev box without a GPU: `python -m worker gpu --device cpu --name rtx4090
--vram 24GiB` runs the same code on the CPU with the `tiny` profile, declaring
the GPU it stands in for.

The model code runs on this process's main thread and arq's event loop in a
background thread (worker/compute.py says why); signals are caught here and
handed to arq, which cancels the running job so it is handed back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from arq.worker import Worker
from prometheus_client import start_http_server

from core.ml_runtime import offline_quiet_env, warm_up
from core.settings import Settings, get_settings
from core.workers import parse_bytes
from worker.app import Device, build_worker
from worker.compute import MainThreadRunner


def _parse(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def run_gpu_worker(settings: Settings, device: Device, burst: bool) -> None:
    runner = MainThreadRunner()
    made: list[Worker] = []
    crashed: list[BaseException] = []
    ready = threading.Event()

    def event_loop() -> None:
        try:
            made.append(
                build_worker(
                    settings, device, compute=runner.run, burst=burst, handle_signals=False
                )
            )
            ready.set()
            made[0].run()
        except BaseException as exc:
            crashed.append(exc)
            logging.getLogger("atelier.worker").exception("worker stopped on an error")
        finally:
            ready.set()
            runner.stop()

    loop_thread = threading.Thread(target=event_loop, name="arq-event-loop")
    loop_thread.start()
    ready.wait()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if made:
            made[0].loop.call_soon_threadsafe(made[0].handle_sig, signal.Signals(signum))

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    runner.serve()
    loop_thread.join()
    if crashed:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
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
    warm_up(settings)
    run_gpu_worker(settings, device, args.burst)


if __name__ == "__main__":
    main()
