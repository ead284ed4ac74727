"""This project's PGVector recall against LangGraph's ``PostgresStore`` search, in one run.

    scripts/install.sh pgvector peers
    python -m bench.peers [--sizes 1000,10000] [--queries 100] [--rounds 2]

The peer issue 19 compares with, run side by side on the same machine, PostgreSQL server, texts
and vectors (``bench.workload``'s corpus, one user). For each size, two fresh databases: one
migrated for this project's driver and loaded by ``COPY`` (as ``bench.pgvector_recall`` does),
one set up by LangGraph's ``PostgresStore.setup()`` with its HNSW index (``m`` 16,
``ef_construction`` 64, its defaults) and loaded through its own ``batch`` of puts into one
namespace. Then, per query, interleaved, ``--rounds`` times:

- ``recall``: ``PgvectorDriver.recall(user, query=text, top_k=10)``, hybrid;
- ``langgraph``: ``PostgresStore.search(("solo",), query=text, limit=10)``, vector only;
- ``hnsw``: the bare HNSW query on the driver's table (``bench.pgvector_recall``'s baseline).

Neither side embeds the query: both get its vector from a dict lookup (the embedding functions
are given the corpus's own vectors), so the figures are the stores' own work. mem0, the other
peer of the issue's table, is left out: its package brings an LLM client, a vector-store client
and telemetry, a large install for one row. The ``peers`` extra is for this benchmark only; no
test needs it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from app.core.memory.embeddings import get_default_embedder
from bench.backends import open_backend
from bench.pgvector_recall import (
    baseline_connection,
    bulk_load,
    hnsw_baseline,
    percentiles,
    timed,
)
from bench.results import write_results
from bench.workload import BenchEmbedder, Corpus, base_sentences, make_corpus

TOP_K = 10
NAMESPACE = ("solo",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        import langgraph.store.postgres  # noqa: F401
    except ImportError:
        parser.error("LangGraph's store is not installed: scripts/install.sh pgvector peers")
    model = get_default_embedder()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    corpus = make_corpus(model.embed_documents(base_sentences()), max(sizes), args.queries)
    rows = []
    for size in sizes:
        with open_backend("pgvector") as ours, open_backend("pgvector") as theirs:
            bulk_load(ours.location, corpus, ["solo"], 0, size)
            with langgraph_store(theirs.location, corpus) as store:
                began = time.perf_counter()
                load_langgraph(store, corpus, size)
                print(f"{size:,}: LangGraph's store loaded in {time.perf_counter() - began:.0f} s",
                      flush=True)
                rows.append({"memories": size} | measure(ours.location, store, corpus,
                                                         args.rounds))
        print(render(rows[-1:]), flush=True)
    print(render(rows))
    write_results("peers", {"rows": rows, "queries": args.queries, "rounds": args.rounds})
    return 0


@contextmanager
def langgraph_store(url: str, corpus: Corpus) -> Iterator[Any]:
    """LangGraph's ``PostgresStore`` on ``url`` (set up, HNSW-indexed), embedding by lookup."""
    from langgraph.store.postgres import PostgresStore

    lookup = _lookup(corpus)
    index: Any = {"dims": corpus.vectors.shape[1], "embed": lookup, "fields": ["text"],
                  "ann_index_config": {"kind": "hnsw", "vector_type": "vector"}}
    with PostgresStore.from_conn_string(url, index=index) as store:
        store.setup()
        yield store


def load_langgraph(store: Any, corpus: Corpus, size: int, batch: int = 500) -> None:
    """Memories ``0..size`` of ``corpus`` as items ``m<i>`` of one namespace."""
    from langgraph.store.base import PutOp

    for start in range(0, size, batch):
        store.batch([PutOp(NAMESPACE, f"m{i}", {"text": corpus.texts[i]}, index=["text"])
                     for i in range(start, min(size, start + batch))])


def measure(url: str, store: Any, corpus: Corpus, rounds: int) -> dict[str, Any]:
    """Recall, LangGraph's search and the bare HNSW query, interleaved per query."""
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    embedder = BenchEmbedder(get_default_embedder())
    embedder.preset_queries(corpus.query_texts, corpus.query_vectors)
    driver = PgvectorDriver(url=url, embedder=embedder)
    timings: dict[str, list[float]] = {"recall": [], "langgraph": [], "hnsw": []}
    try:
        with baseline_connection(url) as conn:
            calls: dict[str, Callable[[int], Sequence[object]]] = {
                "recall": lambda q: driver.recall("solo", query=corpus.query_texts[q],
                                                  top_k=TOP_K),
                "langgraph": lambda q: store.search(NAMESPACE, query=corpus.query_texts[q],
                                                    limit=TOP_K),
                "hnsw": lambda q: hnsw_baseline(conn, "solo", corpus.query_vectors[q]),
            }
            for call in calls.values():  # warm: a first call is a cold start
                call(0)
            for r in range(rounds):
                order = list(calls) if r % 2 == 0 else list(reversed(calls))
                for q in range(len(corpus.query_texts)):
                    for name in order:
                        timings[name].append(1000 * timed(partial(calls[name], q)))
            # A search that returns fewer than top_k did less work than asked for.
            short = {name: sum(len(calls[name](q)) < TOP_K for q in range(len(corpus.query_texts)))
                     for name in ("recall", "langgraph")}
    finally:
        driver.close()
    return {name: percentiles(values) for name, values in timings.items()} | {"short": short}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| memories, one user | recall p50 / p95 ms | LangGraph search p50 / p95 ms | "
             "bare HNSW p50 / p95 ms | recall / LangGraph | recall / bare HNSW | "
             "short of 10: recall / LangGraph |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ours, theirs, floor = row["recall"], row["langgraph"], row["hnsw"]
        lines.append(
            f"| {row['memories']:,} | {ours['p50']:.2f} / {ours['p95']:.2f} | "
            f"{theirs['p50']:.2f} / {theirs['p95']:.2f} | {floor['p50']:.2f} / "
            f"{floor['p95']:.2f} | {ours['p50'] / theirs['p50']:.2f} | "
            f"{ours['p50'] / floor['p50']:.2f} | {row['short']['recall']} / "
            f"{row['short']['langgraph']} |")
    return "\n".join(lines)


def _lookup(corpus: Corpus) -> Callable[[Sequence[str]], list[list[float]]]:
    """An embedding function giving each corpus text (memory or query) its own vector."""
    vectors = dict(zip(corpus.texts, corpus.vectors, strict=True))
    vectors.update(zip(corpus.query_texts, corpus.query_vectors, strict=True))

    def embed(texts: Sequence[str]) -> list[list[float]]:
        return [vectors[text].tolist() for text in texts]
    return embed


if __name__ == "__main__":
    raise SystemExit(main())
