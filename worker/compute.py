"""Model code runs on the process's main thread; the worker's event loop runs beside it.

Measured on the 2-core CI machine (bench/look_tiny.py, docs/benchmarks.md): torch's
CPU kernels run about 1.9x slower when called from a secondary Python thread than
from the main one (OpenMP's thread team behaves differently there), so running
training in `asyncio.to_thread` doubled the tiny profile's training time. The
worker therefore turns the usual layout around: arq's event loop (queue polling,
heartbeats) lives in a background thread and sends model calls here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[[], Any], "Future[Any]"]


class MainThreadRunner:
    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the serving thread and wait for it without blocking the loop."""
        future: Future[T] = Future()
        # In the caller's context: log lines of model code carry the job's id.
        context = contextvars.copy_context()
        self._calls.put((functools.partial(context.run, fn, *args, **kwargs), future))
        return await asyncio.wrap_future(future)

    def serve(self) -> None:
        """Execute submitted calls, one at a time, until ``stop()``; call on the main thread."""
        while (item := self._calls.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up before we started
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

    def stop(self) -> None:
        self._calls.put(None)
