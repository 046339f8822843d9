"""A window's reset header agrees with when its counter resets (SPEC §6, §8), for a request whose
window rolled while it ran.

One engine on SQLite on the test's `FrozenClock`, a key with a rate limit of 5 requests a
minute; a request costs $0.01 (10 output tokens at $1000 per million)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import RateLimitRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import FrozenClock, running
from test_clock_steps import priced
from test_redis_windows import BODY, Held, auth, client, host


@contextmanager
def rate_limited(
    tmp_path: Path, counters: str, requests: int
) -> Iterator[tuple[BudgetEngine, FrozenClock, str, float]]:
    """An engine on the test's `FrozenClock`, its counters in process or in Redis (under a
    prefix of this test's, deleted after), with a key allowed `requests` a minute: the engine,
    the clock, the key, and when its window began (a whole second: [begun, begun + 60))."""
    clock = FrozenClock()
    redis: dict[str, Any] = {}
    if counters == "Redis":
        need_redis()
        redis = {"redis_url": REDIS_URL}
    engine = BudgetEngine(priced(tmp_path, **redis), clock=clock)
    prefix = unique_prefix()
    if redis:
        use_prefix(engine, prefix)
    key = engine.manager.create_virtual_key(
        name="k", rate_limit={"request_max_limit": requests, "request_reset_duration": "1m"}
    )
    begun = float(int(clock()))
    with engine.store.session() as s:
        row = s.get(RateLimitRow, key.rate_limit.id)
        assert row is not None
        row.request_last_reset = datetime.fromtimestamp(begun, UTC)
        s.commit()
    try:
        yield engine, clock, key.value or "", begun
    finally:
        if redis:
            delete_prefix(REDIS_URL, prefix)


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_the_reset_header_of_a_request_its_window_rolled_under_is_its_window_s(
    tmp_path: Path, counters: str
) -> None:
    """A request admitted 50 s into a one-minute window is answered at 70 s, after another
    request rolled the window: its `x-ratelimit-reset-requests` said 70s, the end of the window
    after its own counted from its admission (a client at 0 left waited a minute past the
    reset). In process the headers are the window admission found, from then: 10s. Admitted by
    Redis they are the local counters as they are at the answer (4 left of the next window):
    50s from then, as the next window's own request is told."""
    held = Held(1)
    with rate_limited(tmp_path, counters, 5) as (engine, clock, key, begun):
        app = host(engine, held)
        async with running(app), client(app) as http:
            clock.now = begun + 50
            (slow,) = held.requests(http, key)
            await asyncio.wait_for(held.all_in.wait(), 10)
            clock.now = begun + 70  # the next window: [begun + 60, begun + 120)
            other = await http.post("/v1/chat/completions", json=BODY, headers=auth(key))
            held.gate.set()
            answer = await slow
    told = answer.headers["x-ratelimit-reset-requests"]
    print(
        f"{counters}: admitted at +50 s, answered at +70 s: reset {told}, remaining "
        f"{answer.headers['x-ratelimit-remaining-requests']}; the request of the next window "
        f"(at +70 s): reset {other.headers['x-ratelimit-reset-requests']}, remaining "
        f"{other.headers['x-ratelimit-remaining-requests']}"
    )
    assert answer.status_code == other.status_code == 200
    assert other.headers["x-ratelimit-reset-requests"] == "50s"
    if counters == "in process":  # as admission found it: its window, from its admission
        assert told == "10s"
    else:  # admitted by Redis: the local counters as they are at the answer, the next window
        assert told == "50s"
    assert answer.headers["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_the_reset_header_after_the_clock_stepped_back_is_when_the_window_ends(
    tmp_path: Path, counters: str
) -> None:
    """Two requests a minute: the first at +70 s (the window [+60 s, +120 s)), then the clock
    steps back 20 s (NTP) and the second, at +50 s, is counted in that same window, its last
    request. Its `x-ratelimit-reset-requests` said 10s (the end of the window before, which
    +50 s is in), where the window it spent resets 70 s later: a client that came back after
    10 s was refused, `Retry-After: 60`. Now 70s, as the refusal of the next request says."""
    with rate_limited(tmp_path, counters, 2) as (engine, clock, key, begun):
        app = host(engine)
        async with running(app), client(app) as http:
            clock.now = begun + 70
            first = await http.post("/v1/chat/completions", json=BODY, headers=auth(key))
            clock.now = begun + 50  # NTP steps the clock back 20 s
            second = await http.post("/v1/chat/completions", json=BODY, headers=auth(key))
            refused = await http.post("/v1/chat/completions", json=BODY, headers=auth(key))
            told = second.headers["x-ratelimit-reset-requests"]
            clock.now = begun + 50 + int(told.rstrip("s"))  # back when the header said
            again = await http.post("/v1/chat/completions", json=BODY, headers=auth(key))
    print(
        f"{counters}: at +70 s reset {first.headers['x-ratelimit-reset-requests']}; the clock "
        f"stepped back to +50 s: reset {told}, remaining "
        f"{second.headers['x-ratelimit-remaining-requests']}; the next refused "
        f"{refused.status_code} Retry-After {refused.headers.get('retry-after')}; back after "
        f"{told}: {again.status_code}"
    )
    assert (first.status_code, second.status_code, refused.status_code) == (200, 200, 429)
    assert first.headers["x-ratelimit-reset-requests"] == "50s"
    assert told == f"{refused.headers['retry-after']}s" == "70s"
    assert again.status_code == 200


async def test_an_answer_s_limit_headers_read_the_clock_only_for_a_window_begun_since(
    tmp_path: Path,
) -> None:
    """The reset header's check for a clock stepped back read the clock at every answer, once
    a request more on the hot path (5 reads a request where 4 were: the decision, its
    preparation, the admission, the settlement), though only a window begun after the
    admission (rolled under the request, or the clock stepped back) needs it. Now 4 again; the
    headers read it for such a window alone (`test_the_reset_header_after_the_clock_stepped_
    back_is_when_the_window_ends`). The usage record's date, when it is charged (the window its
    budgets count it in: `test_a_request_that_settles_after_midnight_is_reported_on_the_day_its_
    budget_counts_it`), is one read more: 5."""

    class Counted(FrozenClock):
        reads = 0

        def __call__(self) -> float:
            self.reads += 1
            return self.now

    clock = Counted()
    settings = priced(
        tmp_path,
        flush_interval_seconds=3600,  # no background round reads the clock meanwhile
        cache_ttl_seconds=3600,
    )
    engine = BudgetEngine(settings, clock=clock)
    key = engine.manager.create_virtual_key(
        name="k",
        rate_limit={"request_max_limit": 100, "request_reset_duration": "1m"},
        budgets=[{"max_limit": 10}],
    )
    clock.to_real_time()  # after the store began the window, by its own clock
    app = host(engine)
    async with running(app), client(app) as http:
        for _ in range(2):  # the key read, its counters made
            await http.post("/v1/chat/completions", json=BODY, headers=auth(key.value or ""))
        before = clock.reads
        answers = [
            await http.post("/v1/chat/completions", json=BODY, headers=auth(key.value or ""))
            for _ in range(10)
        ]
        reads = (clock.reads - before) / 10
    print(
        f"clock reads a request: {reads}; reset {answers[-1].headers['x-ratelimit-reset-requests']}"
    )
    assert all(a.status_code == 200 for a in answers)
    assert answers[-1].headers["x-ratelimit-reset-requests"] == "60s"
    assert reads == 5  # the decision, its preparation, the admission, the record, the settlement
