"""Speed and memory of every driver, side by side with the baselines that bound them.

    python -m bench.perf [--drivers sqlite,pgvector,automem] [--sizes 1000,10000,100000]
                         [--users 100] [--per-user 1000] [--queries 200] [--large]

What is measured, per driver, each in a process of its own (so that its peak RSS is its own):

- one user holding 1k, 10k and 100k memories (``--sizes``; AutoMem: ``--automem-sizes``, 1k by
  default, as the test double ranks in pure Python and would be what is timed), then many users
  in a fresh database: ``--users`` x ``--per-user`` (100 x 1k; ``--large`` makes it 100 x 10k =
  1M for pgvector, whose HNSW index then takes many minutes to build on two cores).
- ``load``: ``store_many`` in batches of 1,000 with precomputed vectors, i.e. the database's side
  alone (how the corpus is built; see ``bench.workload``).
- ``store_many``: 256 new texts in one call with the real model, against the baseline of the
  model encoding the same texts (``SentenceTransformer.encode`` in batches) just before.
- ``store``: one new text with the real model, median of 20.
- ``first recall``: the first recall after the load (SQLite builds its in-memory copy then).
- ``recall``: top-10 hybrid recall without the query embedding (its vector is handed over
  precomputed), p50/p95 over ``--queries`` queries, against the baseline of a bare numpy exact
  scan plus top-10 over the same user's vectors; and with the query embedding (30 new query texts
  through the model).
- ``exact``: the share of queries whose top 10, ranked by cosine alone, is the exact top 10.
- pgvector only, in a table of its own under the main one: the bare HNSW query over the same
  user's rows on the same table (``bench.pgvector_recall.baseline_figures``), p50 and exact share.

Then the embedding backends side by side (``bench.embedding_backends``: int8 and torch, each in new
processes, interleaved; ``--backends ""`` skips it).

Output: a markdown table (printed, and written with a JSON file of every figure to
``bench/results/``). AutoMem runs against the test double (``tests/automem_double.py``): its
figures are the driver's own overhead (HTTP, JSON, retries), not the service's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from app.core.database.migrator import PROJECT_ROOT
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.embeddings import get_default_embedder
from app.core.memory.ranking import FusionWeights
from bench import embedding_backends
from bench.backends import DRIVERS, open_backend
from bench.results import RESULTS
from bench.workload import BenchEmbedder, Corpus, base_sentences, make_corpus

VECTOR_ONLY = FusionWeights(vector=1.0, keyword=0.0, importance=0.0, neighbour=0.0)
LOAD_BATCH = 1_000
STORE_MANY_TEXTS = 256
SINGLE_STORES = 20
EMBEDDED_QUERIES = 30
TOP_K = 10


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--automem-sizes", default="1000")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--per-user", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--large", action="store_true",
                        help="pgvector's many-users run at 100 x 10k = 1M memories")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--backends", default="int8,torch",
                        help="embedding backends to compare (empty: none)")
    parser.add_argument("--backend-rounds", type=int, default=3)
    parser.add_argument("--backend-memories", type=int, default=10_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure_driver(args.child, args)
        args.child_output.write_text(json.dumps(result))
        return 0

    report: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "machine": machine(), "torch_after_import": torch_after_import(),
                              "drivers": {}}
    for name in args.drivers.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        report["drivers"][name] = run_child(name, argv or sys.argv[1:])
    if args.backends:
        print("measuring the embedding backends ...", file=sys.stderr, flush=True)
        report["embedding_backends"] = embedding_backends.compare(
            args.backends.split(","), args.backend_rounds, args.backend_memories)
    report["markdown"] = render(report)
    if "embedding_backends" in report:
        report["markdown"] += "\n\n" + report["embedding_backends"]["markdown"]
    print(report["markdown"])
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.output / f"perf-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.output / f"perf-{stamp}.md").write_text(report["markdown"] + "\n")
    print(f"\nwritten: {args.output / f'perf-{stamp}'}.{{md,json}}", file=sys.stderr)
    return 0


def run_child(name: str, argv: Sequence[str]) -> dict[str, Any]:
    """Measure driver ``name`` in a new process; its figures, peak RSS included."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        subprocess.run([sys.executable, "-m", "bench.perf", *argv, "--child", name,
                        "--child-output", str(output)], check=True, cwd=PROJECT_ROOT)
        return dict(json.loads(output.read_text()))


def measure_driver(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one driver (see the module docstring)."""
    model = get_default_embedder()
    base_vectors = model.embed_documents(base_sentences())
    sizes = [int(s) for s in (args.automem_sizes if name == "automem" else args.sizes).split(",")]
    per_user = args.per_user * (10 if args.large and name == "pgvector" else 1)
    runs: list[dict[str, Any]] = []
    with open_backend(name) as backend:
        embedder = BenchEmbedder(model)
        drivers = (backend.driver(embedder), backend.driver(embedder, VECTOR_ONLY))
        corpus = make_corpus(base_vectors, max(sizes), args.queries)
        loaded: list[str] = []
        for size in sizes:
            rate = load(drivers[0], embedder, corpus, ["solo"], len(loaded), size, loaded)
            backend.settle()
            runs.append({"scenario": "one user", "memories": size, "load_per_s": rate}
                        | measure_stage(drivers, embedder, corpus, ["solo"], loaded, name)
                        | hnsw_baseline(name, backend.location, corpus, ["solo"], loaded))
        close_all(drivers)
    if name != "automem":  # the double filters users in Python: it would time itself
        with open_backend(name) as backend:
            embedder = BenchEmbedder(model)
            drivers = (backend.driver(embedder), backend.driver(embedder, VECTOR_ONLY))
            total = args.users * per_user
            corpus = make_corpus(base_vectors, total, args.queries, seed=11)
            users = [f"user{i:03d}" for i in range(args.users)]
            ids: list[str] = []
            rate = load(drivers[0], embedder, corpus, users, 0, total, ids)
            backend.settle()
            runs.append({"scenario": f"{args.users} users", "memories": total, "load_per_s": rate}
                        | measure_stage(drivers, embedder, corpus, users, ids, name)
                        | hnsw_baseline(name, backend.location, corpus, users, ids))
            close_all(drivers)
    return {"runs": runs, "encode_per_s": encode_rate(model),
            "peak_rss_mb": embedding_backends.own_peak_rss_mb()}


def load(driver: BaseMemoryDriver, embedder: BenchEmbedder, corpus: Corpus, users: list[str],
         start: int, end: int, ids: list[str]) -> float:
    """Store memories ``start..end`` (memory i to user ``i % len(users)``) without the model;
    appends their ids to ``ids``; returns memories per second."""
    began = time.perf_counter()
    for first in range(start, end, LOAD_BATCH):
        chunk = range(first, min(end, first + LOAD_BATCH))
        embedder.preset_documents(corpus.vectors[chunk.start:chunk.stop])
        stored = driver.store_many([{"user_id": users[i % len(users)], "content": corpus.texts[i]}
                                    for i in chunk])
        ids.extend(memory["id"] for memory in stored)
    return (end - start) / (time.perf_counter() - began)


def measure_stage(drivers: tuple[BaseMemoryDriver, BaseMemoryDriver], embedder: BenchEmbedder,
                  corpus: Corpus, users: list[str], ids: list[str], name: str) -> dict[str, Any]:
    """Writes with the model, then recalls with and without the query embedding."""
    driver, by_cosine = drivers
    stage = len(ids)
    fresh = [f"{text} (written at stage {stage})" for text in corpus.texts[:STORE_MANY_TEXTS]]
    encode_seconds = timed(lambda: embedder.model.embed_documents(fresh))
    store_many_seconds = timed(lambda: driver.store_many(
        [{"user_id": "writer", "content": text} for text in fresh]))
    single = [1000 * timed(partial(driver.store, "writer", f"{fresh[i]} once more"))
              for i in range(SINGLE_STORES)]

    count = len(corpus.query_texts)
    embedder.preset_queries(corpus.query_texts, corpus.query_vectors)
    owner = [users[int(i) % len(users)] for i in range(count)]
    first_recall = 1000 * timed(lambda: driver.recall(owner[0], query=corpus.query_texts[0]))
    for user in sorted(set(owner)):  # every user's first recall is a cold start; time warm ones
        driver.recall(user, query="warm up")
    recall_ms, scan_ms, exact = [], [], 0
    for q in range(count):
        text, vector = corpus.query_texts[q], corpus.query_vectors[q]
        recall_ms.append(1000 * timed(partial(driver.recall, owner[q], query=text,
                                              top_k=TOP_K)))
        own = np.arange(users.index(owner[q]), stage, len(users))
        matrix = np.ascontiguousarray(corpus.vectors[own])
        scan_ms.append(1000 * timed(partial(numpy_top_k, matrix, vector, TOP_K)))
        if name != "automem":
            expected = {ids[int(i)] for i in own[numpy_top_k(matrix, vector, TOP_K)]}
            found = by_cosine.recall(owner[q], query=text, top_k=TOP_K)
            exact += {memory["id"] for memory in found} == expected
    embedder.clear_queries()  # the same queries again, now through the model
    embedded_ms = [1000 * timed(partial(driver.recall, owner[q], query=corpus.query_texts[q],
                                        top_k=TOP_K))
                   for q in range(min(EMBEDDED_QUERIES, count))]
    return {
        "encode_per_s": STORE_MANY_TEXTS / encode_seconds,
        "store_many_per_s": STORE_MANY_TEXTS / store_many_seconds,
        "store_ms": percentiles(single),
        "first_recall_ms": first_recall,
        "recall_ms": percentiles(recall_ms),
        "numpy_scan_ms": percentiles(scan_ms),
        "recall_embedded_ms": percentiles(embedded_ms),
        "exact_share": None if name == "automem" else exact / count,
    }


def hnsw_baseline(name: str, url: str, corpus: Corpus, users: list[str],
                  ids: list[str]) -> dict[str, Any]:
    """For pgvector, the bare HNSW query on the same table (``bench.pgvector_recall``)."""
    if name != "pgvector":
        return {}
    from bench.pgvector_recall import baseline_figures

    return baseline_figures(url, corpus, users, ids)


def numpy_top_k(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The baseline recall: exact cosine scan, then the k best rows, best first."""
    scores = matrix @ query
    top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    return top[np.argsort(-scores[top])]


def encode_rate(model: Any) -> float:
    """The model's throughput on 1,024 new texts, in texts per second."""
    texts = [f"{text} (encoded for the baseline)" for text in base_sentences(1_024)]
    return len(texts) / timed(lambda: model.embed_documents(texts))


def timed(action: Callable[[], Any]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))]}


def close_all(drivers: Sequence[BaseMemoryDriver]) -> None:
    for driver in drivers:
        driver.close()


def torch_after_import() -> bool:
    """Whether creating the default (SQLite) driver and checking its health loads torch."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, MEMORY_DRIVER="sqlite",
                   MEMORY_SQLITE_PATH=str(Path(folder) / "m.sqlite3"))
        probe = ("import sys; from app.core.memory import get_memory_driver; "
                 "get_memory_driver().health_check(); print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "embedding_backend": getattr(get_default_embedder(), "backend", "?"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__, "platform": platform.platform()}


def render(report: dict[str, Any]) -> str:
    """The report as a markdown table, with the date, the machine and the baselines."""
    m = report["machine"]
    lines = [f"Measured {report['date'][:10]} on {m['cpu']}, {m['cores']} cores, Python "
             f"{m['python']}, torch {m['torch']} (CPU, {m['torch_threads']} threads), embedding "
             f"backend {m.get('embedding_backend', 'torch')}. "
             f"torch loaded by import + default driver + health check: "
             f"{'yes' if report['torch_after_import'] else 'no'}.", ""]
    for name, result in report["drivers"].items():
        lines.append(f"- {name}: peak RSS {result['peak_rss_mb']:.0f} MB; model encode "
                     f"{result['encode_per_s']:.0f} texts/s (1,024 texts)")
    lines += ["", "| driver | scenario | memories | load /s | store_many /s (x encode) | "
              "store p50 ms | first recall ms | recall p50 / p95 ms | numpy scan p50 ms | "
              "x numpy | recall with embedding p50 / p95 ms | top-10 exact |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in report["drivers"].items():
        for run in result["runs"]:
            recall, scan, embedded = run["recall_ms"], run["numpy_scan_ms"], \
                run["recall_embedded_ms"]
            exact = "n/a" if run["exact_share"] is None else f"{100 * run['exact_share']:.0f}%"
            # AutoMem embeds on the server: its store_many is not bounded by the local model.
            versus = "n/a" if name == "automem" else \
                f"{run['store_many_per_s'] / run['encode_per_s']:.2f}"
            lines.append(
                f"| {name} | {run['scenario']} | {run['memories']:,} | {run['load_per_s']:,.0f} | "
                f"{run['store_many_per_s']:,.0f} ({versus})"
                f" | {run['store_ms']['p50']:.1f} | {run['first_recall_ms']:.1f} | "
                f"{recall['p50']:.2f} / {recall['p95']:.2f} | {scan['p50']:.2f} | "
                f"{recall['p50'] / scan['p50']:.1f} | {embedded['p50']:.1f} / {embedded['p95']:.1f}"
                f" | {exact} |")
    from bench.pgvector_recall import render_baseline

    return "\n".join(lines + render_baseline(report))


if __name__ == "__main__":
    sys.exit(main())
