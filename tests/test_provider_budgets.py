"""`GET /provider/budgets` and `budget_provider_remaining_usd` (SPEC §12): each provider's tightest
provider-wide budget in LiteLLM's shape, read from the live counters, through a host app with the
middleware and the admin API mounted."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import httpx

from admin_support import ADMIN
from budget_middleware import BudgetSettings, create_admin_app
from support import chat, client, host_app, running

Settings = Callable[..., BudgetSettings]
_METRIC = re.compile(r'^budget_provider_remaining_usd\{provider="([^"]+)"\} (\S+)$', re.M)


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


def _midnight_after(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(), UTC)


def _first_of_next_month(day: date) -> datetime:
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


async def _spend(http: httpx.AsyncClient, model: str, usd: str) -> None:
    """One metered request that costs exactly `usd` (the upstream reports `usage.cost`)."""
    r = await http.post("/v1/chat/completions", json=chat(model), headers={"x-mock-cost": usd})
    assert r.status_code == 200, r.text


async def _provider_budgets(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/admin/provider/budgets", headers=ADMIN)
    assert r.status_code == 200, r.text
    providers: dict[str, Any] = r.json()["providers"]
    return providers


async def _metric(http: httpx.AsyncClient) -> dict[str, float]:
    r = await http.get("/admin/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {provider: float(value) for provider, value in _METRIC.findall(r.text)}


async def _put(http: httpx.AsyncClient, provider: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.put(f"/admin/providers/{provider}", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()["provider"]
    return answer


async def test_each_provider_shows_its_tightest_budget_from_the_live_counters(
    make_settings: Settings,
) -> None:
    # No flush during the test: the store keeps the spend at 0, only the live counters have it.
    settings = make_settings(flush_interval_seconds=3600)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        day = datetime.now(UTC).date()
        openai = await _put(http, "openai", {"calendar_aligned": True, "budgets": [
            {"max_limit": 10, "reset_duration": "1d"},
            {"max_limit": 12, "reset_duration": "1M"},
        ]})  # fmt: skip
        daily_id = next(b["id"] for b in openai["budgets"] if b["reset_duration"] == "1d")
        anthropic = await _put(
            http, "anthropic", {"budgets": [{"max_limit": 5, "reset_duration": "1h"}]}
        )
        await _put(http, "azure", {"budgets": [{"max_limit": 2, "reset_duration": None}]})
        rate_only = {"rate_limit": {"request_max_limit": 100, "request_reset_duration": "1m"}}
        await _put(http, "mistral", rate_only)

        await _spend(http, "openai/gpt-4o", "1.5")
        await _spend(http, "openai/gpt-4o-mini", "2.5")
        await _spend(http, "anthropic/claude-sonnet-4", "1.5")
        await _spend(http, "gemini/gemini-2.0-flash", "7")  # no provider budget at all
        await _spend(http, "mistral/mistral-large", "1")  # a rate limit, no budget

        before = await _provider_budgets(http)
        metric_before = await _metric(http)
        stored = (await http.get("/admin/budgets?owner_type=provider", headers=ADMIN)).json()

        # The daily budget starts a new window: now the monthly one has the least left.
        reset = await http.post(f"/admin/budgets/{daily_id}/reset", headers=ADMIN)
        assert reset.status_code == 200, reset.text
        after = await _provider_budgets(http)
        metric_after = await _metric(http)

    print(f"before the reset: {before}\n  metric {metric_before}")
    print(f"after the reset of the daily budget: {after}\n  metric {metric_after}")
    print("store's spent (not flushed):", [b["spent"] for b in stored["budgets"]])
    assert all(b["spent"] == 0 for b in stored["budgets"])  # the answers below are live ones

    hour = _at(anthropic["budgets"][0]["last_reset"])
    assert hour is not None
    expected_anthropic = {
        "budget_limit": 5.0,
        "time_period": "1h",
        "spend": 1.5,
        "budget_reset_at": hour + timedelta(hours=1),
    }
    expected_azure = {"budget_limit": 2.0, "time_period": None, "spend": 0.0,
                      "budget_reset_at": None}  # fmt: skip

    def parsed(answer: dict[str, Any]) -> dict[str, Any]:
        return {p: {**v, "budget_reset_at": _at(v["budget_reset_at"])} for p, v in answer.items()}

    assert list(before) == ["anthropic", "azure", "openai"]  # not gemini, not mistral
    assert parsed(before) == {
        "anthropic": expected_anthropic,
        "azure": expected_azure,
        # $10 a day and $12 a month, $4 spent: the daily one has $6 left, the monthly $8
        "openai": {"budget_limit": 10.0, "time_period": "1d", "spend": 4.0,
                   "budget_reset_at": _midnight_after(day)},
    }  # fmt: skip
    assert parsed(after) == {
        "anthropic": expected_anthropic,
        "azure": expected_azure,
        # the daily one now has $10 left; the monthly one, still $8 (a month written as LiteLLM
        # reads it: "1M" has no unit it knows)
        "openai": {"budget_limit": 12.0, "time_period": "1mo", "spend": 4.0,
                   "budget_reset_at": _first_of_next_month(day)},
    }  # fmt: skip
    assert all(v["budget_reset_at"] is None or v["budget_reset_at"].endswith("Z")
               for v in before.values())  # fmt: skip
    assert metric_before == {"anthropic": 3.5, "azure": 2.0, "openai": 6.0}
    assert metric_after == {"anthropic": 3.5, "azure": 2.0, "openai": 8.0}


async def test_without_provider_budgets_the_answer_is_empty_and_admin_only(
    make_settings: Settings,
) -> None:
    settings = make_settings()
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        await _spend(http, "openai/gpt-4o", "1")
        empty = await http.get("/admin/provider/budgets", headers=ADMIN)
        metric = await _metric(http)
        anonymous = await http.get("/admin/provider/budgets")
        wrong = await http.get("/admin/provider/budgets", headers={"Authorization": "Bearer x"})
        key = await http.post("/admin/virtual-keys", json={"name": "alice"}, headers=ADMIN)
        value = key.json()["virtual_key"]["value"]
        with_key = await http.get(
            "/admin/provider/budgets", headers={"Authorization": f"Bearer {value}"}
        )
        query = await http.get("/admin/provider/budgets?provider=openai", headers=ADMIN)
    statuses = [r.status_code for r in (empty, anonymous, wrong, with_key, query)]
    print(f"empty: {empty.json()}; metric {metric}; statuses {statuses}")
    assert empty.json() == {"providers": {}}
    assert metric == {}
    assert statuses == [200, 401, 401, 401, 422]
    assert anonymous.json()["error"]["type"] == "authentication_error"


async def test_a_soft_provider_budget_is_never_the_tightest(make_settings: Settings) -> None:
    """SPEC §12, §14: the tightest budget is the one that refuses first, as routing's
    `most_remaining` ranks them; a soft budget never refuses. A soft $10 a week beside a hard
    $100 a day was shown as openai's `budget_limit` (10.0) and its remaining USD, and a provider
    with only a soft budget was listed as capped."""
    settings = make_settings(flush_interval_seconds=3600)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        await _put(http, "openai", {"budgets": [
            {"max_limit": 100, "reset_duration": "1d"},
            {"max_limit": 10, "reset_duration": "1w", "soft": True},
        ]})  # fmt: skip
        await _put(http, "azure", {"budgets": [{"max_limit": 5, "soft": True}]})
        await _spend(http, "openai/gpt-4o", "1")
        shown = await _provider_budgets(http)
        metric = await _metric(http)
    print(f"with a soft budget beside a hard one: {shown}; metric {metric}")
    assert list(shown) == ["openai"]  # azure's only budget is soft: nothing caps it
    assert shown["openai"]["budget_limit"] == 100.0 and shown["openai"]["spend"] == 1.0
    assert metric == {"openai": 99.0}


# What LiteLLM's `duration_in_seconds` reads (litellm_core_utils/duration_parser.py): a number
# and `s`, `m`, `h`, `d`, `w` or `mo`; anything else raises "Unsupported duration unit".
_LITELLM_PERIOD = re.compile(r"^[1-9][0-9]*(mo|[smhdw])$")


async def test_a_quarter_or_a_year_is_written_as_litellm_reads_it(make_settings: Settings) -> None:
    """SPEC §12: `time_period` in LiteLLM's shape. A quarter or a year was written `1Q` / `1Y`,
    which LiteLLM's own parser refuses (as `1M` was, before it became `1mo`); now in months."""
    settings = make_settings()
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        durations = {"openai": "1Q", "azure": "1Y", "anthropic": "2Q", "mistral": "1M",
                     "gemini": "1w"}  # fmt: skip
        for provider, duration in durations.items():
            await _put(http, provider, {"budgets": [{"max_limit": 5, "reset_duration": duration}]})
        shown = await _provider_budgets(http)
    periods = {provider: answer["time_period"] for provider, answer in shown.items()}
    print(f"time_period by provider: {periods}")
    assert periods == {"openai": "3mo", "azure": "12mo", "anthropic": "6mo", "mistral": "1mo",
                       "gemini": "1w"}  # fmt: skip
    assert all(_LITELLM_PERIOD.match(period) for period in periods.values())
