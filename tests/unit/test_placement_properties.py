"""Properties of core.fleet.placement.place over random job mixes and fleets (hypothesis):
no VRAM over-commit, no job placed twice, at most one job started (only on an idle GPU)
and one queued next (only where none was) per GPU, exactly the too-big jobs refused; and
a short day of the simulator (bench/fleet_sim_model.py) under atelier's policy never
over-commits and finishes every job."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fleet_sim_model import Workload, fleet, make_day, simulate
from bench.fleet_sim_policies import Atelier
from core.fleet.placement import (
    GIB,
    GpuView,
    JobCost,
    PendingJob,
    Placement,
    PlacementPolicy,
    Reason,
    need_bytes,
    place,
)

LORAS = ("l0", "l1", "l2", "l3", "l4", "l5")
PROFILES = ("sd15", "sdxl", "tiny")
ACCOUNTS = ("a", "b", "c", "d")

loras = st.frozensets(st.sampled_from(LORAS), max_size=4)
# Mostly jobs some GPU fits, a few too big for any.
peak_gib = st.one_of(st.floats(0.5, 20), st.floats(0.5, 20), st.floats(0.5, 20), st.floats(20, 90))


@st.composite
def gpu(draw: st.DrawFn, index: int) -> GpuView:
    state = draw(st.sampled_from(("idle", "running", "running+next")))
    running = draw(st.sampled_from(ACCOUNTS)) if state != "idle" else None
    busy = draw(st.one_of(st.none(), st.floats(0, 3000))) if running else None
    return GpuView(
        worker_id=f"g{index}",
        vram_total_bytes=draw(st.sampled_from((8, 12, 16, 24, 32, 48, 80))) * GIB,
        profiles=draw(st.frozensets(st.sampled_from(PROFILES))),
        loras_vram=draw(loras),
        loras_host=draw(loras),
        loras_disk=draw(loras),
        running_account=running,
        busy_until=busy,
        next_account=draw(st.sampled_from(ACCOUNTS)) if state == "running+next" else None,
    )


@st.composite
def job(draw: st.DrawFn, index: int) -> PendingJob:
    return PendingJob(
        id=f"j{index}",
        kind=draw(st.sampled_from(("train", "generate", "catalog_embed"))),
        account=draw(st.sampled_from(ACCOUNTS)),
        profile=draw(st.sampled_from(PROFILES)),
        cost=JobCost(int(draw(peak_gib) * GIB), draw(st.floats(0.1, 1000))),
        waiting_since=draw(st.floats(0, 1000)),
        priority=draw(st.integers(-2, 2)),
        lora=draw(st.one_of(st.none(), st.sampled_from(LORAS))),
        min_vram_bytes=draw(st.sampled_from((0,) * 6 + (20 * GIB, 40 * GIB, 100 * GIB))),
    )


@st.composite
def rounds(
    draw: st.DrawFn,
) -> tuple[list[PendingJob], list[GpuView], float, PlacementPolicy, list[Placement]]:
    gpus = [draw(gpu(i)) for i in range(draw(st.integers(0, 8)))]
    jobs = [draw(job(i)) for i in range(draw(st.integers(0, 25)))]
    policy = PlacementPolicy(
        safety_margin_bytes=draw(st.sampled_from((0, GIB, 2 * GIB))),
        fair_share=draw(st.sampled_from((0.25, 0.5, 1.0))),
        affinity_wait_s=draw(st.sampled_from((0.0, 10.0, 1000.0))),
        queue_next=draw(st.booleans()),
    )
    now = draw(st.floats(0, 2000))
    return jobs, gpus, now, policy, place(jobs, gpus, now, policy)


Round = tuple[list[PendingJob], list[GpuView], float, PlacementPolicy, list[Placement]]


def check_no_over_commit(case: Round) -> None:
    jobs, gpus, _, policy, placed = case
    by_job, by_gpu = {j.id: j for j in jobs}, {g.worker_id: g for g in gpus}
    for p in placed:
        if p.worker_id is not None:
            assert by_gpu[p.worker_id].vram_total_bytes >= need_bytes(by_job[p.job_id], policy)


def check_each_job_at_most_once(case: Round) -> None:
    jobs, _, _, _, placed = case
    ids = [p.job_id for p in placed]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {j.id for j in jobs}


def check_one_start_if_idle_one_next_if_none(case: Round) -> None:
    _, gpus, _, policy, placed = case
    by_gpu = {g.worker_id: g for g in gpus}
    starts = Counter(p.worker_id for p in placed if p.worker_id and p.starts_now)
    nexts = Counter(p.worker_id for p in placed if p.worker_id and not p.starts_now)
    for worker, count in starts.items():
        assert count == 1 and by_gpu[worker].idle
    for worker, count in nexts.items():
        gpu = by_gpu[worker]
        assert count == 1 and policy.queue_next and gpu.next_account is None
        assert gpu.running_account is not None or starts[worker] == 1  # behind a running job


def check_exactly_too_big_refused(case: Round) -> None:
    jobs, gpus, _, policy, placed = case
    refused = {p.job_id for p in placed if p.worker_id is None}
    assert all(p.reason is Reason.too_big for p in placed if p.worker_id is None)
    if not gpus:
        assert placed == []  # no fleet yet: everything waits
        return
    largest = max(g.vram_total_bytes for g in gpus)
    assert refused == {j.id for j in jobs if need_bytes(j, policy) > largest}


# One generated round, every property checked on it: generating rounds is the cost.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_placement_properties(case: Round) -> None:
    check_no_over_commit(case)
    check_each_job_at_most_once(case)
    check_one_start_if_idle_one_next_if_none(case)
    check_exactly_too_big_refused(case)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    users=st.integers(1, 30),
    gpus=st.sampled_from((1, 2, 4)),
    sdxl_share=st.floats(0, 1),
    oom_share=st.floats(0, 1),
)
def test_a_short_simulated_day_never_over_commits(
    seed: int, users: int, gpus: int, sdxl_share: float, oom_share: float
) -> None:
    w = Workload(users, seed=seed, sdxl_share=sdxl_share, oom_retry_share=oom_share,
                 day_s=3600.0)  # fmt: skip
    day = make_day(w)
    run = simulate(day, fleet(gpus), Atelier())
    assert not any(j.overcommit for j in run.jobs)
    # On a fleet with a 5090 every job fits somewhere; a lone 4090 refuses the floored ones.
    expected = sum(1 + len(u.looks) for u in day if gpus > 1 or not u.train.min_vram_bytes)
    assert sum(j.end is not None for j in run.jobs) == expected
