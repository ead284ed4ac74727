"""The onnx embedding backend: fp32 gives torch's vectors and int8 close ones under the same
identity, no torch in a process that uses it, clear errors for a missing or damaged model folder,
and the backend and precision chosen by settings.

The prepared folders of the default model (``python -m app models prepare``, which
``scripts/install.sh`` runs) are used where they exist and made once per run otherwise. Tests that
damage a folder work on a copy in their own ``MEMORY_MODEL_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cli import main
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import (
    DEFAULT_MODEL,
    SentenceTransformerEmbedder,
    get_default_embedder,
    model_source,
    resolve_backend,
)
from app.core.memory.errors import EmbeddingMismatchError, InvalidInputError, MissingDependencyError
from app.core.memory.long_texts import WholeTextEmbedder
from app.core.memory.onnx_embedder import (
    INT8_MODEL,
    MODEL_FILE,
    ONNX_INT8,
    OnnxEmbedder,
    model_folder,
)
from app.core.memory.onnx_export import prepare
from config.settings import Settings, SettingsError, reset_settings
from tests.conftest import PROJECT_ROOT, migrate_sqlite

TEXTS = [
    "Prefers dark mode in every editor and terminal",
    "any food allergies?",
    "Is vegetarian and allergic to peanuts",
    "",
    "Zürich, São Paulo and 東京: three cities, one trip 🚲",
    " ".join(["A long memory that goes on past the model's limit of 256 tokens."] * 30),
    "ok",
]


@pytest.fixture(scope="session")
def prepared_folder() -> Path:
    """The default model's prepared folder (made now if this machine has none)."""
    reset_settings()
    prepare(DEFAULT_MODEL)
    folder = model_folder(DEFAULT_MODEL)
    reset_settings()
    return folder


@pytest.fixture(scope="session")
def prepared_int8_folder(prepared_folder: Path) -> Path:
    """The default model's int8 folder, beside ``prepared_folder`` (made now if missing)."""
    reset_settings()
    prepare(INT8_MODEL)
    folder = model_folder(INT8_MODEL)
    reset_settings()
    assert folder.parent == prepared_folder.parent
    return folder


@pytest.fixture(scope="session")
def torch_embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(DEFAULT_MODEL)


@pytest.fixture
def onnx_embedder(prepared_folder: Path) -> OnnxEmbedder:
    return OnnxEmbedder(DEFAULT_MODEL, folder=prepared_folder, batch_size=3)


@pytest.fixture
def own_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty ``MEMORY_MODEL_DIR`` of this test's own."""
    folder = tmp_path / "models"
    monkeypatch.setenv("MEMORY_MODEL_DIR", str(folder))
    reset_settings()
    yield folder
    reset_settings()


@pytest.fixture
def copied_folder(prepared_folder: Path, own_model_dir: Path) -> Path:
    """A copy of the prepared folder in this test's own ``MEMORY_MODEL_DIR``, free to damage."""
    target = model_folder(DEFAULT_MODEL)
    shutil.copytree(prepared_folder, target)
    return target


def test_onnx_vectors_equal_torch_vectors_in_batches_of_mixed_lengths(
        onnx_embedder: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder):
    got = onnx_embedder.embed_documents(TEXTS)  # 3 batches, sorted by length inside
    expected = torch_embedder.embed_documents(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(got * expected, axis=1)) >= 0.9999  # row i is text i's vector
    alone = np.vstack([onnx_embedder.embed_documents([text]) for text in TEXTS])
    assert np.allclose(alone, got, atol=1e-5)  # padding in a batch changes nothing
    query = onnx_embedder.embed_query("any food allergies?")
    assert onnx_embedder.embed_query("any food allergies?") is query and not query.flags.writeable
    assert onnx_embedder.embed_documents([]).shape == (0, 384)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_process_storing_and_recalling_with_onnx_never_imports_torch(
        prepared_folder: Path, prepared_int8_folder: Path, tmp_path: Path, precision: str):
    path = migrate_sqlite(tmp_path / "onnx.sqlite3")
    script = (
        "import sys, json\n"
        "from app.core.memory import get_memory_driver\n"
        "driver = get_memory_driver()\n"
        "driver.store('ana', 'Prefers dark mode in every editor')\n"
        "driver.store_many([{'user_id': 'ana', 'content': 'Is allergic to peanuts'},\n"
        "                   {'user_id': 'ana', 'content': 'Cycles to work along the river'}])\n"
        "found = driver.recall('ana', query='any food allergies?', top_k=1)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('torch', 'sentence_transformers', 'transformers'))\n"
        "print(json.dumps({'top': found[0]['content'], 'heavy': heavy,\n"
        "                  'embedder': type(driver.embedder.inner).__name__,\n"
        "                  'backend': driver.embedder.backend}))\n"
    )
    env = dict(os.environ, MEMORY_SQLITE_PATH=str(path), MEMORY_DRIVER="sqlite",
               MEMORY_EMBEDDING_BACKEND="onnx", MEMORY_EMBEDDING_PRECISION=precision,
               MEMORY_MODEL_DIR=str(prepared_folder.parent))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"top": "Is allergic to peanuts", "heavy": [], "embedder": "OnnxEmbedder",
                      "backend": ONNX_INT8 if precision == "int8" else "onnx"}


def test_a_store_may_hold_torch_and_onnx_vectors(
        sqlite_path: Path, onnx_embedder: OnnxEmbedder,
        torch_embedder: SentenceTransformerEmbedder):
    # Measured: cosine >= 0.9999 between the backends, so the identity is the model alone.
    with SqliteDriver(path=sqlite_path, embedder=torch_embedder) as written:
        ids = [memory["id"] for memory in written.store_many(
            [{"user_id": "bo", "content": text} for text in TEXTS[:3]])]
    with SqliteDriver(path=sqlite_path, embedder=onnx_embedder) as read:
        found = read.recall("bo", query="dark theme in the editor", top_k=1)
        health = read.health_check()
    assert found[0]["id"] == ids[0]
    assert health["checks"]["embedding"]["status"] == "ok"
    assert health["checks"]["embedding"]["configured"]["backend"] == "onnx"


def test_recall_without_a_prepared_model_names_the_command(
        own_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    migrate_sqlite(Path(os.environ["MEMORY_SQLITE_PATH"]))
    monkeypatch.setenv("MEMORY_EMBEDDING_BACKEND", "onnx")
    reset_settings()
    assert main(["recall", "ana", "any food allergies?"]) == 1
    err = capsys.readouterr().err
    assert "not prepared" in err and "`python -m app models prepare`" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "zeroed weights", "manifest", "tokenizer"])
def test_a_damaged_model_folder_is_refused_naming_the_command(copied_folder: Path, damage: str):
    model = copied_folder / MODEL_FILE
    if damage == "truncated":
        with model.open("r+b") as handle:
            handle.truncate(model.stat().st_size // 2)
    elif damage == "zeroed weights":  # same size, still a valid file: only the check sees it
        with model.open("r+b") as handle:
            handle.seek(model.stat().st_size // 2)
            handle.write(bytes(4_000_000))
    elif damage == "manifest":
        (copied_folder / "manifest.json").write_text("{not json")
    else:  # same size, valid, but "dark" (in the check sentence) is no longer a word of it
        tokenizer = copied_folder / "tokenizer.json"
        text = tokenizer.read_text(encoding="utf-8")
        assert text.count('"dark":') == 1
        tokenizer.write_text(text.replace('"dark":', '"dxrk":'), encoding="utf-8")
    with pytest.raises(MissingDependencyError) as caught:
        OnnxEmbedder(DEFAULT_MODEL, folder=copied_folder).embed_query("hello")
    assert "damaged" in str(caught.value)
    assert "`python -m app models prepare`" in str(caught.value)


def test_prepare_makes_a_damaged_folder_again(copied_folder: Path,
                                              torch_embedder: SentenceTransformerEmbedder):
    with (copied_folder / MODEL_FILE).open("r+b") as handle:
        handle.seek(10_000_000)
        handle.write(bytes(1_000))
    report = prepare(DEFAULT_MODEL)  # exports from the packaged weights again
    assert report.action == "made" and report.min_cosine_to_torch >= 0.9999
    vectors = OnnxEmbedder(DEFAULT_MODEL, folder=copied_folder).embed_documents(TEXTS[:2])
    assert np.min(np.sum(vectors * torch_embedder.embed_documents(TEXTS[:2]), axis=1)) >= 0.9999
    assert prepare(DEFAULT_MODEL).action == "kept"  # intact now: not exported a third time


def test_models_prepare_command_keeps_intact_folders(copied_folder: Path,
                                                     prepared_int8_folder: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    int8_copy = model_folder(INT8_MODEL)
    shutil.copytree(prepared_int8_folder, int8_copy)
    assert main(["--json", "models", "prepare"]) == 0  # both of the packaged model's folders
    reports = json.loads(capsys.readouterr().out)
    assert [(report["action"], report["folder"]) for report in reports] == [
        ("kept", str(copied_folder)), ("kept", str(int8_copy))]
    assert main(["models", "prepare", "--model", "/no/such/model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_models_prepare_into_an_unwritable_place_is_an_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEMORY_MODEL_DIR", str(blocker / "models"))
    reset_settings()
    assert main(["models", "prepare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the model folder") and "Traceback" not in err


def test_a_model_folder_that_cannot_be_exported_is_an_error_not_a_traceback(
        own_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    source = Path(model_source(DEFAULT_MODEL))
    broken = tmp_path / "broken-model"  # the package's layout, but no weights and no config
    broken.mkdir()
    for name in ("modules.json", "sentence_bert_config.json", "tokenizer.json"):
        shutil.copyfile(source / name, broken / name)
    shutil.copytree(source / "1_Pooling", broken / "1_Pooling")
    (broken / "config.json").write_text("{}")
    assert main(["models", "prepare", "--model", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "could not be exported" in err
    assert "Traceback" not in err and not model_folder(str(broken)).exists()


def _backend_of(embedder: Any) -> Any:
    """The backend's embedder inside the process-wide one (a ``WholeTextEmbedder``)."""
    assert isinstance(embedder, WholeTextEmbedder)
    return embedder.inner


def test_backend_follows_settings_and_auto_prefers_a_prepared_model(
        own_model_dir: Path, prepared_folder: Path, prepared_int8_folder: Path,
        monkeypatch: pytest.MonkeyPatch):
    assert isinstance(_backend_of(get_default_embedder()), SentenceTransformerEmbedder)  # none
    shutil.copytree(prepared_folder, model_folder(DEFAULT_MODEL))
    # auto, only fp32 prepared (an install from before int8): onnx in fp32 rather than torch
    assert resolve_backend(DEFAULT_MODEL, "auto") == "onnx"
    assert isinstance(_backend_of(get_default_embedder()), OnnxEmbedder)
    assert resolve_backend(DEFAULT_MODEL, "onnx") == ONNX_INT8  # asked for: int8, the default
    shutil.copytree(prepared_int8_folder, model_folder(INT8_MODEL))
    assert resolve_backend(DEFAULT_MODEL, "auto") == ONNX_INT8
    assert resolve_backend(DEFAULT_MODEL, "auto", "fp32") == "onnx"
    assert resolve_backend("/some/other/model", "onnx") == "onnx"  # int8 is the packaged one's
    assert _backend_of(get_default_embedder()).backend == ONNX_INT8
    monkeypatch.setenv("MEMORY_EMBEDDING_PRECISION", "fp32")
    reset_settings()
    fp32 = _backend_of(get_default_embedder())
    assert fp32.backend == "onnx" and fp32.folder == model_folder(DEFAULT_MODEL)
    monkeypatch.delenv("MEMORY_EMBEDDING_PRECISION")
    assert isinstance(_backend_of(get_default_embedder(backend="torch")),
                      SentenceTransformerEmbedder)
    monkeypatch.setenv("MEMORY_EMBEDDING_BACKEND", "torch")
    monkeypatch.setenv("MEMORY_EMBEDDING_THREADS", "2")
    reset_settings()
    assert isinstance(_backend_of(get_default_embedder()), SentenceTransformerEmbedder)
    monkeypatch.setenv("MEMORY_EMBEDDING_BACKEND", "ONNX")
    reset_settings()
    onnx = _backend_of(get_default_embedder())
    assert isinstance(onnx, OnnxEmbedder)
    onnx.embed_query("threads")
    assert onnx._loaded().session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(SettingsError, match="MEMORY_EMBEDDING_BACKEND must be one of"):
        Settings.from_env({"MEMORY_EMBEDDING_BACKEND": "cuda"})
    with pytest.raises(SettingsError, match="MEMORY_EMBEDDING_PRECISION must be one of"):
        Settings.from_env({"MEMORY_EMBEDDING_PRECISION": "int4"})


def test_bench_embedding_backends_prints_its_table(prepared_int8_folder: Path):
    # One backend, one round, a tiny corpus: the figures' plumbing, not their values.
    env = dict(os.environ, MEMORY_MODEL_DIR=str(prepared_int8_folder.parent))
    done = subprocess.run([sys.executable, "-m", "bench.embedding_backends", "--backends", "int8",
                           "--rounds", "1", "--memories", "200"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 8 and all(" ms |" in row or " s |" in row or " MB |" in row
                                  or " texts/s |" in row for row in rows)


def test_int8_precision_runs_the_int8_folder_under_the_models_own_name(
        prepared_int8_folder: Path, sqlite_path: Path,
        torch_embedder: SentenceTransformerEmbedder):
    int8 = OnnxEmbedder(DEFAULT_MODEL, int8=True, folder=prepared_int8_folder, batch_size=3)
    assert int8.model_name == DEFAULT_MODEL and int8.backend == ONNX_INT8
    got, expected = int8.embed_documents(TEXTS), torch_embedder.embed_documents(TEXTS)
    cosines = np.sum(got * expected, axis=1)
    # The bound of an int8 variant: 0.98 to fp32 on sentences (measured 0.985 min on the bench
    # corpus); texts of a token or two ("ok", the empty one) measured 0.971-0.976.
    sentences = [c for c, text in zip(cosines, TEXTS, strict=True) if len(text.split()) >= 3]
    assert min(sentences) >= 0.98 and len(sentences) == 5
    assert cosines.min() >= 0.96 and float(np.max(cosines)) < 0.9999  # quantized indeed
    # Measured (bench.retrieval, torch/int8): fp32 memories searched with int8 queries retrieve
    # within ~0.005 of all-fp32, so a store of torch's (or fp32 onnx's) vectors is read as is.
    with SqliteDriver(path=sqlite_path, embedder=torch_embedder) as written:
        ids = [memory["id"] for memory in written.store_many(
            [{"user_id": "bo", "content": text} for text in TEXTS[:3]])]
    with SqliteDriver(path=sqlite_path, embedder=int8) as read:
        found = read.recall("bo", query="dark theme in the editor", top_k=1)
        health = read.health_check()
    assert found[0]["id"] == ids[0]
    assert health["checks"]["embedding"]["status"] == "ok"
    assert health["checks"]["embedding"]["configured"]["backend"] == ONNX_INT8
    with pytest.raises(ValueError, match="only the packaged model"):
        OnnxEmbedder("/some/other/model", int8=True)


def test_an_int8_vector_depends_on_its_text_alone_not_on_its_batch(prepared_int8_folder: Path):
    # Dynamic quantization scales a run's activations by the run's largest value: batched, a
    # text's int8 vector moved with its batch-mates (cosine 0.97 to itself alone).
    int8 = OnnxEmbedder(DEFAULT_MODEL, int8=True, folder=prepared_int8_folder, batch_size=32)
    batched = int8.embed_documents(TEXTS)
    alone = np.vstack([int8.embed_documents([text]) for text in TEXTS])
    assert np.array_equal(batched, alone)
    assert np.array_equal(int8.embed_query(TEXTS[2]), alone[2])


def test_the_int8_model_name_of_an_earlier_release_is_a_model_of_its_own(
        own_model_dir: Path, prepared_folder: Path, sqlite_path: Path,
        capsys: pytest.CaptureFixture[str]):
    # all-MiniLM-L6-v2-int8 was an opt-in model name before int8 became the default precision;
    # the stores it made record it, so it stays a name (and an identity) of its own.
    assert resolve_backend(INT8_MODEL, "auto") == "onnx"  # before it is prepared, too
    with pytest.raises(InvalidInputError, match="onnx backend only"):
        resolve_backend(INT8_MODEL, "torch")
    with pytest.raises(MissingDependencyError, match=f"models prepare --model {INT8_MODEL}`"):
        OnnxEmbedder(INT8_MODEL).embed_query("hello")
    assert main(["models", "prepare", "--model", INT8_MODEL]) == 0
    assert "all-MiniLM-L6-v2-int8" in capsys.readouterr().out
    int8 = OnnxEmbedder(INT8_MODEL, batch_size=3)
    assert int8.folder == own_model_dir / INT8_MODEL
    assert prepare(INT8_MODEL).action == "kept"
    fp32 = OnnxEmbedder(DEFAULT_MODEL, folder=prepared_folder)
    with SqliteDriver(path=sqlite_path, embedder=fp32) as written:
        written.store("bo", "Prefers dark mode in every editor")
    with SqliteDriver(path=sqlite_path, embedder=int8) as read, \
            pytest.raises(EmbeddingMismatchError, match=f"reembed --model {INT8_MODEL}"):
        read.recall("bo", query="dark theme")
