"""The migrator and ``migrate.py``: batches, rollback, fresh, pretend, the production guard and
the lock, on real SQLite files (the project's own migrations and small ones written here)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.core.database.migrator import MigrationError, Migrator, SqliteMigrationDatabase
from tests.conftest import PROJECT_ROOT


def migrate_cli(*args: str, path: Path, env: dict[str, str] | None = None):
    """Run ``python migrate.py ARGS`` on the SQLite file ``path``."""
    environment = {**os.environ, "MEMORY_SQLITE_PATH": str(path), "APP_ENV": "local",
                   "MEMORY_DRIVER": "sqlite", **(env or {})}
    return subprocess.run([sys.executable, "migrate.py", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, env=environment)


def tables(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    finally:
        connection.close()


def write_migration(folder: Path, name: str, up: str, down: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""
        def up(db):
            {up}

        def down(db):
            {down}
    """))


@pytest.fixture
def three_migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    for number, table in ((1, "alpha"), (2, "beta"), (3, "gamma")):
        write_migration(folder, f"2026_01_01_00000{number}_create_{table}",
                        f'db.execute("CREATE TABLE {table} (id INTEGER)")',
                        f'db.execute("DROP TABLE {table}")')
    return folder


def make_migrator(path: Path, folder: Path, lines: list[str] | None = None) -> Migrator:
    sink = lines if lines is not None else []
    return Migrator(SqliteMigrationDatabase(path), folder, out=sink.append)


def test_cli_migrate_status_rollback_and_refresh(tmp_path: Path):
    path = tmp_path / "memory.sqlite3"
    first = migrate_cli(path=path)
    assert first.returncode == 0, first.stderr
    assert "Migrated:" in first.stdout
    assert {"memories", "memories_fts", "knowledge_chunks", "users", "migrations"} <= tables(path)
    again = migrate_cli(path=path)
    assert "Nothing to migrate" in again.stdout
    status = migrate_cli("status", path=path)
    assert "Ran (batch 1)" in status.stdout
    rolled = migrate_cli("rollback", path=path)
    assert rolled.returncode == 0, rolled.stderr
    assert tables(path) == {"migrations"}
    assert "Pending" in migrate_cli("status", path=path).stdout
    assert migrate_cli("refresh", path=path).returncode == 0
    assert "memories" in tables(path)


def test_cli_fresh_drops_data_and_migrates_again(tmp_path: Path):
    path = tmp_path / "memory.sqlite3"
    assert migrate_cli(path=path).returncode == 0
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE stray (x INTEGER)")
    connection.execute("INSERT INTO users (user_id, profile, created_at, updated_at) "
                       "VALUES ('alice', '{}', 0, 0)")
    connection.commit()
    connection.close()
    fresh = migrate_cli("fresh", path=path)
    assert fresh.returncode == 0, fresh.stderr
    assert "stray" not in tables(path)
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
    connection.close()


def test_production_guard_refuses_destructive_commands_without_force(tmp_path: Path):
    path = tmp_path / "memory.sqlite3"
    assert migrate_cli(path=path).returncode == 0
    production = {"APP_ENV": "production"}
    for command in ("fresh", "rollback", "reset", "refresh"):
        refused = migrate_cli(command, path=path, env=production)
        assert refused.returncode == 1
        assert "--force" in refused.stderr
        assert "memories" in tables(path)
    assert migrate_cli("status", path=path, env=production).returncode == 0
    forced = migrate_cli("rollback", "--force", path=path, env=production)
    assert forced.returncode == 0, forced.stderr
    assert "memories" not in tables(path)


def test_pretend_prints_sql_and_changes_nothing(tmp_path: Path):
    path = tmp_path / "memory.sqlite3"
    pretended = migrate_cli("--pretend", path=path)
    assert pretended.returncode == 0, pretended.stderr
    assert "CREATE TABLE memories" in pretended.stdout
    assert "memories" not in tables(path)
    assert migrate_cli(path=path).returncode == 0
    rollback = migrate_cli("rollback", "--pretend", path=path)
    assert "DROP TABLE IF EXISTS memories" in rollback.stdout
    assert "memories" in tables(path)


def test_automem_database_has_nothing_to_migrate(tmp_path: Path):
    result = migrate_cli("--database", "automem", path=tmp_path / "unused.sqlite3")
    assert result.returncode == 0
    assert "owns its storage" in result.stdout
    assert not (tmp_path / "unused.sqlite3").exists()


def test_batches_and_rollback_by_batch_and_by_step(tmp_path: Path, three_migrations: Path):
    path = tmp_path / "db.sqlite3"
    folder = three_migrations
    # Batch 1 holds alpha and beta; gamma arrives later and runs as batch 2.
    (folder / "2026_01_01_000003_create_gamma.py").rename(tmp_path / "gamma.py")
    migrator = make_migrator(path, folder)
    assert migrator.migrate() == ["2026_01_01_000001_create_alpha",
                                  "2026_01_01_000002_create_beta"]
    (tmp_path / "gamma.py").rename(folder / "2026_01_01_000003_create_gamma.py")
    assert migrator.migrate() == ["2026_01_01_000003_create_gamma"]
    assert [row.batch for row in migrator.status()] == [1, 1, 2]
    assert migrator.rollback() == ["2026_01_01_000003_create_gamma"]
    assert migrator.rollback(step=1) == ["2026_01_01_000002_create_beta"]
    assert tables(path) == {"migrations", "alpha"}
    assert migrator.reset() == ["2026_01_01_000001_create_alpha"]
    assert migrator.rollback() == []


def test_a_failing_migration_is_not_logged_and_leaves_nothing(tmp_path: Path,
                                                              three_migrations: Path):
    write_migration(three_migrations, "2026_01_01_000004_broken",
                    'db.execute("CREATE TABLE delta (id INTEGER)"); db.execute("NOT SQL")',
                    "pass")
    lines: list[str] = []
    migrator = make_migrator(tmp_path / "db.sqlite3", three_migrations, lines)
    with pytest.raises(MigrationError, match="2026_01_01_000004_broken"):
        migrator.migrate()
    assert migrator.pending() == ["2026_01_01_000004_broken"]
    assert "delta" not in tables(tmp_path / "db.sqlite3")
    assert "alpha" in tables(tmp_path / "db.sqlite3")


def test_badly_named_migration_file_is_refused(tmp_path: Path):
    folder = tmp_path / "migrations"
    write_migration(folder, "create_things", "pass", "pass")
    with pytest.raises(MigrationError, match="YYYY_MM_DD"):
        make_migrator(tmp_path / "db.sqlite3", folder).migrate()


def test_two_runs_at_once_do_not_interleave(tmp_path: Path):
    folder = tmp_path / "migrations"
    write_migration(folder, "2026_01_01_000001_slow",
                    'import time; db.execute("CREATE TABLE slow (id INTEGER)"); time.sleep(1.5)',
                    'db.execute("DROP TABLE slow")')
    path = tmp_path / "db.sqlite3"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from app.core.database.migrator import Migrator, SqliteMigrationDatabase
        Migrator(SqliteMigrationDatabase({str(path)!r}), Path({str(folder)!r})).migrate()
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("Migrated:") == 1
    assert stdout.count("Nothing to migrate") == 1
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == 1
    connection.close()
