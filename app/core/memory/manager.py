"""The driver manager: which driver a name means, and one cached instance per name.

Resolution order for a name: drivers registered with ``MemoryDriverManager.register_driver``,
then the built-ins (their modules imported only when chosen, so ``psycopg`` is not needed to use
``sqlite``), then installed plugins of the entry-point group ``memory_drivers``. A factory is
anything callable with no arguments that returns a ``BaseMemoryDriver``; a driver class must offer
``from_settings()``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from app.core.memory.base import BaseMemoryDriver
from app.core.memory.errors import DriverNotFoundError, InvalidInputError

DriverFactory = Callable[[], BaseMemoryDriver]

#: name -> "module:Class"; a module is imported only when its driver is asked for.
BUILTIN_DRIVERS: dict[str, str] = {
    "sqlite": "app.core.memory.drivers.sqlite_driver:SqliteDriver",
    "pgvector": "app.core.memory.drivers.pgvector_driver:PgvectorDriver",
    "automem": "app.core.memory.drivers.automem_driver:AutomemDriver",
}
ENTRY_POINT_GROUP = "memory_drivers"


class MemoryDriverManager:
    """Creates drivers by name on first use and caches them; all methods are thread-safe."""

    _lock = threading.RLock()
    _registered: dict[str, Any] = {}
    _instances: dict[str, BaseMemoryDriver] = {}
    _default_name: str | None = None
    _close_hooks: list[Callable[[BaseMemoryDriver], None]] = []

    @classmethod
    def add_close_hook(cls, hook: Callable[[BaseMemoryDriver], None]) -> None:
        """Call ``hook(driver)`` before the manager closes a cached driver (``reset_cache``,
        ``register_driver(replace=True)``, ``discard``): the async API releases its wrapper."""
        with cls._lock:
            if hook not in cls._close_hooks:
                cls._close_hooks.append(hook)

    @classmethod
    def register_driver(cls, name: str, cls_or_factory: Any, *, replace: bool = False) -> None:
        """Make ``name`` resolve to ``cls_or_factory`` (a driver class or a no-argument factory).

        A name that is already registered, or that a built-in uses, needs ``replace=True``; a
        cached instance of a replaced name is closed and forgotten.
        """
        key = _normalise_name(name)
        if not callable(cls_or_factory):
            raise InvalidInputError("cls_or_factory must be a driver class or a callable")
        with cls._lock:
            if not replace and (key in cls._registered or key in BUILTIN_DRIVERS):
                raise InvalidInputError(
                    f"Memory driver '{key}' already exists; pass replace=True to override it"
                )
            cls._registered[key] = cls_or_factory
            instance = cls._instances.pop(key, None)
        if instance is not None:
            cls._close(instance)

    @classmethod
    def driver(cls, name: str | None = None) -> BaseMemoryDriver:
        """The cached driver for ``name`` (default: ``set_memory_driver``'s, else settings)."""
        key = cls._resolve_default(name)
        with cls._lock:
            instance = cls._instances.get(key)
            if instance is None:
                instance = cls._create(key)
                cls._instances[key] = instance
            return instance

    @classmethod
    def set_default(cls, name: str) -> BaseMemoryDriver:
        """Make ``name`` the default from now on and return its driver."""
        key = _normalise_name(name)
        with cls._lock:
            instance = cls.driver(key)
            cls._default_name = key
            return instance

    @classmethod
    def available(cls) -> list[str]:
        """Every name that resolves: registered, built-in and plugin drivers, sorted."""
        with cls._lock:
            names = set(cls._registered) | set(BUILTIN_DRIVERS)
        names |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
        return sorted(names)

    @classmethod
    def reset_cache(cls) -> None:
        """Close every created driver (pools, clients, connections); forget them and the default."""
        with cls._lock:
            instances = list(cls._instances.values())
            cls._instances.clear()
            cls._default_name = None
        for instance in instances:
            cls._close(instance)

    @classmethod
    def discard(cls, instance: BaseMemoryDriver) -> None:
        """Close ``instance`` and forget it if it is cached, so its name opens a fresh one."""
        with cls._lock:
            keys = [key for key, cached in cls._instances.items() if cached is instance]
            for key in keys:
                del cls._instances[key]
        cls._close(instance)

    @classmethod
    def _close(cls, instance: BaseMemoryDriver) -> None:
        with cls._lock:
            hooks = list(cls._close_hooks)
        for hook in hooks:
            hook(instance)
        instance.close()

    @classmethod
    def _resolve_default(cls, name: str | None) -> str:
        if name is not None:
            return _normalise_name(name)
        if cls._default_name is not None:
            return cls._default_name
        from config.settings import get_settings

        return _normalise_name(get_settings().memory_driver)

    @classmethod
    def _create(cls, key: str) -> BaseMemoryDriver:
        target = cls._registered.get(key)
        if target is None and key in BUILTIN_DRIVERS:
            module_name, _, class_name = BUILTIN_DRIVERS[key].partition(":")
            target = getattr(importlib.import_module(module_name), class_name)
        if target is None:
            for entry_point in entry_points(group=ENTRY_POINT_GROUP, name=key):
                target = entry_point.load()
                break
        if target is None:
            raise DriverNotFoundError(
                f"Memory driver '{key}' not found. Available: {', '.join(cls.available())}"
            )
        return _instantiate(target)


def _normalise_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"driver name must be a non-empty string (got {name!r})")
    return name.strip().lower()


def _instantiate(target: Any) -> BaseMemoryDriver:
    from_settings = getattr(target, "from_settings", None)
    instance = from_settings() if isinstance(target, type) and from_settings else target()
    if not isinstance(instance, BaseMemoryDriver):
        raise InvalidInputError(
            f"driver factory returned {type(instance).__name__}, not a BaseMemoryDriver"
        )
    return instance


def get_memory_driver(name: str | None = None) -> BaseMemoryDriver:
    """The driver for ``name``, else the default (``set_memory_driver``, ``MEMORY_DRIVER``,
    ``sqlite``); created on first use, then cached. Thread-safe."""
    return MemoryDriverManager.driver(name)


def set_memory_driver(name: str) -> BaseMemoryDriver:
    """Make ``name`` the default driver from now on and return it."""
    return MemoryDriverManager.set_default(name)
