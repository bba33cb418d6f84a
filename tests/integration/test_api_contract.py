"""The OpenAPI contract, checked the way a new user would: schemathesis's CLI run
with every check against the real app served by uvicorn, with a key, on real
Postgres, Redis and blobs, with a subject and a job in the database so reads hit
real rows. A fixed seed and a bounded example count keep it reproducible."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.db.engine import session_scope
from core.settings import Settings
from tests.conftest import ROOT, SAMPLE_PHOTOS, photo_files
from tests.e2e.conftest import free_port, settings_env

SEED = 20240611
MAX_EXAMPLES = 12
_START_S = 30.0
_RUN_S = 240.0


# What the schema cannot say, each for a reason (schemathesis.toml):
CONFIG = """
# Every check (as `--checks all`, which would override the exceptions below).
checks.enabled = true

[phases.stateful]
# Dependency analysis links a job's null subject_id to GET /v1/subjects/None:
# links come only from Location headers (none yet), so stateful runs stay sound.
inference.algorithms = ["location-headers"]

[parameters]
# Cursors are opaque: only those the API gave out decode. An empty one is the
# first page; a garbled one is a 422 that no schema can predict.
"query.cursor" = ""
# The seeded rows, so reads reach them (a DELETE may remove the subject first:
# then they answer 404, which is documented too).
"path.subject_id" = "{subject_id}"
"path.job_id" = "{job_id}"

[[operations]]
# Photos and search images are checked beyond their schema (decodable, one face,
# large enough): random bytes are rejected as photo-rejected / search-image-rejected.
include-name = ["POST /v1/subjects", "POST /v1/products/search"]
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "401", "403", "404", "409", "415", "422",
]

[[operations]]
# Rules across fields or resources: candidates >= num_images, min_price <=
# max_price, with_subjects naming the account's own subjects (422 in core).
include-name = ["POST /v1/generations", "POST /v1/looks", "POST /v1/subjects/{{subject_id}}/train"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

[[operations]]
# Product search by meaning answers 503 index-not-ready until the catalog has
# been embedded; the test database has no catalog.
include-path = "/v1/products/search"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""

# A client sends a fresh Idempotency-Key per request: schemathesis draws the same
# few values for different bodies, which the API rightly refuses (422 reused).
HOOKS = """
import uuid

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    if case.meta is not None and case.meta.generation.mode.is_positive:
        for name in list(headers):
            if name.lower() == "idempotency-key":
                headers[name] = str(uuid.uuid4())
"""


@dataclass(frozen=True)
class LiveApi:
    base_url: str
    key: str
    subject_id: str
    job_id: str


def _wait_until_up(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{base_url}/openapi.json", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    pytest.fail(f"the API did not start:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def api_server(settings: Settings, tmp_path: Path, migrated: object) -> Iterator[str]:
    """uvicorn serving api.app in a child process; long polls capped at half a
    second so schemathesis's `?wait=` values do not stall the run."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **settings_env(settings),
        "ATELIER_MAX_WAIT_S": "0.5",
        "ATELIER_PUBLIC_BASE_URL": base_url,
    }
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:app", "--port", str(port),
             "--host", "127.0.0.1", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _wait_until_up(process, base_url, log)
    yield base_url
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
async def live_api(
    api_server: str, sessions: async_sessionmaker[AsyncSession], redis: object
) -> AsyncIterator[LiveApi]:
    """An operator's key (so admin routes are exercised past their 403) owning a
    subject and a training job."""
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "contract", is_admin=True)
    auth = {"Authorization": f"Bearer {new.key}"}
    photos = [(p.name, p.read_bytes()) for p in SAMPLE_PHOTOS]
    async with httpx.AsyncClient(base_url=api_server, headers=auth, timeout=30) as http:
        subject = await http.post("/v1/subjects", files=photo_files(photos))
        assert subject.status_code == 201, subject.text
        job = await http.post(f"/v1/subjects/{subject.json()['id']}/train")
        assert job.status_code == 202, job.text
    yield LiveApi(api_server, new.key, subject.json()["id"], job.json()["id"])


def _schemathesis() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is missing: pip install -e '.[dev]'")
    return found


def test_schemathesis_finds_no_failure(live_api: LiveApi, tmp_path: Path) -> None:
    config = CONFIG.format(subject_id=live_api.subject_id, job_id=live_api.job_id)
    (tmp_path / "schemathesis.toml").write_text(config)
    (tmp_path / "contract_hooks.py").write_text(HOOKS)
    command = [
        _schemathesis(), "--config-file", str(tmp_path / "schemathesis.toml"),
        "run", f"{live_api.base_url}/openapi.json",
        "--header", f"Authorization: Bearer {live_api.key}",
        "--seed", str(SEED),
        "--max-examples", str(MAX_EXAMPLES),
        "--workers", "2",
        "--no-color",
        "--request-timeout", "20",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "contract_hooks", "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=_RUN_S,
        check=False,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found failures:\n{output[-20000:]}"
