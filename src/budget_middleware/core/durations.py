"""Durations and reset windows (SPEC §6 "Durations").

A window is computed from the clock on every touch, never stored: a limit left untouched for
years costs about what one touched a second ago (a reset loop that walks window by window spins
at 100% CPU, Bifrost #4851). The one walk is bounded: a month series from the 29th-31st steps
until its day clamps or its next start is past now (at most the months since its anchor, ~1 µs a
step; the anchor, the store's `last_reset`, moves with every window written).

All datetimes are UTC. Naive inputs are taken as UTC, aware ones are converted; every output is
aware UTC. Days are always 86 400 s: in UTC there is no DST to shorten or stretch one.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cachetools import LRUCache

from budget_middleware.core.times import utc

__all__ = [
    "Duration",
    "add_months",
    "utcnow",
    "window_bounds",
    "window_end",
    "window_start",
]

# Exact lengths of the fixed units; months, quarters and years are calendar arithmetic instead.
_FIXED_SECONDS: Final = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_UNIT_MONTHS: Final = {"M": 1, "Q": 3, "Y": 12}
# Nominal month: 1/12 of a mean Gregorian year (365.2425 d). Display only, never for windows.
_NOMINAL_MONTH_SECONDS: Final = 2_629_746
# Upper bound on a duration (nominal 100 years) so window arithmetic can never overflow datetime
# (year 9999) deep in the request path; anything longer is a typo or "never resets" (use null).
_MAX_SECONDS: Final = 100 * 12 * _NOMINAL_MONTH_SECONDS

_PATTERN: Final = re.compile(r"0*([1-9][0-9]*)(mo|[smhdwMQY])")  # n >= 1: `01d` is `1d`
_FORMS: Final = "expected <n>s|m|h|d|w|M|Q|Y with n >= 1 ('mo' is accepted for months)"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MONDAY: Final = datetime(1970, 1, 5, tzinfo=UTC)  # weeks are counted Monday to Monday


@dataclass(frozen=True, slots=True)
class Duration:
    """`count` units of `unit`: s, m (minutes), h, d, w, M (months), Q (quarters), Y (years)."""

    count: int
    unit: str

    def __post_init__(self) -> None:
        # bool is an int; True would otherwise pass as a count of 1.
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"invalid duration count {self.count!r}: must be an integer >= 1")
        if self.unit not in _FIXED_SECONDS and self.unit not in _UNIT_MONTHS:
            raise ValueError(f"invalid duration unit {self.unit!r}: expected s m h d w M Q Y")
        if self.approx_seconds > _MAX_SECONDS:
            raise ValueError(f"invalid duration '{self}': longer than 100 years")

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse `<n><unit>`; surrounding whitespace is ignored, case is significant (m vs M)."""
        match = _PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"invalid duration {text!r}: {_FORMS}")
        unit = "M" if match[2] == "mo" else match[2]
        try:
            return cls(int(match[1]), unit)
        except ValueError:
            raise ValueError(f"invalid duration {text!r}: {_FORMS}, at most 100 years") from None

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def approx_seconds(self) -> int:
        """Length in seconds; exact for s..w, *nominal* for M/Q/Y (a month = 2 629 746 s).

        Only for display (e.g. a `period_seconds` field): real month windows follow the calendar.
        """
        if self.unit in _FIXED_SECONDS:
            return self.count * _FIXED_SECONDS[self.unit]
        return self.count * _UNIT_MONTHS[self.unit] * _NOMINAL_MONTH_SECONDS

    @property
    def is_calendar(self) -> bool:
        """True for units of a day or more: the only ones `calendar_aligned` affects."""
        return self.unit in ("d", "w", "M", "Q", "Y")

    @property
    def _months(self) -> int:
        return self.count * _UNIT_MONTHS[self.unit]


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _month_index(dt: datetime) -> int:
    return dt.year * 12 + dt.month - 1


def add_months(dt: datetime, months: int) -> datetime:
    """`dt` moved by `months` calendar months (may be negative), keeping the time of day.

    The day is clamped to the target month's length (Jan 31 + 1 -> Feb 28/29). The tzinfo of `dt`
    is kept as is.
    """
    year, month0 = divmod(_month_index(dt) + months, 12)
    day = min(dt.day, _days_in_month(year, month0 + 1))
    return dt.replace(year=year, month=month0 + 1, day=day)


def _rolling_start(duration: Duration, anchor: datetime, now: datetime) -> datetime:
    if now <= anchor:
        # Clock behind last_reset (skew between processes, or a reset just now): start there.
        return anchor
    if duration.unit in _FIXED_SECONDS:
        length = timedelta(seconds=duration.approx_seconds)
        return anchor + (now - anchor) // length * length  # timedelta // timedelta: exact integer
    step = duration._months
    # Each window starts a step after the one before, its day clamped to the month's length: a
    # window from Jan 31 is followed by Feb 29, then Mar 29. So any start of the series, the
    # store's `last_reset` as much as the budget's first anchor, gives the same windows after it.
    # A day past the 28th may clamp: stepped through (a few steps until it does, or until now).
    start = anchor
    while start.day > 28:
        following = add_months(start, step)
        if following > now:
            return start
        start = following
    # From a day the months all have, the series is arithmetic.
    k = (_month_index(now) - _month_index(start)) // step
    found = add_months(start, k * step)
    # Same calendar month as `now` but later in it (day or time): the window is the previous one.
    # Any earlier month index is strictly before `now`, so one correction is always enough.
    return found if found <= now else add_months(start, (k - 1) * step)


def _calendar_start(duration: Duration, now: datetime) -> datetime:
    # Blocks of n units counted from a fixed origin (1970) so every process agrees without sharing
    # state. Floor division keeps this right before 1970 too.
    n = duration.count
    if duration.unit == "d":
        days = (now - _EPOCH).days
        return _EPOCH + timedelta(days=days // n * n)
    if duration.unit == "w":
        weeks = (now - _EPOCH_MONDAY).days // 7
        return _EPOCH_MONDAY + timedelta(weeks=weeks // n * n)
    step = duration._months  # quarters and years are 3 and 12 months, all aligned on January 1970
    index = _month_index(now) - _month_index(_EPOCH)
    return add_months(_EPOCH, index // step * step)


def _aligned(duration: Duration, calendar_aligned: bool) -> bool:
    return calendar_aligned and duration.is_calendar


def window_start(
    duration: Duration, *, anchor: datetime, now: datetime, calendar_aligned: bool
) -> datetime:
    """Start of the window that contains `now`.

    Rolling (`calendar_aligned=False`, or any unit under a day): `anchor + k * duration` for the
    largest k >= 0 not after `now`; for months, quarters and years each window starts n months
    after the one before, on its day clamped to the month's length, so an anchor of Jan 31 gives
    Feb 28/29, then Mar 28/29 (as a reset a month after the last one would): the same series
    from any of its starts, which the store keeps as `last_reset`. When `now` is before
    `anchor`, the answer is `anchor`.

    Calendar-aligned (unit of a day or more): the UTC calendar boundary, `anchor` is ignored:
    midnight, Monday 00:00, the 1st, 1 Jan/Apr/Jul/Oct, 1 January. For n > 1 windows are blocks of n
    units counted from 1970-01-01 (weeks from Monday 1970-01-05; months, quarters and years from
    January 1970): `2d` starts on even days since the epoch, `2M` in Jan/Mar/May..., `3Y` in 2024.
    """
    now = utc(now)
    if _aligned(duration, calendar_aligned):
        return _calendar_start(duration, now)
    return _rolling_start(duration, utc(anchor), now)


def window_end(duration: Duration, *, start: datetime) -> datetime:
    """End (exclusive) of the window beginning at `start`, which must come from `window_start`:
    the next window's start, rolling or calendar-aligned alike (n months after `start` for
    months, quarters and years: the window starting Feb 29 ends Mar 29)."""
    start = utc(start)
    if duration.unit in _FIXED_SECONDS:
        return start + timedelta(seconds=duration.approx_seconds)
    return add_months(start, duration._months)


def window_bounds(
    duration: Duration, *, anchor: datetime, now: datetime, calendar_aligned: bool
) -> tuple[datetime, datetime]:
    """`(start, end)` of the window containing `now`; `start <= now < end` unless now < anchor."""
    start = window_start(duration, anchor=anchor, now=now, calendar_aligned=calendar_aligned)
    end = window_end(duration, start=start)
    return start, end


_durations: LRUCache[str, Duration] = LRUCache(1024)  # durations written in the store
# Read by the admin API's and the store's worker threads too: a cachetools cache is not
# thread-safe (its LRU order changes on every read), and with more durations than it holds,
# concurrent `GET /budgets` answered 500 (`KeyError`, `OrderedDict mutated during iteration`).
_durations_lock = threading.Lock()
os.register_at_fork(after_in_child=_durations_lock._at_fork_reinit)  # type: ignore[attr-defined]


def parse_duration(text: str | None) -> Duration | None:
    """A stored duration (or None: never), parsed once per text; any thread."""
    if text is None:
        return None
    with _durations_lock:
        found = _durations.get(text)
    if found is None:
        found = Duration.parse(text)  # (outside the lock: it may raise)
        with _durations_lock:
            _durations[text] = found
    return found
