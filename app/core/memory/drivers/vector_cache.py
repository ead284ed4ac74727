"""In-process copies of vector spaces, so that a recall scans a matrix instead of reading blobs.

Reading 10k float32 blobs out of SQLite rows costs ~30 ms per query; a matrix-vector product over
the same vectors costs ~0.5 ms. So each ``VectorSpace`` holds one space's vectors (one user's
memories, or all knowledge chunks) as a contiguous float32 matrix plus the row keys (``pk``), and
is brought up to date before every search by the caller's ``sync`` (which reads only rows newer
than the copy, see the SQLite migration). The copy may hold rows that are soft-deleted, expired or
filtered out: callers check candidates against the database, which stays the source of truth.

``VectorCache`` keeps the spaces of the most recently used users and evicts the least recently
used ones beyond its byte budget (a space is rebuilt from the database when needed again). The
budget counts what a space really holds: its matrix and key arrays at their allocated capacity,
its pk index, and a fixed per-space overhead, so 20,000 users of one memory each cost what they
occupy, not one vector each. The budget is ``max_bytes``, by default the bytes of ``max_vectors``
vectors. The space in use is never evicted, so one space bigger than the budget still works.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from app.core.memory.errors import EmbeddingMismatchError

#: What a space costs beyond its arrays: the object, its lock, dict and version (measured ~1 KB).
SPACE_OVERHEAD_BYTES = 2_048
#: What one entry of a space's pk -> position dict costs (two ints and the slot, measured ~100).
POSITION_BYTES = 120


class VectorSpace:
    """One space's vectors: ``pks[i]`` is the row key of ``matrix[i]``. Guard use with ``lock``."""

    def __init__(self, dimension: int, on_grow: Callable[[VectorSpace], None] | None = None
                 ) -> None:
        self.lock = threading.Lock()
        self.dimension = dimension
        self.size = 0
        self.pks = np.empty(0, dtype=np.int64)
        self.matrix = np.empty((0, dimension), dtype=np.float32)
        self.positions: dict[int, int] = {}
        #: The database's (last_seq, removed) this copy reflects; None until the first load.
        self.version: tuple[int, int] | None = None
        #: Called (with this space) after its arrays grew, so that the cache can evict others.
        self._on_grow = on_grow

    @property
    def nbytes(self) -> int:
        """What this space occupies: arrays and pk index at capacity, the fixed overhead. It
        changes only when the arrays grow, which is when the cache is told."""
        return (self.matrix.nbytes + self.pks.nbytes + POSITION_BYTES * self.pks.shape[0]
                + SPACE_OVERHEAD_BYTES)

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
        # Exactly what a first load needs (most spaces are loaded once and grow little), then
        # doubling; no fixed minimum, which made every one-memory user cost 64 vectors.
        new_capacity = max(needed, 2 * capacity)
        matrix = np.empty((new_capacity, self.dimension), dtype=np.float32)
        matrix[: self.size] = self.matrix[: self.size]
        pks = np.empty(new_capacity, dtype=np.int64)
        pks[: self.size] = self.pks[: self.size]
        self.matrix, self.pks = matrix, pks
        if self._on_grow is not None:
            self._on_grow(self)


class VectorCache:
    """Spaces by name, least recently used evicted beyond ``max_bytes`` in total (default: the
    bytes of ``max_vectors`` vectors), counting each space's real footprint (see the module)."""

    def __init__(self, dimension: int, max_vectors: int, *, max_bytes: int | None = None) -> None:
        self.dimension = dimension
        self.max_vectors = max_vectors
        self.max_bytes = max_bytes if max_bytes else max_vectors * dimension * 4
        self._spaces: OrderedDict[str, VectorSpace] = OrderedDict()
        #: Each cached space's bytes as last counted, and their sum (kept, not recomputed).
        self._counted: dict[int, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def space(self, name: str) -> VectorSpace:
        """The space called ``name`` (created empty, version ``None``, if absent)."""
        with self._lock:
            space = self._spaces.get(name)
            if space is None:
                space = VectorSpace(self.dimension, on_grow=self._grown)
                self._spaces[name] = space
                self._count(space)
            self._spaces.move_to_end(name)
            self._evict(keep=space)
            return space

    def drop(self, name: str) -> None:
        with self._lock:
            space = self._spaces.pop(name, None)
            if space is not None:
                self._bytes -= self._counted.pop(id(space), 0)

    def total_vectors(self) -> int:
        with self._lock:
            return sum(space.size for space in self._spaces.values())

    def total_bytes(self) -> int:
        """What the cached spaces occupy, as the budget counts it."""
        with self._lock:
            return self._bytes

    def _grown(self, space: VectorSpace) -> None:
        with self._lock:
            if id(space) in self._counted:  # not evicted meanwhile
                self._count(space)
                self._evict(keep=space)

    def _count(self, space: VectorSpace) -> None:
        self._bytes += space.nbytes - self._counted.get(id(space), 0)
        self._counted[id(space)] = space.nbytes

    def _evict(self, keep: VectorSpace) -> None:
        """Drop least recently used spaces (never ``keep``) until the rest fit the budget."""
        while self._bytes > self.max_bytes and len(self._spaces) > 1:
            name, oldest = next(iter(self._spaces.items()))
            if oldest is keep:
                self._spaces.move_to_end(name)
                continue
            del self._spaces[name]
            self._bytes -= self._counted.pop(id(oldest), 0)
