"""How recall ranks: vector and keyword candidates, fused, with a time term and the neighbours
of strong hits; the same formula, computed here, on every driver that ranks on its side.

Candidates: the union of the ``candidate_depth(top_k)`` memories most similar to the query's
vector and the ``candidate_depth(top_k)`` with the best keyword coverage; every candidate gets
both scores, so a memory found by one side alone is not punished for the other's cut-off.

Per candidate, all in 0..1:

- ``vector``: cosine similarity of the query and memory vectors, clipped to 0..1.
- ``keyword``: the share of the query's weight the memory holds (``keyword_coverage``): the
  sum of the idf of the query terms it contains (presence, not counts), over the sum of the idf
  of all the query's terms. ``idf = ln(1 + (N - n + 0.5) / (n + 0.5))`` (BM25's), where N is
  the number of memories in the recall's scope and n how many of them hold the term
  (``KeywordStats``). Statistics come from *that user's memories in scope*, never the table:
  another user's data must not move a user's ranking (nor reveal what others store). Terms held
  by more than ``COMMON_TERM_SHARE`` (10%) of the scope are left out of both sums (too common to
  say what the query is about), unless every term a memory holds is that common. Query terms
  are the query's words minus a short stop-word list (``query_terms``), stemmed by the backend.
- ``importance``: the memory's importance (0.5 unless the agent said otherwise).

The score is the weighted mean ``(0.5*vector + 0.5*keyword + 0.05*importance [+ 0.1*time]) /
(1.05 [+ 0.1])``. The time term exists only when the query names a time ("in May 2023", "last
Friday": ``time_phrases.py``): it is 1 for a memory whose ``occurred_at`` lies in that window,
else 0, so such a query lifts what happened then without hiding the rest.

Neighbours: a memory next to one of the top k hits in its conversation (within
``CONTEXT_DISTANCE`` = 2 places, ordered by ``occurred_at`` then storage order; visible and in
scope) scores at least ``FusionWeights.neighbour`` (0.8) times that hit's score: in a
conversation the answer is often the turn after the question that matched. Spread from the
hits' own scores only (no chains). Keyword-only recall (``use_vector=False``) scores the
coverage alone (with the time term) and returns keyword matches only, so it spreads nothing.

Order: score, then what occurred last, then the newest stored, then the larger id: a total
order, so the same query on the same data gives the same list.

How this was chosen (``bench/ranking_lab.py``, an offline copy of this formula over LoCoMo's
dev data, 760 questions of categories 1-4, recall@10 / MRR; the drivers measured with
``python -m bench.retrieval``; BM25 0.526 / 0.375):

- The previous formula (bm25 over an ideal match with table-wide statistics on SQLite, the
  unweighted share of query words on PostgreSQL): 0.649 / 0.486. Per-user statistics alone:
  0.674 / 0.497; idf-weighted coverage (this one): 0.680 / 0.530; without the common-word cut
  0.678 / 0.528; the unweighted share with per-user statistics 0.655 / 0.514.
- Time term weight 0.1: 0.706 / 0.545 (questions that name a date: recall@10 0.638 -> 0.842).
  Additions of 0.05-0.2 or factors of 1.1-1.5 all landed at 0.70-0.71; 0.15 lost on
  open-domain questions. Writing the date into the stored text instead gave 0.689-0.695.
- Neighbours at 0.8 within 2: 0.745 / 0.547 alone; decay 0.7-0.9 all help, 0.5 does little,
  0.95 hurts; distance 2 beat 1 and 3; a decay per step (0.8^d) gave 0.724. Multi-hop
  questions lose a little (0.459 -> 0.444), the others gain.
- All together (the default): 0.772 / 0.563, date-naming questions 0.871; keyword-only
  0.711 / 0.529. Weights 0.4/0.6 and 0.6/0.4 (vector/keyword) were no better than 0.5/0.5.
- What is indexed: the content only, stemmed (porter for SQLite, the english configuration for
  PostgreSQL); tags and metadata are filters, not text, so a tag word cannot outrank content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from app.core.memory.time_phrases import TimeWindow

K = TypeVar("K", bound=Hashable)
#: ``neighbours_of(hits, distance)``: for each hit's pk, the pks of the visible memories up to
#: ``distance`` places before and after it in its conversation.
NeighbourLookup = Callable[[list[int], int], dict[int, list[int]]]
#: ``details_of(pks)``: those of ``pks`` within the recall's scope, as unscored candidates.
DetailsLookup = Callable[[list[int]], dict[int, "Candidate"]]

_MAX_QUERY_TERMS = 64
_TOKEN = re.compile(r"\w+", re.UNICODE)

#: Words too common to say what a query is about (English; they still match when a query has
#: nothing else).
_STOP_WORD_TEXT = """
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves s t don
"""
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())


def query_terms(text: str) -> list[str]:
    """The distinct words of ``text`` worth matching: stop words dropped unless nothing is left."""
    words = list(dict.fromkeys(token.lower() for token in _TOKEN.findall(text)))
    content = [word for word in words if word not in STOP_WORDS]
    return (content or words)[:_MAX_QUERY_TERMS]




@dataclass(frozen=True)
class FusionWeights:
    """Weights of the fused score's terms (non-negative, the first three not all zero), of the
    time term (``time``) and the share of a hit's score its neighbours get (``neighbour``,
    0..1; 0 spreads nothing)."""

    vector: float = 0.5
    keyword: float = 0.5
    importance: float = 0.05
    time: float = 0.1
    neighbour: float = 0.8

    def __post_init__(self) -> None:
        terms = (self.vector, self.keyword, self.importance)
        if any(weight < 0 for weight in terms) or sum(terms) <= 0:
            raise ValueError("fusion weights must be non-negative and not all zero")
        if self.time < 0 or not 0 <= self.neighbour <= 1:
            raise ValueError("the time weight must be non-negative and neighbour in 0..1")


DEFAULT_WEIGHTS = FusionWeights()

#: How many candidates each side contributes, at least; more when top_k is large.
MIN_CANDIDATE_DEPTH = 50


#: Keyword candidates come only from query terms held by at most this share of the recall's
#: rows (``KeywordStats.searched``).
COMMON_TERM_SHARE = 0.1
#: How many neighbours on each side of one of the top k hits (next to it in its conversation)
#: share its score (``FusionWeights.neighbour`` of it).
CONTEXT_DISTANCE = 2


def candidate_depth(top_k: int) -> int:
    """How many vector and how many keyword candidates to fetch for a recall of ``top_k``."""
    return max(MIN_CANDIDATE_DEPTH, 4 * top_k)


def fuse(
    vector: Mapping[K, float],
    keyword: Mapping[K, float],
    importance: Mapping[K, float],
    weights: FusionWeights = DEFAULT_WEIGHTS,
) -> dict[K, float]:
    """The fused score in 0..1 of every candidate in ``vector`` or ``keyword``.

    ``vector`` holds cosine similarities, ``keyword`` keyword coverages in 0..1; a candidate
    missing from one side scores 0 on it. ``importance`` defaults to 0.5.
    """
    total = weights.vector + weights.keyword + weights.importance
    fused: dict[K, float] = {}
    for key in vector.keys() | keyword.keys():
        cosine = min(1.0, max(0.0, vector.get(key, 0.0)))
        score = (
            weights.vector * cosine
            + weights.keyword * min(1.0, max(0.0, keyword.get(key, 0.0)))
            + weights.importance * importance.get(key, 0.5)
        )
        fused[key] = min(1.0, score / total)
    return fused


@dataclass
class Candidate:
    """A row a recall may return, with what ranking needs to know of it.

    ``terms`` are the (searched or not) query terms the row holds, for ``keyword_coverage``;
    ``keyword`` is filled from them. ``memory_id`` and ``recency`` give the total order of
    equal scores; ``occurred_at`` (epoch seconds) meets the time window a query names.
    """

    pk: int
    importance: float
    recency: float
    cosine: float = 0.0
    keyword: float = 0.0
    memory_id: str = ""
    occurred_at: float = 0.0
    terms: frozenset[str] = frozenset()
    #: Whether it belongs to a conversation (only then can it have neighbours).
    in_conversation: bool = False


# -- keyword statistics: one user's own ----------------------------------------------------------

@dataclass(frozen=True)
class KeywordStats:
    """How many rows are in the recall's scope and how many of them hold each query term.

    Counted by the driver over the *recall's own scope* (that user's visible memories matching
    the filters), never over the table: one user's data must not move another's ranking, nor
    reveal which words others store.
    """

    rows: int
    matches: Mapping[str, int]

    def kept(self) -> list[str]:
        """The terms that count: those held by at most ``COMMON_TERM_SHARE`` of the rows
        (terms no row holds included), or every term when each one a row holds is common."""
        kept = [term for term, n in self.matches.items()
                if n <= COMMON_TERM_SHARE * self.rows]
        if any(self.matches[term] > 0 for term in kept):
            return kept
        return list(self.matches)

    def weights(self) -> dict[str, float]:
        """Each kept term's idf, ``ln(1 + (N - n + 0.5) / (n + 0.5))`` (BM25's, never
        negative)."""
        return {term: math.log(1 + (self.rows - self.matches[term] + 0.5)
                               / (self.matches[term] + 0.5)) for term in self.kept()}

    def searched(self) -> list[str]:
        """The terms whose rows become keyword candidates: the kept ones some row holds."""
        return [term for term in self.kept() if self.matches[term] > 0]


def keyword_coverage(terms: frozenset[str] | set[str], weights: Mapping[str, float]) -> float:
    """The share of the query's weight (its kept terms' idf) that a row holding ``terms``
    covers (summed in the query's order, so every driver adds the same numbers alike)."""
    total = sum(weights.values())
    if total <= 0:
        return 0.0
    return min(1.0, sum(weight for term, weight in weights.items() if term in terms) / total)


# -- ranking -----------------------------------------------------------------------------------

def score_candidates(candidates: Mapping[int, Candidate],
                     weights: FusionWeights = DEFAULT_WEIGHTS, *, use_vector: bool = True,
                     window: TimeWindow | None = None) -> dict[int, float]:
    """Each candidate's score in 0..1: fused (or keyword coverage alone when ``use_vector`` is
    false; then only keyword matches qualify), with the time term when the query names a
    ``window`` (``with_time``)."""
    keyword = {pk: c.keyword for pk, c in candidates.items() if c.keyword > 0}
    if use_vector:
        scores = fuse({pk: c.cosine for pk, c in candidates.items()}, keyword,
                      {pk: c.importance for pk, c in candidates.items()}, weights)
        total = weights.vector + weights.keyword + weights.importance
    else:
        scores, total = keyword, 1.0
    if window is not None:
        start, end = window.start.timestamp(), window.end.timestamp()
        for pk, score in scores.items():
            scores[pk] = with_time(score, start <= candidates[pk].occurred_at < end, total,
                                   weights.time)
    return scores


def with_time(score: float, in_window: bool, total: float = 1.0,
              weight: float = DEFAULT_WEIGHTS.time) -> float:
    """``score`` (a weighted mean over weights summing to ``total``) with the time term added
    to the mean: ``weight`` times 1 when the memory occurred in the window the query names,
    else 0. Only queries that name a time have the term."""
    return (score * total + (weight if in_window else 0.0)) / (total + weight)


def spread_to_neighbours(scores: dict[int, float], neighbours: Mapping[int, list[int]],
                         decay: float) -> dict[int, float]:
    """A memory next to a hit (``neighbours[hit]``) scores at least ``decay`` times the hit."""
    spread = dict(scores)
    for hit, around in neighbours.items():
        lifted = decay * scores.get(hit, 0.0)
        for pk in around:
            if lifted > spread.get(pk, 0.0):
                spread[pk] = lifted
    return spread


def order(scores: Mapping[int, float], candidates: Mapping[int, Candidate],
          top_k: int) -> list[tuple[int, float]]:
    """The ``top_k`` best (pk, score), best first, in a total order: equal scores go to what
    occurred last, then to the newest stored, then to the larger ``memory_id``, so the same
    query on the same data gives the same list on every driver."""
    def key(item: tuple[int, float]) -> tuple[float, float, float, str]:
        candidate = candidates[item[0]]
        return item[1], candidate.occurred_at, candidate.recency, candidate.memory_id

    return sorted(scores.items(), key=key, reverse=True)[:top_k]


def rank_candidates(candidates: Mapping[int, Candidate], top_k: int,
                    weights: FusionWeights = DEFAULT_WEIGHTS, *,
                    use_vector: bool = True, window: TimeWindow | None = None,
                    neighbours_of: NeighbourLookup | None = None,
                    details_of: DetailsLookup | None = None) -> list[tuple[int, float]]:
    """The ``top_k`` best (pk, score) of ``candidates``: ``score_candidates``; then, for a
    hybrid recall given the driver's lookups, the neighbours of the top k hits (within
    ``CONTEXT_DISTANCE``, from ``neighbours_of(hits, distance)``; the rows among them that
    are not candidates yet come from ``details_of(pks)``, which keeps only those in the
    recall's scope) get ``weights.neighbour`` of their hit's score; then ``order``."""
    scores = score_candidates(candidates, weights, use_vector=use_vector, window=window)
    if (use_vector and weights.neighbour > 0 and scores and neighbours_of is not None
            and details_of is not None):
        hits = [pk for pk, _ in order(scores, candidates, top_k)
                if candidates[pk].in_conversation]
        around = neighbours_of(hits, CONTEXT_DISTANCE) if hits else {}
        new = [pk for pks in around.values() for pk in pks if pk not in candidates]
        candidates = {**candidates, **details_of(new)}
        scores = spread_to_neighbours(
            scores, {hit: [pk for pk in pks if pk in candidates] for hit, pks in around.items()},
            weights.neighbour)
    return order(scores, candidates, top_k)
