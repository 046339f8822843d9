"""The wall clock stepped back (NTP): windows, resets and the flusher's rounds keep going.

Engines on one SQLite store, on the test's `Clock` stepped back as NTP steps a host's clock. A
request costs exactly $0.01 (10 output tokens at $1000 per million) against a $1 daily budget."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from budget_middleware import BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store
from budget_middleware.store.tables import BudgetRow, RateLimitRow
from support import Clock, FrozenClock, running
from test_redis_windows import (
    BODY,
    CENT,
    MODEL,
    auth,
    client,
    dollar_key,
    host,
    spend,
    spend_until_refused,
    stored_spend,
    written_spend,
)


def priced(tmp_path: Path, **settings: Any) -> BudgetSettings:
    """Settings of a SQLite store in `tmp_path` where a request costs $0.01 (`MODEL`'s 10 output
    tokens at $1000 per million), flushed every 0.05 s unless `settings` say otherwise."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"models": {MODEL: {"input_per_mtok": 0, "output_per_mtok": 1000}}})
    )
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'store.db'}",
        "pricing_file": prices,
        "flush_interval_seconds": 0.05,
        **settings,
    }
    return BudgetSettings(**values)


def engines(tmp_path: Path, clock: Clock, count: int, **settings: Any) -> list[BudgetEngine]:
    values = {"cache_ttl_seconds": 0.2, **settings}
    return [BudgetEngine(priced(tmp_path, **values), clock=clock) for _ in range(count)]


@asynccontextmanager
async def serving(
    tmp_path: Path, clock: Clock, count: int, duration: str = "1d"
) -> AsyncIterator[tuple[list[BudgetEngine], list[httpx.AsyncClient], str, str]]:
    """`count` instances (`engines`) serving the host app, a client of each, and a key with a $1
    budget reset every `duration` (`dollar_key`): its value and its budget's id."""
    instances = engines(tmp_path, clock, count)
    apps = [host(engine) for engine in instances]
    async with AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(running(app))
        clients = [await stack.enter_async_context(client(app)) for app in apps]
        yield instances, clients, *dollar_key(instances[0], duration)


async def after_the_reset(
    engine: BudgetEngine, http: httpx.AsyncClient, key: str, budget_id: str, *others: BudgetEngine
) -> tuple[int, int, str, int]:
    """Once a budget was reset: what the store holds when `engine` has written it; then, the
    live counter having re-read the store, how many requests fit, the code of the refusal that
    ended them, and what the store holds when every engine has written what it holds."""
    await engine.flush()
    stored = stored_spend(engine, budget_id)
    await asyncio.sleep(0.5)  # the live counter re-reads the store
    admitted, code = await spend_until_refused(http, key)
    return stored, admitted, code, await written_spend(budget_id, engine, *others)


async def seen_by(
    engine: BudgetEngine, budget_id: str, spent: int, also: Callable[[], bool] = lambda: True
) -> tuple[int, float]:
    """The engine's live spend of the budget once it reads `spent` there (and `also` holds), or
    after 30 s as it is then; and how long that took. Within a few cache TTLs on a machine that
    keeps up: a fixed wait of five (1 s) fell short when a round of its flusher was slowed by
    1.5 s (a loaded machine), and the bugs these tests catch kept the old value for an hour or
    for ever."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        counter = engine.registry.counter("budget", budget_id)
        assert counter is not None
        waited = loop.time() - started
        if (counter.value == spent and also()) or waited > 30:
            return counter.value, waited
        await asyncio.sleep(0.05)


async def test_a_clock_stepped_back_does_not_stop_reading_the_other_instances(
    tmp_path: Path,
) -> None:
    """Two instances without Redis converge every cache TTL (SPEC §11). After the clock steps
    back an hour, the first still reads what the second spends within a TTL (its flusher
    waited for the clock to come back to where it last read: an hour, while the other
    instance spent the budget twice over)."""
    clock = Clock()
    async with serving(tmp_path, clock, 2) as ((one, two), (a, b), key, budget_id):
        await spend(a, key, 1)
        clock.advance(-3600)  # NTP steps the clock back an hour
        await spend(b, key, 60)
        await two.flush()
        seen, waited = await seen_by(one, budget_id, 61 * CENT)
    print(f"stored ${stored_spend(one, budget_id) / 1e9:.2f}, the first instance sees "
          f"${seen / 1e9:.2f} {waited:.2f} s later")  # fmt: skip
    assert seen == 61 * CENT


async def test_a_reset_after_the_clock_stepped_back_empties_the_window_everywhere(
    tmp_path: Path,
) -> None:
    """A budget reset, $0.40 spent, the clock stepped back 30 s, reset again: the new window
    starts from $0 on the live counter and in the store, and $1 of requests fit in it (the
    store kept its window, which began after the moment of the second reset: it answered $0.40
    spent, and once re-read the live counter had it too, and 60 requests fit)."""
    clock = Clock()
    async with serving(tmp_path, clock, 1) as ((engine,), (http,), key, budget_id):
        engine.manager.reset_budget(budget_id)
        await spend(http, key, 40)
        await engine.flush()
        clock.advance(-30)  # NTP steps the clock back 30 s
        answered = engine.manager.reset_budget(budget_id).current_usage
        stored, admitted, code, spent = await after_the_reset(engine, http, key, budget_id)
    print(f"reset answered ${answered:.2f}, stored ${stored / 1e9:.2f}; then {admitted} "
          f"admitted ({code}), ${spent / 1e9:.2f} stored")  # fmt: skip
    assert (answered, stored) == (0, 0)
    assert (admitted, code, spent) == (100, "budget_exceeded", 100 * CENT)


async def test_a_reset_after_the_clock_stepped_back_across_a_window_does_not_bring_back_its_spend(
    tmp_path: Path,
) -> None:
    """$0.30 spent in an hour's window, $0.40 in the next; the clock steps back 10 minutes into
    the first hour and the budget is reset: the $0.40 spent before the reset stays out of the
    new window (it came back in the store, as a window starting where the live counter's had,
    and the live counter took it again from there)."""
    clock = Clock()
    async with serving(tmp_path, clock, 1, "1h") as ((engine,), (http,), key, budget_id):
        await spend(http, key, 30)
        clock.advance(3600)
        await spend(http, key, 40)
        clock.advance(-600)  # NTP steps the clock back into the first hour
        engine.manager.reset_budget(budget_id)
        stored, admitted, code, spent = await after_the_reset(engine, http, key, budget_id)
    print(f"stored ${stored / 1e9:.2f} after the reset; then {admitted} admitted ({code}), "
          f"${spent / 1e9:.2f} stored")  # fmt: skip
    assert stored == 0
    assert (admitted, code, spent) == (100, "budget_exceeded", 100 * CENT)


async def test_an_instance_under_steady_load_still_reads_what_the_others_spend(
    tmp_path: Path,
) -> None:
    """Instances without Redis converge every cache TTL (SPEC §11), whatever their load. The
    first serves a steady stream (8 requests at a time, without a pause, on a key of its own)
    while the second spends $0.90 of a $1 budget the first also serves: within five TTLs the
    first reads it. Its flusher's round used to write until nothing was pending, which under
    steady load never came: the round never reached its refresh (nor its sweep), and the first
    instance kept the budget at what it had seen itself, admitting what the store said was
    spent."""
    async with serving(tmp_path, Clock(), 2) as ((one, two), (a, b), shared, budget_id):
        await spend(a, shared, 1)  # the first instance holds the budget's counter
        own = one.manager.create_virtual_key(name="load")
        load = asyncio.Event()
        served = 0

        async def steady() -> None:
            nonlocal served
            while not load.is_set():
                await spend(a, own.value or "", 1)
                served += 1

        workers = [asyncio.create_task(steady()) for _ in range(8)]
        try:
            await asyncio.sleep(0.3)  # the load under way
            await spend(b, shared, 90)
            await two.flush()
            seen, waited = await seen_by(one, budget_id, 91 * CENT, lambda: served > 200)
        finally:
            load.set()
            await asyncio.gather(*workers)
        # No load: the rounds write the rest (before shutdown's flush), polled as they go (a
        # fixed 0.5 s fell short when a round's write was slowed by 1.5 s: 820 of 1,391).
        for _ in range(600):
            written = one.manager.usage("virtual_key").total.requests
            if written >= 1 + 90 + served:
                break
            await asyncio.sleep(0.05)
        stored = stored_spend(one, budget_id)
    print(f"{served} requests served meanwhile; the store holds ${stored / 1e9:.2f}, the loaded "
          f"instance sees ${seen / 1e9:.2f} after {waited:.2f} s; {written} records written by "
          f"the rounds")  # fmt: skip
    assert served > 200
    assert seen == 91 * CENT
    assert written == 1 + 90 + served  # what a round left to the next was written, once


async def test_the_reset_a_refusal_names_is_when_the_window_has_ended(tmp_path: Path) -> None:
    """A refusal's message names when its window resets: a client that comes back then is
    admitted. A window that ends midway through a second (a rolling one counts from when its
    budget or rate limit was made) was named at the whole second before its end, where the
    request is still refused."""
    clock = FrozenClock()
    engine = BudgetEngine(priced(tmp_path), clock=clock)
    spender = engine.manager.create_virtual_key(
        name="spender", budgets=[{"max_limit": 0.01, "reset_duration": "1h"}]
    )
    caller = engine.manager.create_virtual_key(
        name="caller", rate_limit={"request_max_limit": 1, "request_reset_duration": "1m"}
    )
    made = int(clock()) - 0.5  # so that the windows end half a second past a whole one
    with engine.store.session() as s:
        budget = s.get(BudgetRow, spender.budgets[0].id)
        limit = s.get(RateLimitRow, caller.rate_limit.id)
        assert budget is not None and limit is not None
        budget.last_reset = limit.request_last_reset = datetime.fromtimestamp(made, UTC)
        s.commit()
    clock.now = made + 1
    app = host(engine)
    async with running(app), client(app) as http:
        for key, refused in ((spender.value, 402), (caller.value, 429)):
            post = functools.partial(http.post, "/v1/chat/completions", json=BODY)
            assert (await post(headers=auth(key))).status_code == 200
            answer = await post(headers=auth(key))
            assert answer.status_code == refused
            message = answer.json()["error"]["message"]
            named = datetime.fromisoformat(message.rsplit("(resets ", 1)[1].rstrip(")"))
            clock.now = named.timestamp()
            again = await post(headers=auth(key))
            print(f"{message!r}: at {named:%H:%M:%S.%f} answered {again.status_code}")
            assert again.status_code == 200


@pytest.mark.parametrize("through", ["an engine", "the store alone"])
async def test_a_reset_behind_the_stored_window_s_start_empties_the_window(
    tmp_path: Path, through: str
) -> None:
    """Another instance's clock 10 s ahead of this one's: it resets a $1 daily budget and
    spends $0.50; the reset made at once through this instance (an engine that has served the
    key once, or the store alone, as the CLI resets), whose now is before that window's start,
    answered $0.50 used and the store kept it: 50 requests fitted after the reset. The new
    window now begins a millisecond after the stored one: $0 answered and stored, 100 fit."""
    clock = Clock()
    async with serving(tmp_path, clock, 2) as ((one, two), (a, b), key, budget_id):
        await spend(a, key, 1)
        await one.flush()
        clock.advance(10)  # the other instance's clock, 10 s ahead
        two.manager.reset_budget(budget_id)
        await spend(b, key, 50)
        await two.flush()
        clock.advance(-10)  # this one's
        if through == "an engine":
            answered = one.manager.reset_budget(budget_id).current_usage
        else:
            alone = BudgetManager(Store(one.settings.database_url), one.settings)
            answered = alone.reset_budget(budget_id).current_usage
            alone.store.dispose()
        stored, admitted, code, spent = await after_the_reset(one, a, key, budget_id, two)
    print(f"through {through}: reset answered ${answered:.2f}, stored ${stored / 1e9:.2f}; "
          f"then {admitted} admitted ({code}), ${spent / 1e9:.2f} stored")  # fmt: skip
    assert (answered, stored) == (0, 0)
    assert (admitted, code, spent) == (100, "budget_exceeded", 100 * CENT)


async def test_a_request_that_settles_after_midnight_is_reported_on_the_day_its_budget_counts_it(
    tmp_path: Path,
) -> None:
    """A calendar-aligned daily budget counts a request in the window it settles in (README:
    a reset, or a window's end, as requests are in flight). A request admitted at 23:59:50 UTC
    and answered at 00:00:10 was counted in the new day's budget ($0.01 spent), but its usage
    record was dated at its admission: `GET /usage?group_by=day` (the CLI's `usage --by day`,
    the dashboard's chart) put the $0.01 on the day before, whose budget never held it, and
    reported $0 for the day whose budget had spent $0.01."""
    from budget_middleware.core.times import rfc3339
    from test_redis_windows import Held

    real = datetime.now(UTC)
    midnight = datetime(real.year, real.month, real.day, tzinfo=UTC).timestamp() + 86400
    clock = FrozenClock()
    clock.now = midnight - 10  # 23:59:50 of the day the budget's window is in
    [engine] = engines(tmp_path, clock, 1)
    key = engine.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 1, "reset_duration": "1d"}], calendar_aligned=True
    )
    held = Held(1)
    app = host(engine, held)
    async with running(app), client(app) as http:
        [request] = held.requests(http, key.value or "")
        await held.all_in.wait()
        clock.now = midnight + 10  # 00:00:10: the next day, and the budget's next window
        held.gate.set()
        assert (await request).status_code == 200
        await engine.flush()
        [budget] = engine.manager.list_budgets(from_memory=True)
        days = engine.manager.usage("day")
        today = engine.manager.usage("day", budget.period_start)
    found = {
        "budget window": (rfc3339(budget.period_start), budget.spent),
        "usage by day": {row.key: row.cost for row in days.usage},
        "usage since the window began": today.total.cost,
    }
    print(found)
    day = rfc3339(budget.period_start)[:10]
    assert found == {
        "budget window": (rfc3339(datetime.fromtimestamp(midnight, UTC)), 0.01),
        "usage by day": {day: 0.01},
        "usage since the window began": 0.01,
    }
