"""The simulated world of bench/fleet_sim.py: a day of users, simulated GPUs, the event loop.

Workload (``make_day``): ``users`` arrive as a Poisson process over ``day_s`` (24 h,
constant rate). Each picks sdxl with probability ``sdxl_share`` (else sd15), submits one
training at arrival and a first look that depends on it, then asks for
``1 + Poisson(extra_looks_mean)`` looks in all, closed loop: look k+1 is submitted an
exponential think time (mean ``think_mean_s``) after look k finished. The draws are made
up front from one seeded ``random.Random``, so every policy sees the same users, profiles,
look counts and think times; only the submission times of looks 2+ depend on the policy.
A share ``oom_retry_share`` of the sdxl trainings carries an out-of-memory floor of
24 GiB + 1 byte (``min_vram_bytes``, as if it had failed on a 24 GiB card): every row of
the cost table fits a 24 GiB card, so without it the fit rule would never be exercised.

Costs: peak VRAM and seconds from ``core.fleet.costs`` (train: the profile's
``train_steps`` steps; generate: ``CANDIDATES`` x ``inference_steps`` image-steps). Every
GPU runs at the table's speed (it has no per-card figure). Cache misses add time on top,
all assumptions, not measurements: loading a base pipeline the GPU does not hold
(``PIPELINE_LOAD_S``), and a LoRA from VRAM / host RAM / local disk / the blob store
(``LORA_LOAD_S``).

A GPU (``SimGpu``) runs one job at a time with one "next" slot that starts the moment the
running job ends. It keeps base pipelines in an LRU: a job's own pipeline is counted in
its peak, the others (``PIPELINE_BYTES``) stay while they fit beside the job's need
(peak + safety margin), least recently used out first, and an evicted pipeline takes its
profile's VRAM adapters with it. LoRAs sit in three inclusive LRU tiers (VRAM 4, host 80,
disk 640 adapters: ``core.settings``' defaults); a LoRA used moves to the top of every
tier. Training starts by unloading every adapter from VRAM (``core.handlers.train`` does,
they stay in host RAM) and ends with the trained LoRA hot in every tier of its GPU.

Events (``simulate``): arrivals, job ends and look submissions; after each, a scheduler
tick on the next multiple of ``TICK_S`` (0.5 s), where the policy sees the runnable jobs
(a generation only once its training succeeded) and the GPUs and returns placements. A
tick between events would change nothing: nothing frees a slot but a job's end.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

from core.fleet.costs import CostTable, JobShape, load_cost_table
from core.fleet.placement import GIB, GpuView, JobCost, PendingJob, PlacementPolicy, need_bytes
from core.ml.profiles import PROFILES

TICK_S = 0.5
CANDIDATES = 6  # images generated per look (the candidates a look is picked from)
GPU_KINDS = (("rtx4090", 24 * GIB), ("rtx5090", 32 * GIB))
PIPELINE_BYTES = {"sd15": int(2.5 * GIB), "sdxl": 7 * GIB}  # fp16 weights, rounded up
PIPELINE_LOAD_S = {"sd15": 4.0, "sdxl": 8.0}  # from local disk to VRAM: assumed
LORA_LOAD_S = (0.0002, 0.002, 0.020, 0.3)  # found in VRAM, host, disk; else blob store
TIER_SLOTS = (4, 80, 640)  # VRAM adapters, host state dicts, disk files
BLOB = len(TIER_SLOTS)  # the "tier" of a LoRA no local tier holds
OOM_FLOOR_BYTES = 24 * GIB + 1
# Over-commits are judged by atelier's notion of need (peak + 1 GiB margin, the floor).
NEED_POLICY = PlacementPolicy()


@dataclass(frozen=True)
class Workload:
    users: int
    seed: int = 0
    sdxl_share: float = 0.5
    extra_looks_mean: float = 4.0
    think_mean_s: float = 60.0
    day_s: float = 86_400.0
    oom_retry_share: float = 0.05


@dataclass(frozen=True)
class JobSpec:
    id: str
    kind: str  # "train" or "generate"
    user: str
    profile: str
    cost: JobCost
    lora: str  # the LoRA it trains or applies
    min_vram_bytes: int = 0
    look: int = 0  # which of its user's looks (generations)

    @property
    def need(self) -> int:
        return need_bytes(self.pending(0.0), NEED_POLICY)

    def pending(self, since: float) -> PendingJob:
        lora = self.lora if self.kind == "generate" else None
        return PendingJob(self.id, self.kind, self.user, self.profile, self.cost, since,
                          lora=lora, min_vram_bytes=self.min_vram_bytes)  # fmt: skip


@dataclass(frozen=True)
class UserSpec:
    id: str
    arrival: float
    train: JobSpec
    looks: tuple[JobSpec, ...]
    thinks: tuple[float, ...]  # before looks 2.. (one fewer than looks)


def job_costs(table: CostTable, profile: str) -> tuple[JobCost, JobCost]:
    """(training, one look) for a profile, from the cost table."""
    spec = PROFILES[profile]
    train = table.cost(JobShape("train", profile, spec.resolution), spec.train_steps)
    look = JobShape("generate", profile, spec.resolution)
    return train, table.cost(look, CANDIDATES * spec.inference_steps)


def _poisson(rng: random.Random, mean: float) -> int:
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k, p = k + 1, p * rng.random()
    return k


def make_day(w: Workload, table: CostTable | None = None) -> list[UserSpec]:
    table = table or load_cost_table()
    costs = {p: job_costs(table, p) for p in ("sd15", "sdxl")}
    rng = random.Random(w.seed)
    users: list[UserSpec] = []
    at = 0.0
    for n in range(w.users):
        at += rng.expovariate(w.users / w.day_s)
        uid, profile = f"u{n}", "sdxl" if rng.random() < w.sdxl_share else "sd15"
        floor = OOM_FLOOR_BYTES if profile == "sdxl" and rng.random() < w.oom_retry_share else 0
        lora, (train_cost, look_cost) = f"{profile}/{uid}", costs[profile]
        looks = 1 + _poisson(rng, w.extra_looks_mean)
        thinks = tuple(rng.expovariate(1 / w.think_mean_s) for _ in range(looks - 1))
        train = JobSpec(f"{uid}-train", "train", uid, profile, train_cost, lora, floor)
        gens = tuple(JobSpec(f"{uid}-look{i}", "generate", uid, profile, look_cost, lora, 0, i)
                     for i in range(looks))  # fmt: skip
        users.append(UserSpec(uid, at, train, gens, thinks))
    return users


def fleet(size: int) -> list[tuple[str, int]]:
    """``size`` GPUs, alternately RTX 4090 and RTX 5090 (half each)."""
    return [(f"{GPU_KINDS[i % 2][0]}-{i}", GPU_KINDS[i % 2][1]) for i in range(size)]


@dataclass(eq=False)
class Job:
    spec: JobSpec
    ready: float  # submitted and runnable (a look: its training done)
    start: float | None = None
    end_estimate: float | None = None  # what the scheduler sees as busy_until
    end: float | None = None
    gpu: str | None = None
    tier: int | None = None  # where its LoRA was found (looks): 0 VRAM .. BLOB
    base_loaded: bool = False  # its base pipeline had to be loaded
    overcommit: bool = False
    refused: bool = False
    affinity_wait: bool = False  # queued behind a LoRA holder while a fitting GPU idled
    # A training that yielded its GPU to a look: work left, times, and waits since.
    remaining_s: float | None = None
    preemptions: int = 0
    requeued_at: float | None = None
    requeued_wait_s: float = 0.0
    pending: PendingJob = field(init=False)

    def __post_init__(self) -> None:
        self.pending = self.spec.pending(self.ready)

    @property
    def waited_s(self) -> float:
        """Queue time: before its first start, and after each preemption."""
        return (self.start or 0.0) - self.ready + self.requeued_wait_s


class SimGpu:
    def __init__(self, worker_id: str, vram: int) -> None:
        self.worker_id, self.vram = worker_id, vram
        self.pipelines: OrderedDict[str, None] = OrderedDict()
        self.tiers: tuple[OrderedDict[str, None], ...] = tuple(OrderedDict() for _ in TIER_SLOTS)
        self.running: Job | None = None
        self.next: Job | None = None
        self.yielding = False  # its training was asked to yield to the next job
        self.epoch = 0  # bumped at each start: a preempted job's finish event is stale
        self.busy_s = 0.0
        # ("clear" | "train" | "look", LoRA) in run order: a training's start unloads
        # every adapter, its end leaves its LoRA resident, a look asks for its LoRA.
        self.sequence: list[tuple[str, str]] = []
        self._view: GpuView | None = None

    @property
    def idle(self) -> bool:
        return self.running is None and self.next is None

    def tier_of(self, lora: str) -> int:
        return next((i for i, tier in enumerate(self.tiers) if lora in tier), BLOB)

    def touch(self, lora: str) -> None:
        for tier, slots in zip(self.tiers, TIER_SLOTS, strict=True):
            tier[lora] = None
            tier.move_to_end(lora)
            while len(tier) > slots:
                tier.popitem(last=False)

    def _make_room(self, job: Job) -> bool:
        """Keep the job's pipeline resident and the others that fit beside it; True if
        it had to be loaded."""
        profile, loaded = job.spec.profile, job.spec.profile not in self.pipelines
        self.pipelines[profile] = None
        self.pipelines.move_to_end(profile)
        others = [p for p in self.pipelines if p != profile]  # least recent first
        while others and job.spec.need + sum(PIPELINE_BYTES[p] for p in others) > self.vram:
            gone = others.pop(0)
            del self.pipelines[gone]
            for lora in [x for x in self.tiers[0] if x.startswith(f"{gone}/")]:
                del self.tiers[0][lora]
        return loaded

    def start(self, job: Job, now: float) -> float:
        """Run ``job`` from ``now``; its duration, cache misses included."""
        self.running, self._view, self.epoch = job, None, self.epoch + 1
        if job.requeued_at is None:
            job.start = now
        else:  # a preempted training resumes from its checkpoint
            job.requeued_wait_s += now - job.requeued_at
            job.requeued_at = None
        job.gpu = self.worker_id
        job.overcommit = job.overcommit or job.spec.need > self.vram
        job.base_loaded = self._make_room(job)
        work = job.spec.cost.seconds if job.remaining_s is None else job.remaining_s
        seconds = work + (PIPELINE_LOAD_S[job.spec.profile] if job.base_loaded else 0)
        if job.spec.kind == "train":
            self.tiers[0].clear()  # training unloads every adapter
            self.sequence.append(("clear", ""))
        else:
            job.tier = self.tier_of(job.spec.lora)
            seconds += LORA_LOAD_S[job.tier]
            self.sequence.append(("look", job.spec.lora))
            self.touch(job.spec.lora)
        self.busy_s += seconds
        job.end_estimate = now + seconds
        return seconds

    def finish(self, now: float) -> Job:
        job, self.running, self._view = self.running, None, None
        assert job is not None
        job.end = now
        if job.spec.kind == "train":
            self.sequence.append(("train", job.spec.lora))
            self.touch(job.spec.lora)
        return job

    def queue(self, job: Job) -> None:
        assert self.running is not None and self.next is None, "next on a GPU not running"
        self.next, self._view = job, None

    def yield_running(self, now: float) -> Job:
        """The running training stops at a checkpoint and goes back to the queue with
        the work it had left."""
        job, self.running, self._view, self.yielding = self.running, None, None, False
        assert job is not None and job.end_estimate is not None
        job.remaining_s = max(0.0, job.end_estimate - now)
        self.busy_s -= job.remaining_s  # counted at its start, not done here
        job.preemptions += 1
        job.requeued_at = now
        cost = JobCost(job.spec.cost.peak_vram_bytes, job.remaining_s)
        job.pending = replace(job.pending, cost=cost)
        return job

    def forget_view(self) -> None:
        self._view = None

    def view(self) -> GpuView:
        """This GPU as the scheduler sees it (rebuilt only after a change)."""
        if self._view is None:
            running, nxt = self.running, self.next
            vram, host, disk = (frozenset(tier) for tier in self.tiers)
            training = running is not None and running.spec.kind == "train"
            self._view = GpuView(
                self.worker_id, self.vram, frozenset(self.pipelines), vram, host, disk,
                running_account=running.spec.user if running else None,
                busy_until=running.end_estimate if running else None,
                next_account=nxt.spec.user if nxt else None,
                preemptible_job=running.spec.id if running and training and not self.yielding
                else None,
            )  # fmt: skip
        return self._view


@dataclass(frozen=True)
class Decision:
    job: Job
    gpu: SimGpu | None  # None: refused
    starts_now: bool = True
    preempts: bool = False  # the GPU's running training yields to this job


class Policy(Protocol):
    name: str

    def decide(self, pending: list[Job], gpus: list[SimGpu], now: float) -> list[Decision]: ...


ARRIVE, FINISH, YIELD, LOOK, TICK = range(5)  # at equal times, a tick comes last
# A training asked to yield stops at its next step, after writing a checkpoint.
YIELD_S = 2.0


@dataclass
class Run:
    policy: str
    jobs: list[Job]
    gpus: list[SimGpu]
    decide_s: float  # wall time inside the policy
    ticks: int


class _Engine:
    def __init__(self, users: list[UserSpec], gpus: list[SimGpu], policy: Policy) -> None:
        self.users = {u.id: u for u in users}
        self.gpus, self.policy = gpus, policy
        self.events: list[tuple[float, int, int, object]] = []
        self.pending: dict[str, Job] = {}  # runnable, in the order they became so
        self.jobs: list[Job] = []
        self.ticks: set[float] = set()
        self.now, self.seq, self.decide_s, self.tick_count = 0.0, 0, 0.0, 0

    def push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, payload))

    def ready(self, spec: JobSpec) -> None:
        job = Job(spec, self.now)
        self.jobs.append(job)
        self.pending[spec.id] = job
        self.ready_tick()

    def start(self, gpu: SimGpu, job: Job) -> None:
        seconds = gpu.start(job, self.now)
        self.push(self.now + seconds, FINISH, (gpu, gpu.epoch))

    def on_yield(self, gpu: SimGpu) -> None:
        job = gpu.yield_running(self.now)
        self.pending[job.spec.id] = job
        nxt, gpu.next = gpu.next, None
        assert nxt is not None
        self.start(gpu, nxt)
        self.ready_tick()

    def on_finish(self, gpu: SimGpu, epoch: int) -> None:
        if epoch != gpu.epoch or gpu.running is None:
            return  # the job it announced yielded its GPU before the end
        job = gpu.finish(self.now)
        user = self.users[job.spec.user]
        if job.spec.kind == "train":
            self.ready(user.looks[0])
        else:
            n = job.spec.look + 1
            if n < len(user.looks):
                self.push(self.now + user.thinks[n - 1], LOOK, user.looks[n])
        if gpu.next is not None:
            nxt, gpu.next = gpu.next, None
            self.start(gpu, nxt)
        self.ready_tick()

    def ready_tick(self) -> None:
        tick = math.ceil(self.now / TICK_S - 1e-9) * TICK_S
        if self.pending and tick not in self.ticks:
            self.ticks.add(tick)
            self.push(tick, TICK, None)

    def on_tick(self) -> None:
        self.ticks.discard(self.now)
        if not self.pending:
            return
        self.tick_count += 1
        began = time.perf_counter()
        decisions = self.policy.decide(list(self.pending.values()), self.gpus, self.now)
        self.decide_s += time.perf_counter() - began
        for d in decisions:
            del self.pending[d.job.spec.id]
            if d.gpu is None:
                d.job.refused = True
            elif d.starts_now:
                assert d.gpu.idle, f"{d.job.spec.id} started on busy {d.gpu.worker_id}"
                self.start(d.gpu, d.job)
            else:
                d.gpu.queue(d.job)
                if d.preempts:
                    d.gpu.yielding = True
                    d.gpu.forget_view()
                    self.push(self.now + YIELD_S, YIELD, d.gpu)

    def run(self) -> Run:
        for user in self.users.values():
            self.push(user.arrival, ARRIVE, user)
        while self.events:
            self.now, kind, _, payload = heapq.heappop(self.events)
            if kind == ARRIVE:
                assert isinstance(payload, UserSpec)
                self.ready(payload.train)
            elif kind == FINISH:
                assert isinstance(payload, tuple)
                self.on_finish(*payload)
            elif kind == YIELD:
                assert isinstance(payload, SimGpu)
                self.on_yield(payload)
            elif kind == LOOK:
                assert isinstance(payload, JobSpec)
                self.ready(payload)
            else:
                self.on_tick()
        return Run(self.policy.name, self.jobs, self.gpus, self.decide_s, self.tick_count)


def simulate(users: list[UserSpec], gpus: list[tuple[str, int]], policy: Policy) -> Run:
    """One day of ``users`` on a fresh fleet under ``policy``."""
    return _Engine(users, [SimGpu(w, v) for w, v in gpus], policy).run()
