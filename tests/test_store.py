"""The store writes usage records the same way on every database, and reads them back as given."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from budget_middleware.core.durations import Duration
from budget_middleware.core.records import Delta, UsageRecord
from budget_middleware.core.times import END_OF_TIME, utc
from budget_middleware.store import database
from budget_middleware.store.database import Store
from budget_middleware.store.tables import BudgetRow, RateLimitRow, UsageRecordRow
from support import budget_row

WHEN = datetime(2026, 11, 22, 10, 30, 15, 123456, tzinfo=UTC)


def record(request_id: str, **changes: object) -> dict[str, object]:
    """The row as it must read back; `pending` makes the record the request path leaves."""
    row: dict[str, object] = {
        "request_id": request_id,
        "created_at": WHEN,
        "virtual_key_id": "k" * 32,
        "team_id": None,
        "customer_id": "c" * 32,
        "provider": "openai",
        "model": "gpt-4o",
        "tags": ["product:chat", "env:prod"],
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_tokens": 5,
        "cost_nanos": 123_456_789,
        "cost": 0.123456789,
        "cost_source": "catalog",
        "status": 200,
        "streamed": True,
        "outcome": "completed",
        "estimated": False,
        "note": None,
        "duration_ms": 12.5,
        "direction": "inbound",
        "would_refuse": None,
    }
    row.update(changes)
    return row


def pending(row: dict[str, object]) -> UsageRecord:
    values = {k: v for k, v in row.items() if k != "cost"}
    values["created_at"] = row["created_at"].timestamp()  # type: ignore[attr-defined]
    values["tags"] = tuple(row["tags"])  # type: ignore[call-overload]
    return UsageRecord(**values)  # type: ignore[arg-type]


def test_usage_records_read_back_exactly_as_written(store_url: str) -> None:
    store = Store(store_url)
    store.create_schema()
    written = [
        record("a" * 32),
        record(
            "b" * 32,
            tags=[],
            streamed=False,
            estimated=True,
            note="no usage in the response",
            direction="outbound",
            would_refuse="budget_exceeded",
        ),
    ]
    store.apply_flush("batch-1", [], [pending(r) for r in written])
    store.apply_flush("batch-1", [], [pending(r) for r in written])  # the same batch: skipped
    with store.session() as s:
        rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.request_id)))  # type: ignore[arg-type]
    store.dispose()
    assert len(rows) == 2
    for row, want in zip(rows, written, strict=True):
        got = row.model_dump(exclude={"id"})
        got["created_at"] = got["created_at"].replace(tzinfo=UTC)  # SQLite keeps no zone
        assert got == want


def test_deltas_land_in_their_windows_on_every_database(store_url: str) -> None:
    """Each kind's deltas go in one statement; two deltas of one counter in a batch (a window
    that ended, then the next) are applied in order, never merged or lost."""
    store = Store(store_url)
    store.create_schema()
    day = timedelta(days=1)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    a, b = budget_row(store, 500, start), budget_row(store, 0, start)
    with store.session() as s:
        rate = RateLimitRow(
            owner_type="tag",
            owner_id="chat",
            request_max_limit=100,
            request_reset_duration="1d",
            request_last_reset=start,
            token_max_limit=10**6,
            token_reset_duration="1d",
            token_last_reset=start,
        )
        s.add(rate)
        s.commit()
        rate_id = rate.id
    store.apply_flush(
        uuid.uuid4().hex,
        [
            Delta("budget", a, start, start + day, 25),  # a's window: added
            Delta("budget", a, start + day, END_OF_TIME, 7),  # a's next window: starts it anew
            Delta("budget", b, start, start + day, 3),
            Delta("request", rate_id, start, start + day, 2),
            Delta("token", rate_id, start, start + day, 40),
        ],
        [],
    )
    budgets, rates = store.read_counters([a, b], [rate_id])
    assert budgets[a][:2] == (7, start + day)
    assert budgets[b][:2] == (3, start)
    row = rates[rate_id]
    assert (row.request_current_usage, row.token_current_usage) == (2, 40)
    # A late delta of a window that has ended is not added to the one after it.
    store.apply_flush(uuid.uuid4().hex, [Delta("budget", a, start, start + day, 1000)], [])
    assert store.read_counters([a], [])[0][a][:2] == (7, start + day)
    store.dispose()


def test_a_delta_counted_on_terms_the_store_no_longer_holds_goes_by_the_stored_ones(
    store_url: str,
) -> None:
    """New terms written by another process, which this one has not read yet: its deltas were
    counted on the old ones (`Delta.terms`), and the stored window's end is the stored terms'.
    A minute after the one a day was made of is added to the day (its window was taken as
    begun anew, what the day held dropped); a week of a month from 31 January (ending 28
    February) too, and the week after its end begins the month from 28 February; a minute of
    a calendar day begun at 23:59 begins the next day at midnight. Deltas on the stored terms
    keep their rule (a later window begins anew)."""
    store = Store(store_url)
    store.create_schema()
    start = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    minute, week = timedelta(minutes=1), timedelta(weeks=1)
    day_of_minutes = budget_row(store, 300, start)  # 1d, made of 1m elsewhere
    month = budget_row(store, 500, start)
    aligned = budget_row(store, 40, datetime(2026, 3, 1, 23, 59, tzinfo=UTC))
    same = budget_row(store, 9, start)
    with store.session() as s:
        for id_, duration, calendar in ((month, "1M", False), (aligned, "1d", True)):
            row = s.get(BudgetRow, id_)
            assert row is not None
            row.reset_duration, row.calendar_aligned = duration, calendar
            s.add(row)
        rate = RateLimitRow(
            owner_type="tag",
            owner_id="chat",
            token_max_limit=1000,
            token_reset_duration="1d",
            token_last_reset=start,
            token_current_usage=30,
        )
        s.add(rate)
        s.commit()
        rate_id = rate.id
    one_minute, one_week, one_day = Duration(1, "m"), Duration(1, "w"), Duration(1, "d")

    def counted(kind: str, id_: str, begun: datetime, length: timedelta, amount: int,
                terms: Duration) -> Delta:  # fmt: skip
        return Delta(kind, id_, begun, begun + length, amount, 0.0, begun - length, (terms, False))

    late = datetime(2026, 3, 2, 0, 0, 15, tzinfo=UTC)
    store.apply_flush(
        uuid.uuid4().hex,
        [
            counted("budget", day_of_minutes, start + minute, minute, 300, one_minute),
            counted("budget", month, start + 4 * week - timedelta(days=1), week, 3, one_week),
            counted("budget", aligned, late, minute, 2, one_minute),
            counted("token", rate_id, start + minute, minute, 30, one_minute),
            counted("budget", same, start + 2 * timedelta(days=1), timedelta(days=1), 4, one_day),
        ],
        [],
    )
    in_month = store.read_counters([month], [])[0][month][:2]
    store.apply_flush(
        uuid.uuid4().hex, [counted("budget", month, start + 5 * week, week, 7, one_week)], []
    )
    names = {day_of_minutes: "day", month: "month", aligned: "aligned day", same: "same"}
    budgets, rates = store.read_counters(names, [rate_id])
    found = {names[id_]: (b.usage, b.last_reset) for id_, b in budgets.items()}
    tokens = (rates[rate_id].token_current_usage, utc(rates[rate_id].token_last_reset))
    print(f"month before its end {in_month}; {found}; tokens {tokens}")
    assert in_month == (503, start)
    assert found["day"] == (600, start)
    assert found["month"] == (7, datetime(2026, 2, 28, 10, 0, tzinfo=UTC))
    assert found["aligned day"] == (2, datetime(2026, 3, 2, tzinfo=UTC))
    assert found["same"] == (4, start + 2 * timedelta(days=1))
    assert tokens == (60, start)
    store.dispose()


def test_a_batch_of_thousands_of_records_is_written_whole(store_url: str) -> None:
    store = Store(store_url)
    store.create_schema()
    records = [pending(record(f"{n:032x}", input_tokens=n)) for n in range(2_500)]
    store.apply_flush(uuid.uuid4().hex, [], records)
    with store.session() as s:
        rows = list(s.exec(select(UsageRecordRow)))
    store.dispose()
    assert len(rows) == 2_500
    assert sorted(r.input_tokens for r in rows) == list(range(2_500))
    assert {r.request_id for r in rows} == {r.request_id for r in records}


def test_records_are_named_after_their_batch_once_and_for_all(store_url: str) -> None:
    """The request path leaves a record's id empty; the flush names it after its batch and its
    place in it, so a batch written again (its outcome unknown) names it the same and is skipped,
    and two batches never share an id."""
    store = Store(store_url)
    store.create_schema()
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    batch = [pending(record("", input_tokens=n)) for n in range(3)]
    store.apply_flush(first, [], batch)
    store.apply_flush(first, [], batch)  # retried: already applied
    store.apply_flush(second, [], [pending(record("", input_tokens=3)), pending(record("x" * 32))])
    with store.session() as s:
        rows = {r.input_tokens: r.request_id for r in s.exec(select(UsageRecordRow))}
    store.dispose()
    assert [rows[n] for n in range(3)] == [f"{first[:16]}{n:016x}" for n in range(3)]
    assert rows[3] == f"{second[:16]}{0:016x}"
    assert rows[10] == "x" * 32  # a record that has an id keeps it
    assert len(rows) == len(set(rows.values())) == 5


def test_a_sqlite_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    """Memory: each pooled SQLite connection caches 1 MiB of pages, not SQLite's 2 MiB."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -1024
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.dispose()


def test_batches_of_any_size_share_a_few_insert_statements(store_url: str) -> None:
    """Memory: records go in statements of 256 rows and powers of two, so a long-running server
    keeps at most 9 statements (text here, prepared in SQLite) whatever its batch sizes."""
    store = Store(store_url)
    store.create_schema()
    sizes = [1, 3, 7, 100, 999, 1000, 1001, 1500, 2047]
    written = 0
    for size in sizes:
        batch = [pending(record("", input_tokens=written + n)) for n in range(size)]
        store.apply_flush(uuid.uuid4().hex, [], batch)
        written += size
    with store.session() as s:
        rows = sorted(r.input_tokens for r in s.exec(select(UsageRecordRow)))
    store.dispose()
    assert rows == list(range(written))
    assert [sum(database._statement_rows(n)) for n in sizes] == sizes
    assert {r for n in range(1, 3000) for r in database._statement_rows(n)} == {
        256,
        128,
        64,
        32,
        16,
        8,
        4,
        2,
        1,
    }


def test_the_sweep_resets_expired_windows_and_nothing_else(store_url: str) -> None:
    """SPEC §6: expired windows reset on first touch and by a background sweep. The sweep
    starts each expired window anew in the store (usage 0 from the current window's start), and
    leaves a current window, a lifetime budget and a calendar window reset midway as they are;
    a charge of the ended window written after it is not added to the new one."""
    store = Store(store_url)
    store.create_schema()
    day = timedelta(days=1)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    now = start + 2 * day + timedelta(hours=5)
    expired, current = budget_row(store, 500, start), budget_row(store, 9, start + 2 * day)
    with store.session() as s:
        lifetime = BudgetRow(owner_type="tag", owner_id="a", max_limit_nanos=10,
                             reset_duration=None, current_usage_nanos=7,
                             last_reset=start)  # fmt: skip
        midway = BudgetRow(owner_type="tag", owner_id="b", max_limit_nanos=10, reset_duration="1M",
                           calendar_aligned=True, current_usage_nanos=3,
                           last_reset=start + timedelta(days=1, hours=2))  # fmt: skip
        rate = RateLimitRow(owner_type="tag", owner_id="chat", request_max_limit=100,
                            request_reset_duration="1h", request_current_usage=4,
                            request_last_reset=start, token_max_limit=10**6,
                            token_reset_duration="1d", token_current_usage=40,
                            token_last_reset=start + 2 * day)  # fmt: skip
        s.add_all([lifetime, midway, rate])
        s.commit()
        ids = [lifetime.id, midway.id]
        rate_id = rate.id
    swept = store.sweep_windows(now)
    budgets, rates = store.read_counters([expired, current, *ids], [rate_id])
    print(f"swept {swept}: {budgets}")
    assert swept == 2  # the expired budget and the request window
    assert budgets[expired][:2] == (0, start + 2 * day)
    assert budgets[current][:2] == (9, start + 2 * day)
    assert budgets[ids[0]][:2] == (7, start) and budgets[ids[1]][:2] == (
        3,
        start + timedelta(days=1, hours=2),
    )
    row = rates[rate_id]
    assert (row.request_current_usage, row.token_current_usage) == (0, 40)
    assert utc(row.request_last_reset) == start + 2 * day + timedelta(hours=5)
    store.apply_flush(uuid.uuid4().hex, [Delta("budget", expired, start, start + day, 1000)], [])
    assert store.read_counters([expired], [])[0][expired][:2] == (0, start + 2 * day)
    assert store.sweep_windows(now) == 0  # nothing left to sweep
    store.dispose()


def _an_expired_window_on_two_stores(
    store_url: str,
) -> tuple[Store, Store, datetime, datetime, str]:
    """Two processes' stores on one database, a daily budget of 500 nano whose window began
    two days before `now`: (store, the other, its start, now, its id)."""
    store = Store(store_url)
    store.create_schema()
    other = Store(store_url)  # another process on the same store
    start = datetime(2026, 3, 1, tzinfo=UTC)
    now = start + timedelta(days=2, hours=5)
    return store, other, start, now, budget_row(store, 500, start)


def test_a_charge_written_while_the_sweep_runs_is_not_reset_away(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PITFALLS (concurrent resets overwriting each other): the sweep reads the expired
    windows, then resets them; another process's flush that starts the new window with a
    charge in between must keep it. The flush is made where the sweep works out the windows,
    after its read and before its update."""
    store, other, start, now, expired = _an_expired_window_on_two_stores(store_url)
    day = timedelta(days=1)
    bounds = database.window_bounds
    flushed: list[int] = []

    def bounds_with_a_flush_between(*args: Any, **kwargs: Any) -> Any:
        if not flushed:  # the other process's charge, once: $42 nano in the new window
            other.apply_flush(
                uuid.uuid4().hex, [Delta("budget", expired, start + 2 * day, END_OF_TIME, 42)], []
            )
            flushed.append(42)
        return bounds(*args, **kwargs)

    monkeypatch.setattr(database, "window_bounds", bounds_with_a_flush_between)
    swept = store.sweep_windows(now)
    usage, last_reset = store.read_counters([expired], [])[0][expired][:2]
    print(f"swept {swept}; the new window holds {usage} of the 42 charged meanwhile")
    assert (usage, last_reset) == (42, start + 2 * day)
    other.dispose()
    store.dispose()


def test_two_sweeps_at_once_reset_a_window_once_and_keep_what_was_charged_between(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PITFALLS (concurrent resets overwriting each other), two instances sweeping at once:
    the other's sweep resets the window between this sweep's read and its update, and the
    other's flush then charges the new window; this sweep, which read the old window, must
    reset nothing (a second reset would take the charge away)."""
    store, other, start, now, expired = _an_expired_window_on_two_stores(store_url)
    day = timedelta(days=1)
    bounds = database.window_bounds
    theirs: list[int] = []

    def bounds_with_another_sweep_between(*args: Any, **kwargs: Any) -> Any:
        if not theirs:  # once: the other instance sweeps, then charges $42 nano
            theirs.append(0)
            theirs[0] = other.sweep_windows(now)
            other.apply_flush(
                uuid.uuid4().hex, [Delta("budget", expired, start + 2 * day, END_OF_TIME, 42)], []
            )
        return bounds(*args, **kwargs)

    monkeypatch.setattr(database, "window_bounds", bounds_with_another_sweep_between)
    swept = store.sweep_windows(now)
    usage, last_reset = store.read_counters([expired], [])[0][expired][:2]
    print(f"the other swept {theirs[0]}, this one {swept}; the window holds {usage} of 42")
    assert (theirs[0], swept) == (1, 0)
    assert (usage, last_reset) == (42, start + 2 * day)
    other.dispose()
    store.dispose()


def test_the_sweep_resets_hundreds_of_windows_in_a_few_statements(store_url: str) -> None:
    """450 budgets whose day ended (three chunks of rows), beside 50 whose day has not: each
    expired one reset once, the others left, on every database."""
    store = Store(store_url)
    store.create_schema()
    start = datetime(2026, 3, 1, tzinfo=UTC)
    expired = [budget_row(store, 100 + n, start) for n in range(450)]
    current = [budget_row(store, 7, start + timedelta(days=1)) for _ in range(50)]
    now = start + timedelta(days=1, hours=3)
    swept = store.sweep_windows(now)
    budgets, _ = store.read_counters(expired + current, [])
    print(f"swept {swept} of 500")
    assert swept == 450 and store.sweep_windows(now) == 0
    assert {budgets[id_][:2] for id_ in expired} == {(0, start + timedelta(days=1))}
    assert {budgets[id_][:2] for id_ in current} == {(7, start + timedelta(days=1))}
    store.dispose()
