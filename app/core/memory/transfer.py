"""Export, import and copy: moving records between drivers in the ``portable.py`` format.

``export_dump`` streams a driver's records to a text stream as JSON Lines, from one snapshot.
``import_dump`` reads such a stream into a driver, ``batch_size`` records per transaction; a line
that is not JSON, breaks a rule or is refused by the target is reported with its line number, and
the other lines are imported. ``copy_records`` does both without a file. Records keep their ids,
so every operation is idempotent: running it again after a failure finishes the job without
duplicating anything. ``progress(done, total)`` counts memories and knowledge documents.

Lines are read with a bound (``MAX_LINE_CHARS``): a longer line is skipped to its end a bounded
piece at a time and reported, so a hostile or broken file cannot make the import hold it in memory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from app.core.memory.base import BaseMemoryDriver, Progress
from app.core.memory.errors import InvalidInputError
from app.core.memory.portable import (
    PortableRecord,
    check_header,
    header,
    parse_record,
    to_json_line,
)
from app.core.memory.validation import check_positive_int

#: WARNING for each refused line or record: its place and the rule it broke, never its content.
logger = logging.getLogger(__name__)

#: How each record type is counted in reports and in a dump's end line.
PLURALS = {"user": "users", "memory": "memories", "knowledge_document": "knowledge_documents"}
DEFAULT_BATCH_SIZE = 256
MAX_BATCH_SIZE = 10_000
#: The longest line an import reads, in characters. The largest valid record, a knowledge
#: document at ``MAX_KNOWLEDGE_CHARS`` with a vector per chunk, is ~6 M characters (~16 M if
#: every character needs a JSON escape); reading a line costs about three times its size.
MAX_LINE_CHARS = 32 * 1024 * 1024


@dataclass
class TransferReport:
    """What an import or a copy did: records written by kind, and those refused, with why."""

    written: Counter[str] = field(default_factory=Counter)
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: Whether the dump's end line was read (a copy is always complete).
    complete: bool = True
    #: The counts the dump's end line announced.
    expected: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        """Everything arrived and nothing was refused."""
        return self.complete and not self.refused

    def refuse(self, place: str, reason: str) -> None:
        """Record that the line or record at ``place`` was refused, and log it (WARNING).

        The log gets the rule only: a validation message's ``(got ...)`` preview of the value,
        which may be the memory's content, stays in the report the caller reads.
        """
        self.refused.append((place, reason))
        rule = reason.split(" (got ", 1)[0]
        logger.warning("import: %s refused: %s", place,
                       rule if len(rule) <= 200 else rule[:197] + "...")


def export_dump(driver: BaseMemoryDriver, out: TextIO, *, user_id: str | None = None,
                with_embeddings: bool = True, progress: Progress | None = None) -> Counter[str]:
    """Write the header, every record of ``driver`` (see ``export_records``) and the end line
    to ``out``; returns the counts written."""
    records = driver.export_records(user_id=user_id, with_embeddings=with_embeddings)
    identity, total = _identity_and_total(driver, user_id)
    out.write(to_json_line(header(driver=driver.name, user_id=user_id, embedding=identity,
                                  with_embeddings=with_embeddings and identity is not None)))
    counts: Counter[str] = Counter()
    for record in records:
        out.write(to_json_line(_without_missing_vectors(record)))
        counts[PLURALS[record["type"]]] += 1
        if progress and record["type"] != "user":
            progress(counts["memories"] + counts["knowledge_documents"], total)
    out.write(to_json_line({"type": "end", "counts": dict(counts)}))
    return counts


def import_dump(driver: BaseMemoryDriver, lines: Iterable[str] | TextIO, *,
                batch_size: int = DEFAULT_BATCH_SIZE,
                progress: Progress | None = None, total: int = 0) -> TransferReport:
    """Import a dump's lines into ``driver``. A missing or foreign header raises
    ``InvalidInputError`` before anything is written; bad records are reported, not raised.
    ``total`` (the number of lines, if known) is handed to ``progress``. Given a text stream
    (anything with ``readline``), lines are read with a bound; a line longer than
    ``MAX_LINE_CHARS`` is refused either way."""
    batch_size = check_positive_int(batch_size, "batch_size", maximum=MAX_BATCH_SIZE)
    source = bounded_lines(lines) if hasattr(lines, "readline") else lines
    numbered = enumerate(source, start=1)
    first = next(numbered, None)
    if first is None:
        raise InvalidInputError("the dump is empty: its first line must be the header")
    if first[1] is None:
        raise InvalidInputError(f"the first line is longer than {MAX_LINE_CHARS} characters: "
                                "it must be the dump's header")
    head = check_header(_json_or_none(first[1]))
    vectors_from = head["embedding"] if head.get("with_embeddings") else None
    dimension = vectors_from["dimension"] if vectors_from else None
    report = TransferReport(complete=False)
    batch = _Batch(driver, report, vectors_from, batch_size)
    for number, line in numbered:
        if line is None or len(line) > MAX_LINE_CHARS + 1:
            report.refuse(f"line {number}",
                          f"longer than {MAX_LINE_CHARS} characters (not read)")
            continue
        if not line.strip():
            continue
        value = _json_or_none(line)
        if value is None:
            report.refuse(f"line {number}", "not a line of JSON (or nested deeper "
                                            "than it can be read)")
        elif report.complete:
            report.refuse(f"line {number}", "a record after the end line")
        elif isinstance(value, dict) and value.get("type") == "end":
            report.complete = True
            report.expected = value.get("counts") if isinstance(value.get("counts"),
                                                                dict) else None
        else:
            try:
                batch.add(f"line {number}", parse_record(value, dimension))
            except InvalidInputError as exc:
                report.refuse(f"line {number}", str(exc))
        if progress:
            progress(number, total)
    batch.flush()
    return report


def bounded_lines(stream: Any, max_chars: int = MAX_LINE_CHARS) -> Iterator[str | None]:
    """The lines of the text ``stream``, none held in memory beyond ``max_chars`` characters: a
    longer line is read past in pieces and given as ``None``."""
    while True:
        line = stream.readline(max_chars + 1)
        if not line:
            return
        if len(line) <= max_chars or line.endswith("\n"):
            yield line
            continue
        while True:
            rest = stream.readline(max_chars)
            if not rest or rest.endswith("\n"):
                break
        yield None


def count_lines(path: str | Path, chunk_bytes: int = 1 << 20) -> int:
    """How many lines the file ``path`` has, read a chunk at a time (for a progress total)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def copy_records(source: BaseMemoryDriver, target: BaseMemoryDriver, *,
                 user_id: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: Progress | None = None) -> TransferReport:
    """Copy every record of ``source`` (one user's with ``user_id``) into ``target``, vectors
    included (re-embedded by ``target`` if its model differs)."""
    if source is target:
        raise InvalidInputError("target must be another driver than source")
    batch_size = check_positive_int(batch_size, "batch_size", maximum=MAX_BATCH_SIZE)
    records = source.export_records(user_id=user_id, with_embeddings=True)
    identity, total = _identity_and_total(source, user_id)
    report = TransferReport()
    batch = _Batch(target, report, identity, batch_size)
    done = 0
    for record in records:
        batch.add(_describe(record), record)
        if record["type"] != "user":
            done += 1
            if progress:
                progress(done, total)
    batch.flush()
    return report


class _Batch:
    """Records on their way into ``target``, written ``size`` at a time."""

    def __init__(self, target: BaseMemoryDriver, report: TransferReport,
                 vectors_from: dict[str, Any] | None, size: int) -> None:
        self._target, self._report = target, report
        self._vectors_from, self._size = vectors_from, size
        self._records: list[PortableRecord] = []
        self._places: list[str] = []

    def add(self, place: str, record: PortableRecord) -> None:
        self._records.append(record)
        self._places.append(place)
        if len(self._records) >= self._size:
            self.flush()

    def flush(self) -> None:
        if not self._records:
            return
        refused = dict(self._target.import_records(self._records,
                                                   vectors_from=self._vectors_from))
        for index, (place, record) in enumerate(zip(self._places, self._records, strict=True)):
            if index in refused:
                self._report.refuse(place, refused[index])
            else:
                self._report.written[PLURALS[record["type"]]] += 1
        self._records, self._places = [], []


def _identity_and_total(driver: BaseMemoryDriver,
                        user_id: str | None) -> tuple[dict[str, Any] | None, int]:
    """The store's embedding identity, and how many memories and documents will pass (the
    progress total), from ``stats`` (a second call only when one user is exported)."""
    overall = driver.stats()
    scoped = overall if user_id is None else driver.stats(user_id)
    documents = overall["knowledge"]["documents"] if user_id is None else 0
    return overall["embedding"], int(sum(scoped["memories"].values()) + documents)


def _without_missing_vectors(record: PortableRecord) -> dict[str, Any]:
    line: dict[str, Any] = dict(record)
    if line.get("embedding", 0) is None:
        del line["embedding"]
    if record["type"] == "knowledge_document":
        line["chunks"] = [{key: value for key, value in chunk.items() if value is not None}
                          for chunk in record["chunks"]]
    return line


def _describe(record: PortableRecord) -> str:
    if record["type"] == "memory":
        return f"memory {record['id']}"
    if record["type"] == "knowledge_document":
        return f"knowledge_document {record['doc_id']}"
    return f"user {record['user_id']}"


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # the parser recurses once per level
        return None

