"""Placing GPU jobs on GPUs: which queued job goes to which GPU, decided from data.

Pure and torch-free: the scheduler calls ``place`` with the jobs waiting and the
fleet as its workers last published it (``core.fleet.inventory``), and the
simulator (bench/fleet_sim.py) calls the very same function with simulated ones.

The rules, in the order they apply:

1. **Too big**: a job whose peak VRAM plus the safety margin (or the floor an
   out-of-memory retry set) exceeds the largest GPU of the fleet can never run:
   it is refused at once, not left waiting.
2. **Order**: jobs by score, highest first: their priority, plus a bonus for
   interactive kinds (a shopper waits on a generation, nobody on a training), plus
   one point per ``aging_s`` waited, so training is never starved.
3. **Fair share**: while other accounts wait, an account holding
   ``fair_share`` of the fleet's GPUs (running or queued next, at least one) gets
   no more this round.
4. **Fit**: a job goes only to a GPU whose VRAM covers its need. Each GPU runs
   one job at a time; one more may be queued behind it ("next"), so a GPU starts
   its next job without waiting for a scheduler tick. Nothing else is ever sent,
   so arq's FIFO never decides the order.
5. **Where**: among idle GPUs that fit, the one holding the job's LoRA (in VRAM,
   then host RAM, then disk), then the one holding its base pipeline, then the
   smallest that fits (best fit keeps big GPUs for big jobs). A busy GPU holding
   the LoRA whose job ends within ``affinity_wait_s`` is preferred over an idle
   GPU without it: reloading a LoRA and perhaps a base pipeline costs more than
   the wait. With no idle GPU that fits, the job is queued next on the fitting
   busy GPU that frees first.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

GIB = 2**30


class Reason(StrEnum):
    lora_vram = "affinity-lora-vram"  # the GPU holds the LoRA as a resident adapter
    lora_host = "affinity-lora-host"  # ...parsed in host RAM
    lora_disk = "affinity-lora-disk"  # ...as a file on the worker's disk
    base = "affinity-base"  # the GPU holds the job's base pipeline
    fit = "fit"  # best fit among idle GPUs
    preempt = "preempt"  # a training yields its GPU to this interactive job
    too_big = "too-big"  # no GPU of the fleet can hold it: refused


# How much a LoRA's presence in each tier is worth when choosing a GPU.
_LORA_TIER_REASONS = (Reason.lora_vram, Reason.lora_host, Reason.lora_disk)


@dataclass(frozen=True)
class JobCost:
    peak_vram_bytes: int
    seconds: float


@dataclass(frozen=True)
class PendingJob:
    id: str
    kind: str  # "train", "generate", "catalog_embed"
    account: str
    profile: str  # the base pipeline it runs on
    cost: JobCost
    waiting_since: float  # seconds on the caller's clock
    priority: int = 0
    lora: str | None = None  # the LoRA (its sha256) a generation applies
    min_vram_bytes: int = 0  # after an out-of-memory: only GPUs this large


@dataclass(frozen=True)
class GpuView:
    """One GPU worker as the scheduler sees it."""

    worker_id: str
    vram_total_bytes: int
    profiles: frozenset[str] = frozenset()  # base pipelines resident
    loras_vram: frozenset[str] = frozenset()
    loras_host: frozenset[str] = frozenset()
    loras_disk: frozenset[str] = frozenset()
    running_account: str | None = None  # None: idle
    busy_until: float | None = None  # expected end of the running job
    next_account: str | None = None  # a job queued behind the running one
    # The running job, when it may be asked to yield the GPU (a training: it saves a
    # checkpoint and goes back to the queue, losing no step).
    preemptible_job: str | None = None

    @property
    def idle(self) -> bool:
        return self.running_account is None and self.next_account is None

    def lora_tier(self, lora: str | None) -> int:
        """0 (in VRAM), 1 (host), 2 (disk) or 3 (not held)."""
        tiers = (self.loras_vram, self.loras_host, self.loras_disk)
        return next((i for i, tier in enumerate(tiers) if lora in tier), len(tiers))


# Seconds to get a LoRA in place from each tier, and from the blob store when no tier
# holds it: docs/benchmarks.md's LoRA switching figures (resident adapter ~0.2 ms,
# host RAM ~2 ms, disk ~20 ms, a blob-store fetch ~0.3 s).
LORA_LOAD_S = (0.0002, 0.002, 0.02, 0.3)
# Loading a base pipeline a GPU does not hold (SD 1.5-size from local disk, a few s).
PIPELINE_LOAD_S = 6.0


@dataclass(frozen=True)
class PlacementPolicy:
    safety_margin_bytes: int = GIB  # CUDA context, allocator slack, fragmentation
    aging_s: float = 60.0  # each minute waited is worth one priority level
    interactive_kinds: frozenset[str] = frozenset({"generate"})
    interactive_bonus: float = 10.0  # ten minutes of a training's aging
    fair_share: float = 0.5
    affinity_wait_s: float = 10.0
    queue_next: bool = True  # may a generation wait behind the busy GPU holding its LoRA
    lora_load_s: tuple[float, float, float, float] = LORA_LOAD_S
    pipeline_load_s: float = PIPELINE_LOAD_S
    # An interactive job that waited this long with no idle GPU may take one from a
    # training that still has more than preempt_min_remaining_s to go (None: never).
    preempt_after_s: float | None = 60.0
    preempt_min_remaining_s: float = 120.0


@dataclass(frozen=True)
class Placement:
    job_id: str
    worker_id: str | None  # None when refused
    reason: Reason
    starts_now: bool = True  # False: queued behind the GPU's running job
    preempts: str | None = None  # the running job asked to yield the GPU to this one


@dataclass(eq=False)
class _Slot:
    """A GPU's state while one round of placement fills it."""

    gpu: GpuView
    group: _Class
    running: str | None
    next: str | None
    busy_until: float | None

    @property
    def idle(self) -> bool:
        return self.running is None and self.next is None

    @property
    def can_queue(self) -> bool:
        return self.running is not None and self.next is None


@dataclass(eq=False)
class _Class:
    """GPUs alike for placement (same VRAM, same base pipelines): a big fleet has
    few classes, so a decision looks at classes, not at every GPU."""

    vram_total: int
    profiles: frozenset[str]
    # A heap by worker id (the position breaks ties between equal ids).
    idle: list[tuple[str, int, _Slot]] = field(default_factory=list)

    def first_idle(self) -> _Slot | None:
        while self.idle and not self.idle[0][2].idle:
            heapq.heappop(self.idle)  # taken since it was pushed
        return self.idle[0][2] if self.idle else None


@dataclass
class _Round:
    policy: PlacementPolicy
    now: float
    classes: list[_Class]
    holders: dict[str, list[_Slot]]  # LoRA -> GPUs holding it in any tier
    held: Counter[str]  # GPUs per account (running or queued next)
    idle_slots: int
    preemptible: list[_Slot] = field(default_factory=list)  # busy with a training

    @classmethod
    def start(
        cls, gpus: list[GpuView], needed: set[str], now: float, policy: PlacementPolicy
    ) -> _Round:
        """The round's view of the fleet: GPUs in classes, and the holders of the
        LoRAs the waiting jobs need (only those: a GPU may hold hundreds)."""
        classes: dict[tuple[int, frozenset[str]], _Class] = {}
        holders: dict[str, list[_Slot]] = {}
        held: Counter[str] = Counter()
        state = cls(policy, now, [], holders, held, 0)
        for position, gpu in enumerate(gpus):
            key = (gpu.vram_total_bytes, gpu.profiles)
            group = classes.setdefault(key, _Class(gpu.vram_total_bytes, gpu.profiles))
            slot = _Slot(gpu, group, gpu.running_account, gpu.next_account, gpu.busy_until)
            if slot.idle:
                heapq.heappush(group.idle, (gpu.worker_id, position, slot))
                state.idle_slots += 1
            elif gpu.preemptible_job is not None and gpu.next_account is None:
                state.preemptible.append(slot)
            for tier in (gpu.loras_vram, gpu.loras_host, gpu.loras_disk):
                for lora in needed.intersection(tier):
                    holders.setdefault(lora, []).append(slot)
            held.update(a for a in (gpu.running_account, gpu.next_account) if a is not None)
        state.classes = sorted(classes.values(), key=lambda c: c.vram_total)
        return state

    def setup_s(self, slot: _Slot, job: PendingJob) -> float:
        """Seconds before ``job`` can start computing on ``slot``'s GPU once it is free."""
        lora = self.policy.lora_load_s[slot.gpu.lora_tier(job.lora)] if job.lora else 0.0
        base = 0.0 if job.profile in slot.gpu.profiles else self.policy.pipeline_load_s
        return lora + base

    def start_on(self, slot: _Slot, job: PendingJob) -> None:
        slot.running = job.id
        slot.busy_until = self.now + job.cost.seconds
        self.idle_slots -= 1


def need_bytes(job: PendingJob, policy: PlacementPolicy) -> int:
    """The VRAM a GPU must have for ``job``: its peak plus the margin, at least the
    floor an out-of-memory retry set."""
    return max(job.cost.peak_vram_bytes + policy.safety_margin_bytes, job.min_vram_bytes)


def score(job: PendingJob, now: float, policy: PlacementPolicy) -> float:
    bonus = policy.interactive_bonus if job.kind in policy.interactive_kinds else 0.0
    return job.priority + bonus + max(0.0, now - job.waiting_since) / policy.aging_s


def place(
    pending: list[PendingJob],
    gpus: list[GpuView],
    now: float,
    policy: PlacementPolicy | None = None,
) -> list[Placement]:
    """Where each job that can be placed this round goes (jobs absent from the
    result wait for a later round). Each job appears at most once; each idle GPU
    gets at most one job to start now, and a busy one at most one queued next."""
    policy = policy or PlacementPolicy()
    needed = {job.lora for job in pending if job.lora is not None}
    state = _Round.start(gpus, needed, now, policy)
    largest = max((g.vram_total_bytes for g in gpus), default=0)
    cap = max(1, math.floor(len(gpus) * policy.fair_share))
    order = sorted(pending, key=lambda j: (-score(j, now, policy), j.waiting_since, j.id))
    waiting = Counter(job.account for job in order)
    total_waiting = len(order)
    placements: list[Placement] = []
    for job in order:
        need = need_bytes(job, policy)
        if gpus and need > largest:
            placed: Placement | None = Placement(job.id, None, Reason.too_big)
        elif not (
            state.idle_slots
            or (policy.queue_next and job.lora in state.holders)
            or (state.preemptible and _may_preempt(job, now, policy))
        ):
            continue  # nothing can take it now; a later job may still be too big
        elif state.held[job.account] >= cap and total_waiting > waiting[job.account]:
            continue  # fair share: others wait
        else:
            placed = _place_one(job, need, state)
            if placed is not None:
                state.held[job.account] += 1
        if placed is not None:
            placements.append(placed)
            waiting[job.account] -= 1
            total_waiting -= 1
    return placements


def _place_one(job: PendingJob, need: int, state: _Round) -> Placement | None:
    holders = [s for s in state.holders.get(job.lora or "", []) if s.gpu.vram_total_bytes >= need]
    idle = [s for s in holders if s.idle]
    idle += [s for c in state.classes if c.vram_total >= need and (s := c.first_idle())]
    best = min(idle, key=lambda s: _preference(s, job, need, state), default=None)
    if state.policy.queue_next:
        waited = _worth_waiting_for(holders, job, best, state)
        if waited is not None:
            waited.next = job.id
            return Placement(job.id, waited.gpu.worker_id, _reason(waited, job), starts_now=False)
    if best is None:
        return _preempt(job, need, state) if _may_preempt(job, state.now, state.policy) else None
    state.start_on(best, job)
    return Placement(job.id, best.gpu.worker_id, _reason(best, job))


def _may_preempt(job: PendingJob, now: float, policy: PlacementPolicy) -> bool:
    waited = now - job.waiting_since
    after = policy.preempt_after_s
    return after is not None and job.kind in policy.interactive_kinds and waited >= after


def _preempt(job: PendingJob, need: int, state: _Round) -> Placement | None:
    """Ask a training to yield a GPU that fits ``job``: the one where ``job`` starts
    soonest, then the training furthest from its end (the most waiting saved)."""
    horizon = state.now + state.policy.preempt_min_remaining_s
    candidates = [
        s
        for s in state.preemptible
        if s.next is None and s.gpu.vram_total_bytes >= need and (s.busy_until or 0.0) > horizon
    ]
    if not candidates:
        return None
    slot = min(candidates, key=lambda s: (state.setup_s(s, job), -(s.busy_until or 0.0)))
    slot.next = job.id
    state.preemptible.remove(slot)
    return Placement(job.id, slot.gpu.worker_id, Reason.preempt, False, slot.gpu.preemptible_job)


def _worth_waiting_for(
    holders: list[_Slot], job: PendingJob, best: _Slot | None, state: _Round
) -> _Slot | None:
    """A busy GPU holding the job's LoRA where it starts sooner, wait included, than
    on the best idle GPU; None when there is none."""
    horizon = state.now + state.policy.affinity_wait_s
    busy = [s for s in holders if s.can_queue and (s.busy_until or state.now) <= horizon]
    if not busy:
        return None
    soonest = min(busy, key=lambda s: (s.busy_until or state.now) + state.setup_s(s, job))
    wait = (soonest.busy_until or state.now) - state.now + state.setup_s(soonest, job)
    if best is not None and wait >= state.setup_s(best, job):
        return None
    return soonest


def _preference(slot: _Slot, job: PendingJob, need: int, state: _Round) -> tuple[float, int, str]:
    """Smaller is better: setup seconds, leftover VRAM, a stable id."""
    leftover = slot.gpu.vram_total_bytes - need
    return (state.setup_s(slot, job), leftover, slot.gpu.worker_id)


def _reason(slot: _Slot, job: PendingJob) -> Reason:
    tier = slot.gpu.lora_tier(job.lora)
    if job.lora is not None and tier < len(_LORA_TIER_REASONS):
        return _LORA_TIER_REASONS[tier]
    return Reason.base if job.profile in slot.gpu.profiles else Reason.fit
