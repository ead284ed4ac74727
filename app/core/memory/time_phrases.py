"""The period of time a recall query names ("in May 2023", "last Friday", "two weeks ago").

``window_named_by(query, reference_time)`` finds the time phrases of a query and returns the
period they name as a half-open UTC window ``[start, end)``, or ``None`` when the query names no
time. Recall gives memories whose ``occurred_at`` lies in that window a boost (``ranking.py``);
it never filters by it (``start``/``end`` are the filter).

Two steps, so that ordinary words are never taken for dates:

1. **Finding** the phrases is this module's own, conservative pattern: a month name with a day
   or a year ("8 May, 2023", "May 2023", "May 8"; a lower-case "may" alone is the verb), a year
   after "in", "during", "of", "since" or "from" ("in 2022"), an ISO date, a weekday, and the
   relative forms ("yesterday", "today", "last week", "this month", "three days ago", "last
   Friday"). dateparser's own search was tried and rejected: it reads "we" as a weekday and
   "may" as the month.
2. **Reading** each phrase is dateparser's (``DateDataParser``, English, relative to
   ``reference_time``, past dates preferred): it gives the date and its period (day, week,
   month, year), which sets the window: the calendar day, week (Monday to Sunday), month or year
   that holds the date. "N weeks (months, years) ago" is fuzzy in speech, so its window is the
   unit's length centred on the date. "the week before / after <date>" is the 7 days before
   or after that day.

Several phrases give the window spanning them all (a question that names two dates is about
the time between them). Everything here is pure and cheap: a query without any time word costs
one regular-expression search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|"
           "december|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_NUMBER = (r"(?:\d{1,3}|a|an|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
           r"a few|a couple of)")
_UNIT = r"(?:day|week|month|year)s?"
_ORDINAL = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"(?:1[6-9]|2\d)\d{2}"
_MONTH = rf"(?:{_MONTHS})\.?"

#: The phrases that name a time. Order matters: longer forms first, so "8 May, 2023" is one
#: phrase, not "8 May" and "2023".
_PHRASE = re.compile(
    # Whole words only: "on Tuesdays" is a habit, not a day.
    r"(?<!\w)(?:" + "|".join([
        rf"(?P<relative_to>the (?:day|week|month|weekend) (?:before|after) "
        rf"(?:{_ORDINAL} (?:of )?{_MONTH},? {_YEAR}|{_MONTH} {_ORDINAL},? {_YEAR}))",
        rf"{_ORDINAL} (?:of )?{_MONTH},? {_YEAR}",
        rf"{_MONTH} {_ORDINAL},? {_YEAR}",
        r"\d{4}-\d{2}-\d{2}",
        rf"{_MONTH},? {_YEAR}",
        rf"{_ORDINAL} (?:of )?{_MONTH}",
        rf"{_MONTH} {_ORDINAL}\b",
        rf"(?:in|during|of|since|from) {_YEAR}(?![-/]\d)",
        rf"(?P<ago>{_NUMBER} {_UNIT} ago)",
        rf"(?:last|this|next) (?:week|month|year|weekend|{_DAYS})",
        r"yesterday|today|tonight|this morning|this afternoon|this evening|last night",
        rf"(?:on )?(?:{_DAYS})",
    ]) + r")(?!\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TimeWindow:
    """A half-open UTC window ``[start, end)`` and the phrases that named it."""

    start: datetime
    end: datetime
    phrases: tuple[str, ...] = ()

    def holds(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def window_named_by(query: str, reference_time: datetime) -> TimeWindow | None:
    """The window of time ``query`` names, read relative to ``reference_time`` (aware), or
    ``None`` if it names none."""
    windows = []
    for match in _PHRASE.finditer(query):
        phrase = match.group(0)
        if _is_verb_may(phrase, query, match.start()):
            continue
        window = _window_of(phrase, match, reference_time)
        if window is not None:
            windows.append(window)
    if not windows:
        return None
    return TimeWindow(min(w.start for w in windows), max(w.end for w in windows),
                      tuple(p for w in windows for p in w.phrases))


def _is_verb_may(phrase: str, query: str, at: int) -> bool:
    # "may" in lower case followed by a number is still the month ("may 8"); alone it is the
    # verb, and a phrase that is only a month name is never matched anyway.
    return phrase[:3] == "may" and query[at:at + 3] == "may" and not any(
        ch.isdigit() for ch in phrase)


def _window_of(phrase: str, match: re.Match[str], reference: datetime) -> TimeWindow | None:
    relative_to = match.group("relative_to")
    if relative_to:
        return _week_around(relative_to, reference)
    parsed = _parse(_spoken(phrase), reference)
    if parsed is None:
        return None
    moment, period = parsed
    if match.group("ago") and period != "day":
        length = {"week": timedelta(days=7),
                  "month": timedelta(days=30), "year": timedelta(days=365)}[period]
        return TimeWindow(moment - length / 2, moment + length / 2, (phrase,))
    start, end = _calendar_period(moment, period)
    return TimeWindow(start, end, (phrase,))


def _week_around(phrase: str, reference: datetime) -> TimeWindow | None:
    """``the <unit> before|after <date>``: that many days before or after the named day."""
    unit, direction, date_text = phrase.split(" ", 3)[1:]
    parsed = _parse(date_text, reference)
    if parsed is None:
        return None
    day = _calendar_period(parsed[0], "day")[0]
    length = {"day": timedelta(days=1), "week": timedelta(days=7),
              "weekend": timedelta(days=7), "month": timedelta(days=30)}[unit.lower()]
    if direction.lower() == "before":
        return TimeWindow(day - length, day, (phrase,))
    return TimeWindow(day + timedelta(days=1), day + timedelta(days=1) + length, (phrase,))


def _spoken(phrase: str) -> str:
    """A phrase as dateparser reads it best: without a leading preposition."""
    return re.sub(r"^(?:in|during|of|since|from|on)\s+", "", phrase, flags=re.IGNORECASE)


def _parse(text: str, reference: datetime) -> tuple[datetime, str] | None:
    """dateparser's reading of ``text``: an aware UTC datetime and its period."""
    naive_reference = reference.astimezone(UTC).replace(tzinfo=None)
    data = _parser(naive_reference).get_date_data(text)
    if data.date_obj is None:
        return None
    moment = data.date_obj
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    period = data.period if data.period in ("day", "week", "month", "year") else "day"
    return moment.astimezone(UTC), period


def _parser(reference: datetime) -> Any:
    # Imported here: dateparser costs ~0.1 s to import, and most queries name no time. A parser
    # is cheap to make (~0.05 ms) and holds its reference time, so each reading makes its own.
    from dateparser.date import DateDataParser

    return DateDataParser(languages=["en"], settings={
        "RELATIVE_BASE": reference, "PREFER_DATES_FROM": "past",
        "RETURN_AS_TIMEZONE_AWARE": False, "PREFER_DAY_OF_MONTH": "first",
    })


def _calendar_period(moment: datetime, period: str) -> tuple[datetime, datetime]:
    """The calendar day, week (Monday first), month or year holding ``moment``, in UTC."""
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "year":
        start = day.replace(month=1, day=1)
        return start, start.replace(year=start.year + 1)
    if period == "month":
        start = day.replace(day=1)
        following = (start.replace(year=start.year + 1, month=1) if start.month == 12
                     else start.replace(month=start.month + 1))
        return start, following
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    return day, day + timedelta(days=1)
