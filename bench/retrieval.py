"""Retrieval quality on LoCoMo: the driver's recall against BM25 and dense-only baselines.

    python -m bench.retrieval [--data PATH] [--driver sqlite|pgvector] [--output DIR] [--sweep]
                              [--backends onnx,torch]

Protocol (``shared/bench/README.md``): one user per conversation, every turn one memory with
content ``"Speaker: text"``, metadata (dia_id, session, session date, speaker), the conversation
as ``conversation_id`` and its session's date as ``occurred_at``; each question is
``recall(user, query=question, top_k=25, reference_time=<the last session's date>)``; its
evidence turns are the relevant set. "dated" is the questions that name a time
(``time_phrases.window_named_by`` finds one), reported apart as well. Metrics per
question category and overall: recall@1/5/10/25 (share of the evidence in the top k), MRR and
NDCG@10; categories 1-4 are the headline, 5 (adversarial) is reported apart; results belonging to
another user are counted (must be 0). Baselines, on the same texts in the same run: BM25
(rank_bm25's BM25Okapi over lower-cased words) and dense-only exact cosine with the same model.
Each embedding backend of ``--backends`` (default: int8 and torch) runs the whole protocol on a
database of its own; its systems are labelled with its name, and the report gives the min and mean
cosine between the backends' vectors of every turn (when there are two). A backend is a name of
``bench.embedding_backends.SPECS`` (``int8``, ``fp32``, ``torch``) or ``DOCS/QUERIES``, e.g.
``torch/int8``: the memories embedded by one and the queries by the other, the store a model
upgrade leaves behind, which decides whether two backends' vectors may share a store. The data
set is for benchmarking only (CC BY-NC 4.0) and is never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.core.database.migrator import PROJECT_ROOT
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.ranking import FusionWeights
from app.core.memory.time_phrases import window_named_by
from bench.backends import open_backend

#: The weightings (vector, keyword, importance) ``--sweep`` compares with the default.
SWEEP = [FusionWeights(v, round(1 - v, 2), 0.05) for v in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "bench" / "locomo-dev.json"
KS = (1, 5, 10, 25)
#: The totals' key of the questions (categories 1-4) that name a time.
DATED = 0
DIA_ID = re.compile(r"D:?(\d+):(\d+)")
WORDS = re.compile(r"\w+")


def load(path: Path) -> list[dict[str, Any]]:
    """Conversations as ``{"user", "turns": [(dia_id, content, metadata)], "questions": [...]}``."""
    conversations = []
    for sample in json.loads(path.read_text(encoding="utf-8")):
        talk = sample["conversation"]
        turns = []
        for name, value in talk.items():
            match = re.fullmatch(r"session_(\d+)", name)
            if not match or not isinstance(value, list):
                continue
            date = talk.get(f"{name}_date_time", "")
            for turn in value:
                turns.append((turn["dia_id"], f"{turn['speaker']}: {turn['text']}",
                              {"dia_id": turn["dia_id"], "session": int(match.group(1)),
                               "session_date": date, "speaker": turn["speaker"]},
                              session_time(date)))
        known = {dia_id for dia_id, _, _, _ in turns}
        reference = max(when for *_, when in turns)
        questions = []
        for qa in sample["qa"]:
            evidence = {f"D{a}:{b}" for raw in qa.get("evidence", [])
                        for a, b in DIA_ID.findall(str(raw))} & known
            if evidence:
                questions.append({"question": qa["question"], "category": qa["category"],
                                  "evidence": evidence, "dated": window_named_by(
                                      qa["question"], reference) is not None})
        conversations.append({"user": re.sub(r"[^A-Za-z0-9_.:@-]", "_", sample["sample_id"]),
                              "turns": turns, "questions": questions, "reference": reference})
    return conversations


def session_time(text: str) -> datetime:
    """A session's date, e.g. "1:56 pm on 8 May, 2023", as an aware datetime (taken as UTC)."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def scores(ranked: Sequence[str], relevant: set[str]) -> dict[str, float]:
    """recall@k, reciprocal rank and NDCG@10 of one ranked list of dia_ids."""
    result = {f"recall@{k}": len(set(ranked[:k]) & relevant) / len(relevant) for k in KS}
    first = next((i for i, dia_id in enumerate(ranked) if dia_id in relevant), None)
    result["mrr"] = 0.0 if first is None else 1.0 / (first + 1)
    dcg = sum(1 / math.log2(i + 2) for i, dia_id in enumerate(ranked[:10]) if dia_id in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, len(relevant))))
    result["ndcg@10"] = dcg / ideal
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--driver", choices=("sqlite", "pgvector"), default="sqlite")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--sweep", action="store_true",
                        help="also rank with each fusion weighting of SWEEP (the tuning run)")
    parser.add_argument("--backends", default="int8,torch",
                        help="embedding backends, each measured on its own database")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"error: no data at {args.data} (pass --data)", file=sys.stderr)
        return 2
    conversations = load(args.data)
    totals: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    foreign = 0
    started = time.perf_counter()
    names = args.backends.split(",")
    vectors: dict[str, list[np.ndarray]] = {}
    for name in names:
        print(f"embedding backend {name} ...", file=sys.stderr, flush=True)
        embedder = embedder_named(name)
        label = f"{name}: " if len(names) > 1 else ""
        foreign += _run(args, conversations, embedder, label, totals,
                        vectors.setdefault(name, []))
    report = _report(totals, foreign, args, time.perf_counter() - started)
    if len(vectors) == 2:
        first, second = (np.vstack(v) for v in vectors.values())
        cosines = np.sum(first * second, axis=1)
        report["backend_cosine"] = {"min": float(cosines.min()), "mean": float(cosines.mean())}
        report["markdown"] += (f"\n\nCosine between the {' and '.join(vectors)} vectors of "
                               f"{len(cosines)} turns: min {cosines.min():.6f}, mean "
                               f"{cosines.mean():.6f}.")
    if len(names) > 1:
        report["markdown"] += "\n\n" + _backend_deltas(report["table"], names)
    print(report["markdown"])
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = args.output / f"retrieval-{args.driver}-{stamp}.json"
    target.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {target}")
    return 0


def embedder_named(spec: str) -> Any:
    """The embedder of a ``--backends`` item: a backend of ``SPECS``, or ``DOCS/QUERIES``."""
    from bench.embedding_backends import SPECS, embedder_of

    documents, _, queries = spec.partition("/")
    for name in (documents, queries or documents):
        if name not in SPECS:
            raise SystemExit(f"error: unknown backend {name!r} in {spec!r} (one of "
                             f"{', '.join(SPECS)}, or DOCS/QUERIES)")
    if not queries:
        return embedder_of(documents)
    return MixedEmbedder(embedder_of(documents), embedder_of(queries))


class MixedEmbedder:
    """Memories embedded by one embedder and queries by another, under the first one's model
    name (the identity the store records)."""

    def __init__(self, documents: Any, queries: Any) -> None:
        self._documents, self._queries = documents, queries

    @property
    def model_name(self) -> str:
        return str(self._documents.model_name)

    @property
    def dimension(self) -> int:
        return int(self._documents.dimension)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._documents.embed_documents(texts))

    def embed_query(self, text: str) -> np.ndarray:
        return np.asarray(self._queries.embed_query(text))


def _run(args: argparse.Namespace, conversations: list[dict[str, Any]], embedder: Any,
         label: str, totals: dict[str, dict[int, list[dict[str, float]]]],
         turn_vectors: list[np.ndarray]) -> int:
    """The protocol with one embedder on a new database: adds to ``totals`` under systems
    prefixed by ``label`` and to ``turn_vectors``; returns the count of another user's results."""
    from rank_bm25 import BM25Okapi

    foreign = 0
    with open_backend(args.driver) as backend:
        driver = backend.driver(embedder)
        variants = {f"recall, weights {w.vector}/{w.keyword}/{w.importance}":
                    backend.driver(embedder, weights=w) for w in (SWEEP if args.sweep else ())}
        try:
            for conversation in conversations:
                user, turns = conversation["user"], conversation["turns"]
                stored = driver.store_many([
                    {"user_id": user, "content": content, "metadata": meta,
                     "conversation_id": user, "occurred_at": when}
                    for _, content, meta, when in turns])
                dia_of = {memory["id"]: turn[0] for memory, turn in zip(stored, turns,
                                                                          strict=True)}
                reference = conversation["reference"]
                systems = _systems(driver, user, turns, embedder, BM25Okapi, turn_vectors,
                                   reference)
                systems.update({label: _recall_ids(variant, user, reference)
                                for label, variant in variants.items()})
                for question in conversation["questions"]:
                    for system, run in systems.items():
                        ranked = run(question["question"])
                        if system.startswith("recall"):  # memory ids, not dia_ids
                            foreign += sum(1 for memory_id in ranked if memory_id not in dia_of)
                            ranked = [dia_of[m] for m in ranked if m in dia_of]
                        result = scores(ranked, question["evidence"])
                        totals[label + system][question["category"]].append(result)
                        if question["dated"] and question["category"] != 5:
                            totals[label + system][DATED].append(result)
        finally:
            for opened in (driver, *variants.values()):
                opened.close()
    return foreign


def _systems(driver: BaseMemoryDriver, user: str, turns: list[tuple[str, str, Any, datetime]],
             embedder: Any, bm25_class: Any, turn_vectors: list[np.ndarray],
             reference: datetime) -> dict[str, Callable[[str], list[str]]]:
    """The ranked lists under comparison for one conversation: memory ids for the driver's
    recalls, dia_ids for the baselines."""
    texts = [turn[1] for turn in turns]
    dia_ids = [turn[0] for turn in turns]
    bm25 = bm25_class([WORDS.findall(text.lower()) for text in texts])
    matrix = embedder.embed_documents(texts)
    turn_vectors.append(matrix)

    def best(values: np.ndarray) -> list[str]:
        return [dia_ids[i] for i in np.argsort(-values, kind="stable")[:25]]

    return {
        "recall (hybrid)": _recall_ids(driver, user, reference),
        "recall use_vector=False": lambda q: _ids(driver.recall(
            user, query=q, top_k=25, use_vector=False, reference_time=reference)),
        "BM25 baseline": lambda q: best(bm25.get_scores(WORDS.findall(q.lower()))),
        "dense baseline": lambda q: best(matrix @ embedder.embed_query(q)),
    }


def _backend_deltas(table: dict[str, dict[str, dict[str, float]]], names: list[str]) -> str:
    """Headline (categories 1-4) recall@10 and MRR of every other backend minus the first's."""
    first = names[0]
    lines = [f"| system (1-4) | backend | recall@10 - {first}'s | MRR - {first}'s |",
             "|---|---|---:|---:|"]
    for system in ("recall (hybrid)", "dense baseline"):
        base = table[f"{first}: {system}"]["1-4"]
        for other in names[1:]:
            got = table[f"{other}: {system}"]["1-4"]
            lines.append(f"| {system} | {other} | {got['recall@10'] - base['recall@10']:+.4f} "
                         f"| {got['mrr'] - base['mrr']:+.4f} |")
    return "\n".join(lines)


def _recall_ids(driver: BaseMemoryDriver, user: str,
                reference: datetime) -> Callable[[str], list[str]]:
    return lambda q: _ids(driver.recall(user, query=q, top_k=25, reference_time=reference))


def _ids(memories: list[Any]) -> list[str]:
    return [memory["id"] for memory in memories]


def _report(totals: dict[str, dict[int, list[dict[str, float]]]], foreign: int,
            args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    metrics = [f"recall@{k}" for k in KS] + ["mrr", "ndcg@10"]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for system, by_category in totals.items():
        groups = {"1-4": [s for c in (1, 2, 3, 4) for s in by_category.get(c, [])],
                  "5": by_category.get(5, [])}
        groups["dated"] = by_category.get(DATED, [])
        groups.update({str(c): by_category[c] for c in sorted(by_category) if c != DATED})
        table[system] = {group: {m: statistics.fmean(s[m] for s in rows) for m in metrics}
                         | {"n": len(rows)} for group, rows in groups.items() if rows}
    lines = [f"Retrieval on {args.data.name}, driver {args.driver}, {seconds:.0f} s; results of "
             f"another user: {foreign}", "",
             "| system | categories | n | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for system, by_group in table.items():
        for group in ("1-4", "dated", "5", "1", "2", "3", "4"):
            if group in by_group:
                row = by_group[group]
                lines.append(f"| {system} | {group} | {int(row['n'])} | "
                             + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return {"driver": args.driver, "data": str(args.data), "foreign_results": foreign,
            "table": table, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
