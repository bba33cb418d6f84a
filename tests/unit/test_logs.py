"""core/logs.py: JSON lines carry the process, request and job ids; text lines too."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from core import logs
from core.settings import Settings


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() sets up the root logger: put it back as pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_lines_carry_request_and_job_ids(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(Settings(log_format="json"), "worker-gpu")
    log = logging.getLogger("atelier.test")

    log.info("outside")
    token = logs.request_id_var.set("req-1")
    try:
        with logs.job_context("job-7"):
            log.warning("inside %s", "both", extra={"stage": "train"})
    finally:
        logs.request_id_var.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")

    outside, inside, failed = _lines(capsys.readouterr().err)
    assert outside["request_id"] is None and outside["job_id"] is None
    assert outside["process"] == "worker-gpu" and outside["logger"] == "atelier.test"
    assert inside["msg"] == "inside both" and inside["level"] == "WARNING"
    assert inside["request_id"] == "req-1" and inside["job_id"] == "job-7"
    assert inside["stage"] == "train"
    assert str(inside["ts"]).endswith("+00:00")
    assert "ValueError: boom" in str(failed["exc"])


def test_text_lines_show_the_ids_in_scope(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(Settings(log_format="text"), "api")
    token = logs.request_id_var.set("abc123")
    try:
        logging.getLogger("atelier.test").info("hello")
    finally:
        logs.request_id_var.reset(token)
    assert "INFO atelier.test [api req=abc123] hello" in capsys.readouterr().err


def test_configure_twice_keeps_one_handler_and_routes_uvicorn_through_it(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(logging.StreamHandler())  # as uvicorn's own dictConfig does
    logs.configure(Settings(log_format="json"), "api")
    logs.configure(Settings(log_format="json"), "api")

    uvicorn_error.info("Application startup complete.")
    logging.getLogger("uvicorn.access").info("GET / 200")  # ours replaces it

    (line,) = _lines(capsys.readouterr().err)
    assert line["logger"] == "uvicorn.error" and line["process"] == "api"
