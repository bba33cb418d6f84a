"""The device a GPU worker drives, as the job machinery sees it: its size, the peak
a job reached on it, and whether a failure was the device running out of memory.

``DeclaredDevice`` is a CPU host standing in for a GPU (``--name rtx4090 --vram
24GiB`` in dev and CI): it measures nothing, so a job's peak is the one it was
placed with, and ``usable_bytes`` (``--oom-above``) makes it fail like a real GPU
would when a job's expected peak exceeds what it really has, which is how tests
drive the out-of-memory path. ``core.ml.device_memory.CudaDevice`` measures a real
one. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.errors import OutOfDeviceMemory

# torch.cuda.OutOfMemoryError, named without importing torch.
_TORCH_OOM = ("OutOfMemoryError", "torch")


class Device(Protocol):
    total_bytes: int

    def reset_peak(self) -> None: ...

    def peak_bytes(self, expected: int) -> int:
        """The peak since ``reset_peak`` (``expected``: what the job was placed with)."""
        ...

    def free_bytes(self, held: int) -> int:
        """Free device memory now (``held``: what the worker's resident models take)."""
        ...

    def check_fits(self, expected: int) -> None:
        """Raise OutOfDeviceMemory before a job that cannot fit starts."""
        ...


@dataclass
class DeclaredDevice:
    total_bytes: int
    usable_bytes: int | None = None  # less than declared: jobs above it run out of memory

    def reset_peak(self) -> None:
        return None

    def peak_bytes(self, expected: int) -> int:
        """The job's peak: a CPU host has no device memory to measure."""
        return expected

    def free_bytes(self, held: int) -> int:
        return max(0, self.total_bytes - held)

    def check_fits(self, expected: int) -> None:
        if self.usable_bytes is not None and expected > self.usable_bytes:
            raise OutOfDeviceMemory(
                f"expected peak {expected / 2**30:.1f} GiB is more than the "
                f"{self.usable_bytes / 2**30:.1f} GiB this device really has"
            )


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, OutOfDeviceMemory):
        return True
    kind = type(exc)
    return kind.__name__ == _TORCH_OOM[0] and kind.__module__.startswith(_TORCH_OOM[1])
