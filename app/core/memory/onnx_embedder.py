"""The ONNX Runtime embedder: a prepared model folder, tokenized with ``tokenizers``, run by
``onnxruntime``, pooled and normalised in numpy. Neither torch nor sentence-transformers is
imported.

A model folder (one per model, under ``MEMORY_MODEL_DIR``, by default
``$XDG_CACHE_HOME/agent-memory-layer/models``) is made once by ``python -m app models prepare``
(``onnx_export.py``) from the packaged weights, and holds:

- ``model.onnx``: the transformer, inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
  (int64, batch x tokens), output the last hidden state (batch x tokens x dimension);
- ``tokenizer.json``: the model package's own tokenizer file, copied;
- ``manifest.json``: what the model's sentence-transformers configuration says about the rest
  (maximum tokens, pooling, normalisation, dimension), each file's size and SHA-256, and a check
  sentence with the vector torch gave it.

The packaged model has a second folder, ``all-MiniLM-L6-v2-int8`` (``INT8_MODEL``): its weight
matrices quantized to int8 (ONNX Runtime dynamic quantization, see ``onnx_export.py``), a query
~2x faster on a CPU with VNNI/AMX, vectors at cosine ~0.99 to fp32's, each text run alone.
``OnnxEmbedder(..., int8=True)`` runs it under the packaged model's own name
(``MEMORY_EMBEDDING_PRECISION=int8``, the default), because its vectors may share a store with
fp32's (measured, README: Embedding backends). The folder's name is also a model name of its own
(the opt-in of an earlier release, kept for the stores it made). Its manifest's check vector is
its own, not torch's.

Loading checks the files' sizes and embeds the check sentence: a missing, truncated or otherwise
damaged folder, or a tokenizer that no longer tokenizes as it did, is a ``MissingDependencyError``
naming the command that makes it again, never wrong vectors. The session runs with
``MEMORY_EMBEDDING_THREADS`` intra-op threads (default 1; 0: one per core), which sleep rather
than spin between calls so that a recall's vector scan right after an embedding gets the cores.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.core.memory.embeddings import DEFAULT_MODEL, PACKAGED_MODELS, QueryVectorCache
from app.core.memory.errors import MissingDependencyError

#: Bumped whenever the folder's layout or the export changes; an older folder is re-made.
FORMAT = 1
MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE = "model.onnx", "tokenizer.json", "manifest.json"
PREPARE_COMMAND = "python -m app models prepare"
#: A loaded model must give the check sentence (at least) this cosine to torch's vector.
CHECK_COSINE = 0.9999
POOLING_MODES = ("mean", "cls", "max")
#: Texts per ONNX Runtime call at most, whatever ``MEMORY_EMBEDDING_BATCH_SIZE`` allows: measured
#: (256 texts, interleaved) 17% more texts per CPU second than 64 for int8, ~10% for fp32; the
#: activations of a smaller batch stay in the core's cache.
MAX_RUN_BATCH = 32
#: The int8 variant of a packaged model is that model's name plus this suffix.
INT8_SUFFIX = "-int8"
INT8_MODEL = DEFAULT_MODEL + INT8_SUFFIX
#: The resolved backend of the onnx backend running a packaged model's int8 folder.
ONNX_INT8 = "onnx-int8"


def int8_base(model_name: str) -> str | None:
    """The packaged model whose int8 variant ``model_name`` names, else ``None``."""
    base = model_name.removesuffix(INT8_SUFFIX)
    return base if base != model_name and base in PACKAGED_MODELS else None


class OnnxEmbedder:
    """An ``Embedder`` over a prepared ONNX model folder, loaded lazily and thread-safely.

    ``int8``: run the packaged model's int8 folder under the model's own name (``ValueError`` for
    a model that has none); ``backend`` is then ``onnx-int8``, and ``batch_size`` is 1.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, *, folder: Path | None = None,
                 int8: bool = False, batch_size: int = 64, threads: int = 1,
                 query_cache_size: int = 1_024) -> None:
        if int8 and model_name not in PACKAGED_MODELS:
            raise ValueError(f"only the packaged model has an int8 folder (got {model_name!r})")
        self._model_name = model_name
        self.backend = ONNX_INT8 if int8 else "onnx"
        self._folder = folder or model_folder(INT8_MODEL if int8 else model_name)
        # Dynamic quantization scales a run's activations by the run's largest value, so a text
        # batched with others got another vector than alone (cosine 0.9695 at worst over 600
        # texts, alone vs. in batches of 32): int8 runs each text alone, which makes a vector a
        # function of its text only, as a query's is. Alone it still embeds 1.8x the texts per
        # second torch does batched (382 against 214, 600 texts, 2 threads).
        runs_int8 = int8 or int8_base(model_name) is not None
        self._batch_size = 1 if runs_int8 else min(max(1, batch_size), MAX_RUN_BATCH)
        self._threads = max(0, threads)
        self._loaded_model: _LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._query_cache = QueryVectorCache(query_cache_size)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def dimension(self) -> int:
        return self._loaded().dimension

    @property
    def is_loaded(self) -> bool:
        return self._loaded_model is not None

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        model = self._loaded()
        if not texts:
            return np.zeros((0, model.dimension), dtype=np.float32)
        return model.embed(list(texts), self._batch_size)

    def embed_query(self, text: str) -> np.ndarray:
        return self._query_cache.vector_for(text, self.embed_documents)

    def _loaded(self) -> _LoadedModel:
        if self._loaded_model is None:
            with self._load_lock:
                if self._loaded_model is None:
                    self._loaded_model = _LoadedModel(self._model_name, self._folder,
                                                      self._threads)
        return self._loaded_model


class _LoadedModel:
    """The tokenizer, the session and the manifest of one model folder, checked on load."""

    def __init__(self, model_name: str, folder: Path, threads: int, *,
                 check: bool = True) -> None:
        manifest = read_manifest(model_name, folder)
        for name, expected in manifest["files"].items():
            path = folder / name
            size = path.stat().st_size if path.is_file() else None
            if size != expected["bytes"]:
                raise damaged(model_name, folder, f"{name} has {size} bytes, the manifest says "
                                                  f"{expected['bytes']}")
        self.dimension = int(manifest["dimension"])
        self.pooling = str(manifest["pooling"])
        self.normalize = bool(manifest["normalize"])
        if self.pooling not in POOLING_MODES:
            raise damaged(model_name, folder, f"unknown pooling {self.pooling!r}")
        # Batches here are small enough to tokenize on one thread, and a process that forks after
        # tokenizers used its thread pool (servers with workers, multiprocessing) would print a
        # warning and could deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError(
                "The onnx embedding backend needs onnxruntime and tokenizers: "
                "pip install onnxruntime tokenizers (or set MEMORY_EMBEDDING_BACKEND=torch)"
            ) from exc
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle workers otherwise spin for a while after every call and take the cores from
            # the vector scan (or the database) that follows an embedding.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self.session = onnxruntime.InferenceSession(
                str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime and tokenizers raise their own, untyped errors
            raise damaged(model_name, folder, f"it does not load ({exc})") from exc
        # The file's own padding and truncation are replaced by the sentence-transformers
        # configuration: pad each batch to its longest text, cut at max_seq_length tokens.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(manifest["max_seq_length"]))
        self.inputs = {item.name for item in self.session.get_inputs()}
        if check:
            self._check(model_name, folder, manifest["check"])

    def _check(self, model_name: str, folder: Path, check: dict[str, Any]) -> None:
        got = self.embed([check["text"]], 1)[0]
        expected_vector = np.asarray(check["vector"], dtype=np.float32)
        cosine = float(got @ expected_vector / (np.linalg.norm(got) *
                                                np.linalg.norm(expected_vector) or 1.0))
        if not cosine >= CHECK_COSINE:
            raise damaged(model_name, folder, f"its check sentence has cosine {cosine:.4f} to "
                                              "the vector recorded when it was made")

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Vectors of ``texts`` in order, encoded shortest first so that batches pad little."""
        if len(texts) == 1:  # a query: no padding, no mask, no sorting (~0.15 ms less per call)
            return self._run_one(self.tokenizer.encode(texts[0], add_special_tokens=True))
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        order = np.argsort([len(encoding.ids) for encoding in encodings], kind="stable")
        result = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            result[rows] = self._run([encodings[i] for i in rows])
        return result

    def _run(self, encodings: list[Any]) -> np.ndarray:
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
            types[row, :length] = encoding.type_ids
        return self._finish(self._hidden(ids, mask, types), mask)

    def _run_one(self, encoding: Any) -> np.ndarray:
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        return self._finish(self._hidden(ids, mask, np.array([encoding.type_ids], np.int64)),
                            mask)

    def _hidden(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        return np.asarray(hidden, dtype=np.float32)

    def _finish(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        vectors = _pool(hidden, mask, self.pooling)
        if self.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """One vector per row of ``hidden``, over its real (unpadded) tokens, as the model's
    sentence-transformers ``Pooling`` module computes it."""
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0, :])
    weights = mask[:, :, None].astype(np.float32)
    if mode == "max":
        return np.where(weights > 0, hidden, -1e9).max(axis=1)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def model_dir() -> Path:
    """Where model folders live: ``MEMORY_MODEL_DIR``, else the user's cache folder."""
    from config.settings import get_settings

    configured = get_settings().model_dir
    if configured:
        return Path(configured).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "agent-memory-layer" / "models"


def model_folder(model_name: str) -> Path:
    """The folder of ``model_name``'s ONNX files (which may not exist yet)."""
    if model_name in PACKAGED_MODELS:
        return model_dir() / DEFAULT_MODEL
    if int8_base(model_name) is not None:
        return model_dir() / INT8_MODEL
    import hashlib

    # Any other name is a local path or a hub name: a readable part plus a hash that keeps two
    # models whose readable parts agree apart.
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("._")[-60:] or "model"
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:10]
    return model_dir() / f"{readable}-{digest}"


def is_prepared(model_name: str, *, int8: bool = False) -> bool:
    """Whether ``model_name`` (its int8 folder, with ``int8``) has a model folder with a manifest
    (its files are checked on load)."""
    folder = model_dir() / INT8_MODEL if int8 else model_folder(model_name)
    return (folder / MANIFEST_FILE).is_file()


def read_manifest(model_name: str, folder: Path) -> dict[str, Any]:
    """The folder's manifest; ``MissingDependencyError`` if it is missing, unreadable or old."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if int8_base(model_name) is not None:  # runs on onnx only: no torch to fall back to
            raise MissingDependencyError(
                f"The ONNX model for {model_name} is not prepared (no {path}): run "
                f"`{PREPARE_COMMAND} --model {model_name}`")
        raise MissingDependencyError(
            f"The ONNX model for {model_name} is not prepared (no {path}): run "
            f"`{PREPARE_COMMAND}`, or set MEMORY_EMBEDDING_BACKEND=torch")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest["format"] != FORMAT:
            raise damaged(model_name, folder, f"it was made in format {manifest['format']}, "
                                              f"this version reads {FORMAT}")
        for key in ("files", "dimension", "pooling", "normalize", "max_seq_length", "check"):
            manifest[key]  # noqa: B018 - a KeyError here means a damaged manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(model_name, folder, f"its manifest is unreadable ({exc!r})") from exc
    return dict(manifest)


def damaged(model_name: str, folder: Path, why: str) -> MissingDependencyError:
    """The error for a model folder that exists but cannot be used."""
    return MissingDependencyError(
        f"The ONNX model for {model_name} in {folder} is damaged: {why}. Make it again with "
        f"`{PREPARE_COMMAND}`, or set MEMORY_EMBEDDING_BACKEND=torch")
