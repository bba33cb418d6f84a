"""The cost model (core.fleet.costs): rows per shape, the fallback to a larger side,
units of work per job, and the online correction from finished jobs."""

from __future__ import annotations

import uuid

import pytest

from core.fleet.costs import (
    CostRow,
    CostTable,
    JobShape,
    ObservedCost,
    UnknownShape,
    load_cost_table,
    observe,
    shape_of,
    units_of,
)
from core.fleet.placement import GIB
from core.jobs.specs import CatalogEmbedSpec, GenerationSpec, TrainSpec

TABLE = CostTable(
    {
        "generate:sd15:512:default": CostRow(4 * GIB, 0.05, "image-step", "test"),
        "generate:sd15:768:default": CostRow(6 * GIB, 0.1, "image-step", "test"),
        "train:sd15:512:default": CostRow(10 * GIB, 1.0, "step", "test"),
    }
)


def test_cost_is_the_row_times_the_units() -> None:
    cost = TABLE.cost(JobShape("generate", "sd15", 512), units=6 * 30)
    assert cost.peak_vram_bytes == 4 * GIB and cost.seconds == pytest.approx(9.0)


def test_an_unlisted_side_takes_the_next_larger_row_else_the_largest() -> None:
    assert TABLE.row(JobShape("generate", "sd15", 640)).peak_vram_bytes == 6 * GIB
    assert TABLE.row(JobShape("generate", "sd15", 1024)).peak_vram_bytes == 6 * GIB
    with pytest.raises(UnknownShape):
        TABLE.row(JobShape("generate", "sdxl", 1024))


def test_units_of_each_kind() -> None:
    # Every subject of a run takes the steps (issue 11): 2 subjects x 100 steps.
    assert units_of(TrainSpec(steps=100, subject_ids=[uuid.uuid4(), uuid.uuid4()]), 500) == 200
    assert units_of(TrainSpec(), 500) == 500
    generation = GenerationSpec(subject_id=uuid.uuid4(), prompt="p", candidates=6, steps=25)
    assert units_of(generation, 30) == 150
    assert units_of(CatalogEmbedSpec(), 0) == 1


def test_shape_of_a_generation_takes_its_larger_side() -> None:
    generation = GenerationSpec(subject_id=uuid.uuid4(), prompt="p", width=512, height=768)
    assert shape_of(generation, "sd15", 512).key == "generate:sd15:768:default"
    assert shape_of(TrainSpec(), "sdxl", 1024).key == "train:sdxl:1024:default"


def test_finished_jobs_correct_seconds_and_raise_the_peak() -> None:
    first = observe(None, 2.0, 5 * GIB)
    assert first == ObservedCost(1, 2.0, 5 * GIB, 0)
    second = observe(first, 1.0, 4 * GIB)
    assert second.samples == 2 and 1.0 < second.seconds_per_unit < 2.0
    assert second.peak_vram_bytes == 5 * GIB  # the largest seen, never lowered
    corrected = TABLE.cost(JobShape("train", "sd15", 512), 10, second)
    assert corrected.peak_vram_bytes == 10 * GIB  # the table's is larger still
    assert corrected.seconds == pytest.approx(10 * second.seconds_per_unit)


def test_the_checked_in_table_loads_and_names_its_sources() -> None:
    table = load_cost_table()
    assert {"train:sd15:512:default", "generate:sdxl:1024:default"} <= table.rows.keys()
    assert all(row.source for row in table.rows.values())
