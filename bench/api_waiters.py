"""Thousands of long-polls parked on one job, then one change: the API process's memory
with them parked and after, and how long each waiter takes to hear of the change.

The setup is bench.api_polling's (bench.polling_stack): its database, a fresh account,
key and running job, one API process: uvicorn's CLI (``--loop uvloop --http httptools
--backlog 16384``, no workers), then ``python -m api serve`` (the same, the garbage
collector tuned: api/__main__.py). For each server and each ``--waiters`` count, a
load generator in a process of its own (this module's ``generate``, on uvloop) opens
that many connections to 127.0.0.1 and sends each ``GET /v1/jobs/{id}?wait=60`` with
the job's current ETag in If-None-Match. Once every request is sent and the API process
has gone idle (all parked), its RSS is read, the benchmark commits one UPDATE of the
job, and the generator stamps each response's arrival (CLOCK_MONOTONIC, shared by
processes): latency is arrival minus the commit's return. Then the connections close
and RSS is read again.

    .venv/bin/python -m bench.api_waiters [--waiters 1000,10000]

Prints, per count: RSS before / parked / after, per waiter, time to park them all, and
commit-to-response p50 / p99 / max, and writes bench/results/api_waiters.json. Uses Redis
database ``--redis-db`` (10) and port 8018. The generator and the API share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import uvloop

from bench.polling_stack import (
    Fixture,
    Server,
    add_stack_arguments,
    api_serve_command,
    prepare,
    touch_job,
    uvicorn_command,
)
from bench.results_file import write_result
from core.settings import Settings

WAIT_S = 60
CONNECTING = 256  # connections the generator opens at once
IDLE_CPU_S = 0.03  # the API used less than this in a second: everything parked
IDLE_WITHIN_S = 55.0  # parking must end well before the first wait expires
MiB = 1024 * 1024


def raise_fd_limit() -> int:
    """Soft fd limit up to the hard one (children inherit it); returns it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- the load generator (its own process) -------------------------------------------------


class _Sent:
    """Counts requests written (or failed to be); set once all ``count`` are."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.all = asyncio.Event()

    def one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.all.set()


async def _wait_for_change(
    port: int, request: bytes, gate: asyncio.Semaphore, sent: _Sent,
    arrivals: list[tuple[float, int]],
) -> None:  # fmt: skip
    try:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
    finally:
        sent.one()
    try:
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        arrivals.append((time.monotonic(), status))
    finally:
        writer.close()


async def _generate(port: int, path: str, key: str, etag: str, count: int) -> None:
    request = (
        f"GET {path}?wait={WAIT_S} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nIf-None-Match: {etag}\r\n\r\n"
    ).encode()
    gate, sent = asyncio.Semaphore(CONNECTING), _Sent(count)
    arrivals: list[tuple[float, int]] = []
    tasks = [
        asyncio.create_task(_wait_for_change(port, request, gate, sent, arrivals))
        for _ in range(count)
    ]
    await sent.all.wait()
    print(json.dumps({"sent": time.monotonic()}), flush=True)
    done, _pending = await asyncio.wait(tasks, timeout=WAIT_S + 30)
    failed = [repr(t.exception()) for t in done if t.exception() is not None]
    print(
        json.dumps({"arrivals": arrivals, "failed": failed[:5], "failures": len(failed)}),
        flush=True,
    )


def generate(args: argparse.Namespace) -> None:
    raise_fd_limit()
    uvloop.run(_generate(args.port, args.path, args.key, args.etag, args.count))


# --- the measuring side -------------------------------------------------------------------


def wait_idle(api: Server, since: float) -> float:
    """Seconds from ``since`` until the API spends a second nearly idle."""
    deadline = time.monotonic() + IDLE_WITHIN_S
    while time.monotonic() < deadline:
        before = api.cpu_s()
        time.sleep(1.0)
        if api.cpu_s() - before < IDLE_CPU_S:
            return time.monotonic() - 1.0 - since
    raise SystemExit("the API did not go idle: parking took too long for ?wait=60")


def one_count(api: Server, settings: Settings, fixture: Fixture, count: int) -> dict[str, Any]:
    path = f"/v1/jobs/{fixture.job_id}"
    auth = {"Authorization": f"Bearer {fixture.key}"}
    etag = httpx.get(f"http://127.0.0.1:{api.port}{path}", headers=auth).headers["etag"]
    wait_idle(api, time.monotonic())
    rss_before = api.rss_bytes()
    command = [
        sys.executable, "-m", "bench.api_waiters", "generate", "--port", str(api.port),
        "--path", path, "--key", fixture.key, "--etag", etag, "--count", str(count),
    ]  # fmt: skip
    started = time.monotonic()
    cpu_before = api.cpu_s()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as generator:
        assert generator.stdout is not None
        sent = json.loads(generator.stdout.readline())["sent"]
        parked_s = wait_idle(api, started)
        cpu_parking = api.cpu_s() - cpu_before
        rss_parked = api.rss_bytes()
        cpu_before = api.cpu_s()
        committed = asyncio.run(touch_job(settings, fixture.job_id))
        report = json.loads(generator.stdout.readline())
    cpu_waking = api.cpu_s() - cpu_before
    wait_idle(api, time.monotonic())
    time.sleep(2)
    rss_after = api.rss_bytes()
    latencies = np.array([t - committed for t, status in report["arrivals"] if status == 200])
    early = sum(1 for t, _status in report["arrivals"] if t < committed)
    return {
        "waiters": count,
        "sent_s": round(sent - started, 2),
        "parked_s": round(parked_s, 2),
        "api_cpu_us_per_parking": round(cpu_parking / count * 1e6),
        "api_cpu_s_waking_all": round(cpu_waking, 2),
        "rss_before_mib": round(rss_before / MiB, 1),
        "rss_parked_mib": round(rss_parked / MiB, 1),
        "rss_after_mib": round(rss_after / MiB, 1),
        "kib_per_waiter": round((rss_parked - rss_before) / count / 1024, 1),
        "answered_200": int(latencies.size),
        "answered_before_commit": early,
        "failures": report["failures"],
        "failed_examples": report["failed"],
        **_percentiles(latencies),
    }


def _percentiles(latencies: np.ndarray) -> dict[str, float | None]:
    if not latencies.size:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "within_1s": 0.0}
    ms = latencies * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "within_1s": round(float((ms <= 1000).mean()), 4),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'server':<10} {'waiters':>8} {'RSS before':>10} {'parked':>8} {'after':>8} "
        f"{'KiB/waiter':>10} {'park s':>7} {'200s':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'<=1s':>6}"
    )
    for r in rows:
        print(
            f"{r['server']:<10} {r['waiters']:8d} {r['rss_before_mib']:10.1f} "
            f"{r['rss_parked_mib']:8.1f} {r['rss_after_mib']:8.1f} {r['kib_per_waiter']:10.1f} "
            f"{r['parked_s']:7.1f} "
            f"{r['answered_200']:6d} {r['p50_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f} "
            f"{r['max_ms'] or 0:8.1f} {r['within_1s']:6.1%}"
        )


def measure(args: argparse.Namespace) -> None:
    fd_limit = raise_fd_limit()
    settings, fixture = prepare(args)
    apis = [
        Server(
            "uvicorn", uvicorn_command("api.app:app", args.port, "--backlog", "16384"), args.port
        ),
        Server("api serve", api_serve_command(args.port), args.port),
    ]
    rows = []
    for api in apis:  # one after the other, on the same port
        try:
            api.start()
            for count in args.waiters:
                rows.append({"server": api.name, **one_count(api, settings, fixture, count)})
                print(json.dumps(rows[-1]))
        finally:
            api.stop()
    print_table(rows)
    write_result(
        "api_waiters",
        {
            "api_commands": {api.name: "python -m " + " ".join(api.command) for api in apis},
            "api_processes": 1,
            "fd_limit": fd_limit,
            "wait_s": WAIT_S,
            "load_average": open("/proc/loadavg").read().split()[:3],
            "results": rows,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    gen = commands.add_parser("generate", help="the load generator (started by the benchmark)")
    gen.add_argument("--port", type=int, required=True)
    gen.add_argument("--path", required=True)
    gen.add_argument("--key", required=True)
    gen.add_argument("--etag", required=True)
    gen.add_argument("--count", type=int, required=True)
    add_stack_arguments(parser, port=8018, redis_db=10)
    parser.add_argument(
        "--waiters", type=lambda s: [int(n) for n in s.split(",")], default=[1000, 10000]
    )
    args = parser.parse_args()
    if args.command == "generate":
        generate(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
