"""BUDGET_UNPRICED_MODELS (SPEC §3, §7, §8): a model with no known price costs 0 (`allow`, the
default) or is refused with 403 `model_not_priced` before the app is called (`refuse`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
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


@pytest.mark.parametrize(
    ("unpriced", "mode", "said"),
    [
        ("allow", "enforce", "its requests cost 0 (add it"),
        ("refuse", "enforce", "its requests are refused, 403 model_not_priced (add it"),
        ("refuse", "shadow", "its requests would be refused, 403 model_not_priced"),
    ],
)
async def test_the_log_says_what_becomes_of_an_unpriced_model_s_requests(
    make_settings: Settings, caplog: pytest.LogCaptureFixture, unpriced: str, mode: str, said: str
) -> None:
    """The warning logged once per unpriced model said "its requests cost 0" under
    `BUDGET_UNPRICED_MODELS=refuse` too, where each is answered 403 `model_not_priced`."""
    app = host_app(make_settings(unpriced_models=unpriced, mode=mode))
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            answer = await http.post("/v1/chat/completions", json=chat("acme/no-such-model-xyz"))
    logged = [r.getMessage() for r in caplog.records if "no-such-model-xyz" in r.getMessage()]
    print(f"{unpriced}, {mode}: answered {answer.status_code}; logged {logged}")
    assert answer.status_code == (403 if (unpriced, mode) == ("refuse", "enforce") else 200)
    assert len(logged) == 1 and said in logged[0]


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


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_an_unpriced_request_in_flight_holds_its_budgets(
    make_settings: Settings, counters: str
) -> None:
    """A model without a price: its cost comes only with its answer (`x-budget-cost` here).
    Before one has ended, a request to it reserves the most one request is charged: in flight,
    it holds its budgets (429 `budget_reserved`, retryable, for the others). Once one has ended,
    the next reserve the most it cost, and run side by side. Either way concurrency cannot push
    spend past the limit (SPEC §6): 300 at once used to be all admitted, 30 times the budget."""
    cost_nanos = 5_000  # $0.000005 a request, the budget twenty of them

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.01)  # in flight long enough for the others to arrive
        usage = {"prompt_tokens": 10, "completion_tokens": 5}
        return JSONResponse(
            {"choices": [], "usage": usage}, headers={"x-budget-cost": f"{cost_nanos / 1e9}"}
        )

    prefix = unique_prefix()
    if counters == "redis":
        need_redis()
        settings = make_settings(redis_url=REDIS_URL)
    else:
        settings = make_settings()
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])]),
        settings=settings,
    )
    engine = get_engine(settings)
    if counters == "redis":
        use_prefix(engine, prefix)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 20 * cost_nanos / 1e9, "reset_duration": "1d"}]
        )
        auth = {"authorization": f"Bearer {key.value}"}
        body = chat("acme/no-price-here", max_tokens=5)

        async def at_once() -> list[httpx.Response]:
            return await asyncio.gather(
                *[http.post("/v1/chat/completions", json=body, headers=auth) for _ in range(300)]
            )

        unknown = await at_once()  # no request to it has ended yet
        learned = await at_once()  # it cost $0.000005: that is what each reserves now
        after = (await http.post("/v1/chat/completions", json=body, headers=auth)).status_code
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    if counters == "redis":
        delete_prefix(REDIS_URL, prefix)
    first = [a.status_code for a in unknown]
    second = [a.status_code for a in learned]
    held = next(a for a in unknown if a.status_code == 429)
    print(f"{counters}: 300 at once, cost unknown: {first.count(200)} admitted, then 300 more")
    print(f"  once it is known: {second.count(200)} admitted; spent ${spent:.6f} of $0.000100")
    print("  held:", held.json()["error"]["message"])
    assert held.json()["error"]["code"] == "budget_reserved" and "retry-after" in held.headers
    assert "without a price" in held.json()["error"]["message"]
    # Alone in flight while its cost is unknown (on Redis, the burst spreads over the first
    # request's life: those after it reserve what it cost).
    assert first.count(200) == 1 if counters == "memory" else 1 <= first.count(200) < 20
    assert first.count(200) + second.count(200) == 20 and after == 402
    assert round(spent * 1e9) == 20 * cost_nanos  # no overshoot


async def test_an_unpriced_model_whose_request_cost_nothing_then_reserves_nothing(
    make_settings: Settings,
) -> None:
    """A model without a price whose answers report no cost (a free local model): once one of
    its requests has ended, charged $0, the next reserve that, the most one has cost, and run
    side by side; not each alone on the budget as if its cost were still unknown."""

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.01)  # in flight together
        return JSONResponse({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    settings = make_settings()
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])]),
        settings=settings,
    )
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1}])
        auth = {"authorization": f"Bearer {key.value}"}
        body = chat("acme/free-local-model", max_tokens=5)
        first = await http.post("/v1/chat/completions", json=body, headers=auth)  # cost $0
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=body, headers=auth) for _ in range(10)]
        )
    statuses = Counter(a.status_code for a in answers)
    print(f"after one request charged $0: 10 at once answered {dict(statuses)}")
    assert first.status_code == 200
    assert statuses == {200: 10}


async def test_an_unpriced_request_for_several_choices_reserves_each_at_the_most_seen(
    make_settings: Settings,
) -> None:
    """A model without a price, once a request to it has cost $0.000005: a request for `n`
    choices reserves that for each (it reserved one, and 50 requests of 4 choices at once
    spent several times the budget)."""
    per_choice = 5_000

    async def provider(request: Request) -> JSONResponse:
        choices = (await request.json()).get("n", 1)
        await asyncio.sleep(0.01)
        cost = per_choice * choices / 1e9
        return JSONResponse({"choices": []}, headers={"x-budget-cost": f"{cost}"})

    settings = make_settings()
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])]),
        settings=settings,
    )
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 0.0001}])
        auth = {"authorization": f"Bearer {key.value}"}
        first = await http.post(
            "/v1/chat/completions", json=chat("acme/no-price-here"), headers=auth
        )  # its cost is learned: $0.000005
        answers = await asyncio.gather(
            *[
                http.post(
                    "/v1/chat/completions", json=chat("acme/no-price-here", n=4), headers=auth
                )
                for _ in range(50)
            ]
        )
        counter = engine.registry.counter("budget", key.budgets[0].id)
    codes = [a.status_code for a in answers]
    assert counter is not None
    print(f"n=4 at once: {codes.count(200)} admitted; spent {counter.value} of 100000")
    assert first.status_code == 200 and codes.count(200) == 4
    assert counter.value == per_choice * (1 + 4 * 4) and counter.reserved == 0


async def test_calls_naming_no_model_at_once_stay_within_the_budget(
    make_settings: Settings,
) -> None:
    """A call naming no model (Mistral's agents: an `agent_id`, priced as the model its answer
    names) teaches the next no reservation: one small agent call ($0.0001425, mistral-small) let
    60 at once to a mistral-large agent each reserve that, all admitted, $4.80 spent of the
    provider's $1. Each now runs alone on its budgets, as a model without a price does before
    its first answer; one after another they are admitted."""

    async def provider(request: Request) -> JSONResponse:
        large = (await request.json())["agent_id"].endswith("large")
        await asyncio.sleep(0.02)  # in flight together
        usage = (
            {"prompt_tokens": 10_000, "completion_tokens": 10_000}  # $0.08
            if large
            else {"prompt_tokens": 150, "completion_tokens": 200}  # $0.0001425
        )
        model = "mistral-large-latest" if large else "mistral-small-latest"
        return JSONResponse({"model": model, "choices": [], "usage": usage})

    settings = make_settings()
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/agents/completions", provider, methods=["POST"])]),
        settings=settings,
    )
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        engine.manager.put_provider("mistral", budgets=[{"max_limit": 1}])
        await engine.invalidate()
        mistral = {"x-budget-provider": "mistral"}

        async def call(agent: str) -> int:
            body = {"agent_id": f"ag:{agent}", "messages": [], "max_tokens": 10_000}
            sent = await http.post("/v1/agents/completions", json=body, headers=mistral)
            return sent.status_code

        small = await call("small")
        burst = await asyncio.gather(*[call("large") for _ in range(60)])
        serial = [await call("large") for _ in range(2)]
        await engine.flush()
        spent = engine.manager.list_budgets()[0].spent
    print(f"mistral $1: a small agent call ({small}), then 60 large at once: {burst.count(200)}"
          f" admitted; then serially {serial}; spent ${spent:.6f} of $1")  # fmt: skip
    assert small == 200 and burst.count(200) == 1 and burst.count(429) == 59
    assert serial == [200, 200]
    assert spent <= 1 + 0.08  # one request's own overrun at most (SPEC §6)
