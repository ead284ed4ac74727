"""The driver manager: defaults, caching, registration, plugins and lazy imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from app.core.memory import (
    DriverNotFoundError,
    InvalidInputError,
    MemoryDriverManager,
    get_memory_driver,
    set_memory_driver,
)
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from config.settings import reset_settings
from tests.conftest import PROJECT_ROOT, migrate_sqlite


class ClosingSqliteDriver(SqliteDriver):
    """A real SQLite driver under another name that remembers being closed."""

    name = "custom"
    instances: list[ClosingSqliteDriver] = []

    def __init__(self, path: Path) -> None:
        super().__init__(path=path)
        self.closed = False
        ClosingSqliteDriver.instances.append(self)

    def close(self) -> None:
        self.closed = True
        super().close()


def test_default_is_sqlite_and_cached():
    driver = get_memory_driver()
    assert isinstance(driver, SqliteDriver)
    assert get_memory_driver() is driver
    assert get_memory_driver("sqlite") is driver
    assert get_memory_driver(" SQLite ") is driver


def test_memory_driver_setting_is_read_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    MemoryDriverManager.register_driver("custom", lambda: ClosingSqliteDriver(tmp_path / "c.db"))
    try:
        monkeypatch.setenv("MEMORY_DRIVER", "custom")
        reset_settings()
        assert isinstance(get_memory_driver(), ClosingSqliteDriver)
    finally:
        MemoryDriverManager._registered.pop("custom", None)


def test_unknown_driver_names_the_available_ones():
    with pytest.raises(DriverNotFoundError) as raised:
        get_memory_driver("xyz")
    available = ", ".join(MemoryDriverManager.available())
    assert str(raised.value) == f"Memory driver 'xyz' not found. Available: {available}"
    assert "sqlite" in available
    assert isinstance(raised.value, ValueError)


def test_register_custom_driver_and_reset_cache_closes_it(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "custom.sqlite3")
    MemoryDriverManager.register_driver("custom", lambda: ClosingSqliteDriver(path))
    try:
        driver = get_memory_driver("custom")
        assert isinstance(driver, ClosingSqliteDriver)
        assert "custom" in MemoryDriverManager.available()
        with pytest.raises(InvalidInputError, match="replace=True"):
            MemoryDriverManager.register_driver("custom", lambda: ClosingSqliteDriver(path))
        MemoryDriverManager.reset_cache()
        assert driver.closed
        assert get_memory_driver("custom") is not driver
    finally:
        MemoryDriverManager._registered.pop("custom", None)


def test_builtin_names_are_replaced_only_with_replace_true(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="replace=True"):
        MemoryDriverManager.register_driver("sqlite", SqliteDriver)
    builtin = get_memory_driver("sqlite")
    MemoryDriverManager.register_driver("sqlite", lambda: ClosingSqliteDriver(tmp_path / "r.db"),
                                        replace=True)
    try:
        assert isinstance(get_memory_driver("sqlite"), ClosingSqliteDriver)
        assert builtin._closed  # the replaced instance was closed
    finally:
        MemoryDriverManager._registered.pop("sqlite", None)


def test_factory_must_return_a_driver():
    MemoryDriverManager.register_driver("broken", lambda: object())
    try:
        with pytest.raises(InvalidInputError, match="not a BaseMemoryDriver"):
            get_memory_driver("broken")
    finally:
        MemoryDriverManager._registered.pop("broken", None)


def test_set_memory_driver_changes_the_default(tmp_path: Path):
    MemoryDriverManager.register_driver("custom", lambda: ClosingSqliteDriver(tmp_path / "d.db"))
    try:
        chosen = set_memory_driver("custom")
        assert get_memory_driver() is chosen
        MemoryDriverManager.reset_cache()
        assert isinstance(get_memory_driver(), SqliteDriver)
        assert not isinstance(get_memory_driver(), ClosingSqliteDriver)
    finally:
        MemoryDriverManager._registered.pop("custom", None)


def test_concurrent_first_use_creates_one_instance():
    barrier = threading.Barrier(8)
    seen: list[object] = []

    def grab() -> None:
        barrier.wait()
        seen.append(get_memory_driver())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(driver) for driver in seen}) == 1


def test_entry_point_plugins_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "fake_memory_plugin.py").write_text(textwrap.dedent(f"""
        from app.core.memory.drivers.sqlite_driver import SqliteDriver

        class PluginDriver(SqliteDriver):
            name = "plugged"

            @classmethod
            def from_settings(cls):
                return cls(path={str(tmp_path / 'plugin.sqlite3')!r})
    """))
    dist = tmp_path / "fake_memory_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-memory-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[memory_drivers]\nplugged = fake_memory_plugin:PluginDriver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged" in MemoryDriverManager.available()
    driver = get_memory_driver("plugged")
    assert type(driver).__name__ == "PluginDriver"


def test_importing_and_creating_the_default_driver_loads_no_heavy_library():
    migrate_sqlite(Path(os.environ["MEMORY_SQLITE_PATH"]))
    code = textwrap.dedent("""
        import sys
        from app.core.memory import get_memory_driver
        driver = get_memory_driver()
        assert driver.health_check()["status"] == "ok"
        assert driver.recall("alice", query="anything", use_vector=False) == []
        heavy = [m for m in ("torch", "sentence_transformers", "psycopg", "httpx")
                 if m in sys.modules]
        print(",".join(heavy) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
