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
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.memory.drivers.vector_cache import VectorSpace
from app.core.memory.ranking import (
    COMMON_TERM_SHARE,
    Candidate,
    KeywordStats,
    query_terms,
)
from app.core.memory.validation import RecallFilters

#: Below this many eligible rows, a filtered vector search scores just those rows.
SMALL_SCOPE = 5_000


@dataclass(frozen=True)
class Corpus:
    """What differs between searching memories and searching knowledge chunks."""

    table: str
    fts: str
    removal_scope: str
    source: str
    importance: str
    recency: str
    #: The row's public id (the tie-breaker of equal scores), when it occurred, and whether it
    #: belongs to a conversation.
    public_id: str
    occurred: str
    in_conversation: str


MEMORIES = Corpus(
    table="memories", fts="memories_fts", removal_scope="memories",
    source="memories m", importance="m.importance", recency="m.created_at",
    public_id="m.id", occurred="m.occurred_at", in_conversation="m.conversation_id IS NOT NULL",
)
KNOWLEDGE = Corpus(
    table="knowledge_chunks", fts="knowledge_fts", removal_scope="knowledge_chunks",
    source="knowledge_chunks m JOIN knowledge_documents d ON d.pk = m.document_pk",
    importance="0.5", recency="d.updated_at",
    public_id="d.doc_id || '#' || m.chunk_index", occurred="d.updated_at", in_conversation="0",
)


@dataclass(frozen=True)
class Scope:
    """A WHERE clause over ``Corpus.source`` (alias ``m``) and its parameters."""

    sql: str
    params: tuple[Any, ...]
    narrows: bool = False
    #: Set when the scope is exactly this user's visible memories (no filter beyond the user),
    #: with the time that decides expiry: then ``scope_size`` reads ``memory_counts``.
    whole_user: tuple[str, float] | None = None


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
    if filters.start is not None:
        clauses.append("m.occurred_at >= ?")
        params.append(filters.start.timestamp())
    if filters.end is not None:
        clauses.append("m.occurred_at <= ?")
        params.append(filters.end.timestamp())
    for tag in filters.tags:
        clauses.append("EXISTS (SELECT 1 FROM json_each(m.tags) WHERE value = ?)")
        params.append(tag)
    if filters.exclude_tags:
        clauses.append("NOT EXISTS (SELECT 1 FROM json_each(m.tags) "
                       "WHERE value IN (SELECT value FROM json_each(?)))")
        params.append(json.dumps(filters.exclude_tags))
    whole_user = None if filters.narrows or include_deleted else (filters.user_id, now)
    return Scope(" AND ".join(clauses), tuple(params), narrows=filters.narrows,
                 whole_user=whole_user)


def knowledge_scope(category: str | None) -> Scope:
    """Every knowledge chunk, or those of one category."""
    if category is None:
        return Scope("1 = 1", ())
    return Scope("d.category = ?", (category,), narrows=True)


def fts_match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of ``terms``, each quoted so that it is only ever a word."""
    return " OR ".join(f'"{term}"' for term in terms)


@dataclass
class KeywordMatches:
    """Which rows of the recall's scope hold each query term, and what that makes of them.

    A common term's holders (and so its count) stop past the common share: it counts nowhere.
    """

    holders: dict[str, set[int]]
    stats: KeywordStats

    def terms_of(self, pk: int) -> frozenset[str]:
        return frozenset(term for term, pks in self.holders.items() if pk in pks)

    def searched_pks(self) -> set[int]:
        """The rows holding a searched (not too common) term: the keyword candidates."""
        return set().union(*(self.holders[term] for term in self.stats.searched()))


def keyword_matches(conn: sqlite3.Connection, corpus: Corpus, scope: Scope,
                    text: str) -> KeywordMatches:
    """The rows within ``scope`` holding each term of ``text`` (FTS5, stemmed), and the scope's
    size: the statistics of ``ranking.KeywordStats`` from the recall's own rows only.

    A term held by more than ``COMMON_TERM_SHARE`` of the scope neither searches nor weighs
    (unless every held term is that common), so its rows are read only up to that share plus
    one: enough to know it is common. Read whole, three words each in a quarter of 10k memories
    cost ~8 ms a recall.
    """
    rows_in_scope = scope_size(conn, corpus, scope)
    cap = int(COMMON_TERM_SHARE * rows_in_scope)
    terms = query_terms(text)
    holders = {term: _holders(conn, corpus, scope, term, cap + 1) for term in terms}
    if not any(0 < len(pks) <= cap for pks in holders.values()):
        # Every held term is common: then they all count (ranking.KeywordStats.kept), whole.
        holders = {term: pks if len(pks) <= cap else _holders(conn, corpus, scope, term, -1)
                   for term, pks in holders.items()}
    return KeywordMatches(holders, KeywordStats(rows_in_scope, {
        term: len(pks) for term, pks in holders.items()}))


def scope_size(conn: sqlite3.Connection, corpus: Corpus, scope: Scope) -> int:
    """How many rows ``scope`` holds. A whole user's visible memories: the user's count of
    memories not deleted (``memory_counts``, kept by triggers) less those expired by the
    scope's time, an index range over the expired ones only; any other scope is counted."""
    if scope.whole_user is not None:
        user_id, now = scope.whole_user
        (rows,) = conn.execute(
            "SELECT COALESCE((SELECT live FROM memory_counts WHERE user_id = ?), 0) - "
            "(SELECT COUNT(*) FROM memories WHERE user_id = ? AND deleted_at IS NULL "
            "AND expires_at <= ?)", (user_id, user_id, now)).fetchone()
        return int(rows)
    (rows,) = conn.execute(
        f"SELECT COUNT(*) FROM {corpus.source} WHERE {scope.sql}", scope.params).fetchone()
    return int(rows)


def _holders(conn: sqlite3.Connection, corpus: Corpus, scope: Scope, term: str,
             limit: int) -> set[int]:
    """The rows within ``scope`` holding ``term``, at most ``limit`` of them (-1: all)."""
    rows = conn.execute(
        # CROSS JOIN keeps the FTS index as the outer loop: the other way round, SQLite walks
        # the scope's rows and runs the MATCH once per row.
        f"SELECT m.pk FROM {corpus.fts} CROSS JOIN {corpus.source} "
        f"WHERE m.pk = {corpus.fts}.rowid AND {corpus.fts} MATCH ? AND {scope.sql} LIMIT ?",
        (fts_match_expression([term]), *scope.params, limit),
    ).fetchall()
    return {pk for (pk,) in rows}


def keyword_candidates(conn: sqlite3.Connection, corpus: Corpus, scope: Scope,
                       matches: KeywordMatches, depth: int) -> dict[int, Candidate]:
    """The ``depth`` rows with the best keyword coverage among those holding a searched term
    (equal coverages: the newest stored first), with their details (the caller scores them)."""
    weights = matches.stats.weights()
    # Summed term by term over the holders: a keyword_coverage call per row costs ~10x more.
    held: dict[int, float] = dict.fromkeys(matches.searched_pks(), 0.0)
    for term, weight in weights.items():
        for pk in matches.holders[term]:
            if pk in held:
                held[pk] += weight
    best = sorted(held, key=lambda pk: (held[pk], pk), reverse=True)[:depth]
    return eligible_details(conn, corpus, scope, best)


def neighbours(conn: sqlite3.Connection, hits: Sequence[int], count: int,
               now: float) -> dict[int, list[int]]:
    """For each memory of ``hits``, the ``count`` visible memories before and after it in its
    conversation (same user and conversation, by ``occurred_at`` then storage order), in that
    order. A memory without a conversation has none."""
    visible = "m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > ?)"
    same = f"m.user_id = h.user_id AND m.conversation_id = h.conversation_id AND {visible}"
    # One statement: each hit's rows before and after, through the (user_id,
    # conversation_id, occurred_at) index; the side says which, the rank how far.
    rows = conn.execute(
        "WITH h AS (SELECT m.pk, m.user_id, m.conversation_id, m.occurred_at FROM json_each(?) "
        "AS wanted CROSS JOIN memories m WHERE m.pk = wanted.value "
        "AND m.conversation_id IS NOT NULL) "
        "SELECT h.pk, (SELECT json_group_array(pk) FROM (SELECT m.pk FROM memories m "
        f"WHERE {same} AND (m.occurred_at < h.occurred_at OR (m.occurred_at = h.occurred_at "
        "AND m.pk < h.pk)) ORDER BY m.occurred_at DESC, m.pk DESC LIMIT ?)), "
        "(SELECT json_group_array(pk) FROM (SELECT m.pk FROM memories m "
        f"WHERE {same} AND (m.occurred_at > h.occurred_at OR (m.occurred_at = h.occurred_at "
        "AND m.pk > h.pk)) ORDER BY m.occurred_at, m.pk LIMIT ?)) FROM h",
        (json.dumps([int(pk) for pk in hits]), now, count, now, count)).fetchall()
    around: dict[int, list[int]] = {hit: [] for hit in hits}
    for hit, before, after in rows:
        around[hit] = list(reversed(json.loads(before))) + json.loads(after)
    return around


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
        f"SELECT m.pk, {corpus.importance}, {corpus.recency}, {corpus.public_id}, "
        f"{corpus.occurred}, {corpus.in_conversation} FROM json_each(?) AS wanted "
        f"CROSS JOIN {corpus.source} WHERE m.pk = wanted.value AND {scope.sql}",
        (json.dumps([int(pk) for pk in pks]), *scope.params),
    ).fetchall()
    return {pk: Candidate(pk, importance, recency, memory_id=public_id, occurred_at=occurred,
                          in_conversation=bool(talk))
            for pk, importance, recency, public_id, occurred, talk in rows}


def _with_cosines(candidates: dict[int, Candidate],
                  cosines: dict[int, float]) -> dict[int, Candidate]:
    for pk, candidate in candidates.items():
        candidate.cosine = cosines.get(pk, 0.0)
    return candidates
