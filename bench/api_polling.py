"""Polling a job from HTTP clients: requests/s and latency of ``GET /v1/jobs/{id}``
(200), the same with a current ``If-None-Match`` (304), and ``/healthz``, from wrk,
side by side in one run on one API process; a bare Starlette app (bench.reference_app)
as the floor a Python ASGI server gives on this machine.

A database of its own (``atelier_bench_polling``) holds an account, its key and one
running generation job, written directly. The API is the Procfile's web line alone
(one uvicorn process, ``--loop uvloop --http httptools``, no workers, the default
settings but this benchmark's database, Redis db and blob directory) beside
``python -m api serve`` (the same, the garbage collector tuned: api/__main__.py),
each one process; the reference app runs as the first in another process. wrk runs
``-t1 -c<connections> -d<seconds> --latency`` against each target in turn, ``--rounds``
times interleaved; the figures are the median round's. wrk and the server share the machine's cores.

    .venv/bin/python -m bench.api_polling [--rounds 3] [--seconds 10] [--connections 20]

Prints requests/s, p50, p99, the API process's CPU per request and the ratio to
/healthz per target, and writes bench/results/api_polling.json. Uses Redis database
``--redis-db`` (10), ports 8015 (uvicorn), 8017 (api serve) and 8016 (reference).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.polling_stack import (
    Fixture,
    Server,
    add_stack_arguments,
    api_serve_command,
    prepare,
    uvicorn_command,
)
from bench.results_file import write_result

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in", re.M)
_BAD = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_ERRORS = re.compile(r"Socket errors:.*")


@dataclass
class Target:
    name: str
    server: Server
    path: str
    status: int  # what one request answers, checked before wrk runs
    headers: dict[str, str] = field(default_factory=dict)


def parse_wrk(out: str) -> dict[str, Any]:
    """requests/s, latency percentiles (ms), requests and bad answers from wrk's text."""
    rate, total = _RATE.search(out), _TOTAL.search(out)
    if rate is None or total is None:
        raise RuntimeError(f"wrk's output not understood:\n{out}")
    percentiles = {f"p{p}_ms": float(v) * _UNITS_MS[u] for p, v, u in _PERCENTILE.findall(out)}
    bad, errors = _BAD.search(out), _ERRORS.search(out)
    return {
        "rps": float(rate.group(1)),
        **percentiles,
        "requests": int(total.group(1)),
        "non_2xx_3xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else None,
    }


def run_wrk(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{target.server.port}{target.path}"
    headers = [h for name, value in target.headers.items() for h in ("-H", f"{name}: {value}")]
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency"]
    cpu_before = target.server.cpu_s()
    out = subprocess.run([*command, *headers, url], capture_output=True, text=True, check=True)
    figures = parse_wrk(out.stdout)
    cpu = target.server.cpu_s() - cpu_before
    figures["server_cpu_us_per_request"] = cpu / max(figures["requests"], 1) * 1e6
    return figures


def check(target: Target) -> None:
    url = f"http://127.0.0.1:{target.server.port}{target.path}"
    answer = httpx.get(url, headers=target.headers)
    if answer.status_code != target.status:
        raise SystemExit(f"{target.name}: {answer.status_code}, not {target.status}")


def targets(apis: list[Server], reference: Server, fixture: Fixture) -> list[Target]:
    auth = {"Authorization": f"Bearer {fixture.key}"}
    job_path = f"/v1/jobs/{fixture.job_id}"
    found: list[Target] = []
    for api in apis:
        url = f"http://127.0.0.1:{api.port}{job_path}"
        current = {**auth, "If-None-Match": httpx.get(url, headers=auth).headers["etag"]}
        found += [
            Target(f"{api.name}: /healthz", api, "/healthz", 200),
            # Every middleware, no route, no database: the app's own floor.
            Target(f"{api.name}: unrouted 404", api, "/v1/nowhere", 404),
            Target(f"{api.name}: GET job 200", api, job_path, 200, auth),
            Target(f"{api.name}: GET job 304", api, job_path, 304, current),
        ]
    ref_etag = httpx.get(f"http://127.0.0.1:{reference.port}/job").headers["etag"]
    return [
        *found,
        Target("bare Starlette 200", reference, "/job", 200),
        Target("bare Starlette 304", reference, "/job", 304, {"If-None-Match": ref_etag}),
    ]


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median requests/s (its latencies with it, not mixed)."""
    ordered = sorted(rounds, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "rps_rounds": [round(r["rps"], 1) for r in rounds]}


def measure(all_targets: list[Target], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    for target in all_targets:
        check(target)
        run_wrk(target, argparse.Namespace(**{**vars(args), "seconds": 2}))  # warm-up
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in all_targets}
    for number in range(args.rounds):
        for target in all_targets:
            figures = run_wrk(target, args)
            rounds[target.name].append(figures)
            print(f"round {number + 1} {target.name:<30} {figures['rps']:8.0f} req/s")
            time.sleep(1)  # let the server's trailing work finish before the next target
    return {name: median_round(results) for name, results in rounds.items()}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    health = next(iter(results.values()))["rps"]  # the first server's /healthz
    print(f"\n{'target':<30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
          f"{'vs healthz':>10}  rounds (req/s)")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<30} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['server_cpu_us_per_request']:11.0f} {r['rps'] / health:10.2f}  {r['rps_rounds']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_stack_arguments(parser, port=8015, redis_db=10)
    parser.add_argument("--reference-port", type=int, default=8016)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=20)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench-tools` installs it (apt)")
    args = parser.parse_args()
    _settings, fixture = prepare(args)
    apis = [
        Server("uvicorn", uvicorn_command("api.app:app", args.port), args.port),
        Server("api serve", api_serve_command(args.port + 2), args.port + 2),
    ]
    reference_command = uvicorn_command("bench.reference_app:app", args.reference_port)
    reference = Server("reference", reference_command, args.reference_port)
    try:
        for server in (*apis, reference):
            server.start()
        results = measure(targets(apis, reference, fixture), args)
    finally:
        for server in (*apis, reference):
            server.stop()
    print_table(results)
    write_result(
        "api_polling",
        {
            "wrk": f"wrk -t1 -c{args.connections} -d{args.seconds}s --latency",
            "rounds": args.rounds,
            "api_commands": {api.name: "python -m " + " ".join(api.command) for api in apis},
            "api_processes": 1,
            "load_average": open("/proc/loadavg").read().split()[:3],
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
