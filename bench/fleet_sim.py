"""GPU placement in a discrete-event simulation: atelier's ``place`` beside FIFO and Ray Serve.

One synthetic day per fleet (1 RTX 4090 + 1 RTX 5090; then 8 and 32 GPUs, half each,
with proportionally more users), the same users (same seed) under every policy:

- atelier: the real ``core.fleet.placement.place`` with ``PlacementPolicy()``;
- FIFO round-robin: arrival order, the next idle GPU in turn that fits (a job too big
  for that GPU skips to the next fitting idle one; it never blocks the queue);
- Ray Serve-style multiplexing: the replica that holds the LoRA (LRU of 3), else the
  least loaded, FIFO order, VRAM-blind;
- atelier variant (``--variants``, on by default): without the affinity wait (a look
  never queued behind the busy GPU holding its LoRA), to show what that rule costs or
  wins; and without preemption (a look that waited ``preempt_after_s`` takes a GPU
  from a training, which yields at its next step after a checkpoint, ``YIELD_S``, and
  resumes later with the work it had left). (An earlier ``place`` also queued any job
  "next" behind the GPU that freed first; this simulation measured looks waiting
  behind 10-minute trainings because of it, and that rule was dropped.)
- lower bounds: makespan >= max(total work / GPUs, the longest user's chain: arrival,
  training, looks and think times in a row); waits >= 0; and Belady's optimal cache.

The workload, the cache and cost model (``bench/fleet_sim_model.py``) and the policies
(``bench/fleet_sim_policies.py``) are documented in their modules; in short: Poisson
arrivals over 24 h, one training then 1 + Poisson(4) looks per user with exponential
60 s think times (closed loop), costs from ``core/fleet/cost_table.json``, assumed cache
miss costs (base pipeline sd15 4 s / sdxl 8 s; LoRA from VRAM 0.2 ms, host 2 ms, disk
20 ms, blob store 0.3 s), LoRA tiers of 4 / 80 / 640 adapters per GPU (LRU each), one
job running per GPU (and one next, only where a policy queues one), a scheduler tick
every 0.5 s after any event.

Measures per policy: queue wait (from becoming runnable: submitted, or for a look its
training done; to start) p50 / p95 for looks and trainings apart; GPU utilization (busy
seconds, cache misses included, over GPUs x makespan); makespan (first arrival at 0 to
the last job's end); LoRA hit rate of looks (found in any local tier / in VRAM); VRAM
over-commits (a job started on a GPU whose VRAM is below its need: peak + 1 GiB margin,
or its out-of-memory floor), counted for every policy.

Belady: for each GPU, the sequence of LoRA events the policy's run produced there, in
run order: a look asks for its LoRA, a training empties the VRAM tier and leaves its own
LoRA in it. Belady's MIN (on a miss with the tier full, evict the adapter asked for
again farthest in the future; a look always loads its LoRA) gives the most VRAM hits any
eviction could get on that sequence with 4 slots. It is optimal for the placement that
produced the sequence, not over all placements. The target compares atelier's VRAM hit
rate with Belady's on atelier's own sequences.

Scaling: ``place`` on 2 / 20 / 200 / 2,000 simulated GPUs (half idle, a quarter running,
a quarter running with a next job; each holding 200 LoRAs from a pool) and 10,000
queued jobs (80% looks, 20% trainings): wall time of ``place`` per placed job
(``perf_counter``) and scheduler CPU per placed job (``process_time`` of building the
views plus ``place``), median of ``--repeats``.

    .venv/bin/python -m bench.fleet_sim [--users 200] [--seed 0] [--fleets 2,8,32]
        [--scaling-gpus 2,20,200,2000] [--queued 10000] [--repeats 5] [--no-variants]

``--users`` is the 2-GPU fleet's; a fleet of n GPUs gets users x n / 2. Prints markdown
tables and writes bench/results/fleet_sim.json.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.fleet_sim_model import (
    BLOB,
    LORA_LOAD_S,
    PIPELINE_LOAD_S,
    TICK_S,
    TIER_SLOTS,
    Job,
    JobSpec,
    Policy,
    Run,
    SimGpu,
    UserSpec,
    Workload,
    fleet,
    job_costs,
    make_day,
    simulate,
)
from bench.fleet_sim_policies import Atelier, FifoRoundRobin, RayServeMultiplex
from bench.results_file import write_result
from core.fleet.costs import load_cost_table
from core.fleet.placement import GIB, PendingJob, PlacementPolicy, place

FIFO, RAY, ATELIER = "FIFO round-robin", "Ray Serve multiplex", "atelier"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def belady_hits(sequence: list[tuple[str, str]], slots: int = TIER_SLOTS[0]) -> tuple[int, int]:
    """(VRAM hits, looks) of Belady's MIN on one GPU's sequence (module docstring)."""
    never = math.inf
    next_use: list[float] = [never] * len(sequence)
    seen: dict[str, float] = {}
    for i in range(len(sequence) - 1, -1, -1):
        next_use[i] = seen.get(sequence[i][1], never)
        seen[sequence[i][1]] = i
    cache: dict[str, float] = {}
    hits = looks = 0
    for i, (op, lora) in enumerate(sequence):
        if op == "clear":  # a training started (or resumed): every adapter unloaded
            cache = {}
            continue
        if op == "train":
            cache = {}
        else:
            looks += 1
            hits += lora in cache
            if lora not in cache and len(cache) >= slots:
                del cache[max(cache, key=cache.__getitem__)]
        cache[lora] = next_use[i]
    return hits, looks


@dataclass
class Stats:
    policy: str
    look_p50_s: float
    look_p95_s: float
    train_p50_s: float
    train_p95_s: float
    utilization: float
    makespan_s: float
    hit_any: float
    hit_vram: float
    belady_vram: float
    overcommits: int
    refused: int
    jobs_done: int
    looks: int
    affinity_waits: int
    affinity_wait_p50_s: float
    preemptions: int  # trainings that yielded their GPU to a look
    preempted_extra_wait_p95_s: float  # queue time those trainings spent after yielding
    decide_ms_per_tick: float
    ticks: int


def stats(run: Run) -> Stats:
    done = [j for j in run.jobs if j.end is not None]
    looks = [j for j in done if j.spec.kind == "generate"]
    trains = [j for j in done if j.spec.kind == "train"]
    wait = lambda jobs: [j.waited_s for j in jobs]  # noqa: E731
    makespan = max((j.end or 0.0) for j in done) if done else 0.0
    busy = sum(g.busy_s for g in run.gpus)
    hits, asked = map(sum, zip(*(belady_hits(g.sequence) for g in run.gpus), strict=True))
    waited = [j for j in looks if j.affinity_wait]
    preempted = [j for j in trains if j.preemptions]
    return Stats(
        policy=run.policy,
        look_p50_s=percentile(wait(looks), 0.5),
        look_p95_s=percentile(wait(looks), 0.95),
        train_p50_s=percentile(wait(trains), 0.5),
        train_p95_s=percentile(wait(trains), 0.95),
        utilization=busy / (len(run.gpus) * makespan) if makespan else 0.0,
        makespan_s=makespan,
        hit_any=_share(looks, lambda j: (j.tier or 0) < BLOB),
        hit_vram=_share(looks, lambda j: j.tier == 0),
        belady_vram=hits / asked if asked else 0.0,
        overcommits=sum(j.overcommit for j in run.jobs),
        refused=sum(j.refused for j in run.jobs),
        jobs_done=len(done),
        looks=len(looks),
        affinity_waits=len(waited),
        affinity_wait_p50_s=percentile(wait(waited), 0.5),
        preemptions=sum(j.preemptions for j in trains),
        preempted_extra_wait_p95_s=percentile([j.requeued_wait_s for j in preempted], 0.95),
        decide_ms_per_tick=1e3 * run.decide_s / max(1, run.ticks),
        ticks=run.ticks,
    )


def _share(jobs: list[Job], hit: Callable[[Job], bool]) -> float:
    return sum(1 for j in jobs if hit(j)) / len(jobs) if jobs else 0.0


def bounds(users: list[UserSpec], gpus: int, day_s: float) -> dict[str, float]:
    work = sum(u.train.cost.seconds + sum(g.cost.seconds for g in u.looks) for u in users)
    chain = max(
        (u.arrival + u.train.cost.seconds + sum(g.cost.seconds for g in u.looks) + sum(u.thinks)
         for u in users), default=0.0)  # fmt: skip
    return {"work_s": work, "offered_load": work / (gpus * day_s), "work_per_gpu_s": work / gpus,
            "longest_chain_s": chain, "makespan_lb_s": max(work / gpus, chain)}  # fmt: skip


def policies(variants: bool) -> list[Policy]:
    out: list[Policy] = [Atelier(), FifoRoundRobin(), RayServeMultiplex()]
    if variants:
        # Without waiting behind a busy GPU that holds the LoRA (the one case a job is
        # queued next): what the affinity wait buys, and what it costs.
        out.append(Atelier(PlacementPolicy(queue_next=False), name="atelier, no affinity wait"))
        out.append(Atelier(PlacementPolicy(preempt_after_s=None), name="atelier, no preemption"))
    return out


def run_fleet(size: int, w: Workload, variants: bool) -> dict[str, Any]:
    users = make_day(w)
    n_jobs = sum(1 + len(u.looks) for u in users)
    out: dict[str, Any] = {"gpus": size, "users": w.users, "jobs": n_jobs,
                           "bounds": bounds(users, size, w.day_s), "policies": {}}  # fmt: skip
    for policy in policies(variants):
        began = time.perf_counter()
        s = stats(simulate(users, fleet(size), policy))
        out["policies"][s.policy] = {**asdict(s), "sim_s": time.perf_counter() - began}
        print(f"  {size:>3} GPUs  {s.policy:<26} {time.perf_counter() - began:6.1f} s", flush=True)
    return out


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, atelier's figure, met); None where FIFO's p95 is one tick, so that a
    third of it cannot be told apart."""
    p = r["policies"]
    a, f, ray = p[ATELIER], p[FIFO], p[RAY]
    gap = 100 * (a["belady_vram"] - a["hit_vram"])
    third = a["look_p95_s"] <= f["look_p95_s"] / 3 if f["look_p95_s"] > TICK_S else None
    return [
        ("look p95 <= FIFO's / 3", f"{a['look_p95_s']:.1f} s vs {f['look_p95_s'] / 3:.1f} s",
         third),
        ("look p95 < Ray Serve's", f"{a['look_p95_s']:.1f} s vs {ray['look_p95_s']:.1f} s",
         a["look_p95_s"] < ray["look_p95_s"]),
        ("VRAM hit rate within 5 points of Belady", f"{gap:.1f} points below", gap <= 5),
        ("zero over-commits", str(a["overcommits"]), a["overcommits"] == 0),
        ("every job done", f"{a['jobs_done']} / {r['jobs']}", a["jobs_done"] == r["jobs"]),
    ]  # fmt: skip


# --- scaling ------------------------------------------------------------------------


def scaling_state(size: int, queued: int, seed: int) -> tuple[list[SimGpu], list[PendingJob]]:
    """``size`` GPUs in mixed states and ``queued`` waiting jobs (module docstring)."""
    rng, now = random.Random(seed), 10_000.0
    table = load_cost_table()
    costs = {p: job_costs(table, p) for p in ("sd15", "sdxl")}
    pool = max(1000, 50 * size)
    lora = lambda n: f"{('sd15', 'sdxl')[n % 2]}/u{n}"  # noqa: E731
    gpus: list[SimGpu] = []
    for i, (worker, vram) in enumerate(fleet(size)):
        gpu = SimGpu(worker, vram)
        for profile in (("sd15",), ("sdxl",), ("sd15", "sdxl"))[i % 3]:
            gpu.pipelines[profile] = None
        for _ in range(200):
            gpu.touch(lora(rng.randrange(pool)))
        for slot in ("running", "next")[: max(0, i % 4 - 1)]:
            spec = JobSpec(f"{worker}-{slot}", "train", f"r{i}", "sd15", costs["sd15"][0], "")
            job = Job(spec, now)
            job.end_estimate = now + rng.uniform(0, 600)
            setattr(gpu, slot, job)
        gpus.append(gpu)
    pending = []
    for n in range(queued):
        user = rng.randrange(pool)
        profile, kind = ("sd15", "sdxl")[user % 2], "train" if rng.random() < 0.2 else "generate"
        cost = costs[profile][kind == "generate"]
        pending.append(PendingJob(f"q{n}", kind, f"u{user}", profile, cost,
                                  now - rng.uniform(0, 900),
                                  lora=lora(user) if kind == "generate" else None))  # fmt: skip
    return gpus, pending


def time_place(size: int, queued: int, repeats: int, seed: int) -> dict[str, float]:
    gpus, pending = scaling_state(size, queued, seed)
    walls, cpus, placed = [], [], 0
    for _ in range(repeats):
        for gpu in gpus:
            gpu.forget_view()
        cpu0 = time.process_time()
        views = [g.view() for g in gpus]
        wall0 = time.perf_counter()
        placements = place(pending, views, 10_000.0, PlacementPolicy())
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
        placed = len(placements)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"gpus": size, "queued": queued, "placed": placed, "place_ms": 1e3 * wall,
            "decision_us": 1e6 * wall / max(1, placed),
            "cpu_us_per_job": 1e6 * cpu / max(1, placed)}  # fmt: skip


# --- report -------------------------------------------------------------------------


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def print_costs() -> None:
    table = load_cost_table()
    parts = []
    for profile in ("sd15", "sdxl"):
        train, look = job_costs(table, profile)
        gib = train.peak_vram_bytes / GIB, look.peak_vram_bytes / GIB
        parts.append(f"{profile} training {train.seconds:.0f} s / {gib[0]:.0f} GiB, "
                     f"look {look.seconds:.1f} s / {gib[1]:.0f} GiB")  # fmt: skip
    print(f"\ncosts (cost table): {'; '.join(parts)}; cache misses (assumed): base pipeline "
          f"{PIPELINE_LOAD_S}, LoRA VRAM/host/disk/blob {LORA_LOAD_S} s")  # fmt: skip


def print_fleet_tables(results: list[dict[str, Any]]) -> None:
    print(
        "\n| GPUs | users | jobs | offered load | work / GPUs h | longest chain h "
        "| makespan bound h |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        b = r["bounds"]
        print(f"| {r['gpus']} | {r['users']} | {r['jobs']} | {b['offered_load']:.0%} "
              f"| {_h(b['work_per_gpu_s'])} | {_h(b['longest_chain_s'])} "
              f"| {_h(b['makespan_lb_s'])} |")  # fmt: skip
    print(
        "\n| GPUs | policy | look p50 s | look p95 s | train p50 s | train p95 s | util "
        "| makespan h | LoRA hit any | LoRA hit VRAM | Belady VRAM | over-commits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for name, s in r["policies"].items():
            print(f"| {r['gpus']} | {name} | {s['look_p50_s']:.1f} | {s['look_p95_s']:.1f} "
                  f"| {s['train_p50_s']:.0f} | {s['train_p95_s']:.0f} | {s['utilization']:.0%} "
                  f"| {_h(s['makespan_s'])} | {s['hit_any']:.1%} | {s['hit_vram']:.1%} "
                  f"| {s['belady_vram']:.1%} | {s['overcommits']} |")  # fmt: skip


def print_details(results: list[dict[str, Any]]) -> None:
    print(
        "\nAtelier's looks: queued behind a LoRA holder while a GPU that fits was idle "
        "(affinity), and trainings that yielded their GPU to a look (preemption):\n"
    )
    print(
        "| GPUs | policy | looks | affinity waits | their p50 wait s | trainings preempted "
        "| their extra wait p95 s | ticks with jobs waiting | ms per tick |\n" + "|---" * 9 + "|"
    )
    for r in results:
        for name, s in r["policies"].items():
            if name.startswith(ATELIER):
                print(f"| {r['gpus']} | {name} | {s['looks']} | {s['affinity_waits']} "
                      f"| {s['affinity_wait_p50_s']:.1f} | {s['preemptions']} "
                      f"| {s['preempted_extra_wait_p95_s']:.0f} | {s['ticks']} "
                      f"| {s['decide_ms_per_tick']:.2f} |")  # fmt: skip
    print("\n| GPUs | target | atelier | met |\n|---|---|---|---|")
    for r in results:
        for name, value, met in targets(r):
            verdict = "n/a (one tick)" if met is None else "yes" if met else "NO"
            print(f"| {r['gpus']} | {name} | {value} | {verdict} |")


def print_scaling(rows: list[dict[str, float]]) -> None:
    print(
        "\n| GPUs | queued | placed | place ms | decision µs / placed job "
        "| scheduler CPU µs / placed job |\n|---|---|---|---|---|---|"
    )
    for s in rows:
        print(f"| {s['gpus']:,} | {s['queued']:,} | {s['placed']:,} | {s['place_ms']:.1f} "
              f"| {s['decision_us']:.1f} | {s['cpu_us_per_job']:.1f} |")  # fmt: skip
    big = [s for s in rows if s["gpus"] >= 2000]
    for s in big:
        met = s["decision_us"] < 1000
        print(
            f"\ntarget: under 1 ms a decision at {s['gpus']:,} GPUs: "
            f"{s['decision_us'] / 1e3:.3f} ms, {'met' if met else 'NOT met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim")
    parser.add_argument("--users", type=int, default=200, help="users of the 2-GPU fleet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fleets", default="2,8,32")
    parser.add_argument("--scaling-gpus", default="2,20,200,2000")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-variants", dest="variants", action="store_false")
    args = parser.parse_args()

    began = time.perf_counter()
    results = []
    for size in (int(s) for s in args.fleets.split(",")):
        w = Workload(users=args.users * size // 2, seed=args.seed)
        results.append(run_fleet(size, w, args.variants))
    scaling = [time_place(int(n), args.queued, args.repeats, args.seed)
               for n in args.scaling_gpus.split(",")]  # fmt: skip
    print_costs()
    print_fleet_tables(results)
    print_details(results)
    print_scaling(scaling)
    total = time.perf_counter() - began
    print(f"\nwhole run {total:.0f} s")
    write_result("fleet_sim", {"args": vars(args), "workload": asdict(Workload(args.users)),
                               "fleets": results, "scaling": scaling, "total_s": total,
                               "targets": {r["gpus"]: targets(r) for r in results}})  # fmt: skip


if __name__ == "__main__":
    main()
