"""The onnx and torch embedding backends side by side (part of ``bench.perf``; runs alone too).

    python -m bench.embedding_backends [--backends int8,fp32,torch] [--rounds 3] [--memories 10000]

``int8`` is the onnx backend at ``MEMORY_EMBEDDING_PRECISION=int8`` (the default), ``fp32`` the
same at ``fp32``, ``torch`` sentence-transformers; the same model, all-MiniLM-L6-v2. Every
figure is measured in new processes, the backends interleaved round by round (the order
alternating), and reported as the median over the rounds with each backend's ratio to torch:

- ``cold start``: a new Python process that opens the default (SQLite) driver on a file of 100
  memories (stored by that model) and makes one recall with a query, start to exit;
- ``CLI recall``: the same through ``python -m app recall`` (what a shell user waits for);
- in one process per backend and round: ``query embedding``, the p50 of 50 new query texts;
  ``store_many``, 256 new texts in one call on SQLite, in texts per second; ``peak RSS`` of that
  process after those embeddings (``VmHWM``: see ``own_peak_rss_mb``); then ``recall with
  embedding``, the p50 of 30 new queries on SQLite against one user holding ``--memories``
  memories (loaded with precomputed vectors, see ``bench.workload``).
- the query embedding and store_many also by CPU time (``time.process_time``: every thread of the
  process, so torch's two threads count twice). On a shared 2-core machine wall time depends on
  what else runs: a one-thread onnx process loses more of it to other jobs than torch's two
  threads do, which is why both clocks are printed. CPU time is the cost; wall time on an idle
  machine is what a user waits.
- ``cosine``: min and mean cosine between each backend's vectors of 512 benchmark sentences and
  torch's (and int8's to fp32's: the bound an int8 variant must keep is 0.98 to fp32).
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from app.core.database.migrator import PROJECT_ROOT
from app.core.memory.embeddings import DEFAULT_MODEL, Embedder, get_default_embedder
from bench.backends import open_backend
from bench.workload import BASE_TEXTS, BenchEmbedder, base_sentences, make_corpus

QUERIES, RECALLS, STORE_MANY_TEXTS, COLD_MEMORIES = 50, 30, 256, 100
COLD_QUERY = "what did the coach recommend?"
#: (figure, key, unit, better when, the issue's target for onnx / torch)
#: Backend names of this benchmark: (MEMORY_EMBEDDING_BACKEND, MEMORY_EMBEDDING_PRECISION).
SPECS = {"int8": ("onnx", "int8"), "fp32": ("onnx", "fp32"), "torch": ("torch", "fp32")}
FIGURES = [
    ("cold start, new process to first recall", "cold_start_s", "s", "lower", "<= 0.2"),
    ("CLI `python -m app recall`", "cli_recall_s", "s", "lower", ""),
    ("query embedding p50", "query_ms", "ms", "lower", "<= 0.3"),
    ("query embedding p50, CPU time", "query_cpu_ms", "ms", "lower", "<= 0.3"),
    ("SQLite recall with embedding, one user, p50", "recall_ms", "ms", "lower", "<= 0.4"),
    ("store_many, 256 texts", "store_many_per_s", "texts/s", "higher", ">= 1.5"),
    ("store_many, 256 texts, per CPU second", "store_many_per_cpu_s", "texts/s", "higher",
     ">= 1.5"),
    ("peak RSS after embedding", "peak_rss_mb", "MB", "lower", "<= 0.5"),
]


def compare(backends: Sequence[str], rounds: int, memories: int) -> dict[str, Any]:
    """Every figure of every backend (medians over ``rounds``) and the markdown table."""
    unknown = [name for name in backends if name not in SPECS]
    if unknown:
        raise ValueError(f"backends must be among {', '.join(SPECS)} (got {unknown})")
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stores:
        # One small store per backend, of its own vectors.
        small = {}
        for name in backends:
            small[name] = stores.enter_context(open_backend("sqlite"))
            _fill(small[name].driver, COLD_MEMORIES, embedder_of(name))
        # The corpus's base vectors, made once (fp32: the scan's cost does not depend on them).
        np.save(Path(folder) / "base.npy", get_default_embedder().embed_documents(
            base_sentences(min(BASE_TEXTS, memories))))
        for round_number in range(rounds):
            order = list(backends) if round_number % 2 == 0 else list(reversed(backends))
            for name in order:
                print(f"  embedding backend {name}, round {round_number + 1}/{rounds}",
                      file=sys.stderr, flush=True)
                figures = _child(name, memories, Path(folder))
                location = small[name].location
                figures["cold_start_s"] = _cold(name, location, ["-c", _COLD_SCRIPT])
                figures["cli_recall_s"] = _cold(name, location,
                                                ["-m", "app", "recall", "solo", COLD_QUERY])
                per_round[name].append(figures)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in per_round.items()}
    result: dict[str, Any] = {"rounds": rounds, "memories": memories, "medians": medians,
                              "per_round": per_round}
    if "torch" in backends and len(backends) > 1:
        result["cosine"] = _cosine(backends)
    result["markdown"] = render(result)
    return result


def render(result: dict[str, Any]) -> str:
    """The backends' table: one row per figure, one column per backend, then each backend's
    ratio to torch (when torch was measured) and the issue's target for it."""
    medians = result["medians"]
    names = list(medians)
    others = [name for name in names if name != "torch"] if "torch" in names else []
    ratios = [f"{name} / torch" for name in others]
    lines = [f"Embedding backends: medians of {result['rounds']} interleaved rounds, recall at "
             f"{result['memories']:,} memories.", "",
             "| figure | " + " | ".join(names + ratios) + (" | target |" if others else " |"),
             "|---|" + "---:|" * (len(names) + len(ratios)) + ("---|" if others else "")]
    for label, key, unit, _, target in FIGURES:
        cells = [f"{medians[name][key]:,.2f} {unit}" for name in names]
        cells += [f"{medians[name][key] / medians['torch'][key]:.2f}" for name in others]
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {target} |" if others else " |"))
    for pair, cosine in result.get("cosine", {}).items():
        lines += ["", f"Cosine between the {pair} vectors of 512 sentences: min "
                      f"{cosine['min']:.6f}, mean {cosine['mean']:.6f}."]
    return "\n".join(lines)


_COLD_SCRIPT = (
    "from app.core.memory import get_memory_driver\n"
    f"get_memory_driver().recall('solo', query={COLD_QUERY!r})\n"
)


def _cold(name: str, sqlite_path: str, argv: list[str]) -> float:
    backend, precision = SPECS[name]
    env = dict(os.environ, MEMORY_EMBEDDING_BACKEND=backend, MEMORY_EMBEDDING_MODEL=DEFAULT_MODEL,
               MEMORY_EMBEDDING_PRECISION=precision, MEMORY_DRIVER="sqlite",
               MEMORY_SQLITE_PATH=sqlite_path)
    began = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, cwd=PROJECT_ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def embedder_of(name: str) -> Embedder:
    """The process-wide embedder of backend ``name`` of ``SPECS``."""
    backend, precision = SPECS[name]
    return get_default_embedder(DEFAULT_MODEL, backend=backend, precision=precision)


def _fill(driver_of: Any, count: int, model: Embedder) -> None:
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


def measure(name: str, memories: int, base_vectors: np.ndarray) -> dict[str, float]:
    """The in-process figures of backend ``name`` (see the module docstring)."""
    model = embedder_of(name)
    model.embed_query("load the model")
    queries = [f"{text} - which one was it?" for text in base_sentences(QUERIES)]
    query_ms, query_cpu_ms = [], []
    for text in queries:
        began, began_cpu = time.perf_counter(), time.process_time()
        model.embed_query(text)
        query_cpu_ms.append(1000 * (time.process_time() - began_cpu))
        query_ms.append(1000 * (time.perf_counter() - began))
    fresh = [f"{text} (stored by store_many)" for text in base_sentences(STORE_MANY_TEXTS)]
    with open_backend("sqlite") as backend_storage:
        driver = backend_storage.driver(model)
        began, began_cpu = time.perf_counter(), time.process_time()
        driver.store_many([{"user_id": "writer", "content": text} for text in fresh])
        store_many_per_cpu_s = len(fresh) / (time.process_time() - began_cpu)
        store_many_per_s = len(fresh) / (time.perf_counter() - began)
        driver.close()
    peak_rss_mb = own_peak_rss_mb()
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
    return {"query_ms": statistics.median(query_ms),
            "query_cpu_ms": statistics.median(query_cpu_ms),
            "store_many_per_s": store_many_per_s, "store_many_per_cpu_s": store_many_per_cpu_s,
            "peak_rss_mb": peak_rss_mb, "recall_ms": statistics.median(recall_ms)}


def own_peak_rss_mb() -> float:
    """This process's peak RSS in MB, its own address space only: ``VmHWM``.

    Not ``ru_maxrss``: Linux carries that over from the parent at ``exec``, so a child started
    by a process holding a loaded model (this benchmark's parent: ~330 MB) reported the parent's
    peak whenever its own was smaller (onnx and int8 both showed 330.43 MB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cosine(backends: Sequence[str]) -> dict[str, dict[str, float]]:
    """Min and mean cosine of each backend's vectors to torch's (and int8's to fp32's)."""
    texts = base_sentences(512)
    vectors = {name: embedder_of(name).embed_documents(texts) for name in backends}
    pairs = [(name, "torch") for name in backends if name != "torch"]
    if {"int8", "fp32"} <= set(backends):
        pairs.append(("int8", "fp32"))
    result = {}
    for first, second in pairs:
        cosines = np.sum(vectors[first] * vectors[second], axis=1)
        result[f"{first} and {second}"] = {"min": float(cosines.min()),
                                           "mean": float(cosines.mean())}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="int8,torch")
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
