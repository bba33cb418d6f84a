"""Process logging: one root handler, text or one JSON object per line.

Every line carries the process name and, where one is in scope, the request id
(set by the API's request-id middleware) and the job id (set around a job's
attempt on a worker), read from contextvars by a Filter on the handler, so a
line from any library logger (SQLAlchemy, uvicorn, arq) gets them too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from core.settings import Settings

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process_name)s%(ids)s] %(message)s"
# uvicorn's loggers keep their own handlers unless told otherwise; its access line
# would repeat ours without the request id, so it is muted (ours is atelier.access).
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# A LogRecord's own attributes: anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Ours (already members) and uvicorn's ANSI-coloured copy of the message.
_NOT_EXTRA = frozenset({"process_name", "request_id", "job_id", "ids", "color_message"})


@contextmanager
def job_context(job_id: uuid.UUID | str) -> Iterator[None]:
    """Every line logged inside (and in tasks started inside) carries this job id."""
    token = job_id_var.set(str(job_id))
    try:
        yield
    finally:
        job_id_var.reset(token)


class ContextFilter(logging.Filter):
    """Stamps the process name and the ids in scope on every record it sees."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        # An explicit ``extra={"request_id": ...}`` wins over the contextvar.
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        record.request_id = request_id
        record.job_id = job_id
        ids = [f"req={request_id}"] if request_id else []
        ids += [f"job={job_id}"] if job_id else []
        record.ids = "".join(f" {part}" for part in ids)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields become members of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": getattr(record, "process_name", None),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in _NOT_EXTRA and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a line is logged, not when the handler
    was made: a test runner swaps sys.stderr per test and closes the old one."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def make_handler(settings: Settings, process_name: str) -> logging.Handler:
    handler = _StderrHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter(process_name))
    return handler


def configure(settings: Settings, process_name: str, level: int = logging.INFO) -> None:
    """Set up the root logger for this process. Calling it again replaces the
    handler it installed before (other handlers, such as pytest's, are kept)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(make_handler(settings, process_name))
    root.setLevel(level)
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
