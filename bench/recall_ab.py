"""Recall latency of the current code against an older commit's, measured in one interleaved run.

    python -m bench.recall_ab --base 674c676 [--drivers sqlite,pgvector] [--memories 10000]
                              [--queries 100] [--rounds 6] [--base-sentences 2000]

What is measured: top-10 hybrid ``recall(user, query=text, top_k=10)`` of one user holding
``--memories`` memories, without the query embedding (each query's vector is preset; the
driver gets it from a dict lookup), timed with ``time.perf_counter`` around each call.

How: the base commit is checked out with ``git worktree add --detach`` in a temporary folder
(removed at the end, also on failure; the repository's own work tree and branches are not
touched). The current side is this work tree as it is, uncommitted changes included. For each
side and driver, one long-lived process (``bench/recall_ab_worker.py``) imports that side's
``app``, makes a scratch store migrated by that side's migrations (a SQLite file, or a new
PostgreSQL database, dropped at the end), and loads the same rows into it: one corpus of texts
and vectors made here once and handed to every worker in files, ``bench.perf``'s
(``bench.workload``: real MiniLM vectors of ``--base-sentences`` sentences, jittered). The
figures depend on it: with 2,000 sentences a query's topic words are each in 5% of the rows;
with 400 (as in ``bench.service``) only 4 of the 20 topics occur, each in 25% of the rows, so
the topic words are ones recall treats as common (in more than 10% of the user's rows).

Each worker then runs one warm-up block, and ``--rounds`` rounds follow; in each, every worker
in turn runs one block of the ``--queries`` recalls while the others wait, so that no two
compete for the two cores, and both sides of a driver see the same machine load within minutes
of each other. The order is reversed every other round, so that neither side always runs first.

What the ratio means: head p50 / base p50 over all the rounds' recalls of one driver; below 1 the
current code is faster. The per-round ratios (each round's head median over its base median)
show how much of a difference is noise: a range that includes 1.0 means no change was
measured. Issue 17's target: head at most 1.3x the base at 10k memories, on each driver.

Output: one markdown table (a row per driver), printed and written, with every duration, to a
JSON file in ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.core.database.migrator import PROJECT_ROOT
from app.core.memory.embeddings import get_default_embedder
from bench.results import RESULTS, write_results
from bench.workload import BASE_TEXTS, base_sentences, make_corpus

WORKER = Path(__file__).with_name("recall_ab_worker.py")
DRIVERS = ("sqlite", "pgvector")
SIDES = ("base", "head")
USER = "bench_user"
TARGET = 1.3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recall_ab",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the older commit (any git revision)")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=100, help="recalls per block")
    parser.add_argument("--rounds", type=int, default=6, help="timed blocks per worker")
    parser.add_argument("--base-sentences", type=int, default=BASE_TEXTS,
                        help="model-embedded sentences the corpus is built on (bench.workload)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    drivers = [name for name in args.drivers.split(",") if name]
    if not drivers or set(drivers) - set(DRIVERS):
        parser.error(f"--drivers: choose from {', '.join(DRIVERS)}")
    base = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    # Read before the workers import the code: the work tree is what the head side runs.
    uncommitted = bool(_git("status", "--porcelain", "--", "app", "database"))

    with tempfile.TemporaryDirectory(prefix="bench-recall-ab-") as folder:
        corpus = Path(folder) / "corpus"
        _write_corpus(corpus, args.memories, args.queries, args.base_sentences)
        with _worktree(base, Path(folder) / "base") as base_tree, ExitStack() as workers:
            trees = {"base": base_tree, "head": PROJECT_ROOT}
            started = [workers.enter_context(_started(side, driver, trees[side], corpus))
                       for driver in drivers for side in SIDES]
            _measure(started, args.rounds)

    figures: dict[str, Any] = {
        "base": base, "head": _git("rev-parse", "HEAD"),
        "head_uncommitted": uncommitted,
        "memories": args.memories, "queries_per_block": args.queries, "rounds": args.rounds,
        "base_sentences": min(args.base_sentences, args.memories),
        "cpus": os.cpu_count(), "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "drivers": {driver: _compare([w for w in started if w.driver == driver])
                    for driver in drivers},
    }
    _report(figures, args.output)
    return 0


def _git(*arguments: str) -> str:
    done = subprocess.run(["git", *arguments], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(arguments)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _write_corpus(folder: Path, memories: int, queries: int, sentences: int) -> None:
    """The rows every worker stores and the queries it recalls with, made once so that both
    sides get the very same ones (vectors by this tree's default model; see bench.workload)."""
    model = get_default_embedder()
    base = model.embed_documents(base_sentences(min(sentences, memories)))
    corpus = make_corpus(base, memories, queries)
    folder.mkdir()
    np.save(folder / "memories.npy", corpus.vectors)
    np.save(folder / "queries.npy", corpus.query_vectors)
    (folder / "corpus.json").write_text(json.dumps({
        "user": USER, "model": model.model_name, "dimension": model.dimension,
        "texts": corpus.texts, "queries": corpus.query_texts,
    }), encoding="utf-8")


@contextmanager
def _worktree(commit: str, path: Path) -> Iterator[Path]:
    """``commit`` checked out at ``path`` (detached: no branch is made or moved)."""
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))


@dataclass(eq=False)
class _Worker:
    """One side's worker process for one driver, and the blocks it has timed."""

    side: str
    driver: str
    process: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    rounds: list[list[float]] = field(default_factory=list)

    def block(self) -> list[float]:
        """Seconds of each recall of one block of queries."""
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return list(self.answer()["seconds"])

    def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:  # its traceback went to our stderr
            raise RuntimeError(f"the {self.side} {self.driver} worker exited "
                               f"({self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message


@contextmanager
def _started(side: str, driver: str, tree: Path, corpus: Path) -> Iterator[_Worker]:
    """A worker importing ``tree``'s ``app``, its store loaded; ended when the block ends."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-P", str(WORKER), "--driver", driver, "--corpus", str(corpus)],
        cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = _Worker(side, driver, process)
    try:
        worker.ready = worker.answer()
        # The package is installed editable from this tree: make sure the side's own won.
        if not Path(worker.ready["app"]).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the {side} worker imported {worker.ready['app']}, not {tree}")
        yield worker
    finally:
        _end(process)


def _end(process: subprocess.Popen[str]) -> None:
    """End of input tells the worker to remove its store and exit; kill it if it hangs."""
    streams: list[IO[str] | None] = [process.stdin, process.stdout]
    for stream in streams:
        if stream is not None:
            with suppress(BrokenPipeError):  # it exited already
                stream.close()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _measure(workers: list[_Worker], rounds: int) -> None:
    """A warm-up block per worker (SQLite's in-memory vectors, PostgreSQL's buffers), then
    ``rounds`` rounds of one block per worker, one worker at a time."""
    for worker in workers:
        worker.block()
    for number in range(rounds):
        for worker in workers if number % 2 == 0 else workers[::-1]:
            worker.rounds.append(worker.block())


def _compare(pair: list[_Worker]) -> dict[str, Any]:
    """One driver's figures: each side's p50/p95 and its rounds' medians, and the ratios."""
    sides: dict[str, Any] = {}
    for worker in pair:
        every = sorted(seconds for block in worker.rounds for seconds in block)
        sides[worker.side] = {
            "p50_ms": statistics.median(every) * 1000,
            "p95_ms": every[int(0.95 * (len(every) - 1))] * 1000,
            "round_p50_ms": [statistics.median(block) * 1000 for block in worker.rounds],
            "app": worker.ready["app"], "load_s": worker.ready["load_s"],
            "seconds": worker.rounds,
        }
    base, head = sides["base"], sides["head"]
    per_round = [h / b for h, b in zip(head["round_p50_ms"], base["round_p50_ms"], strict=True)]
    return {**sides, "ratio_p50": head["p50_ms"] / base["p50_ms"], "ratio_rounds": per_round}


def _report(figures: dict[str, Any], output: Path) -> None:
    lines = [f"recall at {figures['memories']:,} memories, one user, hybrid top 10, query vector "
             f"preset, corpus on {figures['base_sentences']:,} sentences; "
             f"{figures['rounds']} interleaved rounds of {figures['queries_per_block']}; "
             f"base {figures['base'][:7]}, head {figures['head'][:7]}"
             f"{' + uncommitted changes' if figures['head_uncommitted'] else ''}",
             "", "| driver | base p50 / p95 ms | head p50 / p95 ms | head/base p50 | "
                 f"per round min-max | target <= {TARGET} |", "|---|---|---|---|---|---|"]
    for driver, row in figures["drivers"].items():
        base, head, rounds = row["base"], row["head"], row["ratio_rounds"]
        lines.append(f"| {driver} | {base['p50_ms']:.2f} / {base['p95_ms']:.2f} | "
                     f"{head['p50_ms']:.2f} / {head['p95_ms']:.2f} | {row['ratio_p50']:.2f} | "
                     f"{min(rounds):.2f}-{max(rounds):.2f} | "
                     f"{'met' if row['ratio_p50'] <= TARGET else 'NOT met'} |")
    figures["markdown"] = "\n".join(lines)
    print(figures["markdown"])
    print(f"\nwritten to {write_results('recall-ab', figures, output)}")


if __name__ == "__main__":
    sys.exit(main())
