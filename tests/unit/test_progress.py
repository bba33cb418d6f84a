"""Progress across weighted stages, and an ETA that survives a resume."""

from __future__ import annotations

from core.jobs.progress import ProgressTracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_weighted_stages_and_eta() -> None:
    clock = FakeClock()
    tracker = ProgressTracker(clock=clock)
    tracker.stage("loading", start=0.0, weight=0.1)
    assert tracker.snapshot().progress == 0.0
    tracker.stage("training", start=0.1, weight=0.8)
    clock.now = 4.0
    tracker.step(2, 10, loss=0.5)
    snap = tracker.snapshot()
    assert snap.progress == 0.1 + 0.8 * 0.2
    assert snap.detail == {"step": 2, "total": 10, "loss": 0.5, "eta_s": 16.0}
    assert snap.line() == "training 2/10 loss=0.5000 eta 16s (26%)"


def test_eta_after_resume_counts_only_steps_done_since() -> None:
    clock = FakeClock()
    tracker = ProgressTracker(clock=clock)
    tracker.stage("training", start=0.0, weight=1.0)
    clock.now = 1.0
    tracker.step(51, 100)  # resumed from a checkpoint at step 50
    clock.now = 10.0
    tracker.step(60, 100)
    # 10 steps in 10 s -> 40 steps left take 40 s (not 10/60 * 40).
    assert tracker.snapshot().detail["eta_s"] == 40.0
    assert tracker.snapshot().progress == 0.6
