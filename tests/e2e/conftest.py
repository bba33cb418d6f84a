"""Real worker and scheduler processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from tests.conftest import ROOT


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        key = name.upper() if name in ("database_url", "redis_url") else f"ATELIER_{name.upper()}"
        env[key] = str(value)
    # Two cores: one for the worker's torch threads, one for everything else.
    env.setdefault("ATELIER_TORCH_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running.append(proc)
        return proc

    def worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        return self.start("worker", "gpu", "--device", "cpu", "--name", "rtx4090", name=name)

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
def processes(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Processes]:
    procs = Processes(settings, tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
async def stack(
    processes: Processes, sessions: object, redis: object
) -> AsyncIterator[Callable[[], None]]:
    """Scheduler plus one worker, on a clean database and Redis."""
    processes.scheduler()
    processes.worker()
    yield processes.stop_all
