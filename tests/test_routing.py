"""Budget-aware routing (SPEC §12): a request naming a route is admitted on the first target
that passes every check, its `model` rewritten; when all refuse, one answer lists them all."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mock_upstream import create_mock_app

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine
from budget_middleware.admin import create_admin_app
from budget_middleware.engine.engine import BudgetEngine
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat, client, engine_of, host_app, running, until

Settings = Callable[..., BudgetSettings]
SPENT = [{"max_limit": 0}]
ADMIN = {"authorization": "Bearer admin-secret"}
ROUTE = {"name": "gpt-4o", "targets": ["openai/gpt-4o", "azure/gpt-4o"]}


async def post(http: httpx.AsyncClient, key: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    path = extra.pop("path", "/v1/chat/completions")
    return await http.post(path, json=chat("gpt-4o", **extra), headers=headers)


def targets_of(answer: httpx.Response) -> list[tuple[str, str]]:
    return [(t["target"], t["code"]) for t in answer.json()["error"]["targets"]]


async def test_routes_are_managed_through_the_admin_api(tmp_path: Path) -> None:
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret")
    transport = httpx.ASGITransport(create_admin_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as http:
        created = await http.post("/routes", json=ROUTE)
        assert created.status_code == 201, created.text
        route = created.json()["route"]
        assert (route["name"], route["targets"], route["strategy"]) == (
            "gpt-4o", ["openai/gpt-4o", "azure/gpt-4o"], "ordered")  # fmt: skip
        assert route["created_at"].endswith("Z") and route["source"] == "manual"  # RFC 3339, UTC
        assert (await http.post("/routes", json=ROUTE)).status_code == 409  # one name, one route
        listed = (await http.get("/routes")).json()
        assert listed["count"] == 1 and listed["routes"][0]["id"] == route["id"]
        changed = await http.put(f"/routes/{route['id']}", json={"strategy": "most_remaining"})
        assert changed.json()["route"]["strategy"] == "most_remaining"
        assert changed.json()["route"]["targets"] == route["targets"]  # left alone
        for bad in (
            {"name": "x", "targets": []},
            {"name": "x", "targets": ["openai/ gpt-4o"]},
            {"name": "x", "targets": ["/gpt-4o"]},
            {"name": "x", "targets": ["a"], "strategy": "random"},
            {"name": "x", "targets": ["a"] * 17},
        ):
            refused = await http.post("/routes", json=bad)
            assert refused.status_code == 422, (bad, refused.text)
            print(bad, "->", refused.json()["error"]["message"])
        assert (await http.delete(f"/routes/{route['id']}")).json()["deleted"] is True
        assert (await http.get(f"/routes/{route['id']}")).status_code == 404
        assert (await http.get("/routes", headers={"authorization": ""})).status_code == 401
    await get_engine(settings).shutdown()


async def test_a_bad_route_name_is_refused_naming_the_name(tmp_path: Path) -> None:
    """A route's name is checked as a target is, but its refusal spoke of a target (`"name":
    ""` answered "a target is a non-empty string") or of items (201 characters: "Value should
    have at most 200 items after validation"). It names the route name, and its 200 characters."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret")
    transport = httpx.ASGITransport(create_admin_app(settings))
    said = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as http:
        for name in ("", " gpt-4o", "gpt-4o/", "x" * 201, "gpt-\u00e9"):
            refused = await http.post("/routes", json={"name": name, "targets": ["openai/gpt-4o"]})
            assert refused.status_code == 422, refused.text
            said[name[:12]] = refused.json()["error"]["message"]
    await get_engine(settings).shutdown()
    print("\n".join(f"{name!r}: {message}" for name, message in said.items()))
    for message in said.values():
        assert message.startswith("name: ") and "route name" in message, message
        assert "target" not in message and "items" not in message, message
    assert "longer than 200 characters" in said["x" * 12]


def test_the_python_api_refuses_a_bad_route_with_a_clear_message(make_settings: Settings) -> None:
    m = engine_of(host_app(make_settings())).manager
    with pytest.raises(ValueError, match="whitespace"):
        m.create_route(name="gpt-4o", targets=["openai/gpt 4o"])
    with pytest.raises(ValueError, match="at least 1"):
        m.create_route(name="gpt-4o", targets=[])


async def test_a_request_falls_over_to_the_next_target_when_a_budget_runs_out(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 0.0005}])  # a few requests' worth
        m.create_route(**ROUTE)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        seen: list[str] = []
        for _ in range(12):
            answer = await post(http, key.value)
            assert answer.status_code == 200, answer.text
            target = answer.headers["x-budget-route"]
            assert answer.json()["model"] == target  # the app saw the target as the route has it
            seen.append(target)
        state = (await post(http, key.value, path="/v1/state/completions")).json()
        await engine.flush()
        spend = {b.user_path: b.spent for b in m.list_budgets()}
    first_azure = seen.index("azure/gpt-4o")
    print(f"targets: {Counter(seen)}; fell over after {first_azure} requests; spend {spend}")
    assert first_azure >= 1 and set(seen[:first_azure]) == {"openai/gpt-4o"}
    assert set(seen[first_azure:]) == {"azure/gpt-4o"}  # never back while the budget is spent
    assert (state["provider"], state["model"]) == ("azure", "gpt-4o")
    one_request = spend["/provider/openai"] / first_azure
    assert 0.0005 <= spend["/provider/openai"] < 0.0005 + one_request  # over by one at most


async def test_a_route_s_name_with_blanks_around_it_is_routed_as_it_is_metered(
    make_settings: Settings,
) -> None:
    """`"gpt-4o "` was metered as `openai/gpt-4o` (the model's blanks left out) but not routed
    (the route looked up as sent): with openai's budget spent, a 402 where `"gpt-4o"` fell over
    to azure (a fault hunt's). Both are routed now."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 0}])
        m.create_route(**ROUTE)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        auth = {"authorization": f"Bearer {key.value}"}
        answers = [
            await http.post("/v1/chat/completions", json=chat(model), headers=auth)
            for model in ("gpt-4o", "gpt-4o ", " gpt-4o\n")
        ]
    seen = [(a.status_code, a.headers.get("x-budget-route")) for a in answers]
    print(f"answers: {seen}")
    assert seen == [(200, "azure/gpt-4o")] * 3
    assert {a.json()["model"] for a in answers} == {"azure/gpt-4o"}  # the app saw the target


async def test_a_route_s_name_as_gemini_s_resource_name_is_routed_as_it_is_metered(
    make_settings: Settings,
) -> None:
    """`models/gpt-4o` (Gemini's resource name of a model, which a request is metered by as
    its bare name, SPEC §4) was metered as `openai/gpt-4o` but not routed: with openai's budget
    spent, a 402 where `gpt-4o` fell over to azure. Through `BudgetTransport` on Gemini's host
    alike (`models/gemini-2.5-flash`); on another host, where `models/…` is metered whole, it
    is no route's name."""
    import httpx2
    import openai

    from budget_middleware import BudgetTransport
    from test_outbound import MESSAGES, Counting, records

    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 0}])
        m.put_provider("gemini", budgets=[{"max_limit": 1}])
        m.create_model_config(provider="gemini", model_name="gemini-2.5-flash", budgets=SPENT)
        m.create_route(**ROUTE)
        flash = ["gemini/gemini-2.5-flash", "gemini/gemini-2.5-flash-lite"]
        m.create_route(name="gemini-2.5-flash", targets=flash)
        m.create_route(name="models/o3", targets=["azure/o3"])  # its very name: that route
        await engine.invalidate()
        answers = [
            await http.post("/v1/chat/completions", json=chat(model))
            for model in ("gpt-4o", "models/gpt-4o", " models/gpt-4o ")
        ]
        named = await http.post("/v1/chat/completions", json=chat("models/o3"))
        fake = Counting("/v1beta/openai")
        transport = BudgetTransport(httpx2.ASGITransport(fake), engine=engine)
        gemini = openai.AsyncOpenAI(
            api_key="gemini-secret",
            base_url="https://generativelanguage.googleapis.com/v1beta/openai/",
            http_client=httpx2.AsyncClient(transport=transport),
            max_retries=0,
        )
        routed = []
        for model in ("gemini-2.5-flash", "models/gemini-2.5-flash"):
            try:
                raw = await gemini.chat.completions.with_raw_response.create(
                    model=model, messages=MESSAGES
                )
                routed.append((raw.status_code, raw.headers.get("x-budget-route")))
            except openai.APIStatusError as refused:
                routed.append((refused.status_code, None))
        on_openai = openai.AsyncOpenAI(
            api_key="sk-provider-secret",
            base_url="https://api.openai.com/v1",
            http_client=httpx2.AsyncClient(transport=transport),
            max_retries=0,
        )
        try:
            await on_openai.chat.completions.create(model="models/gpt-4o", messages=MESSAGES)
            whole = None
        except openai.APIStatusError as refused:  # no route: openai's budget is spent
            whole = refused.status_code
        await engine.flush()
        rows = [(r["provider"], r["model"]) for r in records(engine)]
    seen = [(a.status_code, a.headers.get("x-budget-route")) for a in answers]
    print(f"inbound: {seen}; on Gemini's host: {routed}, charged {rows}; "
          f"models/gpt-4o on OpenAI's host: {whole}")  # fmt: skip
    assert seen == [(200, "azure/gpt-4o")] * 3
    assert {a.json()["model"] for a in answers} == {"azure/gpt-4o"}  # the app saw the target
    assert routed == [(200, "gemini/gemini-2.5-flash-lite")] * 2
    assert named.headers["x-budget-route"] == "azure/o3"
    assert (
        rows
        == [("azure", "gpt-4o")] * 3 + [("azure", "o3")] + [("gemini", "gemini-2.5-flash-lite")] * 2
    )
    assert whole == 402


@pytest.mark.parametrize("status", [402, 429])
async def test_when_every_target_refuses_the_first_answers_with_every_code(
    make_settings: Settings, status: int
) -> None:
    """Whatever status BUDGET_EXCEEDED_STATUS gives an exhausted budget (as 429 it made the
    route's answer a 500: it was taken for a retryable refusal without a Retry-After)."""
    app = host_app(make_settings(exceeded_status=status))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=SPENT)
        m.put_provider("azure", budgets=SPENT)
        m.create_route(**ROUTE)
        await engine.invalidate()
        answer = await post(http)
    error = answer.json()["error"]
    assert answer.status_code == status and error["code"] == "budget_exceeded"
    assert error["scope"]["name"] == "openai"  # the first target's refusal
    assert answer.headers["x-should-retry"] == "false" and "retry-after" not in answer.headers
    assert targets_of(answer) == [
        ("openai/gpt-4o", "budget_exceeded"), ("azure/gpt-4o", "budget_exceeded")]  # fmt: skip
    assert int(answer.headers["content-length"]) == len(answer.content)
    assert engine.stats.refused == {"budget_exceeded": 1}  # one request, counted once


async def test_a_retryable_refusal_wins_with_the_shortest_retry_after(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=SPENT)
        m.put_provider("azure", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"})
        m.put_provider(
            "anthropic", rate_limit={"request_max_limit": 1, "request_reset_duration": "1m"}
        )
        m.create_route(name="gpt-4o", targets=["openai/gpt-4o", "azure/gpt-4o",
                                                "anthropic/claude-sonnet-4"])  # fmt: skip
        await engine.invalidate()
        for model in ("azure/gpt-4o", "anthropic/claude-sonnet-4"):  # each one's only request
            direct = await http.post("/v1/chat/completions", json=chat(model))
            assert direct.status_code == 200
        answer = await post(http)
    error = answer.json()["error"]
    print("answer:", answer.status_code, dict(answer.headers), error["message"])
    assert answer.status_code == 429 and error["code"] == "request_limit_exceeded"
    # SPEC §12: the first retryable refusal (azure's hour: a rate limit, however long) with the
    # shortest wait of them (anthropic's minute), which an SDK may wait: no `x-should-retry`.
    assert error["scope"]["name"] == "azure"
    assert "x-should-retry" not in answer.headers
    assert 1 <= int(answer.headers["retry-after"]) <= 60  # anthropic's minute, not azure's hour
    assert int(answer.headers["retry-after-ms"]) <= 60_000
    assert targets_of(answer) == [
        ("openai/gpt-4o", "budget_exceeded"),
        ("azure/gpt-4o", "request_limit_exceeded"),
        ("anthropic/claude-sonnet-4", "request_limit_exceeded"),
    ]
    # The refusal is told (`on_refusal`, `GET /refusals`) as it was answered: azure's, with
    # its scope (the scope used to be None, and the target the first one's).
    told = engine.hooks.recent_refusals[-1]
    print("told:", told)
    assert (told["code"], told["status"], told["scope"]) == (
        "request_limit_exceeded", 429, error["scope"])  # fmt: skip
    assert (told["provider"], told["model"]) == ("azure", "gpt-4o")


@pytest.mark.parametrize("limit", [1, 0], ids=["hourly", "zero"])
async def test_a_rate_limit_is_a_retryable_refusal_of_a_route_unless_it_is_zero(
    make_settings: Settings, limit: int
) -> None:
    """SPEC §12: a rate limit is a retryable reason, however long its window: a route whose first
    target's budget is exhausted and whose second is rate limited for the hour answers the 429
    (a client that comes back in an hour is admitted), not the first target's final 402 (it
    did); the hour is past what an SDK sleeps, so the 429 keeps `x-should-retry: false`. A limit
    of 0 refuses every request for ever: no retryable refusal, the first target's 402."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=SPENT)
        m.put_provider(
            "azure", rate_limit={"request_max_limit": limit, "request_reset_duration": "1h"}
        )
        m.create_route(**ROUTE)
        await engine.invalidate()
        if limit:
            first = await post(http)  # azure's one request of the hour
            assert first.status_code == 200 and first.headers["x-budget-route"] == "azure/gpt-4o"
        answer = await post(http)
    error = answer.json()["error"]
    print("answer:", answer.status_code, dict(answer.headers), error["message"])
    assert targets_of(answer) == [
        ("openai/gpt-4o", "budget_exceeded"),
        ("azure/gpt-4o", "request_limit_exceeded"),
    ]
    assert [k for k, _ in answer.headers.multi_items()].count("x-should-retry") == 1
    assert answer.headers["x-should-retry"] == "false"  # past an SDK's sleep, or final
    if limit:
        assert answer.status_code == 429 and error["code"] == "request_limit_exceeded"
        assert error["scope"]["name"] == "azure"
        assert 3_500 <= int(answer.headers["retry-after"]) <= 3_600
    else:
        assert answer.status_code == 402 and error["code"] == "budget_exceeded"
        assert error["scope"]["name"] == "openai" and "retry-after" not in answer.headers


async def test_targets_the_key_may_not_use_are_skipped(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.create_route(**ROUTE)
        azure_only = m.create_virtual_key(name="a", provider_configs=[{"provider": "azure"}])
        groq_only = m.create_virtual_key(name="g", provider_configs=[{"provider": "groq"}])
        inactive = m.create_virtual_key(name="off", is_active=False)
        await engine.invalidate()
        admitted = await post(http, azure_only.value)
        refused = await post(http, groq_only.value)
        off = await post(http, inactive.value)
    assert admitted.status_code == 200 and admitted.headers["x-budget-route"] == "azure/gpt-4o"
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "provider_not_allowed"
    told = engine.hooks.recent_refusals[-2]  # the key's, told with the key (it used to be None)
    assert (told["code"], told["virtual_key_id"]) == ("provider_not_allowed", groq_only.id)
    not_allowed = "provider_not_allowed"
    assert targets_of(refused) == [("openai/gpt-4o", not_allowed), ("azure/gpt-4o", not_allowed)]
    # The key's own refusal is not a target's: answered once, before any routing.
    assert off.status_code == 403 and "targets" not in off.json()["error"]


async def test_a_target_the_key_may_not_use_is_not_the_answer_of_one_it_may(
    make_settings: Settings,
) -> None:
    """A key that may use only azure, whose azure budget is spent: every target refused, and
    the answer was the skipped first target's, 403 "may not use provider 'openai'" (no scope,
    no `x-should-retry`), where the one target it may use is refused for its budget: 402."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.create_route(**ROUTE)
        m.put_provider("azure", budgets=SPENT)
        azure_only = m.create_virtual_key(name="az", provider_configs=[{"provider": "azure"}])
        mini_only = m.create_virtual_key(  # openai's gpt-4o not allowed: its model skipped
            name="mini",
            provider_configs=[
                {"provider": "openai", "allowed_models": ["gpt-4o-mini"]},
                {"provider": "azure"},
            ],
        )
        await engine.invalidate()
        answers = [await post(http, key.value) for key in (azure_only, mini_only)]
    told = engine.hooks.recent_refusals[-1]
    for answer in answers:
        error = answer.json()["error"]
        print(answer.status_code, error["code"], error["message"], targets_of(answer))
        assert answer.status_code == 402 and error["code"] == "budget_exceeded"
        assert error["scope"]["name"] == "azure" and answer.headers["x-should-retry"] == "false"
    assert targets_of(answers[0]) == [
        ("openai/gpt-4o", "provider_not_allowed"), ("azure/gpt-4o", "budget_exceeded")]  # fmt: skip
    assert targets_of(answers[1])[0] == ("openai/gpt-4o", "model_not_allowed")
    assert (told["code"], told["provider"]) == ("budget_exceeded", "azure")


async def test_most_remaining_picks_the_target_with_the_most_left(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 1}])
        m.put_provider("azure", budgets=[{"max_limit": 5}])
        route = m.create_route(**ROUTE, strategy="most_remaining")
        await engine.invalidate()
        first = await post(http)
        m.update_route(
            route.id, targets=["openai/gpt-4o", "azure/gpt-4o", "mistral/mistral-large-latest"]
        )
        await engine.invalidate()
        unlimited = await post(http)
        m.put_provider("azure", budgets=SPENT)
        m.update_route(route.id, targets=["azure/gpt-4o", "openai/gpt-4o"])
        await engine.invalidate()
        passing = await post(http)
    assert first.headers["x-budget-route"] == "azure/gpt-4o"  # $5 left beats $1
    assert unlimited.headers["x-budget-route"] == "mistral/mistral-large-latest"  # no budget
    assert passing.headers["x-budget-route"] == "openai/gpt-4o"  # of those that pass


async def test_a_streamed_request_is_routed_and_charged(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=SPENT)
        m.create_route(**ROUTE)
        await engine.invalidate()
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat("gpt-4o", stream=True)
        ) as answer:
            text = (await answer.aread()).decode()
            route = answer.headers["x-budget-route"]
        await engine.flush()
        usage = m.usage(group_by="provider")
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    print(f"{len(chunks)} chunks; usage by provider: {usage.usage}")
    assert route == "azure/gpt-4o" and {c["model"] for c in chunks} == {"azure/gpt-4o"}
    assert all(not c.get("usage") for c in chunks)  # the usage chunk we asked for is not shown
    rows = {row.key: row for row in usage.usage}
    assert set(rows) == {"azure"} and rows["azure"].cost > 0


async def test_routes_come_from_the_config_file(make_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(
        "providers:\n  - provider: openai\n    budgets: [{max_limit: 0}]\n"
        "routes:\n  - name: gpt-4o\n    targets: [openai/gpt-4o, azure/gpt-4o]\n"
    )
    app = host_app(make_settings(config_file=path))
    async with running(app), client(app) as http:
        answer = await post(http)
    assert answer.status_code == 200 and answer.headers["x-budget-route"] == "azure/gpt-4o"


@pytest.mark.parametrize(
    "field",
    [
        '"user": "\u00e9l\u00e8ve \u2603"',
        '"seed": 123456789012345678901234567890',
        '"seed": -9223372036854775809',
        '"top_p": NaN',
        '"user": "an emoji cut in half \\ud83d"',
        '"temperature": 1e400',
    ],
    ids=[
        "text",
        "integer-over-64-bits",
        "19-digits-under-64-bits",
        "NaN",
        "lone-surrogate",
        "float-over-a-double",
    ],
)
async def test_a_routed_body_keeps_every_other_field_as_the_client_sent_it(
    make_settings: Settings, field: str
) -> None:
    """The body the app gets names the target; the rest is what the client sent, even what only
    Python's own parser reads (integers over 64 bits, NaN, and half a surrogate pair, as a
    JavaScript client that cut a string through an emoji sends it: its rewriting raised
    UnicodeEncodeError, a 500 for a request served unrouted), and a number past a double's
    range (`1e400`: orjson refuses it, the stdlib reads inf, and orjson wrote that back as
    null, another value than the client's)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        received = (await request.body()).decode()
        return JSONResponse({"received": received, "usage": {"prompt_tokens": 1}})

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    sent = '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], ' + field + "}"
    # A stream asked for its usage is rewritten too (`stream_options` added): the same rule.
    streamed = sent.replace('"gpt-4o"', '"gpt-4o-mini"')[:-1] + ', "stream": true}'
    async with running(app), client(app) as http:
        engine.manager.create_route(**ROUTE)
        await engine.invalidate()
        answer, stream_answer = [
            await http.post(
                "/v1/chat/completions",
                content=body.encode(),
                headers={"content-type": "application/json"},
            )
            for body in (sent, streamed)
        ]
    assert answer.status_code == 200, answer.text
    stream_got = json.loads(stream_answer.json()["received"])
    assert stream_got["stream_options"] == {"include_usage": True}
    received = answer.json()["received"]
    print(f"sent {sent}\nreceived {received}")
    assert answer.headers["x-budget-route"] == "openai/gpt-4o"
    expected = json.loads(sent)
    expected["model"] = "openai/gpt-4o"
    got = json.loads(received)
    name = next(iter(set(expected) - {"model", "messages"}))
    assert got["model"] == "openai/gpt-4o" and got["messages"] == expected["messages"]
    assert json.dumps(got[name]) == json.dumps(expected[name])  # NaN != NaN: compared as text
    assert json.dumps(stream_got[name]) == json.dumps(expected[name])


async def test_a_body_too_deep_to_write_back_is_refused_if_routed_and_sent_as_written_if_not(
    make_settings: Settings,
) -> None:
    """A body orjson reads but neither orjson nor the stdlib writes back (JSON nested 1,010
    deep). Routed, it cannot name its target: it answered 500 (a traceback), which the SDKs
    retry; it is refused before admission, 400 `request_too_deep`, as a body too deep to read
    is (deeper than 512 levels, for a routed request). A stream naming no route, asked for its
    usage (`stream_options` added), also answered 500: it goes as the client wrote it, not asked
    for its usage, and is charged an estimate."""
    app = FastAPI()
    got: list[bytes] = []

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        got.append(await request.body())
        return JSONResponse({"model": "gpt-4o-mini", "choices": []})

    app.add_middleware(BudgetMiddleware, settings=make_settings(flush_interval_seconds=3600))
    engine = engine_of(app)
    deep = 1010
    nested = b"[" * deep + b"]" * deep
    routed = b'{"model": "gpt-4o", "messages": [], "x": ' + nested + b"}"
    streamed = b'{"model": "gpt-4o-mini", "stream": true, "messages": [], "x": ' + nested + b"}"
    async with running(app), client(app) as http:
        engine.manager.create_route(**ROUTE)
        await engine.invalidate()
        answers = [
            await http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            for body in (routed, streamed)
        ]
    print(
        f"routed: {answers[0].status_code} {answers[0].text[:80]}; "
        f"stream: {answers[1].status_code}; the app got {[len(b) for b in got]} bytes"
    )
    assert answers[0].status_code == 400
    assert answers[0].json()["error"]["code"] == "request_too_deep"
    assert answers[1].status_code == 200
    assert got == [streamed]


async def test_a_request_naming_no_route_is_left_as_it_is(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        engine.manager.create_route(**ROUTE)
        await engine.invalidate()
        answer = await http.post("/v1/chat/completions", json=chat("openai/gpt-4o-mini"))
    assert answer.status_code == 200 and "x-budget-route" not in answer.headers
    assert answer.json()["model"] == "openai/gpt-4o-mini"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"gpt-4o"', b"not json"])
async def test_a_body_that_is_no_json_object_is_served_where_routes_are_configured(
    make_settings: Settings, body: bytes
) -> None:
    """With a route configured, a body that is a JSON array, a JSON string or no JSON names no
    route: metered as it is and served by the app. A mutation run's survivor: looked up as an
    object, it was a 500."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        engine.manager.create_route(**ROUTE)
        await engine.invalidate()
        answer = await http.post(
            "/v1/state/completions", content=body, headers={"content-type": "application/json"}
        )
    print(body, answer.status_code, answer.text[:200])
    assert answer.status_code == 200 and "x-budget-route" not in answer.headers


def _host_on(make_settings: Settings, backend: str) -> tuple[Any, BudgetEngine, str]:
    """A host app, its engine and the Redis prefix its counters use (`backend` "redis"), or
    in-process counters ("memory")."""
    prefix = unique_prefix()
    redis = {"redis_url": REDIS_URL} if backend == "redis" else {}
    if redis:
        need_redis()
    app = host_app(make_settings(**redis))
    engine = engine_of(app)
    if redis:
        use_prefix(engine, prefix)
    return app, engine, prefix


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_hundreds_of_concurrent_routed_requests_never_overspend_a_target(
    make_settings: Settings, backend: str
) -> None:
    app, engine, prefix = _host_on(make_settings, backend)
    limit = 0.002
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": limit}])
        m.put_provider("azure", budgets=[{"max_limit": limit}])
        m.create_route(**ROUTE)
        await engine.invalidate()
        answers = await asyncio.gather(*(post(http) for _ in range(300)))
        await engine.flush()
        spend = {b.user_path: b.spent for b in m.list_budgets()}
        usage = {row.key: row for row in m.usage(group_by="provider").usage}
    if backend == "redis":
        delete_prefix(REDIS_URL, prefix)
    routed = Counter(a.headers.get("x-budget-route", str(a.status_code)) for a in answers)
    print(f"{backend}: 300 concurrent -> {dict(routed)}; spend {spend}")
    assert routed["openai/gpt-4o"] > 0 and routed["azure/gpt-4o"] > 0
    assert routed["openai/gpt-4o"] + routed["azure/gpt-4o"] + routed["402"] + routed["429"] == 300
    for provider in ("openai", "azure"):
        one_request = spend[f"/provider/{provider}"] / routed[f"{provider}/gpt-4o"]
        # Reservations hold the budget while requests are in flight: of hundreds at once, no
        # more are admitted than it covers, but for the one whose estimate alone passed it.
        assert spend[f"/provider/{provider}"] < limit + one_request
        assert usage[provider].requests == routed[f"{provider}/gpt-4o"]  # each charged once
        assert usage[provider].cost == pytest.approx(spend[f"/provider/{provider}"])


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_fallen_over_answer_carries_the_served_target_s_limits(
    make_settings: Settings, backend: str
) -> None:
    """SPEC §8, §12: the limit headers of a routed answer are those of the target that served
    it (its provider's request window and budget), not the first target's, once it falls over."""
    app, engine, prefix = _host_on(make_settings, backend)
    async with running(app), client(app) as http:
        m = engine.manager
        hourly = {"request_reset_duration": "1h"}
        tokens = {"token_max_limit": 10**6, "token_reset_duration": "1h"}
        m.put_provider("openai", budgets=[{"max_limit": 0.5}],
                       rate_limit={"request_max_limit": 3, **hourly, **tokens})  # fmt: skip
        m.put_provider("azure", budgets=[{"max_limit": 2}],
                       rate_limit={"request_max_limit": 100, **hourly})  # fmt: skip
        m.create_route(**ROUTE)
        await engine.invalidate()
        answers = [await post(http) for _ in range(5)]
    if backend == "redis":
        delete_prefix(REDIS_URL, prefix)
    seen = [
        (a.headers["x-budget-route"], a.headers["x-ratelimit-limit-requests"],
         a.headers["x-ratelimit-remaining-requests"], a.headers.get("x-ratelimit-limit-tokens"),
         float(a.headers["x-budget-limit"]))
        for a in answers
    ]  # fmt: skip
    print(f"{backend}: {seen}")
    assert seen == [
        ("openai/gpt-4o", "3", "2", "1000000", 0.5),
        ("openai/gpt-4o", "3", "1", "1000000", 0.5),
        ("openai/gpt-4o", "3", "0", "1000000", 0.5),
        ("azure/gpt-4o", "100", "99", None, 2.0),  # azure's window and budget, no token limit
        ("azure/gpt-4o", "100", "98", None, 2.0),
    ]


def _two_instances_on_redis(
    make_settings: Settings, app: Any, prefix: str, **settings: Any
) -> tuple[list[BudgetEngine], httpx.AsyncClient, httpx.AsyncClient]:
    """Two engines on one Redis under the key `prefix` (their caches' lifetimes differ, so each
    is its own instance) and a client of `app` behind each."""
    engines = [
        get_engine(make_settings(redis_url=REDIS_URL, cache_ttl_seconds=ttl, **settings))
        for ttl in (30, 31)
    ]
    for engine in engines:
        use_prefix(engine, prefix)
    one, two = (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(BudgetMiddleware(app, engine=e)), base_url="http://t"
        )
        for e in engines
    )
    return engines, one, two


async def _shut_down(
    engines: list[BudgetEngine], clients: tuple[httpx.AsyncClient, ...], prefix: str
) -> None:
    for http in clients:
        await http.aclose()
    for engine in engines:
        await engine.shutdown()
    delete_prefix(REDIS_URL, prefix)


async def test_two_instances_on_one_redis_route_hundreds_of_streams_within_each_target(
    make_settings: Settings,
) -> None:
    """Two engines on one Redis serve 240 routed streams at once, half each, while the first
    target's budget runs out: each answer's chunks name the target it was served by, each is
    recorded once on that target (none on the other), the usage chunk asked for is not shown,
    and neither target spends past its limit by more than one request."""
    need_redis()
    app = create_mock_app()
    prefix = unique_prefix()
    engines, one, two = _two_instances_on_redis(make_settings, app, prefix)
    limits = {"openai": 0.003, "anthropic": 0.004}
    targets = ["openai/gpt-4o", "anthropic/claude-3-5-haiku-latest"]

    async def stream(http: httpx.AsyncClient) -> tuple[int, str | None, set[str], bool]:
        body = chat("smart", max_tokens=30, stream=True)
        async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
            text = (await answer.aread()).decode()
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        shown = any(c.get("usage") for c in chunks)
        return (
            answer.status_code,
            answer.headers.get("x-budget-route"),
            {c.get("model") for c in chunks},
            shown,
        )

    try:
        for engine in engines:
            await engine.ensure_started()
        m = engines[0].manager
        for provider, limit in limits.items():
            m.put_provider(provider, budgets=[{"max_limit": limit}])
        m.create_route(name="smart", targets=targets)
        for engine in engines:
            await engine.invalidate()
        answers = await asyncio.gather(*(stream(one if n % 2 else two) for n in range(240)))
        for engine in engines:
            await engine.flush()
        spend = {b.user_path: b.spent for b in m.list_budgets()}
        usage = {row.key: row for row in m.usage(group_by="model").usage}
    finally:
        await _shut_down(engines, (one, two), prefix)
    served = Counter(route for status, route, _, _ in answers if status == 200)
    print(f"240 streams on two instances: {dict(served)}, "
          f"{Counter(status for status, *_ in answers)}; spend {spend}")  # fmt: skip
    assert set(served) == set(targets)
    for status, route, models, shown in answers:
        if status == 200:
            assert models == {route} and not shown
    for target in targets:
        provider, model = target.split("/")
        assert usage[model].requests == served[target]  # each charged once, where it was served
        one_request = usage[model].cost / usage[model].requests
        assert spend[f"/provider/{provider}"] < limits[provider] + one_request


def test_the_gateway_example_falls_over_across_three_providers(tmp_path: Path) -> None:
    """examples/gateway.py, as a user runs it: each provider's budget in turn, then one 402."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "gateway.py")],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its store: this test's alone
    )  # fmt: skip
    lines = done.stdout.splitlines()
    print(done.stdout)
    order = [line.split(" via ")[1].split()[0] for line in lines if " via " in line]
    firsts = [t for n, t in enumerate(order) if n == 0 or order[n - 1] != t]
    assert firsts == ["openai/gpt-4o", "azure/gpt-4o", "anthropic/claude-sonnet-4"]
    assert "402 budget_exceeded" in lines[-1] and lines[-1].count(": budget_exceeded") == 3


async def test_litellm_s_smallest_limit_never_becomes_zero(
    make_settings: Settings, tmp_path: Path
) -> None:
    """LiteLLM's docs use `budget_limit: 0.000000000001`: the first request passes, the second is
    refused. Whole nano-dollars keep a positive limit at one nano-dollar at least, whether it
    arrives through the admin API or the config file."""
    path = tmp_path / "budget.yaml"
    path.write_text("tags:\n  - tag: tiny\n    budgets: [{max_limit: 0.000000000001}]\n")
    settings = make_settings(config_file=path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        put = await http.put(
            "/admin/providers/openai",
            json={"budgets": [{"max_limit": 0.000000000001}]},
            headers=ADMIN,
        )
        assert put.status_code == 201, put.text
        shown = put.json()["provider"]["budgets"][0]["max_limit"]
        tag = (await http.get("/admin/tags", headers=ADMIN)).json()["tags"][0]
        calls = [
            await http.post("/v1/chat/completions", json=chat(model))
            for model in ("openai/gpt-4o", "openai/gpt-4o")
        ]
        answers = [call.status_code for call in calls]
        # The first answer's headers show it too, exactly (not "0.000000").
        limit_header = calls[0].headers["x-budget-limit"]
        assert (limit_header, calls[0].headers["x-budget-remaining"]) == ("0.000000001",) * 2
        tagged = [
            (
                await http.post(
                    "/v1/chat/completions",
                    json=chat("anthropic/claude-sonnet-4"),
                    headers={"x-budget-tags": "tiny"},
                )
            ).status_code
            for _ in range(2)
        ]
    print(f"limit shown {shown!r}; provider answers {answers}; tag answers {tagged}")
    assert shown == 1e-09 and tag["budgets"][0]["max_limit"] == 1e-09
    assert answers == [200, 402] and tagged == [200, 402]


async def test_most_remaining_on_redis_ranks_by_what_every_instance_spent_and_holds(
    make_settings: Settings, tmp_path: Path
) -> None:
    """Two instances on one Redis: `most_remaining` ranks on the shared counters (spent and
    reserved by either), not on what this instance last saw (its own holds, and a store read of
    up to a cache TTL ago). A request costs and reserves exactly $0.01."""
    need_redis()
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"budget-test": {"input_per_mtok": 0, "output_per_mtok": 1000}}}')
    gate = asyncio.Event()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        if request.headers.get("x-hold"):
            await gate.wait()
        usage = {"prompt_tokens": 0, "completion_tokens": 10}
        return JSONResponse({"id": "c", "model": model, "choices": [], "usage": usage})

    prefix = unique_prefix()
    engines, one, two = _two_instances_on_redis(make_settings, app, prefix, pricing_file=prices)
    try:
        for engine in engines:
            await engine.ensure_started()
        m = engines[0].manager
        m.put_provider("openai", budgets=[{"max_limit": 1.5}])
        m.put_provider("azure", budgets=[{"max_limit": 2}])
        m.create_route(
            name="budget", targets=["openai/budget-test", "azure/budget-test"],
            strategy="most_remaining",
        )  # fmt: skip
        for engine in engines:
            await engine.invalidate()
        body = chat("budget", max_tokens=10)
        first = await two.post("/v1/chat/completions", json=body)  # instance two has looked
        # Instance one holds 100 requests to azure in flight: $1 of its $2 reserved.
        azure = chat("azure/budget-test", max_tokens=10)
        held = [
            asyncio.create_task(
                one.post("/v1/chat/completions", json=azure, headers={"x-hold": "1"})
            )
            for _ in range(100)
        ]
        for _ in range(1000):  # all 100 admitted (their reservations held), none answered
            if engines[0].stats.admitted == 100:
                break
            await asyncio.sleep(0.01)
        reserved = (await two.post("/v1/chat/completions", json=body)).headers["x-budget-route"]
        gate.set()
        assert {a.status_code for a in await asyncio.gather(*held)} == {200}
        # Now spent by instance one ($1.00 + $0.01): instance two has not read the store since.
        spent = [
            (await two.post("/v1/chat/completions", json=body)).headers["x-budget-route"]
            for _ in range(20)
        ]
    finally:
        await _shut_down(engines, (one, two), prefix)
    routed = Counter(spent)
    print(f"first {first.headers['x-budget-route']}; with azure's $1 held by the other "
          f"instance: {reserved}; with it spent there: {dict(routed)}")  # fmt: skip
    assert first.headers["x-budget-route"] == "azure/budget-test"  # $2 left beats $1.5
    assert reserved == "openai/budget-test"  # $1.5 left beats azure's $2 - $1 held
    # openai $1.49 - $0.19 left beats azure's $0.99 for all 20 (ties: the route's order)
    assert routed == {"openai/budget-test": 20}


async def test_an_outbound_routed_call_is_metered_as_the_host_s_like_a_direct_one(
    make_settings: Settings,
) -> None:
    """A route of OpenRouter's models used through `BudgetTransport` on openrouter.ai: each
    target is the call it becomes, OpenRouter's (SPEC §13: the host's provider, the model as
    sent), as a direct call naming it is. It was metered as Anthropic's `claude-sonnet-4`, so
    a call OpenRouter's spent budget refused directly was sent and served through the route,
    charged to Anthropic's budget."""
    import httpx2
    import openai

    from budget_middleware import BudgetTransport
    from test_outbound import MESSAGES, Counting, records

    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    fake = Counting("/api/v1")
    transport = BudgetTransport(httpx2.ASGITransport(fake), engine=engine)
    sdk = openai.AsyncOpenAI(
        api_key="sk-or-secret",
        base_url="https://openrouter.ai/api/v1",
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )
    outcomes: dict[str, Any] = {}
    try:
        m = engine.manager
        spent = m.put_provider("openrouter", budgets=SPENT)
        m.create_route(name="smart", targets=["anthropic/claude-sonnet-4", "openai/gpt-4o"])
        await engine.invalidate()
        for model in ("anthropic/claude-sonnet-4", "smart"):
            try:
                raw = await sdk.chat.completions.with_raw_response.create(
                    model=model, messages=MESSAGES
                )
                outcomes[model] = (raw.status_code, raw.headers.get("x-budget-route"))
            except openai.APIStatusError as refused:
                outcomes[model] = (refused.status_code, refused.body)
        sent_while_spent = fake.calls
        m.put_provider("openrouter", budgets=[{"id": spent.budgets[0].id, "max_limit": 1}])
        await engine.invalidate()
        routed = await sdk.chat.completions.with_raw_response.create(
            model="smart", messages=MESSAGES
        )
        await engine.flush()
        rows = records(engine)
    finally:
        await engine.shutdown()
    charged = [(r["provider"], r["model"]) for r in rows]
    print(f"OpenRouter's budget spent: direct {outcomes['anthropic/claude-sonnet-4'][0]}, "
          f"routed {outcomes['smart']}; sent {sent_while_spent}; then routed "
          f"{routed.headers['x-budget-route']}, charged {charged}")  # fmt: skip
    assert outcomes["anthropic/claude-sonnet-4"][0] == 402
    assert outcomes["smart"][0] == 402 and sent_while_spent == 0
    codes = [(t["target"], t["code"]) for t in outcomes["smart"][1]["targets"]]
    assert codes == [("anthropic/claude-sonnet-4", "budget_exceeded"),
                     ("openai/gpt-4o", "budget_exceeded")]  # fmt: skip
    assert routed.headers["x-budget-route"] == "anthropic/claude-sonnet-4"
    assert charged == [("openrouter", "anthropic/claude-sonnet-4")]


async def test_an_outbound_routed_call_to_a_provider_s_host_names_the_model_as_the_host_does(
    make_settings: Settings,
) -> None:
    """A route written for the inbound side (`openai/gpt-4o-mini`, `openai/gpt-4o`) used
    through `BudgetTransport` on api.openai.com: the call went out naming `openai/gpt-4o-mini`,
    a model OpenAI's API does not know (every routed call failed there), and was metered as a
    model of that name, past the limits set on `gpt-4o-mini` (its spent budget did not turn the
    route to its next target). A target naming the host's own provider is sent, checked and
    charged as the bare model a direct call names; OpenRouter's `vendor/model` stays whole."""
    from test_outbound import MESSAGES, openai_client, records

    sent: list[str] = []
    fake = create_mock_app("/v1")

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        async def noted() -> Any:
            message = await receive()
            if message.get("body"):
                sent.append(json.loads(message["body"])["model"])
            return message

        await fake(scope, noted, send)

    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    sdk = openai_client(upstream, engine, max_retries=0)
    try:
        m = engine.manager
        m.create_route(name="smart", targets=["openai/gpt-4o-mini", "openai/gpt-4o"])
        first = await sdk.chat.completions.with_raw_response.create(
            model="smart", messages=MESSAGES
        )
        m.create_model_config(model_name="gpt-4o-mini", provider="openai", budgets=SPENT)
        await engine.invalidate()
        then = await sdk.chat.completions.with_raw_response.create(model="smart", messages=MESSAGES)
        await engine.flush()
        rows = records(engine)
    finally:
        await engine.shutdown()
    charged = [(r["provider"], r["model"]) for r in rows]
    print(f"sent {sent}; routes {first.headers['x-budget-route']}, then "
          f"{then.headers['x-budget-route']}; charged {charged}")  # fmt: skip
    assert sent == ["gpt-4o-mini", "gpt-4o"]
    assert first.headers["x-budget-route"] == "openai/gpt-4o-mini"  # the target as written
    assert then.headers["x-budget-route"] == "openai/gpt-4o"  # gpt-4o-mini's budget is spent
    assert charged == [("openai", "gpt-4o-mini"), ("openai", "gpt-4o")]


async def test_a_routed_request_reserves_inline_audio_at_its_target_s_audio_price(
    make_settings: Settings,
) -> None:
    """Inline audio is reserved at the input audio price of the model it goes to (gpt-audio's
    $32/Mtok, 13 times its text input's), so that 60 at once never spend past a budget. A
    request naming a route weighed it by the route's name, which has no price: at the text
    price, each reserved about half what it is billed, and the burst spent past the limit."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from test_media import b64, voice_provider, wav

    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", voice_provider, methods=["POST"])]),
        settings=make_settings(),
    )
    engine = app.engine
    part = {"type": "input_audio", "input_audio": {"data": b64(wav(30)), "format": "wav"}}
    limit = 0.30
    spent: dict[str, float] = {}
    admitted: dict[str, int] = {}
    async with running(app), client(app) as http:
        m = engine.manager
        m.create_route(name="voice", targets=["openai/gpt-audio"])
        for model in ("gpt-audio", "voice"):
            key = m.create_virtual_key(name=model, budgets=[{"max_limit": limit}])
            await engine.invalidate()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}],
                "max_completion_tokens": 10,
            }
            content = json.dumps(body).encode()
            headers = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", content=content, headers=headers)
                  for _ in range(60))
            )  # fmt: skip
            admitted[model] = sum(a.status_code == 200 for a in answers)
            await engine.flush()
            spent[model] = m.get_budget(key.budgets[0].id).current_usage
    print(f"60 WAVs of 30 s at once on ${limit}: direct {admitted['gpt-audio']} admitted, "
          f"${spent['gpt-audio']:.4f} spent; routed {admitted['voice']} admitted, "
          f"${spent['voice']:.4f} spent")  # fmt: skip
    assert spent["gpt-audio"] <= limit + 1e-9
    assert spent["voice"] <= limit + 1e-9


async def test_a_soft_budget_never_makes_a_route_fall_over(make_settings: Settings) -> None:
    """A soft budget raises alerts and counts spend but never refuses (SPEC §14): a route whose
    first target's soft budget is spent keeps that target; only a hard one makes it fall over."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 0.0003, "soft": True}])
        m.put_provider("azure", budgets=[{"max_limit": 0.0003}])
        m.create_route(name="gpt-4o", targets=["azure/gpt-4o", "openai/gpt-4o"])
        await engine.invalidate()
        seen = [(await post(http)).headers["x-budget-route"] for _ in range(8)]
        await engine.flush()
        spend = {b.user_path: b.spent for b in m.list_budgets()}
    print(f"targets {seen}; spend {spend}")
    first_openai = seen.index("openai/gpt-4o")
    assert first_openai >= 1 and set(seen[:first_openai]) == {"azure/gpt-4o"}
    assert set(seen[first_openai:]) == {"openai/gpt-4o"}  # its soft budget, spent, refuses none
    assert spend["/provider/openai"] > 0.0003  # past its soft limit, counted


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_routed_streams_on_redis_raise_their_target_s_threshold_alert(
    make_settings: Settings, stream: bool
) -> None:
    """Nine requests of $0.01 at once, through two instances on one Redis, on a target's $0.10
    budget: 90 % spent, its 80 % alert is raised once, whether the answers are JSON or streamed.
    A stream is settled as its last chunk goes, while the server (httpx's ASGITransport, often
    uvicorn) already tells the app its client is done: Starlette's `StreamingResponse` then
    cancels the send that settles, and the alerts' look at the budget, made after Redis
    answered, was cut with it: none was raised (a look at this instance's copy alone would
    see 5 or 4 of the 9 charges: none either)."""
    need_redis()
    prefix = unique_prefix()
    alerts: list[tuple[str, float]] = []
    apps = []
    for ttl in (5, 6):
        app = host_app(None)
        app.add_middleware(
            BudgetMiddleware,
            settings=make_settings(redis_url=REDIS_URL, cache_ttl_seconds=ttl),
            on_alert=lambda alert: alerts.append((alert["type"], alert.get("threshold"))),
        )
        apps.append(app)
    engines = [engine_of(app) for app in apps]
    for engine in engines:
        use_prefix(engine, prefix)
    try:
        async with (
            running(apps[0]),
            running(apps[1]),
            client(apps[0]) as one,
            client(apps[1]) as two,
        ):
            m = engines[0].manager
            m.put_provider("openai", budgets=[{"max_limit": 0.10}])
            m.put_provider("azure", budgets=[{"max_limit": 1}])
            m.create_route(**ROUTE)
            for engine in engines:
                await engine.invalidate()
            body, cost = chat("gpt-4o", stream=stream), {"x-mock-cost": "0.01"}
            routed = await asyncio.gather(
                *(
                    (one, two)[n % 2].post("/v1/chat/completions", json=body, headers=cost)
                    for n in range(9)
                )
            )
            for engine in engines:
                await engine.flush()
            spent = {b.user_path: b.spent for b in m.list_budgets()}
            await until(lambda: alerts, 3)
    finally:
        delete_prefix(REDIS_URL, prefix)
    targets = Counter(answer.headers.get("x-budget-route") for answer in routed)
    print(f"{'streamed' if stream else 'JSON'}: {dict(targets)}; spent {spent}; alerts {alerts}")
    assert targets == {"openai/gpt-4o": 9} and spent["/provider/openai"] == pytest.approx(0.09)
    assert alerts == [("budget.threshold", 0.8)]


async def test_an_upstream_error_is_answered_not_retried_on_the_next_target(
    make_settings: Settings,
) -> None:
    """Routing happens at admission (SPEC §12): an upstream's 429 or 500 is the client's answer,
    not a reason to try the next target; it costs nothing (§7) and gives its reservation back,
    so the next request goes to the same first target."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 0.0005}])
        m.put_provider("azure", budgets=[{"max_limit": 1}])
        m.create_route(**ROUTE)
        await engine.invalidate()
        failed = [
            await http.post("/v1/chat/completions", json=chat("gpt-4o"),
                            headers={"x-mock-status": status})
            for status in ("429", "500")
        ]  # fmt: skip
        after = await post(http)
        await engine.flush()
        spend = {b.user_path: b.spent for b in m.list_budgets()}
        rows = [(r.key, r.requests, r.cost) for r in m.usage(group_by="provider").usage]
    print("upstream errors:", [(a.status_code, a.headers.get("x-budget-route")) for a in failed],
          f"then {after.headers['x-budget-route']}; spend {spend}; usage {rows}")  # fmt: skip
    assert [a.status_code for a in failed] == [429, 500]
    assert [a.headers["x-budget-route"] for a in failed] == ["openai/gpt-4o"] * 2
    assert after.status_code == 200 and after.headers["x-budget-route"] == "openai/gpt-4o"
    assert spend["/provider/azure"] == 0  # never tried
    assert 0 < spend["/provider/openai"] < 0.0005  # the one request that answered, alone
    assert rows == [("openai", 3, pytest.approx(spend["/provider/openai"]))]  # each once


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_reported_fee_over_the_token_price_is_reserved_too(
    make_settings: Settings, backend: str, tmp_path: Path
) -> None:
    """A provider whose answer reports its cost (`usage.cost`) above its tokens' price, as
    Perplexity's per-request search fee is: reservations counted the tokens alone, so hundreds
    of routed requests at once spent far past the target's budget (SPEC §6: concurrency never
    pushes spend past a limit). What an answer reported over its tokens' price is reserved by
    the next requests to that model, once an answer has reported it."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        '{"models": {"sonar-pro": {"input_per_mtok": 3, "output_per_mtok": 15}}}'
    )  # 7 in, 10 out: $0.000171 by tokens, $0.006171 with the $0.006 fee

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        await asyncio.sleep(0.02)  # in flight together
        usage = {"prompt_tokens": 7, "completion_tokens": 10, "cost": 0.006171}
        return JSONResponse({"model": (await request.json())["model"], "usage": usage})

    overrides: dict[str, Any] = {"pricing_file": prices}
    prefix = unique_prefix()
    if backend == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
    settings = make_settings(**overrides)
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    if backend == "redis":
        use_prefix(engine, prefix)
    limit = 0.10
    try:
        async with running(app), client(app) as http:
            m = engine.manager
            m.put_provider("perplexity", budgets=[{"max_limit": limit}])
            m.create_route(name="search", targets=["perplexity/sonar-pro"])
            await engine.invalidate()
            body = chat("search", max_tokens=10)
            first = await http.post("/v1/chat/completions", json=body)  # its answer tells
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(100))
            )
            await engine.flush()
            spent = m.list_budgets(owner_type="provider")[0].spent
    finally:
        if backend == "redis":
            delete_prefix(REDIS_URL, prefix)
    served = sum(a.status_code == 200 for a in answers)
    print(f"{backend}: 1 then 100 at once, $0.006171 each: {served} served, "
          f"${spent:.6f} spent of ${limit}")  # fmt: skip
    assert first.status_code == 200
    assert spent <= limit + 1e-9
    assert served >= 10  # the budget's worth, not one at a time


async def test_a_reported_fee_is_the_latest_answer_s_not_the_largest_ever(
    make_settings: Settings, tmp_path: Path
) -> None:
    """One answer reported $0.50 for a request its tokens price at $0.000171 (a host's markup on
    one call): the largest excess ever seen was kept and reserved by every later request to the
    model, of every key, until a restart (a review's: 10 at once on a $0.05 budget, 1 served and
    9 refused 429). The excess reserved is the latest measured answer's: the next answer, which
    reports no more than its tokens, ends it."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        '{"models": {"sonar-pro": {"input_per_mtok": 3, "output_per_mtok": 15}}}'
    )  # 7 in, 10 out: $0.000171 by tokens
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        await asyncio.sleep(0.02)  # in flight together
        usage = {"prompt_tokens": 7, "completion_tokens": 10}
        if request.headers.get("x-cost"):
            usage["cost"] = float(request.headers["x-cost"])  # type: ignore[assignment]
        return JSONResponse({"model": (await request.json())["model"], "usage": usage})

    settings = make_settings(pricing_file=prices)
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("perplexity", budgets=[{"max_limit": 0.05}])
        await engine.invalidate()
        body = chat("perplexity/sonar-pro", max_tokens=10)
        marked_up = await http.post("/v1/chat/completions", json=body, headers={"x-cost": "0.02"})
        held = dict(engine.gate.fees)
        plain = await http.post("/v1/chat/completions", json=body)  # its tokens' price only
        answers = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body) for _ in range(10))
        )
    served = sum(a.status_code == 200 for a in answers)
    after = dict(engine.gate.fees)
    print(f"after one answer $0.02 over and one at its price: {served} of 10 at once served; "
          f"excess held after the first {held}, after the next {after}")  # fmt: skip
    assert (marked_up.status_code, plain.status_code) == (200, 200)
    assert list(held.values()) == [20_000_000 - 171_000]
    assert served == 10 and not after


async def test_a_model_s_reported_fee_stays_reserved_when_another_model_s_fee_ends(
    make_settings: Settings, tmp_path: Path
) -> None:
    """The fees are kept per model: `sonar`'s answer at its tokens' price, after one that
    reported a fee, ends `sonar`'s excess, not `sonar-pro`'s. Ten requests at once to
    `sonar-pro`, each answered $0.02 (its tokens' price $0.000171), on a $0.05 budget: each
    reserves the fee, so the budget holds."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        '{"models": {"sonar-pro": {"input_per_mtok": 3, "output_per_mtok": 15},'
        ' "sonar": {"input_per_mtok": 3, "output_per_mtok": 15}}}'
    )
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        await asyncio.sleep(0.02)  # in flight together
        usage: dict[str, Any] = {"prompt_tokens": 7, "completion_tokens": 10}
        if request.headers.get("x-cost"):
            usage["cost"] = float(request.headers["x-cost"])
        return JSONResponse({"model": (await request.json())["model"], "usage": usage})

    settings = make_settings(pricing_file=prices)
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    limit = 0.05
    async with running(app), client(app) as http:
        m = engine.manager
        pro = chat("perplexity/sonar-pro", max_tokens=10)
        sonar = chat("perplexity/sonar", max_tokens=10)
        fee = {"x-cost": "0.02"}
        taught = [
            await http.post("/v1/chat/completions", json=pro, headers=fee),  # a fee each
            await http.post("/v1/chat/completions", json=sonar, headers=fee),
            await http.post("/v1/chat/completions", json=sonar),  # sonar's fee ends
        ]
        key = m.create_virtual_key(name="k", budgets=[{"max_limit": limit}])
        await engine.invalidate()
        keyed = {"x-budget-key": key.value or ""}
        # reserved on the key's budget while sonar-pro's fee is held: sonar has none left
        taught.append(await http.post("/v1/chat/completions", json=sonar, headers=keyed))
        headers = {**keyed, **fee}
        answers = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=pro, headers=headers) for _ in range(10))
        )
        await engine.flush()
        spent = m.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
    served = sum(a.status_code == 200 for a in answers)
    print(f"after sonar-pro's $0.02 and sonar's fee ended: {served} of 10 at once served, "
          f"${spent:.6f} spent of ${limit}; fees held {dict(engine.gate.fees)}")  # fmt: skip
    assert [a.status_code for a in taught] == [200, 200, 200, 200]
    assert 1 <= served <= 2 and spent <= limit + 1e-9


async def test_a_reported_fee_is_reserved_by_a_request_that_sends_an_image_by_url(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A request with an image by URL reserves the most an image has been measured to take
    (`saw_media`) beside its body's estimate; the model's reported fee is reserved too, as for
    any request to it. Ten at once, each answered $0.02 (the fee), on a $0.05 budget."""
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"sonar-pro": {"input_per_mtok": 3, "output_per_mtok": 15}}}')
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        await asyncio.sleep(0.02)  # in flight together
        usage = {"prompt_tokens": 300, "completion_tokens": 10, "cost": 0.02}
        return JSONResponse({"model": (await request.json())["model"], "usage": usage})

    settings = make_settings(pricing_file=prices)
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    limit = 0.05
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = chat("perplexity/sonar-pro", max_tokens=10)
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]
    async with running(app), client(app) as http:
        m = engine.manager
        first = await http.post("/v1/chat/completions", json=body)  # teaches the image, the fee
        key = m.create_virtual_key(name="k", budgets=[{"max_limit": limit}])
        await engine.invalidate()
        headers = {"x-budget-key": key.value or ""}
        answers = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body, headers=headers) for _ in range(10))
        )
        await engine.flush()
        spent = m.list_budgets(owner_type="virtual_key", owner_id=key.id)[0].spent
    served = sum(a.status_code == 200 for a in answers)
    print(
        f"image by URL, $0.02 each: {served} of 10 at once served, ${spent:.6f} spent of "
        f"${limit}; media {dict(engine.gate.media_tokens)}, fees {dict(engine.gate.fees)}"
    )
    assert first.status_code == 200 and engine.gate.media_tokens and engine.gate.fees
    assert 1 <= served <= 2 and spent <= limit + 1e-9


async def test_a_route_that_names_a_target_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """`{"targets": ["openai/gpt-4o", "azure/gpt-4o", "openai/gpt-4o"]}` was stored (201): a
    request the first target refuses was tried on it again, and an answer refusing every target
    listed it twice. The same target twice (also spelt with another provider name, `OpenAI/…`)
    is a 422 naming it and both places, from the admin API, the Python API and a config file."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret")
    transport = httpx.ASGITransport(create_admin_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as http:
        for targets, again in (
            (["openai/gpt-4o", "azure/gpt-4o", "openai/gpt-4o"], "'openai/gpt-4o'"),
            (["openai/gpt-4o", "OpenAI/gpt-4o"], "'OpenAI/gpt-4o'"),
            (["gpt-4o", "gpt-4o"], "'gpt-4o'"),
        ):
            refused = await http.post("/routes", json={"name": "r", "targets": targets})
            print(targets, "->", refused.status_code, refused.text)
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert again in error["message"] and "twice" in error["message"], error
        created = await http.post("/routes", json=ROUTE)
        assert created.status_code == 201
        route_id = created.json()["route"]["id"]
        changed = await http.put(
            f"/routes/{route_id}", json={"targets": ["azure/gpt-4o", "azure/gpt-4o"]}
        )
        assert changed.status_code == 422 and "twice" in changed.json()["error"]["message"]
        kept = (await http.get(f"/routes/{route_id}")).json()["route"]["targets"]
        assert kept == ROUTE["targets"]
        # a bare model and one with its provider are not the same text: both are kept
        both = await http.post(
            "/routes", json={"name": "b", "targets": ["gpt-4o", "openai/gpt-4o"]}
        )
        assert both.status_code == 201, both.text
    manager = get_engine(settings).manager
    with pytest.raises(ValueError, match="twice"):
        manager.create_route(name="p", targets=["openai/gpt-4o", "openai/gpt-4o"])
    await get_engine(settings).shutdown()
    path = tmp_path / "budget.yaml"
    path.write_text("routes:\n  - name: gpt-4o\n    targets: [openai/gpt-4o, openai/gpt-4o]\n")
    from budget_middleware import ConfigFileError

    with pytest.raises(ConfigFileError, match=r"routes\[0\].*twice"):
        get_engine(BudgetSettings(database_url=f"sqlite:///{tmp_path}/c.db", config_file=path))


@pytest.mark.parametrize("target", ["openai//gpt-4o", "azure//gpt-4o", "openrouter/meta//llama"])
async def test_a_route_target_with_an_empty_segment_is_refused(tmp_path: Path, target: str) -> None:
    """`openai/` and `/gpt-4o` are refused ("has an empty provider or model around '/'"), but
    `openai//gpt-4o` is stored (201): its model is `/gpt-4o`, which no provider serves and no
    price lists, so every request routed there is metered as an unpriced model (cost 0) and the
    app is sent a model name that cannot exist. SPEC §9: invalid bodies get 422 with the
    failing fields."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret")
    transport = httpx.ASGITransport(create_admin_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as http:
        answer = await http.post("/routes", json={"name": "smart", "targets": [target]})
    await get_engine(settings).shutdown()
    print(f"POST /routes targets=[{target!r}] -> {answer.status_code} {answer.text[:160]}")
    assert answer.status_code == 422, answer.text
    assert "targets" in answer.json()["error"]["message"]


def _azure_answer(httpx2: Any, sent: list[tuple[str, str | None, str | None]]) -> Any:
    """Azure OpenAI as a mock: it serves the deployment its URL names, and notes each call's
    path, `api-version` and body `model` in `sent`."""

    def azure(request: Any) -> Any:
        body = json.loads(request.content)
        sent.append((request.url.path, request.url.params.get("api-version"), body.get("model")))
        deployment = request.url.path.split("/deployments/")[1].split("/")[0]
        return httpx2.Response(200, json={
            "id": "c", "object": "chat.completion", "model": deployment,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
        })  # fmt: skip

    return azure


async def _routed_azure_call(
    engine: Any, endpoint: str, other: str, sent: list[tuple[str, str | None, str | None]]
) -> Any:
    """A call for `gpt-4o` by the Azure OpenAI SDK at `endpoint`, through `BudgetTransport`,
    routed over [azure/gpt-4o, `other`] with a $0 budget on azure's gpt-4o: the raw answer."""
    import httpx2
    import openai

    from budget_middleware import BudgetTransport
    from test_outbound import MESSAGES

    m = engine.manager
    m.create_route(name="gpt-4o", targets=["azure/gpt-4o", other])
    m.create_model_config(model_name="gpt-4o", provider="azure", budgets=[{"max_limit": 0}])
    await engine.invalidate()
    transport = BudgetTransport(httpx2.MockTransport(_azure_answer(httpx2, sent)), engine=engine)
    sdk = openai.AsyncAzureOpenAI(
        api_key="azure-secret",
        api_version="2024-10-21",
        azure_endpoint=endpoint,
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )
    return await sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)


async def test_a_routed_azure_call_is_sent_to_the_chosen_target_s_deployment(
    make_settings: Settings,
) -> None:
    """SPEC §12: "Routing also applies to calls metered by the transport of §13"; README: a
    target is "sent, checked and charged as the model that host names". Azure OpenAI names the
    model by the URL (`/openai/deployments/<name>/…`, which `AzureOpenAI` builds from `model`),
    and only rewrites of the body were made: a route `gpt-4o` -> [azure/gpt-4o, azure/gpt-4o-mini]
    whose gpt-4o budget ($0) is spent fell over to gpt-4o-mini for checks and charges, but the
    call still went to `/openai/deployments/gpt-4o/…`: Azure serves gpt-4o past its $0 budget
    (the limit lifts) and it is charged at gpt-4o-mini's price (1000 in + 1000 out: $0.00075
    charged for $0.0125 served)."""

    from test_outbound import records

    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    sent: list[tuple[str, str | None, str | None]] = []

    try:
        raw = await _routed_azure_call(
            engine, "https://res.openai.azure.com", "azure/gpt-4o-mini", sent
        )
        await engine.flush()
        rows = records(engine)
    finally:
        await engine.shutdown()
    charged = [(r["provider"], r["model"], r["cost_nanos"]) for r in rows]
    print(f"x-budget-route {raw.headers.get('x-budget-route')}; sent {sent}; charged {charged}")
    assert raw.headers["x-budget-route"] == "azure/gpt-4o-mini"
    assert charged[0][:2] == ("azure", "gpt-4o-mini")
    # The deployment Azure serves is the one checked and charged, the query left as it was.
    assert sent == [
        ("/openai/deployments/gpt-4o-mini/chat/completions", "2024-10-21", "gpt-4o-mini")
    ]


@pytest.mark.parametrize("other", ["azure/gpt-4o-mini", "openai/gpt-4o-mini"])
async def test_a_routed_azure_call_through_a_gateway_host_names_the_deployment_bare(
    make_settings: Settings, other: str
) -> None:
    """Azure OpenAI behind API Management (`*.azure-api.net`, not in the host table) or any
    Azure-shaped gateway: the route's targets are written `azure/<deployment>` as the README
    says. The fix wrote `exchange.route_model` into the URL, which on a host that is not a
    provider's is the target *as written*: `/openai/deployments/azure%2Fgpt-4o-mini/...`, a
    deployment no Azure resource has (404 DeploymentNotFound: every routed call fails). The
    deployment is the target's model (`exchange.target.model`), `gpt-4o-mini`, whatever the
    target's provider: the route's deployment would be served past its $0 budget."""

    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    sent: list[tuple[str, str | None, str | None]] = []
    try:
        raw = await _routed_azure_call(engine, "https://corp-gateway.azure-api.net", other, sent)
    finally:
        await engine.shutdown()
    print(f"x-budget-route {raw.headers.get('x-budget-route')}; sent {sent}")
    assert raw.headers["x-budget-route"] == other
    assert sent[0][0] == "/openai/deployments/gpt-4o-mini/chat/completions"


@pytest.mark.parametrize("body_model", ["gpt-4o", None])
async def test_a_route_named_by_an_azure_client_s_deployment_routes_its_calls(
    make_settings: Settings, body_model: str | None
) -> None:
    """`AzureOpenAI(azure_deployment="chat-default")`: the path names the deployment, which is
    the model metered (README), whatever the body says. A route of that name was looked up by
    the body's `model` instead, so the call was not routed: sent to deployment `chat-default`
    as it was and charged as that model, unpriced, $0 (1,000 in and 1,000 out), where the
    route's target gpt-4o-mini is served for 750,000 nano-USD. Routing reads the name metering
    reads: routed, sent to the target's deployment and charged its price."""
    import httpx2
    import openai

    from budget_middleware import BudgetTransport
    from test_outbound import MESSAGES, records

    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    sent: list[tuple[str, str | None, str | None]] = []
    engine.manager.create_route(name="chat-default", targets=["azure/gpt-4o-mini"])
    await engine.invalidate()
    transport = BudgetTransport(httpx2.MockTransport(_azure_answer(httpx2, sent)), engine=engine)
    http = httpx2.AsyncClient(transport=transport)
    try:
        if body_model is not None:
            sdk = openai.AsyncAzureOpenAI(
                api_key="azure-secret",
                api_version="2024-10-21",
                azure_endpoint="https://res.openai.azure.com",
                azure_deployment="chat-default",
                http_client=http,
                max_retries=0,
            )
            raw = await sdk.chat.completions.with_raw_response.create(
                model=body_model, messages=MESSAGES
            )
            route, status = raw.headers.get("x-budget-route"), raw.status_code
        else:  # a raw REST call: Azure needs no model in the body
            url = "https://res.openai.azure.com/openai/deployments/chat-default/chat/completions"
            answer = await http.post(url, params={"api-version": "2024-10-21"},
                                     json={"messages": MESSAGES})  # fmt: skip
            route, status = answer.headers.get("x-budget-route"), answer.status_code
        await engine.flush()
        rows = records(engine)
    finally:
        await engine.shutdown()
    charged = [(r["provider"], r["model"], r["cost_nanos"]) for r in rows]
    print(f"body model {body_model}: {status}, x-budget-route {route}; sent {sent}; "
          f"charged {charged}")  # fmt: skip
    assert (status, route) == (200, "azure/gpt-4o-mini")
    assert [path for path, _, _ in sent] == ["/openai/deployments/gpt-4o-mini/chat/completions"]
    assert charged == [("azure", "gpt-4o-mini", 750_000)]


def test_an_outbound_call_whose_body_cannot_be_rewritten_is_neither_sent_nor_charged(
    make_settings: Settings,
) -> None:
    """A routed call through `BudgetTransport` / `BudgetSyncTransport` (SPEC §12, §13) whose
    JSON orjson reads but neither orjson nor the stdlib writes back (nested 1,010 deep): its
    body cannot be made to name the target. The call failed before anything was sent, and was
    charged all the same, as a call the provider received and never answered ($0.0017 of
    prompt on gpt-4o each, and an SDK retries such a failure twice). It is refused before
    admission (400 `request_too_deep`, which SDKs do not retry): nothing sent, nothing owed."""
    import httpx2

    from budget_middleware import BudgetSyncTransport, BudgetTransport
    from budget_middleware.engine.portal import shut_down_engines
    from budget_middleware.outbound.transport import on_loop
    from test_outbound import records

    sent: list[bytes] = []

    def provider(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.content)
        usage = {"prompt_tokens": 10, "completion_tokens": 1}
        return httpx2.Response(200, json={"model": "gpt-4o", "choices": [], "usage": usage})

    deep = 1010
    body = b'{"model": "gpt-4o", "messages": [], "x": ' + b"[" * deep + b"]" * deep + b"}"
    url = "https://gateway.internal/v1/chat/completions"
    headers = {"content-type": "application/json"}
    settings = make_settings(flush_interval_seconds=3600)
    engine = get_engine(settings)
    try:
        m = engine.manager
        m.put_provider("openai", budgets=[{"max_limit": 1}])
        m.create_route(**ROUTE)
        sync = httpx2.Client(
            transport=BudgetSyncTransport(httpx2.MockTransport(provider), settings)
        )
        on_loop(engine, engine.invalidate)
        answers = [sync.post(url, content=body, headers=headers)]

        async def call() -> None:
            transport = BudgetTransport(httpx2.MockTransport(provider), settings)
            async with httpx2.AsyncClient(transport=transport) as http:
                answers.append(await http.post(url, content=body, headers=headers))

        asyncio.run(call())
        on_loop(engine, engine.flush)
        rows = [(r["provider"], r["cost_nanos"], r["outcome"]) for r in records(engine)]
        budget = m.list_budgets(from_memory=True, counters=engine.registry)[0]
    finally:
        shut_down_engines()
    codes = [(a.status_code, a.json()["error"]["code"]) for a in answers]
    print(f"answers {codes}; sent {len(sent)}; charged {rows}; reserved ${budget.reserved}")
    assert codes == [(400, "request_too_deep")] * 2 and not sent
    assert rows == []  # was 1,720,000 nano-dollars each, as sent and unanswered
    assert budget.spent == 0 and budget.reserved == 0


@pytest.mark.parametrize("unpriced", ["allow", "refuse"])
async def test_a_target_naming_another_route_is_sent_as_written_and_priced_so(
    make_settings: Settings, unpriced: str
) -> None:
    """Routes do not nest (SPEC §12: a target is what the request is sent on as). A route
    `smart` whose target is `fast`, another route's name, sends a request for `smart` on as
    `fast`, not routed again: priced as the model `fast` (none), so `BUDGET_UNPRICED_MODELS`
    decides, as for any request of a model with no price: admitted at no cost (`allow`,
    counted and logged) or refused 403 `model_not_priced` before the app is called
    (`refuse`). A configuration that meant to nest routes is told so by that count, the
    record's model and its `x-budget-route`."""
    app = host_app(make_settings(unpriced_models=unpriced))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.create_route(name="fast", targets=["openai/gpt-4o"])
        m.create_route(name="smart", targets=["fast"])
        await engine.invalidate()
        direct = await http.post("/v1/chat/completions", json=chat("fast"))
        nested = await http.post("/v1/chat/completions", json=chat("smart"))
        await engine.flush()
        rows = {(row.key, row.cost) for row in m.usage(group_by="model").usage}
    print(f"{unpriced}: fast -> {direct.status_code} {direct.headers.get('x-budget-route')}; "
          f"smart -> {nested.status_code} {nested.headers.get('x-budget-route')} "
          f"{nested.text[:120]}; usage by model {rows}")  # fmt: skip
    assert direct.status_code == 200 and direct.headers["x-budget-route"] == "openai/gpt-4o"
    if unpriced == "allow":
        assert nested.status_code == 200 and nested.headers["x-budget-route"] == "fast"
        assert nested.json()["model"] == "fast"  # what the app was asked for: not routed again
        assert engine.stats.unpriced_requests == 1
        assert ("fast", 0) in rows
    else:
        assert nested.status_code == 403
        assert nested.json()["error"]["code"] == "model_not_priced"
        assert engine.stats.unpriced_requests == 0
        assert all(model != "fast" for model, _ in rows)
