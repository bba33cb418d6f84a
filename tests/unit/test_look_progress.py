"""A look's status, stages, progress and ETA from its children (core.look_progress)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from core.db.models import Job, JobKind, JobStatus, Look
from core.look_progress import Children, LookStatus, StageStatus, look_state

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


def _job(kind: JobKind, status: JobStatus, **values: object) -> Job:
    return Job(id=uuid.uuid4(), account_id=uuid.uuid4(), kind=kind, status=status, **values)


def _look(**values: object) -> Look:
    return Look(account_id=uuid.uuid4(), subject_id=uuid.uuid4(), **values)


def test_a_waiting_look_is_queued_at_training_with_the_whole_estimate_left() -> None:
    train = _job(JobKind.train, JobStatus.queued)
    gen = _job(JobKind.generate, JobStatus.queued)
    state = look_state(_look(), Children(train, gen), {str(train.id): 60, str(gen.id): 20}, NOW)
    assert (state.status, state.stage, state.progress, state.eta_s) == (
        LookStatus.queued, "training", 0.0, 80.0)  # fmt: skip


def test_progress_weighs_children_by_expected_seconds_and_eta_uses_the_running_rate() -> None:
    started = NOW - timedelta(seconds=30)
    train = _job(JobKind.train, JobStatus.running, progress=0.5, started_at=started)
    gen = _job(JobKind.generate, JobStatus.queued)
    state = look_state(_look(), Children(train, gen), {str(train.id): 60, str(gen.id): 20}, NOW)
    assert state.status is LookStatus.running
    assert state.progress == 0.375  # 0.5 x 60 of 80 expected seconds
    assert state.eta_s == 50.0  # 30 s more at its own rate, then the generation's 20


def test_matching_is_the_generation_jobs_last_part() -> None:
    gen = _job(JobKind.generate, JobStatus.running, stage="matching", progress=0.9,
               started_at=NOW)  # fmt: skip
    state = look_state(_look(), Children(None, gen), {}, NOW)
    assert state.stage == "matching"
    assert [(s.name.value, s.status) for s in state.stages] == [
        ("generating", StageStatus.succeeded), ("matching", StageStatus.running)]  # fmt: skip


def test_a_failed_training_fails_the_look_with_its_own_error() -> None:
    error = {"code": "training-failed", "detail": "loss went to nan"}
    train = _job(JobKind.train, JobStatus.failed, error=error, finished_at=NOW)
    waited = {"code": "dependency-failed", "detail": "it waited for a failed job"}
    gen = _job(JobKind.generate, JobStatus.failed, finished_at=NOW, error=waited)
    state = look_state(_look(), Children(train, gen), {}, NOW)
    assert state.status is LookStatus.failed and state.error == error
    assert state.eta_s is None and state.finished_at == NOW


def test_a_canceled_look_is_canceled_while_a_child_still_stops() -> None:
    gen = _job(JobKind.generate, JobStatus.running, cancel_requested=True, started_at=NOW)
    state = look_state(_look(canceled_at=NOW), Children(None, gen), {}, NOW)
    assert state.status is LookStatus.canceled and state.finished_at == NOW


def test_a_finished_look_reports_each_stages_own_timing() -> None:
    gen = _job(JobKind.generate, JobStatus.succeeded, started_at=NOW, progress=1.0,
               finished_at=NOW + timedelta(seconds=4),
               result={"timings": {"load_s": 1.0, "generation_s": 2.0, "matching_s": 0.5,
                                   "saving_s": 0.25}})  # fmt: skip
    state = look_state(_look(), Children(None, gen), {}, NOW)
    assert state.status is LookStatus.succeeded and state.progress == 1.0
    assert [s.seconds for s in state.stages] == [3.0, 0.75]
