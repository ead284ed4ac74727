"""The speed benchmark runs end to end at a tiny size and its figures hold together (no timing is
asserted: speed targets live in bench/, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT


def test_bench_perf_runs_and_its_vector_ranking_is_exact(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--drivers", "sqlite,automem", "--sizes", "300",
         "--automem-sizes", "100", "--users", "3", "--per-user", "100", "--queries", "10",
         "--backends", "",
         "--output", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(next(tmp_path.glob("perf-*.json")).read_text())
    assert "| sqlite | one user | 300 |" in report["markdown"]
    assert report["torch_after_import"] is False
    sqlite_runs = report["drivers"]["sqlite"]["runs"]
    assert [run["memories"] for run in sqlite_runs] == [300, 300]
    assert all(run["exact_share"] == 1.0 for run in sqlite_runs)  # cosine top 10 == numpy's
    assert report["drivers"]["automem"]["runs"][0]["exact_share"] is None
    assert all(run["recall_ms"]["p50"] > 0 for run in sqlite_runs)


def test_bench_recall_ab_compares_two_trees(tmp_path: Path):
    # The base is HEAD itself, checked out in a worktree: both sides run, each imports its own
    # tree's app, and the report holds one row per driver with positive ratios.
    done = subprocess.run(
        [sys.executable, "-m", "bench.recall_ab", "--base", "HEAD", "--drivers", "sqlite",
         "--memories", "300", "--queries", "5", "--rounds", "1", "--output", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(next(tmp_path.glob("recall-ab-*.json")).read_text())
    assert report["markdown"].count("\n| sqlite | ") == 1
    sqlite = report["drivers"]["sqlite"]
    assert Path(sqlite["base"]["app"]).parents[1] != PROJECT_ROOT  # the worktree's app
    assert Path(sqlite["head"]["app"]).parents[1] == PROJECT_ROOT
    assert [len(block) for block in sqlite["base"]["seconds"]] == [5]
    assert sqlite["ratio_p50"] > 0 and all(ratio > 0 for ratio in sqlite["ratio_rounds"])
