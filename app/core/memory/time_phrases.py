"""The period of time a recall query names ("in May 2023", "last Friday", "two weeks ago").

``window_named_by(query, reference_time)`` finds the time phrases of a query and returns the
period they name as a half-open UTC window ``[start, end)``, or ``None`` when the query names no
time. Recall gives memories whose ``occurred_at`` lies in that window a boost (``ranking.py``);
it never filters by it (``start``/``end`` are the filter).

Two steps, so that ordinary words are never taken for dates:

1. **Finding** the phrases is this module's own, conservative pattern (``_PHRASE``), each kind
   a named group: a month name with a day or a year ("8 May, 2023", "May 2023", "May 8"; a
   lower-case "may" alone is the verb), a year after "in", "during", "of", "since" or "from"
   ("in 2022"), an ISO date, a weekday, and the relative forms ("yesterday", "today", "last
   week", "this month", "three days ago", "last Friday"). Whole words only: "on Tuesdays" is a
   habit, not a day.
2. **Reading** a phrase: dates written out ("8 May, 2023", "May 8th", "2023-05-08") are read by
   python-dateutil's parser; relative ones are counted from ``reference_time`` with
   ``dateutil.relativedelta`` (calendar months and years). The kind of phrase sets the window:
   the day, the calendar week (Monday to Sunday), month or year. "N weeks (months, years) ago"
   is fuzzy in speech, so its window is the unit's length centred on the date; "N days ago" is
   that day. "the week before / after <date>" is the 7 days before or after that day. A day
   and month without a year is the latest one not after ``reference_time``; a bare weekday is
   the latest one before today, as is "last <weekday>".

dateparser was used first and dropped: its own search reads "we" as a weekday and "may" as the
month, and its first use in a process cost ~0.3-0.5 s of Python holding the GIL (loading its
language data), which an asyncio service felt as a 30-50 ms stall of its event loop
(``bench.aio``). dateutil's import costs ~30 ms and a reading microseconds.

Several phrases give the window spanning them all (a question that names two dates is about
the time between them). A query without any time word costs one regular-expression search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dateutil.relativedelta import relativedelta

_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|"
           "december|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_NUMBER = (r"(?:\d{1,3}|a|an|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
           r"a few|a couple of)")
_UNIT = r"(?:day|week|month|year)s?"
_ORDINAL = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"(?:1[6-9]|2\d)\d{2}"
_MONTH = rf"(?:{_MONTHS})\.?"

#: The phrases that name a time, each kind a named group. Order matters: longer forms first, so
#: "8 May, 2023" is one phrase, not "8 May" and "2023".
_PHRASE = re.compile(
    r"(?<!\w)(?:" + "|".join([
        rf"(?P<around>the (?P<around_unit>day|week|month|weekend) (?P<around_side>before|after) "
        rf"(?P<around_date>{_ORDINAL} (?:of )?{_MONTH},? {_YEAR}|{_MONTH} {_ORDINAL},? {_YEAR}))",
        rf"(?P<full_date>{_ORDINAL} (?:of )?{_MONTH},? {_YEAR}|{_MONTH} {_ORDINAL},? {_YEAR}"
        r"|\d{4}-\d{2}-\d{2})",
        rf"(?P<month_year>{_MONTH},? {_YEAR})",
        rf"(?P<day_month>{_ORDINAL} (?:of )?{_MONTH}|{_MONTH} {_ORDINAL}\b)",
        rf"(?:in|during|of|since|from) (?P<year>{_YEAR})(?![-/]\d)",
        rf"(?P<ago_count>{_NUMBER}) (?P<ago_unit>day|week|month|year)s? ago",
        rf"(?P<shift>last|this|next) (?P<shift_unit>week|month|year|weekend|{_DAYS})",
        r"(?P<day_word>yesterday|today|tonight|this morning|this afternoon|this evening"
        r"|last night)",
        rf"(?:on )?(?P<weekday>{_DAYS})",
    ]) + r")(?!\w)",
    re.IGNORECASE,
)
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
           "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
           "a few": 3, "a couple of": 2}
_WEEKDAYS = _DAYS.split("|")
_DAY_WORDS = {"yesterday": -1, "last night": -1, "today": 0, "tonight": 0, "this morning": 0,
              "this afternoon": 0, "this evening": 0}


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
    """The window one phrase names (``None`` if its date does not exist, e.g. 31 June)."""
    found = {name: value for name, value in match.groupdict().items() if value}
    today = _day_of(reference.astimezone(UTC))
    try:
        start, end = _period(found, today, reference.astimezone(UTC))
    except (ValueError, OverflowError):
        return None
    return TimeWindow(start, end, (phrase,))


def _period(found: dict[str, str], today: datetime,
            now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of the phrase whose named groups are ``found``."""
    day = timedelta(days=1)
    if "around" in found:
        anchor = _written(found["around_date"], today)
        length = {"day": day, "week": 7 * day, "weekend": 7 * day,
                  "month": 30 * day}[found["around_unit"].lower()]
        if found["around_side"].lower() == "before":
            return anchor - length, anchor
        return anchor + day, anchor + day + length
    if "full_date" in found:
        moment = _written(found["full_date"], today)
        return moment, moment + day
    if "month_year" in found:
        return _calendar(_written(found["month_year"], today.replace(day=1)), "month")
    if "day_month" in found:
        moment = _written(found["day_month"], today)
        if moment > today:  # no year written: the latest such day, not one to come
            moment -= relativedelta(years=1)
        return moment, moment + day
    if "year" in found:
        return _calendar(today.replace(year=int(found["year"]), month=1, day=1), "year")
    if "ago_count" in found:
        unit = found["ago_unit"].lower()
        count = _COUNTS.get(found["ago_count"].lower()) or int(found["ago_count"])
        moment = now - relativedelta(**{unit + "s": count})
        if unit == "day":
            return _calendar(moment, "day")
        length = {"week": 7 * day, "month": 30 * day, "year": 365 * day}[unit]
        return moment - length / 2, moment + length / 2
    if "shift" in found:
        return _shifted(found["shift"].lower(), found["shift_unit"].lower(), today)
    if "day_word" in found:
        moment = today + _DAY_WORDS[found["day_word"].lower()] * day
        return moment, moment + day
    # A bare weekday ("on Sunday"): the latest one before today.
    return _shifted("last", found["weekday"].lower(), today)


def _shifted(shift: str, unit: str, today: datetime) -> tuple[datetime, datetime]:
    """"last", "this" or "next" week, month, year, weekend or weekday, from ``today``."""
    step = {"last": -1, "this": 0, "next": 1}[shift]
    if unit in ("week", "month", "year"):
        start, _ = _calendar(today, unit)
        start += relativedelta(**{unit + "s": step})
        return start, start + relativedelta(**{unit + "s": 1})
    if unit == "weekend":
        saturday = today + timedelta(days=5 - today.weekday())
        if step < 0 or (step == 0 and today.weekday() == 6):
            saturday -= timedelta(days=7)
        elif step > 0:
            saturday += timedelta(days=7) if today.weekday() >= 5 else timedelta(0)
        return saturday, saturday + timedelta(days=2)
    wanted = _WEEKDAYS.index(unit)
    if step < 0:  # the latest one before today
        moment = today - timedelta(days=(today.weekday() - wanted - 1) % 7 + 1)
    elif step > 0:  # the first one after today
        moment = today + timedelta(days=(wanted - today.weekday() - 1) % 7 + 1)
    else:  # the one of this week
        moment = today + timedelta(days=wanted - today.weekday())
    return moment, moment + timedelta(days=1)


def _written(text: str, default: datetime) -> datetime:
    """A date written out ("8 May, 2023", "May 8th", "2023-05-08"), read by dateutil; the
    parts it leaves out come from ``default``. Raises ``ValueError`` if it is no date."""
    from dateutil import parser

    moment = parser.parse(text.replace(" of ", " "), default=default.replace(tzinfo=None))
    return _day_of(moment.replace(tzinfo=UTC))


def _day_of(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _calendar(moment: datetime, period: str) -> tuple[datetime, datetime]:
    """The calendar day, week (Monday first), month or year holding ``moment``."""
    day = _day_of(moment)
    if period == "year":
        start = day.replace(month=1, day=1)
        return start, start.replace(year=start.year + 1)
    if period == "month":
        start = day.replace(day=1)
        return start, start + relativedelta(months=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    return day, day + timedelta(days=1)
