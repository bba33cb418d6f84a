"""What a GPU worker holds, for the inventory its heartbeat publishes
(core.fleet.workers.Inventory): the base pipelines and LoRAs resident in this
process, the device's free memory, and when the running job should end."""

from __future__ import annotations

from datetime import datetime, timedelta

from core.db.models import utcnow
from core.fleet.device import Device
from core.fleet.workers import Inventory
from core.jobs.execution import Executor
from core.ml.resident import held_pipelines, lora_inventory
from core.settings import Settings


def busy_until(executor: Executor, now: datetime) -> datetime | None:
    """The running job's expected end: its progress's ETA when it reports one,
    else its start plus the seconds it was placed with."""
    ctx = executor.current
    if ctx is None:
        return None
    eta = ctx.progress.snapshot().detail.get("eta_s")
    if eta is not None:
        return now + timedelta(seconds=float(eta))
    placed = float((ctx.job.placement or {}).get("seconds", 0.0))
    started = ctx.job.started_at or now
    return max(now, started + timedelta(seconds=placed))


def gpu_inventory(settings: Settings, memory: Device, executor: Executor) -> Inventory:
    """Waits for a LoRA switch in progress (milliseconds): call it off the event loop.
    Stamped before anything is read, so a snapshot published late never passes for
    newer than one taken after it."""
    taken = utcnow()
    pipelines = held_pipelines()
    held = sum(nbytes for _, nbytes in pipelines)
    return Inventory(
        vram_free_bytes=memory.free_bytes(held),
        profiles=[profile for profile, _ in pipelines],
        loras=lora_inventory(settings).tiers(),
        busy_until=busy_until(executor, taken),
        taken_at=taken,
    )
