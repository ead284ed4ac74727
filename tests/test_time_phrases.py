"""The window of time a query names (``time_phrases.window_named_by``), against a fixed
reference time: Wednesday 9 August 2023, 15:00 UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.core.memory.time_phrases import window_named_by

REFERENCE = datetime(2023, 8, 9, 15, 0, tzinfo=UTC)


def _day(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(("query", "start", "end"), [
    ("What did Melanie do on 8 May, 2023?", _day(2023, 5, 8), _day(2023, 5, 9)),
    ("what happened on May 8th, 2023", _day(2023, 5, 8), _day(2023, 5, 9)),
    ("notes from 2023-05-08", _day(2023, 5, 8), _day(2023, 5, 9)),
    ("What did we do in May 2023?", _day(2023, 5, 1), _day(2023, 6, 1)),
    ("plans for March", None, None),  # a month name alone names no time: too ambiguous
    ("Which book did I read in 2022?", _day(2022, 1, 1), _day(2023, 1, 1)),
    ("what about may 8", _day(2023, 5, 8), _day(2023, 5, 9)),
    ("What happened the week before 9 June 2023?", _day(2023, 6, 2), _day(2023, 6, 9)),
    ("and the day after 9 June 2023?", _day(2023, 6, 10), _day(2023, 6, 11)),
    ("what did we discuss yesterday", _day(2023, 8, 8), _day(2023, 8, 9)),
    ("anything today?", _day(2023, 8, 9), _day(2023, 8, 10)),
    ("who did I meet last Friday?", _day(2023, 8, 4), _day(2023, 8, 5)),
    ("Did I mention Sunday plans?", _day(2023, 8, 6), _day(2023, 8, 7)),
    ("what did I do last week", _day(2023, 7, 31), _day(2023, 8, 7)),
    ("this month's budget", _day(2023, 8, 1), _day(2023, 9, 1)),
    ("last year's trip", _day(2022, 1, 1), _day(2023, 1, 1)),
    ("3 days ago", _day(2023, 8, 6), _day(2023, 8, 7)),
    # "N units ago" is fuzzy in speech: the unit's length, centred on the date.
    ("two weeks ago we went hiking", _day(2023, 7, 23, 3), _day(2023, 7, 30, 3)),
    # Two times: the span from the first to the last.
    ("between 1 May, 2023 and 3 May, 2023", _day(2023, 5, 1), _day(2023, 5, 4)),
])
def test_the_window_each_phrase_names(query: str, start: datetime | None,
                                      end: datetime | None) -> None:
    window = window_named_by(query, REFERENCE)
    if start is None:
        assert window is None
    else:
        assert window is not None, query
        assert (window.start, window.end) == (start, end), window.phrases


@pytest.mark.parametrize("query", [
    "When did Caroline go to the LGBTQ support group?",
    "I have 2 cats, may I adopt a third?",
    "What is 10 plus 5?",
    "we should talk",
    "Prefers dark mode",
    "version 2.0 of the report",
    "piano lessons on Tuesdays",
    "the mayday parade",
])
def test_queries_without_a_time_name_none(query: str) -> None:
    assert window_named_by(query, REFERENCE) is None


def test_relative_phrases_follow_the_reference_time() -> None:
    window = window_named_by("yesterday", datetime(2024, 1, 1, 0, 30, tzinfo=UTC))
    assert window is not None
    assert (window.start, window.end) == (_day(2023, 12, 31), _day(2024, 1, 1))
    assert window.holds(_day(2023, 12, 31, 23)) and not window.holds(_day(2024, 1, 1))
