"""The delivery schedule and what each answer means (core/webhooks/schedule.py)."""

from __future__ import annotations

import random

import pytest

from core.webhooks.schedule import ATTEMPTS, JITTER, RETRY_DELAYS_S, Outcome, judge

SPEC_DELAYS_S = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]


def test_the_schedule_is_the_specs_with_jitter() -> None:
    assert list(RETRY_DELAYS_S) == SPEC_DELAYS_S and ATTEMPTS == 10
    rng = random.Random(7)
    for attempt, base in enumerate(SPEC_DELAYS_S, start=1):
        verdict = judge(attempt, 500, rng=rng)
        assert verdict.outcome is Outcome.retry and verdict.delay_s is not None
        assert base * (1 - JITTER) <= verdict.delay_s <= base * (1 + JITTER)
    assert judge(ATTEMPTS, 500).outcome is Outcome.failed


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.delivered), (204, Outcome.delivered), (301, Outcome.retry),
     (302, Outcome.retry), (400, Outcome.retry), (500, Outcome.retry),
     (None, Outcome.retry), (410, Outcome.disable)],
)  # fmt: skip
def test_what_an_answer_means(status: int | None, outcome: Outcome) -> None:
    assert judge(1, status).outcome is outcome


def test_retry_after_is_honoured_for_throttling_and_gateway_errors_only() -> None:
    rng = random.Random(1)
    assert judge(1, 429, "120", rng=rng).delay_s == 120.0  # later than the schedule's 5 s
    assert judge(1, 503, "1", rng=rng).delay_s != 1.0  # never sooner than the schedule
    assert judge(1, 500, "120", rng=rng).delay_s == pytest.approx(5, rel=JITTER)
    assert judge(1, 429, "9999999", rng=rng).delay_s == RETRY_DELAYS_S[-1]  # capped
    assert judge(1, 429, "Wed, 21 Oct 2026 07:28:00 GMT", rng=rng).delay_s == pytest.approx(
        5, rel=JITTER
    )
