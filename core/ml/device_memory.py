"""A real CUDA device for the job machinery (core.fleet.device.Device): the peak a
job allocated (``torch.cuda.max_memory_allocated``, reset before each job) and the
free memory the driver reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CudaDevice:
    device: str  # cuda:0
    total_bytes: int

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self, expected: int) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def free_bytes(self, held: int) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def check_fits(self, expected: int) -> None:
        return None  # a real device fails on its own, with torch.cuda.OutOfMemoryError
