"""A server that runs for weeks: what the engine keeps in memory per limit is bounded by what the
store holds, however many keys come and go (one a user, one a job)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis

from budget_middleware import BudgetSettings, create_admin_app
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import BudgetRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat, client, engine_of, host_app, running, until

Settings = Callable[..., BudgetSettings]


def kept(engine: BudgetEngine) -> dict[str, int]:
    """What the engine keeps per budget and rate limit: its live counters and its alerts'."""
    windows, alerts = engine.registry.windows, engine.alerts
    return {
        "budgets": len(windows["budget"]),
        "request_windows": len(windows["request"]),
        "slots": len(engine.registry.concurrency),
        "alert_owners": len(alerts.owners),
        "alert_thresholds": len(alerts.thresholds),
        "alerts_raised": len(alerts._raised),
        "alerts_exhausted": len(alerts._exhausted),
    }


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_the_counters_of_deleted_keys_are_not_kept_for_ever(
    make_settings: Settings, counters: str
) -> None:
    """Keys made, used until their budget refuses, and deleted, round after round, here and by
    another instance: the counters of their budgets and rate limits, and what the alerts keep of
    them, go once the store no longer holds them. Kept, each deleted key left 2.6 KB behind
    (its counters, its owner's scope, its alerts' state) for the life of the process, and its
    counters were read from the store again every cache TTL. The team's budget, still stored,
    keeps its counter and every charge of it."""
    redis = {}
    if counters == "redis":
        need_redis()
        redis = {"redis_url": REDIS_URL}
    settings = make_settings(cache_ttl_seconds=0.2, **redis)
    app = host_app(settings)
    engine = engine_of(app)
    prefix = unique_prefix()
    if redis:
        use_prefix(engine, prefix)
    elsewhere = BudgetEngine(make_settings(cache_ttl_seconds=0.3))  # another instance's API
    per_round, rounds = 20, 3
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(name="research", budgets=[{"max_limit": 100.0}])
        team_budget = team.budgets[0].id
        sizes: list[dict[str, int]] = []
        for n in range(rounds):
            keys = [
                m.create_virtual_key(
                    name=f"job-{n}-{i}",
                    team_id=team.id,
                    budgets=[
                        {"max_limit": 0.00002, "alert_thresholds": [0.5]}  # for good
                    ],
                    rate_limit={
                        "request_max_limit": 100,
                        "request_reset_duration": "1m",
                        "max_concurrent_requests": 5,
                    },
                )
                for i in range(per_round)
            ]
            statuses = []
            for key in keys:
                auth = {"authorization": f"Bearer {key.value}"}
                for _ in range(2):  # the second is refused: the key's budget is spent
                    answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
                    statuses.append(answer.status_code)
            assert sorted(set(statuses)) == [200, 402], statuses
            sizes.append(kept(engine))
            for i, key in enumerate(keys):  # half deleted here, half by another instance
                (m if i % 2 else elsewhere.manager).delete_virtual_key(key.id)
            # The flusher reads the counters again every cache TTL: those deleted go then, and
            # the alerts' state of them right after the read returns (with Redis, a few awaits
            # later: polled in between, 21 alert owners were left once).
            await until(lambda: kept(engine)["budgets"] == kept(engine)["alert_owners"] == 1)
        left = kept(engine)
        print(f"while the keys lived: {sizes}")
        print(f"after {rounds * per_round} keys were deleted: {left}")
        await engine.flush()
        team_counter = engine.registry.counter("budget", team_budget)
        live = None if team_counter is None else team_counter.value
        if redis:  # what Redis keeps for good: the team budget's window (it never ends)
            r = Redis.from_url(REDIS_URL, decode_responses=True)
            for_good = [k for k in r.scan_iter(match=prefix + "*") if r.pttl(k) == -1]
            r.close()
            print(f"keys Redis keeps for good: {len(for_good)}")
            assert all(team_budget in k for k in for_good), for_good
        with engine.store.session() as s:
            row = s.get(BudgetRow, team_budget)
            stored = None if row is None else row.current_usage_nanos
    elsewhere.store.dispose()
    if redis:
        delete_prefix(REDIS_URL, prefix)
    assert [s["budgets"] for s in sizes] == [1 + per_round] * rounds
    expected: dict[str, Any] = {
        "budgets": 1,  # the team's, still stored
        "request_windows": 0,
        "slots": 0,
        "alert_owners": 1,
        "alert_thresholds": 0,
        "alerts_raised": 1,
        "alerts_exhausted": 0,
    }
    assert left == expected
    # The team's counter was kept, with every charge of the keys that came and went.
    print(f"the team's budget: {live} nano-dollars live, {stored} stored")
    assert live is not None and live > 0 and live == stored


async def test_tags_a_client_makes_up_are_not_kept_with_its_key(make_settings: Settings) -> None:
    """`x-budget-tags` is the client's to set: a request id, a session, a trace id, new on
    every request. The limits a request resolves to are kept with its key, by what decides them:
    a tag that no limit names decides nothing, and kept by it, each such request added an entry
    (5 KB with 32 tags of 100 characters) up to 512 a key: 2.5 MB a key, for as long as the key
    is remembered (every key seen, up to a million). A tag that has limits still applies."""
    app = host_app(make_settings(cache_ttl_seconds=3600))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_tag("batch", budgets=[{"max_limit": 0}])  # requests tagged `batch` are refused
        key = m.create_virtual_key(name="alice", budgets=[{"max_limit": 10.0}])
        statuses: dict[str, list[int]] = {"batch": [], "other": []}
        for n in range(200):
            made_up = ",".join(f"trace-{n:04d}-{i:02d}-" + "x" * 80 for i in range(31))
            tagged = n % 2 == 0
            headers = {
                "authorization": f"Bearer {key.value}",
                "x-budget-tags": made_up + (",batch" if tagged else ""),
            }
            answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
            statuses["batch" if tagged else "other"].append(answer.status_code)
        (config,) = engine.keys.values()
        resolved = 1 + len(config.resolved or {})
    print(f"limits kept resolved for the key after 200 requests of made-up tags: {resolved}")
    assert set(statuses["batch"]) == {402} and set(statuses["other"]) == {200}, statuses
    assert resolved <= 2  # with the `batch` tag, and without


async def test_the_redis_keys_of_a_lifetime_budget_s_windows_reset_expire(
    make_settings: Settings,
) -> None:
    """A budget that never resets (a prepaid amount), spent and reset through the admin API,
    round after round: the windows a reset ended keep their Redis keys for the margin any
    window's key has (late settlements), not for good; only the live window's (its key and
    its seed record) are kept, until it is given a reset period its window has passed: the window
    moves on, and ends. Kept, every reset and the change left two keys in Redis for ever."""
    need_redis()
    settings = make_settings(redis_url=REDIS_URL)
    app = host_app(settings)
    engine = engine_of(app)
    prefix = unique_prefix()
    use_prefix(engine, prefix)
    resets = 5
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="prepaid", budgets=[{"max_limit": 10.0}])
        budget_id = key.budgets[0].id
        auth = {"authorization": f"Bearer {key.value}"}
        statuses = []
        for n in range(resets + 1):
            answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            statuses.append(answer.status_code)
            if n < resets:
                await asyncio.to_thread(engine.manager.reset_budget, budget_id)
        await engine.flush()
        r = Redis.from_url(REDIS_URL, decode_responses=True)
        for_good = [k for k in r.scan_iter(match=prefix + "*") if r.pttl(k) == -1]
        # Given a reset period its last window has passed (a second), the window moves on (its
        # usage carried over) and ends: none of its keys is kept for good.
        await asyncio.sleep(1.1)
        budget = {"id": budget_id, "max_limit": 10.0, "reset_duration": "1s"}
        await asyncio.to_thread(engine.manager.update_virtual_key, key.id, budgets=[budget])
        await engine.invalidate()
        answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        statuses.append(answer.status_code)
        await engine.flush()
        then = [k for k in r.scan_iter(match=prefix + "*") if r.pttl(k) == -1]
        r.close()
    delete_prefix(REDIS_URL, prefix)
    print(f"after {resets} resets, keys Redis keeps for good: {len(for_good)} {for_good}")
    print(f"given a reset period then: {len(then)} {then}")
    assert set(statuses) == {200}
    assert (len(for_good), then) == (2, [])


async def test_a_lifetime_budget_given_a_reset_period_its_window_holds_expires_with_it(
    make_settings: Settings,
) -> None:
    """A prepaid budget (it never resets) given a reset period whose first window is the one it
    is in (a day, the budget a minute old): the window stays, its key too (the usage is there),
    and that key and its seed record expire as any window's do, after its end and the margin.
    They were kept as they were, for ever: every such change left two keys in Redis for good,
    and a later change from a day to a week left the live key to expire after the first day, in
    its window. Through the admin API, and the key's next request on the new terms."""
    need_redis()
    settings = make_settings(redis_url=REDIS_URL)
    app = host_app(settings)
    engine = engine_of(app)
    prefix = unique_prefix()
    use_prefix(engine, prefix)
    admin = create_admin_app(settings)
    bearer = {"authorization": "Bearer admin-secret"}
    async with running(app), client(app) as http, client(admin) as api:
        made = await api.post(
            "/virtual-keys", json={"name": "prepaid", "budgets": [{"max_limit": 10.0}]},
            headers=bearer,
        )  # fmt: skip
        key = made.json()["virtual_key"]
        auth = {"authorization": f"Bearer {key['value']}"}
        first = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        statuses = [first.status_code]
        await engine.flush()
        r = Redis.from_url(REDIS_URL, decode_responses=True)
        before = {k: r.pttl(k) for k in r.scan_iter(match=prefix + "*w:budget:*")}
        ttls = {}
        for period in ("1d", "1w"):
            budget = {"id": key["budgets"][0]["id"], "max_limit": 10.0, "reset_duration": period}
            changed = await api.put(
                f"/virtual-keys/{key['id']}", json={"budgets": [budget]}, headers=bearer
            )
            assert changed.status_code == 200, changed.text
            answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            statuses.append(answer.status_code)
            await engine.flush()
            ttls[period] = {k: r.pttl(k) for k in r.scan_iter(match=prefix + "*w:budget:*")}
        listed = (await api.get("/budgets", headers=bearer)).json()["budgets"]
        spent = [b["current_usage"] for b in listed]
        r.close()
    delete_prefix(REDIS_URL, prefix)
    print(f"never resetting: {before}")
    print(f"given a period of a day, then a week: {ttls}")
    assert statuses == [200, 200, 200]
    assert sorted(before.values()) == [-1, -1]  # the key and its seed record: for good
    day, week = 86_400_000, 7 * 86_400_000
    for period, most in (("1d", day), ("1w", week)):
        assert len(ttls[period]) == 2, ttls  # the same window: no key left behind
        for ttl in ttls[period].values():  # its end, less the minutes gone, plus the margin
            assert most < ttl <= most + 300_000, (period, ttls)
    print(f"spent: {spent}")
    assert spent == [pytest.approx(3 * 0.0001275)]  # three requests: the usage carried over


async def test_a_lifetime_budget_deleted_by_an_instance_that_never_served_it_leaves_no_key(
    make_settings: Settings,
) -> None:
    """Prepaid keys (budgets that never reset) spent through one instance, then, after a
    restart (a deploy), one key deleted, another's budget removed by an update and a third's
    reset (a top-up), through an instance that has not served them since: the keys in Redis of
    the windows that ended so, and their seed records, expire after the margin any window's key
    has. Only an instance holding their live counters let them expire (its re-read forgets
    them, its reset names the window it ends): these were kept for good, two Redis keys a
    deleted or reset prepaid budget. The key left alone keeps its two."""
    need_redis()
    settings = make_settings(redis_url=REDIS_URL)
    app = host_app(settings)
    engine = engine_of(app)
    prefix = unique_prefix()
    use_prefix(engine, prefix)
    async with running(app), client(app) as http:
        m = engine.manager
        keys = [
            m.create_virtual_key(name=f"prepaid-{n}", budgets=[{"max_limit": 10.0}])
            for n in range(4)
        ]
        for key in keys:
            auth = {"authorization": f"Bearer {key.value}"}
            answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            assert answer.status_code == 200
    after_restart = BudgetEngine(make_settings(redis_url=REDIS_URL))
    use_prefix(after_restart, prefix)
    await after_restart.ensure_started()
    try:
        after_restart.manager.delete_virtual_key(keys[0].id)
        after_restart.manager.update_virtual_key(keys[1].id, budgets=[])
        after_restart.manager.reset_budget(keys[3].budgets[0].id)
        await after_restart.counters.mark_now()
    finally:
        await after_restart.shutdown()
        after_restart.store.dispose()
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    ttls = {
        n: sorted(r.pttl(k) for k in r.scan_iter(match=f"{prefix}*w:budget:{key.budgets[0].id}:*"))
        for n, key in enumerate(keys)
    }
    r.close()
    delete_prefix(REDIS_URL, prefix)
    print(f"the keys' windows in Redis, their TTLs (ms; -1: for good): {ttls}")
    assert ttls[2] == [-1, -1]  # left alone: its live window
    for gone in (0, 1, 3):
        assert len(ttls[gone]) == 2 and all(0 < t <= 300_000 for t in ttls[gone]), ttls
