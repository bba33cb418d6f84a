"""The setup bench.api_polling and bench.api_waiters share: a database of their own
(``atelier_bench_polling``, created and migrated as ``make db`` does), one account,
its key and one running generation job written directly into it, and API processes
under uvicorn, each started with the options and environment a side names.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.bench_stack import bench_environment, migrate
from core.accounts import create_account_with_key
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.db.models import Job, JobKind, JobStatus
from core.settings import Settings
from demo.__main__ import LOG_DIR, ROOT

BENCH_DIR = ROOT / "var" / "bench-polling"
DATABASE = "atelier_bench_polling"
# uvicorn picks uvloop and httptools when installed ("auto"); named here so the
# figures say what served them whatever uvicorn's defaults become.
UVICORN_OPTIONS = ("--loop", "uvloop", "--http", "httptools")
STARTUP_S = 60.0


@dataclass(frozen=True)
class Fixture:
    key: str
    job_id: uuid.UUID


def add_stack_arguments(parser: argparse.ArgumentParser, *, port: int, redis_db: int) -> None:
    parser.add_argument("--database", default=DATABASE)
    parser.add_argument("--redis-db", type=int, default=redis_db)
    parser.add_argument("--port", type=int, default=port, help="the measured API's port")


def prepare(args: argparse.Namespace) -> tuple[Settings, Fixture]:
    """The benchmark's environment and database; a fresh account, key and job."""
    bench_environment(args, BENCH_DIR)
    settings = Settings()
    asyncio.run(migrate(settings))
    return settings, asyncio.run(_fixture(settings))


async def _fixture(settings: Settings) -> Fixture:
    engine = make_engine(settings)
    try:
        async with session_scope(make_sessionmaker(engine)) as session:
            new = await create_account_with_key(session, f"bench-polling-{uuid.uuid4().hex[:6]}")
            # A generation half way, as a client polling it sees it.
            job = Job(
                account_id=new.account_id, kind=JobKind.generate, status=JobStatus.running,
                stage="denoising", progress=0.5, params={"prompt": "a linen suit", "n": 4},
                progress_detail={"step": 15, "total": 30, "eta_s": 12.5},
            )  # fmt: skip
            session.add(job)
            await session.flush()
            return Fixture(key=new.key, job_id=job.id)
    finally:
        await engine.dispose()


async def touch_job(settings: Settings, job_id: uuid.UUID) -> float:
    """Commit one UPDATE of the job (its progress); returns time.monotonic() at the
    commit's return."""
    engine = make_engine(settings)
    try:
        async with session_scope(make_sessionmaker(engine)) as session:
            job = await session.get(Job, job_id)
            assert job is not None
            job.progress = round(job.progress + 0.01, 4)
            session.add(job)
        return time.monotonic()
    finally:
        await engine.dispose()


def uvicorn_command(app: str, port: int, *options: str) -> tuple[str, ...]:
    """uvicorn's CLI serving ``app`` (module:attribute), as the Procfile's web line."""
    return ("uvicorn", app, "--host", "127.0.0.1", "--port", str(port), *UVICORN_OPTIONS, *options)


def api_serve_command(port: int) -> tuple[str, ...]:
    """``python -m api serve``: uvicorn on uvloop and httptools, the collector tuned."""
    return ("api", "serve", "--host", "127.0.0.1", "--port", str(port))


@dataclass
class Server:
    """One API process, ``python -m <command>``, answering /healthz on ``port``; logs
    to var/log/bench-polling-<name>.log."""

    name: str
    command: tuple[str, ...]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **self.env}
        with open(LOG_DIR / f"bench-polling-{self.name}.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.command], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited; see var/log/bench-polling-{self.name}.log")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name} did not come up; see var/log/")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
