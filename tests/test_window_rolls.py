"""Instances sharing a store without Redis (SPEC §11): a window another instance rolled and spent
in is taken as that window's, whatever this instance last counted in.

Engines on one SQLite store, on the test's `FrozenClock`. A request costs exactly $0.01 (10
output tokens at $1000 per million) against a budget of $0.10 a minute."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import BudgetRow
from conftest import REDIS_URL, need_redis
from support import FrozenClock, running
from test_clock_steps import engines
from test_redis_windows import (
    BODY,
    auth,
    client,
    host,
    instances,
    spend_until_refused,
    written_spend,
)


@pytest.mark.parametrize("reads", ["counters", "key"])
async def test_an_idle_instance_takes_the_next_window_s_spend_another_instance_made(
    tmp_path: Path, reads: str
) -> None:
    """A spends $0.01 in a minute's window; in the next one B spends the whole $0.10 and is
    refused. A, idle since the first window, re-reads the store (its flusher, each cache TTL)
    before its next request: the store's $0.10 of the next window was taken as the spend of
    A's ended window, which A's next request rolled away, and A admitted 10 more requests,
    $0.20 spent in a window of $0.10, where SPEC §11 bounds the overshoot by what the others
    spend in one cache TTL (here nothing: B spent before A re-read).

    The same when A reads the key again (its cache TTL) before its flusher re-reads the counters
    (a flush interval of 5 s here): the key's budget row moved A's window on to the store's,
    with $0 in it instead of the $0.10 read with it; A admitted 10 more."""
    clock = FrozenClock()
    one, two = engines(
        tmp_path, clock, 2, flush_interval_seconds=0.05 if reads == "counters" else 5
    )
    key = one.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 0.1, "reset_duration": "1m"}]
    )
    budget_id = key.budgets[0].id
    begun = float(int(clock()))
    with one.store.session() as s:
        row = s.get(BudgetRow, budget_id)
        assert row is not None
        row.last_reset = datetime.fromtimestamp(begun, UTC)
        s.commit()
    value = key.value or ""
    a_app, b_app = host(one), host(two)
    async with running(a_app), running(b_app), client(a_app) as a, client(b_app) as b:
        clock.now = begun + 10
        first = await a.post("/v1/chat/completions", json=BODY, headers=auth(value))
        assert first.status_code == 200
        await one.flush()
        clock.now = begun + 70  # the next window: [begun + 60, begun + 120)
        by_b, b_code = await spend_until_refused(b, value)
        await two.flush()
        clock.advance(1)  # a cache TTL (0.2 s) on: A's flusher re-reads the store
        counter = one.registry.counter("budget", budget_id)
        assert counter is not None
        if reads == "counters":
            for _ in range(200):
                await asyncio.sleep(0.05)
                if counter.value == 10 * 10_000_000:
                    break
        else:
            await asyncio.sleep(0.3)  # the key's cache entry expires (real time): read again
        reread = counter.value
        by_a, a_code = await spend_until_refused(a, value)
        spent = await written_spend(budget_id, one, two)
    print(
        f"{reads} read again: B admitted {by_b} ({b_code}) in the next window; A re-read "
        f"${reread / 1e9:.2f}, then admitted {by_a} ({a_code}); ${spent / 1e9:.2f} stored "
        "for the window of $0.10"
    )
    assert by_b == 10
    assert by_a == 0
    assert spent == 10 * 10_000_000


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_new_terms_read_after_their_window_ended_carry_nothing_into_the_next(
    tmp_path: Path, counters: str
) -> None:
    """$0.10 an hour, $0.04 spent in its first 31 s; then made $0.03 every 2 minutes (its id
    kept): the spend carries over to the new terms' window that holds the change, [0, 2 min)
    (SPEC §9: changing a limit never resets its usage). No request comes until 3 minutes in,
    in the next window, [2 min, 4 min), where nothing was spent: its $0.03 is all left.
    The live counter took the new terms only then, and kept the $0.04 as the new window's
    (it compared that window with the old terms' hour, not with the new terms' window of the
    change): every request was refused (`$0.0400 spent of $0.0300`) for two minutes, in
    process and on Redis alike."""
    clock = FrozenClock()
    async with contextlib.AsyncExitStack() as stack:
        if counters == "redis":
            need_redis()
            engine, _, _ = await stack.enter_async_context(instances(tmp_path, REDIS_URL, clock))
        else:
            (engine,) = engines(tmp_path, clock, 1)
        told, admitted, code, spent = await _next_window_after_new_terms(engine, clock)
    print(
        f"{counters}: in the next window {admitted} admitted ({code}), the first told "
        f"x-budget-remaining {told}; ${spent / 1e9:.2f} stored for it"
    )
    assert (told, admitted, code) == ("0.030000", 3, "budget_exceeded")
    assert spent == 3 * 10_000_000


async def _next_window_after_new_terms(
    engine: BudgetEngine, clock: FrozenClock
) -> tuple[str | None, int, str, int]:
    """The first test's steps: what the first request in the next window was told, how many
    were admitted there, why the next was refused, and what the store holds for it."""
    key = engine.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 0.1, "reset_duration": "1h"}]
    )
    budget_id = key.budgets[0].id
    begun = clock.now - 31  # the change (at the real time: the store's clock) is 31 s in
    with engine.store.session() as s:
        row = s.get(BudgetRow, budget_id)
        assert row is not None
        row.last_reset = datetime.fromtimestamp(begun, UTC)
        s.commit()
    value = key.value or ""
    app = host(engine)
    async with running(app), client(app) as http:
        for _ in range(4):
            assert (
                await http.post("/v1/chat/completions", json=BODY, headers=auth(value))
            ).status_code == 200
        engine.manager.update_virtual_key(
            key.id, budgets=[{"id": budget_id, "max_limit": 0.03, "reset_duration": "2m"}]
        )
        clock.now = begun + 181  # the next two minutes: [begun + 120, begun + 240)
        first = await http.post("/v1/chat/completions", json=BODY, headers=auth(value))
        told = first.headers.get("x-budget-remaining")
        more, code = await spend_until_refused(http, value)
        if first.status_code != 200:
            more, code = 0, first.json()["error"]["code"]
        admitted = (first.status_code == 200) + more
        spent = await written_spend(budget_id, engine)
    return told, admitted, code, spent


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_a_reset_in_the_millisecond_its_window_began_frees_the_budget(
    tmp_path: Path, counters: str
) -> None:
    """$0.10 a day whose window began at this very moment (the clock stood still: a reset a
    moment ago, or a clock stepped back to its start by NTP), spent. A reset now starts the
    new window a moment after the old one's start (`WindowCounter.reset`): a microsecond
    after, which Redis, keying windows by the millisecond of their start, took as the old
    window: its $0.10 stayed there, and after a reset that answered $0 spent every request
    was still refused (0 of 10 admitted)."""
    clock = FrozenClock()
    async with contextlib.AsyncExitStack() as stack:
        if counters == "redis":
            need_redis()
            engine, _, _ = await stack.enter_async_context(instances(tmp_path, REDIS_URL, clock))
        else:
            (engine,) = engines(tmp_path, clock, 1)
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 0.1, "reset_duration": "1d"}]
        )
        budget_id = key.budgets[0].id
        with engine.store.session() as s:
            row = s.get(BudgetRow, budget_id)
            assert row is not None
            row.last_reset = datetime.fromtimestamp(clock.now, UTC)
            s.commit()
        value = key.value or ""
        app = host(engine)
        async with running(app), client(app) as http:
            before, _ = await spend_until_refused(http, value)
            told = engine.manager.reset_budget(budget_id).current_usage
            after, code = await spend_until_refused(http, value)
    print(
        f"{counters}: {before} admitted, reset (the store tells ${told:.2f} spent), then "
        f"{after} admitted ({code})"
    )
    assert (before, told) == (10, 0)
    assert (after, code) == (10, "budget_exceeded")
