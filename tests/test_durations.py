"""Durations and reset windows (SPEC §6): parsing, rolling and calendar windows, months."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budget_middleware.core import times
from budget_middleware.core.durations import (
    Duration,
    add_months,
    parse_duration,
    utcnow,
    window_bounds,
    window_end,
    window_start,
)


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def rolling(text: str, anchor: datetime, now: datetime) -> tuple[datetime, datetime]:
    return window_bounds(Duration.parse(text), anchor=anchor, now=now, calendar_aligned=False)


def aligned(text: str, now: datetime) -> tuple[datetime, datetime]:
    # The anchor must not matter for calendar windows: pass a deliberately odd one.
    anchor = utc(2001, 7, 13, 5, 6, 7)
    return window_bounds(Duration.parse(text), anchor=anchor, now=now, calendar_aligned=True)


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "unit"),
    [
        ("1s", 1, "s"),
        ("30s", 30, "s"),
        ("5m", 5, "m"),
        ("1h", 1, "h"),
        ("1d", 1, "d"),
        ("2w", 2, "w"),
        ("1M", 1, "M"),
        ("1mo", 1, "M"),
        ("6mo", 6, "M"),
        ("1Q", 1, "Q"),
        ("3Y", 3, "Y"),
        ("  7d\n", 7, "d"),
        ("100Y", 100, "Y"),
        ("01d", 1, "d"),  # n >= 1 (SPEC §6): LiteLLM's parser reads it so too
        ("007m", 7, "m"),
    ],
)
def test_parse_accepts_every_unit(text: str, count: int, unit: str) -> None:
    assert Duration.parse(text) == Duration(count, unit)


def test_lowercase_m_is_minutes_and_uppercase_m_is_months() -> None:
    assert Duration.parse("1m").approx_seconds == 60
    assert Duration.parse("1M").unit == "M"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "d",
        "0d",
        "00d",
        "-1d",
        "+1d",
        "1.5h",
        "1",
        "1D",
        "1H",
        "1S",
        "1W",
        "1y",
        "1q",
        "1MO",
        "1Mo",
        "1mon",
        "1 d",
        "1d1h",
        "d1",
        "1x",
        "\u0661d",  # a non-ASCII digit that int() would accept
        "101Y",
        "99999999999999999999s",
    ],
)
def test_parse_rejects_invalid_forms_quoting_input_and_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        Duration.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert "<n>s|m|h|d|w|M|Q|Y" in message
    assert "n >= 1" in message


def test_parse_error_message_reads_as_documented() -> None:
    with pytest.raises(ValueError, match=r"^invalid duration '0d': expected <n>s\|m\|h\|d\|w\|M"):
        Duration.parse("0d")


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        Duration.parse(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("count", "unit"), [(0, "d"), (-1, "s"), (True, "d"), (1, "x"), (1, "mo")])
def test_constructor_validates_like_parse(count: int, unit: str) -> None:
    with pytest.raises(ValueError):
        Duration(count, unit)


@pytest.mark.parametrize(("text", "canonical"), [("1mo", "1M"), (" 2d ", "2d"), ("15m", "15m")])
def test_str_is_canonical_and_round_trips(text: str, canonical: str) -> None:
    assert str(Duration.parse(text)) == canonical
    assert Duration.parse(canonical) == Duration.parse(text)


def test_duration_is_frozen_and_hashable() -> None:
    d = Duration.parse("1d")
    with pytest.raises(AttributeError):
        d.count = 2  # type: ignore[misc]
    assert {d, Duration(1, "d")} == {d}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("2m", 120),
        ("1h", 3_600),
        ("1d", 86_400),
        ("1w", 604_800),
        ("1M", 2_629_746),
        ("1Q", 7_889_238),
        ("1Y", 31_556_952),
        ("2Y", 63_113_904),
    ],
)
def test_approx_seconds_is_exact_for_fixed_units_and_nominal_for_calendar_ones(
    text: str, seconds: int
) -> None:
    assert Duration.parse(text).approx_seconds == seconds


def test_nominal_year_is_a_mean_gregorian_year() -> None:
    assert Duration.parse("1Y").approx_seconds == round(365.2425 * 86_400)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("59s", False),
        ("90m", False),
        ("48h", False),
        ("1d", True),
        ("1w", True),
        ("1M", True),
        ("1Q", True),
        ("1Y", True),
    ],
)
def test_is_calendar_for_units_of_a_day_or_more(text: str, expected: bool) -> None:
    assert Duration.parse(text).is_calendar is expected


# --- add_months ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (utc(2024, 1, 31), 1, utc(2024, 2, 29)),  # leap year
        (utc(2023, 1, 31), 1, utc(2023, 2, 28)),
        (utc(2100, 1, 31), 1, utc(2100, 2, 28)),  # century: not leap
        (utc(2000, 1, 31), 1, utc(2000, 2, 29)),  # 400-year: leap
        (utc(2024, 1, 31), 3, utc(2024, 4, 30)),
        (utc(2024, 2, 29), 12, utc(2025, 2, 28)),
        (utc(2024, 2, 29), 48, utc(2028, 2, 29)),
        (utc(2024, 11, 15), 2, utc(2025, 1, 15)),
        (utc(2024, 3, 31), -1, utc(2024, 2, 29)),
        (utc(2024, 1, 15), -13, utc(2022, 12, 15)),
        (utc(2024, 5, 31, 23, 59, 59, 999_999), 1, utc(2024, 6, 30, 23, 59, 59, 999_999)),
        (utc(2024, 5, 10), 0, utc(2024, 5, 10)),
    ],
)
def test_add_months_clamps_the_day_and_keeps_the_time(
    start: datetime, months: int, expected: datetime
) -> None:
    assert add_months(start, months) == expected


# --- rolling windows -------------------------------------------------------------------------


ANCHOR = utc(2024, 3, 10, 14, 30, 15)


@pytest.mark.parametrize(
    ("text", "now", "start", "end"),
    [
        (
            "30s",
            ANCHOR + timedelta(seconds=75),
            ANCHOR + timedelta(seconds=60),
            ANCHOR + timedelta(seconds=90),
        ),
        (
            "5m",
            ANCHOR + timedelta(minutes=12),
            ANCHOR + timedelta(minutes=10),
            ANCHOR + timedelta(minutes=15),
        ),
        (
            "1h",
            ANCHOR + timedelta(hours=3, minutes=1),
            ANCHOR + timedelta(hours=3),
            ANCHOR + timedelta(hours=4),
        ),
        ("1d", utc(2024, 3, 12, 9), utc(2024, 3, 11, 14, 30, 15), utc(2024, 3, 12, 14, 30, 15)),
        ("2w", utc(2024, 4, 1), utc(2024, 3, 24, 14, 30, 15), utc(2024, 4, 7, 14, 30, 15)),
        ("1M", utc(2024, 5, 1), utc(2024, 4, 10, 14, 30, 15), utc(2024, 5, 10, 14, 30, 15)),
        (
            "1M",
            utc(2024, 5, 10, 14, 30, 15),
            utc(2024, 5, 10, 14, 30, 15),
            utc(2024, 6, 10, 14, 30, 15),
        ),
        (
            "1M",
            utc(2024, 5, 10, 14, 30, 14),
            utc(2024, 4, 10, 14, 30, 15),
            utc(2024, 5, 10, 14, 30, 15),
        ),
        ("1Q", utc(2024, 9, 1), utc(2024, 6, 10, 14, 30, 15), utc(2024, 9, 10, 14, 30, 15)),
        ("1Y", utc(2026, 1, 1), utc(2025, 3, 10, 14, 30, 15), utc(2026, 3, 10, 14, 30, 15)),
        ("2Y", utc(2027, 1, 1), utc(2026, 3, 10, 14, 30, 15), utc(2028, 3, 10, 14, 30, 15)),
    ],
)
def test_rolling_window_for_every_unit_counts_from_the_anchor(
    text: str, now: datetime, start: datetime, end: datetime
) -> None:
    assert rolling(text, ANCHOR, now) == (start, end)


@pytest.mark.parametrize("text", ["1s", "1h", "1d", "1w", "1M", "1Q", "1Y"])
def test_rolling_window_starts_at_the_anchor_itself(text: str) -> None:
    start, end = rolling(text, ANCHOR, ANCHOR)
    assert start == ANCHOR
    assert end > ANCHOR


@pytest.mark.parametrize("text", ["1s", "1d", "1M", "1Y"])
def test_now_before_anchor_returns_the_anchor(text: str) -> None:
    start, _ = rolling(text, ANCHOR, ANCHOR - timedelta(days=400))
    assert start == ANCHOR


def test_monthly_windows_from_jan_31_follow_the_clamped_day() -> None:
    """Each window starts a month after the one before, its day clamped to the month: from Jan
    31, Feb 29, then the 29th. The store keeps each window's start as `last_reset`, and windows
    counted from there are the same (they were counted from the first anchor in process, Mar
    31, and from the store's Feb 29 after a restart, Mar 29: a window cut two days short)."""
    anchor = utc(2024, 1, 31, 12)
    starts = []
    now = anchor
    for _ in range(14):
        start, end = rolling("1M", anchor, now)
        starts.append(start)
        assert rolling("1M", start, now) == (start, end)  # from the store's last_reset: the same
        now = end
    assert starts == [utc(2024, 1, 31, 12), *(utc(2024, m, 29, 12) for m in range(2, 13)),
                      utc(2025, 1, 29, 12), utc(2025, 2, 28, 12)]  # fmt: skip
    # Any moment's window is the same from any earlier start of the series.
    for moment in (utc(2024, 3, 30), utc(2024, 7, 29, 11), utc(2025, 3, 1)):
        found = {rolling("1M", origin, moment) for origin in starts if origin <= moment}
        assert len(found) == 1, (moment, found)


def test_a_window_ends_a_month_after_it_starts() -> None:
    d = Duration.parse("1M")
    end = window_end(d, start=utc(2023, 2, 28))
    assert end == utc(2023, 3, 28)


def test_quarterly_window_from_nov_30_clamps_to_february() -> None:
    anchor = utc(2023, 11, 30)
    assert rolling("1Q", anchor, utc(2024, 3, 1)) == (utc(2024, 2, 29), utc(2024, 5, 29))


def test_yearly_window_from_feb_29_clamps_in_common_years() -> None:
    anchor = utc(2024, 2, 29)
    assert rolling("1Y", anchor, utc(2025, 6, 1)) == (utc(2025, 2, 28), utc(2026, 2, 28))
    assert rolling("1Y", anchor, utc(2028, 3, 1)) == (utc(2028, 2, 28), utc(2029, 2, 28))


def test_a_day_that_never_clamps_keeps_its_day() -> None:
    """Jan 31 every year, and a 2-month series on the 30th that skips February."""
    assert rolling("1Y", utc(2020, 1, 31), utc(2031, 6, 1)) == (utc(2031, 1, 31), utc(2032, 1, 31))
    assert rolling("2M", utc(2023, 11, 30), utc(2025, 4, 2)) == (
        utc(2025, 3, 30), utc(2025, 5, 30))  # fmt: skip


def test_one_month_is_not_thirty_days_and_resets_once_in_a_31_day_month() -> None:
    anchor = utc(2024, 1, 1)
    start, end = rolling("1M", anchor, utc(2024, 1, 31, 23))
    assert (start, end) == (utc(2024, 1, 1), utc(2024, 2, 1))
    assert end - start == timedelta(days=31)
    # Over 2024 a monthly budget resets exactly 12 times, once on each 1st.
    resets = {rolling("1M", anchor, anchor + timedelta(hours=h))[0] for h in range(0, 366 * 24, 6)}
    assert sorted(resets) == [utc(2024, m, 1) for m in range(1, 13)]


def test_daily_window_is_always_24_hours_in_utc() -> None:
    start, end = rolling("1d", utc(2024, 3, 30, 2), utc(2024, 3, 31, 12))  # EU DST weekend
    assert end - start == timedelta(hours=24)


@pytest.mark.parametrize("text", ["1s", "1m", "1d", "1M", "1Q"])
def test_window_untouched_for_ten_years_computes_instantly(text: str) -> None:
    anchor = utc(2015, 1, 31, 0, 0, 1)
    now = utc(2025, 6, 15, 8)
    began = time.perf_counter()
    for _ in range(1_000):
        start, end = rolling(text, anchor, now)
    assert time.perf_counter() - began < 0.5
    assert start <= now < end
    assert now - start <= timedelta(days=92)


def test_window_untouched_for_millennia_is_still_exact() -> None:
    anchor = utc(1, 1, 1)
    start, end = rolling("1s", anchor, utc(9000, 5, 5, 5, 5, 5, 123))
    assert (start, end) == (utc(9000, 5, 5, 5, 5, 5), utc(9000, 5, 5, 5, 5, 6))


def test_sub_day_units_roll_even_when_calendar_aligned() -> None:
    d = Duration.parse("1h")
    anchor = utc(2024, 1, 1, 0, 17)
    start = window_start(d, anchor=anchor, now=utc(2024, 1, 1, 5, 5), calendar_aligned=True)
    assert start == utc(2024, 1, 1, 4, 17)


# --- calendar-aligned windows ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "now", "start", "end"),
    [
        ("1d", utc(2024, 3, 10, 14, 30), utc(2024, 3, 10), utc(2024, 3, 11)),
        ("1d", utc(2024, 3, 10), utc(2024, 3, 10), utc(2024, 3, 11)),
        ("1w", utc(2024, 3, 10, 23, 59), utc(2024, 3, 4), utc(2024, 3, 11)),  # a Sunday
        ("1w", utc(2024, 3, 11), utc(2024, 3, 11), utc(2024, 3, 18)),  # a Monday
        ("1M", utc(2024, 2, 29, 23), utc(2024, 2, 1), utc(2024, 3, 1)),
        ("1M", utc(2024, 12, 31, 23, 59, 59), utc(2024, 12, 1), utc(2025, 1, 1)),
        ("1Q", utc(2024, 2, 14), utc(2024, 1, 1), utc(2024, 4, 1)),
        ("1Q", utc(2024, 5, 1), utc(2024, 4, 1), utc(2024, 7, 1)),
        ("1Q", utc(2024, 9, 30), utc(2024, 7, 1), utc(2024, 10, 1)),
        ("1Q", utc(2024, 12, 31), utc(2024, 10, 1), utc(2025, 1, 1)),
        ("1Y", utc(2024, 7, 4), utc(2024, 1, 1), utc(2025, 1, 1)),
    ],
)
def test_calendar_window_starts_at_the_utc_boundary(
    text: str, now: datetime, start: datetime, end: datetime
) -> None:
    assert aligned(text, now) == (start, end)


@pytest.mark.parametrize(
    ("text", "now", "start", "end"),
    [
        # 2024-03-10 is day 19792 since the epoch (even): 2d blocks start on even days.
        ("2d", utc(2024, 3, 10, 5), utc(2024, 3, 10), utc(2024, 3, 12)),
        ("2d", utc(2024, 3, 11, 5), utc(2024, 3, 10), utc(2024, 3, 12)),
        ("1d", utc(1969, 12, 31, 5), utc(1969, 12, 31), utc(1970, 1, 1)),
        # 2024-03-04 is week 2830 since Monday 1970-01-05 (even).
        ("2w", utc(2024, 3, 12), utc(2024, 3, 4), utc(2024, 3, 18)),
        ("2w", utc(2024, 3, 1), utc(2024, 2, 19), utc(2024, 3, 4)),
        ("2M", utc(2024, 2, 15), utc(2024, 1, 1), utc(2024, 3, 1)),
        ("2M", utc(2024, 4, 30), utc(2024, 3, 1), utc(2024, 5, 1)),
        ("6M", utc(2024, 8, 1), utc(2024, 7, 1), utc(2025, 1, 1)),
        ("2Q", utc(2024, 5, 1), utc(2024, 1, 1), utc(2024, 7, 1)),
        ("2Q", utc(2024, 10, 1), utc(2024, 7, 1), utc(2025, 1, 1)),
        ("3Y", utc(2025, 6, 1), utc(2024, 1, 1), utc(2027, 1, 1)),  # 1970 + 3*18
        ("3Y", utc(2023, 12, 31), utc(2021, 1, 1), utc(2024, 1, 1)),
    ],
)
def test_calendar_windows_of_n_units_are_blocks_counted_from_the_epoch(
    text: str, now: datetime, start: datetime, end: datetime
) -> None:
    assert aligned(text, now) == (start, end)


def test_calendar_window_ignores_the_anchor() -> None:
    d = Duration.parse("1M")
    now = utc(2024, 5, 20)
    a = window_start(d, anchor=utc(2020, 1, 31), now=now, calendar_aligned=True)
    b = window_start(d, anchor=utc(2024, 5, 19, 3), now=now, calendar_aligned=True)
    assert a == b == utc(2024, 5, 1)


# --- time zones ------------------------------------------------------------------------------


def test_naive_datetimes_are_taken_as_utc_and_outputs_are_aware() -> None:
    start, end = window_bounds(
        Duration.parse("1d"),
        anchor=datetime(2024, 1, 1),
        now=datetime(2024, 1, 5, 13),
        calendar_aligned=True,
    )
    assert start == utc(2024, 1, 5)
    assert start.tzinfo is UTC
    assert end.tzinfo is UTC


def test_aware_non_utc_inputs_are_converted_to_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    now = datetime(2024, 1, 5, 3, tzinfo=tokyo)  # still Jan 4 in UTC
    start, _ = aligned("1d", now)
    assert start == utc(2024, 1, 4)
    start, end = rolling("1h", datetime(2024, 1, 5, 0, 30, tzinfo=tokyo), utc(2024, 1, 4, 17, 45))
    assert (start, end) == (utc(2024, 1, 4, 17, 30), utc(2024, 1, 4, 18, 30))
    assert start.tzinfo is UTC


def test_utcnow_is_aware_utc() -> None:
    now = utcnow()
    assert now.tzinfo is UTC
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


# --- properties ------------------------------------------------------------------------------

durations = st.builds(
    Duration,
    count=st.integers(min_value=1, max_value=30),
    unit=st.sampled_from(["s", "m", "h", "d", "w", "M", "Q", "Y"]),
)
moments = st.datetimes(
    min_value=datetime(1950, 1, 1), max_value=datetime(2150, 1, 1), timezones=st.just(UTC)
)


def _is_calendar_boundary(d: Duration, start: datetime) -> bool:
    midnight = start == start.replace(hour=0, minute=0, second=0, microsecond=0)
    months = (start.year - 1970) * 12 + start.month - 1
    days = (start - utc(1970, 1, 1)).days
    per_unit = {
        "d": days % d.count == 0,
        "w": start.weekday() == 0 and ((days - 4) // 7) % d.count == 0,
        "M": start.day == 1 and months % d.count == 0,
        "Q": start.day == 1 and months % (3 * d.count) == 0,
        "Y": start.day == 1 and months % (12 * d.count) == 0,
    }
    return midnight and per_unit[d.unit]


@given(d=durations, anchor=moments, now=moments, calendar_aligned=st.booleans())
def test_window_contains_now_and_the_next_window_starts_at_its_end(
    d: Duration, anchor: datetime, now: datetime, calendar_aligned: bool
) -> None:
    start, end = window_bounds(d, anchor=anchor, now=now, calendar_aligned=calendar_aligned)
    if calendar_aligned and d.is_calendar:
        assert _is_calendar_boundary(d, start)
    elif now < anchor:
        assert start == anchor
        return
    else:
        # Anchor-derived: a whole number of units after the anchor, with its time of day.
        assert start >= anchor
        if d.unit in ("M", "Q", "Y"):
            # Whole steps of months after the anchor, on its day or the day a short month
            # clamped the series to (never before the 28th).
            assert start.time() == anchor.time()
            months = (start.year - anchor.year) * 12 + start.month - anchor.month
            assert months % d._months == 0
            assert min(anchor.day, 28) <= start.day <= anchor.day
        else:
            assert (start - anchor) % timedelta(seconds=d.approx_seconds) == timedelta(0)
    assert start <= now < end
    following = window_start(d, anchor=anchor, now=end, calendar_aligned=calendar_aligned)
    assert following == end
    just_before = window_start(
        d, anchor=anchor, now=end - timedelta(microseconds=1), calendar_aligned=calendar_aligned
    )
    assert just_before == start


@given(d=durations)
def test_str_then_parse_round_trips(d: Duration) -> None:
    assert Duration.parse(str(d)) == d


# --- core.times: epoch seconds and aware UTC datetimes ----------------------------------------


def test_naive_datetimes_are_taken_as_utc_and_aware_ones_converted() -> None:
    naive = datetime(2026, 3, 1, 12, 30)
    assert times.utc(naive) == utc(2026, 3, 1, 12, 30)
    assert times.utc(naive).tzinfo is UTC
    paris = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=1)))
    assert times.utc(paris) == utc(2026, 3, 1, 11, 30)
    assert times.utc(paris).utcoffset() == timedelta(0)
    assert times.utc_or_none(None) is None
    assert times.utc_or_none(naive) == utc(2026, 3, 1, 12, 30)
    assert times.utc_or_none(paris) == utc(2026, 3, 1, 11, 30)


def test_epoch_seconds_become_aware_utc_and_never_ending_windows_end_of_time() -> None:
    assert times.from_ts(0.0) == utc(1970, 1, 1)
    assert times.from_ts(1_767_225_600.5) == utc(2026, 1, 1, 0, 0, 0, 500_000)
    assert times.from_ts(times.FAR_FUTURE) is times.END_OF_TIME
    assert utc(9999, 12, 31) == times.END_OF_TIME


@pytest.mark.parametrize(
    ("anchor", "now", "window"),
    [
        ((2023, 8, 31), (2023, 10, 1), ((2023, 9, 30), (2023, 10, 30))),  # September: 30 days
        ((2023, 10, 31), (2023, 12, 1), ((2023, 11, 30), (2023, 12, 30))),  # November: 30 days
        ((2023, 5, 31), (2023, 6, 29), ((2023, 5, 31), (2023, 6, 30))),  # June: 30 days
        ((2023, 3, 31), (2023, 5, 1), ((2023, 4, 30), (2023, 5, 30))),  # April: 30 days
    ],
)
def test_a_window_from_the_31st_clamps_in_each_30_day_month(
    anchor: tuple[int, int, int], now: tuple[int, int, int], window: tuple[Any, Any]
) -> None:
    assert rolling("1M", utc(*anchor), utc(*now)) == (utc(*window[0]), utc(*window[1]))


def test_a_stored_duration_is_parsed_once_and_none_is_never() -> None:
    assert parse_duration(None) is None
    first = parse_duration("3d")
    assert first == Duration(3, "d") and parse_duration("3d") is first
    assert parse_duration("1mo") == Duration(1, "M")
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("3 days")


def test_the_shared_caches_take_threads_past_their_size() -> None:
    """`parse_duration` and the window bounds' interning are called from worker threads (the
    admin API's, the store's) beside the loop; their cachetools caches are not thread-safe, and
    past their size (1,024 durations, 10,000 bounds) threads switching often raised `KeyError`
    (10 of 12 threads here)."""
    import sys
    import threading

    from budget_middleware.core import windows

    texts = [f"{n}{unit}" for n in range(1, 2000) for unit in "smhd"]
    errors: list[str] = []

    def durations(seed: int) -> None:
        try:
            for i in range(15_000):
                text = texts[(i * 7919 + seed * 104729) % len(texts)]
                assert parse_duration(text) == Duration.parse(text)
        except Exception as exc:
            errors.append(repr(exc))

    def bounds(seed: int) -> None:
        try:
            for i in range(15_000):
                value = float((i * 31 + seed * 17) % 30_000)
                assert windows.shared(windows._FLOATS, value) == value
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=durations, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=bounds, args=(n,)) for n in range(6)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    print(f"{len(threads)} threads, {len(errors)} raised: {sorted(set(errors))[:3]}")
    assert errors == []


def test_a_time_is_written_in_utc_with_z_as_every_answer_writes_it() -> None:
    """`times.rfc3339`: alerts' `raised_at`, refusals' `at` and the webhook's were written with
    `+00:00` where the answers' other times have `Z`; every one is written by it now."""
    moment = datetime(2026, 12, 4, 16, 20, 24, 400000, tzinfo=UTC)
    assert times.rfc3339(moment) == "2026-12-04T16:20:24.400000Z"
    assert times.rfc3339(moment.replace(tzinfo=None)) == "2026-12-04T16:20:24.400000Z"  # naive
    east = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert times.rfc3339(east) == "2026-12-04T16:20:24.400000Z"  # converted, not relabelled
