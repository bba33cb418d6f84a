"""Placement rules (core.fleet.placement) on small hand-made fleets: refusal of a job
too big for the fleet, VRAM fit and best fit, the soonest start (LoRA and base
pipeline held), interactive before training, aging, fair share, and the one case a
job waits behind a busy GPU."""

from __future__ import annotations

from dataclasses import replace

from core.fleet.placement import (
    GIB,
    GpuView,
    JobCost,
    PendingJob,
    PlacementPolicy,
    Reason,
    place,
)

POLICY = PlacementPolicy(safety_margin_bytes=GIB, aging_s=60.0, interactive_bonus=10.0)
RTX4090 = GpuView("4090", 24 * GIB)
RTX5090 = GpuView("5090", 32 * GIB)


def job(
    id: str, kind: str = "generate", gib: float = 8, account: str = "a", **options: object
) -> PendingJob:
    base = PendingJob(
        id=id,
        kind=kind,
        account=account,
        profile="sd15",
        cost=JobCost(int(gib * GIB), 30.0),
        waiting_since=0.0,
    )
    return replace(base, **options)  # type: ignore[arg-type]


def where(placements: list) -> dict[str, str | None]:  # type: ignore[type-arg]
    return {p.job_id: p.worker_id for p in placements}


def test_a_job_too_big_for_every_gpu_is_refused_at_once() -> None:
    placed = place([job("huge", gib=40), job("ok")], [RTX4090, RTX5090], now=0, policy=POLICY)
    by_id = {p.job_id: p for p in placed}
    assert by_id["huge"].worker_id is None and by_id["huge"].reason is Reason.too_big
    assert by_id["ok"].worker_id is not None
    # With no GPU registered yet nothing is refused: it waits for the fleet.
    assert place([job("huge", gib=40)], [], now=0, policy=POLICY) == []
    # An out-of-memory floor counts as the job's need.
    floor = job("retried", gib=8, min_vram_bytes=33 * GIB)
    assert place([floor], [RTX4090, RTX5090], now=0, policy=POLICY)[0].reason is Reason.too_big


def test_fit_and_best_fit() -> None:
    # 26 GiB + 1 GiB margin: only the 5090; a small job then takes the 4090.
    placed = place([job("big", gib=26), job("small")], [RTX4090, RTX5090], now=0, policy=POLICY)
    assert where(placed) == {"big": "5090", "small": "4090"}
    # Alone, a small job takes the smallest GPU that fits and leaves the 5090 free.
    assert where(place([job("small")], [RTX5090, RTX4090], now=0, policy=POLICY)) == {
        "small": "4090"
    }


def test_lora_and_base_affinity() -> None:
    holding = replace(RTX5090, loras_host=frozenset({"lora-u"}))
    placed = place([job("g", lora="lora-u")], [RTX4090, holding], now=0, policy=POLICY)
    assert placed[0].worker_id == "5090" and placed[0].reason is Reason.lora_host
    # VRAM beats host RAM beats disk.
    tiers = [
        replace(RTX4090, worker_id="disk", loras_disk=frozenset({"l"})),
        replace(RTX4090, worker_id="vram", loras_vram=frozenset({"l"})),
        replace(RTX4090, worker_id="host", loras_host=frozenset({"l"})),
    ]
    placed = place([job("g", lora="l")], tiers, now=0, policy=POLICY)
    assert placed[0].worker_id == "vram" and placed[0].reason is Reason.lora_vram
    # Without the LoRA anywhere, the base pipeline decides over best fit.
    with_base = replace(RTX5090, profiles=frozenset({"sd15"}))
    placed = place([job("g", lora="new")], [RTX4090, with_base], now=0, policy=POLICY)
    assert placed[0].worker_id == "5090" and placed[0].reason is Reason.base


def test_a_busy_gpu_with_the_lora_and_pipeline_is_worth_a_short_wait() -> None:
    busy = replace(
        RTX5090, loras_vram=frozenset({"l"}), profiles=frozenset({"sd15"}),
        running_account="b", busy_until=5.0,
    )  # fmt: skip
    # 5 s of wait beats loading the pipeline (6 s) and fetching the LoRA on the 4090.
    placed = place([job("g", lora="l")], [RTX4090, busy], now=0, policy=POLICY)
    assert placed[0].worker_id == "5090" and not placed[0].starts_now
    # Not when the idle GPU holds the pipeline: it starts sooner there.
    loaded = replace(RTX4090, profiles=frozenset({"sd15"}))
    placed = place([job("g", lora="l")], [loaded, busy], now=0, policy=POLICY)
    assert placed[0].worker_id == "4090" and placed[0].starts_now
    # Nor when it frees later than the policy waits.
    later = replace(busy, busy_until=60.0)
    placed = place([job("g", lora="l")], [RTX4090, later], now=0, policy=POLICY)
    assert placed[0].worker_id == "4090" and placed[0].starts_now


def test_a_loaded_pipeline_beats_a_lora_on_disk() -> None:
    on_disk = replace(RTX4090, worker_id="disk", loras_disk=frozenset({"l"}))
    loaded = replace(RTX4090, worker_id="base", profiles=frozenset({"sd15"}))
    placed = place([job("g", lora="l")], [on_disk, loaded], now=0, policy=POLICY)
    assert placed[0].worker_id == "base" and placed[0].reason is Reason.base


def test_generation_before_training_and_training_never_starved() -> None:
    fresh = [job("train", kind="train", account="a"), job("gen", account="b", waiting_since=5)]
    placed = place(fresh, [RTX4090], now=10, policy=POLICY)
    # One GPU: the generation starts; the training waits for a GPU to free.
    assert [(p.job_id, p.starts_now) for p in placed] == [("gen", True)]
    # A training that waited 11 minutes outranks a fresh generation (bonus 10).
    old = [job("train", kind="train", account="a"), job("gen", account="b", waiting_since=660)]
    placed = place(old, [RTX4090], now=660, policy=POLICY)
    assert placed[0].job_id == "train" and placed[0].starts_now


def test_fair_share_while_others_wait() -> None:
    many = [job(f"a{i}", account="a") for i in range(4)] + [job("b0", account="b", waiting_since=1)]
    gpus = [replace(RTX4090, worker_id=f"g{i}") for i in range(2)]
    placed = place(many, gpus, now=1, policy=replace(POLICY, queue_next=False))
    # Two GPUs, share 0.5: account a gets one, b the other, though a asked first.
    assert sorted(p.job_id for p in placed) == ["a0", "b0"]
    # Alone, an account may use the whole fleet.
    alone = place(many[:4], gpus, now=1, policy=replace(POLICY, queue_next=False))
    assert len(alone) == 2


def test_each_idle_gpu_gets_one_job_and_the_rest_wait() -> None:
    jobs = [job(f"j{i}", waiting_since=i) for i in range(5)]
    placed = place(jobs, [RTX4090, RTX5090], now=10, policy=POLICY)
    assert [(p.job_id, p.worker_id, p.starts_now) for p in placed] == [
        ("j0", "4090", True),
        ("j1", "5090", True),
    ]
    busy = replace(RTX4090, running_account="x", busy_until=20)
    assert place(jobs, [busy], now=10, policy=POLICY) == []


def test_equal_worker_ids_do_not_break_the_round() -> None:
    twins = [GpuView("w", 24 * GIB), GpuView("w", 24 * GIB)]
    assert len(place([job("a"), job("b")], twins, now=0, policy=POLICY)) == 2


def test_a_look_that_waited_takes_the_gpu_of_a_long_training() -> None:
    training = replace(
        RTX4090, running_account="t", busy_until=600.0, preemptible_job="train-1"
    )  # fmt: skip
    look = job("g", waiting_since=0.0)
    placed = place([look], [training], now=61.0, policy=POLICY)
    assert len(placed) == 1 and placed[0].reason is Reason.preempt
    assert (placed[0].worker_id, placed[0].preempts, placed[0].starts_now) == (
        "4090",
        "train-1",
        False,
    )
    # Not before it waited preempt_after_s, not for a training about to end, not
    # for a training job, and never with preemption off.
    assert place([look], [training], now=30.0, policy=POLICY) == []
    ending = replace(training, busy_until=61.0 + 60.0)
    assert place([look], [ending], now=61.0, policy=POLICY) == []
    other_training = job("t2", kind="train", waiting_since=0.0)
    assert place([other_training], [training], now=61.0, policy=POLICY) == []
    off = replace(POLICY, preempt_after_s=None)
    assert place([look], [training], now=61.0, policy=off) == []
    # One GPU yields once: a second look waits.
    two = [look, job("g2", waiting_since=0.0, account="b")]
    assert len(place(two, [training], now=61.0, policy=POLICY)) == 1
