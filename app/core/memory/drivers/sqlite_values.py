"""How the SQLite schema stores values the driver hands back as Python objects: vectors as
float32 blobs (``numpy.tobytes``) and times as UTC epoch seconds (REAL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

import numpy as np


def vector_blob(vector: np.ndarray) -> bytes:
    """A vector as the float32 blob stored in ``embedding`` columns."""
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


@overload
def from_epoch(value: float) -> datetime: ...
@overload
def from_epoch(value: None) -> None: ...
@overload
def from_epoch(value: float | None) -> datetime | None: ...


def from_epoch(value: float | None) -> datetime | None:
    """A stored time as an aware UTC datetime (``None`` stays ``None``)."""
    return None if value is None else datetime.fromtimestamp(value, UTC)


def to_epoch(value: datetime | None) -> float | None:
    """An aware datetime as stored (``None`` stays ``None``)."""
    return None if value is None else value.timestamp()
