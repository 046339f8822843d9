"""BUDGET_UNPRICED_MODELS (SPEC §3, §7, §8): a model with no known price costs 0 (`allow`, the
default) or is refused with 403 `model_not_priced` before the app is called (`refuse`)."""

from __future__ import annotations

from collections.abc import Callable

from budget_middleware import BudgetSettings
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]


async def test_by_default_an_unpriced_model_is_admitted_at_no_cost(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post("/v1/chat/completions", json=chat("acme/no-such-model-xyz"))
    assert answer.status_code == 200
    assert engine.stats.unpriced_requests == 1
    assert engine.manager.usage(group_by="model").total.cost == 0


async def test_refuse_answers_403_model_not_priced_before_the_app_is_called(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings(unpriced_models="refuse"))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        refused = await http.post(
            "/v1/chat/completions",
            json=chat("acme/no-such-model-xyz"),
            headers={"x-mock-header-cost": "0.5"},  # the app could have priced it, but never runs
        )
        priced = await http.post("/v1/chat/completions", json=chat("openai/gpt-4o-mini"))
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "model_not_priced",
        None,
    )
    assert "'no-such-model-xyz'" in error["message"] and "'acme'" in error["message"]
    assert "BUDGET_PRICING_FILE" in error["message"]
    assert priced.status_code == 200
    assert engine.stats.refused.get("model_not_priced") == 1
    assert engine.stats.unpriced_requests == 0
    usage = engine.manager.usage(group_by="model")
    assert usage.total.requests == 1  # only the priced one reached the app


async def test_refuse_counts_against_no_limit(make_settings: Settings) -> None:
    app = host_app(make_settings(unpriced_models="refuse"))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
        )
        await engine.invalidate()
        headers = {"x-budget-key": key.value or ""}
        for _ in range(3):
            refused = await http.post(
                "/v1/chat/completions", json=chat("acme/no-such-model-xyz"), headers=headers
            )
            assert refused.json()["error"]["code"] == "model_not_priced"
        admitted = await http.post("/v1/chat/completions", json=chat(), headers=headers)
    assert admitted.status_code == 200
