"""The SQL side of SQLite search: scope filters, FTS5 keyword candidates, vector-space syncing.

Kept apart from the driver so that the driver reads as the contract's verbs. Every function here
takes an open connection inside the caller's transaction, so that the vector copy, the keyword
matches and the eligibility checks all see one snapshot of the database.

SQL is parameterised everywhere; the only text pasted into statements is constant (table and
column names from ``Corpus``, never from input). User text reaches FTS5 only as double-quoted
word tokens, so FTS syntax in a query (``" * - NEAR OR ( )``) is searched for, never parsed.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.memory.drivers.vector_cache import VectorSpace
from app.core.memory.ranking import Candidate, query_terms
from app.core.memory.validation import RecallFilters

#: Below this many eligible rows, a filtered vector search scores just those rows.
SMALL_SCOPE = 5_000
#: Query words found in more than this share of the rows are not matched, unless the query has
#: nothing rarer (tuned on LoCoMo, see ``ranking.py``).
COMMON_TERM_SHARE = 0.1
_COMMON_IDF = math.log((1 - COMMON_TERM_SHARE) / COMMON_TERM_SHARE)




@dataclass(frozen=True)
class Corpus:
    """What differs between searching memories and searching knowledge chunks."""

    table: str
    fts: str
    removal_scope: str
    source: str
    importance: str
    recency: str


MEMORIES = Corpus(
    table="memories", fts="memories_fts", removal_scope="memories",
    source="memories m", importance="m.importance", recency="m.created_at",
)
KNOWLEDGE = Corpus(
    table="knowledge_chunks", fts="knowledge_fts", removal_scope="knowledge_chunks",
    source="knowledge_chunks m JOIN knowledge_documents d ON d.pk = m.document_pk",
    importance="0.5", recency="d.updated_at",
)


@dataclass(frozen=True)
class Scope:
    """A WHERE clause over ``Corpus.source`` (alias ``m``) and its parameters."""

    sql: str
    params: tuple[Any, ...]
    narrows: bool = False


def memory_scope(filters: RecallFilters, now: float, *, include_deleted: bool = False) -> Scope:
    """The visible memories of ``filters.user_id`` within the filters' scope."""
    clauses = ["m.user_id = ?", "(m.expires_at IS NULL OR m.expires_at > ?)"]
    params: list[Any] = [filters.user_id, now]
    if not include_deleted:
        clauses.append("m.deleted_at IS NULL")
    for column, value in (("agent_id", filters.agent_id),
                          ("conversation_id", filters.conversation_id),
                          ("namespace", filters.namespace)):
        if value is not None:
            clauses.append(f"m.{column} = ?")
            params.append(value)
    if filters.min_importance is not None:
        clauses.append("m.importance >= ?")
        params.append(filters.min_importance)
    for tag in filters.tags:
        clauses.append("EXISTS (SELECT 1 FROM json_each(m.tags) WHERE value = ?)")
        params.append(tag)
    if filters.exclude_tags:
        clauses.append("NOT EXISTS (SELECT 1 FROM json_each(m.tags) "
                       "WHERE value IN (SELECT value FROM json_each(?)))")
        params.append(json.dumps(filters.exclude_tags))
    return Scope(" AND ".join(clauses), tuple(params), narrows=filters.narrows)


def knowledge_scope(category: str | None) -> Scope:
    """Every knowledge chunk, or those of one category."""
    if category is None:
        return Scope("1 = 1", ())
    return Scope("d.category = ?", (category,), narrows=True)


def fts_match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of ``terms``, each quoted so that it is only ever a word."""
    return " OR ".join(f'"{term}"' for term in terms)


def keyword_candidates(conn: sqlite3.Connection, corpus: Corpus, scope: Scope, text: str,
                       depth: int) -> dict[int, Candidate]:
    """The ``depth`` best bm25 matches of ``text`` within ``scope``.

    ``keyword`` is the match's coverage of the query in 0..1: its bm25 divided by the bm25 a
    document would earn by holding every query term once at average length (the sum of the
    terms' idf). Unlike dividing by the best match of the query, this stays low when the best
    match shares only a common word with the query. Words found in more than
    ``COMMON_TERM_SHARE`` of the rows are not matched (unless the query has no other).
    """
    idf = _term_idf(conn, corpus, query_terms(text))
    if not idf:
        return {}
    # A common word adds little to any score (past half the rows, FTS5 floors its idf to ~0),
    # yet matching it makes bm25 visit a large share of the rows.
    terms = [term for term, weight in idf.items() if weight > _COMMON_IDF] or list(idf)
    ideal = sum(max(1e-6, idf[term]) for term in terms)
    rows = conn.execute(
        f"SELECT m.pk, -bm25({corpus.fts}), {corpus.importance}, {corpus.recency} "
        # CROSS JOIN keeps the FTS index as the outer loop: the other way round, SQLite walks
        # the user's rows and runs the MATCH once per row.
        f"FROM {corpus.fts} CROSS JOIN {corpus.source} "
        f"WHERE m.pk = {corpus.fts}.rowid AND {corpus.fts} MATCH ? AND {scope.sql} "
        f"ORDER BY bm25({corpus.fts}) LIMIT ?",
        (fts_match_expression(terms), *scope.params, depth),
    ).fetchall()
    return {pk: Candidate(pk, importance, recency, keyword=min(1.0, max(0.0, score) / ideal))
            for pk, score, importance, recency in rows}


def _term_idf(conn: sqlite3.Connection, corpus: Corpus, terms: Sequence[str]) -> dict[str, float]:
    """FTS5's idf of each term, log((N - n + 0.5) / (n + 0.5)), before FTS5 floors it at 1e-6.

    N is the table's highest pk (O(1), and close enough: deleted rows nudge every idf alike).
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (corpus.table,)).fetchone()
    total = row[0] if row else 0
    idf = {}
    for term in terms:
        (matching,) = conn.execute(
            f"SELECT COUNT(*) FROM {corpus.fts} WHERE {corpus.fts} MATCH ?",
            (fts_match_expression([term]),),
        ).fetchone()
        idf[term] = math.log((total - matching + 0.5) / (matching + 0.5))
    return idf


def sync_space(conn: sqlite3.Connection, corpus: Corpus, space: VectorSpace, space_name: str,
               rows_sql: str, rows_params: Sequence[Any]) -> None:
    """Bring ``space`` up to date with the database (caller holds ``space.lock``).

    ``rows_sql`` selects ``(pk, embedding)`` of the space's rows with ``vec_seq > ?``, its last
    parameter. Reads only what changed since the copy was made, or everything after removals.
    """
    row = conn.execute(
        "SELECT (SELECT last_seq FROM vector_spaces WHERE space = ?), "
        "(SELECT removed FROM vector_removals WHERE scope = ?)",
        (space_name, corpus.removal_scope),
    ).fetchone()
    version = (row[0] or 0, row[1] or 0)
    if space.version == version:
        return
    if space.version is None or space.version[1] != version[1] or version[0] < space.version[0]:
        space.clear()
    since = 0 if space.version is None else space.version[0]
    space.upsert(conn.execute(rows_sql, (*rows_params, since)))
    space.version = version


def vector_candidates(conn: sqlite3.Connection, corpus: Corpus, scope: Scope, space: VectorSpace,
                      query: np.ndarray, depth: int) -> dict[int, Candidate]:
    """The ``depth`` rows within ``scope`` most similar to ``query`` (exact cosine).

    The space may hold rows outside the scope (other conversations, soft-deleted, expired), so
    candidates are checked against the database best first, in growing windows. A narrow scope
    with few rows is instead listed first and only its rows are scored.
    """
    if scope.narrows:
        eligible = conn.execute(
            f"SELECT m.pk FROM {corpus.source} WHERE {scope.sql} LIMIT ?",
            (*scope.params, SMALL_SCOPE + 1),
        ).fetchall()
        if len(eligible) <= SMALL_SCOPE:
            with space.lock:
                cosines = space.similarities_of((pk for (pk,) in eligible), query)
            nearest = sorted(cosines, key=cosines.__getitem__, reverse=True)[:depth]
            return _with_cosines(eligible_details(conn, corpus, scope, nearest), cosines)
    pks, scores = space.scan(query)
    found: dict[int, Candidate] = {}
    taken, window = 0, 2 * depth
    while len(found) < depth and taken < len(pks):
        end = min(len(pks), taken + window)
        # The best ``end`` rows, then the ones not checked yet, best first.
        top = np.argpartition(-scores, end - 1)[:end] if end < len(pks) else np.arange(len(pks))
        top = top[np.argsort(-scores[top], kind="stable")][taken:end]
        batch = {int(pks[i]): float(scores[i]) for i in top}
        found.update(_with_cosines(eligible_details(conn, corpus, scope, list(batch)), batch))
        taken, window = end, window * 4
    best = sorted(found.values(), key=lambda c: c.cosine, reverse=True)[:depth]
    return {candidate.pk: candidate for candidate in best}


def eligible_details(conn: sqlite3.Connection, corpus: Corpus, scope: Scope,
                     pks: Sequence[int]) -> dict[int, Candidate]:
    """Those of ``pks`` that lie within ``scope``, with their importance and recency."""
    if not pks:
        return {}
    # CROSS JOIN makes SQLite look the pks up one by one; left to itself it may walk every row
    # of the user through the user_id index instead.
    rows = conn.execute(
        f"SELECT m.pk, {corpus.importance}, {corpus.recency} "
        f"FROM json_each(?) AS wanted CROSS JOIN {corpus.source} "
        f"WHERE m.pk = wanted.value AND {scope.sql}",
        (json.dumps([int(pk) for pk in pks]), *scope.params),
    ).fetchall()
    return {pk: Candidate(pk, importance, recency) for pk, importance, recency in rows}


def _with_cosines(candidates: dict[int, Candidate],
                  cosines: dict[int, float]) -> dict[int, Candidate]:
    for pk, candidate in candidates.items():
        candidate.cosine = cosines.get(pk, 0.0)
    return candidates
