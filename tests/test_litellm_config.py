"""BUDGET_CONFIG_FILE reads a LiteLLM proxy_config.yaml unchanged (SPEC §12 "LiteLLM
configuration"): provider, tag and model budgets, routes from model_list, the rest ignored with one
warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from budget_middleware import BudgetSettings
from budget_middleware.admin import create_admin_app
from budget_middleware.exceptions import ConfigFileError
from budget_middleware.manage.config_file import load_config_file
from budget_middleware.manage.litellm_config import translate
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store
from support import chat, client, host_app, running

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
