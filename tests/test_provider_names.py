"""One name per provider (SPEC §4, §6, §12, §13): a provider budget caps every request to that
provider however the request, the host table, the catalog or the operator spells the provider
(`OpenAI` is `openai`; `google` is `gemini`; `x-ai` is `xai`). Each test exhausts a provider
budget and counts what the requests that name the provider another way get through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from mock_upstream import mock_router
from sqlalchemy import text

from admin_support import ADMIN
from budget_middleware import BudgetMiddleware, BudgetSettings, BudgetTransport, create_admin_app
from budget_middleware.core.providers import canonical_provider
from budget_middleware.engine.engine import BudgetEngine, get_engine
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]
SPENT = "0.02"  # what the first request costs: past every $0.01 budget below
GEMINI = {"x-budget-provider": "gemini"}


async def _admitted(
    http: httpx.AsyncClient, requests: list[tuple[str, dict[str, Any], dict[str, str]]]
) -> list[str]:
    """The requests (path, body, headers) that were admitted: each costs $0.02."""
    passed = []
    for path, body, headers in requests:
        r = await http.post(path, json=body, headers={"x-mock-cost": SPENT, **headers})
        assert r.status_code in (200, 402, 403), r.text
        if r.status_code == 200:
            shown = {k: "…" if k == "x-budget-key" else v for k, v in headers.items()}
            passed.append(f"{path} {body['model']} {shown}")
    return passed


def _spent_on(engine: BudgetEngine, provider: str) -> float:
    """Dollars the engine's live counters hold on `provider`'s budgets."""
    budgets = engine.manager.list_budgets(
        owner_type="provider", owner_id=provider, from_memory=True, counters=engine.registry
    )
    return sum(b.spent for b in budgets)


async def test_a_provider_budget_caps_every_spelling_of_the_provider_inbound(
    make_settings: Settings,
) -> None:
    settings = make_settings(flush_interval_seconds=3600)
    app = host_app(settings)
    app.include_router(mock_router("/OpenAI/v1"))  # a path prefix naming the provider
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        for provider in ("openai", "gemini", "xai"):
            body = {"budgets": [{"max_limit": 0.01, "reset_duration": "1d"}]}
            r = await http.put(f"/admin/providers/{provider}", json=body, headers=ADMIN)
            assert r.status_code == 201, r.text
        # One request as the SPEC writes the provider: charged, and the budget is exhausted.
        first = await _admitted(http, [
            ("/v1/chat/completions", chat("openai/gpt-4o"), {}),
            ("/v1/chat/completions", chat("gemini/gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("xai/grok-3"), {}),
        ])  # fmt: skip
        assert len(first) == 3
        engine = engine_of(app)
        before = {p: _spent_on(engine, p) for p in ("openai", "gemini", "xai")}
        escapes = await _admitted(http, [
            ("/v1/chat/completions", chat("OpenAI/gpt-4o"), {}),
            ("/v1/chat/completions", chat("gpt-4o"), {"x-budget-provider": "OpenAI"}),
            ("/OpenAI/v1/chat/completions", chat("gpt-4o"), {}),
            ("/v1/chat/completions", chat("gemini-2.5-flash"), {}),  # the catalog's `google`
            ("/v1/chat/completions", chat("google/gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("gemini-2.5-flash"), {"x-budget-provider": "Google"}),
            ("/v1/chat/completions", chat("grok-3"), {}),  # the catalog's `x-ai`
            ("/v1/chat/completions", chat("x-ai/grok-3"), {}),
            # Gemini's resource name of a model (its API reads a bare name so): not a
            # provider named `models`
            ("/v1/chat/completions", chat("models/gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("models/gemini-2.5-flash"), GEMINI),
        ])  # fmt: skip
        after = {p: _spent_on(engine, p) for p in ("openai", "gemini", "xai")}
    print(
        f"admitted past exhausted provider budgets: {len(escapes)} of 10 "
        f"(${len(escapes) * float(SPENT):.2f} spent past them) {escapes}"
    )
    print(f"provider spend before -> after those requests: {before} -> {after}")
    assert escapes == []
    assert after == before


async def test_operator_spellings_of_a_provider_name_one_provider(
    make_settings: Settings,
) -> None:
    """A provider budget or a key's provider config written as `OpenAI`, `google` or `x-ai`
    (the catalog's ids) caps the requests to `openai`, `gemini` and `xai`."""
    settings = make_settings(flush_interval_seconds=3600)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        for provider in ("OpenAI", "google", "x-ai"):
            body: dict[str, Any] = {"budgets": [{"max_limit": 0.01, "reset_duration": "1d"}]}
            if provider == "OpenAI":
                body["rate_limit"] = {"request_max_limit": 100, "request_reset_duration": "1h"}
            r = await http.put(f"/admin/providers/{provider}", json=body, headers=ADMIN)
            assert r.status_code == 201, r.text
        r = await http.post("/admin/virtual-keys", headers=ADMIN, json={
            "name": "alice",
            "provider_configs": [{"provider": "Anthropic", "budgets": [{"max_limit": 0.01}]}],
        })  # fmt: skip
        assert r.status_code == 201, r.text
        key = {"x-budget-key": r.json()["virtual_key"]["value"]}
        admitted = await _admitted(http, [
            ("/v1/chat/completions", chat("openai/gpt-4o"), {}),
            ("/v1/chat/completions", chat("openai/gpt-4o"), {}),
            ("/v1/chat/completions", chat("gemini/gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("xai/grok-3"), {}),
            ("/v1/chat/completions", chat("grok-3"), {}),
            ("/v1/messages", chat("claude-sonnet-4-0"), key),
            ("/v1/messages", chat("anthropic/claude-sonnet-4-0"), key),
        ])  # fmt: skip
        listed = (await http.get("/admin/providers", headers=ADMIN)).json()["providers"]
        names = sorted(p["provider"] for p in listed)
        filtered = {}
        for listing in ("budgets", "rate-limits"):
            r = await http.get(f"/admin/{listing}?owner_type=provider&owner_id=OpenAI",
                               headers=ADMIN)  # fmt: skip
            filtered[listing] = r.json()["count"]  # OpenAI's: openai's
        removed = await http.delete("/admin/providers/X-AI", headers=ADMIN)
    print(f"admitted: {len(admitted)} of 8 {admitted}; stored providers {names}; "
          f"owner_id=OpenAI finds {filtered}")  # fmt: skip
    # The first request to each provider is admitted, the next refused.
    assert len(admitted) == 4
    assert names == ["gemini", "openai", "xai"]
    assert filtered == {"budgets": 1, "rate-limits": 1}
    assert removed.status_code == 200, removed.text


def _fake_provider(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json={
        "id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.02},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("budgeted", "url", "model"),
    [
        # genai-prices' id for Google is where an inbound bare `gemini-*` lands before the fix.
        ("google", "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
         "gemini-2.5-flash"),
        ("x-ai", "https://api.x.ai/v1/chat/completions", "grok-3"),
        ("aws", "https://bedrock-runtime.us-east-1.amazonaws.com/openai/v1/chat/completions",
         "anthropic.claude-3-haiku"),
    ],
)  # fmt: skip
async def test_an_outbound_call_meets_the_provider_budget_under_its_catalog_name(
    make_settings: Settings, budgeted: str, url: str, model: str
) -> None:
    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    try:
        engine.manager.put_provider(budgeted, budgets=[{"max_limit": 0.01}])
        calls = 0

        def provider(request: httpx2.Request) -> httpx2.Response:
            nonlocal calls
            calls += 1
            return _fake_provider(request)

        transport = BudgetTransport(httpx2.MockTransport(provider), engine=engine)
        async with httpx2.AsyncClient(transport=transport) as http:
            statuses = []
            for _ in range(3):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                statuses.append((await http.post(url, json=body)).status_code)
        spent = _spent_on(engine, canonical_provider(budgeted))
    finally:
        await engine.shutdown()
    print(f"{budgeted} budget $0.01, calls to {url.split('/')[2]}: {statuses}, sent {calls}, "
          f"spent ${spent}")  # fmt: skip
    assert statuses == [200, 402, 402] and calls == 1
    assert spent == pytest.approx(0.02)


async def test_a_route_target_and_provider_hosts_use_the_one_name(make_settings: Settings) -> None:
    """A route's target `Google/gemini-2.5-flash` and a `BUDGET_PROVIDER_HOSTS` entry naming
    `x-ai` meet the `gemini` and `xai` budgets."""
    settings = make_settings(
        flush_interval_seconds=3600, provider_hosts={"llm.internal.example": "X-AI"}
    )
    assert dict(settings.provider_hosts)["llm.internal.example"] == "xai"
    app = FastAPI()
    app.include_router(mock_router("/v1"))
    app.add_middleware(BudgetMiddleware, settings=settings)
    async with running(app), client(app) as http:
        m = engine_of(app).manager
        m.put_provider("gemini", budgets=[{"max_limit": 0.01}])
        m.put_provider("xai", budgets=[{"max_limit": 0.01}])
        m.create_route(name="fast", targets=["Google/gemini-2.5-flash"])
        statuses = []
        for _ in range(2):
            r = await http.post(
                "/v1/chat/completions", json=chat("fast"), headers={"x-mock-cost": SPENT}
            )
            statuses.append(r.status_code)
        sent = 0

        def provider(request: httpx2.Request) -> httpx2.Response:
            nonlocal sent
            sent += 1
            return _fake_provider(request)

        transport = BudgetTransport(httpx2.MockTransport(provider), settings)
        async with httpx2.AsyncClient(transport=transport) as out:
            for _ in range(2):
                body = {"model": "grok-3", "messages": []}
                r2 = await out.post("https://llm.internal.example/v1/chat/completions", json=body)
                statuses.append(r2.status_code)
    print(f"route then hosted: {statuses}, sent {sent}")
    assert statuses == [200, 402, 200, 402] and sent == 1


async def test_stored_spellings_keep_their_limits_after_the_upgrade(
    make_settings: Settings,
) -> None:
    """A store written before one name per provider (a provider budget `google`, another
    `OpenAI`, a key's provider config `X-AI`, a route to `Google/…`) keeps every limit: start-up
    renames them to the one name, and the requests meet them."""
    settings = make_settings(flush_interval_seconds=3600)
    first = get_engine(settings)
    await first.ensure_started()
    m = first.manager
    m.put_provider("gemini", budgets=[{"max_limit": 0.01, "reset_duration": "1d"}])
    m.put_provider("openai", budgets=[{"max_limit": 0.01, "reset_duration": "1d"}])
    key = m.create_virtual_key(
        name="bob", provider_configs=[{"provider": "xai", "budgets": [{"max_limit": 0.01}]}]
    )
    await first.shutdown()
    # As an earlier release stored them, spelled as the operator or the catalog spelled them.
    with first.store.engine.begin() as conn:
        for old, new in (("gemini", "google"), ("openai", "OpenAI")):
            conn.execute(text("UPDATE bm_providers SET provider = :n WHERE provider = :o"),
                         {"n": new, "o": old})  # fmt: skip
            conn.execute(
                text("UPDATE bm_budgets SET owner_id = :n WHERE owner_type = 'provider' "
                     "AND owner_id = :o"), {"n": new, "o": old})  # fmt: skip
        conn.execute(text("UPDATE bm_provider_configs SET provider = 'X-AI'"))
        conn.execute(text("UPDATE bm_meta SET value = '7' WHERE key = 'schema_version'"))
    app = host_app(make_settings(flush_interval_seconds=1800))  # a new engine: a start-up
    async with running(app), client(app) as http:
        admitted = await _admitted(http, [
            ("/v1/chat/completions", chat("gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("gemini/gemini-2.5-flash"), {}),
            ("/v1/chat/completions", chat("openai/gpt-4o"), {}),
            ("/v1/chat/completions", chat("OpenAI/gpt-4o"), {}),
            ("/v1/chat/completions", chat("xai/grok-3"), {"x-budget-key": key.value}),
            ("/v1/chat/completions", chat("grok-3"), {"x-budget-key": key.value}),
        ])  # fmt: skip
        names = sorted(p.provider for p in engine_of(app).manager.list_providers())
    print(f"admitted after the upgrade: {len(admitted)} of 6 {admitted}; providers {names}")
    assert len(admitted) == 3
    assert names == ["gemini", "openai"]


def test_one_name_per_provider() -> None:
    cases = {
        "OpenAI": "openai", " Anthropic ": "anthropic", "google": "gemini", "Gemini": "gemini",
        "vertex_ai": "vertex", "x-ai": "xai", "XAI": "xai", "aws": "bedrock",
        "azure_ai": "azure", "together_ai": "together", "my-gateway": "my-gateway",
    }  # fmt: skip
    assert {name: canonical_provider(name) for name in cases} == cases


async def test_a_batch_an_earlier_release_spilled_names_its_provider_by_its_one_name(
    tmp_path: Any,
) -> None:
    """A release before version 8 (0faa08b) recorded a request to `google/gemini-1.5-pro` as
    provider `google`, and a batch it spilled in an outage kept it so. Version 8 renamed the
    stored records (`GET /usage?group_by=provider` shows one provider), but the batch, applied
    by the next release, wrote `google` beside them: usage by provider told `gemini` $0.12
    and `google` $0.03 where the store has one provider."""
    from budget_middleware.core.records import UsageRecord
    from budget_middleware.store.spill import Spill

    settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret",
        spill_dir=tmp_path / "spill", flush_interval_seconds=0.05,
    )  # fmt: skip
    first = BudgetEngine(settings)
    await first.ensure_started()
    key = first.manager.create_virtual_key(name="alice")
    await first.shutdown()

    def record(provider: str) -> UsageRecord:
        return UsageRecord(
            "", 1.0, key.id, None, None, provider, "gemini-1.5-pro", (), 10, 5, 0, 10_000_000,
            "usage", 200, False, "completed", False, None, 1.5,
        )  # fmt: skip

    assert first.spill is not None
    gone = Spill(first.spill.folder)  # the earlier release's, stopped in the outage
    gone.write("oldbatch", [], [record("google")])
    gone.write("newbatch", [], [record("gemini")])
    gone.give_up()
    engine = get_engine(settings)  # the next release's start-up
    await engine.ensure_started()
    assert await engine.flush()
    admin = create_admin_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(admin), base_url="http://t") as c:
        usage = (await c.get("/usage", params={"group_by": "provider"}, headers=ADMIN)).json()
    await engine.shutdown()
    rows = [(u["key"], u["requests"]) for u in usage["usage"]]
    print("usage by provider after the old batch:", rows)
    assert rows == [("gemini", 2)]
