"""Offline ranking lab: LoCoMo recall re-ranked in numpy, to compare ranking formulas quickly.

    python -m bench.ranking_lab [--data PATH] [--cache DIR] [--only NAME,...] [--list]

A research tool, not a benchmark of a driver (that is ``bench.retrieval``). It follows the same
protocol (one user per conversation, every turn a memory ``"Speaker: text"``, each question
ranked for its user, top 25, categories 1-4 the headline) but ranks in Python, so that a
variant of the formula costs seconds instead of a database run:

- Vectors: every turn (plain, and with its session date in front) and every question embedded
  once with ``get_default_embedder()``; cached as ``.npy`` under ``--cache`` (keyed by a hash
  of the texts), so only the first run embeds (run it under the benchmark lock).
- Words: tokenised by SQLite's own FTS5 tokenizers (``porter unicode61``, as the SQLite driver
  indexes, or ``unicode61`` unstemmed), read back through ``fts5vocab``; query words are
  ``ranking.query_terms`` of the question, each put through the same tokenizer.
- ``BM25 baseline``: bench.retrieval's (needs rank_bm25, the ``bench`` extra; skipped without).
- ``today``: a re-implementation of the SQLite driver's recall (FTS5 bm25 with idf and the 10%
  common-word cut over the whole table, i.e. all five conversations; coverage = bm25 / sum of
  the kept terms' idf; candidates = the best ``candidate_depth(25)`` by cosine and by bm25;
  keyword 0 for a vector candidate outside the keyword candidates; fused 0.5/0.5/0.05). It
  should land within ~0.01 of ``bench.retrieval``'s figures, which makes the other variants
  credible.
- Variants (``VARIANTS``) change one thing at a time: the keyword score and its statistics
  (per user), the date in the text, a time boost for questions that name a date, and a score
  for the neighbours of strong hits. ``--only`` runs some of them; ``--list`` names them.

Date-naming questions are found with dateparser's ``search_dates`` (reference time: the
conversation's last session date); the window a phrase names is its day, week, month or year
(dateparser's ``period``). Output: a markdown table (recall@10 / MRR, categories 1-4, the
date-naming subset, each category) and the same as JSON next to it. The LoCoMo data is for
benchmarking only (CC BY-NC 4.0) and is never copied into the project.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sqlite3
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from app.core.memory.ranking import candidate_depth, query_terms
from bench.retrieval import DEFAULT_DATA, WORDS, load

TOP_K = 25
DEPTH = candidate_depth(TOP_K)
SESSION_DATE = "%I:%M %p on %d %B, %Y"
K1, B = 1.2, 0.75  # FTS5's bm25 constants


# -- data --------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Every turn of every conversation, in store order (user by user, session, turn)."""

    user: list[int] = field(default_factory=list)
    dia: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)
    dated: list[str] = field(default_factory=list)
    occurred: list[datetime] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each user's [start, end)
    questions: list[dict[str, Any]] = field(default_factory=list)
    references: list[datetime] = field(default_factory=list)  # each user's last session date


def build_corpus(path: Path) -> Corpus:
    corpus = Corpus()
    for number, conversation in enumerate(load(path)):
        start = len(corpus.dia)
        for dia_id, content, meta in conversation["turns"]:
            when = datetime.strptime(meta["session_date"], SESSION_DATE)
            corpus.user.append(number)
            corpus.dia.append(dia_id)
            corpus.plain.append(content)
            corpus.dated.append(f"[{when.day} {when:%B %Y}] {content}")
            corpus.occurred.append(when)
        corpus.spans.append((start, len(corpus.dia)))
        corpus.references.append(max(corpus.occurred[start:]))
        for question in conversation["questions"]:
            corpus.questions.append({**question, "user": number})
    return corpus


# -- vectors -----------------------------------------------------------------------------------

def embedded(texts: Sequence[str], cache: Path, *, query: bool) -> np.ndarray:
    """Vectors of ``texts`` (documents or queries), from the cache or embedded once."""
    digest = hashlib.sha256(("q" if query else "d").encode()
                            + "\x00".join(texts).encode()).hexdigest()[:16]
    target = cache / f"vectors-{digest}.npy"
    if target.exists():
        return np.load(target)
    from app.core.memory.embeddings import get_default_embedder

    embedder = get_default_embedder()
    started = time.perf_counter()
    if query:
        matrix = np.vstack([embedder.embed_query(text) for text in texts])
    else:
        matrix = np.asarray(embedder.embed_documents(list(texts)))
    print(f"embedded {len(texts)} texts in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(target, matrix.astype(np.float32))
    return matrix.astype(np.float32)


# -- words -------------------------------------------------------------------------------------

def tokenize(texts: Sequence[str], tokenizer: str) -> list[list[str]]:
    """Each text's tokens as SQLite FTS5 with ``tokenizer`` indexes them, in order."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(content, tokenize='{tokenizer}')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    conn.executemany("INSERT INTO t (rowid, content) VALUES (?, ?)",
                     [(i + 1, text) for i, text in enumerate(texts)])
    tokens: list[list[str]] = [[] for _ in texts]
    for term, doc, _offset in conn.execute("SELECT term, doc, offset FROM v ORDER BY doc, offset"):
        tokens[doc - 1].append(term)
    conn.close()
    return tokens


def tokenize_pg(texts: Sequence[str], dsn: str) -> list[list[str]]:
    """Each text's lexemes as PostgreSQL's ``to_tsvector('english', ...)`` makes them (each
    repeated as often as it occurs; order lost). Reads only: no table is made."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t.n, u.lexeme, cardinality(u.positions) FROM unnest(%s::text[]) "
            "WITH ORDINALITY AS t (body, n), unnest(to_tsvector('english', t.body)) AS u",
            (list(texts),)).fetchall()
    tokens: list[list[str]] = [[] for _ in texts]
    for number, lexeme, count in rows:
        tokens[number - 1].extend([lexeme] * max(1, count or 1))
    return tokens


@dataclass
class Index:
    """Term frequencies of every row; document frequencies over all rows and per user."""

    tf: list[Counter[str]]
    length: np.ndarray
    postings: dict[str, dict[int, int]]
    user_of: np.ndarray
    spans: list[tuple[int, int]]

    @classmethod
    def build(cls, tokens: list[list[str]], user_of: Sequence[int],
              spans: list[tuple[int, int]]) -> Index:
        tf = [Counter(row) for row in tokens]
        postings: dict[str, dict[int, int]] = defaultdict(dict)
        for doc, counts in enumerate(tf):
            for term, count in counts.items():
                postings[term][doc] = count
        return cls(tf, np.array([len(row) for row in tokens], dtype=float), dict(postings),
                   np.asarray(user_of), spans)

    def df(self, term: str, user: int | None) -> int:
        docs = self.postings.get(term, {})
        if user is None:
            return len(docs)
        start, end = self.spans[user]
        return sum(1 for doc in docs if start <= doc < end)

    def rows(self, user: int | None) -> int:
        return len(self.tf) if user is None else self.spans[user][1] - self.spans[user][0]

    def tf_vector(self, term: str, user: int) -> np.ndarray:
        start, end = self.spans[user]
        out = np.zeros(end - start)
        for doc, count in self.postings.get(term, {}).items():
            if start <= doc < end:
                out[doc - start] = count
        return out


# -- keyword scores ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KeywordSpec:
    """How the keyword side scores a row.

    ``kind``: ``bm25`` (FTS5's bm25 over the kept terms, divided by the sum of their idf: the
    SQLite driver's coverage), ``idf`` (sum of the idf of the query terms the row holds / sum
    over all query terms, binary presence), ``share`` (share of the query terms the row holds,
    the PGVector driver's coverage). ``scope``: ``table`` or ``user`` statistics. ``cut``: terms
    in more than this share of the rows are not matched (None: no cut). ``unseen``: whether
    query terms no row of the scope holds count in the denominator.
    """

    kind: str = "bm25"
    scope: str = "table"
    cut: float | None = 0.1
    unseen: bool = True
    stemmer: str = "porter"


def keyword_scores(spec: KeywordSpec, index: Index, terms: list[list[str]], user: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(score in 0..1, candidate order key) for every row of ``user``; key 0: not a match.

    ``terms`` are the query's words, each as the tokens the tokenizer made of it (a word split
    in several tokens matches a row holding all of them).
    """
    scope = None if spec.scope == "table" else user
    total = index.rows(scope)
    start, end = index.spans[user]
    size = end - start
    present, dfs = [], []
    for tokens in terms:
        if not tokens:
            continue
        counts = np.min([index.tf_vector(token, user) for token in tokens], axis=0)
        present.append(counts)
        dfs.append(min(index.df(token, scope) for token in tokens))
    if not present:
        return np.zeros(size), np.zeros(size)
    df = np.array(dfs, dtype=float)
    fts_idf = np.log((total - df + 0.5) / (df + 0.5))
    kept = np.ones(len(df), dtype=bool)
    if spec.cut is not None:
        kept = df <= spec.cut * total if spec.kind != "bm25" else \
            fts_idf > math.log((1 - spec.cut) / spec.cut)
        if not kept.any():
            kept[:] = True
    if not spec.unseen:
        kept &= df > 0
        if not kept.any():
            return np.zeros(size), np.zeros(size)
    matrix = np.vstack(present)[kept]
    if spec.kind == "bm25":
        idf = np.maximum(fts_idf[kept], 1e-6)
        lengths = index.length if spec.scope == "table" else index.length[start:end]
        avgdl = lengths.mean()
        norm = K1 * (1 - B + B * index.length[start:end] / avgdl)
        bm25 = (idf[:, None] * matrix * (K1 + 1) / (matrix + norm)).sum(axis=0)
        return np.minimum(1.0, bm25 / idf.sum()), bm25
    hold = (matrix > 0).astype(float)
    if spec.kind == "share":
        score = hold.mean(axis=0)
    else:
        idf = np.log(1 + (total - df[kept] + 0.5) / (df[kept] + 0.5))
        score = (idf[:, None] * hold).sum(axis=0) / idf.sum()
    return score, score


# -- dates in questions ------------------------------------------------------------------------

def question_window(text: str, reference: datetime) -> tuple[datetime, datetime] | None:
    """The [start, end) window of the narrowest date or period ``text`` names, or None.

    dateparser's search_dates finds the phrases (relative ones against ``reference``);
    DateDataParser's period of each phrase (day, week, month, year) gives the window's length.
    """
    from dateparser.date import DateDataParser
    from dateparser.search import search_dates

    settings = {"RELATIVE_BASE": reference, "PREFER_DATES_FROM": "past",
                "REQUIRE_PARTS": []}
    found = search_dates(text, languages=["en"], settings=settings)
    if not found:
        return None
    parser = DateDataParser(languages=["en"], settings=settings)
    windows = []
    for phrase, _ in found:
        if not re.search(r"\d|yesterday|today|last|ago|week|month|year|january|february|march|"
                         r"april|may\b|june|july|august|september|october|november|december",
                         phrase, re.I):
            continue
        data = parser.get_date_data(phrase)
        if data.date_obj is None:
            continue
        day = data.date_obj.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        period = data.period or "day"
        if period == "year":
            begin = day.replace(month=1, day=1)
            windows.append((begin, begin.replace(year=begin.year + 1)))
        elif period == "month":
            begin = day.replace(day=1)
            following = (begin + timedelta(days=32)).replace(day=1)
            windows.append((begin, following))
        elif period == "week":
            begin = day - timedelta(days=day.weekday())
            windows.append((begin, begin + timedelta(days=7)))
        else:
            windows.append((day, day + timedelta(days=1)))
    if not windows:
        return None
    return min(windows, key=lambda w: w[1] - w[0])


# -- the ranking under test --------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One ranking formula. Scores: fused = (wv*cos + wk*keyword + wi*0.5) / (wv+wk+wi) over
    the candidates; then the time boost; then the neighbours' scores; then the top 25."""

    keyword: KeywordSpec = KeywordSpec()
    wv: float = 0.5
    wk: float = 0.5
    wi: float = 0.05
    keyword_all: bool = False  # keyword score for every candidate (False: keyword candidates)
    keyword_only: bool = False
    index_text: str = "plain"  # plain | dated: the text the keyword side indexes
    embed_text: str = "plain"  # plain | dated: the text embedded
    boost: float = 0.0  # time boost size
    boost_mode: str = "mul"  # mul: score * (1 + boost); add: score + boost; term: see below
    # term: one more term of the weighted mean, weight ``boost``, 1 inside the window else 0
    # (only for questions that name a window): stays in 0..1, ranks like add boost/(wv+wk+wi)
    window_candidates: bool = False  # the window's rows join the candidates
    slack_days: int = 0  # the window's end moved later by this many days
    decay: float = 0.0  # neighbour score = decay**distance * hit score (0: off)
    distance: int = 0
    flat: bool = False  # neighbour score = decay * hit score whatever the distance
    sources: int = 0  # only the best N rows (before spreading) spread to neighbours (0: all)
    context: int = 0  # count each top-10 hit's N neighbours too (reported apart)


def rank_question(variant: Variant, lab: Lab, number: int) -> list[int]:
    """The top 25 rows (corpus indices) of question ``number`` under ``variant``."""
    question = lab.corpus.questions[number]
    user = question["user"]
    start, end = lab.corpus.spans[user]
    index = lab.indexes[(variant.index_text, variant.keyword.stemmer)]
    terms = lab.query_tokens[variant.keyword.stemmer][number]
    keyword, key = keyword_scores(variant.keyword, index, terms, user)
    matched = key > 0
    by_key = np.argsort(-key, kind="stable")[:DEPTH]
    keyword_candidates = by_key[matched[by_key]]
    order = np.arange(end - start)
    if variant.keyword_only:
        score = np.full(end - start, -np.inf)
        score[keyword_candidates] = keyword[keyword_candidates]
        tie = -np.argsort(np.argsort(-key, kind="stable"))  # bm25 order among equal scores
    else:
        cosine = lab.doc_vectors[variant.embed_text][start:end] @ lab.question_vectors[number]
        nearest = np.argsort(-cosine, kind="stable")[:DEPTH]
        candidates = np.union1d(nearest, keyword_candidates)
        named = lab.windows[number]
        if variant.window_candidates and named is not None:
            rows = [i for i, when in enumerate(lab.corpus.occurred[start:end])
                    if named[0] <= when < named[1]]
            candidates = np.union1d(candidates, np.array(rows, dtype=int))
        kw = np.zeros(end - start)
        if variant.keyword_all:
            kw[candidates] = keyword[candidates]
        else:
            kw[keyword_candidates] = keyword[keyword_candidates]
        fused = (variant.wv * np.clip(cosine, 0, 1) + variant.wk * np.clip(kw, 0, 1)
                 + variant.wi * 0.5) / (variant.wv + variant.wk + variant.wi)
        score = np.full(end - start, -np.inf)
        score[candidates] = fused[candidates]
        tie = order  # later rows (larger pk) first among equal scores
    window = lab.windows[number]
    if variant.boost and window is not None:
        begin, finish = window[0], window[1] + timedelta(days=variant.slack_days)
        inside = np.array([begin <= when < finish
                           for when in lab.corpus.occurred[start:end]]) & np.isfinite(score)
        if variant.boost_mode == "mul":
            score[inside] *= 1 + variant.boost
        elif variant.boost_mode == "term":
            total = variant.wv + variant.wk + variant.wi
            score[inside] += variant.boost / total
            score *= total / (total + variant.boost)
        else:
            score[inside] += variant.boost
    if variant.decay and variant.distance:
        own = score.copy()
        finite = np.isfinite(own)
        if variant.sources:
            finite[np.argsort(-own, kind="stable")[variant.sources:]] = False
        for offset in range(1, variant.distance + 1):
            factor = variant.decay if variant.flat else variant.decay ** offset
            spread = np.where(finite, own * factor, -np.inf)
            score[offset:] = np.maximum(score[offset:], spread[:-offset])
            score[:-offset] = np.maximum(score[:-offset], spread[offset:])
    ranked = np.lexsort((-tie, -score))
    ranked = ranked[np.isfinite(score[ranked])][:TOP_K]
    return [start + int(i) for i in ranked]


def metrics(ranked: list[str], relevant: set[str]) -> dict[str, float]:
    first = next((i for i, dia in enumerate(ranked) if dia in relevant), None)
    return {"r10": len(set(ranked[:10]) & relevant) / len(relevant),
            "r25": len(set(ranked[:25]) & relevant) / len(relevant),
            "mrr": 0.0 if first is None else 1.0 / (first + 1)}


@dataclass
class Lab:
    corpus: Corpus
    doc_vectors: dict[str, np.ndarray]
    question_vectors: np.ndarray
    indexes: dict[tuple[str, str], Index]
    query_tokens: dict[str, list[list[list[str]]]]
    windows: list[tuple[datetime, datetime] | None]


def open_lab(path: Path, cache: Path, pg_dsn: str | None = None) -> Lab:
    corpus = build_corpus(path)
    texts = [q["question"] for q in corpus.questions]
    doc_vectors = {name: embedded(getattr(corpus, name), cache, query=False)
                   for name in ("plain", "dated")}
    question_vectors = embedded(texts, cache, query=True)
    tokenizers = {"porter": "porter unicode61", "none": "unicode61"}
    if pg_dsn:
        tokenizers["pg"] = pg_dsn

    def split(texts: Sequence[str], stem: str) -> list[list[str]]:
        if stem == "pg":
            return tokenize_pg(texts, tokenizers[stem])
        return tokenize(texts, tokenizers[stem])

    indexes = {(name, stem): Index.build(split(getattr(corpus, name), stem), corpus.user,
                                         corpus.spans)
               for name in ("plain", "dated") for stem in tokenizers}
    query_tokens = {}
    for stem in tokenizers:
        words = [query_terms(text) for text in texts]
        distinct = sorted({word for row in words for word in row})
        tokens = dict(zip(distinct, split(distinct, stem), strict=True))
        query_tokens[stem] = [[tokens[word] for word in row] for row in words]
    windows_file = cache / "windows.json"
    if windows_file.exists():
        raw = json.loads(windows_file.read_text())
    else:
        raw = []
        for question in corpus.questions:
            window = question_window(question["question"], corpus.references[question["user"]])
            raw.append(None if window is None else [w.isoformat() for w in window])
        windows_file.write_text(json.dumps(raw))
    windows = [None if w is None else (datetime.fromisoformat(w[0]), datetime.fromisoformat(w[1]))
               for w in raw]
    return Lab(corpus, doc_vectors, question_vectors, indexes, query_tokens, windows)


def evaluate(variant: Variant, lab: Lab) -> dict[str, dict[str, float]]:
    """recall@10, recall@25 and MRR by group: 1-4, dated (1-4 naming a date), undated, 1..4."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for number, question in enumerate(lab.corpus.questions):
        category = question["category"]
        if category not in (1, 2, 3, 4):
            continue
        ranked = rank_question(variant, lab, number)
        row = metrics([lab.corpus.dia[i] for i in ranked], question["evidence"])
        if variant.context:  # recall@10: evidence among the top 10 hits or their neighbours
            shown = with_context(lab, ranked, variant.context)
            row["r10"] = len(shown & question["evidence"]) / len(question["evidence"])
        groups["1-4"].append(row)
        groups["dated" if lab.windows[number] else "undated"].append(row)
        groups[str(category)].append(row)
    return {name: {m: statistics.fmean(r[m] for r in rows) for m in rows[0]} | {"n": len(rows)}
            for name, rows in groups.items()}


def with_context(lab: Lab, ranked: list[int], context: int) -> set[str]:
    """The top 10 hits and each one's ``context`` neighbours before and after (same user): what
    ``recall(top_k=10, context=N)`` would hand over."""
    if not ranked:
        return set()
    start, end = lab.corpus.spans[lab.corpus.user[ranked[0]]]
    return {lab.corpus.dia[j] for i in ranked[:10]
            for j in range(max(start, i - context), min(end, i + context + 1))}


def bm25_baseline(lab: Lab) -> dict[str, dict[str, float]]:
    """bench.retrieval's BM25 baseline (rank_bm25's BM25Okapi over lower-cased words)."""
    from rank_bm25 import BM25Okapi

    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    models = {}
    for user, (start, end) in enumerate(lab.corpus.spans):
        models[user] = BM25Okapi([WORDS.findall(t.lower()) for t in lab.corpus.plain[start:end]])
    for number, question in enumerate(lab.corpus.questions):
        if question["category"] not in (1, 2, 3, 4):
            continue
        start, _ = lab.corpus.spans[question["user"]]
        values = models[question["user"]].get_scores(WORDS.findall(question["question"].lower()))
        ranked = [lab.corpus.dia[start + i] for i in np.argsort(-values, kind="stable")[:TOP_K]]
        row = metrics(ranked, question["evidence"])
        groups["1-4"].append(row)
        groups["dated" if lab.windows[number] else "undated"].append(row)
        groups[str(question["category"])].append(row)
    return {name: {m: statistics.fmean(r[m] for r in rows) for m in rows[0]} | {"n": len(rows)}
            for name, rows in groups.items()}


# -- the variants ------------------------------------------------------------------------------

TODAY = Variant()
USER_BM25 = replace(TODAY, keyword=KeywordSpec("bm25", "user"))
IDF = KeywordSpec("idf", "user", 0.1)
#: The formula recommended for issue 17 (see the report): idf coverage on the user's own
#: statistics, every candidate scored on both sides, a time term for questions naming a window,
#: and neighbours within 2 turns taking 0.8 of a hit's score.
RECOMMENDED = Variant(keyword=IDF, keyword_all=True, boost=0.1, boost_mode="term",
                      decay=0.8, distance=2, flat=True)


def _variants() -> dict[str, Variant]:
    v: dict[str, Variant] = {"today": TODAY, "today keyword-only": replace(TODAY,
                                                                          keyword_only=True)}
    # 1. keyword score and per-user statistics
    v["bm25 per-user"] = USER_BM25
    v["bm25 per-user, all cands"] = replace(USER_BM25, keyword_all=True)
    v["bm25 per-user keyword-only"] = replace(USER_BM25, keyword_only=True)
    for cut in (None, 0.05, 0.1, 0.2):
        for unseen in (True, False):
            spec = KeywordSpec("idf", "user", cut, unseen)
            name = f"idf-cov cut={cut} unseen={'in' if unseen else 'out'}"
            v[name] = replace(TODAY, keyword=spec, keyword_all=True)
            v[name + " keyword-only"] = replace(TODAY, keyword=spec, keyword_only=True)
    v["idf-cov cut=0.1 unstemmed"] = replace(
        TODAY, keyword=replace(IDF, stemmer="none"), keyword_all=True)
    v["share (pg today) per-user cut=None"] = replace(
        TODAY, keyword=KeywordSpec("share", "user", None), keyword_all=True)
    v["share per-user cut=0.1"] = replace(
        TODAY, keyword=KeywordSpec("share", "user", 0.1), keyword_all=True)
    base = replace(TODAY, keyword=IDF, keyword_all=True)
    for wv in (0.4, 0.6):
        v[f"idf-cov weights {wv}/{round(1 - wv, 1)}"] = replace(base, wv=wv, wk=round(1 - wv, 1))
    # 2. time: the date in the text, and a boost for questions naming a date
    v["idf-cov + date in index"] = replace(base, index_text="dated")
    v["idf-cov + date embedded"] = replace(base, embed_text="dated")
    v["idf-cov + date in both"] = replace(base, index_text="dated", embed_text="dated")
    v["today + date in both"] = replace(TODAY, index_text="dated", embed_text="dated")
    for mode, sizes in (("mul", (0.1, 0.2, 0.3, 0.5)), ("add", (0.05, 0.1, 0.2))):
        for size in sizes:
            for slack in (0, 14):
                v[f"idf-cov + boost {mode} {size} slack {slack}"] = replace(
                    base, boost=size, boost_mode=mode, slack_days=slack)
    # 3. neighbours
    for decay in (0.5, 0.7, 0.8, 0.9, 0.95):
        for distance in (1, 2, 3):
            v[f"idf-cov + neighbours {decay}^d d<={distance}"] = replace(
                base, decay=decay, distance=distance)
        v[f"idf-cov + neighbours flat {decay} d<=2"] = replace(
            base, decay=decay, distance=2, flat=True)
    # 4. combinations
    for unseen in (True, False):
        for decay in (0.7, 0.8, 0.85):
            for boost in (0.1, 0.2):
                for sources in (0, 10, 25):
                    spec = KeywordSpec("idf", "user", 0.1, unseen)
                    v[f"combo unseen={'in' if unseen else 'out'} flat {decay} d<=2 add {boost}"
                      f" src={sources or 'all'}"] = replace(
                        base, keyword=spec, decay=decay, distance=2, flat=True,
                        boost=boost, boost_mode="add", sources=sources)
    combo = replace(base, decay=0.8, distance=2, flat=True, boost=0.1, boost_mode="add")
    for distance in (1, 3):
        v[f"combo d<={distance}"] = replace(combo, distance=distance)
    for wv in (0.4, 0.6):
        v[f"combo weights {wv}/{round(1 - wv, 1)}"] = replace(combo, wv=wv, wk=round(1 - wv, 1))
    v["combo cut=None"] = replace(combo, keyword=KeywordSpec("idf", "user", None))
    v["combo cut=0.2"] = replace(combo, keyword=KeywordSpec("idf", "user", 0.2))
    v["combo + date in index"] = replace(combo, index_text="dated")
    v["combo, keyword from keyword candidates only"] = replace(combo, keyword_all=False)
    v["combo slack 14"] = replace(combo, slack_days=14)
    for weight in (0.1, 0.15, 0.2):
        v[f"RECOMMENDED time term {weight}"] = replace(
            RECOMMENDED, boost=weight)
    v["RECOMMENDED"] = RECOMMENDED
    v["RECOMMENDED + window rows as candidates"] = replace(RECOMMENDED, window_candidates=True)
    v["RECOMMENDED keyword-only"] = replace(RECOMMENDED, keyword_only=True)
    v["RECOMMENDED keyword-only, no time/neighbours"] = replace(
        RECOMMENDED, keyword_only=True, boost=0, decay=0)
    v["RECOMMENDED, PostgreSQL english lexemes (--pg)"] = replace(
        RECOMMENDED, keyword=replace(IDF, stemmer="pg"))
    v["RECOMMENDED unstemmed"] = replace(RECOMMENDED, keyword=replace(IDF, stemmer="none"))
    v["RECOMMENDED, pg share keyword"] = replace(
        RECOMMENDED, keyword=KeywordSpec("share", "user", None))
    v["RECOMMENDED, bm25 per-user keyword"] = replace(
        RECOMMENDED, keyword=KeywordSpec("bm25", "user"))
    v["RECOMMENDED, no time boost"] = replace(RECOMMENDED, boost=0)
    v["RECOMMENDED, no neighbours"] = replace(RECOMMENDED, decay=0)
    for context in (1, 2):
        v[f"idf-cov, context={context} (hits+neighbours)"] = replace(base, context=context)
    return v


VARIANTS = _variants()


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    groups = ("1-4", "dated", "undated", "1", "2", "3", "4")
    first = next(iter(results.values()))
    lines = ["| variant | " + " | ".join(f"{g} (n={int(first[g]['n'])}) r@10/MRR" for g in groups)
             + " | 1-4 r@25 |", "|---|" + "---|" * (len(groups) + 1)]
    for name, row in results.items():
        cells = [f"{row[g]['r10']:.3f} / {row[g]['mrr']:.3f}" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['1-4']['r25']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ranking_lab"))
    parser.add_argument("--only", default="", help="comma-separated variant names (substrings)")
    parser.add_argument("--list", action="store_true", help="name the variants and stop")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--pg", metavar="DSN",
                        help="also tokenise with PostgreSQL's english configuration (read only)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(VARIANTS))
        return 0
    lab = open_lab(args.data, args.cache, args.pg)
    wanted = [w for w in args.only.split(",") if w]
    chosen = {name: variant for name, variant in VARIANTS.items()
              if (not wanted or any(w in name for w in wanted))
              and (args.pg or variant.keyword.stemmer != "pg")}
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        results["BM25 baseline"] = bm25_baseline(lab)
    except ImportError:
        print("rank_bm25 missing: no BM25 baseline", file=sys.stderr)
    for name, variant in chosen.items():
        results[name] = evaluate(variant, lab)
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
