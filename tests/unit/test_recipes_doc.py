"""docs/recipes.md against the presets it documents.

Each profile's table in docs/recipes.md has a **field** column (a ``Profile`` field
in backticks, or "—" for a fixed choice in code) and an **atelier** column whose
first backticked Python literal is that field's value. A preset changed without
the page, or a field added without a row, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from core.ml.profiles import PROFILES, Profile

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
DOCUMENTED_PROFILES = ("sd15", "sdxl")
# Profile fields that identify or locate a checkpoint rather than tune a recipe.
NOT_KNOBS = frozenset({"name", "family", "hub_id", "builder"})
KNOBS = frozenset(f.name for f in dataclasses.fields(Profile)) - NOT_KNOBS
TABLE_HEADING = re.compile(r"^##\s.*profile `([^`]+)`")
FIELD_CELL = re.compile(r"^`(\w+)`$")
FIRST_LITERAL = re.compile(r"^`([^`]+)`")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def recipe_tables(text: str) -> dict[str, dict[str, str]]:
    """Profile name -> {field name: atelier cell}, from every table under a
    "## ... profile `name`" heading. Rows with no field name are left out."""
    tables: dict[str, dict[str, str]] = {}
    profile: str | None = None
    header: list[str] | None = None
    for line in text.splitlines():
        heading = TABLE_HEADING.match(line)
        if heading:
            profile, header = heading.group(1), None
            tables[profile] = {}
        elif profile is None or not line.startswith("|"):
            header = None  # a table ends at its first line that is not a row
        elif header is None:
            header = _cells(line)
        elif not set(line) <= set("|-: "):  # the |---| separator row
            row = dict(zip(header, _cells(line), strict=True))
            field = FIELD_CELL.match(row["field"])
            if field:
                tables[profile][field.group(1)] = row["atelier"]
    return tables


def documented_value(cell: str) -> Any:
    literal = FIRST_LITERAL.match(cell)
    if literal is None:
        raise ValueError(f"atelier cell {cell!r} does not start with a `literal`")
    return ast.literal_eval(literal.group(1))


def mismatches(text: str, profile: Profile) -> list[str]:
    """What the page says differently from ``profile``, or leaves out."""
    rows = recipe_tables(text).get(profile.name, {})
    problems = [f"no row for {name}" for name in sorted(KNOBS - rows.keys())]
    problems += [f"{name} is not a Profile knob" for name in sorted(rows.keys() - KNOBS)]
    for name in sorted(rows.keys() & KNOBS):
        value, expected = documented_value(rows[name]), getattr(profile, name)
        # A tuple field is equal to its documented tuple; 1e-4 parses to 0.0001.
        if value != expected or type(value) is not type(expected):
            problems.append(f"{name}: page says {value!r}, profile has {expected!r}")
    return problems


@pytest.mark.parametrize("name", DOCUMENTED_PROFILES)
def test_recipe_table_matches_profile(name: str) -> None:
    assert mismatches(DOC.read_text(), PROFILES[name]) == []


def test_a_changed_preset_fails() -> None:
    text = DOC.read_text()
    changed = dataclasses.replace(PROFILES["sd15"], learning_rate=2e-4)
    assert mismatches(text, changed) == ["learning_rate: page says 0.0001, profile has 0.0002"]


def test_a_missing_row_fails() -> None:
    text = DOC.read_text()
    without = "\n".join(line for line in text.splitlines() if "| `max_grad_norm` |" not in line)
    assert "no row for max_grad_norm" in mismatches(without, PROFILES["sdxl"])


def test_a_wrong_type_fails() -> None:
    """``1`` is not ``1.0`` here: an int where the field is a float is a typo."""
    text = DOC.read_text().replace("| `1.0` |", "| `1` |")
    assert "prior_loss_weight: page says 1, profile has 1.0" in mismatches(text, PROFILES["sd15"])
