"""Shared fixtures: the real embedding model (loaded once per test run), migrated SQLite files,
and a clean slate of settings and cached drivers around every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.core.database.migrator import Migrator, SqliteMigrationDatabase, migrations_dir  # noqa: E402
from app.core.memory.embeddings import SentenceTransformerEmbedder, get_default_embedder  # noqa: E402
from app.core.memory.manager import MemoryDriverManager  # noqa: E402
from config.settings import reset_settings  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2 embedder, shared by every test of the run."""
    return get_default_embedder()


def migrate_sqlite(path: Path) -> Path:
    """Run every SQLite migration on ``path``; returns it."""
    db = SqliteMigrationDatabase(path)
    try:
        Migrator(db, migrations_dir("sqlite"), out=lambda line: None).migrate()
    finally:
        db.close()
    return path


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A migrated SQLite file of this test's own."""
    return migrate_sqlite(tmp_path / "memory.sqlite3")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts with settings from a known environment and no cached drivers."""
    monkeypatch.setenv("MEMORY_SQLITE_PATH", str(tmp_path / "memory.sqlite3"))
    monkeypatch.delenv("MEMORY_DRIVER", raising=False)
    monkeypatch.delenv("APP_ENV", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_settings()
    MemoryDriverManager.reset_cache()
    yield
    MemoryDriverManager.reset_cache()
    reset_settings()
