"""`GET /metrics` (SPEC §9, §14), read by prometheus_client's own text parser: its figures equal
what the requests did."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from admin_support import ADMIN
from budget_middleware import BudgetSettings, create_admin_app
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
        statuses = [
            (await http.post("/v1/chat/completions", json=chat())).status_code for _ in range(3)
        ]
        refused = await _refused(http)
    print("answers:", statuses, "counted:", refused)
    assert statuses == [503] * 3
    assert refused == {"service_unavailable": 3.0}
