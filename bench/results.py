"""Where benchmarks write their figures: one JSON file a run in ``bench/results/`` (git-ignored)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.database.migrator import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "bench" / "results"


def write_results(name: str, figures: dict[str, Any], folder: Path = RESULTS) -> Path:
    """``figures`` as ``folder/NAME-<UTC time>.json``; the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    target.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return target
