"""The onnx and torch embedding backends side by side (part of ``bench.perf``; runs alone too).

    python -m bench.embedding_backends [--backends onnx,torch] [--rounds 3] [--memories 10000]

Every figure is measured in new processes, the backends interleaved round by round (the order
alternating), and reported as the median over the rounds with the ratio onnx / torch:

- ``cold start``: a new Python process that opens the default (SQLite) driver on a file of 100
  memories and makes one recall with a query, start to exit (``MEMORY_EMBEDDING_BACKEND`` set);
- ``CLI recall``: the same through ``python -m app recall`` (what a shell user waits for);
- in one process per backend and round: ``query embedding``, the p50 of 50 new query texts;
  ``store_many``, 256 new texts in one call on SQLite, in texts per second; ``peak RSS`` of that
  process after those embeddings; then ``recall with embedding``, the p50 of 30 new queries on
  SQLite against one user holding ``--memories`` memories (loaded with precomputed vectors, see
  ``bench.workload``).
- ``cosine``: min and mean cosine between the two backends' vectors of 512 benchmark sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.core.database.migrator import PROJECT_ROOT
from app.core.memory.embeddings import get_default_embedder
from bench.backends import open_backend
from bench.workload import BASE_TEXTS, BenchEmbedder, base_sentences, make_corpus

QUERIES, RECALLS, STORE_MANY_TEXTS, COLD_MEMORIES = 50, 30, 256, 100
COLD_QUERY = "what did the coach recommend?"
#: (figure, key, unit, better when, the issue's target for onnx / torch)
FIGURES = [
    ("cold start, new process to first recall", "cold_start_s", "s", "lower", "<= 0.2"),
    ("CLI `python -m app recall`", "cli_recall_s", "s", "lower", ""),
    ("query embedding p50", "query_ms", "ms", "lower", "<= 0.3"),
    ("SQLite recall with embedding, one user, p50", "recall_ms", "ms", "lower", "<= 0.4"),
    ("store_many, 256 texts", "store_many_per_s", "texts/s", "higher", ">= 1.5"),
    ("peak RSS after embedding", "peak_rss_mb", "MB", "lower", "<= 0.5"),
]


def compare(backends: Sequence[str], rounds: int, memories: int) -> dict[str, Any]:
    """Every figure of every backend (medians over ``rounds``) and the markdown table."""
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    with tempfile.TemporaryDirectory() as folder, open_backend("sqlite") as small:
        _fill(small.driver, COLD_MEMORIES)
        # The corpus's base vectors, made once (both backends give the same vectors).
        np.save(Path(folder) / "base.npy", get_default_embedder().embed_documents(
            base_sentences(min(BASE_TEXTS, memories))))
        for round_number in range(rounds):
            order = list(backends) if round_number % 2 == 0 else list(reversed(backends))
            for name in order:
                print(f"  embedding backend {name}, round {round_number + 1}/{rounds}",
                      file=sys.stderr, flush=True)
                figures = _child(name, memories, Path(folder))
                figures["cold_start_s"] = _cold(name, small.location, ["-c", _COLD_SCRIPT])
                figures["cli_recall_s"] = _cold(name, small.location,
                                                ["-m", "app", "recall", "solo", COLD_QUERY])
                per_round[name].append(figures)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in per_round.items()}
    result: dict[str, Any] = {"rounds": rounds, "memories": memories, "medians": medians,
                              "per_round": per_round}
    if set(backends) == {"onnx", "torch"}:
        result["cosine"] = _cosine()
    result["markdown"] = render(result)
    return result


def render(result: dict[str, Any]) -> str:
    """The backends' table: one row per figure, one column per backend, then onnx / torch."""
    medians = result["medians"]
    names = list(medians)
    both = {"onnx", "torch"} <= set(names)
    lines = [f"Embedding backends: medians of {result['rounds']} interleaved rounds, recall at "
             f"{result['memories']:,} memories.", "",
             "| figure | " + " | ".join(names) + (" | onnx / torch | target |" if both else " |"),
             "|---|" + "---:|" * len(names) + ("---:|---|" if both else "")]
    for label, key, unit, _, target in FIGURES:
        cells = [f"{medians[name][key]:,.2f} {unit}" for name in names]
        ratio = f"{medians['onnx'][key] / medians['torch'][key]:.2f}" if both else ""
        lines.append(f"| {label} | " + " | ".join(cells)
                     + (f" | {ratio} | {target} |" if both else " |"))
    if "cosine" in result:
        lines += ["", f"Cosine between the backends' vectors of 512 sentences: min "
                      f"{result['cosine']['min']:.6f}, mean {result['cosine']['mean']:.6f}."]
    return "\n".join(lines)


_COLD_SCRIPT = (
    "from app.core.memory import get_memory_driver\n"
    f"get_memory_driver().recall('solo', query={COLD_QUERY!r})\n"
)


def _cold(backend: str, sqlite_path: str, argv: list[str]) -> float:
    env = dict(os.environ, MEMORY_EMBEDDING_BACKEND=backend, MEMORY_DRIVER="sqlite",
               MEMORY_SQLITE_PATH=sqlite_path)
    began = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, cwd=PROJECT_ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def _fill(driver_of: Any, count: int) -> None:
    model = get_default_embedder()
    driver = driver_of(model)
    try:
        driver.store_many([{"user_id": "solo", "content": text}
                           for text in base_sentences(count)])
    finally:
        driver.close()


def _child(backend: str, memories: int, folder: Path) -> dict[str, float]:
    output = folder / f"{backend}.json"
    subprocess.run([sys.executable, "-m", "bench.embedding_backends", "--child", backend,
                    "--memories", str(memories), "--child-output", str(output),
                    "--base-vectors", str(folder / "base.npy")],
                   cwd=PROJECT_ROOT, check=True)
    return dict(json.loads(output.read_text()))


def measure(backend: str, memories: int, base_vectors: np.ndarray) -> dict[str, float]:
    """The in-process figures of ``backend`` (see the module docstring)."""
    model = get_default_embedder(backend=backend)
    model.embed_query("load the model")
    queries = [f"{text} - which one was it?" for text in base_sentences(QUERIES)]
    query_ms = []
    for text in queries:
        began = time.perf_counter()
        model.embed_query(text)
        query_ms.append(1000 * (time.perf_counter() - began))
    fresh = [f"{text} (stored by store_many)" for text in base_sentences(STORE_MANY_TEXTS)]
    with open_backend("sqlite") as backend_storage:
        driver = backend_storage.driver(model)
        began = time.perf_counter()
        driver.store_many([{"user_id": "writer", "content": text} for text in fresh])
        store_many_per_s = len(fresh) / (time.perf_counter() - began)
        driver.close()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open_backend("sqlite") as storage:
        bench_model = BenchEmbedder(model)
        driver = storage.driver(bench_model)
        corpus = make_corpus(base_vectors, memories, RECALLS)
        for first in range(0, memories, 1_000):
            last = min(memories, first + 1_000)
            bench_model.preset_documents(corpus.vectors[first:last])
            driver.store_many([{"user_id": "solo", "content": corpus.texts[i]}
                               for i in range(first, last)])
        driver.recall("solo", query="warm up")  # SQLite builds its in-memory copy
        recall_ms = []
        for text in corpus.query_texts:  # new texts: each one goes through the model
            began = time.perf_counter()
            driver.recall("solo", query=text, top_k=10)
            recall_ms.append(1000 * (time.perf_counter() - began))
        driver.close()
    return {"query_ms": statistics.median(query_ms), "store_many_per_s": store_many_per_s,
            "peak_rss_mb": peak_rss_mb, "recall_ms": statistics.median(recall_ms)}


def _cosine() -> dict[str, float]:
    texts = base_sentences(512)
    onnx = get_default_embedder(backend="onnx").embed_documents(texts)
    torch = get_default_embedder(backend="torch").embed_documents(texts)
    cosines = np.sum(onnx * torch, axis=1)
    return {"min": float(cosines.min()), "mean": float(cosines.mean())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="onnx,torch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base-vectors", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = measure(args.child, args.memories, np.load(args.base_vectors))
        args.child_output.write_text(json.dumps(figures))
        return 0
    result = compare(args.backends.split(","), args.rounds, args.memories)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
