"""`GET /metrics` (SPEC §9, §14), read by prometheus_client's own text parser: its figures equal
what the requests did."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from admin_support import ADMIN
from budget_middleware import BudgetSettings, create_admin_app, get_engine
from support import chat, client, host_app, running

Settings = Callable[..., BudgetSettings]


async def _refused(http: httpx.AsyncClient) -> dict[str, float]:
    """`budget_requests_refused_total` by reason, as a Prometheus server reads it."""
    r = await http.get("/admin/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == "budget_requests_refused_total"
    }


async def test_every_refusal_is_counted_by_its_reason(make_settings: Settings) -> None:
    """A 413 (a body over BUDGET_MAX_BODY_BYTES, as announced, as sent or once decoded) is a
    refusal of SPEC §8 like a 402: `/metrics` counted the 402s and never the 413s."""
    settings = make_settings(max_body_bytes=2000)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        r = await http.post("/admin/virtual-keys", json={"name": "k",
            "budgets": [{"max_limit": 0.05}]}, headers=ADMIN)  # fmt: skip
        auth = {"authorization": f"Bearer {r.json()['virtual_key']['value']}"}
        paid = {**auth, "x-mock-cost": "0.01"}
        answers = await asyncio.gather(*[
            http.post("/v1/chat/completions", json=chat(), headers=paid) for _ in range(20)
        ])  # fmt: skip
        big = json.dumps(chat(pad="x" * 5000)).encode()
        packed = {**auth, "content-encoding": "gzip", "content-type": "application/json"}
        answers += [
            await http.post("/v1/chat/completions", content=big, headers=auth),
            await http.post("/v1/chat/completions", content=gzip.compress(big), headers=packed),
        ]
        statuses = sorted(a.status_code for a in answers)
        refused = await _refused(http)
    print("answers:", statuses, "counted:", refused)
    assert statuses == [200] * 5 + [402] * 15 + [413] * 2
    assert refused == {"budget_exceeded": 15.0, "request_too_large": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_503_is_counted_as_a_refusal(make_settings: Settings) -> None:
    """Redis away and BUDGET_FAIL_OPEN=false: each request answered 503 `service_unavailable`
    (SPEC §8) was counted nowhere in `/metrics`."""
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    settings = make_settings(redis_url=dead, redis_timeout_seconds=0.2)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        limit = {"budgets": [{"max_limit": 10}]}
        assert (await http.put("/admin/providers/openai", json=limit, headers=ADMIN)).is_success
        answers = [await http.post("/v1/chat/completions", json=chat()) for _ in range(3)]
        refused = await _refused(http)
    statuses = [a.status_code for a in answers]
    said = answers[0].json()["error"]["message"]
    print("answers:", statuses, "counted:", refused, "said:", said)
    assert statuses == [503] * 3
    assert "BUDGET_FAIL_OPEN=false" in said  # not the message of an unknown key (fail open)
    assert refused == {"service_unavailable": 3.0}


async def test_a_routed_request_redis_cannot_admit_is_a_503_told_with_its_route(
    make_settings: Settings,
) -> None:
    """Redis away and BUDGET_FAIL_OPEN=false: a request naming a route is answered 503
    `service_unavailable` as any other, counted, and told (`GET /refusals`) with the model it
    named."""
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    settings = make_settings(redis_url=dead, redis_timeout_seconds=0.2)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        limit = {"budgets": [{"max_limit": 10}]}
        assert (await http.put("/admin/providers/openai", json=limit, headers=ADMIN)).is_success
        route = {"name": "fast", "targets": ["openai/gpt-4o", "openai/gpt-4o-mini"]}
        assert (await http.post("/admin/routes", json=route, headers=ADMIN)).is_success
        answer = await http.post("/v1/chat/completions", json=chat("fast"))
        refused = await _refused(http)
        get_engine(settings).hooks.drain()
        listed = (await http.get("/admin/refusals", headers=ADMIN)).json()["refusals"]
    told = [(r["code"], r["status"], r["model"]) for r in listed]
    print("answered", answer.status_code, answer.text[:80], "counted:", refused, "told:", told)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert refused == {"service_unavailable": 1.0}
    assert told == [("service_unavailable", 503, "fast")]


async def test_two_instances_on_redis_show_one_budget_and_their_own_counts(
    make_settings: Settings,
) -> None:
    from conftest import need_redis
    from service_support import private_redis

    need_redis()
    with private_redis() as server:
        a = make_settings(redis_url=server.url)
        b = make_settings(redis_url=server.url, flush_interval_seconds=0.06)  # its own engine
        apps = []
        for settings in (a, b):
            app = host_app(settings)
            app.mount("/admin", create_admin_app(settings))
            apps.append(app)
        async with running(apps[0]), running(apps[1]), client(apps[0]) as ha, client(apps[1]) as hb:
            r = await ha.post("/admin/virtual-keys", json={"name": "k",
                "budgets": [{"max_limit": 1}]}, headers=ADMIN)  # fmt: skip
            auth = {"authorization": f"Bearer {r.json()['virtual_key']['value']}",
                    "x-mock-cost": "0.01"}  # fmt: skip
            answers = await asyncio.gather(
                *[ha.post("/v1/chat/completions", json=chat(), headers=auth) for _ in range(30)],
                *[hb.post("/v1/chat/completions", json=chat(), headers=auth) for _ in range(20)],
            )
            assert all(x.status_code == 200 for x in answers)
            seen = {}
            for name, http in (("a", ha), ("b", hb)):
                text = (await http.get("/admin/metrics", headers=ADMIN)).text
                values = {}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name in ("budget_spent_usd", "budget_remaining_usd",
                                      "budget_requests_admitted_total"):  # fmt: skip
                            values[s.name] = s.value
                seen[name] = values
    print(seen)
    assert seen["a"]["budget_requests_admitted_total"] == 30
    assert seen["b"]["budget_requests_admitted_total"] == 20
    for name in ("a", "b"):
        assert abs(seen[name]["budget_spent_usd"] - 0.5) < 1e-9
        assert abs(seen[name]["budget_remaining_usd"] - 0.5) < 1e-9


def test_refusals_from_many_wsgi_threads_are_each_counted(make_settings: Settings) -> None:
    """A WSGI server answers 401 `virtual_key_required` (and 413) in its own threads, outside
    the engine's lock: counted there with a read-then-write of the reason's count, threads lost
    each other's increments (20,001 refusals were counted as 19,813)."""
    import io
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from werkzeug.test import Client

    from budget_middleware.engine.portal import shut_down_engines
    from budget_middleware.wsgi import BudgetWSGIMiddleware, create_admin_wsgi_app

    settings = make_settings(require_virtual_key=True)

    def host(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        return [b"{}"]

    app = BudgetWSGIMiddleware(host, settings)
    body = json.dumps(chat()).encode()

    def environ() -> dict[str, Any]:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions",
                "SCRIPT_NAME": "", "SERVER_NAME": "t", "SERVER_PORT": "80",
                "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"}  # fmt: skip

    statuses: list[str] = []
    app(environ(), lambda status, headers, exc=None: statuses.append(status))
    threads, each = 8, 2500
    go = threading.Barrier(threads)

    def worker() -> int:
        answered = []
        go.wait()
        for _ in range(each):
            b"".join(app(environ(), lambda status, headers, exc=None: answered.append(status)))
        return sum(status.startswith("401") for status in answered)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: as many interleavings as a long run
    try:
        with ThreadPoolExecutor(threads) as pool:
            refused = 1 + sum(f.result() for f in [pool.submit(worker) for _ in range(threads)])
        admin = Client(create_admin_wsgi_app(settings))
        text = admin.get("/metrics", headers=ADMIN).get_data(as_text=True)
    finally:
        sys.setswitchinterval(switch)
        shut_down_engines()
    counted = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "budget_requests_refused_total"
    }
    print("401s answered:", refused, "counted:", counted)
    assert refused == threads * each + 1
    assert counted == {"virtual_key_required": refused}


async def _gauge(http: httpx.AsyncClient, name: str) -> float:
    r = await http.get("/admin/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    found = [
        float(s.value)
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == name
    ]
    assert found, f"{name} is not in /metrics"
    return sum(found)  # of every label


async def test_an_idle_writer_has_no_flush_lag(make_settings: Settings) -> None:
    """`budget_flush_lag_seconds` counted from the last batch written: an instance with
    nothing to write (no traffic since) showed a lag growing without end (1.5 s idle: 1.5 s,
    an hour idle: 3600 s), and an alert on the lag fired for every quiet instance while its
    writer was caught up. The lag is the time since the writer was last caught up."""
    settings = make_settings(flush_interval_seconds=0.05)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        r = await http.post("/admin/virtual-keys", json={"name": "k"}, headers=ADMIN)
        auth = {"authorization": f"Bearer {r.json()['virtual_key']['value']}"}
        answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        assert answer.status_code == 200
        for _ in range(100):
            if await _gauge(http, "budget_pending_writes") == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # idle: nothing to write
        pending = await _gauge(http, "budget_pending_writes")
        lag = await _gauge(http, "budget_flush_lag_seconds")
    print("pending:", pending, "lag after 1.5 s idle:", lag)
    assert pending == 0
    assert lag < 0.5


async def test_metrics_answer_while_the_store_is_down(make_settings: Settings) -> None:
    """The store unreachable: `/metrics` read the budgets from the store first and answered
    503, so the figures that tell an outage (`budget_flush_failures_total`,
    `budget_pending_writes`, `budget_flush_lag_seconds`) could not be scraped while it lasted.
    It answers with the writer's figures, `budget_store_up 0` and no budget gauges."""
    from conftest import POSTGRES_URL, need_postgres
    from service_support import private_database, tcp_proxy

    need_postgres()
    with private_database(POSTGRES_URL) as database:
        port = int(database.rsplit(":", 1)[1].split("/", 1)[0])
        with tcp_proxy(port) as proxy:
            url = database.replace(f":{port}/", f":{proxy.port}/")
            settings = make_settings(database_url=url)
            app = host_app(settings)
            app.mount("/admin", create_admin_app(settings))
            async with running(app), client(app) as http:
                r = await http.post("/admin/virtual-keys", json={"name": "k",
                    "budgets": [{"max_limit": 1}]}, headers=ADMIN)  # fmt: skip
                auth = {"authorization": f"Bearer {r.json()['virtual_key']['value']}",
                        "x-mock-cost": "0.01"}  # fmt: skip
                answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
                assert answer.status_code == 200
                proxy.cut()
                answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
                assert answer.status_code == 200  # the key is cached: admitted
                await asyncio.sleep(0.5)  # flushes fail
                scraped = await http.get("/admin/metrics", headers=ADMIN)
                proxy.restore()
    print("while down:", scraped.status_code, scraped.text[:300])
    assert scraped.status_code == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(scraped.text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    print({k: v for k, v in values.items() if "flush" in k or "pending" in k or "spent" in k})
    assert values["budget_flush_failures_total"] > 0
    assert values["budget_pending_writes"] > 0
    assert values["budget_store_up"] == 0
    assert "budget_spent_usd" not in values  # the budgets cannot be listed


async def test_metrics_answer_while_the_store_was_never_reached(make_settings: Settings) -> None:
    """The store unreachable from the first request on (a process started in an outage): the
    engine could not start, and `/metrics` answered 503 where `docs/admin-api.md` says it
    answers `budget_store_up 0` rather than a 503, so a scraper saw the target down and no
    figure at all. It answers 200 now, with `budget_store_up 0`; the admin key still counts."""
    from service_support import free_port

    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2"
    app = create_admin_app(make_settings(database_url=url))
    async with client(app) as http:
        scraped = await http.get("/metrics", headers=ADMIN)
        anonymous = await http.get("/metrics")
        health = await http.get("/health")
    print("never reached:", scraped.status_code, "anonymous:", anonymous.status_code,
          "health:", health.status_code, health.text)  # fmt: skip
    assert scraped.status_code == 200, scraped.text
    values = {s.name: s.value for f in text_string_to_metric_families(scraped.text)
              for s in f.samples}  # fmt: skip
    assert values["budget_store_up"] == 0
    assert values["budget_flush_failures_total"] == 0
    assert anonymous.status_code == 401
    assert health.status_code == 503  # /health says the store is down, as before
