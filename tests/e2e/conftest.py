"""Real worker and scheduler processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.settings import Settings
from tests.conftest import ROOT


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        key = name.upper() if name in ("database_url", "redis_url") else f"ATELIER_{name.upper()}"
        # Lists and dicts (crawl_sites...) are read back as JSON.
        env[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    # Two cores: one for the worker's torch threads, one for everything else.
    env.setdefault("ATELIER_TORCH_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env={**settings_env(self.settings), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running.append(proc)
        return proc

    def worker(
        self,
        name: str = "worker",
        metrics_port: int = 0,
        *,
        gpu: str = "rtx4090",
        vram: str = "24GiB",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        args = ["gpu", "--device", "cpu", "--name", gpu, "--vram", vram,
                "--metrics-port", str(metrics_port), *extra]  # fmt: skip
        return self.start("worker", *args, name=name, env=env)

    def scheduler(self) -> subprocess.Popen[bytes]:
        return self.start("scheduler", name="scheduler")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def processes(settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(settings, tmp_path)
    yield procs
    procs.stop_all()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def stack(processes: Processes, sessions: object, redis: object) -> AsyncIterator[int]:
    """Scheduler plus one worker, on a clean database and Redis; yields its metrics port."""
    port = free_port()
    processes.scheduler()
    processes.worker(metrics_port=port)
    yield port
