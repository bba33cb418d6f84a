"""`python -m worker gpu --device cuda:0 --name rtx4090 --vram 24GiB`,
`python -m worker cpu` (crawl jobs and the periodic crawl, worker/cpu.py),
`python -m worker crawl <site>` (one crawl in the foreground, worker/crawl_console.py).

On a dev box without a GPU: `python -m worker gpu --device cpu --name rtx4090
--vram 24GiB` runs the same code on the CPU with the `tiny` profile, declaring
the GPU it stands in for.

The model code runs on this process's main thread and arq's event loop in a
background thread (worker/compute.py says why); signals are caught here and
handed to arq, which cancels the running job so it is handed back.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import threading
from types import FrameType

from arq.worker import Worker
from prometheus_client import start_http_server

from core import logs
from core.fleet.device import DeclaredDevice
from core.fleet.device import Device as DeviceMemory
from core.fleet.workers import parse_bytes
from core.ml.holdings import gpu_inventory
from core.ml.resident import offline_quiet_env, warm_up
from core.settings import Settings, get_settings
from worker.app import Device, build_worker
from worker.compute import MainThreadRunner
from worker.cpu import build_cpu_worker
from worker.crawl_console import crawl_in_foreground


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker")
    sub = parser.add_subparsers(dest="kind", required=True)
    gpu = sub.add_parser("gpu", help="run training and generation jobs on one device")
    gpu.add_argument("--device", default=None, help="torch device (default: ATELIER_DEVICE)")
    gpu.add_argument("--name", default="rtx4090", help="GPU model this worker is, or stands in for")
    gpu.add_argument("--vram", default="24GiB", help="memory the device offers, e.g. 24GiB")
    gpu.add_argument(
        "--oom-above",
        default=None,
        help="dev and tests, CPU hosts only: fail jobs whose expected peak VRAM exceeds "
        "this as a GPU out of memory would (a device with less usable memory than declared)",
    )
    gpu.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    gpu.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default: settings)"
    )
    cpu = sub.add_parser("cpu", help="run crawl jobs and the periodic crawl (no models)")
    cpu.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    cpu.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default: settings)"
    )
    crawl = sub.add_parser("crawl", help="crawl one site now, in the foreground")
    crawl.add_argument("site", help="a site entry's name (core/catalog/sites/<name>.toml)")
    return parser.parse_args(argv)


def device_memory(settings: Settings, device: Device, oom_above: str | None) -> DeviceMemory:
    """The device the job machinery measures: the real one on CUDA, the declared
    one on a CPU host standing in for a GPU."""
    if settings.device.startswith("cuda"):
        if oom_above is not None:
            raise SystemExit(
                "--oom-above simulates a GPU on a CPU host; a real one runs out itself"
            )
        from core.ml.device_memory import CudaDevice

        return CudaDevice(settings.device, device.vram_bytes)
    usable = parse_bytes(oom_above) if oom_above is not None else None
    return DeclaredDevice(device.vram_bytes, usable)


def run_gpu_worker(
    settings: Settings, device: Device, burst: bool, memory: DeviceMemory | None = None
) -> None:
    runner = MainThreadRunner()
    made: list[Worker] = []
    crashed: list[BaseException] = []
    ready = threading.Event()

    def event_loop() -> None:
        try:
            made.append(
                build_worker(
                    settings,
                    device,
                    compute=runner.run,
                    burst=burst,
                    handle_signals=False,
                    memory=memory,
                    inventory=functools.partial(gpu_inventory, settings, memory)
                    if memory
                    else None,
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


def _serve_metrics(port: int | None, default: int) -> None:
    port = default if port is None else port
    if port:
        start_http_server(port)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    settings = get_settings()
    if args.kind == "crawl":
        # The console shows the progress line and the summary counts errors by kind;
        # a warning per corrupt image would break the line. Errors still show.
        logs.configure(settings, "crawl", level=logging.ERROR)
        raise SystemExit(asyncio.run(crawl_in_foreground(settings, args.site)))
    logs.configure(settings, f"worker-{args.kind}")
    if args.kind == "cpu":
        _serve_metrics(args.metrics_port, settings.cpu_worker_metrics_port)
        build_cpu_worker(settings, burst=args.burst).run()
        return
    offline_quiet_env()
    _serve_metrics(args.metrics_port, settings.worker_metrics_port)
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    device = Device(name=args.name, device=settings.device, vram_bytes=parse_bytes(args.vram))
    settings = settings.model_copy(update={"device_vram_bytes": device.vram_bytes})
    memory = device_memory(settings, device, args.oom_above)
    warm_up(settings)
    run_gpu_worker(settings, device, args.burst, memory)


if __name__ == "__main__":
    main()
