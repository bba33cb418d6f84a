"""Several profiles on one worker (core.ml.pipeline.ResidentPipelines): base pipelines
kept least recently used first, evicted when the device's memory cannot hold them
beside a job, and the evicted one's LoRA cache dropped with it."""

from __future__ import annotations

from pathlib import Path

import torch

from core.ml.pipeline import ResidentPipelines, checkpoint_bytes, pipeline_bytes


def test_pipelines_are_evicted_least_recent_first_when_the_budget_requires(
    tiny_model_dir: Path, tiny_sdxl_model_dir: Path
) -> None:
    torch.set_num_threads(2)
    sd1_bytes, sdxl_bytes = checkpoint_bytes(tiny_model_dir), checkpoint_bytes(tiny_sdxl_model_dir)
    evicted: list[object] = []
    # Room for both pipelines, but not for both beside a job that peaks at their sum.
    held = ResidentPipelines(budget_bytes=sd1_bytes + sdxl_bytes, on_evict=evicted.append)
    sd1 = held.get(tiny_model_dir, "cpu", "float32", "sd1", profile="tiny")
    sdxl = held.get(tiny_sdxl_model_dir, "cpu", "float32", "sdxl", profile="tiny-sdxl")
    assert [name for name, _ in held.held()] == ["tiny", "tiny-sdxl"] and evicted == []
    assert held.held()[0][1] == pipeline_bytes(sd1)
    # Used again: the same object, and now the most recent.
    assert held.get(tiny_model_dir, "cpu", "float32", "sd1", profile="tiny") is sd1
    assert [name for name, _ in held.held()] == ["tiny-sdxl", "tiny"]
    # A job on tiny that needs all the memory: tiny-sdxl (least recent) goes.
    again = held.get(
        tiny_model_dir, "cpu", "float32", "sd1", profile="tiny",
        job_peak_bytes=sd1_bytes + sdxl_bytes,
    )  # fmt: skip
    assert again is sd1 and evicted == [sdxl]
    assert [name for name, _ in held.held()] == ["tiny"]


def test_without_a_budget_nothing_is_evicted(
    tiny_model_dir: Path, tiny_sdxl_model_dir: Path
) -> None:
    held = ResidentPipelines()
    held.get(tiny_model_dir, "cpu", "float32", "sd1", profile="tiny")
    held.get(
        tiny_sdxl_model_dir, "cpu", "float32", "sdxl", profile="tiny-sdxl", job_peak_bytes=2**40
    )
    assert len(held.held()) == 2
