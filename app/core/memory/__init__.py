"""The public API of the memory layer.

    from app.core.memory import get_memory_driver

    driver = get_memory_driver()   # MEMORY_DRIVER picks the backend; the instance is cached
    driver.store(user_id="u123", content="Prefers dark mode", tags=["preference"])
    driver.recall(user_id="u123", query="ui preferences", top_k=5)

Asyncio code uses the same contract as coroutines, without blocking the event loop:

    from app.core.memory import get_async_memory_driver

    memory = get_async_memory_driver()
    hits = await memory.recall(user_id="u123", query="ui preferences", top_k=5)

Nothing here imports a driver's backend library or the embedding model; both load on first use.
"""

from app.core.memory.aio import AsyncMemoryDriver, get_async_memory_driver
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.errors import (
    BackendUnavailableError,
    DriverNotFoundError,
    EmbeddingMismatchError,
    InvalidInputError,
    MemoryDriverError,
    MissingDependencyError,
    NotSupportedError,
    SchemaNotMigratedError,
)
from app.core.memory.manager import MemoryDriverManager, get_memory_driver, set_memory_driver
from app.core.memory.records import (
    HealthReport,
    Knowledge,
    KnowledgeDocument,
    Memory,
    MemoryInput,
    MemoryPage,
    User,
    UserStats,
)

__all__ = [
    "AsyncMemoryDriver",
    "BackendUnavailableError",
    "BaseMemoryDriver",
    "DriverNotFoundError",
    "EmbeddingMismatchError",
    "HealthReport",
    "InvalidInputError",
    "Knowledge",
    "KnowledgeDocument",
    "Memory",
    "MemoryDriverError",
    "MemoryDriverManager",
    "MemoryInput",
    "MemoryPage",
    "MissingDependencyError",
    "NotSupportedError",
    "SchemaNotMigratedError",
    "User",
    "UserStats",
    "get_async_memory_driver",
    "get_memory_driver",
    "set_memory_driver",
]
