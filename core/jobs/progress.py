"""Progress of one job attempt, written from the compute thread, read by the heartbeat.

The model code runs in a worker thread and reports each step here; the async
heartbeat copies a snapshot into the job row every few seconds and prints it.
A lock keeps the two sides consistent without the model code knowing about
databases or event loops.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    stage: str
    progress: float  # 0..1 over the whole job
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One human line: 'training 12/40 loss=0.1234 eta 8s'."""
        parts = [self.stage]
        if "total" in self.detail:
            parts.append(f"{self.detail['step']}/{self.detail['total']}")
        if "loss" in self.detail:
            parts.append(f"loss={self.detail['loss']:.4f}")
        if "eta_s" in self.detail:
            parts.append(f"eta {self.detail['eta_s']:.0f}s")
        parts.append(f"({self.progress:.0%})")
        return " ".join(parts)


class ProgressTracker:
    """Stages with weights: a job is e.g. 5% loading, 90% training, 5% saving."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._stage = "starting"
        self._base = 0.0  # progress when the current stage began
        self._weight = 0.0  # share of the whole job this stage is worth
        self._detail: dict[str, Any] = {}
        self._stage_started = clock()
        self._first: tuple[int, float] | None = None

    def stage(self, name: str, *, start: float, weight: float) -> None:
        with self._lock:
            self._stage, self._base, self._weight = name, start, weight
            self._detail = {}
            self._stage_started = self._clock()
            self._first = None

    def step(self, done: int, total: int, **detail: Any) -> None:
        with self._lock:
            now = self._clock()
            if self._first is None:
                self._first = (done, now)
            info: dict[str, Any] = {"step": done, "total": total, **detail}
            first_done, first_time = self._first
            if done > first_done:
                # Rate since the first report: right after a resume from a
                # checkpoint too, where `done` did not start at 0.
                info["eta_s"] = round((now - first_time) / (done - first_done) * (total - done), 1)
            elif done > 0:
                info["eta_s"] = round((now - self._stage_started) / done * (total - done), 1)
            self._detail = info

    def report(self, **detail: Any) -> None:
        """Counts of a stage whose total is not known (a crawl's pages): no ETA."""
        with self._lock:
            self._detail = dict(detail)

    def snapshot(self) -> Snapshot:
        with self._lock:
            detail = dict(self._detail)
            fraction = 0.0
            if detail.get("total"):
                fraction = min(1.0, detail["step"] / detail["total"])
            return Snapshot(self._stage, round(self._base + self._weight * fraction, 4), detail)
