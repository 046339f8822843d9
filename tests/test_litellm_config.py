"""BUDGET_CONFIG_FILE reads a LiteLLM proxy_config.yaml unchanged (SPEC §12 "LiteLLM
configuration"): provider, tag and model budgets, routes from model_list, the rest ignored with one
warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlmodel import select

from budget_middleware import BudgetSettings
from budget_middleware.admin import create_admin_app
from budget_middleware.engine.prices import PriceBook
from budget_middleware.exceptions import ConfigFileError
from budget_middleware.manage.config_file import load_config_file
from budget_middleware.manage.litellm_config import translate
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store
from budget_middleware.store.tables import UsageRecordRow
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]
ADMIN = {"authorization": "Bearer admin-secret"}

PROXY_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/OPENAI_API_KEY
      max_budget: 10
      budget_duration: 1d
    model_info:
      id: openai-gpt-4o
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o
      api_base: https://example-resource.openai.azure.com
      api_version: "2024-10-21"
      api_key: os.environ/AZURE_API_KEY
      rpm: 600
  - model_name: claude-sonnet
    litellm_params:
      model: anthropic/claude-sonnet-4
      api_key: os.environ/ANTHROPIC_API_KEY
      max_budget: 50
      budget_duration: 30d

router_settings:
  routing_strategy: usage-based-routing-v2
  provider_budget_config:
    openai:
      budget_limit: 0.000000000001 # float of $ value budget for time period
      time_period: 1d
    azure:
      budget_limit: 100
      time_period: 1mo
    anthropic:
      budget_limit: 200.5
      time_period: 24h
  redis_host: os.environ/REDIS_HOST
  redis_port: os.environ/REDIS_PORT

litellm_settings:
  callbacks: ["prometheus"]
  drop_params: true
  tag_budget_config:
    product:chat-bot:
      max_budget: 0.000000000001
      budget_duration: 1d
    product:chat-bot-2:
      max_budget: 100
      budget_duration: 10m

general_settings:
  master_key: sk-1234
  database_url: os.environ/DATABASE_URL

environment_variables:
  LANGFUSE_HOST: ${LANGFUSE_HOST_NOT_SET}
"""

IGNORED = [
    "model_list[1].litellm_params.rpm",
    "router_settings.routing_strategy",
    "router_settings.redis_host",
    "router_settings.redis_port",
    "litellm_settings.callbacks",
    "litellm_settings.drop_params",
    "general_settings",
    "environment_variables",
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy_config.yaml"
    path.write_text(text)
    return path


def _stored(value: Any) -> Any:
    """`value` without what moves with the clock alone (how far into its window a budget is)."""
    if isinstance(value, dict):
        return {k: _stored(v) for k, v in value.items() if k != "period_ratio"}
    if isinstance(value, list):
        return [_stored(v) for v in value]
    return value


def _snapshot(m: BudgetManager) -> Any:
    """Everything the file declares, as stored: ids, hashes, limits, `updated_at`."""
    return _stored([
        [p.model_dump() for p in m.list_providers()],
        [t.model_dump() for t in m.list_tags()],
        [c.model_dump() for c in m.list_model_configs()[0]],
        [r.model_dump() for r in m.list_routes()],
        [b.model_dump() for b in m.list_budgets()],
    ])  # fmt: skip


def _budgets(owners: list[dict[str, Any]], field: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        o[field]: [(b["max_limit"], b["reset_duration"], b["source"]) for b in o["budgets"]]
        for o in owners
    }


async def test_a_litellm_proxy_config_declares_budgets_and_routes(
    make_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(config_file=_write(tmp_path, PROXY_CONFIG))
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            providers = (await http.get("/admin/providers", headers=ADMIN)).json()["providers"]
            tags = (await http.get("/admin/tags", headers=ADMIN)).json()["tags"]
            configs = (await http.get("/admin/model-configs", headers=ADMIN)).json()
            routes = (await http.get("/admin/routes", headers=ADMIN)).json()["routes"]
            direct = [
                (await http.post("/v1/chat/completions", json=chat("openai/gpt-4o"))).status_code
                for _ in range(2)
            ]
            routed = await http.post("/v1/chat/completions", json=chat("gpt-4o"))
            tagged = [
                (
                    await http.post(
                        "/v1/chat/completions",
                        json=chat("claude-sonnet", metadata={"tags": ["product:chat-bot"]}),
                    )
                ).status_code
                for _ in range(2)
            ]

    # A positive limit is at least one nano-dollar, never 0; `1mo` is a calendar month, `1M`.
    assert _budgets(providers, "provider") == {
        "openai": [(1e-09, "1d", "config")],
        "azure": [(100.0, "1M", "config")],
        "anthropic": [(200.5, "24h", "config")],
    }
    assert _budgets(tags, "tag") == {
        "product:chat-bot": [(1e-09, "1d", "config")],
        "product:chat-bot-2": [(100.0, "10m", "config")],
    }
    assert configs["total_count"] == 2
    assert {
        (c["provider"], c["model_name"], c["scope"], c["scope_id"]): [
            (b["max_limit"], b["reset_duration"]) for b in c["budgets"]
        ]
        for c in configs["model_configs"]
    } == {
        ("openai", "gpt-4o", "global", None): [(10.0, "1d")],
        ("anthropic", "claude-sonnet-4", "global", None): [(50.0, "30d")],
    }
    assert sorted((r["name"], r["targets"], r["strategy"]) for r in routes) == [
        ("claude-sonnet", ["anthropic/claude-sonnet-4"], "ordered"),
        ("gpt-4o", ["openai/gpt-4o", "azure/gpt-4o"], "ordered"),
        ("openai-gpt-4o", ["openai/gpt-4o"], "ordered"),  # model_info.id: that deployment
    ]

    # LiteLLM's own example: the first request passes, the second is refused.
    assert direct == [200, 402]
    # ...and a request for the model_name goes to the next deployment within budget.
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-budget-route"] == "azure/gpt-4o"
    assert routed.json()["model"] == "azure/gpt-4o"
    assert tagged == [200, 402]

    warnings = [r.getMessage() for r in caplog.records if "LiteLLM" in r.getMessage()]
    assert len(warnings) == 1, warnings
    ignored = warnings[0].split("ignored: ", 1)[1].split(", ")
    assert ignored == IGNORED
    assert "os.environ" not in warnings[0] and "sk-1234" not in warnings[0]


def test_applying_the_same_litellm_file_again_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/b.db", config_file=_write(tmp_path, PROXY_CONFIG)
    )
    store = Store(settings.database_url)
    store.create_schema()
    manager = BudgetManager(store, settings)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        load_config_file(store, settings)
        first = _snapshot(manager)
        load_config_file(store, settings)
    assert _snapshot(manager) == first
    assert len(first[4]) == 7  # 3 provider, 2 tag and 2 model budgets
    # One warning per application of the file, never one per part.
    assert sum("LiteLLM" in r.getMessage() for r in caplog.records) == 2
    store.dispose()


def test_an_edited_litellm_budget_is_applied_and_keeps_its_usage(tmp_path: Path) -> None:
    path = _write(tmp_path, PROXY_CONFIG)
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", config_file=path)
    store = Store(settings.database_url)
    store.create_schema()
    manager = BudgetManager(store, settings)
    load_config_file(store, settings)
    before = manager.list_budgets(owner_type="provider", owner_id="azure")[0]
    path.write_text(PROXY_CONFIG.replace("budget_limit: 100\n", "budget_limit: 150\n"))
    load_config_file(store, settings)
    after = manager.list_budgets(owner_type="provider", owner_id="azure")[0]
    assert (after.id, after.max_limit, after.reset_duration) == (before.id, 150.0, "1M")
    store.dispose()


def test_bad_litellm_budgets_fail_naming_the_file_and_the_litellm_entry(tmp_path: Path) -> None:
    def start(text: str) -> None:
        settings = BudgetSettings(
            database_url=f"sqlite:///{tmp_path}/b.db", config_file=_write(tmp_path, text)
        )
        store = Store(settings.database_url)
        store.create_schema()
        try:
            load_config_file(store, settings)
        finally:
            store.dispose()

    file = r"BUDGET_CONFIG_FILE '.*proxy_config\.yaml', "
    with pytest.raises(
        ConfigFileError,
        match=file + r"router_settings\.provider_budget_config\.openai: time_period: .*duration",
    ):
        start(PROXY_CONFIG.replace("time_period: 1d", "time_period: 1 day"))
    # An error names LiteLLM's fields, as the file has them, not the ones they become.
    bad_tag = file + r".*tag_budget_config\.product:chat-bot-2: max_budget: .*0"
    with pytest.raises(ConfigFileError, match=bad_tag) as refused:
        start(PROXY_CONFIG.replace("max_budget: 100", "max_budget: -1"))
    assert "max_limit" not in str(refused.value)
    print("a negative tag budget:", str(refused.value).split(", ", 1)[1])
    with pytest.raises(ConfigFileError, match=file + r".*openai: unknown field\(s\) budget"):
        start(PROXY_CONFIG.replace("budget_limit: 0.000000000001", "budget: 1"))
    with pytest.raises(ConfigFileError, match=file + r"model_list\[2\] .*different budget"):
        start(PROXY_CONFIG.replace("model: anthropic/claude-sonnet-4", "model: openai/gpt-4o"))
    with pytest.raises(ConfigFileError, match=file + r"model_list\[2\]: needs 'model_name'"):
        start(PROXY_CONFIG.replace("model_name: claude-sonnet", "model_name: ''"))
    # A file of our own still refuses a section it does not know.
    with pytest.raises(ConfigFileError, match="unknown section"):
        start("providers: []\nrouter_setting: {}\n")


def test_our_own_sections_beside_litellm_s_replace_what_they_name(tmp_path: Path) -> None:
    text = PROXY_CONFIG + (
        "routes:\n"
        "  - name: gpt-4o\n"
        "    targets: [azure/gpt-4o, openai/gpt-4o]\n"
        "    strategy: most_remaining\n"
    )
    settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/b.db", config_file=_write(tmp_path, text)
    )
    store = Store(settings.database_url)
    store.create_schema()
    load_config_file(store, settings)
    routes = {r.name: (r.targets, r.strategy) for r in BudgetManager(store, settings).list_routes()}
    assert routes["gpt-4o"] == (["azure/gpt-4o", "openai/gpt-4o"], "most_remaining")
    assert routes["claude-sonnet"] == (["anthropic/claude-sonnet-4"], "ordered")
    store.dispose()


def test_the_translation_is_a_pure_function_of_the_litellm_data() -> None:
    data = {
        "model_list": [
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}},  # 2 keys
            {"model_name": "gpt-4o", "litellm_params": {"model": "azure/my-deployment",
                                                         "max_budget": "1e-12"}},
            {"model_name": "*", "litellm_params": {"model": "openai/*"}},
        ],
        "router_settings": {"provider_budget_config": {"gemini": {"budget_limit": 5}}},
    }  # fmt: skip
    out = translate(data)
    assert out.sections == {
        "routes": [{"name": "gpt-4o", "targets": ["openai/gpt-4o", "azure/my-deployment"]}],
        "model_configs": [
            {"model_name": "my-deployment", "provider": "azure",
             "budgets": [{"max_limit": 1e-12, "reset_duration": None}]}
        ],
        "providers": [
            {"provider": "gemini", "budgets": [{"max_limit": 5, "reset_duration": None}]}
        ],
    }  # fmt: skip
    assert out.ignored == ["model_list wildcard routes (*: openai/*)"]


def test_litellm_s_period_words_are_its_durations() -> None:
    """LiteLLM also writes its periods as words (`daily`, `weekly`, `monthly`): read as its
    own parser reads them (start-up stopped on "invalid duration 'daily'")."""
    data = {
        "router_settings": {
            "provider_budget_config": {
                "openai": {"budget_limit": 5, "time_period": "daily"},
                "azure": {"budget_limit": 5, "time_period": "Monthly"},
                "gemini": {"budget_limit": 5, "time_period": "weekly"},
            }
        }
    }
    periods = {
        p["provider"]: p["budgets"][0]["reset_duration"]
        for p in translate(data).sections["providers"]
    }
    assert periods == {"openai": "1d", "azure": "1mo", "gemini": "1w"}


def test_a_deployment_s_rpm_and_tpm_are_named_as_not_enforced() -> None:
    """LiteLLM enforces a deployment's `rpm` / `tpm` (in `litellm_params` or beside them);
    budget_middleware reads budgets only (SPEC §12), so the one warning names each such limit:
    they were dropped silently, a file's rate limits lifted with no word."""
    data = {
        "model_list": [
            {"model_name": "gpt-4o", "litellm_params": {"model": "azure/gpt-4o", "rpm": 600,
                                                        "tpm": 100000, "max_budget": 5}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}, "rpm": 10,
             "tpm": 5000},
            {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-sonnet-4",
                                                        "max_parallel_requests": 4}},
        ],
    }  # fmt: skip
    ignored = translate(data).ignored
    print(ignored)
    assert ignored == [
        "model_list[0].litellm_params.rpm",
        "model_list[0].litellm_params.tpm",
        "model_list[1].rpm",
        "model_list[1].tpm",
        "model_list[2].litellm_params.max_parallel_requests",
    ], ignored


async def test_litellm_s_proxy_budget_caps_every_request(
    make_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`litellm_settings.max_budget` / `budget_duration` is LiteLLM's budget of the whole proxy
    (enforced when above 0): it was only named in the warning, and a $0.02 cap let every
    request through. It is a global model config of every model of every provider."""
    text = (
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}\n"
        "litellm_settings:\n"
        "  max_budget: 0.02\n"
        "  budget_duration: 30d\n"
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    cost = {"x-mock-cost": "0.01"}
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            statuses = [
                (
                    await http.post("/v1/chat/completions", json=chat(model), headers=cost)
                ).status_code
                for model in ("gpt-4o", "anthropic/claude-sonnet-4", "gpt-4o", "mistral/small")
            ]
            budgets = (await http.get("/admin/budgets?from_memory=true", headers=ADMIN)).json()[
                "budgets"
            ]
    print("answers:", statuses, [(b["user_path"], b["max_limit"], b["spent"]) for b in budgets])
    assert statuses == [200, 200, 402, 402]
    assert [(b["max_limit"], b["reset_duration"], b["spent"]) for b in budgets] == [
        (0.02, "30d", 0.02)
    ]
    assert not any("max_budget" in r.getMessage() for r in caplog.records)
    # 0 is LiteLLM's default: no proxy budget, none made.
    assert "model_configs" not in translate({"litellm_settings": {"max_budget": 0}}).sections


def test_deployments_of_one_model_with_one_budget_spelt_two_ways_are_one_budget() -> None:
    """Two deployments of one model may keep one budget only when they say the same; `1d` and
    `24h` (or `max_budget` 5 and `"5.0"`) say the same, and the file was refused as giving "a
    different budget"."""
    params = [
        {"model": "openai/gpt-4o", "max_budget": 5, "budget_duration": "1d"},
        {"model": "openai/gpt-4o", "max_budget": "5.0", "budget_duration": "24h"},
    ]
    data = {"model_list": [{"model_name": "gpt-4o", "litellm_params": p} for p in params]}
    out = translate(data)
    print(out.sections["model_configs"])
    assert out.sections["model_configs"] == [
        {"model_name": "gpt-4o", "provider": "openai",
         "budgets": [{"max_limit": 5, "reset_duration": "1d"}]}
    ]  # fmt: skip


async def _spend(settings: BudgetSettings, models: list[str]) -> list[tuple[str, str, int, str]]:
    """Each model asked for once (the same body, 100 output tokens) through the middleware: the
    recorded (provider, model, cost in nano-dollars, cost source) of each, in order."""
    app = host_app(settings)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        for model in models:
            answer = await http.post("/v1/chat/completions", json=chat(model, max_tokens=100))
            assert answer.status_code == 200, answer.text
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]
    return [(r.provider, r.model, r.cost_nanos, r.cost_source) for r in rows]


async def test_an_azure_deployment_is_metered_at_its_base_model_s_price(
    make_settings: Settings, tmp_path: Path
) -> None:
    """LiteLLM prices an Azure deployment (`azure/<deployment name>`, a name no price list knows)
    by `model_info.base_model`. It was not read: with BUDGET_UNPRICED_MODELS=allow (the default)
    every request to the deployment cost $0, however many tokens. The request's model and the
    record's stay the deployment's (`my-deployment`: its budgets apply); the price is the base
    model's."""
    text = (
        "model_list:\n"
        "  - model_name: my-gpt\n"
        "    litellm_params: {model: azure/my-deployment, api_key: os.environ/AZURE_API_KEY}\n"
        "    model_info: {base_model: azure/gpt-4o}\n"
        "  - model_name: my-mini\n"
        "    litellm_params: {model: azure/mini-deployment}\n"
        "    model_info: {base_model: gpt-4o-mini}\n"  # bare, as LiteLLM's docs also write it
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    asked = ["my-gpt", "azure/my-deployment", "azure/gpt-4o", "my-mini", "azure/gpt-4o-mini"]
    rows = await _spend(settings, asked)
    print("recorded:", rows)
    deployment, direct, base, mini, mini_base = rows
    assert deployment[:2] == direct[:2] == ("azure", "my-deployment")
    assert base[2] > 0
    assert deployment[2] == direct[2] == base[2]
    assert mini[:2] == ("azure", "mini-deployment") and mini[2] == mini_base[2] > 0


async def test_a_deployment_s_own_prices_are_what_its_requests_cost(
    make_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """LiteLLM's custom pricing: `input_cost_per_token` / `output_cost_per_token` (USD a token)
    in `litellm_params` or `model_info` are what a deployment's tokens cost, over its price list
    and its base model. They were not read: a self-hosted model cost $0 (BUDGET_UNPRICED_MODELS
    =allow), a negotiated gpt-4o rate was charged at the list price. A cost key that cannot be
    honoured (per second) is named in the start-up warning."""
    text = (
        "model_list:\n"
        "  - model_name: llama\n"
        "    litellm_params: {model: hosted_vllm/llama-3-70b, input_cost_per_token: 0.000003,\n"
        "                     output_cost_per_token: 0.000012}\n"
        "  - model_name: tuned\n"
        "    litellm_params: {model: azure/tuned-deployment}\n"
        "    model_info: {base_model: azure/gpt-4o, output_cost_per_token: 2e-5}\n"
        "  - model_name: sage\n"
        "    litellm_params: {model: sagemaker/llama-endpoint}\n"
        "    model_info: {input_cost_per_second: 0.00042}\n"
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    engine = engine_of(app)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            for model in ("llama", "tuned", "azure/gpt-4o"):
                answer = await http.post("/v1/chat/completions", json=chat(model, max_tokens=100))
                assert answer.status_code == 200, answer.text
            await engine.flush()
            with engine.store.session() as s:
                rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]
    got = [(r.model, r.input_tokens, r.output_tokens, r.cost_nanos, r.cost_source) for r in rows]
    print("recorded:", got)
    llama, tuned, gpt = rows
    assert llama.cost_nanos == llama.input_tokens * 3_000 + llama.output_tokens * 12_000 > 0
    # gpt-4o's input price ($2.50 a million: 2,500 nano-dollars a token), the output at $20.
    assert tuned.cost_nanos == tuned.input_tokens * 2_500 + tuned.output_tokens * 20_000
    assert gpt.cost_nanos == gpt.input_tokens * 2_500 + gpt.output_tokens * 10_000
    warned = " ".join(r.getMessage() for r in caplog.records if "LiteLLM" in r.getMessage())
    assert "model_list[2].model_info.input_cost_per_second" in warned, warned


async def test_a_model_group_alias_is_routed_as_the_group_it_names(
    make_settings: Settings, tmp_path: Path
) -> None:
    """`router_settings.model_group_alias` (`{"gpt-4": "gpt-4o"}`, or `{model: …, hidden: …}`)
    sends a request for the alias to the named group's deployments, under their budgets. It was
    only named in the warning: "gpt-4" reached the app as a model of its own, past the $0.01 that
    the gpt-4o deployment may spend (3 requests at $0.005: all on the budget's model, none
    counted). The alias is now a route with the group's targets."""
    text = (
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o, max_budget: 0.01}\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: azure/gpt-4o}\n"
        "router_settings:\n"
        "  model_group_alias: {gpt-4: gpt-4o, gpt-4-turbo: {model: gpt-4o, hidden: true}}\n"
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    engine = engine_of(app)
    cost = {"x-mock-cost": "0.005"}
    async with running(app), client(app) as http:
        answers = [
            await http.post("/v1/chat/completions", json=chat(model), headers=cost)
            for model in ("gpt-4", "gpt-4-turbo", "gpt-4")
        ]
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]
    got = [(a.status_code, a.headers.get("x-budget-route")) for a in answers]
    recorded = [(r.provider, r.model, r.cost_nanos) for r in rows]
    print("answers:", got, "recorded:", recorded)
    assert got == [(200, "openai/gpt-4o"), (200, "openai/gpt-4o"), (200, "azure/gpt-4o")]
    assert [r[:2] for r in recorded] == [("openai", "gpt-4o")] * 2 + [("azure", "gpt-4o")]
    assert "model_group_alias" not in str(translate(yaml_data(text)).ignored)


def yaml_data(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _loaded_and_translated(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> tuple[str, Any]:
    """The file loaded at start-up as BUDGET_CONFIG_FILE (its warning's text), and its
    translation."""
    with caplog.at_level("WARNING", logger="budget_middleware"):
        load_config_file(Store("sqlite://"), BudgetSettings(config_file=_write(tmp_path, text)))
    return " ".join(r.getMessage() for r in caplog.records), translate(yaml.safe_load(text))


def test_files_litellm_starts_with_load_their_unusable_parts_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files LiteLLM starts with, which loaded before aliases, ids and prices were read, still
    load (the review found 8 of 11 stopped start-up): an alias of a group a wildcard serves (or
    LiteLLM's database keeps), an id twice or with a space, `model_info: []`, one model served
    by two backends priced apart (the first's price kept), a base_model said in both places
    the same way (`azure/gpt-4o` and bare `gpt-4o` of an Azure deployment). Each part not
    used is named in the warning."""
    text = (
        "model_list:\n"
        "  - model_name: '*'\n"
        "    litellm_params: {model: 'openai/*'}\n"
        "  - model_name: llama\n"
        "    litellm_params: {model: openai/llama-3-70b, api_base: 'http://a',\n"
        "                     input_cost_per_token: 0.000003}\n"
        "    model_info: {id: East US deployment}\n"
        "  - model_name: llama\n"
        "    litellm_params: {model: openai/llama-3-70b, api_base: 'http://b',\n"
        "                     input_cost_per_token: 0.000005}\n"
        "    model_info: {id: twice}\n"
        "  - model_name: mine\n"
        "    litellm_params: {model: azure/my-deployment, base_model: azure/gpt-4o}\n"
        "    model_info: {base_model: gpt-4o, id: twice}\n"
        "  - model_name: listed\n"
        "    litellm_params: {model: openai/gpt-4o, api_base: 'http://a'}\n"
        "  - model_name: listed\n"
        "    litellm_params: {model: openai/gpt-4o, api_base: 'http://b',\n"
        "                     input_cost_per_token: 0.00000025}\n"
        "  - model_name: other\n"
        "    litellm_params: {model: openai/gpt-4o-mini}\n"
        "    model_info: []\n"
        "router_settings:\n"
        "  model_group_alias: {gpt-4: gpt-4o, fast: other}\n"
    )
    warned, translated = _loaded_and_translated(tmp_path, text, caplog)
    print(warned)
    routes = {r["name"]: r["targets"] for r in translated.sections["routes"]}
    print(routes, translated.prices)
    assert routes == {"llama": ["openai/llama-3-70b"], "mine": ["azure/my-deployment"],
                      "listed": ["openai/gpt-4o"], "other": ["openai/gpt-4o-mini"],
                      "fast": ["openai/gpt-4o-mini"]}  # fmt: skip
    for named in ("model_group_alias.gpt-4 (alias of 'gpt-4o'", "'East US deployment'",
                  "'twice'", "model_list[6].model_info (not a mapping)",
                  "model_list[2] (llama: openai/llama-3-70b) (another price",
                  "model_list[5] (listed: openai/gpt-4o) (another price"):  # fmt: skip
        assert named in warned, named
    assert translated.prices["openai/llama-3-70b"].rates == (("input_per_mtok", 3.0),)
    assert translated.prices["azure/my-deployment"].base == ("azure", "gpt-4o")
    # the first backend at its list price: the second's $0.25 a million is no price of it
    assert "openai/gpt-4o" not in translated.prices


def test_groups_no_route_can_take_load_unrouted_and_a_model_from_the_environment_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files LiteLLM starts with stopped start-up (a fault hunt's): a `model_name` with a space
    or beyond ASCII (no request can name it here), a group of 17 models (a route takes 16),
    a group of one model spelt with both names of its provider (`azure/` and `azure_ai/`: "the
    same target twice"). They load: the first two unrouted, named in the warning, their
    budgets read; the third one target. And `model: os.environ/MODEL`, which LiteLLM reads
    from the environment, was a target of its own (provider `os.environ`, unpriced: the
    provider's budget never refused it); it is the variable's model now, and unrouted (named
    in the warning) when the variable is not set."""
    monkeypatch.setenv("BM_TEST_MODEL", "openai/gpt-4o")
    monkeypatch.delenv("BM_TEST_UNSET", raising=False)
    many = "".join(
        f"  - model_name: big\n    litellm_params: {{model: azure/region-{n}}}\n" for n in range(17)
    )
    text = (
        "model_list:\n"
        "  - model_name: my model\n"
        "    litellm_params: {model: openai/gpt-4o-mini, max_budget: 5, budget_duration: 1d}\n"
        "  - model_name: gpt-\u00e9\n"
        "    litellm_params: {model: openai/gpt-4.1}\n" + many + "  - model_name: g\n"
        "    litellm_params: {model: azure/gpt-4o}\n"
        "  - model_name: g\n"
        "    litellm_params: {model: azure_ai/gpt-4o}\n"
        "  - model_name: env\n"
        "    litellm_params: {model: os.environ/BM_TEST_MODEL}\n"
        "  - model_name: unset\n"
        "    litellm_params: {model: os.environ/BM_TEST_UNSET, max_budget: 1}\n"
    )
    warned, translated = _loaded_and_translated(tmp_path, text, caplog)
    routes = {r["name"]: r["targets"] for r in translated.sections["routes"]}
    budgets = {m["model_name"]: m["budgets"] for m in translated.sections["model_configs"]}
    print(warned, routes, budgets, sep="\n")
    assert routes == {"g": ["azure/gpt-4o"], "env": ["openai/gpt-4o"]}
    assert list(budgets) == ["gpt-4o-mini"]  # the unrouted group's budget, read
    for named in ("model_name my model", "contains whitespace", "model_name gpt-\u00e9",
                  "printable ASCII", "model_name big", "17 models, more than a route's 16",
                  "os.environ/BM_TEST_UNSET: not set here"):  # fmt: skip
        assert named in warned, named


async def test_a_deployment_s_id_names_that_deployment(
    make_settings: Settings, tmp_path: Path
) -> None:
    """LiteLLM serves a request naming a deployment's `model_info.id` by that one deployment
    (under its budget). The id was not read: `eastus` reached the app as a model of its own, and
    its requests went past the deployment's $0.01 (3 at $0.005: all answered). It is a route of
    that deployment's model, as a `model_name` of one entry is."""
    text = (
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: azure/gpt-4o-eastus, max_budget: 0.01}\n"
        "    model_info: {id: eastus, base_model: azure/gpt-4o}\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: azure/gpt-4o-westus}\n"
        "    model_info: {id: gpt-4o}\n"  # a model_name too: the group is found first
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    cost = {"x-mock-cost": "0.005"}
    async with running(app), client(app) as http:
        answers = [
            await http.post("/v1/chat/completions", json=chat("eastus"), headers=cost)
            for _ in range(3)
        ]
    got = [(a.status_code, a.headers.get("x-budget-route")) for a in answers]
    print("answers:", got)
    assert got == [(200, "azure/gpt-4o-eastus")] * 2 + [(402, None)]
    routes = translate(yaml_data(text)).sections["routes"]
    assert [r["name"] for r in routes] == ["gpt-4o", "eastus"]


async def test_a_wildcard_deployment_s_prices_are_its_models_prices(
    make_settings: Settings, tmp_path: Path
) -> None:
    """LiteLLM's own example of custom prices is a wildcard deployment (fine-tuned models,
    `openai/ft:gpt-4.1-2025-04-14:*`): every model it serves costs its prices. They were looked
    up by the pattern's exact text, which no request names: a fine-tuned model cost $0."""
    text = (
        "model_list:\n"
        "  - model_name: openai/ft:gpt-4.1-2025-04-14:*\n"
        "    litellm_params: {model: 'openai/ft:gpt-4.1-2025-04-14:*'}\n"
        "    model_info: {id: openai-fine-tuned, input_cost_per_token: 0.000003,\n"
        "                 output_cost_per_token: 0.000012}\n"
    )
    rows = await _spend(
        make_settings(config_file=_write(tmp_path, text)),
        ["openai/ft:gpt-4.1-2025-04-14:my-org:example"],
    )
    print("recorded:", rows)
    [(provider, model, cost, source)] = rows
    assert (provider, model, source) == (
        "openai",
        "ft:gpt-4.1-2025-04-14:my-org:example",
        "config_file",
    )
    assert cost == 11 * 3_000 + 100 * 12_000  # 11 input tokens at $3, 100 output at $12 a million


async def test_a_deployment_s_custom_llm_provider_is_its_provider(
    make_settings: Settings, tmp_path: Path
) -> None:
    """`litellm_params.custom_llm_provider` names the provider of a deployment whose `model`
    does not (`model: llama-3-70b, custom_llm_provider: hosted_vllm`), and LiteLLM counts it
    under that provider's budget. It was not read: the route sent the bare `llama-3-70b`, of no
    known provider, past `provider_budget_config.hosted_vllm`'s $0.01 (3 requests at $0.005:
    all answered)."""
    text = (
        "model_list:\n"
        "  - model_name: local\n"
        "    litellm_params: {model: llama-3-70b, custom_llm_provider: hosted_vllm,\n"
        "                     api_base: 'http://vllm:8000/v1'}\n"
        "router_settings:\n"
        "  provider_budget_config:\n"
        "    hosted_vllm: {budget_limit: 0.01, time_period: 1d}\n"
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    cost = {"x-mock-cost": "0.005"}
    async with running(app), client(app) as http:
        answers = [
            await http.post("/v1/chat/completions", json=chat("local"), headers=cost)
            for _ in range(3)
        ]
    got = [(a.status_code, a.headers.get("x-budget-route")) for a in answers]
    print("answers:", got)
    assert got == [(200, "hosted_vllm/llama-3-70b")] * 2 + [(402, None)]


async def test_limits_in_general_settings_are_named_in_the_warning(
    make_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`general_settings` may set limits LiteLLM enforces (`max_parallel_requests`, a
    `budget_duration`): the warning named only the section, which holds mostly the master key
    and the database, so a file's limits went unenforced with no word of them. Each key that
    reads as a limit is named too (never a value: the section holds secrets)."""
    text = (
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o}\n"
        "general_settings:\n"
        "  master_key: sk-secret-1234\n"
        "  database_url: postgresql://u:pw@db/litellm\n"
        "  max_parallel_requests: 10\n"
        "  global_max_parallel_requests: 100\n"
        "  budget_duration: 30d\n"
    )
    settings = make_settings(config_file=_write(tmp_path, text))
    app = host_app(settings)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            answer = await http.post("/v1/chat/completions", json=chat("gpt-4o"))
    warnings = [r.getMessage() for r in caplog.records if "LiteLLM" in r.getMessage()]
    print(warnings)
    assert answer.status_code == 200
    ignored = warnings[0].split("ignored: ", 1)[1].split(", ")
    assert ignored == [
        "general_settings",
        "general_settings.max_parallel_requests",
        "general_settings.global_max_parallel_requests",
        "general_settings.budget_duration",
    ]
    assert "sk-secret" not in warnings[0] and "pw@" not in warnings[0]


async def test_prices_of_a_litellm_file_applied_through_the_admin_api(
    make_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`POST /config/apply` (the CLI's `config apply`) of a LiteLLM file wrote its routes and
    budgets, not its prices, which no store keeps: the route to `azure/my-deployment` then sent
    every request to a model this process had no price for ($0), with no word. The process
    that applies it prices the deployments from then on, and the warning says that the prices
    are not in the store (another process, or this one restarted, needs the file as
    BUDGET_CONFIG_FILE)."""
    text = (
        "model_list:\n"
        "  - model_name: my-gpt\n"
        "    litellm_params: {model: azure/my-deployment}\n"
        "    model_info: {base_model: azure/gpt-4o}\n"
    )
    settings = make_settings()
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    engine = engine_of(app)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        async with running(app), client(app) as http:
            applied = await http.post(
                "/admin/config/apply", json={"text": text, "format": "yaml"}, headers=ADMIN
            )
            answer = await http.post("/v1/chat/completions", json=chat("my-gpt", max_tokens=100))
            await engine.flush()
            with engine.store.session() as s:
                rows = list(s.exec(select(UsageRecordRow)))
    recorded = [(r.provider, r.model, r.cost_nanos, r.cost_source) for r in rows]
    print(applied.json(), answer.headers.get("x-budget-route"), recorded)
    assert applied.status_code == 200 and answer.headers["x-budget-route"] == "azure/my-deployment"
    assert recorded == [("azure", "my-deployment", 1027500, "catalog")]
    warned = [r.getMessage() for r in caplog.records if "not kept in the store" in r.getMessage()]
    assert warned and "azure/my-deployment" in warned[0], warned


async def test_an_azure_deployment_priced_through_the_admin_api_is_metered_so_at_once(
    make_settings: Settings,
) -> None:
    """An app serving Azure OpenAI's paths: a call to `/openai/deployments/prod-chat/…` whose
    body names gpt-4o is metered as gpt-4o while no price names `prod-chat`. Once
    `POST /config/apply` prices the deployment (a LiteLLM file's `input_cost_per_token`), it
    is the deployment served, at its own prices, from the next request on (SPEC §2). Where the
    calls to it lead was kept from before: it was still gpt-4o at the catalog's price,
    $0.0010275 for 11 in and 100 out, where the deployment's $30 and $60 per Mtok are
    $0.00633."""
    text = (
        "model_list:\n"
        "  - model_name: prod\n"
        "    litellm_params: {model: openai/prod-chat, input_cost_per_token: 0.00003,\n"
        "                     output_cost_per_token: 0.00006}\n"
    )
    settings = make_settings()
    app = host_app(settings, prefix="/openai/deployments/prod-chat")
    app.mount("/admin", create_admin_app(settings))
    engine = engine_of(app)
    path = "/openai/deployments/prod-chat/chat/completions?api-version=2024-10-21"
    async with running(app), client(app) as http:
        before = await http.post(path, json=chat("gpt-4o", max_tokens=100))
        applied = await http.post(
            "/admin/config/apply", json={"text": text, "format": "yaml"}, headers=ADMIN
        )
        after = await http.post(path, json=chat("gpt-4o", max_tokens=100))
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]
    recorded = [(r.model, r.input_tokens, r.output_tokens, r.cost_nanos / 1e9) for r in rows]
    print(f"{before.status_code}, applied {applied.status_code}, {after.status_code}: {recorded}")
    assert before.status_code == applied.status_code == after.status_code == 200
    first, second = rows
    assert first.model == "gpt-4o"
    assert second.model == "prod-chat"
    assert second.cost_nanos == second.input_tokens * 30_000 + second.output_tokens * 60_000


def test_a_deployment_s_order_and_weight_are_named_as_not_read() -> None:
    """LiteLLM picks within a group by `order` (lowest first) and `weight`; a route here takes
    the group's deployments in file order, so which deployment serves (and at which price and
    under which budget) may differ from LiteLLM's: they were dropped with no word."""
    data = {
        "model_list": [
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "order": 2}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "azure/gpt-4o", "order": 1,
                                                        "weight": 3}},
        ],
    }  # fmt: skip
    ignored = translate(data).ignored
    print(ignored)
    assert ignored == [
        "model_list[0].litellm_params.order",
        "model_list[1].litellm_params.order",
        "model_list[1].litellm_params.weight",
    ]


def test_of_wildcard_deployments_the_most_specific_prices_a_model() -> None:
    """LiteLLM tries the most specific pattern first: with `openai/*` listed before
    `openai/ft:*`, a fine-tune was priced at the catch-all's price (2.5/10 for the file's
    3/12). And each `*` matches in one pass: a regex of several `.*` backtracked for seconds on
    a long model name a client sent (`openai/*-*-*-*-*-x`)."""
    text = (
        "model_list:\n"
        "  - model_name: '*'\n"
        "    litellm_params: {model: 'openai/*', input_cost_per_token: 0.0000025,\n"
        "                     output_cost_per_token: 0.00001}\n"
        "  - model_name: fine-tunes\n"
        "    litellm_params: {model: 'openai/ft:*', input_cost_per_token: 0.000003,\n"
        "                     output_cost_per_token: 0.000012}\n"
        "  - model_name: odd\n"
        "    litellm_params: {model: 'openai/*-*-*-*-*-x', input_cost_per_token: 0.000001}\n"
    )
    prices = PriceBook()
    prices.add_deployments(translate(yaml.safe_load(text)).prices)
    tuned = prices.price("openai", "ft:gpt-4.1-2025-04-14:acme::abc")
    other = prices.price("openai", "my-own-model")
    odd = prices.price("openai", "a-b-c-d-e-x")
    long_name = prices.price("openai", "-" * 200 + "y")  # ends in no x: the catch-all's
    print(tuned, other, odd, long_name, sep="\n")
    assert tuned is not None and (tuned.input_per_mtok, tuned.output_per_mtok) == (3.0, 12.0)
    assert other is not None and (other.input_per_mtok, other.output_per_mtok) == (2.5, 10.0)
    assert odd is not None and odd.input_per_mtok == 1.0
    assert long_name is not None and long_name.input_per_mtok == 2.5


@pytest.mark.parametrize("pattern", ["a*", "*a", "a*b", "*a*b*", "ab*ba", "a*a*a", "*", "**x"])
def test_a_wildcard_matches_from_the_start_as_fnmatch_s_star_would(pattern: str) -> None:
    """From the start, as LiteLLM's `re.match` does: the model may go on past the pattern."""
    from fnmatch import fnmatchcase
    from itertools import product

    from budget_middleware.engine.prices import _glob_match

    parts = tuple(pattern.split("*"))
    texts = ["".join(t) for n in range(7) for t in product("abx", repeat=n)]
    wrong = [t for t in texts if _glob_match(parts, t) != fnmatchcase(t, pattern + "*")]
    print(f"{pattern}: {len(texts)} texts, {len(wrong)} matched otherwise than fnmatch")
    assert wrong == []


@pytest.mark.parametrize(
    ("ours", "theirs", "named"),
    [
        ("providers:\n  - provider: openai\n    budgets: [{max_limit: 100, reset_duration: 1d}]\n",
         "router_settings:\n  provider_budget_config:\n"
         "    openai: {budget_limit: 1, time_period: 1w}\n",
         "provider_budget_config"),
        ("tags:\n  - tag: prod\n    budgets: [{max_limit: 200, reset_duration: 1d}]\n",
         "litellm_settings:\n  tag_budget_config:\n"
         "    prod: {max_budget: 2, budget_duration: 1w}\n",
         "tag_budget_config"),
    ],
)  # fmt: skip
def test_a_litellm_budget_beside_our_own_entry_for_its_owner_is_refused(
    tmp_path: Path, ours: str, theirs: str, named: str
) -> None:
    """A file declaring provider openai $100/1d in `providers` and $1/1w in LiteLLM's
    `provider_budget_config` stored $100/1d alone, `config check` said valid and nothing was
    logged: the weekly $1 the file declares never applied (tags alike; a fault hunt's). The
    same owner in both is refused, naming both entries, and nothing is written."""
    settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/b.db", config_file=_write(tmp_path, ours + theirs)
    )
    store = Store(settings.database_url)
    store.create_schema()
    with pytest.raises(ConfigFileError) as info:
        load_config_file(store, settings)
    print(info.value)
    assert named in str(info.value) and "declare its budgets in one place" in str(info.value)
    assert BudgetManager(store, settings).list_budgets() == []


@pytest.mark.parametrize("value", [".inf", ".nan", "1.0e+300"])
async def test_a_litellm_price_no_rate_can_hold_fails_start_up_naming_the_entry(
    make_settings: Settings, tmp_path: Path, value: str
) -> None:
    """A LiteLLM deployment's `input_cost_per_token: .inf` (YAML's infinity; `.nan`, or a price
    past what a rate holds) is an invalid BUDGET_CONFIG_FILE: start-up fails naming the file and
    the entry (SPEC §3). It started, and every request to the deployment raised ValueError (the
    server's 500), naming neither."""
    path = tmp_path / "litellm.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: llama\n"
        f"    litellm_params: {{model: hosted_vllm/llama-3-70b, input_cost_per_token: {value},\n"
        "                     output_cost_per_token: 0.000012}\n"
    )
    app = host_app(make_settings(config_file=path))
    try:
        async with running(app), client(app) as http:
            answer = await http.post("/v1/chat/completions", json=chat("llama", max_tokens=100))
            outcome = f"started; the request answered {answer.status_code}"
    except Exception as exc:  # what it raised is the finding
        outcome = f"{type(exc).__name__}: {exc}"
    print(f"input_cost_per_token: {value} ->", outcome)
    assert outcome.startswith("RuntimeError: BUDGET_CONFIG_FILE"), outcome
    assert str(path) in outcome and "model_list[0]" in outcome
    assert "input_cost_per_token" in outcome


async def test_a_litellm_file_sent_to_the_admin_api_reads_no_server_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model: os.environ/NAME` is read from the environment in a process's own
    BUDGET_CONFIG_FILE (the test above). A LiteLLM file sent to `POST /config/apply` read the
    server's variables the same way, so an admin-API caller read them back: a provider's API
    key as a route's target and a model config's name (`GET /routes`, `GET /model-configs`),
    a database URL with its password in the 422's message. Such a file is refused now, naming
    the entry, never the value, and nothing is written."""
    import httpx

    from budget_middleware import get_engine

    monkeypatch.setenv("BM_TEST_PROVIDER_KEY", "sk-proj-SECRET0123456789")
    monkeypatch.setenv("BM_TEST_DB_URL", "postgresql+psycopg://app:hunter2@db.internal/prod")
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", admin_key="admin-secret")
    transport = httpx.ASGITransport(create_admin_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=ADMIN) as http:
        answers = []
        for variable in ("BM_TEST_PROVIDER_KEY", "BM_TEST_DB_URL"):
            text = ("model_list:\n  - model_name: leak\n    litellm_params:\n"
                    f"      model: os.environ/{variable}\n      max_budget: 1\n")  # fmt: skip
            answers.append(await http.post("/config/apply", json={"text": text}))
        shown = (await http.get("/routes")).text + (await http.get("/model-configs")).text
        await get_engine(settings).shutdown()
    print("answers:", [(a.status_code, a.text[:300]) for a in answers])
    print("shown:", shown)
    said = " ".join(a.text for a in answers) + shown
    assert "SECRET0123456789" not in said and "hunter2" not in said
    assert [a.status_code for a in answers] == [422, 422]
    assert all("model_list[0].litellm_params.model" in a.json()["error"]["message"]
               for a in answers)  # fmt: skip
    assert '"count":0' in shown and '"total_count":0' in shown  # nothing written
