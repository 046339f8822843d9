"""The wall clock stepped back (NTP): windows, resets and the flusher's rounds keep going.

Engines on one SQLite store, on the test's `Clock` stepped back as NTP steps a host's clock. A
request costs exactly $0.01 (10 output tokens at $1000 per million) against a $1 daily budget."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from budget_middleware import BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from support import Clock, running
from test_redis_windows import (
    CENT,
    MODEL,
    client,
    host,
    spend,
    stored_spend,
)


def engines(tmp_path: Path, clock: Clock, count: int, **settings: Any) -> list[BudgetEngine]:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"models": {MODEL: {"input_per_mtok": 0, "output_per_mtok": 1000}}})
    )
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'store.db'}",
        "pricing_file": prices,
        "flush_interval_seconds": 0.05,
        "cache_ttl_seconds": 0.2,
        **settings,
    }
    return [BudgetEngine(BudgetSettings(**values), clock=clock) for _ in range(count)]


async def test_a_clock_stepped_back_does_not_stop_reading_the_other_instances(
    tmp_path: Path,
) -> None:
    """Two instances without Redis converge every cache TTL (SPEC §11). After the clock steps
    back an hour, the first still reads what the second spends within a TTL (its flusher
    waited for the clock to come back to where it last read: an hour, while the other
    instance spent the budget twice over)."""
    clock = Clock()
    one, two = engines(tmp_path, clock, 2)
    one_app, two_app = host(one), host(two)
    async with running(one_app), running(two_app), client(one_app) as a, client(two_app) as b:
        key = one.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        budget_id = key.budgets[0].id
        await spend(a, key.value or "", 1)
        clock.advance(-3600)  # NTP steps the clock back an hour
        await spend(b, key.value or "", 60)
        await two.flush()
        await asyncio.sleep(1)  # five cache TTLs
        counter = one.registry.counter("budget", budget_id)
        assert counter is not None
        seen = counter.value
    print(f"stored ${stored_spend(one, budget_id) / 1e9:.2f}, the first instance sees "
          f"${seen / 1e9:.2f} a second later")  # fmt: skip
    assert seen == 61 * CENT
