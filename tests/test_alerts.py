"""Alerts, hooks, soft budgets and shadow mode (SPEC §14), through the middleware's HTTP answers,
the admin API, and a real HTTP receiver on 127.0.0.1 that takes the webhooks."""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine
from budget_middleware.admin import create_admin_app
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.manage.schemas import UsageRow
from conftest import POSTGRES_URL, REDIS_URL, need_postgres, need_redis, reset_postgres
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat, client, engine_of, host_app, running, until, until_sync

Settings = Callable[..., BudgetSettings]
ADMIN = {"authorization": "Bearer admin-secret"}
SECRET = "webhook-secret"


class Receiver:
    """A webhook receiver: answers `fail_first` posts with 500, holds the first `slow_first`
    for `delay` seconds, and keeps every post it answered 2xx."""

    def __init__(
        self, fail_first: int = 0, slow_first: int = 0, delay: float = 0.0, port: int = 0
    ) -> None:
        self.fail_first, self.slow_first, self.delay = fail_first, slow_first, delay
        self.posts: list[tuple[dict[str, str], bytes, int]] = []  # headers, body, status answered
        self.times: list[float] = []  # when each post came (`time.monotonic`)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    n = len(receiver.posts)
                    status = 500 if n < receiver.fail_first else 200
                    held = n < receiver.slow_first  # kept as 0: the sender gives up waiting
                    receiver.posts.append(({k.lower(): v for k, v in self.headers.items()},
                                           body, 0 if held else status))  # fmt: skip
                    receiver.times.append(time.monotonic())
                if held:
                    time.sleep(receiver.delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body, status in self.posts if 200 <= status < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: a receiver that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def _all_delivered(engine: BudgetEngine, count: int, limit: int = 100) -> bool:
    """Whether the store lists `count` alerts and the engine has recorded each delivered (it
    does so once the receiver has answered, in a thread: later than the receiver has it)."""
    alerts = engine.manager.list_alerts(limit=limit)
    return len(alerts) == count and all(a["delivery"] == "delivered" for a in alerts)


def quick(engine: BudgetEngine, **schedule: float) -> None:
    """A delivery schedule of fractions of a second (the real one: 3 s doubling to 5 minutes,
    given up after 10 minutes)."""
    alerts = engine.alerts
    alerts.first_retry, alerts.max_delay, alerts.poll_interval = 0.05, 0.2, 0.05
    for name, value in schedule.items():
        setattr(alerts, name, value)


async def spend(http: httpx.AsyncClient, key: str, cost: float, n: int) -> list[int]:
    """`n` requests one after another, each costing `cost` USD (the upstream's `usage.cost`)."""
    statuses = []
    for _ in range(n):
        answer = await http.post(
            "/v1/chat/completions",
            json=chat("gpt-4o"),
            headers={"authorization": f"Bearer {key}", "x-mock-cost": str(cost)},
        )
        statuses.append(answer.status_code)
    return statuses


async def test_an_alert_names_a_budget_of_a_fraction_of_a_cent_exactly(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Four decimals round a budget under a cent away: its alerts read "$0.0000 of $0.0000"."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 0.00002, "reset_duration": "1d"}]
        )
        assert await spend(http, key.value, 0.00001, 3) == [200, 200, 402]
        got = await until(lambda: len(hook.delivered()) >= 3 and hook.delivered())
    texts = sorted(a["text"] for a in got)
    print(texts)
    assert texts == [
        "Budget alert: virtual_key alice reached 100% of its budget: $0.00002 of $0.00002 (daily).",
        "Budget alert: virtual_key alice reached 80% of its budget: $0.00002 of $0.00002 (daily).",
        "Budget exhausted: virtual_key alice has spent $0.00002 of $0.00002 (daily); "
        "requests are refused.",
    ]


async def test_an_alert_names_a_threshold_between_whole_percents_as_set(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """The text rounded a threshold to a whole percent: 0.125 read "reached 12%" (the dashboard
    said 13 %), and half a percent "reached 0% of its budget"."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        thresholds = [0.005, 0.125, 0.8]
        budget = {"max_limit": 1.0, "reset_duration": "1d", "alert_thresholds": thresholds}
        key = engine.manager.create_virtual_key(name="alice", budgets=[budget])
        assert await spend(http, key.value, 0.3, 3) == [200] * 3
        got = await until(lambda: len(hook.delivered()) >= 3 and hook.delivered())
    texts = sorted(a["text"] for a in got)
    print(texts)
    assert texts == [
        "Budget alert: virtual_key alice reached 0.5% of its budget: $0.3000 of $1.00 (daily).",
        "Budget alert: virtual_key alice reached 12.5% of its budget: $0.3000 of $1.00 (daily).",
        "Budget alert: virtual_key alice reached 80% of its budget: $0.9000 of $1.00 (daily).",
    ]


async def test_an_alert_s_text_never_rounds_a_spend_up_to_its_budget(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """$9.996 spent of $10 (50 % reached, not exhausted) read "$10.00 of $10.00": money from a
    dollar up was rounded to the cent, up as well. Rounded down: "$9.99 of $10.00"."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        budget = {"max_limit": 10.0, "alert_thresholds": [0.5]}
        key = engine.manager.create_virtual_key(name="alice", budgets=[budget])
        statuses = await spend(http, key.value, 9.996, 1)
        got = await until(lambda: hook.delivered())
    alert = got[0]
    print(f"{statuses}: spent ${alert['budget']['spent']} of $10: {alert['text']}")
    assert statuses == [200] and alert["budget"]["spent"] == 9.996
    assert (
        alert["text"]
        == "Budget alert: virtual_key alice reached 50% of its budget: $9.99 of $10.00 (lifetime)."
    )


async def test_thresholds_and_exhaustion_alert_once_per_window_signed_and_listed(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver()
    settings = make_settings(alert_webhook_urls=hook.url, alert_secret=SECRET)
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(
            name="alice",
            budgets=[{"max_limit": 1.0, "reset_duration": "1d", "alert_thresholds": [0.5, 0.8]}],
        )
        statuses = await spend(http, key.value, 0.1, 13)
        # $0.10 a request: the 10th reaches $1.00; the 11th and on are refused.
        assert statuses == [200] * 10 + [402] * 3, statuses
        got = await until(lambda: len(hook.delivered()) >= 3 and hook.delivered())
        # Each recorded delivered by the engine (after the receiver's answer: a fixed 0.3 s fell
        # short of that on a loaded machine), then would a second alert of any come? (it must not)
        await until(lambda: _all_delivered(engine, 3))
        await asyncio.sleep(0.3)
        got = hook.delivered()
        kinds = [(a["type"], a.get("threshold")) for a in got]
        print(f"delivered: {kinds}")
        assert sorted(kinds, key=str) == sorted(
            [("budget.threshold", 0.5), ("budget.threshold", 0.8), ("budget.exhausted", None)],
            key=str,
        )
        first = next(a for a in got if a.get("threshold") == 0.5)
        assert first["owner"] == {"type": "virtual_key", "id": key.id, "name": "alice"}
        assert first["budget"]["max_limit"] == 1.0 and first["budget"]["spent"] >= 0.5
        assert "alice" in first["text"] and "50%" in first["text"]  # Slack's incoming webhooks
        for headers, body, _ in hook.posts:
            digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["x-budget-signature"] == f"sha256={digest}"

        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_admin_app(settings)),
            base_url="http://a",
            headers=ADMIN,
        )
        async with admin:
            listed = (await admin.get("/alerts")).json()
            assert listed["count"] == 3
            assert {a["delivery"] for a in listed["alerts"]} == {"delivered"}
            assert all(a["attempts"] == 1 and a["owner"]["id"] == key.id for a in listed["alerts"])
            mine = (await admin.get("/alerts", params={"owner_id": "nobody"})).json()
            assert mine["count"] == 0
            metrics = (await admin.get("/metrics")).text
            assert 'budget_alerts_raised_total{type="budget.threshold"} 2.0' in metrics
            assert 'budget_alerts_raised_total{type="budget.exhausted"} 1.0' in metrics

            # A new window: every alert can be raised again, once.
            budget_id = key.budgets[0].id
            assert (await admin.post(f"/budgets/{budget_id}/reset")).status_code == 200
            await http.get("/hello")  # the reset reaches the engine with the next request
            assert await spend(http, key.value, 0.1, 6) == [200] * 6
            await until(lambda: len(hook.delivered()) >= 4)
            await asyncio.sleep(0.3)
            again = [(a["type"], a.get("threshold")) for a in hook.delivered()[3:]]
            print(f"after the reset: {again}")
            assert again == [("budget.threshold", 0.5)]


async def test_a_receiver_that_fails_first_is_retried_and_never_posted_twice_after_success(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver(fail_first=2)
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="bob", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.45, 2) == [200, 200]  # 90 %: the 0.8 alert
        assert await until(lambda: hook.delivered())
        await until(lambda: _all_delivered(engine, 1))  # recorded after the receiver's answer
        await asyncio.sleep(0.5)  # more rounds: nothing more may be posted
        statuses = [status for _, _, status in hook.posts]
        alerts = engine.manager.list_alerts()
        print(f"posts answered {statuses}; alert {alerts[0]['delivery']} after "
              f"{alerts[0]['attempts']} attempts")  # fmt: skip
        assert statuses == [500, 500, 200]
        assert [(a["delivery"], a["attempts"]) for a in alerts] == [("delivered", 3)]
        assert engine.alerts.failed_deliveries == 2


async def test_a_delivery_the_store_could_not_record_for_a_moment_is_not_posted_again(
    store_url: str, make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """The receiver took the alert (200), and the store was locked for 2 s as the delivery was
    recorded (its busy timeout 0.5 s): the outcome was lost, the claim ran out, and the alert
    was posted again 31 s later (SPEC §14: never again after a success). The outcome is
    recorded again while the claim holds."""
    import sqlite3

    if not store_url.startswith("sqlite"):
        pytest.skip("the store is locked from outside as SQLite's file")
    db = store_url.removeprefix("sqlite:///")
    locked: list[float] = []

    def lock_the_store() -> None:  # as the receiver answers: the sender records into a lock
        conn = sqlite3.connect(db, timeout=5, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.append(time.monotonic())
        time.sleep(2.0)
        conn.execute("ROLLBACK")
        conn.close()

    hook = receiver()
    handler = hook.server.RequestHandlerClass
    answer = handler.do_POST

    def do_post(self: Any) -> None:
        if not hook.posts:
            threading.Thread(target=lock_the_store, daemon=True).start()
            until_sync(lambda: locked, 5.0)
        answer(self)

    handler.do_POST = do_post  # type: ignore[method-assign]
    settings = make_settings(database_url=f"{store_url}?timeout=0.5", alert_webhook_urls=hook.url)
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, timeout=1.0)  # a claim's lease: 31 s
        key = engine.manager.create_virtual_key(name="bob", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.45, 2) == [200, 200]  # 90 %: the 0.8 alert
        await until(lambda: _all_delivered(engine, 1), 40.0)
        await asyncio.sleep(2.0)  # more rounds: nothing more may be posted
        statuses = [status for _, _, status in hook.posts]
        alerts = engine.manager.list_alerts()
    ids = [json.loads(body)["id"] for _, body, _ in hook.posts]
    print(f"posts answered {statuses} ({len(set(ids))} alert); store locked 2 s after the first; "
          f"alert {alerts[0]['delivery']} after {alerts[0]['attempts']} attempt(s)")  # fmt: skip
    assert statuses == [200]
    assert [(a["delivery"], a["attempts"]) for a in alerts] == [("delivered", 1)]


async def test_a_failed_delivery_is_first_retried_within_5_seconds_on_the_real_schedule(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """SPEC §14: a failed delivery is retried "the first time within 5 s". The retry was due
    4 s after the failure and the alert task looks for due ones once a second: up to 5 s before
    any delay of a loaded machine, past 5 s there. Due after 3 s now."""
    hook = receiver(fail_first=1)
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(name="bob", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.45, 2) == [200, 200]  # 90 %: the 0.8 alert
        assert await until(lambda: hook.delivered(), 15)
    gap = hook.times[1] - hook.times[0]
    print(f"posts answered {[s for _, _, s in hook.posts]}; retried {gap:.2f} s after the 500")
    assert [s for _, _, s in hook.posts] == [500, 200]
    assert gap < 5.0
    # Due after `first_retry`, found by a round at most `poll_interval` later: a second of the
    # 5 s left for a loaded machine (the 4 s schedule left none, and measured 4.02 s here).
    schedule = engine.alerts.first_retry + engine.alerts.poll_interval
    assert schedule <= 4.0


async def test_the_alert_task_holds_an_http_client_only_once_it_delivers(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """The alert task made its httpx client as it started, in every process, most of which
    never deliver an alert (no webhook, or no threshold crossed): its TLS context added 2.4 MB
    to the benchmark's RSS (24.1 → 26.5 MB, past issue 12's 25 MB). It is made at the first
    delivery, and closed when the task ends."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="ida", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.1, 2) == [200, 200]  # 20 %: no alert
        await asyncio.sleep(0.3)  # rounds of the alert task
        before = engine.alerts._client
        assert await spend(http, key.value, 0.7, 1) == [200]  # 90 %: the 0.8 alert
        assert await until(lambda: hook.delivered())
        during = engine.alerts._client
    after = engine.alerts._client
    print(f"client before any alert: {before}; after one: {type(during).__name__}; "
          f"after the task ended: {after}")  # fmt: skip
    assert before is None and isinstance(during, httpx.AsyncClient) and after is None
    assert during.is_closed


async def test_a_receiver_that_is_down_is_retried_until_given_up_and_counted(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings(alert_webhook_urls=closed_port_url()))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, give_up_after=0.6)
        key = engine.manager.create_virtual_key(name="carol", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: engine.manager.list_alerts()[:1] and
                    engine.manager.list_alerts()[0]["delivery"] == "failed")  # fmt: skip
        alert = engine.manager.list_alerts()[0]
        print(f"down receiver: {alert['delivery']} after {alert['attempts']} attempts, "
              f"{engine.alerts.failed_deliveries} failed deliveries")  # fmt: skip
        assert alert["delivery"] == "failed" and alert["attempts"] >= 3
        assert engine.alerts.failed_deliveries == alert["attempts"]


async def test_a_webhook_url_s_path_never_reaches_a_log_line(
    make_settings: Settings,
    receiver: Callable[..., Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Slack or Discord incoming webhook's path is its credential: a receiver that failed
    (500, or no answer) was logged with its whole URL when the delivery was given up."""
    hook = receiver(fail_first=1000)
    secret = "/services/T0000/B0000/XXXXhookSECRET"
    urls = f"{hook.url}{secret},{closed_port_url()}{secret}"
    caplog.set_level("DEBUG", logger="budget_middleware")
    app = host_app(make_settings(alert_webhook_urls=urls))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, give_up_after=0.3)
        key = engine.manager.create_virtual_key(name="dave", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: engine.manager.list_alerts()[:1] and
                    engine.manager.list_alerts()[0]["delivery"] == "failed")  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "alert" in r.getMessage()]
    print(*lines, sep="\n")
    assert any("gave up" in line and "127.0.0.1" in line for line in lines)  # says where
    assert not [line for line in lines if "hookSECRET" in line]


async def test_a_slow_receiver_delays_no_answer_and_is_retried_after_its_timeout(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    # A timeout of a second: a loaded machine still sends the retry well within it (at 0.3 s a
    # retry could time out before it reached the receiver, and count a third attempt).
    hook = receiver(slow_first=1, delay=3.0)
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, timeout=1.0)
        key = engine.manager.create_virtual_key(name="dan", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.85, 1) == [200]
        await until(lambda: hook.posts)  # the first post is being held by the receiver
        # Answers go on while the delivery hangs.
        assert await spend(http, key.value, 0.01, 3) == [200, 200, 200]
        await until(lambda: engine.manager.list_alerts()[0]["delivery"] == "delivered")
        alert = engine.manager.list_alerts()[0]
        statuses = [status for _, _, status in hook.posts]
        print(f"slow receiver: posts {statuses} (0: held past the timeout), "
              f"{alert['attempts']} attempts")  # fmt: skip
        assert statuses == [0, 200] and alert["delivery"] == "delivered" and alert["attempts"] == 2


async def test_deliveries_pending_at_shutdown_are_made_after_a_restart(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    down = closed_port_url()
    before = make_settings(alert_webhook_urls=down)
    app = host_app(before)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="erin", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: engine.alerts.failed_deliveries >= 1)
    pending = engine.manager.list_alerts()
    assert [a["delivery"] for a in pending] == ["pending"]
    # The same store and URL, a new process's engine: the receiver is up now.
    hook = receiver(port=int(down.rsplit(":", 1)[1].split("/")[0]))
    assert hook.url == down
    after = make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=4)
    restarted = get_engine(after)
    assert restarted is not engine
    quick(restarted)
    await restarted.ensure_started()
    try:
        assert await until(lambda: hook.delivered())
        await until(lambda: _all_delivered(restarted, 1))  # recorded after the receiver's answer
        await asyncio.sleep(0.3)  # nothing more may be posted
        alerts = restarted.manager.list_alerts()
        print(f"after the restart: {[(a['delivery'], a['attempts']) for a in alerts]}")
        assert len(hook.delivered()) == 1 and hook.delivered()[0]["owner"]["name"] == "erin"
        assert alerts[0]["delivery"] == "delivered" and alerts[0]["id"] == pending[0]["id"]
        assert restarted.alerts.raised == {}  # delivered, not raised a second time
    finally:
        await restarted.shutdown()


async def test_two_instances_on_redis_raise_each_alert_once(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    need_redis()
    prefix = unique_prefix()
    hook = receiver()
    engines = [
        get_engine(
            make_settings(redis_url=REDIS_URL, alert_webhook_urls=hook.url, cache_ttl_seconds=ttl)
        )
        for ttl in (5, 6)
    ]
    apps = []
    for engine in engines:
        use_prefix(engine, prefix)
        quick(engine)
        app = host_app(None)
        from budget_middleware import BudgetMiddleware

        apps.append(BudgetMiddleware(app, engine=engine))
    try:
        for engine in engines:
            await engine.ensure_started()
        key = engines[0].manager.create_virtual_key(
            name="fay", budgets=[{"max_limit": 0.004, "alert_thresholds": [0.25, 0.5, 0.75]}]
        )
        https = [client(app) for app in apps]

        async def worker(n: int) -> list[int]:
            # priced from the usage (gpt-4o's catalog price), so the reservation bounds it
            statuses = []
            for _ in range(10):
                answer = await https[n % 2].post(
                    "/v1/chat/completions", json=chat("gpt-4o"),
                    headers={"authorization": f"Bearer {key.value}"},
                )  # fmt: skip
                statuses.append(answer.status_code)
            return statuses

        results = await asyncio.gather(*(worker(n) for n in range(32)))
        await until(lambda: len(hook.delivered()) >= 4)
        await asyncio.sleep(0.5)
        posts = hook.delivered()
        # An alert is posted again only after an attempt that failed (its answer lost: the
        # receiver took it and we did not see it take it), never twice by one claim or by both
        # instances claiming it; the repeat names the same alert, so a receiver can tell.
        kinds = sorted({a["id"]: (a["type"], a.get("threshold") or 0) for a in posts}.values())
        failed = sum(e.alerts.failed_deliveries for e in engines)
        admitted = sum(s.count(200) for s in results)
        for engine in engines:
            await engine.flush()
        spent = engines[0].manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0]
        print(f"2 instances, 320 requests: {admitted} admitted, spent ${spent.spent:.6f} of "
              f"$0.004; alerts delivered {kinds} in {len(posts)} posts after {failed} failed "
              f"attempts; raised by instance {[e.alerts.raised for e in engines]}")  # fmt: skip
        assert spent.spent <= 0.004 + 0.0002  # one request's own overrun at most
        assert kinds == [("budget.exhausted", 0), ("budget.threshold", 0.25),
                         ("budget.threshold", 0.5), ("budget.threshold", 0.75)]  # fmt: skip
        assert len(posts) <= len(kinds) + failed
        raised = [sum(e.alerts.raised.values()) for e in engines]
        assert sum(raised) == 4
        for http in https:
            await http.aclose()
    finally:
        for engine in engines:
            await engine.shutdown()
        delete_prefix(REDIS_URL, prefix)


async def test_hooks_are_called_off_the_request_path_and_their_errors_change_nothing(
    make_settings: Settings,
) -> None:
    seen: dict[str, list[Any]] = {"alert": [], "refusal": [], "settled": []}
    release = threading.Event()

    def slow_settled(record: Any) -> None:
        release.wait(5)  # holds the hook thread, never an answer
        seen["settled"].append(record)

    async def on_alert(alert: dict[str, Any]) -> None:
        seen["alert"].append(alert)

    def on_refusal(refusal: dict[str, Any]) -> None:
        seen["refusal"].append(refusal)
        raise RuntimeError("a broken hook")

    settings = make_settings()
    app = host_app(None)
    from budget_middleware import BudgetMiddleware

    app.add_middleware(BudgetMiddleware, settings=settings, on_alert=on_alert,
                       on_refusal=on_refusal, on_settled=slow_settled)  # fmt: skip
    async with running(app), client(app) as http:
        engine = get_engine(settings)
        key = engine.manager.create_virtual_key(name="gus", budgets=[{"max_limit": 0.2}])
        statuses = await spend(http, key.value, 0.1, 3)
        assert statuses == [200, 200, 402]  # the broken hook changed no answer
        assert seen["settled"] == []  # the slow hook is still waiting: no answer waited for it
        release.set()
        await until(lambda: len(seen["settled"]) == 2 and len(seen["alert"]) == 3)
        print(f"hooks: {len(seen['settled'])} settled, alerts "
              f"{[a['type'] for a in seen['alert']]}, refusals {seen['refusal']}")  # fmt: skip
        assert [r.cost_nanos for r in seen["settled"]] == [100_000_000, 100_000_000]
        assert seen["refusal"][0]["code"] == "budget_exceeded"
        assert seen["refusal"][0]["virtual_key_id"] == key.id
        assert sorted(a["type"] for a in seen["alert"]) == [
            "budget.exhausted", "budget.threshold", "budget.threshold"]  # fmt: skip
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(create_admin_app(settings)),
                                  base_url="http://a", headers=ADMIN)  # fmt: skip
        async with admin:
            refusals = (await admin.get("/refusals")).json()
        assert refusals["count"] == 1 and refusals["refusals"][0]["status"] == 402


@pytest.mark.parametrize("shape", ["lambda", "method"])
async def test_a_plain_hook_that_returns_a_coroutine_has_it_run(
    make_settings: Settings, shape: str
) -> None:
    """`on_settled=lambda record: notify(record)` with `notify` async (or an object's method
    that returns one): the hook is a plain callable, so it ran in the hook thread, its coroutine
    was never awaited and the notice never sent (one RuntimeWarning, nothing else). The
    coroutine it returns is run, as an async hook is (SPEC §14: plain or async)."""
    seen: list[Any] = []
    seen_loops: list[asyncio.AbstractEventLoop] = []

    async def notify(record: Any) -> None:
        await asyncio.sleep(0)
        seen_loops.append(asyncio.get_running_loop())
        seen.append(record)

    class Notifier:
        def settled(self, record: Any) -> Any:
            return notify(record)

    hook = (lambda record: notify(record)) if shape == "lambda" else Notifier().settled
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, settings=make_settings(), on_settled=hook)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(name="lam", budgets=[{"max_limit": 1}])
        statuses = await spend(http, key.value, 0.1, 2)
        engine.hooks.drain()
        await until(lambda: len(seen) == 2)
        print(f"{shape}: {statuses}, the returned coroutines run: {len(seen)} of 2")
        assert statuses == [200, 200]
        assert [r.cost_nanos for r in seen] == [100_000_000, 100_000_000]
        assert seen_loops[0] is asyncio.get_running_loop()  # on the app's loop, as an async hook


@pytest.mark.parametrize("kind", ["sync", "async", "returns a coroutine"])
async def test_a_hook_that_falls_behind_holds_a_bounded_backlog(
    make_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """An `on_refusal` hook that posts to a slow chat service, and a client sending unknown
    keys: every refusal queued one more event without end, the process's memory growing as
    fast as the client sent. Past `MAX_PENDING` (50 here, 10,000 by default) events are
    dropped, counted and logged; those taken all run."""
    from budget_middleware.engine import hooks as hooks_module

    monkeypatch.setattr(hooks_module, "MAX_PENDING", 50, raising=False)
    release = threading.Event()
    seen: list[Any] = []

    def blocked(refusal: dict[str, Any]) -> None:
        release.wait(10)
        seen.append(refusal)

    async def blocked_async(refusal: dict[str, Any]) -> None:
        await asyncio.to_thread(release.wait, 10)
        seen.append(refusal)

    hooks_by_kind: dict[str, Any] = {
        "sync": blocked,
        "async": blocked_async,
        "returns a coroutine": lambda refusal: blocked_async(refusal),  # counted till it ran
    }
    hook = hooks_by_kind[kind]
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, settings=make_settings(), on_refusal=hook)
    async with running(app), client(app) as http:
        for n in range(200):
            answer = await http.post(
                "/v1/chat/completions", json=chat(), headers={"x-budget-key": f"unknown-{n}"}
            )
            assert answer.status_code == 401
        hooks = engine_of(app).hooks
        backlog = getattr(hooks, "pending", None)
        if backlog is None and hooks._thread is not None:
            backlog = hooks._thread._work_queue.qsize()  # before the bound: the pool's queue
        release.set()
        await until(lambda: len(seen) >= 50 and getattr(hooks, "pending", 0) == 0)
        await asyncio.sleep(0.1)
    print(f"{kind}: 200 refusals to a blocked hook: {backlog} waiting, "
          f"{getattr(hooks, 'dropped', 0)} dropped, {len(seen)} run")  # fmt: skip
    assert backlog == 50 and hooks.dropped == 150 and len(seen) == 50
    assert "150 events dropped" in caplog.text or "1 events dropped" in caplog.text


async def test_a_soft_budget_alerts_and_counts_but_never_refuses(
    make_settings: Settings,
) -> None:
    settings = make_settings()
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(
            name="hal",
            budgets=[{"max_limit": 0.25, "soft": True}, {"max_limit": 10, "reset_duration": "1d"}],
        )
        statuses = await spend(http, key.value, 0.1, 5)
        assert statuses == [200] * 5
        await until(lambda: len(engine.manager.list_alerts()) >= 2)
        await engine.flush()
        budgets = {
            b.max_limit: b
            for b in engine.manager.list_budgets(owner_id=key.id, owner_type="virtual_key")
        }
        print(f"soft budget: spent ${budgets[0.25].spent:.2f} of $0.25, all 5 answered 200; "
              f"alerts {[a['type'] for a in engine.manager.list_alerts()]}")  # fmt: skip
        assert budgets[0.25].soft is True and budgets[10].soft is False
        assert budgets[0.25].spent == pytest.approx(0.5) and budgets[10].spent == pytest.approx(0.5)
        assert {a["threshold"] for a in engine.manager.list_alerts()} == {0.8, 1.0}
        listed = (await http.get("/hello")).status_code
        assert listed == 200


async def test_an_owner_name_with_a_line_end_stays_on_the_alert_s_log_line(
    make_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A name holding a line end wrote a second, forged line into the log (a review's). The
    admin side refuses such a name now; a store written by an earlier release may hold one."""
    from sqlalchemy import text

    settings = make_settings()
    app = host_app(settings)
    caplog.set_level("INFO", logger="budget_middleware")
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(name="hal", budgets=[{"max_limit": 0.25}])
        with engine.store.engine.begin() as conn:  # as an earlier release let it be written
            conn.execute(
                text("UPDATE bm_virtual_keys SET name = :name WHERE id = :id"),
                {"name": "hal\nbudget-middleware alert: forged", "id": key.id},
            )
        await engine.invalidate()
        assert await spend(http, key.value, 0.1, 3) == [200, 200, 200]
        await until(lambda: len(engine.manager.list_alerts()) >= 1)
    lines = [r.getMessage() for r in caplog.records if "alert:" in r.getMessage()]
    print(lines)
    assert lines and all("\n" not in line for line in lines)
    assert "'hal\\nbudget-middleware alert: forged'" in lines[0]


async def test_shadow_mode_refuses_nothing_and_says_what_it_would_have_refused(
    make_settings: Settings,
) -> None:
    settings = make_settings(mode="shadow")
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(
            name="ivy",
            budgets=[{"max_limit": 0.2}],
            rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"},
        )
        answers = []
        for _ in range(4):
            headers = {"authorization": f"Bearer {key.value}", "x-mock-cost": "0.1"}
            answers.append(
                await http.post("/v1/chat/completions", json=chat("gpt-4o"), headers=headers)
            )
        unknown = await http.post("/v1/chat/completions", json=chat("gpt-4o"),
                                  headers={"authorization": "Bearer sk-bm-nobody"})  # fmt: skip
        off = engine.manager.create_virtual_key(name="off", is_active=False)
        turned_off = await http.post("/v1/chat/completions", json=chat("gpt-4o"),
                                     headers={"authorization": f"Bearer {off.value}"})  # fmt: skip
        assert turned_off.status_code == 200
        assert turned_off.headers["x-budget-shadow-refusal"] == "virtual_key_inactive"
        shadow = [a.headers.get("x-budget-shadow-refusal") for a in answers]
        print(
            f"shadow: statuses {[a.status_code for a in answers]}, would refuse {shadow}; "
            f"unknown key -> {unknown.status_code} {unknown.headers.get('x-budget-shadow-refusal')}"
        )
        assert [a.status_code for a in answers] == [200] * 4 and unknown.status_code == 200
        assert shadow == [None, None, "budget_exceeded", "budget_exceeded"]
        assert unknown.headers["x-budget-shadow-refusal"] == "invalid_virtual_key"
        await engine.flush()
        spent = engine.manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
        # As enforce charges: the two it would refuse are charged to no budget; the money
        # they spent is in the usage records (GET /usage), which hold all four.
        recorded = engine.manager.usage(group_by="virtual_key").usage
        cost = sum(r.cost for r in recorded if r.key == key.id)
        print(f"budget spent ${spent}, usage records ${cost}")
        assert spent == pytest.approx(0.2) and cost == pytest.approx(0.4)
        with engine.store.session() as s:
            from sqlmodel import col, select

            from budget_middleware.store.tables import UsageRecordRow

            refused = s.exec(select(UsageRecordRow.would_refuse)
                             .order_by(col(UsageRecordRow.id))).all()  # fmt: skip
        assert list(refused) == [None, None, "budget_exceeded", "budget_exceeded",
                                 "invalid_virtual_key", "virtual_key_inactive"]  # fmt: skip
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(create_admin_app(settings)),
                                  base_url="http://a", headers=ADMIN)  # fmt: skip
        async with admin:
            metrics = (await admin.get("/metrics")).text
        assert 'budget_shadow_refusals_total{reason="budget_exceeded"} 2.0' in metrics
        assert 'budget_shadow_refusals_total{reason="invalid_virtual_key"} 1.0' in metrics
        assert 'budget_shadow_refusals_total{reason="virtual_key_inactive"} 1.0' in metrics
        assert 'budget_requests_refused_total{reason="budget_exceeded"}' not in metrics
        # Every request went on, so each is counted admitted: the four of the key, the unknown
        # key's (served as one without a key) and the turned-off key's.
        admitted = [line for line in metrics.splitlines()
                    if line.startswith("budget_requests_admitted_total")]  # fmt: skip
        print(f"shadow: {admitted}")
        assert admitted == ["budget_requests_admitted_total 6.0"]


def test_bad_alert_thresholds_are_refused_with_a_clear_message(make_settings: Settings) -> None:
    manager = get_engine(make_settings()).manager
    # A threshold sent as text or a boolean was read as a number (`true` stored as 1.0, "0.5"
    # as 0.5), where every other number of the API is refused so (a fault hunt's).
    for bad, says in (([0], "greater than 0"), ([11], "less than or equal to 10"),
                      (["x"], "JSON number"), ([True], "JSON number"),
                      (["0.5"], "JSON number")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            manager.create_virtual_key(
                name="k", budgets=[{"max_limit": 1, "alert_thresholds": bad}]
            )
    key = manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 1, "alert_thresholds": [0.9, 0.5, 0.9]}]
    )
    assert key.budgets[0].alert_thresholds == [0.5, 0.9]  # sorted, once each


@pytest.mark.parametrize("bad", [True, "0.5"], ids=["boolean", "text"])
async def test_a_threshold_that_is_no_json_number_is_a_422_naming_it(
    make_settings: Settings, bad: object
) -> None:
    """Over HTTP, as `max_limit` is: 422 with the item's path (it was a 201, stored as 1.0)."""
    app = create_admin_app(make_settings(admin_key="admin-secret"))
    auth = {"authorization": "Bearer admin-secret"}
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://a", headers=auth)
    async with http:
        body = {"budgets": [{"max_limit": 1, "alert_thresholds": [bad]}]}
        answer = await http.put("/providers/openai", json=body)
        limit = await http.put("/providers/openai", json={"budgets": [{"max_limit": bad}]})
    print(
        f"alert_thresholds [{bad!r}]: {answer.status_code}; max_limit {bad!r}: {limit.status_code}"
    )
    assert (answer.status_code, limit.status_code) == (422, 422)
    assert answer.json()["error"]["param"] == "budgets.0.alert_thresholds.0"
    assert "JSON number" in answer.json()["error"]["message"]


ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    print(done.stdout)
    return done.stdout.splitlines()


def test_the_alerts_example_prints_signed_alerts_at_its_receiver(tmp_path: Path) -> None:
    lines = run_example("alerts.py", tmp_path)
    got = [line for line in lines if "receiver got" in line]
    assert len(got) == 6 and all("signature ok" in line for line in got)
    shadow = [line for line in lines if "would refuse: budget_exceeded" in line]
    assert len(shadow) == 2 and "  402" in lines


def test_the_demo_shows_the_80_percent_alert_before_the_budget_refusal(tmp_path: Path) -> None:
    lines = run_example("demo.py", tmp_path)
    step = lines[lines.index(next(x for x in lines if x.startswith("== 4."))) :]
    alert = next(n for n, x in enumerate(step) if "reached 80%" in x)
    refusal = next(n for n, x in enumerate(step) if "402 budget_exceeded" in x)
    assert alert < refusal and "ALERT Budget exhausted" in step[refusal + 1]
    # It ends by pointing at the CLI and the dashboard on its store.
    assert any("budget-middleware usage --by model" in x for x in lines[-5:])
    assert any("/budget-admin/ui" in x for x in lines[-5:])


def test_the_demo_prints_its_own_amounts_at_one_precision(tmp_path: Path) -> None:
    """The demo printed the amounts of its own columns as they came: `x-budget-remaining` as
    the header writes it (`$0.050000` beside `$0.047962500`), a budget's limit to 4 decimals
    beside its spend to 6, and a float's rounding (bob's $0.0121125 as `$0.012113` in the
    table, alice's $0.0061125 as `$0.006112`). Each is printed to six decimals now, rounded
    half up; the library's messages and alerts (SPEC §8's `$0.0121 spent of $0.0100`) are
    quoted as they are."""
    lines = run_example("demo.py", tmp_path)
    own = [x for x in lines if x.startswith("  200 ok") or x.startswith("  /") or " spend $" in x]
    amounts = [a for x in own for a in re.findall(r"\$ *[0-9.,]+", x)]
    decimals = Counter(len(a.partition(".")[2]) for a in amounts)
    print(f"{len(amounts)} amounts in the demo's columns, by decimals: {dict(decimals)}")
    assert len(own) >= 13 and len(amounts) >= 21
    assert set(decimals) == {6}
    alice = next(x for x in lines if x.lstrip().startswith("alice ") and "spend" in x)
    assert alice.endswith("spend $0.006113"), alice  # 3 x $0.0020375, half up


# -- found in review: each of these failed before its fix --------------------------------------


def _new_alert(budget_id: str, raised_at: Any) -> Any:
    from budget_middleware.store import alerts as stored

    return stored.NewAlert(
        type="budget.threshold", budget_id=budget_id, window_start=raised_at, threshold=0.8,
        owner_type="tag", owner_id="t", owner_name="t", raised_at=raised_at, body="{}",
        delivery="pending",
    )  # fmt: skip


def test_two_instances_raising_the_same_alerts_in_other_orders_never_deadlock(
    store_url: str,
) -> None:
    """Two instances raise the same alerts at once, each in the order its own queue has them:
    on PostgreSQL, one's insert waited for the other's uncommitted row of the unique key and
    the other's for its, and the database aborted one batch (`DeadlockDetected`, a fault
    hunt's: 3 runs of 4 with 40 clients on 20 keys; its other alerts came a round late). Each
    batch is inserted in the key's order now: every alert raised once, by one of them."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from budget_middleware.store import alerts as stored
    from budget_middleware.store.database import Store

    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite writes one transaction at a time: no deadlock to find there")
    store = Store(store_url)
    store.create_schema()
    failures, raised = 0, 0
    for round_ in range(8):
        now = datetime.now(UTC)
        batch = [_new_alert(f"r{round_}-b{i:03d}", now) for i in range(150)]
        other = [_new_alert(a.budget_id, now) for a in reversed(batch)]  # another's ids
        start = threading.Barrier(2)

        def raise_(
            alerts: list[Any], start: threading.Barrier = start, round_: int = round_
        ) -> list[str] | None:
            start.wait()
            try:
                return [row.budget_id for row in stored.raise_alerts(store, alerts)]
            except Exception as exc:  # the aborted batch
                print(f"round {round_}: {type(exc).__name__}")
                return None

        with ThreadPoolExecutor(2) as pool:
            one, two = pool.map(raise_, [batch, other])
        if one is None or two is None:
            failures += 1
            continue
        assert sorted(one + two) == sorted(a.budget_id for a in batch)  # each once
        assert one == [a.budget_id for a in batch if a.budget_id in set(one)]  # in its order
        raised += len(one + two)
    store.engine.dispose()  # (its connections closed: a test's leftovers warn)
    print(f"8 rounds of 150 alerts raised by two at once: {failures} aborted, {raised} raised")
    assert failures == 0 and raised == 8 * 150


def test_a_lapsed_claim_is_taken_over_and_its_late_outcome_is_not_written(store_url: str) -> None:
    """A delivery round that outlived its lease (a crash, a hung receiver): another instance
    claims the alert (on SQLite too, whose datetimes come back naive), and the first round's
    outcome, arriving late, is not written over the second's."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store import alerts as stored
    from budget_middleware.store.database import Store

    store = Store(store_url)
    store.create_schema()
    now = datetime.now(UTC)
    urls = ["http://a"]
    assert len(stored.raise_alerts(store, [_new_alert("b1", now)], urls)) == 1
    assert stored.raise_alerts(store, [_new_alert("b1", now)], urls) == []  # raised once
    first = stored.claim_due(store, urls, now, lease=1.0)
    assert len(first) == 1 and stored.claim_due(store, urls, now, lease=1.0) == []  # held
    later = now + timedelta(seconds=2)  # the first claim's lease is over
    second = stored.claim_due(store, urls, later, lease=30.0)
    assert [d.alert_id for d in second] == [first[0].alert_id]
    late = stored.record_attempt(store, first[0], "delivered", later, None)
    assert late is False  # no longer its claim: nothing written
    assert stored.record_attempt(store, second[0], "pending", later, "x") is True
    alerts, total = stored.list_alerts(store)
    print(f"lapsed claim: late outcome written {late}; now {alerts[0]['delivery']}, "
          f"{alerts[0]['attempts']} attempt")  # fmt: skip
    assert total == 1 and (alerts[0]["delivery"], alerts[0]["attempts"]) == ("pending", 1)
    store.dispose()


async def test_a_delivery_another_instance_made_while_one_claimed_it_is_not_posted_again(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Two instances with one webhook URL: A finds an alert's delivery due, and before its
    claim lands B claims it, posts it and records it delivered (a fast receiver; a loaded
    machine slowing A). A's claim asked only that no one held it, so A claimed the delivered
    alert and posted it a second time (2 posts, no failed attempt: seen once in a full run of
    this file). A claim takes only what is still due."""
    from sqlalchemy import event

    hook = receiver()
    engines = [get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=t))
               for t in (5, 6)]  # fmt: skip
    a, b = engines
    a_found, waited = threading.Event(), []

    def a_claims(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE bm_alert_deliveries SET claimed_until") and not waited:
            waited.append(True)
            a_found.set()  # A has found it due; B goes first, and delivers it
            waited.append(until_sync(lambda: _delivered_in(b), 5.0))

    def b_looks(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "JOIN bm_alerts" in statement and "claimed_until" in statement:
            a_found.wait(5.0)  # B claims only once A has found it due

    event.listen(a.store.engine, "before_cursor_execute", a_claims)
    event.listen(b.store.engine, "before_cursor_execute", b_looks)
    try:
        for e in engines:
            quick(e)
            await e.ensure_started()
        key = a.manager.create_virtual_key(name="ann", budgets=[{"max_limit": 1.0}])
        async with client(BudgetMiddleware(host_app(None), engine=a)) as http:
            statuses = await spend(http, key.value, 0.85, 1)
        await until(lambda: _all_delivered(a, 1))
        await asyncio.sleep(0.5)  # a second post would come meanwhile
        posts = [json.loads(body)["id"] for _, body, _ in hook.posts]
        failed = sum(e.alerts.failed_deliveries for e in engines)
    finally:
        for e in engines:
            await e.shutdown()
    print(f"{statuses}: B delivered while A claimed ({waited}); {len(posts)} post(s) of "
          f"{len(set(posts))} alert, {failed} failed attempts")  # fmt: skip
    assert statuses == [200] and waited == [True, True]
    assert len(posts) == 1 and failed == 0


def _delivered_in(engine: BudgetEngine) -> bool:
    return [a["delivery"] for a in engine.manager.list_alerts()] == ["delivered"]


async def test_one_failing_url_leaves_the_others_delivered_once(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=f"{hook.url},{closed_port_url()}"))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="jo", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: [a["attempts"] for a in engine.manager.list_alerts()] >= [3])
        alert = engine.manager.list_alerts()[0]
        print(f"good URL got {len(hook.posts)} post(s) in {alert['attempts']} attempts")
        assert len(hook.posts) == 1 and alert["delivery"] == "pending"


async def test_the_give_up_clock_starts_at_the_first_attempt(
    make_settings: Settings,
) -> None:
    """An alert raised long ago and never tried (pending at a shutdown, a long store outage)
    gets its retries: one failed attempt does not mark it failed."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store import alerts as stored

    engine = get_engine(make_settings(alert_webhook_urls=closed_port_url()))
    quick(engine, give_up_after=5.0)
    await engine.ensure_started()
    try:
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        stored.raise_alerts(engine.store, [_new_alert("b2", long_ago)])
        await until(lambda: [a["attempts"] for a in engine.manager.list_alerts()] >= [1])
        alert = engine.manager.list_alerts()[0]
        print(f"raised an hour ago: {alert['delivery']} after {alert['attempts']} attempt(s)")
        assert alert["delivery"] == "pending"
    finally:
        await engine.shutdown()


async def test_a_soft_budget_of_0_raises_nothing_before_its_first_charge(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A soft $0 budget raises its thresholds with its first charge (it never refuses, so it
    has no `budget.exhausted`). A request that cost nothing, then a cache TTL: its re-read
    looked at it, and its 80 % and 100 % were raised at $0 spent, before any charge."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=0.3))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        budgets = [{"max_limit": 0, "soft": True}, {"max_limit": 1.0, "reset_duration": "1d"}]
        key = engine.manager.create_virtual_key(name="free", budgets=budgets)
        free = await spend(http, key.value, 0.0, 1)
        await asyncio.sleep(1.5)  # a few TTLs: re-read, looked at
        before = [(a["type"], a.get("threshold")) for a in hook.delivered()]
        paid = await spend(http, key.value, 0.01, 1)
        await until(lambda: len(hook.delivered()) >= 2, 5.0)
        after = sorted((a["type"], a.get("threshold"), a["budget"]["spent"])
                       for a in hook.delivered())  # fmt: skip
    print(f"soft $0 budget: {free} free, then {paid}; before the first charge {before}, "
          f"after it {after}")  # fmt: skip
    assert free == [200] and paid == [200]
    assert before == []
    assert after == [("budget.threshold", 0.8, 0.01), ("budget.threshold", 1.0, 0.01)]


async def test_a_soft_budget_on_redis_is_shared_by_instances(
    make_settings: Settings,
) -> None:
    need_redis()
    prefix = unique_prefix()
    engines = [
        get_engine(make_settings(redis_url=REDIS_URL, cache_ttl_seconds=ttl)) for ttl in (5, 6)
    ]
    from budget_middleware import BudgetMiddleware

    apps = [BudgetMiddleware(host_app(None), engine=e) for e in engines]
    try:
        for engine in engines:
            use_prefix(engine, prefix)
            await engine.ensure_started()
        key = engines[0].manager.create_virtual_key(
            name="kim", budgets=[{"max_limit": 1.0, "soft": True}]
        )
        for app in apps:
            async with client(app) as http:
                assert await spend(http, key.value, 0.45, 1) == [200]
        for engine in engines:
            await engine.alerts.raise_queued()
        # Raised as Redis answered the second's charge: written by the second's alert task,
        # or by the call above when it came first.
        alerts = await until(lambda: engines[0].manager.list_alerts(), 3.0)
        values = [e.registry.counter("budget", key.budgets[0].id).value for e in engines]
        print(f"soft budget on Redis: live values {values}; alerts {alerts}")
        assert values[1] == 900_000_000  # the second instance saw the first one's spend
        assert [(a["type"], a["threshold"]) for a in alerts] == [("budget.threshold", 0.8)]
    finally:
        for engine in engines:
            await engine.shutdown()
        delete_prefix(REDIS_URL, prefix)


async def test_a_budget_of_0_raises_its_exhaustion_alone(make_settings: Settings) -> None:
    """A key blocked by a $0 budget: its first refusal raised 80 % and 100 % "of $0.0000" as
    well as `budget.exhausted` (a fault hunt's); the exhaustion alone now, once. A soft $0
    budget never refuses: its thresholds are what it raises, with its first charge."""
    settings = make_settings()
    alerts: list[dict[str, Any]] = []
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, settings=settings, on_alert=alerts.append)
    async with running(app), client(app) as http:
        engine = get_engine(settings)
        blocked = engine.manager.create_virtual_key(name="blocked", budgets=[{"max_limit": 0}])
        soft = engine.manager.create_virtual_key(
            name="watched", budgets=[{"max_limit": 0, "soft": True}]
        )
        statuses = []
        for key in (blocked, soft, blocked, soft):
            auth = {"authorization": f"Bearer {key.value}"}
            answer = await http.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth)
            statuses.append(answer.status_code)
        assert await until(lambda: len(alerts) >= 3, 15)
        await asyncio.sleep(0.5)  # (any other alert of theirs)
        engine.hooks.drain()
    raised = sorted((a["owner"]["name"], a["type"], a.get("threshold") or 0) for a in alerts)
    print(f"$0 budgets answered {statuses}: alerts {raised}")
    assert statuses == [402, 200, 402, 200]
    assert raised == [("blocked", "budget.exhausted", 0), ("watched", "budget.threshold", 0.8),
                      ("watched", "budget.threshold", 1.0)]  # fmt: skip
    # its time written as every other time of the API (`Z`; it was `+00:00`)
    assert alerts[0]["raised_at"].endswith("Z")


async def test_a_body_too_large_and_a_store_away_are_refusals_the_hooks_and_the_list_hear(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §14: `on_refusal` hears each refusal, `GET /refusals` lists them. A 413 (a body over
    BUDGET_MAX_BODY_BYTES) and a 503 (the store away for a key not cached) were counted in
    `budget_requests_refused_total` and told to neither (a fault hunt's: the hook heard only
    the budget's refusal). Both are told now, with the budget's; a body found too large once
    the key was read (sent in chunks, no `content-length`) with that key."""
    settings = make_settings(max_body_bytes=2_000, fail_open=False)
    seen: list[dict[str, Any]] = []
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, settings=settings, on_refusal=seen.append)
    admin = create_admin_app(settings)
    async with running(app), client(app) as http, client(admin) as ops:
        engine = get_engine(settings)
        spent = engine.manager.create_virtual_key(name="spent", budgets=[{"max_limit": 0}])
        unseen = engine.manager.create_virtual_key(name="unseen")
        auth = {"authorization": f"Bearer {spent.value}"}
        over = await http.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth)
        big = await http.post("/v1/chat/completions", json=chat("gpt-4o", extra="x" * 5_000),
                              headers=auth)  # fmt: skip

        async def chunks() -> Any:  # no content-length: read until it is too large
            for _ in range(6):
                yield b"x" * 1_000

        chunked = await http.post("/v1/chat/completions", content=chunks(), headers=auth)

        def store_away(key_hash: str) -> None:
            raise OSError("the store is away")

        monkeypatch.setattr(engine.store, "load_key", store_away)
        away = await http.post("/v1/chat/completions", json=chat("gpt-4o"),
                               headers={"authorization": f"Bearer {unseen.value}"})  # fmt: skip
        monkeypatch.undo()
        engine.hooks.drain()
        listed = await ops.get("/refusals", headers={"authorization": "Bearer admin-secret"})
    statuses = [over.status_code, big.status_code, chunked.status_code, away.status_code]
    heard = [(r["code"], r["status"], r["key_name"]) for r in seen]
    print(f"answered {statuses}; on_refusal heard {heard}")
    assert statuses == [402, 413, 413, 503]
    assert heard == [("budget_exceeded", 402, "spent"), ("request_too_large", 413, None),
                     ("request_too_large", 413, "spent"),
                     ("service_unavailable", 503, None)]  # fmt: skip
    assert not any(r["shadow"] for r in seen)  # refused, not a shadow mode's would-be refusal
    assert [r["code"] for r in listed.json()["refusals"]] == [
        "service_unavailable",
        "request_too_large",
        "request_too_large",
        "budget_exceeded",
    ]  # newest first
    assert all(r["at"].endswith("Z") for r in listed.json()["refusals"])  # was `+00:00`


async def test_shadow_mode_takes_the_route_enforce_takes_and_reports_enforce_s_code(
    make_settings: Settings,
) -> None:
    seen: list[dict[str, Any]] = []
    results = {}
    for mode in ("enforce", "shadow"):
        settings = make_settings(mode=mode, cache_ttl_seconds=5 if mode == "enforce" else 6)
        app = host_app(None)
        from budget_middleware import BudgetMiddleware

        app.add_middleware(BudgetMiddleware, settings=settings, on_refusal=seen.append)
        async with running(app), client(app) as http:
            m = get_engine(settings).manager
            if mode == "enforce":  # one store for both modes
                m.create_route(name="gpt-4o", targets=["openai/gpt-4o", "azure/gpt-4o"])
            azure_only = m.create_virtual_key(
                name=f"az-{mode}", provider_configs=[{"provider": "azure", "allowed_models": ["*"]}]
            )
            inactive = m.create_virtual_key(
                name=f"off-{mode}", is_active=False,
                provider_configs=[{"provider": "azure", "allowed_models": ["*"]}],
            )  # fmt: skip
            spent = m.create_virtual_key(name=f"spent-{mode}", budgets=[{"max_limit": 0}])
            await get_engine(settings).invalidate()

            async def post(key: str, model: str) -> httpx.Response:
                return await http.post("/v1/chat/completions", json=chat(model),
                                       headers={"authorization": f"Bearer {key}"})  # fmt: skip

            routed = await post(azure_only.value or "", "gpt-4o")
            off = await post(inactive.value or "", "openai/gpt-4o")
            over = await post(spent.value or "", "openai/gpt-4o")
            get_engine(settings).hooks.drain()
            results[mode] = (
                routed.headers.get("x-budget-route"),
                off.status_code,
                off.headers.get("x-budget-shadow-refusal") or off.json()["error"]["code"],
            )
            if mode == "shadow":
                assert over.status_code == 200
    print(f"enforce {results['enforce']}, shadow {results['shadow']}")
    assert results["enforce"] == ("azure/gpt-4o", 403, "virtual_key_inactive")
    assert results["shadow"] == ("azure/gpt-4o", 200, "virtual_key_inactive")
    shadow_budget = [r for r in seen if r["shadow"] and r["code"] == "budget_exceeded"]
    assert shadow_budget and shadow_budget[0]["scope"]["name"] == "spent-shadow"


async def test_an_alert_raised_while_the_store_is_away_is_raised_once_it_is_back(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Fault: the store refuses the alert's insert (unreachable): the alert is kept and raised,
    once, when the store answers again; no request waited for it."""
    from sqlalchemy.exc import OperationalError

    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        real = engine.alerts._insert
        failures = {"left": 3}

        def flaky(events: Any) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise OperationalError("INSERT", {}, Exception("the store is away"))
            return real(events)

        engine.alerts._insert = flaky  # type: ignore[method-assign]
        key = engine.manager.create_virtual_key(name="lou", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: hook.delivered())
        await asyncio.sleep(0.3)
        alerts = engine.manager.list_alerts()
        print(f"store away for 3 rounds: {3 - failures['left']} inserts failed; then "
              f"{len(hook.delivered())} delivered, {len(alerts)} raised")  # fmt: skip
        assert failures["left"] == 0 and len(hook.delivered()) == 1 and len(alerts) == 1


_SCRIPT_CROSSING_A_THRESHOLD = """
import asyncio, sys
import httpx2
from budget_middleware import BudgetSettings, BudgetTransport, charge_to, get_engine

USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}

def provider(request):
    return httpx2.Response(200, json={"model": "gpt-4o", "choices": [], "usage": USAGE})

settings = BudgetSettings(database_url=sys.argv[1])
# $0.0035 a call: the fifth of five reaches 80 % of $0.02
key = get_engine(settings).manager.create_virtual_key(name="k", budgets=[{"max_limit": 0.02}])
body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

async def job():
    transport = BudgetTransport(httpx2.MockTransport(provider), settings)
    async with httpx2.AsyncClient(transport=transport) as http:
        with charge_to(virtual_key_id=key.id):
            url = "https://api.openai.com/v1/chat/completions"
            answers = await asyncio.gather(*(http.post(url, json=body) for _ in range(5)))
            assert [a.status_code for a in answers] == [200] * 5
    if sys.argv[2] == "writing":  # ends while the alert task writes the alert (its thread)
        while get_engine(settings).alerts.queue:
            await asyncio.sleep(0)

asyncio.run(job())
print("the script's loop ended")
"""


@pytest.mark.parametrize("ending", ["writing", "queued"])
def test_a_script_whose_last_call_raises_an_alert_ends_and_keeps_it(
    tmp_path: Path, ending: str
) -> None:
    """`asyncio.run` cancels every task as it ends. The alert task, writing the alert the last
    call raised (in a worker thread), lost that cancellation and polled on: the script never
    ended. An alert still queued when the loop ended was lost."""
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT_CROSSING_A_THRESHOLD)
    url = f"sqlite:///{tmp_path / 'job.db'}"
    done = subprocess.run(
        [sys.executable, str(script), url, ending], capture_output=True, text=True, timeout=60
    )
    from sqlalchemy import create_engine, text

    store = create_engine(url)
    with store.connect() as conn:
        alerts = [tuple(r) for r in conn.execute(text("SELECT type, threshold FROM bm_alerts"))]
    store.dispose()
    print(f"exit {done.returncode}: {done.stdout.strip()!r}; alerts {alerts}")
    assert done.returncode == 0, done.stderr
    assert "the script's loop ended" in done.stdout
    assert ("budget.threshold", 0.8) in alerts


async def test_two_instances_on_one_store_raise_the_thresholds_the_refusal_finds(
    make_settings: Callable[..., object], receiver: Callable[..., Receiver]
) -> None:
    """Two instances on one store, each charging under the thresholds as it sees the budget:
    the refusal that finds $1.20 spent raised `budget.exhausted` alone, and the 0.8 and 1.0
    thresholds never came (nothing is charged any more; a fault hunt's)."""
    hook = receiver()
    # Each instance charges under the thresholds as it sees the budget (within its cache TTL).
    engines = [get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=t))
               for t in (2.0, 2.1)]  # fmt: skip
    apps = [BudgetMiddleware(host_app(None), engine=e) for e in engines]
    https = [client(a) for a in apps]
    try:
        for e in engines:
            quick(e)
            await e.ensure_started()
        key = engines[0].manager.create_virtual_key(name="pair", budgets=[{"max_limit": 1.0}])
        first = await spend(https[0], key.value, 0.6, 1) + await spend(https[1], key.value, 0.6, 1)
        for e in engines:
            await e.flush()
        # The TTLs run out: both re-read the store ($1.20 spent); waited for, bounded (a loaded
        # machine's flusher comes late: a fixed 2.5 s found one not yet re-read).
        for _ in range(200):
            seen = [e.manager.list_budgets(owner_type="virtual_key", owner_id=key.id,
                                           from_memory=True)[0].spent for e in engines]  # fmt: skip
            if min(seen) >= 1.2 - 1e-9:
                break
            await asyncio.sleep(0.05)
        then = await spend(https[0], key.value, 0.1, 1) + await spend(https[1], key.value, 0.1, 1)
        await until(lambda: len(hook.delivered()) >= 3)
        await asyncio.sleep(0.3)
        spent = engines[0].manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
        # (by id: a delivery whose claim lapsed on a loaded machine is posted again, the same
        # alert, which a receiver tells by its id; once in a review's full run)
        alerts = {a["id"]: a for a in hook.delivered()}.values()
        kinds = sorted((a["type"], a.get("threshold") or 0) for a in alerts)
        print(f"two instances: {first} then {then}; spent ${spent:.2f} of $1.00; "
              f"delivered {kinds} in {len(hook.delivered())} posts")  # fmt: skip
        assert first == [200, 200] and then == [402, 402] and spent >= 1.0
        assert kinds == [("budget.exhausted", 0), ("budget.threshold", 0.8),
                         ("budget.threshold", 1.0)]  # fmt: skip
    finally:
        for h in https:
            await h.aclose()
        for e in engines:
            await e.shutdown()


async def test_a_limit_lowered_below_the_spend_raises_its_thresholds_with_the_refusal(
    make_settings: Callable[..., object], receiver: Callable[..., Receiver]
) -> None:
    """$5 spent of $10, the limit lowered to $4: the refusals raised `budget.exhausted` alone."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="low", budgets=[{"max_limit": 10.0}])
        before = await spend(http, key.value, 5.0, 1)  # 50 %: no alert
        budget = {"id": key.budgets[0].id, "max_limit": 4.0}
        engine.manager.update_virtual_key(key.id, {"budgets": [budget]})
        await engine.invalidate()
        after = await spend(http, key.value, 0.1, 2)
        await until(lambda: len(hook.delivered()) >= 3)
        await asyncio.sleep(0.3)
        kinds = sorted((a["type"], a.get("threshold") or 0) for a in hook.delivered())
        print(f"$5 spent of $10, limit lowered to $4: {before} then {after}; delivered {kinds}")
        assert before == [200] and after == [402, 402]
        assert kinds == [("budget.exhausted", 0), ("budget.threshold", 0.8),
                         ("budget.threshold", 1.0)]  # fmt: skip


async def test_an_alert_tells_the_spend_its_crossing_found(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A soft $1 budget alerting at 50 %, 9 requests of $0.30 at once: the alert is written by
    the alert task while the others settle, and it told the spend then (up to $2.70, "reached
    50 %: $2.70 of $1.00"). It tells the spend of its crossing: $0.60."""
    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        soft = {"max_limit": 1.0, "soft": True, "alert_thresholds": [0.5]}
        key = engine.manager.create_virtual_key(name="soft", budgets=[soft])
        groups = await asyncio.gather(*(spend(http, key.value, 0.3, 1) for _ in range(9)))
        statuses = [status for group in groups for status in group]
        await until(lambda: len(hook.delivered()) >= 1, 5.0)
        alert = hook.delivered()[0]
    told = alert["budget"]
    print(f"{statuses}; the 50 % alert told ${told['spent']:.2f}: {alert['text']}")
    assert statuses == [200] * 9
    assert (told["spent"], told["remaining"], told["usage_ratio"]) == (0.6, 0.4, 0.6)
    assert "$0.6000 of $1.00" in alert["text"]


async def test_shadow_mode_reports_a_routed_refusal_as_enforce_answers_it(
    make_settings: Settings,
) -> None:
    """Every target of a route refused: shadow mode's report (`GET /refusals`, `on_refusal`)
    names the code, scope and target enforce mode's answer names, request for request."""
    reports: dict[str, list[tuple[Any, ...]]] = {}
    for mode in ("enforce", "shadow"):
        seen: list[dict[str, Any]] = []
        settings = make_settings(mode=mode, cache_ttl_seconds=5 if mode == "enforce" else 6)
        app = host_app(None)
        from budget_middleware import BudgetMiddleware

        app.add_middleware(BudgetMiddleware, settings=settings, on_refusal=seen.append)
        async with running(app), client(app) as http:
            m = get_engine(settings).manager
            if mode == "enforce":  # one store for both modes
                m.put_provider("openai", budgets=[{"max_limit": 0}])
                limit = {"request_max_limit": 0, "request_reset_duration": "1h"}
                m.put_provider("azure", rate_limit=limit)
                m.create_route(name="gpt-4o", targets=["openai/gpt-4o", "azure/gpt-4o"])
                m.create_route(name="gpt-4o-b", targets=["azure/gpt-4o", "openai/gpt-4o"])
            await get_engine(settings).invalidate()
            answers = [
                await http.post("/v1/chat/completions", json=chat(model))
                for model in ("gpt-4o", "gpt-4o-b")
            ]
            get_engine(settings).hooks.drain()
            said = [
                a.headers.get("x-budget-shadow-refusal") or a.json()["error"]["code"]
                for a in answers
            ]
        reports[mode] = [
            (code, r["code"], (r["scope"] or {}).get("name"), r["provider"], r["model"])
            for code, r in zip(said, seen, strict=True)
        ]
    print(f"enforce {reports['enforce']}\nshadow  {reports['shadow']}")
    # (azure's limit of 0 is final, as openai's $0 budget is: each route answers its first
    # target's refusal)
    assert reports["enforce"] == [
        ("budget_exceeded", "budget_exceeded", "openai", "openai", "gpt-4o"),
        ("request_limit_exceeded", "request_limit_exceeded", "azure", "azure", "gpt-4o"),
    ]
    assert reports["shadow"] == reports["enforce"]


def test_hooks_emitted_first_from_two_threads_at_once_run_on_one_thread_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hook thread is made on first use: two threads emitting first at once (the outbound
    transports' and the WSGI middleware's direct paths emit from the caller's thread) make one,
    so the hooks still run one at a time in the order handed over."""
    from budget_middleware.engine import hooks as module

    made: list[int] = []
    hook_thread = module.HookThread

    def slow_to_make(*args: Any, **kwargs: Any) -> Any:
        made.append(threading.get_ident())
        time.sleep(0.05)  # the other thread looks meanwhile
        return hook_thread(*args, **kwargs)

    monkeypatch.setattr(module, "HookThread", slow_to_make)
    hooks = module.Hooks()
    heard: list[tuple[int, str]] = []
    hooks.add(on_settled=lambda item: heard.append((threading.get_ident(), item)))
    start = threading.Barrier(2)

    def emit(item: str) -> None:
        start.wait()
        hooks.emit(hooks.on_settled, item)

    threads = [threading.Thread(target=emit, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hooks.drain()
    print(f"hook threads made: {len(made)}; heard: {sorted(item for _, item in heard)}")
    assert len(made) == 1
    assert sorted(item for _, item in heard) == ["a", "b"]
    assert len({ident for ident, _ in heard}) == 1


async def test_an_alert_tells_the_window_its_crossing_found(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A budget of $1 every 3 s reaches 80 % while the store is away; it is back once the next
    window has begun and been charged. The alert is written then: it told the spend of its
    crossing ($0.90) in the window the store had then, whose start is after the alert's own
    `raised_at` ("reached 80 %" in a window that had not begun). It tells the crossing's window."""
    from datetime import UTC, datetime

    from sqlalchemy.exc import OperationalError

    hook = receiver()
    app = host_app(make_settings(alert_webhook_urls=hook.url))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        real = engine.alerts._insert
        away = {"until": float("inf")}

        def flaky(events: Any) -> Any:
            if time.time() < away["until"]:
                raise OperationalError("INSERT", {}, Exception("the store is away"))
            return real(events)

        engine.alerts._insert = flaky  # type: ignore[method-assign]
        budget = {"max_limit": 1.0, "reset_duration": "3s"}
        key = engine.manager.create_virtual_key(name="win", budgets=[budget])
        assert await spend(http, key.value, 0.9, 1) == [200]
        counter = engine.registry.counter("budget", key.budgets[0].id)
        assert counter is not None
        crossed = (counter.start, counter.end)
        await until(lambda: time.time() > crossed[1] + 0.1, 10.0)  # the window has ended
        assert await spend(http, key.value, 0.1, 1) == [200]  # charged in the next one
        away["until"] = 0.0  # the store is back
        await until(lambda: hook.delivered())
        alert = hook.delivered()[0]
    told = alert["budget"]
    start, end = (datetime.fromisoformat(told[n]) for n in ("period_start", "period_end"))
    raised_at = datetime.fromisoformat(alert["raised_at"])
    window = tuple(datetime.fromtimestamp(t, UTC) for t in crossed)
    print(f"crossed at {raised_at:%H:%M:%S.%f} in [{window[0]:%H:%M:%S.%f}, "
          f"{window[1]:%H:%M:%S.%f}); the alert told [{start:%H:%M:%S.%f}, {end:%H:%M:%S.%f}), "
          f"spent ${told['spent']}, last_reset {told['last_reset']}")  # fmt: skip
    assert told["spent"] == 0.9
    assert (start, end) == window and start <= raised_at < end
    assert datetime.fromisoformat(told["last_reset"]) == start
    assert datetime.fromisoformat(told["last_reset_at"]) == start


async def test_a_receiver_hanging_on_one_alert_holds_back_no_other_alert_s_retry(
    make_settings: Settings,
) -> None:
    """SPEC §14: a failed delivery is retried the first time within 5 s. Two alerts raised at
    once: one answered 500 at once, the other held by the receiver past the timeout. The first
    one's retry waited for the other's timeout (10 s with the real schedule: past the 5 s)."""
    posts: list[tuple[float, str, int]] = []  # when, which budget, status answered (0: held)
    lock = threading.Lock()
    hold = 6.0

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            budget = json.loads(body)["budget"]["id"]
            with lock:
                n = len(posts)
                status = 500 if n == 0 else 200
                held = n == 1
                posts.append((time.monotonic(), budget, 0 if held else status))
            if held:
                time.sleep(hold)
            try:
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        app = host_app(make_settings(alert_webhook_urls=url))
        async with running(app), client(app) as http:
            engine = engine_of(app)
            quick(engine, first_retry=0.2, timeout=4.0)
            key = engine.manager.create_virtual_key(name="fay", budgets=[{"max_limit": 1.0}])
            engine.manager.put_provider("openai", budgets=[{"max_limit": 1.0}])
            # One request takes both budgets past 0.8: two alerts, delivered in one round.
            assert await spend(http, key.value, 0.9, 1) == [200]
            await until(lambda: len(posts) >= 3, seconds=15)
            with lock:
                seen = list(posts)
            failed_at, failed_budget, _ = seen[0]
            retry_at = next(t for t, b, s in seen[1:] if b == failed_budget and s)
            print(f"posts: {[(round(t - failed_at, 2), s) for t, _, s in seen]}; the 500's "
                  f"retry came {retry_at - failed_at:.2f} s after it (receiver held one "
                  f"post {hold} s, timeout 4 s, first retry due after 0.2 s)")  # fmt: skip
            assert retry_at - failed_at < 3.0  # held back: past the 4 s timeout
    finally:
        server.shutdown()
        server.server_close()


async def test_a_receiver_that_hangs_delays_no_other_url_s_post(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Each URL of BUDGET_ALERT_WEBHOOK_URLS gets the alert (SPEC §14): posted one after the
    other, a first URL that hangs (a firewall dropping packets) held the second one's post
    back by the whole timeout, on every alert."""
    hung = receiver(slow_first=1, delay=6.0)
    healthy = receiver()
    app = host_app(make_settings(alert_webhook_urls=f"{hung.url},{healthy.url}"))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, timeout=4.0)
        key = engine.manager.create_virtual_key(name="gus", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        started = time.monotonic()
        await until(lambda: healthy.delivered())
        took = time.monotonic() - started
        await until(lambda: _all_delivered(engine, 1))
        alert = engine.manager.list_alerts()[0]
        gap = healthy.times[0] - hung.times[0]  # the receivers' own clocks, not the test's
        print(f"the healthy URL had the alert {took:.2f} s after the request, {gap:.3f} s after "
              f"the hung one (held 6 s, timeout 4 s); {alert['attempts']} attempts")  # fmt: skip
        # One after the other, the second post could only start once the first was given up at
        # the 4 s timeout. (The time from the request was asserted; a loaded machine passed it.)
        assert gap < 4.0
        assert len(healthy.delivered()) == 1 and len(hung.delivered()) == 1


async def test_alerts_pending_when_every_url_is_removed_are_given_up(
    make_settings: Settings,
) -> None:
    """An alert pending (its receiver down), then the process restarted with no webhook URL:
    nothing delivers it any more, and it stayed `pending` for ever (`GET /alerts`, the
    dashboard). Pending and attempted by no instance for `give_up_after`, it is `failed`."""
    app = host_app(make_settings(alert_webhook_urls=closed_port_url()))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine)
        key = engine.manager.create_virtual_key(name="una", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: engine.alerts.failed_deliveries >= 1)
    assert [a["delivery"] for a in engine.manager.list_alerts()] == ["pending"]
    restarted = get_engine(make_settings(cache_ttl_seconds=4))  # no webhook URL now
    quick(restarted, give_up_after=0.5)
    await restarted.ensure_started()
    try:
        await until(lambda: restarted.manager.list_alerts()[0]["delivery"] != "pending", 5.0)
        alert = restarted.manager.list_alerts()[0]
    finally:
        await restarted.shutdown()
    print(f"every URL removed: the pending alert is {alert['delivery']} "
          f"after {alert['attempts']} attempt(s)")  # fmt: skip
    assert alert["delivery"] == "failed"


async def test_an_instance_without_urls_leaves_another_s_retries_alone(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Two instances on one store, one with a webhook URL whose receiver fails 20 times (about
    5 s of retries), one with none, which gives up what no instance attempted for 2 s: it
    gives up no alert the other is retrying. (With 6 failures and 0.5 s, a CI run on a loaded
    machine saw the retrying instance idle past 0.5 s: given up after 4 attempts.)"""
    hook = receiver(fail_first=20)
    with_url = get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=5))
    without = get_engine(make_settings(cache_ttl_seconds=6))
    quick(with_url)
    quick(without, give_up_after=2.0)
    app = BudgetMiddleware(host_app(None), engine=with_url)
    try:
        for engine in (with_url, without):
            await engine.ensure_started()
        key = with_url.manager.create_virtual_key(name="val", budgets=[{"max_limit": 1.0}])
        async with client(app) as http:
            assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: [a["delivery"] for a in with_url.manager.list_alerts()]
                    in (["delivered"], ["failed"]), 30.0)  # fmt: skip
        alert = with_url.manager.list_alerts()[0]
    finally:
        for engine in (with_url, without):
            await engine.shutdown()
    statuses = [status for _, _, status in hook.posts]
    print(f"posts answered {statuses}; the alert {alert['delivery']} after "
          f"{alert['attempts']} attempts")  # fmt: skip
    assert alert["delivery"] == "delivered" and statuses == [500] * 20 + [200]


async def test_a_failing_url_beside_a_hung_one_is_retried_on_its_own_schedule(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """SPEC §14: a failed delivery is retried the first time within 5 s. One URL answers 500 at
    once, the other holds the post past the timeout (6 s here): the failing URL's retry waited
    for the hung one's timeout, then 3 s more (9 s). Each URL keeps its own schedule."""
    hung = receiver(slow_first=1, delay=8.0)
    failing = receiver(fail_first=1)
    app = host_app(make_settings(alert_webhook_urls=f"{hung.url},{failing.url}"))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        engine.alerts.timeout = 6.0  # the real schedule otherwise: 3 s, polled each second
        key = engine.manager.create_virtual_key(name="ned", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        assert await until(lambda: failing.delivered(), 15.0)
        gap = failing.times[1] - failing.times[0]
        await until(lambda: hung.delivered(), 20.0)
        await until(lambda: _all_delivered(engine, 1))
        alert = engine.manager.list_alerts()[0]
    print(f"the failing URL: posts {[s for _, _, s in failing.posts]}, retried {gap:.2f} s "
          f"after its 500 (the other URL held its post 8 s, timeout 6 s); the hung URL: posts "
          f"{[s for _, _, s in hung.posts]}; alert {alert['delivery']}, {alert['attempts']} "
          f"attempts")  # fmt: skip
    assert [s for _, _, s in failing.posts] == [500, 200]
    assert gap < 5.0
    assert [s for _, _, s in hung.posts] == [0, 200]


@pytest.mark.parametrize("raiser_urls", ["none", "another"])
async def test_an_alert_reaches_every_instance_s_urls_whichever_raised_it(
    make_settings: Settings, receiver: Callable[..., Receiver], raiser_urls: str
) -> None:
    """Two instances on one store with different webhook URLs (a roll-out adding one): the
    instance that raised an alert decided alone where it went: raised where no URL is set, it
    was `delivered` at once and the other instance's URL never had it; raised where only URL a
    is set, it was delivered there and URL b, set on the other instance, never had it."""
    a, b = receiver(), receiver()
    first = {"none": "", "another": a.url}[raiser_urls]
    urls = {"alert_webhook_urls": first} if first else {}
    raiser = get_engine(make_settings(**urls, cache_ttl_seconds=5))
    other = get_engine(make_settings(alert_webhook_urls=f"{a.url},{b.url}", cache_ttl_seconds=6))
    for engine in (raiser, other):
        quick(engine)
    app = BudgetMiddleware(host_app(None), engine=raiser)
    try:
        for engine in (raiser, other):
            await engine.ensure_started()
        key = raiser.manager.create_virtual_key(name="wes", budgets=[{"max_limit": 1.0}])
        async with client(app) as http:
            assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: b.delivered(), 5.0)
        await until(lambda: _all_delivered(raiser, 1) and a.delivered())
        await asyncio.sleep(0.3)  # nothing more may be posted
        alert = raiser.manager.list_alerts()[0]
    finally:
        for engine in (raiser, other):
            await engine.shutdown()
    print(f"raised by the instance with {raiser_urls} URL: URL a got {len(a.delivered())}, "
          f"URL b {len(b.delivered())}; {alert['delivery']} in {alert['attempts']} "
          f"attempt(s)")  # fmt: skip
    assert (len(a.delivered()), len(b.delivered())) == (1, 1)
    assert alert["delivery"] == "delivered"


async def test_thresholds_crossed_at_once_reach_a_url_in_order(make_settings: Settings) -> None:
    """One request takes a budget past 50 %, 80 % and 100 %, the next is refused: the four
    alerts were posted to the URL all at once, each in a task of its own, and a receiver (a
    Slack channel) showed "reached 100 %" or "exhausted" before "reached 80 %" (4 of 12 runs).
    Posts to one URL go in the order the alerts were raised, each once the one before it was
    answered (or after a second, so one that hangs still holds back no other)."""
    posts: list[tuple[float, float, str]] = []  # arrived, answered, which alert
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            arrived = time.monotonic()
            alert = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            time.sleep(0.2)  # a receiver that takes its time
            with lock:
                posts.append(
                    (arrived, time.monotonic(), f"{alert['type']} {alert.get('threshold')}")
                )
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        app = host_app(make_settings(alert_webhook_urls=url))
        async with running(app), client(app) as http:
            engine = engine_of(app)
            quick(engine, order_wait=5.0)  # a loaded machine's answer may take past 1 s
            budget = {"max_limit": 1.0, "alert_thresholds": [0.5, 0.8, 1.0]}
            key = engine.manager.create_virtual_key(name="ora", budgets=[budget])
            assert await spend(http, key.value, 1.2, 2) == [200, 402]
            await until(lambda: len(posts) >= 4)
            await until(lambda: _all_delivered(engine, 4))
    finally:
        server.shutdown()
        server.server_close()
    overlaps = sum(1 for a, b in itertools.pairwise(posts) if b[0] < a[1])
    print(f"posted in the order {[p[2] for p in posts]}; {overlaps} posts sent before the one "
          f"before them was answered")  # fmt: skip
    assert [p[2] for p in posts] == [
        "budget.threshold 0.5", "budget.threshold 0.8", "budget.threshold 1.0",
        "budget.exhausted None",
    ]  # fmt: skip
    assert overlaps == 0


_SCRIPT_WITH_A_HOOK_THAT_HANGS = """
import asyncio, json, sys, threading
import httpx
from budget_middleware import BudgetMiddleware, BudgetSettings

async def app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    body = json.dumps({"model": "gpt-4o", "choices": [], "usage": usage}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

def settled(record):
    print("on_settled ran", flush=True)

def refused(refusal):
    threading.Event().wait()  # a post to a chat service with no timeout, to a host that is gone

settings = BudgetSettings(database_url=sys.argv[1])
wrapped = BudgetMiddleware(app, settings=settings, on_settled=settled, on_refusal=refused)

async def main():
    transport = httpx.ASGITransport(wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        unknown = await http.post("/v1/chat/completions", json=body,
                                  headers={"x-budget-key": "nobody"})
        print(f"unknown key {unknown.status_code}", flush=True)
        served = await http.post("/v1/chat/completions", json=body)
        print(f"no key {served.status_code}", flush=True)

asyncio.run(main())
print("the script's loop ended", flush=True)
"""


def test_a_hook_that_hangs_keeps_no_process_from_ending(tmp_path: Path) -> None:
    """A plain hook that never returns (a post with no timeout): the hook thread was a
    ThreadPoolExecutor's, which the interpreter joins as it exits, so the script (or a server
    stopping) never ended. It ends, after waiting a bounded time for the hooks still queued
    (here `on_settled`, queued behind the hung `on_refusal`: left, and said so)."""
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT_WITH_A_HOOK_THAT_HANGS)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(script), f"sqlite:///{tmp_path / 'job.db'}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"still running after 30 s; it printed {out!r}")
    took = time.monotonic() - started
    print(f"exit {done.returncode} after {took:.1f} s: {done.stdout!r}; {done.stderr[-300:]!r}")
    assert done.returncode == 0, done.stderr
    assert "unknown key 401" in done.stdout and "the script's loop ended" in done.stdout
    assert "hook" in done.stderr  # the hooks left unrun are said


async def test_two_instances_on_one_store_raise_a_threshold_their_spend_crossed_together(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Two instances on one store (no Redis), each charging $0.45 of a $1 budget: each saw
    $0.45 when it charged, and once each had read the other's spend from the store ($0.90) no
    alert came, for as long as no request followed (a budget used up at the end of a day). An
    instance that reads a budget's spend past a threshold raises it."""
    hook = receiver()
    engines = [
        get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=t))
        for t in (0.5, 0.6)
    ]
    apps = [BudgetMiddleware(host_app(None), engine=e) for e in engines]
    try:
        for e in engines:
            quick(e)
            await e.ensure_started()
        key = engines[0].manager.create_virtual_key(name="zoe", budgets=[{"max_limit": 1.0}])
        statuses = []
        for app in apps:
            async with client(app) as http:
                statuses += await spend(http, key.value, 0.45, 1)
        await until(lambda: hook.delivered(), 5.0)
        spent = engines[0].manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
        kinds = [(a["type"], a.get("threshold")) for a in hook.delivered()]
    finally:
        for e in engines:
            await e.shutdown()
    print(f"two instances, {statuses}: ${spent:.2f} of $1.00 spent; delivered {kinds}")
    assert statuses == [200, 200]
    assert kinds == [("budget.threshold", 0.8)]


@pytest.mark.parametrize("owner", ["virtual_key", "team"])
async def test_a_threshold_set_below_the_spend_is_raised_with_no_request_after_it(
    make_settings: Settings, receiver: Callable[..., Receiver], owner: str
) -> None:
    """Two instances on one store; $0.60 spent of a $1 budget alerting at 90 %, then its
    thresholds set to 50 % and 90 % through the admin API of the other instance. A provider's
    or tag's budget raised 50 % within a cache TTL; a key's or team's never did while no request
    of the key came (its thresholds were read again only with the key): 0 alerts in 3 s."""
    hook = receiver()
    settings = [make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=t) for t in (0.5, 0.6)]
    engines = [get_engine(one) for one in settings]
    apps = [BudgetMiddleware(host_app(None), engine=e) for e in engines]
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(create_admin_app(settings[1])),
                              base_url="http://admin", headers=ADMIN)  # fmt: skip
    try:
        for e in engines:
            quick(e)
            await e.ensure_started()
        budget = {"max_limit": 1.0, "alert_thresholds": [0.9]}
        team = engines[0].manager.create_team(name="t", budgets=[budget] if owner == "team" else [])
        key = engines[0].manager.create_virtual_key(
            name="k", team_id=team.id, budgets=[budget] if owner == "virtual_key" else []
        )
        async with client(apps[0]) as http:
            statuses = await spend(http, key.value, 0.6, 1)
        path = f"/virtual-keys/{key.id}" if owner == "virtual_key" else f"/teams/{team.id}"
        new = {"budgets": [{"max_limit": 1.0, "alert_thresholds": [0.5, 0.9]}]}
        changed = (await admin.put(path, json=new)).status_code
        await until(lambda: hook.delivered(), 3.0)
        kinds = [(a["type"], a["owner"]["type"], a.get("threshold")) for a in hook.delivered()]
        rows = [(a["type"], a["threshold"]) for a in engines[0].manager.list_alerts()]
    finally:
        await admin.aclose()
        for e in engines:
            await e.shutdown()
    print(f"{owner}: {statuses}, thresholds changed ({changed}) at 60 % spent, no request "
          f"after: {len(rows)} alert(s) raised {rows}, delivered {kinds}")  # fmt: skip
    assert statuses == [200] and changed == 200
    assert rows == [("budget.threshold", 0.5)]
    assert kinds == [("budget.threshold", owner, 0.5)]


@asynccontextmanager
async def _two_instances(
    make_settings: Settings, webhook: str, redis: bool, ttls: tuple[float, float]
) -> AsyncIterator[tuple[list[BudgetEngine], list[BudgetMiddleware], httpx.AsyncClient]]:
    """Two started engines on one store (and one Redis, with `redis`), cache TTLs `ttls`,
    alerts posted to `webhook`; their apps, and an admin client of the second's. Shut down, and
    their Redis keys deleted, at the end."""
    if redis:
        need_redis()
    prefix = unique_prefix()
    shared = {"redis_url": REDIS_URL} if redis else {}
    settings = [make_settings(alert_webhook_urls=webhook, cache_ttl_seconds=t, **shared)
                for t in ttls]  # fmt: skip
    engines = [get_engine(one) for one in settings]
    apps = [BudgetMiddleware(host_app(None), engine=e) for e in engines]
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(create_admin_app(settings[1])),
                              base_url="http://admin", headers=ADMIN)  # fmt: skip
    try:
        for e in engines:
            if redis:
                use_prefix(e, prefix)
            quick(e)
            await e.ensure_started()
        yield engines, apps, admin
    finally:
        await admin.aclose()
        for e in engines:
            await e.shutdown()
        if redis:
            delete_prefix(REDIS_URL, prefix)


@pytest.mark.parametrize("owner", ["virtual_key", "team"])
@pytest.mark.parametrize("redis", [False, True], ids=["store", "redis"])
async def test_a_limit_lowered_below_a_threshold_s_spend_is_raised_with_no_request_after_it(
    make_settings: Settings, receiver: Callable[..., Receiver], owner: str, redis: bool
) -> None:
    """Two instances on one store; $0.60 spent of a $1 budget alerting at 80 %, then its limit
    lowered to $0.70 through the admin API of the other instance ($0.60 is 85.7 % of it). A
    threshold set below the spend so was raised within a cache TTL; a limit lowered so never
    was while no request of the key came (the limit was read again only with the key): 0 alerts
    in 3 s."""
    hook = receiver()
    async with _two_instances(make_settings, hook.url, redis, (0.5, 0.6)) as (
        engines,
        apps,
        admin,
    ):
        budget = {"max_limit": 1.0, "alert_thresholds": [0.8]}
        team = engines[0].manager.create_team(name="t", budgets=[budget] if owner == "team" else [])
        key = engines[0].manager.create_virtual_key(
            name="k", team_id=team.id, budgets=[budget] if owner == "virtual_key" else []
        )
        async with client(apps[0]) as http:
            statuses = await spend(http, key.value, 0.6, 1)
        await engines[0].flush()
        path = f"/virtual-keys/{key.id}" if owner == "virtual_key" else f"/teams/{team.id}"
        new = {"budgets": [{"max_limit": 0.7, "alert_thresholds": [0.8]}]}
        changed = (await admin.put(path, json=new)).status_code
        await until(lambda: hook.delivered(), 3.0)
        posts = hook.delivered()
        told = [(a["type"], a["owner"]["type"], a.get("threshold"), a["budget"]["spent"],
                 a["budget"]["amount"]) for a in posts]  # fmt: skip
        rows = [(a["type"], a["threshold"]) for a in engines[0].manager.list_alerts()]
    print(f"{owner} ({'redis' if redis else 'store'}): {statuses}, limit lowered ({changed}) "
          f"$1.00 -> $0.70 at $0.60 spent, no request after: {len(rows)} alert(s) raised "
          f"{rows}, delivered {told}")  # fmt: skip
    assert statuses == [200] and changed == 200
    assert rows == [("budget.threshold", 0.8)]
    assert told == [("budget.threshold", owner, 0.8, 0.6, 0.7)]


@pytest.mark.parametrize("redis", [False, True], ids=["store", "redis"])
async def test_a_threshold_the_spend_after_a_reset_elsewhere_reaches_is_raised_again(
    make_settings: Settings, receiver: Callable[..., Receiver], redis: bool
) -> None:
    """Two instances on one store; $0.60 spent of a $10 budget alerting at 5 % and 10 % raised
    5 %, the budget was reset through the admin API of the other instance, and $0.60 spent again
    at once on the first (its key read before the reset). Without Redis the new window's 5 %
    never came while no request followed (the reset was taken only with the key); with Redis it
    came telling "$1.20" spent, and 10 % with it: the old window's spend was counted in the new
    one. Now 5 % again, once, telling $0.60."""
    hook = receiver()
    async with _two_instances(make_settings, hook.url, redis, (2.0, 0.5)) as (
        engines,
        apps,
        admin,
    ):
        key = engines[0].manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 10.0, "alert_thresholds": [0.05, 0.1]}]
        )
        async with client(apps[0]) as http:
            statuses = await spend(http, key.value, 0.6, 1)
            await until(lambda: hook.delivered(), 3.0)
            reset = (await admin.post(f"/budgets/{key.budgets[0].id}/reset")).status_code
            statuses += await spend(http, key.value, 0.6, 1)
        first = hook.delivered()[0]["budget"]["period_start"]  # the window before the reset

        def since() -> list[tuple[float, float]]:
            return [(a["threshold"], a["budget"]["spent"]) for a in hook.delivered()
                    if a["budget"]["period_start"] != first]  # fmt: skip

        await until(since, 8.0)
        await asyncio.sleep(2.5)  # a TTL more: nothing else comes
        told = since()
        before = [(a["threshold"], a["budget"]["spent"]) for a in hook.delivered()
                  if a["budget"]["period_start"] == first]  # fmt: skip
        rows = [(a["type"], a["threshold"]) for a in engines[0].manager.list_alerts()]
        spent = engines[0].manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0]
    print(
        f"{'redis' if redis else 'store'}: {statuses}, reset ({reset}) between them; "
        f"${spent.spent:.2f} spent since; {len(rows)} alert(s) raised; delivered {before} "
        f"before the reset's window, {told} in it"
    )
    assert statuses == [200, 200] and reset == 200 and spent.spent == 0.6
    assert told == [(0.05, 0.6)]


@pytest.mark.parametrize("owner", ["virtual_key", "team"])
@pytest.mark.parametrize("redis", [False, True], ids=["store", "redis"])
async def test_a_charge_made_before_a_reset_elsewhere_is_learnt_raises_no_old_window_threshold(
    make_settings: Settings, receiver: Callable[..., Receiver], redis: bool, owner: str
) -> None:
    """Two instances on one store; $0.60 of a $10 budget alerting at 5 % and 10 % spent through
    the first (5 % raised), the budget reset through the other, and $0.60 spent at once through
    the first, which learns of the reset only at its next re-read (a TTL of 2 s). The store
    counts that $0.60 in the new window; the first took it as the old one's and raised 10 % of
    the old window, telling "$1.20" spent in a window that ended at $0.60. No threshold of the
    old window is raised past what the store holds in it: 5 % once there, 5 % once in the new
    one. A key's lifetime budget, and a team's daily one."""
    hook = receiver()
    async with _two_instances(make_settings, hook.url, redis, (2.0, 0.5)) as (
        engines,
        apps,
        admin,
    ):
        budget = {"max_limit": 10.0, "alert_thresholds": [0.05, 0.1]}
        team = engines[0].manager.create_team(
            name="t", budgets=[{**budget, "reset_duration": "1d"}] if owner == "team" else []
        )
        key = engines[0].manager.create_virtual_key(
            name="k", team_id=team.id, budgets=[budget] if owner == "virtual_key" else []
        )
        budget_id = (key if owner == "virtual_key" else team).budgets[0].id
        async with client(apps[0]) as http:
            statuses = await spend(http, key.value, 0.6, 1)
            await until(lambda: hook.delivered(), 3.0)
            await engines[0].flush()
            if redis:  # the reset's word through Redis comes late: as without it
                engines[0].counters.before_take = _nothing  # type: ignore[method-assign]
                engines[0].counters.read_live = _nothing  # type: ignore[method-assign]
                marks, engines[1].counters.mark_now = engines[1].counters.mark_now, _nothing
            reset = (await admin.post(f"/budgets/{budget_id}/reset")).status_code
            statuses += await spend(http, key.value, 0.6, 1)
            if redis:
                engines[1].counters.mark_now = marks  # type: ignore[method-assign]
        first = hook.delivered()[0]["budget"]["period_start"]  # the window before the reset
        await until(lambda: len({a["budget"]["period_start"] for a in hook.delivered()}) > 1, 8)
        await asyncio.sleep(2.5)  # a TTL more: nothing else comes
        posts = [(a["threshold"], a["budget"]["spent"], a["budget"]["period_start"] == first)
                 for a in hook.delivered()]  # fmt: skip
        texts = [a["text"] for a in hook.delivered()]
        rows = [(a["type"], a["threshold"]) for a in engines[0].manager.list_alerts()]
        owner_id = key.id if owner == "virtual_key" else team.id
        spent = engines[0].manager.list_budgets(owner_type=owner, owner_id=owner_id)[0]
    old = [(t, s) for t, s, before in posts if before]
    new = [(t, s) for t, s, before in posts if not before]
    print(f"{owner} ({'redis' if redis else 'store'}): {statuses}, reset ({reset}) between "
          f"them; ${spent.spent:.2f} spent since; {len(rows)} alert(s) raised; old window {old}, "
          f"new window {new}; texts {texts}")  # fmt: skip
    assert statuses == [200, 200] and reset == 200 and spent.spent == 0.6
    assert old == [(0.05, 0.6)]
    assert new == [(0.05, 0.6)]


async def test_an_alert_whose_budget_was_deleted_before_it_was_written_is_logged_not_lost(
    make_settings: Settings, receiver: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances on one store; one request through the first takes a key's $1 budget and
    its team's $1 budget past 50 %, and the key is deleted through the other before the first
    writes the alerts. The key's alert has no budget left to tell of (SPEC §9's fields): it is
    not raised, as before, but now says so on a log line naming it (it went without a word);
    the team's is raised and delivered."""
    caplog.set_level("INFO", logger="budget_middleware")
    hook = receiver()
    engines = [get_engine(make_settings(alert_webhook_urls=hook.url)) for _ in range(2)]
    app = BudgetMiddleware(host_app(None), engine=engines[0])
    try:
        for e in engines:
            quick(e)
            await e.ensure_started()
        budget = {"max_limit": 1.0, "alert_thresholds": [0.5]}
        team = engines[0].manager.create_team(name="crew", budgets=[budget])
        key = engines[0].manager.create_virtual_key(name="gone", team_id=team.id,
                                                    budgets=[budget])  # fmt: skip
        real = engines[0].alerts._insert

        def deleted_first(events: Any) -> Any:
            engines[1].manager.delete_virtual_key(key.id)
            return real(events)

        engines[0].alerts._insert = deleted_first  # type: ignore[method-assign]
        async with client(app) as http:
            statuses = await spend(http, key.value, 0.6, 1)
        await until(lambda: hook.delivered(), 5.0)
        await asyncio.sleep(0.3)
        told = [(a["owner"]["type"], a["threshold"], a["text"]) for a in hook.delivered()]
        rows = [(a["owner"]["type"], a["threshold"]) for a in engines[0].manager.list_alerts()]
    finally:
        for e in engines:
            await e.shutdown()
    lines = [r.getMessage() for r in caplog.records if "not raised" in r.getMessage()]
    print(f"{statuses}, key deleted before the alerts were written: raised {rows}, "
          f"delivered {told}; log {lines}")  # fmt: skip
    assert statuses == [200]
    assert rows == [("team", 0.5)] and [t[:2] for t in told] == [("team", 0.5)]
    assert len(lines) == 1
    assert "virtual_key 'gone'" in lines[0] and "deleted" in lines[0]


@pytest.mark.parametrize("redis", [False, True], ids=["store", "redis"])
async def test_a_re_read_begun_before_a_threshold_change_here_does_not_put_the_old_back(
    make_settings: Settings, receiver: Callable[..., Receiver], redis: bool
) -> None:
    """$0.40 of a $1 budget alerting at 50 % spent; a re-read of the counters reads the store,
    then its thresholds are set to 90 % through this instance and a request of the key ($0.20,
    60 % spent) takes them, and then the re-read ends. It put the 50 % it had read back over
    the 90 % (only a limit changed during the read was left alone), for a cache TTL, and
    raised 50 %, a threshold the budget no longer had. Now nothing is raised."""
    if redis:
        need_redis()
    prefix = unique_prefix()
    hook = receiver()
    shared = {"redis_url": REDIS_URL} if redis else {}
    engines = [get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=t,
                                        **shared)) for t in (0.3, 0.5)]  # fmt: skip
    engine = engines[0]
    app = BudgetMiddleware(host_app(None), engine=engine)
    read, held, go = engine.store.read_counters, threading.Event(), threading.Event()
    armed = {"on": False}

    def read_then_wait(*args: Any) -> Any:
        answer = read(*args)
        if armed["on"]:
            armed["on"] = False
            held.set()
            go.wait(10.0)
        return answer

    try:
        for e in engines:
            if redis:
                use_prefix(e, prefix)
            quick(e)
            await e.ensure_started()
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1.0, "alert_thresholds": [0.5]}]
        )
        engine.store.read_counters = read_then_wait  # type: ignore[method-assign]
        async with client(app) as http:
            statuses = await spend(http, key.value, 0.4, 1)
            armed["on"] = True
            await until(held.is_set, 5.0)
            new = {"budgets": [{"max_limit": 1.0, "alert_thresholds": [0.9]}]}
            after = engine.manager.update_virtual_key(key.id, new).budgets[0].id
            statuses += await spend(http, key.value, 0.2, 1)
            go.set()
            await asyncio.sleep(1.5)  # the re-read ends, and a TTL more
        rows = [(a["type"], a["threshold"]) for a in engine.manager.list_alerts()]
        texts = [a["text"] for a in hook.delivered()]
        thresholds = engine.alerts.thresholds.get(key.budgets[0].id)
    finally:
        go.set()
        for e in engines:
            await e.shutdown()
        if redis:
            delete_prefix(REDIS_URL, prefix)
    print(
        f"{'redis' if redis else 'store'}: {statuses}; thresholds 50 % -> 90 % during a "
        f"re-read, at 60 % spent: held {thresholds}; raised {rows}; delivered {texts}"
    )
    assert statuses == [200, 200] and after == key.budgets[0].id
    assert rows == [] and texts == []
    assert thresholds == (0.9,)


async def _nothing(*args: Any, **kwargs: Any) -> None:
    """A hook of a backend's that does nothing (the word it passes comes late)."""


async def test_a_post_retried_after_its_answer_was_lost_names_the_alert_it_repeats(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A receiver that took a post but answered after the timeout gets it again (a failed
    delivery is retried): the body named no alert, so it could not tell the repeat from a new
    alert of the same budget (the same threshold in a later window reads alike). It carries the
    alert's `id` (as `GET /alerts` lists it, and as `on_alert` gets it), signed with the rest."""
    hook = receiver(slow_first=1, delay=2.0)
    app = host_app(make_settings(alert_webhook_urls=hook.url, alert_secret=SECRET))
    async with running(app), client(app) as http:
        engine = engine_of(app)
        quick(engine, timeout=1.0)
        key = engine.manager.create_virtual_key(name="abe", budgets=[{"max_limit": 1.0}])
        assert await spend(http, key.value, 0.9, 1) == [200]
        await until(lambda: _all_delivered(engine, 1))
        listed = engine.manager.list_alerts()
    bodies = [json.loads(body) for _, body, _ in hook.posts]
    print(f"{len(bodies)} posts of one alert; ids in them {[b.get('id') for b in bodies]}, "
          f"listed {listed[0]['id']}")  # fmt: skip
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert bodies[0].get("id") == listed[0]["id"]


async def test_a_backlog_found_after_a_downtime_is_delivered_not_given_up(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """The only instance with the webhook URL down past `give_up_after` (10 minutes by default)
    with 25 alerts pending: its first round claims 20 and, in the same round, gave the other 5
    up as if no instance had the URL any more (`failed`, never posted). What an instance's own
    URLs are due is never given up by it."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store import alerts as stored

    hook = receiver()
    engine = get_engine(make_settings(alert_webhook_urls=hook.url))
    quick(engine, give_up_after=60.0)
    await engine.ensure_started()
    try:
        await engine.alerts.stop()  # this test runs the rounds
        then = datetime.now(UTC) - timedelta(minutes=5)  # raised, then the process was down
        alerts = [
            stored.NewAlert(
                type="budget.threshold", budget_id=f"b{i}", window_start=then, threshold=0.5,
                owner_type="team", owner_id="t", owner_name="t", raised_at=then, body="{}",
                delivery="pending",
            )
            for i in range(25)
        ]  # fmt: skip
        stored.raise_alerts(engine.store, alerts, [hook.url])
        await engine.alerts.deliver_due()
        await engine.alerts.give_up_unattended()  # the same round, as the task runs them
        await until(lambda: len(hook.delivered()) >= 20)
        for _ in range(3):
            await engine.alerts.deliver_due()
        await until(lambda: len(hook.delivered()) >= 25, 5.0)
        states = [a["delivery"] for a in engine.manager.list_alerts()]
    finally:
        await engine.shutdown()
    print(f"25 alerts pending after a 5-minute downtime: posted {len(hook.delivered())}, "
          f"states {sorted(set(states))}")  # fmt: skip
    assert len(hook.delivered()) == 25 and states == ["delivered"] * 25


_HELD = {"object": "chat.completion", "model": "gpt-4o", "choices": [],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost": 0.01}}  # fmt: skip


async def _a_then_b_then_c(
    settings: BudgetSettings, prefix: str, limits: dict[str, Any]
) -> dict[str, httpx.Response]:
    """A runs; B comes while A runs (and, gone on, runs until C is answered); A ends; C comes."""
    gates = {"A": asyncio.Event(), "B": asyncio.Event()}
    entered = {"A": asyncio.Event(), "B": asyncio.Event()}
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        name = request.headers.get("x-name", "")
        if name in gates:
            entered[name].set()
            await gates[name].wait()
        return _HELD

    engine = BudgetEngine(settings)
    if prefix:
        use_prefix(engine, prefix)
    app = BudgetMiddleware(upstream, engine=engine)
    # gpt-4o: $10 per million output tokens; 20,000 of them reserve $0.20
    body = {**chat("gpt-4o"), "max_tokens": 20_000}
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name=f"k-{settings.mode}", **limits)
        await engine.invalidate()

        def send(name: str) -> asyncio.Task[httpx.Response]:
            headers = {"authorization": f"Bearer {key.value}", "x-name": name}
            return asyncio.create_task(
                http.post("/v1/chat/completions", json=body, headers=headers)
            )

        a = send("A")
        await asyncio.wait_for(entered["A"].wait(), 10)
        b = send("B")
        waited = asyncio.ensure_future(entered["B"].wait())
        await asyncio.wait_for(asyncio.wait({b, waited}, return_when="FIRST_COMPLETED"), 10)
        waited.cancel()
        gates["A"].set()
        answers = {"A": await a}
        answers["C"] = await send("C")
        gates["B"].set()
        answers["B"] = await b
    return answers


@pytest.mark.parametrize("limit", ["concurrency", "reservation"])
@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_shadow_mode_would_refuse_what_enforce_refuses_after_a_hold_ends(
    make_settings: Callable[..., BudgetSettings], counters: str, limit: str
) -> None:
    """A key of one request in flight (or a $0.25 budget a request reserves $0.20 of): A runs,
    B comes (refused in enforce), A ends, C comes while B still runs. Enforce refuses B alone:
    B never held a slot or a reservation. Shadow mode said C would be refused too: B, gone on,
    held the slot (the reservation) in process (and on Redis the slot, in this instance's own
    count), which enforce never gives a refused request. Shadow mode reports what enforce
    answers: B, not C (SPEC §14)."""
    overrides: dict[str, Any] = {"reserve": True}
    prefix = ""
    if counters == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
        prefix = unique_prefix()
    if limit == "concurrency":
        limits: dict[str, Any] = {"rate_limit": {"max_concurrent_requests": 1}}
    else:
        limits = {"budgets": [{"max_limit": 0.25}]}
    seen: dict[str, list[str | None]] = {}
    for mode in ("enforce", "shadow"):
        settings = make_settings(mode=mode, **overrides)
        try:
            answers = await _a_then_b_then_c(settings, prefix and f"{prefix}{mode}:", limits)
        finally:
            if prefix:
                delete_prefix(REDIS_URL, f"{prefix}{mode}:")
        if mode == "enforce":
            seen[mode] = [
                None if answers[n].status_code == 200 else answers[n].json()["error"]["code"]
                for n in "ABC"
            ]
        else:
            assert [answers[n].status_code for n in "ABC"] == [200, 200, 200]
            seen[mode] = [answers[n].headers.get("x-budget-shadow-refusal") for n in "ABC"]
    print(f"{counters}, {limit}: enforce refused {seen['enforce']}, "
          f"shadow would refuse {seen['shadow']}")  # fmt: skip
    assert seen["enforce"][0] is None and seen["enforce"][1] is not None
    assert seen["shadow"] == seen["enforce"]


async def _off_key_then_on_key(
    settings: BudgetSettings, prefix: str, model: str = "gpt-4o"
) -> tuple[httpx.Response, httpx.Response]:
    """A team's turned-off key's request runs while its active key's comes (both naming
    `model`: a route's name when it is `routed`)."""
    gate, entered = asyncio.Event(), asyncio.Event()
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        if request.headers.get("x-hold"):
            entered.set()
            await gate.wait()
        return _HELD

    engine = BudgetEngine(settings)
    if prefix:
        use_prefix(engine, prefix)
    app = BudgetMiddleware(upstream, engine=engine)
    async with running(app), client(app) as http:
        m = engine.manager
        mode = settings.mode
        team = m.create_team(name=f"t-{mode}", rate_limit={"max_concurrent_requests": 1})
        off = m.create_virtual_key(name=f"off-{mode}", team_id=team.id, is_active=False)
        on = m.create_virtual_key(name=f"on-{mode}", team_id=team.id)
        if model.startswith("routed"):
            model = f"routed-{mode}"
            m.create_route(name=model, targets=["openai/gpt-4o", "azure/gpt-4o"])
        await engine.invalidate()
        held = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat(model),
                      headers={"authorization": f"Bearer {off.value}", "x-hold": "1"})
        )  # fmt: skip
        waited = asyncio.ensure_future(entered.wait())
        await asyncio.wait_for(asyncio.wait({held, waited}, return_when="FIRST_COMPLETED"), 10)
        waited.cancel()
        auth = {"authorization": f"Bearer {on.value}"}
        other = await http.post("/v1/chat/completions", json=chat(model), headers=auth)
        gate.set()
        return await held, other


@pytest.mark.parametrize("model", ["gpt-4o", "routed"])
@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_shadow_mode_gives_a_request_enforce_refuses_for_its_key_no_slot(
    make_settings: Callable[..., BudgetSettings], counters: str, model: str
) -> None:
    """A team of one request in flight, a key of it turned off: its request runs (403
    `virtual_key_inactive` in enforce, before any limit), and a request of the team's active
    key comes meanwhile. Enforce admits it; shadow mode said it would be refused
    (`concurrency_limit_exceeded`): the turned-off key's request, gone on, held the team's slot,
    which enforce never gives it. Its limits are not asked now, as enforce asks none. The same
    naming a route (SPEC §12): the turned-off key's request was admitted on its first target's
    limits, holding the slot, where one naming the target directly held none."""
    overrides: dict[str, Any] = {}
    prefix = ""
    if counters == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
        prefix = unique_prefix()
    seen: dict[str, list[str | None]] = {}
    for mode in ("enforce", "shadow"):
        settings = make_settings(mode=mode, **overrides)
        try:
            answers = await _off_key_then_on_key(settings, prefix and f"{prefix}{mode}:", model)
        finally:
            if prefix:
                delete_prefix(REDIS_URL, f"{prefix}{mode}:")
        if mode == "enforce":
            seen[mode] = [
                None if a.status_code == 200 else a.json()["error"]["code"] for a in answers
            ]
        else:
            assert [a.status_code for a in answers] == [200, 200]
            seen[mode] = [a.headers.get("x-budget-shadow-refusal") for a in answers]
    print(
        f"{counters}, {model}: enforce refused {seen['enforce']}, "
        f"shadow would refuse {seen['shadow']}"
    )
    assert seen["enforce"] == ["virtual_key_inactive", None]
    assert seen["shadow"] == seen["enforce"]


# Refused by enforce before any limit (SPEC §5): the first request's caller, what it asks for
# or its body; the settings it needs; its request's model and headers.
_BEFORE_LIMITS: dict[str, tuple[dict[str, Any], str, dict[str, str]]] = {
    "model_not_priced": ({"unpriced_models": "refuse"}, "acme/no-such-model-xyz", {}),
    "model_not_priced routed": ({"unpriced_models": "refuse"}, "routed", {}),
    "model_not_allowed": ({}, "openai/gpt-4o", {}),
    "provider_not_allowed": ({}, "anthropic/claude-sonnet-4-5", {}),
    "virtual_key_inactive": ({}, "openai/gpt-4o", {}),
    "virtual_key_expired": ({}, "openai/gpt-4o", {}),
    "unsupported_content_encoding": ({}, "openai/gpt-4o", {"content-encoding": "bzip2"}),
}


async def _refused_first_in_a_team(
    engine: BudgetEngine, team_id: str, code: str
) -> tuple[Any, Any, bytes, dict[str, str]]:
    """Two keys of the team (made in the engine's mode): the first's request, its body and
    headers, is one enforce refuses before any limit (`code`, `_BEFORE_LIMITS`); the second's
    are ordinary."""
    m, mode = engine.manager, engine.settings.mode
    first = m.create_virtual_key(
        name=f"first-{mode}",
        team_id=team_id,
        is_active=code != "virtual_key_inactive",
        provider_configs=[
            {"provider": "openai", "allowed_models": ["gpt-4o-mini"], "blocked_models": []}
        ]
        if code in ("model_not_allowed", "provider_not_allowed")
        else None,
    )
    if code == "virtual_key_expired":
        m.update_virtual_key(
            first.id, expires_at=(datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        )
    second = m.create_virtual_key(name=f"second-{mode}", team_id=team_id)
    _, model, headers = _BEFORE_LIMITS[code]
    if code.endswith(" routed"):  # no target it may use: a route of unpriced models
        model = f"routed-{mode}"
        m.create_route(name=model, targets=["acme/no-such-1", "acme/no-such-2"])
    await engine.invalidate()
    body = json.dumps(chat(model)).encode()
    if headers:
        body = bz2.compress(body)
    return first, second, body, headers


async def _refused_first_then_served(
    settings: BudgetSettings, prefix: str, code: str, limit: str
) -> tuple[list[httpx.Response], int]:
    """A team's key makes a request enforce refuses (`code`) before any limit, then another key
    of the team an ordinary one, under a team limit that one request (`requests`) or its
    answer's tokens (`tokens`) fill; and what the team's budget was charged (nano-USD)."""
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions() -> dict[str, Any]:
        return _HELD  # 2 tokens, $0.01

    engine = BudgetEngine(settings)
    if prefix:
        use_prefix(engine, prefix)
    app = BudgetMiddleware(upstream, engine=engine)
    async with running(app), client(app) as http:
        m = engine.manager
        mode = settings.mode
        rate = (
            {"request_max_limit": 1, "request_reset_duration": "1h"}
            if limit == "requests"
            else {"token_max_limit": 2, "token_reset_duration": "1h"}
        )
        team = m.create_team(name=f"t-{mode}", rate_limit=rate, budgets=[{"max_limit": 100}])
        first, second, body, headers = await _refused_first_in_a_team(engine, team.id, code)
        answers = [
            await http.post(
                "/v1/chat/completions",
                content=body,
                headers={"authorization": f"Bearer {first.value}", **headers},
            )
        ]
        budget = team.budgets[0].id

        def charged() -> int:
            counter = engine.registry.windows["budget"].get(budget)
            return 0 if counter is None else int(counter.value)

        if mode == "shadow":  # settled (its tokens counted, if they are) before the next
            recorded = await until(
                lambda: [r for r in m.usage(group_by="team").usage if r.key == team.id], 5.0
            )
            assert [r.requests for r in recorded] == [1]
        answers.append(
            await http.post(
                "/v1/chat/completions",
                json=chat("openai/gpt-4o"),
                headers={"authorization": f"Bearer {second.value}"},
            )
        )
        await until(lambda: charged() >= 10_000_000 * (len(answers) - (mode == "enforce")), 5.0)
        return answers, charged()


@pytest.mark.parametrize("limit", ["requests", "tokens"])
@pytest.mark.parametrize("code", list(_BEFORE_LIMITS))
@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_shadow_mode_counts_a_request_enforce_refuses_before_any_limit_on_none(
    make_settings: Callable[..., BudgetSettings], counters: str, code: str, limit: str
) -> None:
    """SPEC §14: shadow mode reports what enforce answers. A request enforce refuses before any
    limit (403 `model_not_priced` under `BUDGET_UNPRICED_MODELS=refuse`, a model or provider
    its key may not use, its key turned off or expired; 415 for a body in a coding read
    nowhere) goes on in shadow mode; it was counted on its team's request limit and, settled,
    its token limit, which enforce never touches: the next request, of another key of the
    team, was reported `request_limit_exceeded` (`token_limit_exceeded`) where enforce admits
    it. Nor is it charged to the team's budget, as in enforce (the money it spent is in its
    usage record: `test_shadow_mode_reports_the_budget_refusals_enforce_makes_after_…`)."""
    overrides: dict[str, Any] = {}
    prefix = ""
    if counters == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
        prefix = unique_prefix()
    overrides.update(_BEFORE_LIMITS[code][0])
    seen: dict[str, list[str | None]] = {}
    spend: dict[str, int] = {}
    for mode in ("enforce", "shadow"):
        settings = make_settings(mode=mode, **overrides)
        try:
            answers, spend[mode] = await _refused_first_then_served(
                settings, prefix and f"{prefix}{mode}:", code, limit
            )
        finally:
            if prefix:
                delete_prefix(REDIS_URL, f"{prefix}{mode}:")
        if mode == "enforce":
            seen[mode] = [
                None if a.status_code == 200 else a.json()["error"]["code"] for a in answers
            ]
        else:
            assert [a.status_code for a in answers] == [200, 200]
            seen[mode] = [a.headers.get("x-budget-shadow-refusal") for a in answers]
    print(
        f"{counters}, {code}, {limit}: enforce refused {seen['enforce']}, shadow would refuse "
        f"{seen['shadow']}; team charged ${spend['enforce'] / 1e9} (enforce), "
        f"${spend['shadow'] / 1e9} (shadow)"
    )
    assert seen["enforce"] == [code.split()[0], None]
    assert seen["shadow"] == seen["enforce"]
    assert (spend["enforce"], spend["shadow"]) == (10_000_000, 10_000_000)  # as enforce charges


async def _refused_first_then_budget(
    settings: BudgetSettings, prefix: str, code: str
) -> tuple[list[str | None], int, int]:
    """A team of a $0.01 budget: its key `first` makes a request enforce refuses (`code`)
    before any limit, then its key `second` two ordinary ones, each answered at $0.01. What
    each was refused (enforce) or would have been (shadow), what the team's budget was
    charged after the first two and what the usage records hold after all three (nano-USD)."""
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions() -> dict[str, Any]:
        return _HELD  # 2 tokens, $0.01

    engine = BudgetEngine(settings)
    if prefix:
        use_prefix(engine, prefix)
    app = BudgetMiddleware(upstream, engine=engine)
    mode = settings.mode
    seen: list[str | None] = []
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(name=f"t-{mode}", budgets=[{"max_limit": 0.01}])
        first, second, body, headers = await _refused_first_in_a_team(engine, team.id, code)
        sent = [(first, body, headers), (second, json.dumps(chat("openai/gpt-4o")).encode(), {})]
        sent.append(sent[-1])
        charged = served = 0

        def team_usage() -> UsageRow:
            rows = [r for r in m.usage(group_by="team").usage if r.key == team.id]
            return (
                rows[0]
                if rows
                else UsageRow(
                    key=team.id,
                    requests=0,
                    input_tokens=0,
                    output_tokens=0,
                    cached_tokens=0,
                    cost=0,
                )
            )

        for n, (key, content, extra) in enumerate(sent):
            answer = await http.post(
                "/v1/chat/completions",
                content=content,
                headers={
                    "authorization": f"Bearer {key.value}",
                    "content-type": "application/json",
                    **extra,
                },
            )
            if mode == "enforce":
                seen.append(None if answer.status_code == 200 else answer.json()["error"]["code"])
            else:
                assert answer.status_code == 200, answer.text
                seen.append(answer.headers.get("x-budget-shadow-refusal"))
            served += answer.status_code == 200
            await until(lambda s=served: team_usage().requests >= s, 5.0)  # settled before next
            if n == 1:  # what the budget was charged before the one enforce refuses
                counter = engine.registry.windows["budget"].get(team.budgets[0].id)
                charged = 0 if counter is None else int(counter.value)
        recorded = round(team_usage().cost * 1e9)
    return seen, charged, recorded


@pytest.mark.parametrize("code", list(_BEFORE_LIMITS))
@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_shadow_mode_reports_the_budget_refusals_enforce_makes_after_a_request_refused_first(
    make_settings: Callable[..., BudgetSettings], counters: str, code: str
) -> None:
    """SPEC §14: shadow mode reports what enforce would refuse. A request enforce refuses
    before any limit (`code`) was charged to its team's budget in shadow mode, which enforce
    never charges it: its $0.01 filled the team's $0.01 budget, and the next request, of
    another key of the team, was reported `budget_exceeded` where enforce admits it. Its cost
    is still in the usage records (`GET /usage`), the money spent."""
    overrides: dict[str, Any] = {}
    prefix = ""
    if counters == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
        prefix = unique_prefix()
    overrides.update(_BEFORE_LIMITS[code][0])
    seen: dict[str, list[str | None]] = {}
    charged: dict[str, int] = {}
    recorded: dict[str, int] = {}
    for mode in ("enforce", "shadow"):
        settings = make_settings(mode=mode, **overrides)
        try:
            seen[mode], charged[mode], recorded[mode] = await _refused_first_then_budget(
                settings, prefix and f"{prefix}{mode}:", code
            )
        finally:
            if prefix:
                delete_prefix(REDIS_URL, f"{prefix}{mode}:")
    disagree = sum(a != b for a, b in zip(seen["enforce"], seen["shadow"], strict=True))
    print(
        f"{counters}, {code}: enforce refused {seen['enforce']}, shadow would refuse "
        f"{seen['shadow']} ({disagree} disagreements); team budget charged "
        f"${charged['enforce'] / 1e9} (enforce), ${charged['shadow'] / 1e9} (shadow); usage "
        f"records ${recorded['enforce'] / 1e9} (enforce), ${recorded['shadow'] / 1e9} (shadow)"
    )
    assert seen["enforce"] == [code.split()[0], None, "budget_exceeded"]
    assert disagree == 0
    assert charged["shadow"] == charged["enforce"] == 10_000_000
    # every request served in shadow mode is in the usage records: the money spent
    assert (recorded["enforce"], recorded["shadow"]) == (10_000_000, 30_000_000)


# Lead: a random differential of shadow mode against enforce. The kinds of request a step may
# send: (key, model, content-encoding).
_DIFF_STEPS = [
    ("ann", "openai/gpt-4o", ""),
    ("ann", "openai/gpt-4o", ""),
    ("ann", "routed", ""),
    ("bob", "openai/gpt-4o", ""),
    ("bob", "routed", ""),
    ("cat", "openai/gpt-4o", ""),  # cat may use gpt-4o-mini alone
    ("cat", "anthropic/claude-sonnet-4-5", ""),
    ("cat", "openai/gpt-4o-mini", ""),
    ("dan", "openai/gpt-4o", ""),  # turned off
    ("ann", "acme/no-such-model-xyz", ""),  # no price, refused
    ("bob", "barred", ""),  # a route of unpriced models alone
    ("ann", "openai/gpt-4o", "bzip2"),
]


async def _shadow_diff_run(
    settings: BudgetSettings, prefix: str, seed: int, steps: int
) -> list[tuple[str, str | None]]:
    """One random sequence (`seed`) of requests by the keys of one team (a team budget and
    request limit; ann a request limit, bob a budget of his own; cat barred from models, dan
    turned off) through `settings`' mode: each step's request and what it was refused
    (enforce) or would have been (shadow)."""
    rng = random.Random(seed)
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        cost = float(request.headers["x-test-cost"])
        return {"object": "chat.completion", "model": "m", "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost": cost}}  # fmt: skip

    engine = BudgetEngine(settings)
    if prefix:
        use_prefix(engine, prefix)
    app = BudgetMiddleware(upstream, engine=engine)
    mode = settings.mode
    seen: list[tuple[str, str | None]] = []
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(
            name=f"t{seed}-{mode}",
            budgets=[{"max_limit": rng.choice([0.03, 0.05, 0.08])}],
            rate_limit={"request_max_limit": rng.randint(6, 14), "request_reset_duration": "1h"},
        )
        barred = [{"provider": "openai", "allowed_models": ["gpt-4o-mini"], "blocked_models": []}]
        keys = {
            "ann": m.create_virtual_key(
                name=f"ann{seed}-{mode}",
                team_id=team.id,
                rate_limit={
                    "request_max_limit": rng.randint(2, 6),
                    "request_reset_duration": "1h",
                    # 2 tokens an answer
                    **(
                        {"token_max_limit": tokens, "token_reset_duration": "1h"}
                        if (tokens := rng.choice([0, 6, 10]))
                        else {}
                    ),
                },
                budgets=[{"max_limit": 0.01, "soft": True}],
            ),
            "bob": m.create_virtual_key(
                name=f"bob{seed}-{mode}",
                team_id=team.id,
                budgets=[{"max_limit": rng.choice([0.01, 0.02, 0.03])}],
            ),
            "cat": m.create_virtual_key(
                name=f"cat{seed}-{mode}", team_id=team.id, provider_configs=barred
            ),
            "dan": m.create_virtual_key(name=f"dan{seed}-{mode}", team_id=team.id, is_active=False),
        }
        routes = {
            "routed": ["openai/gpt-4o", "azure/gpt-4o"],
            "barred": ["acme/no-such-1", "acme/no-such-2"],
        }
        for name, targets in routes.items():
            m.create_route(name=f"{name}{seed}-{mode}", targets=targets)
        await engine.invalidate()
        served = 0

        def team_requests() -> int:
            rows = [r for r in m.usage(group_by="team").usage if r.key == team.id]
            return rows[0].requests if rows else 0

        for _ in range(steps):
            who, model, coding = rng.choice(_DIFF_STEPS)
            cost = rng.choice([0.001, 0.004, 0.009, 0.015])
            name = f"{model}{seed}-{mode}" if model in routes else model
            body = json.dumps(chat(name)).encode()
            headers = {
                "authorization": f"Bearer {keys[who].value}",
                "content-type": "application/json",
                "x-test-cost": str(cost),
            }
            if coding:
                body = bz2.compress(body)
                headers["content-encoding"] = coding
            answer = await http.post("/v1/chat/completions", content=body, headers=headers)
            if mode == "enforce" and answer.status_code != 200:
                code = answer.json()["error"]["code"]
            else:
                assert answer.status_code == 200, answer.text
                code = answer.headers.get("x-budget-shadow-refusal")
                served += 1
                # settled (and charged) before the next, as in enforce
                await until(lambda s=served: team_requests() >= s, 5.0)
            if code is None:  # admitted: the target it went to (a route's), as enforce's
                code = f"admitted to {answer.headers.get('x-budget-route', model)}"
            seen.append((f"{who} {model}{' ' + coding if coding else ''} ${cost}", code))
    return seen


@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_shadow_mode_reports_what_enforce_refuses_in_random_sequences(
    make_settings: Callable[..., BudgetSettings], counters: str
) -> None:
    """SPEC §14: shadow mode says what enforce would refuse. The same random sequences of
    requests (keys of one team, a team budget and request limit, a key's own budget and
    request limit, a route, a key barred from models, a turned-off key, an unpriced model
    under `refuse`, a body in a coding read nowhere) through enforce and shadow: each request
    shadow reports otherwise than enforce answers is a disagreement. A request enforce refuses
    was charged in shadow mode (before any limit: to its budgets; by a limit: its request, cost
    and tokens), so the next ones of its team were reported `budget_exceeded` or
    `request_limit_exceeded` where enforce admits them (or refuses them for another limit):
    27 of 150 requests in process, 16 of 90 on Redis; now none. `SHADOW_DIFF_SEQUENCES`,
    `SHADOW_DIFF_FIRST`, `SHADOW_DIFF_LENGTH` and `SHADOW_DIFF_RESERVE` (0, 1) run others."""
    overrides: dict[str, Any] = {"unpriced_models": "refuse"}
    reserve = os.environ.get("SHADOW_DIFF_RESERVE")
    if reserve is not None:  # `BUDGET_RESERVE` (on by default)
        overrides["reserve"] = reserve == "1"
    if counters == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
    first = int(os.environ.get("SHADOW_DIFF_FIRST", "1"))
    sequences = int(os.environ.get("SHADOW_DIFF_SEQUENCES", "3" if counters == "redis" else "5"))
    length = int(os.environ.get("SHADOW_DIFF_LENGTH", "30"))
    disagreements: list[str] = []
    compared = 0
    for seed in range(first, first + sequences):
        runs: dict[str, list[tuple[str, str | None]]] = {}
        for mode in ("enforce", "shadow"):
            prefix = unique_prefix() if counters == "redis" else ""
            try:
                runs[mode] = await _shadow_diff_run(
                    make_settings(mode=mode, **overrides), prefix, seed, length
                )
            finally:
                if prefix:
                    delete_prefix(REDIS_URL, prefix)
        for n, ((step, enforced), (_, shadowed)) in enumerate(
            zip(runs["enforce"], runs["shadow"], strict=True)
        ):
            compared += 1
            if enforced != shadowed:
                disagreements.append(
                    f"seed {seed} step {n} ({step}): enforce {enforced}, shadow {shadowed}"
                )
    refused = sum(1 for _ in disagreements)
    print(
        f"{counters}: {sequences} sequences of {length}, {compared} requests compared, "
        f"{refused} disagreements"
    )
    for line in disagreements:
        print(" ", line)
    assert disagreements == []


async def test_on_refusal_and_get_refusals_carry_the_request_s_whole_identity(
    make_settings: Any,
) -> None:
    """SPEC §14: hooks are called "with ... the refusal (code, scope, request identity)"; §2
    names a request's identity: "virtual key id, team id, customer id, provider, model, tags".
    A key of team `research` of customer `acme`, tagged `product:chat`, refused by its team's
    budget: `on_refusal` (and `GET /refusals`, the same dict) told the key, provider and model,
    but neither the team, the customer nor the tags (an app that pages the team owning the
    refused caller, or counts refusals by tag, could not), while `request.state.budget` and
    the usage record carry all six."""
    settings = make_settings()
    app = host_app(settings)
    heard: list[dict[str, Any]] = []
    async with running(app), client(app) as http:
        engine = engine_of(app)
        engine.add_hooks(on_refusal=heard.append)
        m = engine.manager
        acme = m.create_customer(name="acme")
        team = m.create_team(name="research", customer_id=acme.id, budgets=[{"max_limit": 0}])
        key = m.create_virtual_key(name="ann", team_id=team.id)
        answer = await http.post(
            "/v1/chat/completions",
            json=chat("openai/gpt-4o", metadata={"tags": ["product:chat"]}),
            headers={"authorization": f"Bearer {key.value}"},
        )
        assert answer.status_code == 402, answer.text
        await until(lambda: heard, 5.0)
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_admin_app(settings)),
            base_url="http://a",
            headers={"authorization": "Bearer admin-secret"},
        )
        async with admin:
            listed = (await admin.get("/refusals")).json()["refusals"]
    told = heard[0]
    print(f"on_refusal: {told}")
    assert told["code"] == "budget_exceeded" and told["virtual_key_id"] == key.id
    assert listed[0] == told
    identity = {k: told.get(k, "<missing>") for k in ("team_id", "customer_id", "tags")}
    print(
        f"identity told: {identity}; expected team {team.id}, customer {acme.id}, "
        f"tags ['product:chat']"
    )
    assert identity == {"team_id": team.id, "customer_id": acme.id, "tags": ["product:chat"]}


@pytest.mark.parametrize(
    ("limit", "threshold", "cost", "n"),
    [(100, 0.55, 11, 5), (100, 0.28, 7, 4), (50, 0.68, 8.5, 4), (5000, 0.81, 810, 5)],
)
async def test_a_threshold_reached_exactly_is_raised(
    make_settings: Any, limit: float, threshold: float, cost: float, n: int
) -> None:
    """SPEC §14: "When a budget's spend reaches or crosses one of its thresholds ... one alert is
    raised". A $100 budget with `alert_thresholds: [0.55]`, spent $55.00 exactly (5 requests of
    $11): no alert. `core.alerts.threshold_nanos` computes the spend that reaches a threshold in
    binary floating point, `ceil(100e9 * 0.55 - 1e-6)`, and 100e9 * 0.55 is 55000000000.00001:
    $55.000000001, one nano-dollar above the spend that reaches 55 %. (0.28 of $100, 0.68 of $50,
    0.81 of $5,000 and 52 more pairs of a round budget and a whole percent do the same.)"""
    settings = make_settings()
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(
            name="exact",
            budgets=[{"max_limit": limit, "reset_duration": "1M", "alert_thresholds": [threshold]}],
        )
        for _ in range(n):
            answer = await http.post(
                "/v1/chat/completions",
                json=chat("gpt-4o"),
                headers={"authorization": f"Bearer {key.value}", "x-mock-cost": str(cost)},
            )
            assert answer.status_code == 200, answer.text
        await engine.flush()
        spent = engine.manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
        alerts = await until(lambda: engine.manager.list_alerts(owner_id=key.id), 3.0)
    print(
        f"${spent} spent of ${limit} (threshold {threshold}: ${limit * threshold:g}); "
        f"alerts raised: {[(a['type'], a['threshold']) for a in alerts]}"
    )
    assert spent == pytest.approx(limit * threshold)
    assert [(a["type"], a["threshold"]) for a in alerts] == [("budget.threshold", threshold)]


async def test_a_provider_s_alerts_are_listed_by_any_spelling_of_its_name(
    make_settings: Any,
) -> None:
    """`GET /alerts?owner_id=OpenAI` listed none of provider openai's alerts (`openai`: all of
    them), where a provider is read by any spelling of its name (a fault hunt's)."""
    settings = make_settings()
    app = host_app(settings)
    async with running(app), client(app) as http:
        engine = engine_of(app)
        engine.manager.put_provider(
            "openai", budgets=[{"max_limit": 10, "alert_thresholds": [0.5]}]
        )
        await engine.invalidate()
        answer = await http.post(
            "/v1/chat/completions", json=chat("openai/gpt-4o"), headers={"x-mock-cost": "6"}
        )
        assert answer.status_code == 200, answer.text
        await engine.flush()
        await until(lambda: engine.manager.list_alerts(owner_id="openai"), 3.0)
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_admin_app(settings)),
            base_url="http://a",
            headers={"authorization": "Bearer admin-secret"},
        )
        async with admin:
            counts = [
                (await admin.get("/alerts", params={"owner_id": name})).json()["count"]
                for name in ("openai", "OpenAI")
            ]
    print("alerts listed by openai, by OpenAI:", counts)
    assert counts == [1, 1]


class SlowBodyReceiver:
    """A webhook receiver that takes each post with `200 OK` at once, and then sends the body
    its headers announce slowly (`hold` seconds): a receiver that flushes its answer's status
    before its work is done (a streaming framework, a proxy in front of it)."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.posts: list[bytes] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            with self.lock:
                self.posts.append(body)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n")
                time.sleep(self.hold)  # the status is out: the alert was taken
                conn.sendall(b"ok")
            except OSError:
                pass  # the sender stopped waiting for the body

    def close(self) -> None:
        self.closed = True
        self.sock.close()


async def test_a_receiver_that_answers_200_before_its_body_is_posted_once(
    make_settings: Settings,
) -> None:
    """SPEC §14: a delivery fails when there is no answer or a status >= 300, and is never
    retried after a success. A receiver that answered `200 OK` at once but whose body came later
    than the sender's timeout was counted failed and posted the alert again, and again."""
    hook = SlowBodyReceiver(hold=2.5)
    settings = make_settings(alert_webhook_urls=hook.url)
    app = host_app(settings)
    admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(create_admin_app(settings)),
        base_url="http://a",
        headers=ADMIN,
    )
    try:
        async with running(app), client(app) as http, admin:
            engine = engine_of(app)
            quick(engine, timeout=1.0)
            key = engine.manager.create_virtual_key(name="ivy", budgets=[{"max_limit": 1.0}])
            assert await spend(http, key.value, 0.85, 1) == [200]  # 85 %: the 0.8 alert
            await until(lambda: hook.posts)
            # The receiver's status came at once; its body 2.5 s later. Time for a retry (the
            # first within 0.05 s of a failure here) and then some.
            await until(lambda: len(hook.posts) > 1, 4.0)
            listed = (await admin.get("/alerts")).json()["alerts"]
            told = [(a["type"], a["threshold"], a["delivery"], a["attempts"]) for a in listed]
            print(f"receiver answered 200 at once, its body after 2.5 s: {len(hook.posts)} "
                  f"posts of one alert; GET /alerts: {told}")  # fmt: skip
            assert len(hook.posts) == 1
            await until(lambda: engine.manager.list_alerts()[0]["delivery"] == "delivered", 4.0)
            alert = engine.manager.list_alerts()[0]
            assert (alert["delivery"], alert["attempts"]) == ("delivered", 1)
    finally:
        hook.close()


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1 (an egress proxy's role): it takes `POST
    http://host/path` in absolute form and passes it on to `target` (a port on 127.0.0.1),
    whatever the host; the hosts it was asked for are kept."""

    def __init__(self, target: int) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hosts: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                proxy.hosts.append(httpx.URL(self.path).host)
                upstream = http.client.HTTPConnection("127.0.0.1", target, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request("POST", httpx.URL(self.path).raw_path.decode(), body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_alerts_reach_a_receiver_through_the_environment_s_proxy(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §14: alerts are delivered by httpx, which sends through the proxy the environment
    names (`HTTP_PROXY`/`HTTPS_PROXY`, `NO_PROXY`), as servers whose egress goes through one
    reach Slack. The delivery's client was made with `trust_env=False`: it went direct, to a
    host only the proxy can reach, and the alert was never delivered (failed after 10 minutes
    of retries)."""
    hook = Receiver()
    proxy = ForwardProxy(int(hook.url.rsplit(":", 1)[1].split("/")[0]))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    outside = "http://hooks.example.invalid/hook"  # resolves nowhere: only the proxy reaches it
    app = host_app(make_settings(alert_webhook_urls=outside))
    try:
        async with running(app), client(app) as http:
            engine = engine_of(app)
            quick(engine)
            key = engine.manager.create_virtual_key(name="joy", budgets=[{"max_limit": 1.0}])
            assert await spend(http, key.value, 0.85, 1) == [200]  # 85 %: the 0.8 alert
            await until(lambda: hook.delivered() or engine.alerts.failed_deliveries >= 3, 5.0)
            alert = engine.manager.list_alerts()[0]
            print(f"egress through HTTP_PROXY: the proxy was asked for {proxy.hosts}; the "
                  f"receiver took {len(hook.delivered())} post(s); "
                  f"{engine.alerts.failed_deliveries} failed attempt(s); GET /alerts: "
                  f"{alert['delivery']}")  # fmt: skip
            assert [a["threshold"] for a in hook.delivered()] == [0.8]
            assert proxy.hosts == ["hooks.example.invalid"]
    finally:
        proxy.close()
        hook.close()


async def test_a_provider_config_s_alert_with_a_long_key_name_is_raised_and_blocks_no_other(
    tmp_path: Path,
) -> None:
    """SPEC §14: an alert is raised once its threshold is reached, for every budget: a key's
    provider config included. Its owner is named `<key name>/<provider>`, up to 200 + 1 + 100
    characters for names the admin API accepts, and the alerts table held 200: on PostgreSQL
    its insert failed (`StringDataRightTruncation`), and with it, every round, the batch of
    every alert queued with it, another key's too: none was ever raised nor delivered."""
    need_postgres()
    reset_postgres()
    hook = Receiver()
    settings = BudgetSettings(
        database_url=POSTGRES_URL,
        admin_key="admin-secret",
        flush_interval_seconds=0.05,
        alert_webhook_urls=hook.url,
    )
    app = host_app(settings)
    try:
        async with running(app), client(app) as http:
            engine = engine_of(app)
            quick(engine)
            m = engine.manager
            long_name = "research-assistant-" + "x" * 181  # 200 characters, as accepted
            per_provider = m.create_virtual_key(
                name=long_name,
                provider_configs=[
                    {
                        "provider": "openai",
                        "budgets": [{"max_limit": 1.0, "alert_thresholds": [0.5]}],
                    }
                ],
            )
            other = m.create_virtual_key(
                name="bob", budgets=[{"max_limit": 1.0, "alert_thresholds": [0.5]}]
            )
            # In one round of the alert task: both alerts raised in one batch.
            assert await spend(http, per_provider.value, 0.6, 1) == [200]
            assert await spend(http, other.value, 0.6, 1) == [200]
            await until(lambda: len(hook.delivered()) >= 2, 5.0)
            listed = engine.manager.list_alerts()
            named = sorted(a["owner"]["name"][:24] for a in listed)
            print(f"alerts raised: {named}; delivered {len(hook.delivered())}; alert task's "
                  f"queue still holds {len(engine.alerts.queue)}")  # fmt: skip
            assert sorted(a["owner"]["type"] for a in listed) == ["provider_config", "virtual_key"]
            assert len(hook.delivered()) == 2
            owner = next(a for a in hook.delivered() if a["owner"]["type"] == "provider_config")
            assert owner["owner"]["name"] == f"{long_name}/openai"  # the body names it whole
    finally:
        hook.close()


_SCRIPT_SPENDING_ITS_BUDGET = """
import asyncio, sys
import httpx2
from budget_middleware import (BudgetSettings, BudgetSyncTransport, BudgetTransport, charge_to,
                               get_engine)

USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}

def provider(request):
    return httpx2.Response(200, json={"model": "gpt-4o", "choices": [], "usage": USAGE})

settings = BudgetSettings(database_url=sys.argv[1], alert_webhook_urls=sys.argv[2])
# $0.0035 a call: the fifth reaches 80 % of $0.02, the sixth 100 %, the seventh is refused
key = get_engine(settings).manager.create_virtual_key(name="job", budgets=[{"max_limit": 0.02}])
url = "https://api.openai.com/v1/chat/completions"
body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

async def job():
    transport = BudgetTransport(httpx2.MockTransport(provider), settings)
    async with httpx2.AsyncClient(transport=transport) as http:
        with charge_to(virtual_key_id=key.id):
            return [(await http.post(url, json=body)).status_code for _ in range(7)]

if sys.argv[3] == "asyncio.run":
    statuses = asyncio.run(job())
else:
    transport = BudgetSyncTransport(httpx2.MockTransport(provider), settings)
    with httpx2.Client(transport=transport) as http, charge_to(virtual_key_id=key.id):
        statuses = [http.post(url, json=body).status_code for _ in range(7)]
print(statuses)
"""


@pytest.mark.parametrize("client_kind", ["asyncio.run", "sync"])
def test_a_job_that_spends_its_budget_and_ends_posts_its_alerts(
    tmp_path: Path, receiver: Callable[..., Receiver], client_kind: str
) -> None:
    """A batch job (the outbound transport's, in a script) crosses 80 %, 100 % and is refused,
    then ends. Its alerts were raised in the store and left there: no receiver heard of them
    until another process with the URL started (the next night's run). They are posted as it
    ends."""
    hook = receiver()
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT_SPENDING_ITS_BUDGET)
    url = f"sqlite:///{tmp_path / 'job.db'}"
    done = subprocess.run(
        [sys.executable, str(script), url, hook.url, client_kind],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = sorted((a["type"], a.get("threshold") or 0) for a in hook.delivered())
    print(f"{client_kind}: {done.stdout.strip()}; the receiver got {got}")
    assert "402" in done.stdout
    assert got == [("budget.exhausted", 0), ("budget.threshold", 0.8), ("budget.threshold", 1.0)]


async def test_an_alert_tells_the_spend_its_crossing_found_on_redis(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """As above with Redis: a $0.20 budget alerting at 50 %, 20 requests of $0.01 at once. The
    charge that crosses is made here before Redis answers, and the budget was looked at once it
    answered: the others' charges made here meanwhile were in the spend it told ("$0.11 of
    $0.20" and more for a crossing at $0.10). It tells the spend of its crossing: $0.10."""
    need_redis()
    prefix = unique_prefix()
    hook = receiver()
    engine = get_engine(make_settings(redis_url=REDIS_URL, alert_webhook_urls=hook.url))
    use_prefix(engine, prefix)
    quick(engine)
    app = BudgetMiddleware(host_app(None), engine=engine)
    try:
        await engine.ensure_started()
        budget = {"max_limit": 0.2, "soft": True, "alert_thresholds": [0.5]}
        key = engine.manager.create_virtual_key(name="k", budgets=[budget])
        async with client(app) as http:
            groups = await asyncio.gather(*(spend(http, key.value, 0.01, 1) for _ in range(20)))
        statuses = [status for group in groups for status in group]
        await until(lambda: len(hook.delivered()) >= 1, 5.0)
        alert = hook.delivered()[0]
    finally:
        await engine.shutdown()
        delete_prefix(REDIS_URL, prefix)
    print(f"{statuses}; the 50 % alert told ${alert['budget']['spent']:.2f}: {alert['text']}")
    assert statuses == [200] * 20
    assert alert["budget"]["spent"] == 0.1
    assert "$0.1000 of $0.2000" in alert["text"]


async def test_a_refusal_made_before_a_reset_elsewhere_is_learnt_raises_no_old_window_exhaustion(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Two instances on one store; $0.60 of a $1 budget spent through the first, the budget
    reset through the other, then $0.60 and $0.60 more asked of the first, which learns of the
    reset only at its next re-read (a TTL of 10 s): it took the store's new window's $0.60 as the
    old one's $1.20 and refused the third. That refusal raised `budget.exhausted` of the old
    window, "has spent $1.20 of $1.00; requests are refused", after the operator's reset, of a
    window that ended at $0.60 and refused nothing. No exhaustion is raised for it: the new
    window is not exhausted either ($0.60 of $1). (With Redis the reset's word reaches the
    first at once: its admission in Redis finds the new window.)"""
    hook = receiver()
    async with _two_instances(make_settings, hook.url, False, (10.0, 0.5)) as (
        engines,
        apps,
        admin,
    ):
        key = engines[0].manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1.0, "alert_thresholds": [2.0]}]
        )
        async with client(apps[0]) as http:
            statuses = await spend(http, key.value, 0.6, 1)
            await engines[0].flush()
            reset = (await admin.post(f"/budgets/{key.budgets[0].id}/reset")).status_code
            statuses += await spend(http, key.value, 0.6, 2)
            await until(lambda: not engines[0].alerts.queue, 3.0)  # written, or not raised
            await asyncio.sleep(0.5)  # its delivery, had it been raised
        rows = [(a["type"], a["delivery"]) for a in engines[0].manager.list_alerts()]
        texts = [a["text"] for a in hook.delivered()]
        await engines[0].flush()
        spent = engines[0].manager.list_budgets(owner_type="virtual_key", owner_id=key.id)[0]
    print(f"{statuses}, reset ({reset}) after the first; ${spent.spent:.2f} spent since; "
          f"alerts {rows}, delivered {texts}")  # fmt: skip
    assert statuses == [200, 200, 402] and reset == 200 and spent.spent == 0.6
    assert rows == [] and texts == []


@pytest.mark.parametrize("raised_by", ["without", "sender"])
async def test_an_alert_raised_while_the_only_instance_with_the_url_was_down_reaches_it_after(
    make_settings: Settings, receiver: Callable[..., Receiver], raised_by: str
) -> None:
    """Two instances on one store, only one (the sender) with the webhook URL. The sender down
    longer than `give_up_after` (10 minutes by default; 0.5 s here): an alert raised meanwhile
    by the instance without the URL was listed `delivered` at once in 0 attempts ("no webhook"
    in the CLI and the dashboard) though no URL had it, and was never posted (the sender, back,
    took only the last 10 minutes' alerts); one the sender raised itself as it went down was
    given up by the other instance (`failed`, never posted). Either is `pending` as raised,
    `failed` once given up; back, the sender posts the alerts raised while it was down."""
    hook = receiver()
    url = {"alert_webhook_urls": hook.url}
    without = get_engine(make_settings(cache_ttl_seconds=5))
    sender = get_engine(make_settings(**url, cache_ttl_seconds=6))
    quick(without, give_up_after=0.5)
    quick(sender, give_up_after=0.5)
    raiser = without if raised_by == "without" else sender
    app = BudgetMiddleware(host_app(None), engine=raiser)
    try:
        for engine in (without, sender):
            await engine.ensure_started()
        key = without.manager.create_virtual_key(
            name="dora", budgets=[{"max_limit": 1.0, "alert_thresholds": [0.5, 0.8]}]
        )
        async with client(app) as http:
            assert await spend(http, key.value, 0.6, 1) == [200]  # 50 %: the sender is up
            await until(lambda: len(hook.delivered()) == 1, 5.0)
            await until(lambda: _all_delivered(without, 1))
            await sender.alerts.stop()  # the sender goes down (its engine stays for the test)
            assert await spend(http, key.value, 0.25, 1) == [200]  # 80 %: the sender is down
            if raiser is without:
                await until(lambda: len(without.manager.list_alerts()) == 2, 5.0)
        if raiser is sender:
            await sender.alerts.raise_queued()  # raised as it went down, not yet posted
        raised_as = without.manager.list_alerts()[0]["delivery"]  # pending (or given up)
        if raiser is sender:
            await asyncio.sleep(1.5)  # the other instance gives it up meanwhile
            await without.alerts.give_up_unattended()
        else:
            await asyncio.sleep(1.0)  # down past `give_up_after`
        while_down = {a["threshold"]: a["delivery"] for a in without.manager.list_alerts()}
        sender.alerts.start(asyncio.get_running_loop())  # back
        await until(lambda: len(hook.delivered()) >= 2, 5.0)
        await until(lambda: _all_delivered(without, 2), 5.0)
        await asyncio.sleep(0.3)  # nothing more may be posted
        after = {a["threshold"]: a["delivery"] for a in without.manager.list_alerts()}
    finally:
        for engine in (without, sender):
            await engine.shutdown()
    got = [alert["threshold"] for alert in hook.delivered()]
    print(f"raised by {raised_by} while the sender was down: {raised_as} as raised, "
          f"{while_down[0.8]} then; the URL got thresholds {got}; after the sender came back: "
          f"{after}")  # fmt: skip
    assert raised_as != "delivered" and while_down[0.8] == "failed"
    assert got == [0.5, 0.8] and after == {0.5: "delivered", 0.8: "delivered"}


async def test_a_url_whose_every_alert_was_given_up_gets_them_when_its_instance_is_back(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """Two instances on one store, only one (the sender) with the webhook URL. The sender
    raised an alert as it went down, never posted, and the other instance gave it up while
    the sender stayed down past `give_up_after` (10 minutes by default; 0.5 s here). Giving it
    up deleted the URL's only delivery: the store no longer knew the URL, and the sender, back,
    took it as new (the last `give_up_after`'s alerts only): the alert, `failed`, never
    reached it. Back, the sender posts it, as every alert of the last day its URL lacks."""
    hook = receiver()
    without = get_engine(make_settings(cache_ttl_seconds=5))
    sender = get_engine(make_settings(alert_webhook_urls=hook.url, cache_ttl_seconds=6))
    quick(without, give_up_after=0.5)
    quick(sender, give_up_after=0.5)
    app = BudgetMiddleware(host_app(None), engine=sender)
    try:
        for engine in (without, sender):
            await engine.ensure_started()
        await sender.alerts.stop()  # the sender goes down as its last request crosses 50 %
        key = without.manager.create_virtual_key(
            name="ezra", budgets=[{"max_limit": 1.0, "alert_thresholds": [0.5]}]
        )
        async with client(app) as http:
            assert await spend(http, key.value, 0.6, 1) == [200]
        await sender.alerts.raise_queued()  # raised as it went down, not posted
        await until(lambda: without.manager.list_alerts()[0]["delivery"] == "failed", 5.0)
        await asyncio.sleep(0.6)  # down past `give_up_after` since then
        sender.alerts.start(asyncio.get_running_loop())  # back
        await until(lambda: _all_delivered(without, 1), 3.0)
        await asyncio.sleep(0.3)  # nothing more may be posted
    finally:
        for engine in (without, sender):
            await engine.shutdown()
    alert = without.manager.list_alerts()[0]
    print(f"given up while the sender was down, then the sender back: the URL got "
          f"{len(hook.delivered())} post(s); the alert {alert['delivery']} in "
          f"{alert['attempts']} attempt(s)")  # fmt: skip
    assert len(hook.delivered()) == 1 and alert["delivery"] == "delivered"


def _day_delivered(engine: BudgetEngine, now: float) -> bool:
    """Whether the 3 newest alerts listed were raised at `now` and recorded delivered."""
    alerts = engine.manager.list_alerts(limit=3)
    return len(alerts) == 3 and all(
        a["delivery"] == "delivered" and datetime.fromisoformat(a["raised_at"]).timestamp() == now
        for a in alerts
    )


def _rows(engine: BudgetEngine) -> dict[str, int]:
    """The alert tables' rows, by table, and the deliveries by state."""
    from sqlalchemy import text

    with engine.store.engine.connect() as conn:
        counts = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("bm_alerts", "bm_alert_deliveries")
        }
        for state, n in conn.execute(
            text("SELECT delivery, count(*) FROM bm_alert_deliveries GROUP BY delivery")
        ).all():
            counts[state] = n
    return counts


async def test_deliveries_and_alerts_of_windows_ended_over_30_days_ago_are_pruned(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A daily $1 budget whose 80 %, 100 % and exhaustion alerts are raised and delivered each
    day, for 40 simulated days (the engine's clock), to URL a, and for the first 5 to URL b
    too (then removed from the settings): `bm_alert_deliveries` kept every delivery for ever
    (a row an alert and URL: 135 after 40 days), and `bm_alerts` every alert (a row a day and
    threshold: 120, listed by `GET /alerts`, never pruned). The flusher's sweep prunes, once
    an hour, the deliveries of settled alerts raised more than ALERT_DELIVERIES_KEPT (30 days)
    ago, but each URL's newest (b stays known to the store; a's kept one was any of its 120,
    its greatest random id's), then the alerts raised and out of their window more than
    ALERTS_KEPT (30 days) ago, but the one b's kept delivery names: days 0-9's 30, less 1."""
    from sqlalchemy import text

    from budget_middleware.core.times import from_ts
    from budget_middleware.engine.engine import PRUNE_SECONDS
    from budget_middleware.store.alerts import url_key

    days = 40
    a, b = receiver(), receiver()
    now = [float(int(time.time()) - days * 86400)]  # the last day ends now: deliveries due
    first = now[0]
    setup = BudgetEngine(make_settings())  # the key made at the simulated start
    key = setup.manager.create_virtual_key(
        name="dora", budgets=[{"max_limit": 1.0, "reset_duration": "1d"}]
    )
    with setup.store.engine.begin() as conn:
        conn.execute(text("UPDATE bm_budgets SET last_reset = :at"), {"at": from_ts(now[0])})
    setup.store.dispose()
    for urls, phase in ((f"{a.url},{b.url}", range(5)), (a.url, range(5, days))):
        engine = BudgetEngine(make_settings(alert_webhook_urls=urls), clock=lambda: now[0])
        quick(engine)
        app = BudgetMiddleware(host_app(None), engine=engine)
        async with running(app), client(app) as http:
            for day in phase:
                assert await spend(http, key.value, 0.6, 3) == [200, 200, 402], day
                # (the flusher's sweeps prune as the days go: the day's 3 newest looked at)
                assert await until(lambda n=3 * (day + 1), e=engine: len(a.delivered()) == n
                                   and _day_delivered(e, now[0]))  # fmt: skip
                now[0] += 86400.0
            listed_before = engine.manager.list_alerts(limit=1000)
            before = _rows(engine)
            now[0] += PRUNE_SECONDS
            await engine.sweep()  # the flusher's round (it ran it as the days went, too)
            after = _rows(engine)
            listed_after = engine.manager.list_alerts(limit=1000)
            with engine.store.engine.connect() as conn:
                by_url = dict(
                    conn.execute(
                        text("SELECT url_key, count(*) FROM bm_alert_deliveries GROUP BY url_key")
                    ).all()
                )
    engine.store.dispose()  # (its connections closed: a test's leftovers warn)
    kept = {"a": by_url.get(url_key(a.url), 0), "b": by_url.get(url_key(b.url), 0)}
    print(f"{days} days of 3 alerts: URL a got {len(a.delivered())} posts, b "
          f"{len(b.delivered())}; rows before the last sweep {before}, after {after} ({kept}); "
          f"GET /alerts lists {len(listed_before)} then {len(listed_after)}")  # fmt: skip
    assert (len(a.delivered()), len(b.delivered())) == (3 * days, 3 * 5)
    assert after["bm_alerts"] == 3 * days - 30 + 1 == len(listed_after)
    assert all(x["delivery"] == "delivered" for x in listed_after)
    # the sweep's clock is day 40 and an hour: days 0-9's windows ended over 30 days before it;
    # one of day 4's stays (b's kept delivery names it); the other days' all are listed
    listed_days = Counter(
        int(datetime.fromisoformat(x["raised_at"]).timestamp() - first) // 86400
        for x in listed_after
    )
    assert listed_days == {4: 1, **dict.fromkeys(range(10, days), 3)}
    assert [x for x in listed_before if x in listed_after] == listed_after  # as they were
    # a's raised within the 30 days before the sweep's clock (days 11-39), its newest among
    # them; b's newest (day 4's) kept
    assert kept["a"] == 3 * 29 and kept["b"] == 1


async def test_alerts_of_a_window_still_current_are_kept_however_old_and_not_raised_again(
    make_settings: Settings, receiver: Callable[..., Receiver]
) -> None:
    """A prepaid $1 budget (no reset: one window for ever) and a yearly $1.50 one cross their
    thresholds on day 0 (prepaid 80 %, 100 %, exhausted; yearly 80 %). 40 days later a new
    instance sweeps (the prune of alerts older than 30 days is due) and is charged again: the
    alerts' rows are what raise each threshold once in its window, and their windows are
    still current, so they stay, and the new instance's crossing raises nothing again (pruned
    by their age alone, each was raised and posted a second time)."""
    from sqlalchemy import text

    from budget_middleware.core.times import from_ts

    a = receiver()
    now = [float(int(time.time()) - 40 * 86400)]
    setup = BudgetEngine(make_settings())
    key = setup.manager.create_virtual_key(
        name="erin",
        budgets=[{"max_limit": 1.0}, {"max_limit": 1.5, "reset_duration": "1Y"}],
    )
    with setup.store.engine.begin() as conn:
        conn.execute(text("UPDATE bm_budgets SET last_reset = :at"), {"at": from_ts(now[0])})
    setup.store.dispose()
    posts, rows = [], []
    for day in (0, 40):
        now[0] += day * 86400.0
        engine = BudgetEngine(make_settings(alert_webhook_urls=a.url), clock=lambda: now[0])
        quick(engine)
        app = BudgetMiddleware(host_app(None), engine=engine)
        async with running(app), client(app) as http:
            if day:
                await engine.sweep()  # its first: the hourly prune is due
                rows.append(_rows(engine)["bm_alerts"])
            statuses = await spend(http, key.value, 0.6, 1 if day else 3)
            assert statuses == ([402] if day else [200, 200, 402])
            await until(lambda e=engine: _all_delivered(e, 4) and len(a.delivered()) == 4)
            await asyncio.sleep(0.3)  # (anything raised again: its post would have come)
            await engine.alerts.raise_queued()
            rows.append(_rows(engine)["bm_alerts"])
            posts.append(len(a.delivered()))
    engine.store.dispose()
    print(
        f"4 alerts raised on day 0 in windows still current; day 40: {rows[1]} rows after "
        f"the sweep, {rows[2]} after a new instance's crossing; posts {posts}"
    )
    assert rows == [4, 4, 4] and posts == [4, 4]


def _delivered(engine: BudgetEngine, rows: list[tuple[str, str, datetime, datetime, str]]) -> None:
    """Alerts written as delivered, each to one URL: `rows` of (alert id, budget id, window
    start, raised at, URL key)."""
    from budget_middleware.store.tables import AlertDeliveryRow, AlertRow

    alerts, deliveries = [], []
    for alert_id, budget_id, window, raised, url_key in rows:
        alerts.append(
            {"id": alert_id, "type": "budget.threshold", "budget_id": budget_id,
             "threshold": 0.8, "window_start": window, "owner_type": "virtual_key",
             "owner_id": "k", "owner_name": "k", "raised_at": raised, "body": "{}",
             "delivery": "delivered", "attempts": 1, "delivered_to": [],
             "next_attempt_at": raised}
        )  # fmt: skip
        deliveries.append(
            {"alert_id": alert_id, "url_key": url_key, "url_shown": "https://h",
             "delivery": "delivered", "attempts": 1, "next_attempt_at": raised,
             "first_attempt_at": raised}
        )  # fmt: skip
    with engine.store.engine.begin() as conn:
        conn.execute(AlertRow.__table__.insert(), alerts)  # type: ignore[attr-defined]
        conn.execute(AlertDeliveryRow.__table__.insert(), deliveries)  # type: ignore[attr-defined]


def _old_deliveries(engine: BudgetEngine, count: int, urls: int, now: float) -> None:
    """`count` alerts raised 40 days before `now`, each delivered to one of `urls` URLs."""
    from budget_middleware.core.times import from_ts
    from budget_middleware.store.tables import new_id

    raised = from_ts(now - 40 * 86400)
    _delivered(
        engine,
        [
            (new_id(), "b", raised + timedelta(seconds=n), raised, f"{n % urls:064x}")
            for n in range(count)
        ],
    )


def _deliveries_left(engine: BudgetEngine) -> tuple[int, int]:
    """The deliveries in the store, and the URLs they are to."""
    from sqlalchemy import text

    with engine.store.engine.connect() as conn:
        rows, urls = conn.execute(
            text("SELECT count(*), count(DISTINCT url_key) FROM bm_alert_deliveries")
        ).one()
    return rows, urls


async def test_the_delivery_kept_of_a_url_is_its_newest_and_the_others_alerts_go(
    make_settings: Settings,
) -> None:
    """A URL posted to 50, 45 and 40 days ago (a budget deleted since), the oldest alert's id
    the greatest ("f..."; ids are random). The prune kept each URL's delivery of the greatest
    alert id, said to be its newest: here the oldest, and with it its alert, listed for ever.
    Kept now: the newest (40 days), the one alert left listed; the other two go, with their
    deliveries."""
    from sqlalchemy import text

    from budget_middleware.core.times import from_ts

    now = time.time()
    engine = BudgetEngine(make_settings(), clock=lambda: now)
    await engine.ensure_started()
    try:
        _delivered(
            engine,
            [
                (alert_id, "gone", from_ts(now - age * 86400), from_ts(now - age * 86400), "a" * 64)
                for alert_id, age in (("f" * 32, 50), ("0" * 32, 45), ("1" * 32, 40))
            ],
        )
        await engine.sweep()  # its first: the hourly prune is due
        with engine.store.engine.connect() as conn:
            kept = [r[0] for r in conn.execute(text("SELECT alert_id FROM bm_alert_deliveries"))]
        listed = [x["id"] for x in engine.manager.list_alerts()]
    finally:
        await engine.shutdown()
        engine.store.dispose()
    print(
        f"3 alerts posted to one URL 50, 45, 40 days ago: deliveries kept {kept}, "
        f"alerts listed {listed}"
    )
    assert kept == listed == ["1" * 32]


async def test_deliveries_are_pruned_however_many_urls_were_ever_posted_to(
    make_settings: Settings,
) -> None:
    """A store that posted, over its life, to 1,200 webhook URLs (two alerts each, raised 40
    days ago, delivered): the sweep prunes each URL's older delivery and keeps one. The prune
    kept each URL's row by a clause of its own, as deep as SQLite parses: from ~1,000 URLs on
    its query failed ("Expression tree is too large (maximum depth 1000)"), caught by the
    sweep and logged at debug, and nothing was pruned again, ever (PostgreSQL ran it, in time
    that grew as URLs times rows: 6.5 s for 5,000 URLs)."""
    urls = 1200
    now = time.time()
    engine = BudgetEngine(make_settings(), clock=lambda: now)
    await engine.ensure_started()
    try:
        _old_deliveries(engine, 2 * urls, urls, now)
        await engine.sweep()  # its first: the hourly prune is due
        left, by_url = _deliveries_left(engine)
    finally:
        await engine.shutdown()
        engine.store.dispose()
    print(f"{2 * urls} deliveries to {urls} URLs, 40 days old: {left} left after the sweep, "
          f"to {by_url} URLs")  # fmt: skip
    assert (left, by_url) == (urls, urls)


async def test_a_store_s_first_prune_of_deliveries_is_spread_over_sweeps(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first prune after the upgrade to schema 14 meets the store's whole history of
    deliveries, and the flusher waits for its sweep: no flush, no re-read of the counters
    until it ends (100,000 rows: 7 s on PostgreSQL, 18 s on SQLite; every instance at once,
    a minute after the upgrade). At most ALERT_DELIVERIES_PRUNED_A_SWEEP a sweep (1,000
    here), the rest at the sweeps that follow, a minute apart, before the next hour's."""
    from budget_middleware.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "ALERT_DELIVERIES_PRUNED_A_SWEEP", 1000, raising=False)
    monkeypatch.setattr(engine_module, "ALERTS_PRUNED_A_SWEEP", 1000, raising=False)
    now = time.time()
    engine = BudgetEngine(make_settings(), clock=lambda: now)
    await engine.ensure_started()
    try:
        _old_deliveries(engine, 2500, 2, now)
        left, alerts = [], []
        for _ in range(4):
            await engine.sweep()  # a minute apart: the hourly prune's clock not reached again
            left.append(_deliveries_left(engine)[0])
            alerts.append(len(engine.manager.list_alerts(limit=5000)))
    finally:
        await engine.shutdown()
        engine.store.dispose()
    print(f"2,500 deliveries to 2 URLs, 40 days old (their budget deleted): left after each "
          f"sweep {left}, alerts {alerts}")  # fmt: skip
    # each alert goes once its deliveries have (those each URL's kept one names stay)
    assert left == alerts == [1500, 500, 2, 2]


_UVICORN_HOST_WITH_AN_ASYNC_HOOK = """
import asyncio, os
from budget_middleware import BudgetMiddleware
from mock_upstream import create_mock_app

async def on_settled(record):
    await asyncio.sleep(1.5)  # a post to a billing service, say
    with open(os.environ["HEARD"], "a") as heard:
        heard.write(f"{record.model} {record.cost_nanos}\\n")

app = BudgetMiddleware(create_mock_app("/v1"), on_settled=on_settled)
"""


def test_a_server_stopping_waits_for_the_async_hooks_under_way(tmp_path: Path) -> None:
    """uvicorn stopped (SIGTERM) right after an answer whose async `on_settled` was still
    running: the charge was written at the lifespan's shutdown, but the hook was cancelled with
    the server's loop (0 of 1 heard), where a plain hook is waited for 5 s at exit. The
    shutdown now waits for the async hooks under way, as long at most: 1 of 1 heard."""
    import signal

    from service_support import free_port, wait_for_port

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "host.py").write_text(_UVICORN_HOST_WITH_AN_ASYNC_HOOK)
    heard = tmp_path / "heard.txt"
    env = {**os.environ, "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}",
           "HEARD": str(heard),
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "examples")])}  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "host:app", "--app-dir", str(tmp_path),
         "--port", str(port), "--log-level", "critical"],
        env=env,
    )  # fmt: skip
    try:
        wait_for_port(port, 30)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat("gpt-4o"))
        server.send_signal(signal.SIGTERM)  # the hook is asleep now
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    lines = heard.read_text().splitlines() if heard.exists() else []
    print(f"answered {answer.status_code}; the server stopped; on_settled heard {lines}")
    assert answer.status_code == 200
    assert len(lines) == 1 and lines[0].startswith("gpt-4o ")


_SYNC_SCRIPT_WITH_AN_ASYNC_HOOK = """
import asyncio, sys
import httpx2
from budget_middleware import BudgetSettings, BudgetSyncTransport

def provider(request):
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return httpx2.Response(200, json={"id": "c", "object": "chat.completion", "choices": [],
                                      "model": "gpt-4o-mini", "usage": usage})

async def on_settled(record):
    await asyncio.sleep(1.0)  # a post to a billing service, say
    with open(sys.argv[2], "a") as heard:
        heard.write(f"{record.model} {record.cost_nanos}\\n")

settings = BudgetSettings(database_url=sys.argv[1], flush_interval_seconds=3600)
transport = BudgetSyncTransport(httpx2.MockTransport(provider), settings=settings,
                                on_settled=on_settled)
with httpx2.Client(transport=transport) as http:
    url = "https://api.openai.com/v1/chat/completions"
    print(http.post(url, json={"model": "gpt-4o-mini", "messages": []}).status_code, flush=True)
"""


def test_a_script_s_exit_waits_for_the_async_hooks_under_way(tmp_path: Path) -> None:
    """A sync script (the engine on its background loop) whose last call's async
    `on_settled` was still running as it ended: its charge was written at exit, the hook
    cancelled with the background loop (0 of 1 heard). Now 1 of 1."""
    script, heard = tmp_path / "job.py", tmp_path / "heard.txt"
    script.write_text(_SYNC_SCRIPT_WITH_AN_ASYNC_HOOK)
    done = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'job.db'}", str(heard)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = heard.read_text().splitlines() if heard.exists() else []
    print(f"exit {done.returncode}, printed {done.stdout.split()}; on_settled heard {lines}")
    assert done.returncode == 0 and done.stdout.split() == ["200"], done.stderr
    assert len(lines) == 1 and lines[0].startswith("gpt-4o-mini ")


_SYNC_SCRIPT_WITH_A_LAMBDA_BEHIND_A_SLOW_HOOK = """
import asyncio, sys, time
import httpx2
from budget_middleware import BudgetSettings, BudgetSyncTransport

def provider(request):
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return httpx2.Response(200, json={"id": "c", "object": "chat.completion", "choices": [],
                                      "model": "gpt-4o-mini", "usage": usage})

def log_it(record):
    time.sleep(0.5)  # a plain hook: a post to a slow service

async def notify(record):
    await asyncio.sleep(0.3)
    with open(sys.argv[2], "a") as heard:
        heard.write(f"{record.model} {record.cost_nanos}\\n")

settings = BudgetSettings(database_url=sys.argv[1], flush_interval_seconds=3600)
mock = httpx2.MockTransport(provider)
BudgetSyncTransport(mock, settings=settings, on_settled=log_it)
transport = BudgetSyncTransport(mock, settings=settings, on_settled=lambda r: notify(r))
with httpx2.Client(transport=transport) as http:
    url = "https://api.openai.com/v1/chat/completions"
    print(http.post(url, json={"model": "gpt-4o-mini", "messages": []}).status_code, flush=True)
"""


def test_a_script_s_exit_runs_the_coroutine_a_queued_plain_hook_returns(tmp_path: Path) -> None:
    """`on_settled=lambda record: notify(record)` with `notify` async, queued behind a slow
    plain hook as a sync script ends: the exit's shutdown waited for the async hooks under way
    (none yet) and the plain ones, which handed the coroutine to a loop the process left at
    once: 0 of 1 heard, where an `async def` hook is heard. The shutdown now waits for the
    plain hooks still queued too, and then for the coroutines they returned: 1 of 1."""
    script, heard = tmp_path / "job.py", tmp_path / "heard.txt"
    script.write_text(_SYNC_SCRIPT_WITH_A_LAMBDA_BEHIND_A_SLOW_HOOK)
    done = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'job.db'}", str(heard)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = heard.read_text().splitlines() if heard.exists() else []
    print(f"exit {done.returncode}, printed {done.stdout.split()}; the lambda's coroutine "
          f"heard {lines}")  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["200"], done.stderr
    assert "never awaited" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("gpt-4o-mini ")


async def test_alerts_raised_at_one_instant_are_listed_newest_first(
    make_settings: Settings,
) -> None:
    """One charge took a budget past four thresholds and the next request was refused, all at
    one reading of the clock (a clock of coarse ticks: Windows' is 15.6 ms): `GET /alerts`
    listed the five in an order of their random ids (the exhaustion among the thresholds, 25 %
    before 100 %), where its webhooks post them in the order raised. Now newest first:
    exhausted, 100 %, 80 %, 50 %, 25 %."""
    from support import FrozenClock

    engine = BudgetEngine(make_settings(), clock=FrozenClock())
    app = BudgetMiddleware(host_app(None), engine=engine)
    await engine.ensure_started()
    try:
        budget = {"max_limit": 1.0, "alert_thresholds": [0.25, 0.5, 0.8, 1.0]}
        key = engine.manager.create_virtual_key(name="tia", budgets=[budget])
        async with client(app) as http:
            statuses = await spend(http, key.value, 1.5, 2)
        await engine.alerts.raise_queued()
        listed = engine.manager.list_alerts()
    finally:
        await engine.shutdown()
    order = [(a["type"], a["threshold"]) for a in listed]
    print(f"{statuses}; raised at {sorted({a['raised_at'] for a in listed})}; listed {order}")
    assert statuses == [200, 402]
    assert order == [("budget.exhausted", None), ("budget.threshold", 1.0),
                     ("budget.threshold", 0.8), ("budget.threshold", 0.5),
                     ("budget.threshold", 0.25)]  # fmt: skip
