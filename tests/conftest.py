"""Shared fixtures: the real embedding model (loaded once per test run), migrated SQLite files,
and a clean slate of settings and cached drivers around every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


#: A server this test run may create and drop its own database on (see scripts/install-postgres.sh).
PG_ADMIN_URL = os.environ.get("MEMORY_TEST_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
PG_TABLES = ("memories, memory_counts, memory_terms, knowledge_chunks, knowledge_documents, "
             "users, embedding_identity, reembed_target")


def migrate_postgres(url: str) -> str:
    """Run every PostgreSQL migration on the database ``url`` names; returns ``url``."""
    from app.core.database.postgres_migration import PostgresMigrationDatabase

    db = PostgresMigrationDatabase(url)
    try:
        Migrator(db, migrations_dir("pgvector"), out=lambda line: None).migrate()
    finally:
        db.close()
    return url


def roll_back_to_before(db: object, backend: str, migration: str) -> None:
    """Migrate ``db`` fully, then roll back ``migration`` of ``backend`` and every later one (to
    test what a migration does with the rows it meets)."""
    migrator = Migrator(db, migrations_dir(backend), out=lambda line: None)
    names = migrator.files()
    migrator.migrate()
    migrator.rollback(step=len(names) - names.index(migration))
    assert migrator.pending() == names[names.index(migration):]


def roll_back_postgres_to_before(url: str, migration: str) -> None:
    """``roll_back_to_before`` on the PostgreSQL database ``url`` names."""
    from app.core.database.postgres_migration import PostgresMigrationDatabase

    db = PostgresMigrationDatabase(url)
    try:
        roll_back_to_before(db, "pgvector", migration)
    finally:
        db.close()


@contextmanager
def temporary_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database named ``prefix`` + random hex; its URL; dropped after."""
    import secrets

    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"{prefix}{secrets.token_hex(4)}"
    identifier = psycopg.sql.Identifier(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(identifier))
    try:
        yield make_conninfo(PG_ADMIN_URL, dbname=name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                identifier))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A new PostgreSQL database for this test run, migrated, dropped at the end."""
    with temporary_database("memory_test_") as url:
        yield migrate_postgres(url)


@pytest.fixture
def empty_pg(pg_url: str) -> str:
    """``pg_url`` with every memory-layer table emptied before the test."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {PG_TABLES} RESTART IDENTITY CASCADE")
    return pg_url


@pytest.fixture
def blank_database() -> Iterator[str]:
    """A PostgreSQL database with nothing in it (not even migrated), dropped afterwards."""
    with temporary_database("memory_blank_") as url:
        yield url
