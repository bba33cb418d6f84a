"""A training process's memory, read the same way on both sides of
bench/dreambooth_vs_reference.py (atelier's process imports it; so does the wrapper
that runs diffusers' reference script).

Host memory comes from /proc/self/status: the resident set, its peak (VmHWM) and
what it is made of, anonymous (allocated) and file-backed (mapped files: weights
loaded without a copy, shared libraries). On a CUDA host the device's peak of
allocated memory joins it. ``reset_peaks`` restarts both peaks, so a peak read later
is what happened since (the training's own, not the model load's).
"""

from __future__ import annotations

from pathlib import Path

import torch

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
CUDA_PEAK = "CudaPeak"  # torch.cuda.max_memory_allocated, bytes


def process_memory() -> dict[str, int]:
    memory: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            memory[key] = int(value.split()[0]) * 1024
    if torch.cuda.is_available():
        memory[CUDA_PEAK] = torch.cuda.max_memory_allocated()
    return memory


def reset_peaks() -> None:
    # Linux: "5" to clear_refs sets VmHWM (and the rusage peak) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
