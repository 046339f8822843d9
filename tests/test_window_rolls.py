"""Instances sharing a store without Redis (SPEC §11): a window another instance rolled and spent
in is taken as that window's, whatever this instance last counted in.

Engines on one SQLite store, on the test's `FrozenClock`. A request costs exactly $0.01 (10
output tokens at $1000 per million) against a budget of $0.10 a minute."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from budget_middleware.store.tables import BudgetRow
from support import FrozenClock, running
from test_clock_steps import engines
from test_redis_windows import BODY, auth, client, host, spend_until_refused, written_spend


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
