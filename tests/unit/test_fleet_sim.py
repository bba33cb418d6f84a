"""The fleet simulator (bench/fleet_sim*.py) on a tiny day: the same seed gives the same
results, every policy finishes every job, Belady's MIN and the lower bounds behave."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bench.fleet_sim import belady_hits, bounds, policies, stats
from bench.fleet_sim_model import Run, Workload, fleet, make_day, simulate

TINY_DAY = Workload(users=12, seed=7, day_s=3600.0, oom_retry_share=0.3)


def run_all(seed: int) -> list[Run]:
    day = make_day(TINY_DAY.__class__(**{**asdict(TINY_DAY), "seed": seed}))
    return [simulate(day, fleet(2), policy) for policy in policies(variants=True)]


def trace(run: Run) -> list[tuple[str, float | None, float | None, str | None]]:
    return [(j.spec.id, j.start, j.end, j.gpu) for j in run.jobs]


def test_the_same_seed_gives_the_same_results() -> None:
    first, second = run_all(7), run_all(7)
    for a, b in zip(first, second, strict=True):
        assert trace(a) == trace(b)
        sa, sb = asdict(stats(a)), asdict(stats(b))
        sa.pop("decide_ms_per_tick"), sb.pop("decide_ms_per_tick")  # wall time
        assert sa == sb
    assert [trace(r) for r in run_all(8)] != [trace(r) for r in first]


@pytest.mark.parametrize("name", ["atelier", "FIFO round-robin", "Ray Serve multiplex"])
def test_every_policy_finishes_every_job(name: str) -> None:
    day = make_day(TINY_DAY)
    expected = sum(1 + len(u.looks) for u in day)
    run = next(r for r in run_all(TINY_DAY.seed) if r.policy == name)
    assert len(run.jobs) == expected
    assert all(j.end is not None and j.start is not None and j.start >= j.ready for j in run.jobs)
    assert all(not j.refused for j in run.jobs)
    s = stats(run)
    assert s.makespan_s >= bounds(day, 2, TINY_DAY.day_s)["makespan_lb_s"] - 1e-6
    if name != "Ray Serve multiplex":  # the only VRAM-blind one
        assert s.overcommits == 0


def test_belady_never_loses_to_lru_and_knows_the_future() -> None:
    # Two slots; LRU misses every request of a cycle of three, MIN hits some.
    cycle = [("look", x) for x in "abcabcabc"]
    hits, looks = belady_hits(cycle, slots=2)
    assert looks == 9 and hits == 3
    # A training empties the VRAM tier and leaves its own LoRA there.
    assert belady_hits([("look", "a"), ("train", "b"), ("look", "b"), ("look", "a")], 4) == (1, 3)
