"""Live window counters and their way to the store (SPEC §6, §11; issue 11, item 10).

A counter counts one window of a limit. What this process charged waits in the ledger until a
flush takes it and writes it to the store as a delta of the window it was charged in. Instances
that share a store without Redis converge: each re-reads the store every cache TTL and adds what
it charged itself and the store does not hold yet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cachetools import LRUCache
from sqlalchemy.exc import OperationalError
from sqlmodel import col, update

from budget_middleware import BudgetSettings
from budget_middleware.core import windows as limits_module
from budget_middleware.core.admission import Ticket
from budget_middleware.core.durations import Duration
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.times import END_OF_TIME, FAR_FUTURE
from budget_middleware.core.windows import (
    BudgetWindow,
    CounterRegistry,
    RateLimitCounters,
    WindowCounter,
    charge,
    ensure_current,
    reset_moment,
    shared,
)
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.exceptions import ServiceUnavailable
from budget_middleware.store.database import Store
from budget_middleware.store.tables import BudgetRow, RateLimitRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()
MINUTE = 60.0
HOUR = 3600.0
DAY = 86_400.0

Summary = tuple[str, str, datetime, datetime, int]


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Clock:
    """The engines' time, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def window(
    registry: CounterRegistry,
    kind: str,
    id_: str,
    *,
    duration: str | None = "1h",
    anchor: float = T0,
    now: float = T0,
    limit: int = 10**12,
    usage: int = 0,
    calendar_aligned: bool = False,
) -> WindowCounter:
    """The live counter of a limit, configured as a key read from the store configures it."""
    return registry.window(
        kind,
        id_,
        limit=limit,
        duration=Duration.parse(duration) if duration else None,
        calendar_aligned=calendar_aligned,
        last_reset=at(anchor),
        usage=usage,
        now=now,
    )


def take(engine: BudgetEngine) -> list[Summary]:
    """What a flush takes now: (kind, id, window start, window end, amount) per delta."""
    taken = engine.counters.take_deltas()
    for d in taken:
        assert d.start_ts == d.window_start.timestamp()
    return [(d.kind, d.id, d.window_start, d.window_end, d.amount) for d in taken]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_engine(sqlite_url: str, clock: Clock) -> Iterator[Callable[[], BudgetEngine]]:
    """Engines (instances) on one SQLite store and one clock; no flusher runs: tests flush."""
    made: list[BudgetEngine] = []

    def make() -> BudgetEngine:
        engine = BudgetEngine(
            BudgetSettings(database_url=sqlite_url, admin_key="admin-secret"), clock=clock
        )
        engine.store.create_schema()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.store.dispose()


@pytest.fixture
def engine(make_engine: Callable[[], BudgetEngine]) -> BudgetEngine:
    return make_engine()


@pytest.fixture
def local_zone_not_utc() -> Iterator[None]:
    """The process's local time zone is UTC+5:30 (SQLite hands back datetimes without a zone)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def budget_row(store: Store, *, duration: str = "1d", last_reset: float = T0) -> str:
    with store.session() as s:
        row = BudgetRow(
            owner_type="team",
            owner_id="research",
            max_limit_nanos=10**12,
            reset_duration=duration,
            last_reset=at(last_reset),
        )
        s.add(row)
        s.commit()
        return row.id


def rate_row(store: Store, *, duration: str = "1h", last_reset: float = T0) -> str:
    with store.session() as s:
        row = RateLimitRow(
            owner_type="virtual_key",
            owner_id="alice",
            request_max_limit=1000,
            request_reset_duration=duration,
            request_last_reset=at(last_reset),
            token_max_limit=10**6,
            token_reset_duration=duration,
            token_last_reset=at(last_reset),
        )
        s.add(row)
        s.commit()
        return row.id


def budget_scope(engine: BudgetEngine, budget_id: str, duration: str = "1d") -> Scope:
    counter = window(engine.registry, "budget", budget_id, duration=duration, now=engine.clock())
    return Scope("team", "research", "research", budgets=(counter,))


def rate_scope(engine: BudgetEngine, rate_id: str) -> Scope:
    requests = window(engine.registry, "request", rate_id, limit=1000, now=engine.clock())
    tokens = window(engine.registry, "token", rate_id, limit=10**6, now=engine.clock())
    return Scope(
        "virtual_key",
        "alice",
        "alice",
        rate_limit=RateLimitCounters(rate_id, requests, tokens, None),
    )


def spend(engine: BudgetEngine, scope: Scope, cost: int = 0, tokens: int = 0) -> None:
    """One request admitted and settled in this instance."""
    ticket = engine.admit_now(LimitSet((scope,)), 0)
    assert isinstance(ticket, Ticket)
    engine.settle_now(ticket, cost, tokens)


def stored_budget(store: Store, budget_id: str) -> tuple[int, datetime]:
    stored = store.read_counters([budget_id], [])[0][budget_id]
    return stored.usage, stored.last_reset


# -- instances sharing a store converge every cache TTL (SPEC §11) -------------------------------


async def test_an_instance_sees_the_budget_spend_another_flushed_after_its_refresh(
    make_engine: Callable[[], BudgetEngine],
) -> None:
    a, b = make_engine(), make_engine()
    budget_id = budget_row(a.store)
    in_a, in_b = budget_scope(a, budget_id), budget_scope(b, budget_id)
    spend(b, in_b, cost=700)
    assert await b.flush()
    spend(a, in_a, cost=300)  # not flushed yet: it still counts here
    assert in_a.budgets[0].value == 300
    await a.counters.refresh()
    assert in_a.budgets[0].value == 700 + 300
    assert await a.flush()
    await b.counters.refresh()
    assert in_b.budgets[0].value == 1000
    assert stored_budget(a.store, budget_id) == (1000, at(T0))


async def test_an_instance_sees_the_requests_and_tokens_another_flushed_after_its_refresh(
    make_engine: Callable[[], BudgetEngine], local_zone_not_utc: None
) -> None:
    """Rate limits only (the store's times read back from SQLite without a zone are UTC, whatever
    the local zone)."""
    a, b = make_engine(), make_engine()
    rate_id = rate_row(a.store)
    in_a, in_b = rate_scope(a, rate_id), rate_scope(b, rate_id)
    spend(b, in_b, tokens=30)
    spend(b, in_b, tokens=10)
    assert await b.flush()
    spend(a, in_a, tokens=5)
    await a.counters.refresh()
    rate = in_a.rate_limit
    assert rate is not None and rate.requests is not None and rate.tokens is not None
    assert (rate.requests.value, rate.tokens.value) == (2 + 1, 40 + 5)


async def test_a_refresh_with_no_live_counters_does_not_read_the_store(
    engine: BudgetEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[list[str], set[str]]] = []
    read_counters = engine.store.read_counters

    def counting(budget_ids: list[str], rate_ids: set[str]) -> object:
        reads.append((budget_ids, rate_ids))
        return read_counters(budget_ids, rate_ids)

    monkeypatch.setattr(engine.store, "read_counters", counting)
    await engine.counters.refresh()
    assert reads == []
    budget_id = budget_row(engine.store)
    budget_scope(engine, budget_id)
    await engine.counters.refresh()
    assert reads == [([budget_id], set())]


async def test_while_writes_fail_a_refresh_never_takes_back_what_this_instance_charged(
    make_engine: Callable[[], BudgetEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush took A's charge and could not write it: it counts in A until the store holds it,
    and once the store confirms it, it is not counted twice."""
    a, b = make_engine(), make_engine()
    budget_id = budget_row(a.store)
    in_a, in_b = budget_scope(a, budget_id), budget_scope(b, budget_id)
    spend(a, in_a, cost=500)

    def refuse(*args: object) -> None:
        raise ServiceUnavailable("read-only")

    with monkeypatch.context() as patched:
        patched.setattr(a.store, "apply_flush", refuse)
        patched.setattr(a.store, "writable", lambda: False)
        assert not await a.flush()
    spend(b, in_b, cost=200)
    assert await b.flush()
    await a.counters.refresh()
    assert in_a.budgets[0].value == 200 + 500
    assert await a.flush()  # the store is writable again
    assert stored_budget(a.store, budget_id) == (700, at(T0))
    assert a.registry.ledger.unconfirmed == {}  # nothing is left to count twice
    await a.counters.refresh()
    assert in_a.budgets[0].value == 700


# -- seeding: the store's usage of this window, plus this process's unwritten charges ----------


def test_a_counter_seeded_from_the_store_adds_its_pending_charges_of_this_window() -> None:
    registry = CounterRegistry()
    # Rolling hours from T0 - 1h, rolled on into [T0, T0 + 1h)
    counter = window(registry, "budget", "b", anchor=T0 - HOUR, now=T0 + 10 * MINUTE)
    counter.add(5, registry.ledger)
    counter.seed(100, T0, registry.ledger)
    assert counter.value == 105
    # A stored window older than the one the counter took from the store: a read from before
    # it (begun before new terms or a reset, ended after), left alone.
    counter.seed(40, T0 - 2 * HOUR, registry.ledger)
    assert counter.value == 105
    counter.seed(100, T0 - HOUR, registry.ledger)  # the store still holds the window before
    assert counter.value == 5


def test_what_a_flush_took_for_an_ended_window_does_not_count_in_the_next(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b")
    counter.add(5, ledger)
    assert take(engine) == [("budget", "b", at(T0), at(T0 + HOUR), 5)]
    ensure_current([counter], T0 + HOUR, ledger)
    counter.seed(100, T0 + HOUR, ledger)
    assert counter.value == 100
    counter.seed(100, T0, ledger)  # the store has not started the new window yet
    assert counter.value == 0


def test_the_store_confirming_one_flush_leaves_another_flushs_charges_counted(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    counter = window(engine.registry, "request", "r")
    counter.add(5, ledger)
    first = engine.counters.take_deltas()
    counter.add(1, ledger)
    second = engine.counters.take_deltas()
    counter.seed(0, T0, ledger)  # the store has neither
    assert counter.value == 6
    for d in first:
        ledger.confirmed(d.kind, d.id, d.start_ts, d.amount)
    counter.seed(5, T0, ledger)
    assert counter.value == 6
    for d in second:
        ledger.confirmed(d.kind, d.id, d.start_ts, d.amount)
    counter.seed(6, T0, ledger)
    assert counter.value == 6
    assert ledger.unconfirmed == {}


# -- deltas: each charge goes to the store under the window it was made in -------------------


def test_charges_of_the_current_window_carry_its_end_and_a_flush_takes_them_once(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    budget = window(engine.registry, "budget", "b")
    tokens = window(engine.registry, "token", "r", duration="1d")
    budget.add(5, ledger)
    tokens.add(40, ledger)
    assert sorted(take(engine)) == [
        ("budget", "b", at(T0), at(T0 + HOUR), 5),
        ("token", "r", at(T0), at(T0 + DAY), 40),
    ]
    assert engine.pending_deltas == 0
    assert take(engine) == []
    budget.add(3, ledger)
    assert take(engine) == [("budget", "b", at(T0), at(T0 + HOUR), 3)]
    assert (budget.value, tokens.value) == (8, 40)


def test_a_window_rolls_exactly_at_its_end_and_its_charges_end_where_the_next_begins(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    counter = window(engine.registry, "request", "r")
    counter.add(5, ledger)
    ensure_current([counter], T0 + HOUR - 0.001, ledger)
    assert (counter.value, counter.start) == (5, T0)
    ensure_current([counter], T0 + HOUR, ledger)
    assert (counter.value, counter.start, counter.end) == (0, T0 + HOUR, T0 + 2 * HOUR)
    assert take(engine) == [("request", "r", at(T0), at(T0 + HOUR), 5)]
    assert take(engine) == []
    counter.add(3, ledger)
    assert take(engine) == [("request", "r", at(T0 + HOUR), at(T0 + 2 * HOUR), 3)]


async def test_the_store_holds_each_window_s_charges_in_that_window(
    engine: BudgetEngine, clock: Clock
) -> None:
    budget_id = budget_row(engine.store, duration="1h")
    scope = budget_scope(engine, budget_id, duration="1h")
    spend(engine, scope, cost=5)
    clock.now = T0 + HOUR + MINUTE
    spend(engine, scope, cost=3)
    assert await engine.flush()
    assert stored_budget(engine.store, budget_id) == (3, at(T0 + HOUR))


def test_a_budget_that_never_resets_keeps_its_spend_forever(engine: BudgetEngine) -> None:
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", duration=None, usage=40)
    counter.add(2, ledger)
    ensure_current([counter], T0 + 3650 * DAY, ledger)
    assert (counter.value, counter.start) == (42, T0)
    assert take(engine) == [("budget", "b", at(T0), END_OF_TIME, 2)]


# -- a newer window from another instance, a reset, a changed limit ----------------------------


def test_a_newer_anchor_from_the_store_moves_the_window_on_and_seals_the_old_one(
    engine: BudgetEngine,
) -> None:
    """Another instance rolled the window: the key read again carries the store's newer last
    reset; what was counted here belongs to the window that ended, and leaks nothing into the
    next."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 50 * MINUTE)
    counter.add(5, ledger)
    again = window(engine.registry, "budget", "b", anchor=T0 + HOUR, now=T0 + 70 * MINUTE)
    assert again is counter
    assert (counter.value, counter.start, counter.end) == (0, T0 + HOUR, T0 + 2 * HOUR)
    assert take(engine) == [("budget", "b", at(T0), at(T0 + HOUR), 5)]


def test_an_older_anchor_never_moves_the_window_back() -> None:
    registry = CounterRegistry()
    counter = window(registry, "budget", "b", anchor=T0 + 20 * MINUTE, now=T0 + 30 * MINUTE)
    counter.add(5, registry.ledger)
    window(registry, "budget", "b", anchor=T0, now=T0 + 40 * MINUTE)  # a stale read
    assert (counter.value, counter.start, counter.end) == (5, T0 + 20 * MINUTE, T0 + 80 * MINUTE)
    window(registry, "budget", "b", duration="2h", anchor=T0, now=T0 + 40 * MINUTE)
    assert (counter.value, counter.start, counter.end) == (5, T0 + 20 * MINUTE, T0 + 140 * MINUTE)


def test_a_reset_seals_the_old_window_s_unwritten_charges_at_its_moment_and_starts_anew(
    engine: BudgetEngine,
) -> None:
    """The old window's unwritten charge goes to the store as that window's, ending at the
    reset: the store drops it once it holds the reset (adds it to the old window before). The
    new window goes too, as a delta of nothing: it starts the window in a store whose own reset
    failed."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 10 * MINUTE)
    counter.add(5, ledger)
    counter.reset(T0 + 20 * MINUTE, ledger)
    assert (counter.value, counter.start, counter.end) == (0, T0 + 20 * MINUTE, T0 + 80 * MINUTE)
    assert take(engine) == [
        ("budget", "b", at(T0), at(T0 + 20 * MINUTE), 5),
        ("budget", "b", at(T0 + 20 * MINUTE), END_OF_TIME, 0),
    ]
    counter.seed(40, T0 + 20 * MINUTE, ledger)
    assert counter.value == 40
    counter.add(2, ledger)
    assert take(engine) == [("budget", "b", at(T0 + 20 * MINUTE), at(T0 + 80 * MINUTE), 2)]


def test_a_reset_elsewhere_keeps_what_this_instance_has_not_written_in_the_new_window(
    engine: BudgetEngine,
) -> None:
    """Another instance reset the budget at T0 + 20 min; this one learns it at its next read,
    holding $5 it has not written (charged before or after the reset: it cannot tell). It
    counts in the new window, whether the flush comes first or another charge does (that
    charge sealed it as a window ending at the reset, which the store drops: the $5 was lost,
    and the budget's limit with it)."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 10 * MINUTE)
    counter.add(5, ledger)
    window(engine.registry, "budget", "b", anchor=T0 + 20 * MINUTE, now=T0 + 30 * MINUTE)
    assert (counter.start, counter.end) == (T0 + 20 * MINUTE, T0 + 80 * MINUTE)
    counter.add(2, ledger)
    assert take(engine) == [("budget", "b", at(T0 + 20 * MINUTE), at(T0 + 80 * MINUTE), 7)]
    assert counter.value == 7


def test_a_reset_elsewhere_leaves_the_old_window_s_written_usage_behind(
    engine: BudgetEngine,
) -> None:
    """$30 written in the window, $5 charged here since the last flush, then a reset made by
    another instance at T0 + 20 min, where $4 has been spent since. The counter kept the old
    window's $30 in the new one (a threshold of the new window was raised at $35, and told it)
    until the next re-read. Learnt with the key's reload it holds $4 and the $5 (the usage read
    with the key is the new window's); from Redis's mark, the $5 (Redis's key tells the rest)."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 10 * MINUTE, usage=30)
    counter.add(5, ledger)
    window(engine.registry, "budget", "b", anchor=T0 + 20 * MINUTE, now=T0 + 30 * MINUTE, usage=4)
    reloaded = counter.value
    marked = window(engine.registry, "budget", "m", now=T0 + 10 * MINUTE, usage=30)
    marked.add(5, ledger)
    marked.move_to(T0 + 20 * MINUTE, T0 + 30 * MINUTE, ledger)
    print(f"$30 written and $5 unwritten, reset elsewhere ($4 since): {reloaded} with the key, "
          f"{marked.value} from the mark")  # fmt: skip
    assert (reloaded, marked.value) == (9, 5)


def test_a_reset_learnt_from_redis_moves_the_window_there_with_what_is_unwritten(
    engine: BudgetEngine,
) -> None:
    """`move_to`: a reset another instance made at T0 + 20 min, found in Redis (its mark) at
    T0 + 30 min: the window starts there, keeps its terms, and what this instance has not
    written counts in it (as when the store tells the reset)."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 10 * MINUTE)
    limit, duration = counter.limit, counter.duration
    counter.add(5, ledger)
    counter.move_to(T0 + 20 * MINUTE, T0 + 30 * MINUTE, ledger)
    assert (counter.start, counter.end) == (T0 + 20 * MINUTE, T0 + 80 * MINUTE)
    assert (counter.limit, counter.duration, counter.anchor) == (limit, duration, T0 + 20 * MINUTE)
    counter.move_to(T0 + 20 * MINUTE, T0 + 40 * MINUTE, ledger)  # the same mark again: no move
    assert counter.start == T0 + 20 * MINUTE
    assert take(engine) == [("budget", "b", at(T0 + 20 * MINUTE), at(T0 + 80 * MINUTE), 5)]


def test_the_backend_is_told_of_a_reset_elsewhere_before_the_window_moves(
    engine: BudgetEngine,
) -> None:
    """`Ledger.before_reset_elsewhere` (Redis's backend keeps there what its key holds of the
    old window) is called once a newer anchor falls inside the window, and for nothing else:
    an anchor at the window's start or end, a later window, or changed terms that put it at a
    start of theirs. Changed terms read with an anchor that they cannot have put there (not one
    of their windows' starts) come with a reset elsewhere, which is told."""
    ledger = engine.registry.ledger
    told: list[tuple[str, float]] = []
    ledger.before_reset_elsewhere = lambda counter, at: told.append((counter.id, at))
    try:
        for n, anchor in enumerate((T0, T0 + 60 * MINUTE, T0 + 90 * MINUTE)):
            # each counter's window [T0, T0 + 1h): an anchor at its start, its end, past it
            window(engine.registry, "budget", f"b{n}", now=T0 + 10 * MINUTE)
            window(engine.registry, "budget", f"b{n}", anchor=anchor, now=T0 + 10 * MINUTE)
        assert told == []
        window(engine.registry, "budget", "c", duration="1d", now=T0 + 150 * MINUTE)
        window(engine.registry, "budget", "c", anchor=T0 + 120 * MINUTE,
               now=T0 + 150 * MINUTE)  # fmt: skip
        assert told == []  # new terms (1d -> 1h): their window holding now, the usage carried
        window(engine.registry, "budget", "d", now=T0 + 10 * MINUTE)
        window(engine.registry, "budget", "d", anchor=T0 + 20 * MINUTE, now=T0 + 30 * MINUTE)
        window(engine.registry, "budget", "c2", duration="1d", now=T0 + 150 * MINUTE)
        window(engine.registry, "budget", "c2", anchor=T0 + 125 * MINUTE,
               now=T0 + 150 * MINUTE)  # fmt: skip
        assert told == [("d", T0 + 20 * MINUTE), ("c2", T0 + 125 * MINUTE)]
        told.remove(("c2", T0 + 125 * MINUTE))
        # The same reset learnt from Redis's mark (`move_to`); new terms elsewhere are not one.
        moved = window(engine.registry, "budget", "e", now=T0 + 10 * MINUTE)
        moved.move_to(T0 + 25 * MINUTE, T0 + 30 * MINUTE, ledger)
        carried = window(engine.registry, "budget", "f", now=T0 + 10 * MINUTE)
        carried.move_to(T0 + 25 * MINUTE, T0 + 30 * MINUTE, ledger, carried=True)
        assert told == [("d", T0 + 20 * MINUTE), ("e", T0 + 25 * MINUTE)]
    finally:
        ledger.before_reset_elsewhere = None


def test_changing_a_limit_s_duration_keeps_its_usage_while_the_windows_overlap(
    engine: BudgetEngine,
) -> None:
    """1h -> 1d: the day's window holds the hour's, and so does the store (`_new_terms`): the
    charge pending for the hour goes with it, to the day's window. (Kept on the hour's start, a
    charge after it sealed it with the new window's start as its end, and the store, which had
    moved its window there, dropped it: a fault hunt's, 1d -> 1h.)"""
    ledger = engine.registry.ledger
    now = T0 + 150 * MINUTE
    counter = window(engine.registry, "budget", "b", now=now)  # [T0 + 2h, T0 + 3h)
    counter.add(5, ledger)
    window(engine.registry, "budget", "b", duration="1d", limit=2 * 10**12, now=now)
    assert (counter.value, counter.limit, counter.start, counter.end) == (
        5,
        2 * 10**12,
        T0,
        T0 + DAY,
    )
    assert ledger.sealed == []
    assert take(engine) == [("budget", "b", at(T0), at(T0 + DAY), 5)]


def test_a_charge_after_a_duration_change_counts_in_the_new_window_with_the_old_one_s(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    now = T0 + 150 * MINUTE
    counter = window(engine.registry, "budget", "b", now=now)  # [T0 + 2h, T0 + 3h)
    counter.add(5, ledger)
    window(engine.registry, "budget", "b", duration="1d", now=now)  # [T0, T0 + 1d)
    counter.add(3, ledger)
    assert counter.value == 8
    assert take(engine) == [("budget", "b", at(T0), at(T0 + DAY), 8)]


def test_a_charge_pending_goes_with_its_window_through_two_changes(
    engine: BudgetEngine,
) -> None:
    """1h -> 1d -> 1h: what is pending follows the counter's window each time. (The store
    moves `last_reset` to the new terms' window that holds the change: the day's is T0, the
    hour's T0 + 2h.)"""
    ledger = engine.registry.ledger
    now = T0 + 150 * MINUTE
    counter = window(engine.registry, "budget", "b", now=now)
    counter.add(5, ledger)
    window(engine.registry, "budget", "b", duration="1d", now=now)
    counter.add(3, ledger)
    window(engine.registry, "budget", "b", duration="1h", anchor=T0 + 2 * HOUR, now=now)
    assert (counter.value, counter.start) == (8, T0 + 2 * HOUR)
    assert take(engine) == [("budget", "b", at(T0 + 2 * HOUR), at(T0 + 3 * HOUR), 8)]


def test_minutes_the_old_terms_rolled_through_count_in_the_day_that_lengthened_them(
    engine: BudgetEngine,
) -> None:
    """1m -> 1d from the same start (the store keeps `last_reset` T0), read only after the old
    terms rolled the counter through two minutes (requests settled past each minute's end):
    the day holds all three minutes' charges, counted and written there as one delta. (The
    new terms carried back only the last minute's: 4 counted of 7, the others left sealed, the
    second minute's written as a window the store began anew, the first's dropped.)"""
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", duration="1m", now=T0 + 10)
    charge((counter,), 1, T0 + 10, ledger)
    charge((counter,), 2, T0 + MINUTE + 1, ledger)
    charge((counter,), 4, T0 + 2 * MINUTE + 1, ledger)
    window(engine.registry, "budget", "b", duration="1d", now=T0 + 2 * MINUTE + 5)
    print(f"{counter.value} counted in [T0, T0 + 1d); sealed {ledger.sealed}")
    assert (counter.value, counter.start, counter.end) == (7, T0, T0 + DAY)
    assert take(engine) == [("budget", "b", at(T0), at(T0 + DAY), 7)]


def test_a_new_duration_whose_window_starts_after_the_old_one_ended_starts_from_zero(
    engine: BudgetEngine,
) -> None:
    ledger = engine.registry.ledger
    counter = window(engine.registry, "budget", "b", now=T0 + 50 * MINUTE)  # [T0, T0 + 1h)
    counter.add(5, ledger)
    # no request since: the counter still holds the ended hour when the limit becomes 2h
    window(engine.registry, "budget", "b", duration="2h", now=T0 + 130 * MINUTE)
    assert (counter.value, counter.start, counter.end) == (0, T0 + 2 * HOUR, T0 + 4 * HOUR)
    assert take(engine) == [("budget", "b", at(T0), at(T0 + 2 * HOUR), 5)]


@pytest.mark.parametrize("kind", ["budget", "request", "token"])
def test_new_terms_read_after_their_window_of_the_change_ended_start_from_zero(
    engine: BudgetEngine, kind: str
) -> None:
    """1h -> 2m, changed at T0 + 31 s (the store keeps `last_reset` T0: the new terms' window
    of the change begins there) and read at T0 + 3 min: what was counted was the window
    [T0, T0 + 2m)'s, which has ended; the window now, [T0 + 2m, T0 + 4m), holds none of it (it
    was kept as this window's: a key refused for two minutes by what the ended one held)."""
    ledger = engine.registry.ledger
    counter = window(engine.registry, kind, "b", now=T0 + 30)
    counter.add(5, ledger)
    window(engine.registry, kind, "b", duration="2m", now=T0 + 3 * MINUTE)
    print(f"{kind}: {counter.value} counted in [T0 + 2m, T0 + 4m)")
    assert (counter.value, counter.start, counter.end) == (0, T0 + 2 * MINUTE, T0 + 4 * MINUTE)
    assert take(engine) == [(kind, "b", at(T0), at(T0 + 2 * MINUTE), 5)]


# -- what the answers show, the backend in process -------------------------------------------


def test_headers_show_budget_limits_in_dollars_and_counts_as_integers() -> None:
    registry = CounterRegistry()
    budget = window(registry, "budget", "b", limit=10**15)  # $1,000,000
    requests = window(registry, "request", "r", limit=7)
    assert (budget.limit_text, requests.limit) == (b"1000000.000000", 7)
    requests.add(4, registry.ledger)
    assert requests.remaining == 3
    requests.add(5, registry.ledger)
    assert requests.remaining == 0


def test_equal_limits_and_window_bounds_share_one_object_in_bounded_tables() -> None:
    table: LRUCache[float, float] = LRUCache(3)
    first = float("1.5")
    assert shared(table, first) is first
    shared(table, 2.5)
    assert shared(table, float("1.5")) is first
    for n in range(10):
        shared(table, float(n))
        assert len(table) <= 3
    registry = CounterRegistry()
    for n in range(10_002):
        window(registry, "request", f"r{n}", limit=n + 1, anchor=T0 + n, now=T0 + n)
        window(registry, "budget", f"b{n}", limit=n + 1, anchor=T0 + n, now=T0 + n)
        assert len(limits_module._COUNTS) <= 10_000
        assert len(limits_module._LIMITS) <= 10_000
        assert len(limits_module._FLOATS) <= 10_000
    one = window(registry, "token", "a", limit=10**9 + 1)
    window(registry, "token", "b", limit=10**9 + 2)
    other = window(registry, "token", "c", limit=10**9 + 1)
    assert one.limit is other.limit
    first = window(registry, "budget", "x", limit=10**9 + 1)
    second = window(registry, "budget", "y", limit=10**9 + 1)
    assert first.limit_text is second.limit_text and first.limit_text == b"1.000000001"


def test_a_forked_child_keeps_what_is_spent_and_nothing_the_parent_holds() -> None:
    """gunicorn `--preload`: the child's counters keep their values; what the parent has to
    write, holds in reservations and has in flight is the parent's."""
    registry = CounterRegistry()
    ledger = registry.ledger
    budget = window(registry, "budget", "b")
    hourly = window(registry, "request", "r")
    budget.add(7, ledger)
    hourly.add(2, ledger)
    budget.reserved = 5
    slots = registry.slots("r", 3)
    slots.in_flight = 2
    ledger.sealed.append(("budget", "b", T0 - HOUR, 4))
    ledger.taken("budget", "b", T0, 3)
    registry.forget_the_parent_s()
    assert (budget.value, hourly.value) == (7, 2)
    assert (budget.pending, hourly.pending, budget.reserved, slots.in_flight) == (0, 0, 0, 0)
    assert (ledger.dirty, ledger.sealed, ledger.unconfirmed) == (set(), [], {})


def test_only_a_budget_is_calendar_aligned() -> None:
    """A rate window has no calendar alignment (nothing in the store gives it one): asking for
    one fails loudly instead of being dropped."""
    registry = CounterRegistry()
    aligned = window(
        registry, "budget", "b", duration="1d", calendar_aligned=True, anchor=T0 - 3 * DAY
    )
    assert aligned.calendar_aligned is True and aligned.start % 86_400 == 0
    # Started midway (reset then, or made then): from there, as every instance reads it.
    midway = window(registry, "budget", "m", duration="1d", calendar_aligned=True, anchor=T0)
    assert (midway.start, midway.end % 86_400) == (T0, 0)
    rate = window(registry, "request", "r", duration="1d")
    assert rate.calendar_aligned is False
    with pytest.raises(ValueError, match="a request window is never calendar-aligned"):
        window(registry, "request", "r2", duration="1d", calendar_aligned=True)


async def test_memory_counters_admit_and_settle_in_process(engine: BudgetEngine) -> None:
    budget_id = budget_row(engine.store)
    scope = budget_scope(engine, budget_id)
    ticket = await engine.counters.admit(LimitSet((scope,)), 0)
    assert isinstance(ticket, Ticket)
    await engine.counters.settle(ticket, 7, 0)
    assert scope.budgets[0].value == 7
    assert await engine.counters.health() == "disabled"


async def test_with_redis_a_window_the_store_cannot_seed_fails_closed_and_marks_the_store_down(
    sqlite_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window key Redis does not hold is seeded from the store: when the store cannot be read,
    the request is not admitted on a guess, and the engine knows the store is unreachable."""
    need_redis()
    settings = BudgetSettings(
        database_url=sqlite_url,
        admin_key="admin-secret",
        redis_url=REDIS_URL,
        redis_timeout_seconds=10,
    )
    engine = BudgetEngine(settings, clock=clock)
    prefix = unique_prefix()
    use_prefix(engine, prefix)
    await engine.ensure_started()
    try:
        scope = budget_scope(engine, budget_row(engine.store))

        def unreachable(*args: object) -> None:
            raise OperationalError("SELECT", None, ConnectionRefusedError())

        monkeypatch.setattr(engine.store, "read_counters", unreachable)
        with pytest.raises(ServiceUnavailable):
            await engine.admit(LimitSet((scope,)), 0)
        assert not engine.store_ok
    finally:
        await engine.shutdown()
        delete_prefix(REDIS_URL, prefix)


async def test_a_late_charge_of_an_old_window_never_lands_in_a_window_reset_since(
    make_engine: Callable[[], BudgetEngine], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counter rolled on twice before a flush could write the first hour's charge; another
    instance reset the budget meanwhile: the late charge ends with its own hour, not later."""
    engine = make_engine()
    budget_id = budget_row(engine.store, duration="1h")
    scope = budget_scope(engine, budget_id, duration="1h")

    def refuse(*args: object) -> None:
        raise OperationalError("INSERT", None, ConnectionRefusedError())

    with monkeypatch.context() as outage:
        outage.setattr(engine.store, "apply_flush", refuse)
        outage.setattr(engine.store, "writable", lambda: False)
        clock.now = T0 + 40 * MINUTE
        spend(engine, scope, cost=1)
        assert not await engine.flush()  # taken, and kept for later
        clock.now = T0 + 50 * MINUTE
        spend(engine, scope, cost=5)
        clock.now = T0 + 65 * MINUTE
        spend(engine, scope, cost=0)  # the second hour: the first hour's $5 is sealed
        clock.now = T0 + 125 * MINUTE
        spend(engine, scope, cost=0)  # the third hour
    reset_at = T0 + 115 * MINUTE  # another instance reset the budget
    with engine.store.session() as s:
        s.execute(
            update(BudgetRow)
            .where(col(BudgetRow.id) == budget_id)
            .values(current_usage_nanos=0, last_reset=at(reset_at))
        )
        s.commit()
    assert await engine.flush()
    assert stored_budget(engine.store, budget_id) == (0, at(reset_at))


def test_the_ledger_counts_what_flushes_took_until_the_store_confirms_each_part() -> None:
    ledger = CounterRegistry().ledger
    ledger.taken("budget", "b", T0, 5)
    ledger.taken("budget", "b", T0, 7)
    ledger.taken("token", "b", T0, 1)
    assert ledger.unconfirmed == {("budget", "b", T0): 12, ("token", "b", T0): 1}
    ledger.confirmed("budget", "b", T0, 5)
    assert ledger.unconfirmed == {("budget", "b", T0): 7, ("token", "b", T0): 1}
    ledger.confirmed("budget", "b", T0, 7)  # all of it: nothing is left under that key
    assert ledger.unconfirmed == {("token", "b", T0): 1}
    ledger.confirmed("token", "b", T0, 3)  # more than was taken
    ledger.confirmed("request", "x", T0, 3)  # never taken
    assert ledger.unconfirmed == {}


def test_what_is_left_of_a_limit_is_never_negative() -> None:
    registry = CounterRegistry()
    counter = window(registry, "request", "r", limit=3)
    assert counter.remaining == 3
    counter.add(2, registry.ledger)
    assert counter.remaining == 1
    counter.add(5, registry.ledger)
    assert counter.remaining == 0
    assert registry.counter("request", "r") is counter
    assert registry.counter("request", "other") is None
    assert registry.counter("token", "r") is None


def test_concurrency_slots_are_kept_by_id_with_their_latest_limit() -> None:
    registry = CounterRegistry()
    slots = registry.slots("r", 2)
    slots.in_flight = 1
    again = registry.slots("r", 5)
    assert again is slots
    assert (again.limit, again.in_flight) == (5, 1)
    assert registry.slots("r", None).limit is None
    assert registry.slots("other", 1) is not slots


def test_only_counters_whose_window_has_ended_are_rolled() -> None:
    registry = CounterRegistry()
    ledger = registry.ledger
    hourly = window(registry, "request", "h", duration="1h")
    daily = window(registry, "request", "d", duration="1d")
    hourly.add(3, ledger)
    daily.add(4, ledger)
    idle = window(registry, "request", "idle", duration="1h")  # nothing charged in its window
    ensure_current([hourly, daily, idle], T0 + HOUR, ledger)
    assert (hourly.start, hourly.value) == (T0 + HOUR, 0)
    assert (daily.start, daily.value) == (T0, 4)
    assert idle.start == T0 + HOUR
    assert ledger.sealed == [("request", "h", T0, 3)]  # an idle window ends with nothing to write


def test_a_new_counter_starts_empty_with_no_limit_and_no_window() -> None:
    counter = BudgetWindow("b")
    assert (counter.kind, counter.id, counter.limit, counter.limit_text) == ("budget", "b", 0, b"0")
    assert (counter.duration, counter.calendar_aligned, counter.anchor) == (None, False, 0.0)
    assert (counter.start, counter.end, counter.value, counter.reserved) == (0.0, FAR_FUTURE, 0, 0)
    assert (counter.pending, counter.pending_start, counter.remaining) == (0, 0.0, 0)


def test_charges_to_one_window_stay_pending_together_until_a_flush() -> None:
    registry = CounterRegistry()
    counter = window(registry, "budget", "b")
    counter.add(3, registry.ledger)
    counter.add(4, registry.ledger)
    assert (counter.value, counter.pending, counter.pending_start) == (7, 7, T0)
    assert registry.ledger.sealed == []
    assert registry.ledger.dirty == {counter}


def test_reloading_unchanged_limits_leaves_the_window_and_its_usage_alone() -> None:
    registry = CounterRegistry()
    counter = window(registry, "request", "r", duration="1h")
    counter.add(5, registry.ledger)
    again = window(registry, "request", "r", duration="1h", now=T0 + 2 * HOUR)
    assert again is counter
    assert (counter.start, counter.value, counter.pending) == (T0, 5, 5)
    assert registry.ledger.sealed == []  # the window rolls when it is next used, not on a reload


def test_the_backend_is_told_of_each_charge_the_store_confirmed() -> None:
    """`Ledger.after_confirmed` (Redis's backend: what a seed read before may have missed)."""
    ledger = CounterRegistry().ledger
    told: list[tuple[str, str, float, int]] = []
    ledger.after_confirmed = lambda *charge: told.append(charge)
    ledger.taken("budget", "b", T0, 5)
    ledger.confirmed("budget", "b", T0, 5)
    ledger.confirmed("token", "t", T0, 2)
    assert told == [("budget", "b", T0, 5), ("token", "t", T0, 2)]


def test_what_an_engine_leaves_to_others_no_longer_counts_beside_the_store() -> None:
    """An engine that stops with flushes unconfirmed (spilled to disk, anyone's to write) counts
    them no more: a seed then reads the store's 10 nano-dollars alone, not 15."""
    registry = CounterRegistry()
    ledger = registry.ledger
    counter = window(registry, "budget", "b")
    ledger.taken("budget", "b", T0, 5)
    counter.seed(10, T0, ledger)
    assert counter.value == 15
    ledger.left_to_others()
    counter.seed(10, T0, ledger)
    print(f"seeded after leaving the unconfirmed 5 to others: {counter.value} n$")
    assert counter.value == 10


@pytest.mark.parametrize("back", [0.0, 5.0, -0.0005])
def test_a_reset_on_a_clock_at_or_before_the_window_s_start_starts_a_millisecond_after(
    back: float,
) -> None:
    """A clock stepped back (NTP) to the window's start, or 5 s before it, or a reset within
    the millisecond the window began: the new window starts a millisecond after the current
    one's start (Redis keys a window by the millisecond of its start: in the same one, the new
    window was the old one's key), and reset returns that moment."""
    registry = CounterRegistry()
    counter = window(registry, "budget", "b", now=T0 + 10 * MINUTE)
    started = counter.reset(T0 - back, registry.ledger)
    print(f"reset at start - {back} s: the new window starts at {at(started)}")
    assert at(started) == at(T0) + timedelta(milliseconds=1)
    assert (counter.start, counter.anchor, counter.value) == (started, started, 0)


@pytest.mark.parametrize("after", [0.002, 0.5])
def test_a_reset_past_the_window_s_first_millisecond_starts_where_it_was_made(
    after: float,
) -> None:
    """The millisecond's rule above holds within it alone: a reset made later (2 ms, half a
    second after the window began) starts the new window at that moment, not a millisecond
    after the old start (a bound of a second there passed every other test)."""
    registry = CounterRegistry()
    counter = window(registry, "budget", "b", now=T0 + 10 * MINUTE)
    started = counter.reset(T0 + after, registry.ledger)
    print(f"reset at start + {after} s: the new window starts at {at(started)}")
    assert at(started) == at(T0 + after)
    assert (counter.start, counter.anchor, counter.value) == (started, started, 0)


def test_a_reset_exactly_a_millisecond_after_the_window_began_is_at_that_moment() -> None:
    """`reset_moment` at its bound: a reset a millisecond after the window began (one begun at
    T0 + 1 ms) is at the moment given, as a float, unrounded; a moment before is moved to a
    millisecond after the start, to the microsecond."""
    began = T0 + 0.001
    assert reset_moment(began + 0.001, began) == began + 0.001 == 1795341600.0019999
    moved = reset_moment(began + 0.0009, began)
    print(
        f"a reset at start + 1 ms: {reset_moment(began + 0.001, began)!r}; at + 0.9 ms: {moved!r}"
    )
    assert moved == 1795341600.002
    assert reset_moment(began + 0.5, began) == began + 0.5


def test_confirming_nothing_that_was_never_taken_leaves_nothing() -> None:
    ledger = CounterRegistry().ledger
    ledger.confirmed("budget", "z", T0, 0)
    assert ledger.unconfirmed == {}


def test_the_window_before_is_where_a_reset_elsewhere_would_roll_past() -> None:
    """`Delta.ended_from`: a rolling series' window before (a window reset elsewhere within it
    runs past the next start); the start itself where any older window has ended: the first
    window, a calendar-aligned one (reset midway, it ends at the boundary), one that never ends."""
    registry = CounterRegistry()
    rolling = window(registry, "budget", "rolling", now=T0 + 150 * MINUTE)
    assert rolling.window_before(T0 + 2 * HOUR) == T0 + HOUR
    assert rolling.window_before(T0 + HOUR) == T0
    assert rolling.window_before(T0) == T0
    seconds = window(registry, "request", "seconds", duration="1s", now=T0 + 5.5)
    assert seconds.window_before(T0 + 5) == T0 + 4  # the window just before, however short
    months = window(registry, "budget", "months", duration="1mo", now=T0 + 40 * DAY)
    assert months.window_before(months.start) == T0  # a month back, whatever its length
    daily = window(registry, "budget", "daily", duration="1d", calendar_aligned=True, now=T0 + DAY)
    assert daily.window_before(daily.start) == daily.start
    forever = window(registry, "budget", "forever", duration=None, now=T0 + DAY)
    assert forever.window_before(T0 + DAY) == T0 + DAY


def test_a_deleted_limit_s_counter_is_kept_while_anything_of_it_is_unwritten_or_held() -> None:
    """The counters of limits the store no longer holds are forgotten (a server whose keys come
    and go kept them all for ever), but never while this process has something of them to write
    (pending, sealed, taken by a flush the store has not confirmed) or requests hold them."""
    registry = CounterRegistry()
    ledger = registry.ledger
    pending = window(registry, "budget", "pending")
    pending.add(7, ledger)
    sealed = window(registry, "request", "sealed")
    sealed.add(2, ledger)
    sealed.roll(T0 + HOUR, ledger)  # its window ended: what it counted is sealed
    unconfirmed = window(registry, "budget", "unconfirmed")
    ledger.taken("budget", "unconfirmed", T0, 3)
    reserved = window(registry, "budget", "reserved")
    reserved.reserved = 5
    window(registry, "token", "slots")
    registry.slots("slots", 3).in_flight = 1
    idle = window(registry, "budget", "idle")
    stays = window(registry, "budget", "stays")
    budgets = ["pending", "unconfirmed", "reserved", "idle", "stays"]
    forgotten = registry.forget_deleted(budgets, {"stays"}, ["sealed", "slots"], set())
    print(f"forgotten: {[(c.kind, c.id) for c in forgotten]}")
    assert forgotten == [idle]
    assert registry.counter("budget", "idle") is None
    left = [registry.counter("budget", id_) for id_ in ("pending", "unconfirmed", "reserved")]
    assert left == [pending, unconfirmed, reserved]
    assert registry.counter("budget", "stays") is stays
    assert registry.counter("request", "sealed") is sealed
    assert "slots" in registry.concurrency
    # Written, confirmed and released: forgotten then.
    ledger.dirty.clear()
    pending.pending = 0
    ledger.sealed.clear()
    ledger.confirmed("budget", "unconfirmed", T0, 3)
    reserved.reserved = 0
    registry.concurrency["slots"].in_flight = 0
    forgotten = registry.forget_deleted(budgets, {"stays"}, ["sealed", "slots"], set())
    assert sorted((c.kind, c.id) for c in forgotten) == [
        ("budget", "pending"),
        ("budget", "reserved"),
        ("budget", "unconfirmed"),
        ("request", "sealed"),
        ("token", "slots"),
    ]
    assert list(registry.windows["budget"]) == ["stays"]
    assert (registry.windows["request"], registry.windows["token"]) == ({}, {})
    assert registry.concurrency == {}
    assert idle.value == 0  # (a counter still held elsewhere is left as it was)
