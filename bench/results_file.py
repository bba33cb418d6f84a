"""Where every benchmark writes its JSON: bench/results/<name>.json, stamped alike."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, record: dict[str, Any]) -> Path:
    """Write the record with the benchmark's name, date and machine; print where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    stamped = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        **record,
    }
    out.write_text(json.dumps(stamped, indent=2))
    print(f"\nwrote {out}")
    return out
