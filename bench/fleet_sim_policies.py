"""The placement policies bench/fleet_sim.py compares, all on the same simulated GPUs.

- ``Atelier``: the real ``core.fleet.placement.place`` (imported, never copied), fed
  ``GpuView``s built from the simulated GPUs and ``PendingJob``s whose ``waiting_since`` is
  when the job became runnable. A tick where no GPU could take a job (none idle, none
  running without a next job) and no job is too big for the fleet skips the call: ``place``
  would return nothing.
- ``FifoRoundRobin``: runnable jobs in the order they became runnable; each goes to the
  next GPU in turn (a pointer that moves past the GPU taken) that is idle and whose VRAM
  covers the job's need; a job no idle GPU fits is skipped this tick (it does not block
  the jobs behind it). No next slot: a GPU gets a job only when idle.
- ``RayServeMultiplex``: Ray Serve's model multiplexing (``serve.multiplexed``,
  ``max_num_models_per_replica=3``): each replica (GPU) keeps an LRU of the 3 model ids
  (LoRAs) it last served; a request goes, in FIFO order, to the least loaded replica
  among those holding its LoRA, else to the least loaded replica. A replica takes up to 2
  requests (running + one queued). Routing knows
  nothing of VRAM (a replica is one GPU), so a job too big for a card can land on it:
  the simulator counts it as an over-commit and runs it as if it fit. Trainings carry no
  model id; a trained LoRA is not in the router's list until a look was routed there.
  Ray's router samples two replicas ("power of two choices"); taking the least loaded of
  all is the kinder, deterministic version.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from bench.fleet_sim_model import Decision, Job, SimGpu
from core.fleet.placement import Placement, PlacementPolicy, Reason, need_bytes, place

_AFFINITY = {Reason.lora_vram, Reason.lora_host, Reason.lora_disk}


@dataclass
class Atelier:
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    name: str = "atelier"
    calls: int = 0

    def _may_place(self, pending: list[Job], gpus: list[SimGpu]) -> bool:
        open_slot = any(g.running is None or (self.policy.queue_next and g.next is None)
                        or g.view().preemptible_job is not None for g in gpus)  # fmt: skip
        largest = max((g.vram for g in gpus), default=0)
        return open_slot or any(need_bytes(j.pending, self.policy) > largest for j in pending)

    def decide(self, pending: list[Job], gpus: list[SimGpu], now: float) -> list[Decision]:
        placements = self._place(pending, gpus, now) if self._may_place(pending, gpus) else []
        jobs = {j.spec.id: j for j in pending}
        by_worker = {g.worker_id: g for g in gpus}
        self._flag(placements, jobs, gpus)
        return [Decision(jobs[p.job_id], by_worker[p.worker_id] if p.worker_id else None,
                         p.starts_now, p.preempts is not None) for p in placements]  # fmt: skip

    def _place(self, pending: list[Job], gpus: list[SimGpu], now: float) -> list[Placement]:
        self.calls += 1
        return place([j.pending for j in pending], [g.view() for g in gpus], now, self.policy)

    def _flag(self, placements: list[Placement], jobs: dict[str, Job], gpus: list[SimGpu]) -> None:
        """Mark the looks queued behind a LoRA holder while a GPU that fits them was idle
        (they could have started at once)."""
        idle = [g.vram for g in gpus if g.idle]
        for p in placements:
            job = jobs[p.job_id]
            if not p.starts_now and p.reason in _AFFINITY:
                job.affinity_wait = any(v >= need_bytes(job.pending, self.policy) for v in idle)


@dataclass
class FifoRoundRobin:
    name: str = "FIFO round-robin"
    turn: int = 0

    def decide(self, pending: list[Job], gpus: list[SimGpu], now: float) -> list[Decision]:
        free = [g.idle for g in gpus]
        largest = max((g.vram for g in gpus), default=0)
        out: list[Decision] = []
        for job in pending:
            need = job.spec.need
            if need > largest:
                out.append(Decision(job, None))
                continue
            if not any(free):
                break
            for k in range(len(gpus)):
                i = (self.turn + k) % len(gpus)
                if free[i] and gpus[i].vram >= need:
                    out.append(Decision(job, gpus[i]))
                    free[i], self.turn = False, i + 1
                    break
        return out


@dataclass
class RayServeMultiplex:
    name: str = "Ray Serve multiplex"
    max_models: int = 3  # serve.multiplexed(max_num_models_per_replica=3)
    max_ongoing: int = 2
    models: dict[str, OrderedDict[str, None]] = field(default_factory=dict)

    def decide(self, pending: list[Job], gpus: list[SimGpu], now: float) -> list[Decision]:
        load = {g.worker_id: (g.running is not None) + (g.next is not None) for g in gpus}
        out: list[Decision] = []
        for job in pending:
            open_ = [g for g in gpus if load[g.worker_id] < self.max_ongoing]
            if not open_:
                break
            lora = job.spec.lora if job.spec.kind == "generate" else None
            holding = [g for g in open_ if lora in self.models.get(g.worker_id, {})]
            gpu = min(holding or open_, key=lambda g: load[g.worker_id])
            out.append(Decision(job, gpu, starts_now=load[gpu.worker_id] == 0))
            load[gpu.worker_id] += 1
            if lora is not None:
                self._served(gpu.worker_id, lora)
        return out

    def _served(self, worker: str, lora: str) -> None:
        lru = self.models.setdefault(worker, OrderedDict())
        lru[lora] = None
        lru.move_to_end(lora)
        while len(lru) > self.max_models:
            lru.popitem(last=False)
