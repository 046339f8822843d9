"""The middleware in a real host app: pass-through, identity, every refusal of SPEC §5 and §8."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from sqlmodel import select

from budget_middleware import BudgetMiddleware, BudgetSettings, SettingsError
from budget_middleware.store.tables import UsageRecordRow
from support import chat, client, engine_of, host_app, post_scope, running

Settings = Callable[..., BudgetSettings]


def bearer(value: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


async def test_non_metered_routes_and_requests_without_limits_are_unchanged(
    make_settings: Settings,
) -> None:
    bare = host_app(None)
    app = host_app(make_settings())
    async with running(app), client(app) as http, client(bare) as plain:
        for method, path, kwargs in (
            ("GET", "/hello", {}),
            ("POST", "/echo", {"content": b"\x00not json"}),
            ("GET", "/v1/chat/completions", {}),  # not a POST: not metered
        ):
            got = await http.request(method, path, **kwargs)
            want = await plain.request(method, path, **kwargs)
            assert (got.status_code, got.content) == (want.status_code, want.content)
            assert dict(got.headers) == dict(want.headers)
        got = await http.post(
            "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}
        )
        assert got.status_code == 200
        assert got.json()["usage"]["prompt_tokens"] >= 1
        assert not [h for h in got.headers if h.startswith(("x-budget", "x-ratelimit"))]


async def test_metering_works_when_the_api_is_mounted_under_a_prefix(
    make_settings: Settings,
) -> None:
    settings = make_settings()
    outer = FastAPI()
    outer.mount("/api", host_app(None))
    outer.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(outer)
    await engine.ensure_started()
    key = engine.manager.create_virtual_key(
        name="alice", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
    )
    await engine.invalidate()
    async with client(outer) as http:
        first = await http.post("/api/v1/chat/completions", json=chat(), headers=bearer(key.value))
        second = await http.post("/api/v1/chat/completions", json=chat(), headers=bearer(key.value))
        state = await http.post(
            "/api/v1/state/completions",
            json={"model": "anthropic/claude-haiku-4-5"},
            headers=bearer(key.value),
        )
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "request_limit_exceeded"
    assert state.status_code == 429  # the same key: still limited
    await engine.shutdown()


async def test_request_state_budget_exposes_the_resolved_identity(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        customer = m.create_customer(name="acme")
        team = m.create_team(name="research", customer_id=customer.id)
        key = m.create_virtual_key(name="alice", team_id=team.id, tags=["team:research"])
        await engine.invalidate()
        answer = await http.post(
            "/v1/state/completions",
            json={"model": "gpt-4o", "metadata": {"tags": ["product:chat"]}},
            headers={"x-budget-key": key.value or "", "x-budget-tags": "env:prod"},
        )
    assert answer.json() == {
        "virtual_key_id": key.id,
        "team_id": team.id,
        "customer_id": customer.id,
        "provider": "openai",
        "model": "gpt-4o",
        "tags": ["env:prod", "product:chat", "team:research"],
    }


@pytest.mark.parametrize(
    ("model", "headers", "path", "provider", "expected_model"),
    [
        ("openai/gpt-4o", {}, "/v1/state/completions", "openai", "gpt-4o"),
        ("gpt-4o", {"x-budget-provider": "azure"}, "/v1/state/completions", "azure", "gpt-4o"),
        ("claude-haiku-4-5", {}, "/v1/state/completions", "anthropic", "claude-haiku-4-5"),
        ("my-local-model", {}, "/v1/state/completions", "unknown", "my-local-model"),
        (None, {}, "/v1/state/completions", "unknown", "unknown"),
    ],
)
async def test_provider_and_model_are_resolved_as_the_spec_says(
    make_settings: Settings,
    model: str | None,
    headers: dict[str, str],
    path: str,
    provider: str,
    expected_model: str,
) -> None:
    app = host_app(make_settings())
    body: dict[str, Any] = {} if model is None else {"model": model}
    async with running(app), client(app) as http:
        answer = await http.post(path, json=body, headers=headers)
    assert (answer.json()["provider"], answer.json()["model"]) == (provider, expected_model)


async def test_path_prefix_and_anthropic_messages_name_the_provider(
    make_settings: Settings,
) -> None:
    settings = make_settings()
    app = FastAPI()
    from mock_upstream import mock_router

    app.include_router(mock_router("/openai/v1"))
    app.include_router(mock_router("/v1"))
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        await http.post("/openai/v1/chat/completions", json=chat("my-model"))
        await http.post(
            "/v1/messages",
            json={
                "model": "some-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        await engine.flush()
    records = engine.manager.usage(group_by="provider")
    assert sorted(row.key or "" for row in records.usage) == ["anthropic", "openai"]


# -- refusals -------------------------------------------------------------------------------


async def test_unknown_and_missing_keys_get_401(make_settings: Settings) -> None:
    app = host_app(make_settings(require_virtual_key=True))
    async with running(app), client(app) as http:
        unknown = await http.post("/v1/chat/completions", json=chat(), headers=bearer("sk-bm-nope"))
        missing = await http.post("/v1/chat/completions", json=chat())
        host_credential = await http.post(
            "/v1/chat/completions", json=chat(), headers=bearer("sk-openai-real-key")
        )
    assert unknown.status_code == 401
    assert unknown.json()["error"]["type"] == "authentication_error"
    assert unknown.json()["error"]["code"] == "invalid_virtual_key"
    assert "sk-bm-nope" not in unknown.text
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "virtual_key_required"
    # the host app's own credential is not a virtual key: still "required"
    assert host_credential.json()["error"]["code"] == "virtual_key_required"


async def test_a_key_header_sent_twice_is_read_by_its_first_value(make_settings: Settings) -> None:
    """The app reads a repeated header's first value (Starlette); the middleware charged the
    last one: a caller the app saw as one key was charged (or refused) as another."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        alice = engine.manager.create_virtual_key(name="alice")
        bob = engine.manager.create_virtual_key(name="bob")
        await engine.invalidate()
        both = [("authorization", f"Bearer {k.value}") for k in (alice, bob)]
        as_alice = await http.post("/v1/state/completions", json=chat(), headers=both)
        as_bob = await http.post("/v1/state/completions", json=chat(), headers=both[::-1])
        unknown_first = await http.post(
            "/v1/chat/completions",
            json=chat(),
            headers=[("authorization", "Bearer sk-bm-nope"), both[0]],
        )
    print("charged to:", as_alice.json()["virtual_key_id"], as_bob.json()["virtual_key_id"])
    assert as_alice.json()["virtual_key_id"] == alice.id
    assert as_bob.json()["virtual_key_id"] == bob.id
    assert unknown_first.status_code == 401


async def test_an_inference_path_with_a_trailing_slash_is_metered(make_settings: Settings) -> None:
    """A host that serves `/v1/chat/completions/` too (a catch-all route, Flask's
    `strict_slashes=False`, Django's slashed URLs): it went unmetered, past every limit."""
    host = FastAPI()

    @host.post("/v1/{rest:path}")
    async def proxy(rest: str) -> dict[str, Any]:  # a catch-all proxy route
        usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
        return {"model": "gpt-4o", "choices": [], "usage": usage}

    app = BudgetMiddleware(host, settings=make_settings(require_virtual_key=True))
    engine = app.engine
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice")
        await engine.invalidate()
        missing = await http.post("/v1/chat/completions/", json=chat())
        doubled = await http.post("/v1/chat/completions//", json=chat())
        paid = await http.post("/v1/chat/completions/", json=chat(), headers=bearer(key.value))
        await engine.flush()
        rows = engine.manager.usage(group_by="model").usage
    print(
        "slashed path:", missing.status_code, paid.status_code, [(r.key, r.requests) for r in rows]
    )
    assert missing.status_code == doubled.status_code == 401
    assert missing.json()["error"]["code"] == "virtual_key_required"
    assert paid.status_code == 200
    assert [(r.key, r.requests) for r in rows] == [("gpt-4o", 1)]


async def test_inactive_and_expired_keys_get_403(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        inactive = m.create_virtual_key(name="off", is_active=False)
        expired = m.create_virtual_key(name="old")  # made expired by an update: a create is 422
        m.update_virtual_key(
            expired.id, expires_at=(datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        )
        await engine.invalidate()
        off = await http.post("/v1/chat/completions", json=chat(), headers=bearer(inactive.value))
        old = await http.post(
            "/v1/chat/completions", json=chat(), headers={"x-api-key": expired.value or ""}
        )
    assert (off.status_code, off.json()["error"]["code"]) == (403, "virtual_key_inactive")
    assert off.json()["error"]["type"] == "permission_error"
    assert (old.status_code, old.json()["error"]["code"]) == (403, "virtual_key_expired")


async def test_a_key_expires_at_its_expires_at(make_settings: Settings) -> None:
    """A key with `expires_at` T is served a second before T and refused from T on (403
    `virtual_key_expired`): at T itself it has expired. The instant was no test's (a mutation
    run's survivor: `<` for `<=` served it at T)."""
    import time

    from mock_upstream import mock_router

    from budget_middleware.engine.engine import BudgetEngine

    expires = float(int(time.time()) + 3600)
    now = [expires - 1]
    engine = BudgetEngine(make_settings(), clock=lambda: now[0])
    upstream = FastAPI()
    upstream.include_router(mock_router("/v1"))
    app = BudgetMiddleware(upstream, engine=engine)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="brief")
        engine.manager.update_virtual_key(
            key.id, expires_at=datetime.fromtimestamp(expires, UTC).isoformat()
        )
        await engine.invalidate()
        before = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        now[0] = expires
        at = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    print(f"a second before: {before.status_code}; at expires_at: {at.status_code}")
    assert before.status_code == 200
    assert (at.status_code, at.json()["error"]["code"]) == (403, "virtual_key_expired")


async def test_provider_and_model_not_allowed_get_403(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice",
            provider_configs=[
                {"provider": "openai", "allowed_models": ["gpt-4o-mini"], "blocked_models": []},
                {
                    "provider": "anthropic",
                    "allowed_models": ["*"],
                    "blocked_models": ["claude-opus-4-1"],
                },
            ],
        )
        await engine.invalidate()

        async def ask(model: str) -> tuple[int, str | None]:
            answer = await http.post(
                "/v1/chat/completions", json=chat(model), headers=bearer(key.value)
            )
            return answer.status_code, answer.json().get("error", {}).get("code")

        assert await ask("openai/gpt-4o-mini") == (200, None)
        assert await ask("openai/gpt-4o") == (403, "model_not_allowed")
        assert await ask("mistral/mistral-large") == (403, "provider_not_allowed")
        assert await ask("anthropic/claude-haiku-4-5") == (200, None)
        assert await ask("anthropic/claude-opus-4-1") == (403, "model_not_allowed")


async def test_body_over_the_size_cap_gets_413(make_settings: Settings) -> None:
    app = host_app(make_settings(max_body_bytes=1000))
    async with running(app), client(app) as http:
        big = chat()
        big["messages"][0]["content"] = "x" * 2000
        answer = await http.post("/v1/chat/completions", json=big)
        chunked = await http.post(
            "/v1/chat/completions", content=_chunks(b"{" + b" " * 1500 + b"}")
        )
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "BUDGET_MAX_BODY_BYTES" in answer.json()["error"]["message"]
    assert chunked.status_code == 413


async def test_a_body_of_exactly_the_size_cap_is_served_and_one_byte_more_is_not(
    make_settings: Settings,
) -> None:
    """BUDGET_MAX_BODY_BYTES is the largest body served: a body of exactly that many bytes is
    metered and served, however it arrives (httpx's messages, chunked, or whole in one
    `http.request` message, which takes another check); one byte more is 413."""
    app = host_app(make_settings(max_body_bytes=1000))

    def body(size: int) -> bytes:
        request = chat()
        request["messages"][0]["content"] = ""
        empty = json.dumps(request).encode()
        request["messages"][0]["content"] = "x" * (size - len(empty))
        data = json.dumps(request).encode()
        assert len(data) == size
        return data

    headers = {"content-type": "application/json"}
    async with running(app), client(app) as http:
        statuses = [
            (await http.post("/v1/chat/completions", content=data, headers=headers)).status_code
            for data in (body(1000), body(1001))
        ]
        statuses += [
            (await http.post("/v1/chat/completions", content=_chunks(data))).status_code
            for data in (body(1000), body(1001))
        ]
        for size in (1000, 1001):  # in one `http.request` message, as uvicorn hands a small one
            sent: list[dict[str, Any]] = []
            whole = [{"type": "http.request", "body": body(size), "more_body": False}]

            async def receive(whole: list[dict[str, Any]] = whole) -> dict[str, Any]:
                return whole.pop() if whole else {"type": "http.disconnect"}

            async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            await app(post_scope("/v1/chat/completions"), receive, send)
            statuses.append(sent[0]["status"])
    print("statuses at 1000 and 1001 bytes (httpx, chunked, one message):", statuses)
    assert statuses == [200, 413, 200, 413, 200, 413]


async def _chunks(data: bytes) -> Any:
    for start in range(0, len(data), 100):
        yield data[start : start + 100]


async def test_budget_exceeded_answer_names_scope_amounts_reset_and_says_do_not_retry(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(
            name="research",
            budgets=[{"max_limit": 0.000001, "reset_duration": "1M", "calendar_aligned": True}],
        )
        key = m.create_virtual_key(name="alice", team_id=team.id)
        await engine.invalidate()
        first = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        refused = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    assert first.status_code == 200
    assert refused.status_code == 402
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["type"] == error["code"] == "budget_exceeded"
    assert error["scope"] == {"type": "team", "id": team.id, "name": "research"}
    now = datetime.now(UTC)
    next_month = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert error["message"].startswith("Team 'research' budget exceeded: $0.")
    assert "spent of $0.0000" in error["message"]
    assert f"(resets {next_month:%Y-%m-%dT%H:%M:%SZ})" in error["message"]


async def test_a_refusal_names_a_budget_of_a_fraction_of_a_cent_exactly(
    make_settings: Settings,
) -> None:
    """Four decimals round a budget under a cent away: a $0.00002 budget refused with
    "$0.0000 spent of $0.0000". Such amounts are written exactly."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="tiny", budgets=[{"max_limit": 0.00002, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        for _ in range(20):
            answer = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
            if answer.status_code != 200:
                break
    assert answer.status_code == 402
    message = answer.json()["error"]["message"]
    found = re.fullmatch(
        r"Virtual key 'tiny' budget exceeded: \$(0\.\d+) spent of \$0\.00002 .*", message
    )
    assert found is not None, message
    assert float(found[1]) >= 0.00002  # what it spent, exactly: not "$0.0000"


async def test_exceeded_status_can_be_429_for_openai_parity(make_settings: Settings) -> None:
    app = host_app(make_settings(exceeded_status=429))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 0}])
        await engine.invalidate()
        refused = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert "(never resets)" in refused.json()["error"]["message"]


async def test_rate_limit_refusals_carry_retry_after_and_count_nothing(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        key = m.create_virtual_key(
            name="alice",
            rate_limit={
                "request_max_limit": 2,
                "request_reset_duration": "1h",
                "token_max_limit": 1000,
                "token_reset_duration": "1h",
            },
            budgets=[{"max_limit": 100, "reset_duration": "1d"}],
        )
        await engine.invalidate()
        ok = await http.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers=bearer(key.value)
        )
        await http.post("/v1/chat/completions", json=chat(max_tokens=5), headers=bearer(key.value))
        refused = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        await engine.flush()
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
    assert float(ok.headers["x-budget-limit"]) == 100
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "request_limit_exceeded")
    assert error["message"].startswith(
        "Virtual key 'alice' request limit exceeded: 2 of 2 requests"
    )
    assert 3590 <= int(refused.headers["retry-after"]) <= 3600
    assert int(refused.headers["retry-after-ms"]) > 3_590_000
    limits = m.list_rate_limits()
    assert limits[0].request_current_usage == 2  # the refused one counted nothing
    records = m.usage(group_by="virtual_key")
    assert records.total.requests == 2


async def test_token_limit_refuses_once_measured_tokens_reach_it(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"token_max_limit": 30, "token_reset_duration": "1h"}
        )
        await engine.invalidate()
        first = await http.post(
            "/v1/chat/completions", json=chat(max_tokens=40), headers=bearer(key.value)
        )
        refused = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    assert first.status_code == 200
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "token_limit_exceeded"


async def test_concurrency_limit_refuses_while_requests_are_in_flight(
    make_settings: Settings,
) -> None:
    import asyncio

    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"max_concurrent_requests": 2}
        )
        await engine.invalidate()
        slow = {**bearer(key.value), "x-mock-delay-ms": "50"}
        answers = await asyncio.gather(
            *(
                http.post(
                    "/v1/chat/completions", json=chat(max_tokens=4, stream=True), headers=slow
                )
                for _ in range(5)
            )
        )
        after = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 429, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert after.status_code == 200  # every slot was given back


def test_the_key_cache_trusts_an_entry_for_its_ttl_and_drops_the_oldest_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from budget_middleware.core.scopes import KeyConfig
    from budget_middleware.engine.cache import NOT_CACHED, KeyCache

    clock = [1000.0]
    monkeypatch.setattr("budget_middleware.engine.cache.time.monotonic", lambda: clock[0])

    def config(name: str) -> KeyConfig:
        return KeyConfig(name, name, True, None, None, None, None, None, (), (), {}, ())

    def name(found: object) -> str:
        assert isinstance(found, KeyConfig)
        return found.name

    cache = KeyCache(ttl=5, maxsize=4)
    cache.put(b"known", config("alice"))
    cache.put(b"unknown", None)
    assert name(cache.get(b"known")) == "alice"
    assert cache.get(b"unknown") is None  # cached as unknown: no store read
    assert cache.get(b"never-seen") is NOT_CACHED
    clock[0] += 5  # the TTL has passed: both must be read again
    assert cache.get(b"known") is NOT_CACHED and cache.get(b"unknown") is NOT_CACHED
    assert len(cache) == 0

    for n in range(4):
        cache.put(bytes([n]), config(f"k{n}"))
    assert name(cache.get(bytes([0]))) == "k0"  # used: the least recently used is now k1
    cache.put(b"fifth", config("k4"))  # full: the least recently used goes
    assert cache.get(bytes([1])) is NOT_CACHED
    assert [name(cache.get(bytes([n]))) for n in (0, 2, 3)] == ["k0", "k2", "k3"]
    assert name(cache.get(b"fifth")) == "k4"
    clock[0] += 10
    cache.put(b"sixth", None)  # every other entry has expired: they go before anything else
    assert len(cache) == 1


def _counted(app: Any, calls: list[str]) -> Any:
    """`app` behind a layer that counts the HTTP requests that reach it."""

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append(scope["path"])
        await app(scope, receive, send)

    return counting


@pytest.mark.parametrize("status", [402, 429])
async def test_sdks_raise_on_an_exhausted_budget_once_without_retrying(
    make_settings: Settings, status: int
) -> None:
    # PITFALLS: the SDKs retry 429 and 5xx twice; an exhausted budget must not become a retry
    # storm, even sent as 429 (`x-should-retry: false`).
    import anthropic
    import httpx2
    import openai

    app = host_app(make_settings(exceeded_status=status))
    engine = engine_of(app)
    calls: list[str] = []
    transport = httpx.ASGITransport(_counted(app, calls))
    async with running(app):
        spent = engine.manager.create_virtual_key(name="spent", budgets=[{"max_limit": 0}])
        await engine.invalidate()
        sdk = openai.AsyncOpenAI(
            base_url="http://test/v1",
            api_key=spent.value or "",
            http_client=httpx.AsyncClient(transport=transport),
        )
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        claude = anthropic.AsyncAnthropic(
            base_url="http://test",
            api_key=spent.value or "",
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(_counted(app, calls))),
        )
        with pytest.raises(anthropic.APIStatusError) as refused_too:
            await claude.messages.create(
                model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
    print(f"status {refused.value.status_code}, requests sent: {calls}")
    assert calls == ["/v1/chat/completions", "/v1/messages"]  # one each: no retry
    assert refused.value.status_code == refused_too.value.status_code == status
    assert refused.value.code == "budget_exceeded"
    assert "Virtual key 'spent' budget exceeded" in refused.value.message
    assert "budget exceeded" in refused_too.value.message


async def test_the_azure_openai_sdk_s_api_key_header_carries_a_virtual_key(
    make_settings: Settings,
) -> None:
    """Azure OpenAI's SDK sends its key as `api-key`: a virtual key there was not read, so the
    call went on to the app as one without a key, the key's $0 budget not applied (the app's
    own answer, a 404 here; now 402)."""
    import openai

    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app):
        spent = engine.manager.create_virtual_key(name="spent", budgets=[{"max_limit": 0}])
        await engine.invalidate()
        sdk = openai.AsyncAzureOpenAI(
            azure_endpoint="http://test",
            api_version="2024-10-21",
            api_key=spent.value or "",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app)),
        )
        try:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
    print("Azure OpenAI SDK, a key with a $0 budget in api-key:", status)
    assert status == 402


@pytest.mark.parametrize("kind", ["request", "token"])
async def test_a_rate_limit_of_zero_refuses_every_request_once_without_retrying(
    make_settings: Settings, kind: str
) -> None:
    # A limit of 0 refuses every request, as a $0 budget does (SPEC §6): its window's end is no
    # time to come back (the SDK waited Retry-After and was refused again, twice). The 429 keeps
    # SPEC §8's Retry-After and says no retry can pass.
    import openai

    app = host_app(make_settings())
    engine = engine_of(app)
    calls: list[str] = []
    transport = httpx.ASGITransport(_counted(app, calls))
    async with running(app):
        blocked = engine.manager.create_virtual_key(
            name="blocked",
            rate_limit={f"{kind}_max_limit": 0, f"{kind}_reset_duration": "1s"},
        )
        await engine.invalidate()
        sdk = openai.AsyncOpenAI(
            base_url="http://test/v1",
            api_key=blocked.value or "",
            http_client=httpx.AsyncClient(transport=transport),
        )
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
    headers = refused.value.response.headers
    print(
        f"{kind} limit 0: status {refused.value.status_code}, requests sent: {len(calls)}, "
        f"retry-after {headers.get('retry-after')}, message {refused.value.message!r}"
    )
    assert calls == ["/v1/chat/completions"]  # one: no retry
    assert refused.value.status_code == 429
    assert refused.value.code == f"{kind}_limit_exceeded"
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert "resets" not in refused.value.message
    assert f"Virtual key 'blocked' {kind} limit of 0 refuses every request" in (
        refused.value.message
    )


async def test_a_virtual_key_never_appears_in_a_log_an_answer_or_a_usage_record(
    make_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from sqlmodel import select

    from budget_middleware.store.tables import UsageRecordRow

    caplog.set_level(logging.DEBUG)
    app = host_app(make_settings())
    engine = engine_of(app)
    answers: list[httpx.Response] = []
    async with running(app), client(app) as http:
        m = engine.manager
        good = m.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
        )
        off = m.create_virtual_key(name="off", is_active=False)
        limited = m.create_virtual_key(name="picky", provider_configs=[{"provider": "anthropic"}])
        await engine.invalidate()
        values = [good.value or "", off.value or "", limited.value or "", "sk-bm-not-a-real-key"]
        for value in values:
            for headers in ({"authorization": f"Bearer {value}"}, {"x-budget-key": value}):
                answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
                answers.append(answer)
        answers.append(
            await http.post(
                "/v1/chat/completions", json=chat(), headers={"x-budget-key": "free text key"}
            )
        )
        await engine.flush()
        with engine.store.session() as s:
            rows = [r.model_dump_json() for r in s.exec(select(UsageRecordRow))]
    statuses = [a.status_code for a in answers]
    print("statuses:", statuses, f"{len(rows)} records, {len(caplog.records)} log records")
    assert statuses == [200, 429, 403, 403, 403, 403, 401, 401, 401]
    shown = caplog.text + "".join(a.text + str(a.headers) for a in answers) + "".join(rows)
    for value in [*values, "free text key"]:
        assert value not in shown


async def test_a_key_sent_where_a_tag_model_or_provider_goes_is_kept_out_of_every_record(
    make_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends its key in `x-budget-tags` (or its body's `metadata.tags`, or as
    `model` or `x-budget-provider`) by mistake: the key reached the usage records, `GET /usage`
    grouped by tag, the 403 of an unpriced model, the log line of one and the `on_settled`
    hook. Text holding BUDGET_KEY_PREFIX is no tag (dropped) and no model or provider
    (`unknown`); the request is served and charged as usual."""
    import json
    import logging

    from sqlmodel import select

    from budget_middleware.store.tables import UsageRecordRow

    caplog.set_level(logging.DEBUG)
    settled: list[Any] = []
    settings = make_settings(unpriced_models="refuse")
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, settings=settings, on_settled=settled.append)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        value = engine.manager.create_virtual_key(name="alice").value or ""
        # A key that may use only openai: its own key as the provider is refused 403, and the
        # message names the provider, which was the key in lower case (a provider's one name).
        only = (
            engine.manager.create_virtual_key(
                name="bob", provider_configs=[{"provider": "openai"}]
            ).value
            or ""
        )
        sent = [
            ({"x-budget-key": value, "x-budget-tags": f"team:a,{value}"}, chat()),
            ({"x-budget-tags": value}, chat()),
            ({"x-budget-key": value}, chat(metadata={"tags": ["team:a", f"user:{value}"]})),
            ({"x-budget-key": value}, chat(model=value)),
            ({"x-budget-key": value}, chat(model=f"openai/{value}")),
            ({"x-budget-key": value, "x-budget-provider": value}, chat(model="gpt-4o")),
            ({"x-budget-key": value}, chat(model=f"{value}/gpt-4o")),
            ({"x-budget-key": only, "x-budget-provider": only}, chat(model="gpt-4o")),
        ]
        answers = [
            await http.post("/v1/chat/completions", json=body, headers=headers)
            for headers, body in sent
        ]
        await engine.flush()
        with engine.store.session() as s:
            rows = [r.model_dump_json() for r in s.exec(select(UsageRecordRow))]
        by_tag = engine.manager.usage("tag").model_dump_json()
    statuses = [a.status_code for a in answers]
    print("statuses:", statuses, f"{len(rows)} records, {len(settled)} settled")
    # a key as model: unknown, unpriced; as provider: unknown (the model's own, from the
    # catalog, is not guessed for a provider the client named), and not one bob may use
    assert statuses == [200, 200, 200, 403, 403, 200, 200, 403]
    assert '"team:a"' in by_tag  # the other tags stay
    shown = (
        caplog.text
        # (but the body of the answer to `<key>/gpt-4o`: the app's, which echoes its model)
        + "".join((a.text if n != 6 else "") + str(a.headers) for n, a in enumerate(answers))
        + "".join(rows)
        + by_tag
        + json.dumps([repr(r) for r in settled])
    )
    for key in (value, only):  # nor in lower case, as a provider's name is written
        assert key not in shown and key.lower() not in shown.lower()


async def test_a_short_key_prefix_drops_no_tag_and_unprices_no_model(
    make_settings: Settings,
) -> None:
    """Keys are told from names by the caller's own key, or by a generated key's shape (the
    prefix and 40 URL-safe characters): with `BUDGET_KEY_PREFIX=g` a model `gpt-4o` is still
    priced and a tag `gpt-team` kept (a tag dropped could escape its budget, a model made
    `unknown` would be served free)."""
    app = host_app(make_settings(key_prefix="g"))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice")
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(metadata={"tags": ["gpt-team"]}),
            headers={"x-budget-key": key.value or "", "x-budget-tags": "g" + "x" * 40},
        )
        await engine.flush()
        [row] = engine.manager.usage("model").usage
        by_tag = [r.key for r in engine.manager.usage("tag").usage]
    print("model", row.key, "cost", row.cost, "tags", by_tag)
    assert answer.status_code == 200 and row.key == "gpt-4o" and row.cost > 0
    assert by_tag == ["gpt-team"]


async def test_a_long_tag_that_holds_the_key_prefix_inside_a_word_keeps_its_budget(
    make_settings: Settings,
) -> None:
    """A generated key's shape starts where a word does: with `BUDGET_KEY_PREFIX=sk-` the tag
    `risk-assessment-…` (`sk-` inside `risk`, then 44 URL-safe characters) is a tag, and its
    spent budget refuses the request; a generated key sent in a tag (`user:sk-…`) is dropped."""
    app = host_app(make_settings(key_prefix="sk-"))
    engine = engine_of(app)
    tag = "risk-assessment-pipeline-for-enterprise-customers"
    async with running(app), client(app) as http:
        engine.manager.put_tag(tag, budgets=[{"max_limit": 0}])
        key = engine.manager.create_virtual_key(name="alice")
        other = engine.manager.create_virtual_key(name="bob")
        await engine.invalidate()
        refused = await http.post(
            "/v1/chat/completions", json=chat(), headers={**bearer(key.value), "x-budget-tags": tag}
        )
        served = await http.post(
            "/v1/state/completions",
            json=chat(),
            headers={**bearer(key.value), "x-budget-tags": f"user:{other.value},kept"},
        )
    print(refused.status_code, served.json()["tags"])
    assert refused.status_code == 402 and refused.json()["error"]["scope"]["type"] == "tag"
    assert served.json()["tags"] == ["kept"]


async def test_a_client_that_waits_retry_after_ms_is_admitted(make_settings: Settings) -> None:
    # SPEC §8: a rate limit's 429 carries `Retry-After` and `retry-after-ms`; the OpenAI SDK
    # waits exactly `retry-after-ms`, so it must not end before the window does.
    import time

    from mock_upstream import mock_router

    from budget_middleware.engine.engine import BudgetEngine

    now = [time.time()]
    engine = BudgetEngine(make_settings(), clock=lambda: now[0])
    upstream = FastAPI()
    upstream.include_router(mock_router("/v1"))
    app = BudgetMiddleware(upstream, engine=engine)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 1, "request_reset_duration": "1m"}
        )
        await engine.invalidate()
        first = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        window = next(iter(engine.registry.windows["request"].values()))
        now[0] = window.end - 0.4567  # 456.7 ms before the window ends
        refused = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        waited_ms = int(refused.headers["retry-after-ms"])
        now[0] += waited_ms / 1000
        retried = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
    print(f"retry-after-ms {waited_ms} for a window ending in 456.7 ms: {retried.status_code}")
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.headers["retry-after"] == "1"
    assert retried.status_code == 200


@pytest.mark.parametrize("counters", ["in process", "redis"])
async def test_retry_after_waits_for_every_rate_window_that_refuses(
    make_settings: Settings, counters: str
) -> None:
    """A key's 1 request a minute and its team's 1 an hour, both spent: the 429 is the key's
    (SPEC §5's order), but a client that waits its `Retry-After` must find the request
    admitted, so it waits for the hour's end, not the minute's (it said 60 s, and the retry
    was refused again, by the team, with 3,540 s)."""
    import time

    from mock_upstream import mock_router

    from budget_middleware.engine.engine import BudgetEngine

    now = [time.time()]
    overrides: dict[str, Any] = {}
    prefix = ""
    if counters == "redis":
        from conftest import REDIS_URL, need_redis
        from service_support import delete_prefix, unique_prefix, use_prefix

        need_redis()
        overrides["redis_url"] = REDIS_URL
        prefix = unique_prefix()
    engine = BudgetEngine(make_settings(**overrides), clock=lambda: now[0])
    if prefix:
        use_prefix(engine, prefix)
    upstream = FastAPI()
    upstream.include_router(mock_router("/v1"))
    app = BudgetMiddleware(upstream, engine=engine)
    try:
        async with running(app), client(app) as http:
            m = engine.manager
            team = m.create_team(
                name="research",
                rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"},
            )
            key = m.create_virtual_key(
                name="alice",
                team_id=team.id,
                rate_limit={"request_max_limit": 1, "request_reset_duration": "1m"},
            )
            await engine.invalidate()
            # The windows begin at the limits' stamps, which the store wrote by the real clock:
            # the engine's starts from after them (a slow start-up past 1 s made the wait 3602).
            now[0] = time.time()
            auth = bearer(key.value)
            first = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            refused = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            waits = [int(refused.headers["retry-after"])]
            now[0] += int(refused.headers["retry-after-ms"]) / 1000
            retried = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            while retried.status_code == 429 and len(waits) < 3:
                waits.append(int(retried.headers["retry-after"]))
                now[0] += int(retried.headers["retry-after-ms"]) / 1000
                retried = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    finally:
        if prefix:
            delete_prefix(REDIS_URL, prefix)
    print(f"{counters}: Retry-After waited {waits} s, then {retried.status_code}")
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.json()["error"]["code"] == "request_limit_exceeded"
    assert refused.json()["error"]["scope"]["type"] == "virtual_key"  # SPEC §5's first
    assert len(waits) == 1 and 3590 <= waits[0] <= 3601
    assert retried.status_code == 200


async def test_key_header_key_prefix_and_inference_paths_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # SPEC §3: BUDGET_KEY_HEADER carries a key of any value; BUDGET_KEY_PREFIX is the prefix of
    # generated keys and the one bearer / x-api-key / x-goog-api-key / api-key values need to count;
    # BUDGET_INFERENCE_PATHS replaces the list of metered suffixes.
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/budget.db")
    monkeypatch.setenv("BUDGET_KEY_HEADER", "X-Team-Key")
    monkeypatch.setenv("BUDGET_KEY_PREFIX", "vk-")
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", "/generate, /chat/completions")
    settings = BudgetSettings()
    app = host_app(settings)

    @app.post("/v1/generate")
    async def generate() -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"}
        )
        await engine.invalidate()
        value = key.value or ""
        answers = {
            "x-team-key": await http.post(
                "/v1/generate", json=chat(), headers={"x-team-key": value}
            ),
            "bearer": await http.post("/v1/generate", json=chat(), headers=bearer(value)),
            "x-goog-api-key": await http.post(
                "/v1/generate", json=chat(), headers={"x-goog-api-key": value}
            ),
            "api-key (Azure OpenAI's SDK)": await http.post(
                "/v1/generate", json=chat(), headers={"api-key": value}
            ),
            "host bearer sk-bm-": await http.post(
                "/v1/generate", json=chat(), headers=bearer("sk-bm-host-credential")
            ),
            "x-team-key any value": await http.post(
                "/v1/generate", json=chat(), headers={"x-team-key": "no prefix at all"}
            ),
            "embeddings, no longer metered": await http.post(
                "/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": "x"},
                headers=bearer(value),
            ),
        }
    seen = {
        name: (a.status_code, a.headers.get("x-ratelimit-remaining-requests"))
        for name, a in answers.items()
    }
    print(f"key {value[:3]}…:", seen)
    assert value.startswith("vk-")
    assert seen == {
        "x-team-key": (200, "99"),
        "bearer": (200, "98"),
        "x-goog-api-key": (200, "97"),
        "api-key (Azure OpenAI's SDK)": (200, "96"),
        "host bearer sk-bm-": (200, None),  # the host's own credential: no key, no limits
        "x-team-key any value": (401, None),  # any value is a key there: this one is unknown
        "embeddings, no longer metered": (200, None),
    }


async def test_a_proxy_s_own_limit_headers_give_way_to_ours_never_doubled(
    make_settings: Settings,
) -> None:
    # A host app that proxies a provider passes on its `x-ratelimit-*` headers; SPEC §8's
    # headers name the tightest of ours. Sent both, a client read "9999, 9" (an SDK's
    # `headers.get` joins repeated headers) and could parse neither.
    from fastapi.responses import JSONResponse

    upstream_headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-tokens": "29999990",
        "x-ratelimit-reset-tokens": "0s",
    }
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def proxied() -> JSONResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        return JSONResponse({"usage": usage}, headers=upstream_headers)

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 10, "request_reset_duration": "1h"}
        )
        await engine.invalidate()
        limited = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
        unlimited = await http.post("/v1/chat/completions", json=chat())
    seen = {name: limited.headers.get_list(name) for name in upstream_headers}
    print("with a request limit of ours:", seen)
    # The hour's window began as the key was written: a slow store (PostgreSQL beside the
    # whole suite, once in CI) lets a second or more pass before the request.
    reset = seen["x-ratelimit-reset-requests"]
    assert len(reset) == 1 and 3590 <= int(reset[0].removesuffix("s")) <= 3600, reset
    seen["x-ratelimit-reset-requests"] = ["(an hour)"]
    assert seen == {
        "x-ratelimit-limit-requests": ["10"],
        "x-ratelimit-remaining-requests": ["9"],
        "x-ratelimit-reset-requests": ["(an hour)"],
        # no token limit of ours: the provider's pass on as they came
        "x-ratelimit-limit-tokens": ["30000000"],
        "x-ratelimit-remaining-tokens": ["29999990"],
        "x-ratelimit-reset-tokens": ["0s"],
    }
    assert {name: unlimited.headers.get_list(name) for name in upstream_headers} == {
        name: [value] for name, value in upstream_headers.items()
    }


async def test_an_inference_path_written_with_a_trailing_slash_meters_both_spellings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A metered path is told with slashes after it or not (`/v1/generate/` as `/v1/generate`):
    # a suffix written with its slash (Django's style) must meter the bare path too, not only
    # the slashed one. A suffix of slashes alone names no path.
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/budget.db")
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", "/generate/")
    app = host_app(BudgetSettings())

    @app.post("/v1/generate")
    async def generate() -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    @app.post("/v1/generate/")
    async def generate_slashed() -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"}
        )
        await engine.invalidate()
        seen = {
            path: (await http.post(path, json=chat(), headers=bearer(key.value))).headers.get(
                "x-ratelimit-remaining-requests"
            )
            for path in ("/v1/generate", "/v1/generate/")
        }
    print("remaining requests after each:", seen)
    assert seen == {"/v1/generate": "99", "/v1/generate/": "98"}
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", "/chat/completions,//")
    with pytest.raises(SettingsError, match=r"BUDGET_INFERENCE_PATHS.*names no path"):
        BudgetSettings()


async def test_a_first_request_cancelled_while_its_key_is_read_leaves_the_read_to_the_others(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inbound, as outbound: two first requests of a key share one store read; the one that
    began it cancelled as it reads (its client gone) leaves the other answered by the read
    (it waited for ever)."""
    import asyncio
    import threading

    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1}])
        reading, go = threading.Event(), threading.Event()
        load = engine.store.load_key

        def held(*args: Any) -> Any:
            reading.set()
            go.wait(30)
            return load(*args)

        monkeypatch.setattr(engine.store, "load_key", held)

        def request() -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                http.post("/v1/chat/completions", json=chat(), headers=bearer(key.value))
            )

        first = request()
        assert await asyncio.to_thread(reading.wait, 10)
        second = request()
        for _ in range(50):  # the second on its way to the read under way, and waiting on it
            await asyncio.sleep(0)
        first.cancel()
        go.set()
        try:
            answer = await asyncio.wait_for(second, 10)
        except TimeoutError:
            pytest.fail("the second request waited for ever on the cancelled request's read")
    print(f"first cancelled: {first.cancelled()}; second: {answer.status_code}")
    assert first.cancelled() and answer.status_code == 200


async def test_the_budget_headers_show_both_amounts_with_the_same_decimals(
    make_settings: Settings,
) -> None:
    """`x-budget-limit: 0.001000` beside `x-budget-remaining: 0.000922500`: six decimals beside
    nine in one answer, read as two precisions. Nine for both when either holds part of a
    micro-dollar (README), six for both otherwise."""
    app = host_app(make_settings())
    engine = engine_of(app)
    shown = []
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 0.001, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        for _ in range(2):
            ok = await http.post(
                "/v1/chat/completions", json=chat(max_tokens=5), headers=bearer(key.value)
            )
            assert ok.status_code == 200, ok.text
            shown.append((ok.headers["x-budget-limit"], ok.headers["x-budget-remaining"]))
    print(shown)
    assert shown[0] == ("0.001000", "0.001000")
    limit, left = shown[1]
    assert len(left.split(".")[1]) == 9 and float(left) < 0.001  # charged part of a micro-dollar
    assert limit == "0.001000000"


def test_a_websocket_passes_unmetered_even_where_a_key_is_required(
    make_settings: Callable[..., BudgetSettings],
) -> None:
    """The README's "Good to know": a WebSocket (OpenAI's Realtime API proxied by the app) is
    not an HTTP request SPEC §4 meters. It reaches the app untouched, with no key and no limit,
    while a POST to an inference path without a key is refused."""
    from starlette.testclient import TestClient

    app = host_app(None)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("echo " + await websocket.receive_text())
        await websocket.close()

    app.add_middleware(BudgetMiddleware, settings=make_settings(require_virtual_key=True))
    with TestClient(app) as http:
        refused = http.post("/v1/chat/completions", json=chat())
        with http.websocket_connect("/v1/realtime") as socket:
            socket.send_text("hi")
            echoed = socket.receive_text()
    print(f"POST without a key: {refused.status_code}; the WebSocket without one: {echoed!r}")
    assert refused.status_code == 401
    assert echoed == "echo hi"


async def test_a_request_through_the_middleware_twice_is_counted_and_charged_once(
    make_settings: Settings,
) -> None:
    """The middleware added to the top app and left on a mounted sub-app too (README's advice
    on sub-apps, half followed): every request was admitted and charged by each, so a key
    limited to 2 requests an hour was refused its second, and one call made two usage records
    of its cost (2 of 1 charged). The inner one now passes a request the same engine metered."""
    settings = make_settings()
    outer = FastAPI()
    outer.mount("/api", host_app(settings))
    outer.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(outer)
    await engine.ensure_started()
    key = engine.manager.create_virtual_key(
        name="alice", rate_limit={"request_max_limit": 2, "request_reset_duration": "1h"}
    )
    await engine.invalidate()
    async with running(outer), client(outer) as http:
        statuses = [
            (
                await http.post("/api/v1/chat/completions", json=chat(), headers=bearer(key.value))
            ).status_code
            for _ in range(2)
        ]
        await engine.flush()
        with engine.store.session() as session:
            rows = list(session.exec(select(UsageRecordRow)))
    print("statuses", statuses, "usage records", len(rows), "for 2 requests")
    assert statuses == [200, 200]
    assert len(rows) == 2 and len({r.cost_nanos for r in rows}) == 1 and rows[0].cost_nanos > 0


async def test_a_body_declared_over_the_size_cap_is_answered_413_before_it_is_read(
    make_settings: Settings,
) -> None:
    """A `content-length` over BUDGET_MAX_BODY_BYTES is refused from the header alone: not one
    chunk of the body is read (nor held), whatever key the request carries."""
    app = host_app(make_settings(max_body_bytes=1000))
    pulled = 0

    async def body() -> Any:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b" " * 100

    async with running(app), client(app) as http:
        answers = [
            await http.post(
                "/v1/chat/completions",
                content=body(),
                headers={"content-length": "10000", **extra},
            )
            for extra in ({}, {"x-budget-key": "not-a-key"})
        ]
    print("statuses:", [a.status_code for a in answers], "chunks read:", pulled)
    assert [a.status_code for a in answers] == [413, 413]
    assert pulled == 0
