"""Unit tests of the pure parts: input rules, chunking, fusion, settings, the query cache and the
embedder (with the real model)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from app.core.memory import InvalidInputError
from app.core.memory.chunking import MAX_WORDS, OVERLAP_WORDS, chunk_text
from app.core.memory.drivers.sqlite_search import fts_match_expression
from app.core.memory.embeddings import QueryVectorCache, SentenceTransformerEmbedder
from app.core.memory.ranking import (
    Candidate,
    FusionWeights,
    KeywordStats,
    fuse,
    keyword_coverage,
    order,
    query_terms,
    spread_to_neighbours,
    with_time,
)
from app.core.memory.validation import (
    check_expiry,
    check_id,
    check_metadata,
    check_tags,
    prepare_store_many,
)
from config.settings import Settings, SettingsError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", ["u1", "user_1a2b3c4d", "a.b:c@d-e_f", "x" * 128])
def test_valid_ids_pass(value: str) -> None:
    assert check_id(value, "user_id") == value


@pytest.mark.parametrize("value", ["", "a b", "x" * 129, "é", "a/b", None, 5, "a\x00"])
def test_invalid_ids_name_the_argument_and_the_rule(value: object) -> None:
    with pytest.raises(InvalidInputError, match=r"^user_id must be a string of 1-128 characters"):
        check_id(value, "user_id")


def test_tags_are_deduplicated_in_order() -> None:
    assert check_tags(["b", "a", "b"]) == ["b", "a"]
    assert check_tags(None) == []
    assert check_tags(("x",)) == ["x"]


def test_metadata_round_trips_through_json() -> None:
    assert check_metadata({"n": 1, "nested": {"list": [1, "two"]}}) == {
        "n": 1, "nested": {"list": [1, "two"]}}
    with pytest.raises(InvalidInputError, match="metadata"):
        check_metadata({1: "int key"})
    with pytest.raises(InvalidInputError, match="NUL"):
        check_metadata({"v": "a\x00b"})


def test_expiry_from_ttl_or_expires_at() -> None:
    assert check_expiry(60, None, NOW) == NOW + timedelta(seconds=60)
    assert check_expiry(timedelta(hours=1), None, NOW) == NOW + timedelta(hours=1)
    other_zone = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert check_expiry(None, other_zone, NOW) == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert check_expiry(None, None, NOW) is None


def test_store_many_checks_every_item_before_returning() -> None:
    drafts = prepare_store_many([{"user_id": "a", "content": "x"}], now=NOW)
    assert drafts[0].namespace == "default" and drafts[0].importance == 0.5
    with pytest.raises(InvalidInputError, match=r"items\[2\]: user_id"):
        prepare_store_many([{"user_id": "a", "content": "x"}] * 2
                           + [{"user_id": "", "content": "x"}], now=NOW)


def test_chunks_fit_the_window_cover_the_text_and_overlap() -> None:
    sentences = [f"Sentence {i} has exactly seven words here." for i in range(100)]
    text = " ".join(sentences)
    chunks = chunk_text(text)
    assert len(chunks) > 1
    assert all(len(chunk.split()) <= MAX_WORDS for chunk in chunks)
    for sentence in sentences:
        assert any(sentence in chunk for chunk in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.split()[-OVERLAP_WORDS:][-1] in after.split()[:OVERLAP_WORDS * 2]


def test_a_sentence_longer_than_a_chunk_is_cut_by_words() -> None:
    words = [f"w{i}" for i in range(400)]
    chunks = chunk_text(" ".join(words))
    assert all(len(chunk.split()) <= MAX_WORDS for chunk in chunks)
    covered = {word for chunk in chunks for word in chunk.split()}
    assert covered == set(words)
    assert chunk_text("short") == ["short"]


def test_fts_expression_quotes_every_term_and_drops_stop_words() -> None:
    assert query_terms("What is the INVOICE number?") == ["invoice", "number"]
    assert query_terms("the") == ["the"]
    assert query_terms('" * ( ) -') == []
    assert fts_match_expression(["near", "or"]) == '"near" OR "or"'


def test_fusion_is_a_weighted_mean_in_0_to_1() -> None:
    weights = FusionWeights(vector=0.5, keyword=0.5, importance=0.0)
    scores = fuse({"a": 0.8, "b": -0.3}, {"b": 1.0, "c": 0.4}, {}, weights)
    assert scores == pytest.approx({"a": 0.4, "b": 0.5, "c": 0.2})
    with pytest.raises(ValueError):
        FusionWeights(vector=0, keyword=0, importance=0)


def test_equal_scores_come_in_a_total_order() -> None:
    candidates = {pk: Candidate(pk, 0.5, recency, memory_id=f"id{pk}", occurred_at=occurred)
                  for pk, recency, occurred in ((1, 1.0, 5.0), (2, 2.0, 5.0), (3, 2.0, 5.0),
                                                (4, 9.0, 1.0), (5, 0.0, 0.0))}
    scores = {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.9}
    # Best score; then what occurred last; then the newest stored; then the larger id.
    assert [pk for pk, _ in order(scores, candidates, 5)] == [5, 3, 2, 1, 4]


def test_the_time_term_lifts_only_what_occurred_in_the_window() -> None:
    assert with_time(0.5, True, 1.05, 0.1) == pytest.approx((0.5 * 1.05 + 0.1) / 1.15)
    assert with_time(0.5, False, 1.05, 0.1) == pytest.approx(0.5 * 1.05 / 1.15)
    assert with_time(1.0, True, 1.05, 0.1) == pytest.approx(1.0)  # stays within 0..1


def test_neighbours_get_a_share_of_their_hit_and_nothing_chains() -> None:
    spread = spread_to_neighbours({1: 0.9, 2: 0.1, 3: 0.5}, {1: [2, 4], 4: [5]}, 0.8)
    assert spread == pytest.approx({1: 0.9, 2: 0.72, 3: 0.5, 4: 0.72})  # 4 was no hit: 5 gets 0


def test_common_terms_neither_search_nor_weigh_unless_all_are_common() -> None:
    stats = KeywordStats(100, {"zebra": 3, "work": 40, "nowhere": 0})
    assert stats.kept() == ["zebra", "nowhere"] and stats.searched() == ["zebra"]
    assert keyword_coverage(frozenset({"zebra", "work"}), stats.weights()) == pytest.approx(
        stats.weights()["zebra"] / (stats.weights()["zebra"] + stats.weights()["nowhere"]))
    common = KeywordStats(100, {"work": 40, "home": 20})
    assert common.kept() == ["work", "home"] and common.searched() == ["work", "home"]


def test_settings_from_environment_and_aliases() -> None:
    settings = Settings.from_env({"MEMORY_DRIVER": "SQLite", "AUTOMEM_ENDPOINT": "http://x:1",
                                  "AUTOMEM_API_KEY": "secret", "APP_ENV": "production"})
    assert settings.memory_driver == "sqlite"
    assert settings.automem_url == "http://x:1"
    assert settings.is_production
    assert "secret" not in repr(settings)
    with pytest.raises(SettingsError, match="MEMORY_QUERY_CACHE_SIZE"):
        Settings.from_env({"MEMORY_QUERY_CACHE_SIZE": "lots"})


def test_query_cache_is_bounded_lru() -> None:
    cache = QueryVectorCache(2)
    for text in ("a", "b"):
        cache.put(text, np.zeros(3, dtype=np.float32))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", np.zeros(3, dtype=np.float32))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2


def test_real_embedder_gives_normalised_384_dim_vectors(
    embedder: SentenceTransformerEmbedder,
) -> None:
    vectors = embedder.embed_documents(["Prefers dark mode", "Likes a dark theme", "Owns a boat"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    query = embedder.embed_query("dark mode")
    assert embedder.embed_query("dark mode") is query  # served from the query cache
    assert not query.flags.writeable


def test_every_variable_of_env_example_is_a_setting() -> None:
    from tests.conftest import PROJECT_ROOT

    lines = (PROJECT_ROOT / ".env.example").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]
    assert "MEMORY_DRIVER" in names and "DATABASE_URL" in names
    defaults = Settings.from_env({})
    for name in names:
        try:
            changed = Settings.from_env({name: "7"})
        except SettingsError:
            continue  # a variable of fixed choices refused "7": it is read
        assert changed != defaults, f"{name} in .env.example is not read by Settings"


def test_readme_lists_every_input_limit() -> None:
    # The README's table of input limits must follow validation.py when a limit changes.
    from app.core.memory import reembed, validation
    from tests.conftest import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Input limits", 1)[1].split("\n### ", 1)[0]
    limits = {
        "MAX_CONTENT_CHARS": "1-{:,} characters", "MAX_QUERY_CHARS": "at most {:,} characters",
        "MAX_KNOWLEDGE_CHARS": "1-{:,} characters", "MAX_TITLE_CHARS": "at most {:,} characters",
        "MAX_TAGS": "at most {} tags", "MAX_TAG_CHARS": "each 1-{} characters",
        "MAX_METADATA_BYTES": "at most {:,} bytes", "MAX_PROFILE_BYTES": "at most {:,} bytes",
        "MAX_JSON_DEPTH": "nested at most {} dicts", "MAX_TOP_K": "from 1 to {:,}",
        "MAX_PAGE_SIZE": "from 1 to {:,}", "MAX_BATCH": "at most {:,} dicts",
    }
    for name, phrase in limits.items():
        assert phrase.format(getattr(validation, name)) in section, name
    assert f"`{validation.ID_PATTERN.pattern}`" in section
    assert f"from 1 to {reembed.MAX_BATCH_SIZE:,}" in section
    assert f"{validation.MAX_TTL_SECONDS:,} s" in section
    assert f"from 0 to {validation.MAX_CONTEXT}" in section
