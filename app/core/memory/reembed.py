"""Re-embedding every stored vector with another (or the same) model, resumably.

The SQL drivers keep a staging column beside each vector (migration ``..._000002``). A run:

1. ``begin``: records the target model; if an earlier run for the same model was interrupted,
   its staged vectors are kept (a run for another model discards them and starts over).
2. Rows without a staged vector are read in primary-key order, ``batch_size`` at a time, encoded,
   and staged, each batch committed on its own, so an interruption loses one batch at most. A
   row whose content changed after it was read is not staged (its text is compared on write).
3. ``finish``: one transaction that holds writers off, stages what is still missing (rows written
   during the run), moves every staged vector into place, records the new model identity and
   forgets the target.

Readers use the old vectors until step 3 commits and the new ones after; never a mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.core.memory.base import Progress
from app.core.memory.embeddings import Embedder
from app.core.memory.validation import check_positive_int

#: The tables whose vectors a re-embed recomputes, in the order it does them.
CORPORA = ("memories", "knowledge_chunks")
MAX_BATCH_SIZE = 4_096


def corpus_table(corpus: str) -> str:
    """``corpus`` checked to be one of ``CORPORA`` (it is pasted into SQL as a table name)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}")
    return corpus


@dataclass(frozen=True)
class ReembedStart:
    """Where a run starts: how many rows there are and how many an earlier run staged."""

    resumed: bool
    total: int
    staged: int


@dataclass(frozen=True)
class ReembedReport:
    """What a finished run did."""

    model: str
    dimension: int
    previous: dict[str, Any] | None
    resumed: bool
    already_staged: int
    embedded: int
    total: int


class StagedVectors(Protocol):
    """What a driver provides for ``run_reembed``."""

    def _reembed_begin(self, model: str, dimension: int) -> ReembedStart: ...

    def _reembed_pending(self, corpus: str, after_pk: int,
                         limit: int) -> list[tuple[int, str]]: ...

    def _reembed_stage(self, corpus: str, rows: list[tuple[int, str]],
                       vectors: np.ndarray) -> None: ...

    def _reembed_finish(self, model: str, dimension: int,
                        embed: Callable[[list[str]], np.ndarray]) -> tuple[
                            dict[str, Any] | None, int]: ...


def run_reembed(store: StagedVectors, embedder: Embedder, *, batch_size: int,
                progress: Progress | None = None) -> ReembedReport:
    """Steps 1-3 above; ``progress(done, total)`` after every batch."""
    batch_size = check_positive_int(batch_size, "batch_size", maximum=MAX_BATCH_SIZE)
    model, dimension = embedder.model_name, embedder.dimension
    start = store._reembed_begin(model, dimension)
    done = start.staged
    embedded = 0
    if progress:
        progress(done, start.total)
    for corpus in CORPORA:
        after_pk = 0
        while rows := store._reembed_pending(corpus, after_pk, batch_size):
            store._reembed_stage(corpus, rows,
                                 embedder.embed_documents([text for _, text in rows]))
            after_pk = rows[-1][0]
            done, embedded = done + len(rows), embedded + len(rows)
            if progress:
                progress(min(done, start.total), start.total)
    previous, late = store._reembed_finish(model, dimension, embedder.embed_documents)
    return ReembedReport(model=model, dimension=dimension, previous=previous,
                         resumed=start.resumed, already_staged=start.staged,
                         embedded=embedded + late, total=start.total)
