"""Placement rules (core.fleet.placement) on small hand-made fleets: refusal of a job
too big for the fleet, VRAM fit and best fit, LoRA and base-pipeline affinity,
interactive before training, aging, fair share, and jobs queued next."""

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


def test_busy_gpu_with_the_lora_is_worth_a_short_wait() -> None:
    busy = replace(RTX5090, loras_vram=frozenset({"l"}), running_account="b", busy_until=5.0)
    placed = place([job("g", lora="l")], [RTX4090, busy], now=0, policy=POLICY)
    assert placed[0].worker_id == "5090" and not placed[0].starts_now
    # Not when it frees later than the policy waits: the idle GPU takes it.
    later = replace(busy, busy_until=60.0)
    placed = place([job("g", lora="l")], [RTX4090, later], now=0, policy=POLICY)
    assert placed[0].worker_id == "4090" and placed[0].starts_now


def test_generation_before_training_and_training_never_starved() -> None:
    fresh = [job("train", kind="train", account="a"), job("gen", account="b", waiting_since=5)]
    placed = place(fresh, [RTX4090], now=10, policy=POLICY)
    # One GPU: the generation starts, the training is queued next behind it.
    assert [(p.job_id, p.starts_now) for p in placed] == [("gen", True), ("train", False)]
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


def test_each_gpu_gets_one_job_now_and_one_next() -> None:
    jobs = [job(f"j{i}", waiting_since=i) for i in range(5)]
    placed = place(jobs, [RTX4090, RTX5090], now=10, policy=POLICY)
    assert len(placed) == 4 and len({p.job_id for p in placed}) == 4
    per_gpu = {(p.worker_id, p.starts_now) for p in placed}
    assert per_gpu == {("4090", True), ("4090", False), ("5090", True), ("5090", False)}
    # A GPU already holding a next job takes nothing.
    full = replace(RTX4090, running_account="x", next_account="y", busy_until=20)
    assert place(jobs, [full], now=10, policy=POLICY) == []
