"""``memory_terms`` (PostgreSQL; kept by triggers) against the lexemes of the memories themselves,
through every verb that adds, changes, hides or removes a memory; the recall pass that reads it
against the GIN pass it replaces for a whole user; and the migration's backfill."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

from app.core.memory import ranking
from app.core.memory.drivers import pgvector_driver as pg
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.validation import prepare_filters
from tests.conftest import migrate_postgres, roll_back_postgres_to_before
from tests.word_hash_embedder import WordHashEmbedder

MIGRATION = "2026_12_06_000001_add_memory_terms"
#: What memory_terms must hold: every lexeme of every memory not soft-deleted.
EXPECTED = ("SELECT m.user_id, l.lexeme, m.pk, m.expires_at FROM memories m "
            "CROSS JOIN LATERAL unnest(tsvector_to_array(m.content_tsv)) AS l (lexeme) "
            "WHERE m.deleted_at IS NULL")


@pytest.fixture
def driver(empty_pg: str) -> Iterator[PgvectorDriver]:
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_max_size=2)
    yield driver
    driver.close()


def terms_of(url: str) -> tuple[set[tuple[object, ...]], set[tuple[object, ...]]]:
    """(memory_terms' rows, the rows it should hold)."""
    with psycopg.connect(url) as conn:
        kept = set(conn.execute(
            "SELECT user_id, lexeme, pk, expires_at FROM memory_terms").fetchall())
        expected = set(conn.execute(EXPECTED).fetchall())
    return kept, expected


def assert_terms_agree(url: str) -> None:
    kept, expected = terms_of(url)
    assert kept == expected, (f"missing: {sorted(expected - kept)[:5]}, "
                              f"extra: {sorted(kept - expected)[:5]}")


def test_terms_follow_every_verb(driver: PgvectorDriver, empty_pg: str) -> None:
    kept = driver.store("alice", "Likes green tea", key="drink")
    driver.store_many([{"user_id": user, "content": f"note {i} of {user} about e-mail"}
                       for i in range(5) for user in ("alice", "bob")])
    short = driver.store("alice", "On call this week", ttl=timedelta(hours=1))
    assert_terms_agree(empty_pg)
    assert len(terms_of(empty_pg)[0]) > 20

    driver.store("alice", "Likes oolong tea now", key="drink")  # the upsert's new content
    assert_terms_agree(empty_pg)
    driver.update(short["id"], "alice", content="On call next week", ttl=timedelta(days=2))
    assert_terms_agree(empty_pg)
    driver.update(short["id"], "alice", clear_expiry=True)
    assert_terms_agree(empty_pg)
    assert driver.delete(kept["id"], "alice")
    assert_terms_agree(empty_pg)
    driver.store("alice", "Likes black tea", key="drink")  # the upsert brings it back
    assert_terms_agree(empty_pg)
    assert driver.delete(kept["id"], "alice") and driver.restore(kept["id"], "alice")
    assert_terms_agree(empty_pg)
    before = terms_of(empty_pg)[0]
    driver.recall("alice", query="tea e-mail", top_k=3)  # access counts change no lexeme
    driver.close()  # writes the counts now
    assert terms_of(empty_pg)[0] == before
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_max_size=2)
    try:
        assert driver.delete(short["id"], "alice")
        assert driver.purge(retention=timedelta(0)) == 1
        assert_terms_agree(empty_pg)

        records = list(driver.export_records(user_id="bob", with_embeddings=True))
        assert driver.forget_user("bob") > 0
        assert not {row for row in terms_of(empty_pg)[0] if row[0] == "bob"}
        driver.import_records(records)
        assert_terms_agree(empty_pg)
        assert {row for row in terms_of(empty_pg)[0] if row[0] == "bob"}
    finally:
        driver.close()


QUERIES = ["user_name tea", "the", "tea", "green tea user_name", "call week", "nothing matches",
           "note 3 of alice", "user"]


def test_the_whole_user_pass_finds_what_the_gin_pass_finds(driver: PgvectorDriver,
                                                          empty_pg: str) -> None:
    """Same pairs, counts and candidates through memory_terms as through the GIN index: a
    query word of several lexemes ("user_name": rows holding only "user" or only "name" do
    not hold it, rows holding both apart do; as in a tsquery, the lexemes are ANDed), a stop
    word, expired, deleted and other users' rows."""
    driver.store_many([{"user_id": "alice", "content": f"note {i}: tea and user_name {i % 3}"}
                       for i in range(12)])
    driver.store_many([{"user_id": "alice", "content": f"a user without a name {i}"}
                       for i in range(2)] + [{"user_id": "alice", "content": f"the {word} {i}"}
                                             for i in range(3) for word in ("user", "name")])
    driver.store_many([{"user_id": "bob", "content": "tea user_name green"} for _ in range(5)])
    gone = driver.store("alice", "green tea user_name")
    driver.delete(gone["id"], "alice")
    driver.store("alice", "green tea on call", ttl=timedelta(seconds=1))
    with psycopg.connect(empty_pg) as conn:
        conn.execute("UPDATE memories SET expires_at = now() - interval '1 minute' "
                     "WHERE content = 'green tea on call'")
    vector = WordHashEmbedder().embed_query("tea")
    scope, params = pg._memory_scope(prepare_filters("alice"), pg._utcnow())
    with psycopg.connect(empty_pg) as conn:
        for query in QUERIES:
            found = []
            for whole_user in (True, False):
                sql, values = pg._candidate_query(pg._MEMORIES, scope, params,
                                                  ranking.query_terms(query), vector, 10, 5000,
                                                  whole_user)
                found.append(sorted(conn.execute(sql, values).fetchall()))
            assert found[0] == found[1], query
            assert found[0], query


def test_the_migration_indexes_the_memories_already_there(blank_database: str) -> None:
    roll_back_postgres_to_before(blank_database, MIGRATION)
    with psycopg.connect(blank_database) as conn:
        conn.cursor().executemany(
            "INSERT INTO memories (id, user_id, content, created_at, updated_at, occurred_at, "
            "expires_at, embedding, deleted_at) VALUES (%s, %s, %s, now(), now(), now(), "
            "CASE WHEN %s THEN now() + interval '1 day' END, "
            "array_fill(0.1, ARRAY[384])::vector, CASE WHEN %s THEN now() END)",
            [(f"m{i}", ("alice", "bob")[i % 2], f"walked the dogs {i} times", i % 4 == 1,
              i % 3 == 0) for i in range(12)])
    migrate_postgres(blank_database)
    kept, expected = terms_of(blank_database)
    assert kept == expected and len({row[2] for row in kept}) == 8  # 12 rows, 4 soft-deleted
