"""The memory layer for AI agents; the public API lives in ``app.core.memory``."""
