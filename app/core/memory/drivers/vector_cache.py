"""In-process copies of vector spaces, so that a recall scans a matrix instead of reading blobs.

Reading 10k float32 blobs out of SQLite rows costs ~30 ms per query; a matrix-vector product over
the same vectors costs ~0.5 ms. So each ``VectorSpace`` holds one space's vectors (one user's
memories, or all knowledge chunks) as a contiguous float32 matrix plus the row keys (``pk``), and
is brought up to date before every search by the caller's ``sync`` (which reads only rows newer
than the copy, see the SQLite migration). The copy may hold rows that are soft-deleted, expired or
filtered out: callers check candidates against the database, which stays the source of truth.

``VectorCache`` keeps the spaces of the most recently used users and evicts the least recently
used ones beyond ``max_vectors`` in total (a space is rebuilt from the database when needed again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from app.core.memory.errors import EmbeddingMismatchError


class VectorSpace:
    """One space's vectors: ``pks[i]`` is the row key of ``matrix[i]``. Guard use with ``lock``."""

    def __init__(self, dimension: int) -> None:
        self.lock = threading.Lock()
        self.dimension = dimension
        self.size = 0
        self.pks = np.empty(0, dtype=np.int64)
        self.matrix = np.empty((0, dimension), dtype=np.float32)
        self.positions: dict[int, int] = {}
        #: The database's (last_seq, removed) this copy reflects; None until the first load.
        self.version: tuple[int, int] | None = None

    def clear(self) -> None:
        self.size = 0
        self.positions.clear()
        self.version = None

    def upsert(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """Add rows ``(pk, float32 blob)``; a pk already present gets its vector replaced."""
        rows = list(rows)
        self._reserve(self.size + len(rows))
        for pk, blob in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            if vector.shape[0] != self.dimension:
                # Another process re-embedded the store with a model of another size.
                raise EmbeddingMismatchError(
                    f"stored vector of row {pk} has {vector.shape[0]} dimensions but the "
                    f"configured model makes {self.dimension}: the store was re-embedded with "
                    "another model; configure that model (MEMORY_EMBEDDING_MODEL) and restart, "
                    "or run `python -m app reembed` to switch it back")
            position = self.positions.get(pk)
            if position is None:
                position = self.size
                self.positions[pk] = position
                self.pks[position] = pk
                self.size += 1
            self.matrix[position] = vector

    def scan(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pks, cosine similarities) of every row, as new arrays; takes ``lock`` itself."""
        with self.lock:
            scores = self.matrix[: self.size] @ query
            return self.pks[: self.size].copy(), scores

    def similarities_of(self, pks: Iterable[int], query: np.ndarray) -> dict[int, float]:
        """Cosine similarity of each given pk that this space holds."""
        positions = [(pk, self.positions[pk]) for pk in pks if pk in self.positions]
        if not positions:
            return {}
        index = np.fromiter((position for _, position in positions), dtype=np.int64)
        scores = self.matrix[index] @ query
        return {pk: float(score) for (pk, _), score in zip(positions, scores, strict=True)}

    def _reserve(self, needed: int) -> None:
        capacity = self.pks.shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)
        matrix = np.empty((new_capacity, self.dimension), dtype=np.float32)
        matrix[: self.size] = self.matrix[: self.size]
        pks = np.empty(new_capacity, dtype=np.int64)
        pks[: self.size] = self.pks[: self.size]
        self.matrix, self.pks = matrix, pks


class VectorCache:
    """Spaces by name, least recently used evicted beyond ``max_vectors`` vectors in total."""

    def __init__(self, dimension: int, max_vectors: int) -> None:
        self.dimension = dimension
        self.max_vectors = max_vectors
        self._spaces: OrderedDict[str, VectorSpace] = OrderedDict()
        self._lock = threading.Lock()

    def space(self, name: str) -> VectorSpace:
        """The space called ``name`` (created empty, version ``None``, if absent)."""
        with self._lock:
            space = self._spaces.get(name)
            if space is None:
                space = VectorSpace(self.dimension)
                self._spaces[name] = space
            self._spaces.move_to_end(name)
            self._evict(keep=name)
            return space

    def drop(self, name: str) -> None:
        with self._lock:
            self._spaces.pop(name, None)

    def total_vectors(self) -> int:
        with self._lock:
            return sum(space.size for space in self._spaces.values())

    def _evict(self, keep: str) -> None:
        total = sum(space.size for space in self._spaces.values())
        for name in list(self._spaces):
            if total <= self.max_vectors:
                break
            if name != keep:
                total -= self._spaces.pop(name).size
