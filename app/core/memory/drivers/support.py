"""What the drivers that embed on their own side (sqlite, pgvector) share beyond the contract.

``EmbeddingSupport`` gives them the embedder (the process-wide one unless injected) and the
embedding-identity check made before the first vector is written or searched: the model is
recorded in the database on first use, and a driver configured with another model refuses to mix
its vectors in. ``claim_user_id`` is the id-generating loop of ``create_user``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from app.core.memory.embeddings import Embedder, get_default_embedder, identity_mismatch
from app.core.memory.errors import BackendUnavailableError, InvalidInputError
from app.core.memory.portable import PortableRecord

USER_ID_ATTEMPTS = 5
#: Texts per chunk when a batch is encoded while earlier chunks are written. Small, because the
#: last chunk's write waits for nothing to overlap it (on PostgreSQL each row's HNSW insert
#: costs ~0.7 ms at 10k memories): 256 texts stored at a median 0.90 of the encode rate with
#: chunks of 16 against 0.85 with 64 (8 interleaved rounds, 10k memories); the model runs
#: batches of at most 32 anyway (``onnx_embedder.MAX_RUN_BATCH``).
EMBED_CHUNK_SIZE = 16


class EmbeddingSupport:
    """Mixin: set ``_embedder`` (or ``None``) and ``_identity_checked = False`` in ``__init__``
    and implement ``_record_identity`` and ``_identity_location``."""

    _embedder: Embedder | None
    _identity_checked: bool

    @property
    def embedder(self) -> Embedder:
        """The embedder in use (the process-wide default unless one was injected)."""
        if self._embedder is None:
            self._embedder = get_default_embedder()
        return self._embedder

    def _embed_documents(self, texts: list[str]) -> np.ndarray:
        self._check_identity()
        return self.embedder.embed_documents(texts)

    def _embed_in_chunks(self, texts: list[str],
                         chunk_size: int = EMBED_CHUNK_SIZE) -> Iterator[np.ndarray]:
        """The vectors of ``texts``, ``chunk_size`` at a time, in order.

        While the caller writes one chunk, the next is encoded on a worker thread (the model and
        the database client both release the GIL), so a large batch costs about the larger of
        the two, not their sum. Closing the iterator early waits for the chunk in flight.
        """
        self._check_identity()
        chunks = [texts[i:i + chunk_size] for i in range(0, len(texts), chunk_size)]
        if len(chunks) <= 1:
            yield from (self.embedder.embed_documents(chunk) for chunk in chunks)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-ahead") as worker:
            pending = worker.submit(self.embedder.embed_documents, chunks[0])
            for following in chunks[1:]:
                vectors = pending.result()
                pending = worker.submit(self.embedder.embed_documents, following)
                yield vectors
            yield pending.result()

    def _embed_query(self, text: str) -> np.ndarray:
        self._check_identity()
        return self.embedder.embed_query(text)

    def _import_vectors(self, records: Sequence[PortableRecord],
                        vectors_from: dict[str, Any] | None) -> list[list[np.ndarray]]:
        """For each record, the vectors to store with it (a memory: one; a document: one per
        chunk; a user: none): the record's own when they were made by this driver's model,
        otherwise new ones, encoded here in one batch."""
        self._check_identity()
        own = {"model": self.embedder.model_name, "dimension": self.embedder.dimension}
        reuse = vectors_from == own
        given: list[list[np.ndarray | None]] = []
        for record in records:
            if record["type"] == "memory":
                given.append([record["embedding"]])
            elif record["type"] == "knowledge_document":
                given.append([chunk["embedding"] for chunk in record["chunks"]])
            else:
                given.append([])
        texts = [text for record, vectors in zip(records, given, strict=True)
                 for text, vector in zip(_texts(record), vectors, strict=True)
                 if vector is None or not reuse]
        encoded = iter(self.embedder.embed_documents(texts)) if texts else iter(())
        return [[vector if vector is not None and reuse else next(encoded) for vector in vectors]
                for vectors in given]

    def _check_identity(self) -> None:
        if self._identity_checked:
            return
        model, dimension = self.embedder.model_name, self.embedder.dimension
        stored = self._record_identity(model, dimension)
        if stored is not None and stored != {"model": model, "dimension": dimension}:
            raise identity_mismatch(self._identity_location, stored, model, dimension)
        self._identity_checked = True

    def _record_identity(self, model: str, dimension: int) -> dict[str, Any] | None:
        """Record (model, dimension) unless one is recorded; return the recorded one."""
        raise NotImplementedError

    @property
    def _identity_location(self) -> str:
        """Where the vectors live, for the mismatch message."""
        raise NotImplementedError


def _texts(record: PortableRecord) -> list[str]:
    if record["type"] == "memory":
        return [record["content"]]
    if record["type"] == "knowledge_document":
        return [chunk["content"] for chunk in record["chunks"]]
    return []


def claim_user_id(chosen: str | None, insert: Callable[[str], bool]) -> str:
    """Insert a user record under ``chosen``, or under a new ``user_`` + 8 hex id.

    ``insert(user_id)`` returns whether it inserted (false: the id exists). A taken ``chosen``
    id is bad input; generated ids are retried a few times.
    """
    for _ in range(USER_ID_ATTEMPTS):
        candidate = chosen or f"user_{secrets.token_hex(4)}"
        if insert(candidate):
            return candidate
        if chosen:
            raise InvalidInputError(f"user_id {chosen!r} already exists")
    raise BackendUnavailableError("could not generate a free user id; try again")
