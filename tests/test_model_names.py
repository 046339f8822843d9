"""Model names of model configs and provider configs (SPEC §5, §9): an exact name, `*`, or a glob
(fnmatch, case-sensitive); anything else is refused when written, never silently unmatched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import BudgetSettings
from budget_middleware.core.scopes import ModelRule, ProviderPolicy, Scope, model_name_problem
from budget_middleware.exceptions import InvalidRequest
from budget_middleware.manage.config_file import ConfigFileError, load_config_file
from budget_middleware.store.database import Store
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]

INVALID = ["", " gpt-4o", "gpt-4o ", "gpt 4o", "gpt-4o\t", "gpt-4o[", "gpt-[4o", "[]", "/gpt-4o",
           "openai/"]  # fmt: skip
VALID = ["gpt-4o", "*", "claude-opus-*", "gpt-4o?", "gpt-[34]o", "gpt-[!3]o", "openai/gpt-4o*",
         "[]]x", "o1-mini-2024-09-12", "accounts/fireworks/models/llama-v3"]  # fmt: skip


def rule(name: str, provider: str | None = None) -> ModelRule:
    return ModelRule(name, provider, Scope("model_config", "id", name))


def test_globs_match_with_fnmatch_semantics_case_sensitive() -> None:
    opus = rule("claude-opus-*")
    assert opus.matches("anthropic", "claude-opus-4-1")
    assert opus.matches("bedrock", "claude-opus-4")
    assert not opus.matches("anthropic", "claude-sonnet-4-5")
    assert not opus.matches("anthropic", "Claude-Opus-4-1")  # case-sensitive
    one = rule("gpt-4o?")
    assert one.matches("openai", "gpt-4o1") and not one.matches("openai", "gpt-4o")
    assert not one.matches("openai", "gpt-4o-mini")
    assert rule("gpt-[34]o").matches("openai", "gpt-3o")
    assert not rule("gpt-[!3]o").matches("openai", "gpt-3o")
    qualified = rule("openai/gpt-4o*")
    assert qualified.matches("openai", "gpt-4o-mini") and not qualified.matches("azure", "gpt-4o")
    assert rule("claude-*", provider="anthropic").matches("anthropic", "claude-haiku-4-5")
    assert not rule("claude-*", provider="anthropic").matches("bedrock", "claude-haiku-4-5")
    exact = rule("gpt-4o")
    assert exact.matches("openai", "gpt-4o") and not exact.matches("openai", "gpt-4o-mini")
    assert rule("openai/gpt-4o").matches("openai", "gpt-4o")
    assert rule("*").matches("x", "anything")


def test_a_glob_is_compiled_once_not_per_match(monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmatch

    calls: list[str] = []
    translate = fnmatch.translate
    monkeypatch.setattr(fnmatch, "translate", lambda p: calls.append(p) or translate(p))
    glob = rule("claude-opus-4-9*")  # a pattern no other test compiles
    for _ in range(100):
        glob.matches("anthropic", "claude-opus-4-9-20990101")
    assert calls == ["claude-opus-4-9*"]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name: str) -> None:
    assert model_name_problem(name) is None


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_explained(name: str) -> None:
    problem = model_name_problem(name)
    assert problem is not None and repr(name) in problem


def test_provider_configs_take_globs_in_allowed_and_blocked_models() -> None:
    scope = Scope("provider_config", "p", "alice/openai")
    policy = ProviderPolicy(
        "openai", frozenset({"gpt-4o*"}), frozenset({"gpt-4o-audio-*", "openai/gpt-4o-2024-*"}),
        scope,
    )  # fmt: skip
    assert policy.allows("gpt-4o") and policy.allows("gpt-4o-mini")
    assert not policy.allows("gpt-3.5-turbo")
    assert not policy.allows("gpt-4o-audio-preview")
    assert not policy.allows("gpt-4o-2024-08-06")  # blocked as provider/model
    for _ in range(3):  # the verdict per model is kept: the same answer again
        assert policy.allows("gpt-4o-mini") and not policy.allows("gpt-4o-audio-preview")
    everything = ProviderPolicy("openai", frozenset({"*"}), frozenset({"*"}), scope)
    assert not everything.allows("gpt-4o")


async def test_a_glob_model_config_limits_every_matching_model(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        config = engine.manager.create_model_config(
            model_name="claude-opus-*", budgets=[{"max_limit": 0.000001, "reset_duration": "1d"}]
        )
        await engine.invalidate()

        async def ask(model: str) -> tuple[int, Any]:
            answer = await http.post("/v1/chat/completions", json=chat(model))
            return answer.status_code, answer.json().get("error", {}).get("scope")

        assert await ask("anthropic/claude-opus-4-1") == (200, None)
        refused = {"type": "model_config", "id": config.id, "name": "claude-opus-*"}
        assert await ask("anthropic/claude-opus-4-1") == (402, refused)
        assert await ask("anthropic/claude-opus-4-5") == (402, refused)  # the same budget
        assert await ask("anthropic/claude-haiku-4-5") == (200, None)


async def test_blocked_models_written_as_provider_slash_model_are_honoured(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice",
            provider_configs=[
                {
                    "provider": "openai",
                    "allowed_models": ["*"],
                    "blocked_models": ["openai/gpt-4o", "openai/o1*"],
                },
                {"provider": "anthropic", "allowed_models": ["claude-*-4-5"]},
            ],
        )
        await engine.invalidate()

        async def ask(model: str, **headers: str) -> int:
            answer = await http.post(
                "/v1/chat/completions",
                json=chat(model),
                headers={"x-budget-key": key.value or "", **headers},
            )
            return answer.status_code

        assert await ask("openai/gpt-4o") == 403
        assert await ask("gpt-4o") == 403  # a bare name, provider from the catalog
        assert await ask("gpt-4o", **{"x-budget-provider": "openai"}) == 403
        assert await ask("openai/o1-mini") == 403
        assert await ask("openai/gpt-4o-mini") == 200
        assert await ask("anthropic/claude-haiku-4-5") == 200
        assert await ask("anthropic/claude-opus-4-1") == 403


async def test_invalid_names_are_refused_with_422_by_the_admin_api(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        for name in ("gpt-4o[", " gpt-4o", "gpt 4o"):
            r = await c.post("/model-configs", json={"model_name": name}, headers=ADMIN)
            assert r.status_code == 422, name
            assert r.json()["error"]["param"] == "model_name" and repr(name) in r.text
        r = await c.post("/model-configs", json={"model_name": "claude-opus-*"}, headers=ADMIN)
        assert r.status_code == 201
        config_id = r.json()["model_config"]["id"]
        r = await c.put(f"/model-configs/{config_id}", json={"model_name": "x["}, headers=ADMIN)
        assert r.status_code == 422
        r = await c.get(f"/model-configs/{config_id}", headers=ADMIN)
        assert r.json()["model_config"]["model_name"] == "claude-opus-*"
        configs = [{"provider": "openai", "blocked_models": ["o1["]}]
        body: dict[str, Any] = {"name": "k", "provider_configs": configs}
        r = await c.post("/virtual-keys", json=body, headers=ADMIN)
        assert r.status_code == 422 and "'o1['" in r.text
        assert r.json()["error"]["param"] == "provider_configs"
        body["provider_configs"] = [{"provider": "openai", "allowed_models": ["gpt 4o"]}]
        assert (await c.post("/virtual-keys", json=body, headers=ADMIN)).status_code == 422
        r = await c.get("/virtual-keys", headers=ADMIN)
        assert r.json()["count"] == 0


def test_invalid_names_are_refused_by_the_python_api(make_settings: Settings) -> None:
    from budget_middleware import get_engine

    m = get_engine(make_settings()).manager
    with pytest.raises(InvalidRequest, match=r"'claude-\[opus'"):
        m.create_model_config(model_name="claude-[opus")
    created = m.create_model_config(model_name="gpt-4o?")
    with pytest.raises(InvalidRequest, match="model_name"):
        m.update_model_config(created.id, model_name="gpt 4o")
    with pytest.raises(InvalidRequest, match="blocked_models"):
        m.create_virtual_key(
            name="k", provider_configs=[{"provider": "openai", "blocked_models": [""]}]
        )


def test_invalid_names_in_the_config_file_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text("model_configs:\n  - model_name: 'claude-[opus'\n")
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", config_file=path)
    store = Store(settings.database_url)
    store.create_schema()
    with pytest.raises(ConfigFileError, match=r"model_configs\[0\] \(claude-\[opus\).*model_name"):
        load_config_file(store, settings)
    store.dispose()
