"""Every applicable scope is checked (SPEC §5): key, team, customer, provider, model, tag."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from budget_middleware import BudgetSettings
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]
SPENT = [{"max_limit": 0}]  # a budget that is already exhausted


async def post(
    http: Any, key: str | None = None, model: str = "openai/gpt-4o", **extra: Any
) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(extra.pop("headers", {}))
    return await http.post("/v1/chat/completions", json=chat(model, **extra), headers=headers)


def refused_by(answer: Any) -> tuple[int, str, str]:
    error = answer.json()["error"]
    return answer.status_code, error["code"], error["scope"]["type"]


async def test_team_budget_blocks_every_key_of_the_team(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(name="research", budgets=SPENT)
        other = m.create_team(name="sales")
        keys = [m.create_virtual_key(name=f"k{i}", team_id=team.id) for i in range(3)]
        outsider = m.create_virtual_key(name="outsider", team_id=other.id)
        await engine.invalidate()
        for key in keys:
            assert refused_by(await post(http, key.value)) == (402, "budget_exceeded", "team")
        assert (await post(http, outsider.value)).status_code == 200


async def test_customer_budget_blocks_every_team(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        acme = m.create_customer(name="acme", budgets=SPENT)
        teams = [m.create_team(name=f"t{i}", customer_id=acme.id) for i in range(2)]
        keys = [m.create_virtual_key(name=f"k{i}", team_id=t.id) for i, t in enumerate(teams)]
        direct = m.create_virtual_key(name="direct", customer_id=acme.id)
        await engine.invalidate()
        for key in [*keys, direct]:
            assert refused_by(await post(http, key.value)) == (402, "budget_exceeded", "customer")


async def test_several_budgets_on_one_owner_must_all_pass(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        key = m.create_virtual_key(
            name="alice",
            budgets=[
                {"max_limit": 100, "reset_duration": "1M"},
                {"max_limit": 0.000001, "reset_duration": "1d"},
            ],
        )
        await engine.invalidate()
        assert (await post(http, key.value)).status_code == 200
        refused = await post(http, key.value)
    assert refused_by(refused) == (402, "budget_exceeded", "virtual_key")
    assert "$0.0000" in refused.json()["error"]["message"]  # the daily one, not the monthly


async def test_provider_budget_applies_with_and_without_a_key(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_provider("openai", budgets=SPENT)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        assert refused_by(await post(http)) == (402, "budget_exceeded", "provider")
        assert refused_by(await post(http, key.value)) == (402, "budget_exceeded", "provider")
        assert (await post(http, key.value, model="anthropic/claude-haiku-4-5")).status_code == 200


async def test_global_model_config_and_wildcard_apply(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.create_model_config(model_name="gpt-4o", budgets=SPENT)
        await engine.invalidate()
        assert refused_by(await post(http)) == (402, "budget_exceeded", "model_config")
        assert (await post(http, model="openai/gpt-4o-mini")).status_code == 200
        m.create_model_config(
            model_name="*",
            provider="anthropic",
            rate_limit={"request_max_limit": 0, "request_reset_duration": "1m"},
        )
        await engine.invalidate()
        limited = await post(http, model="anthropic/claude-haiku-4-5")
        assert refused_by(limited) == (429, "request_limit_exceeded", "model_config")
        assert (await post(http, model="openai/gpt-4o-mini")).status_code == 200


async def test_key_scoped_model_config_applies_only_to_that_key(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        alice = m.create_virtual_key(name="alice")
        bob = m.create_virtual_key(name="bob")
        m.create_model_config(
            model_name="gpt-4o", scope="virtual_key", scope_id=alice.id, budgets=SPENT
        )
        await engine.invalidate()
        assert refused_by(await post(http, alice.value)) == (402, "budget_exceeded", "model_config")
        assert (await post(http, bob.value)).status_code == 200
        assert (await post(http)).status_code == 200


async def test_a_key_s_own_model_config_refuses_before_a_tag_as_spec_5_orders_them(
    make_settings: Settings,
) -> None:
    # SPEC §5's applicable scopes: ..., every model config that matches (global ones, and those
    # scoped to this key), and every tag. Both exhausted: the model config is the one named.
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        alice = m.create_virtual_key(name="alice")
        m.create_model_config(
            model_name="gpt-4o", scope="virtual_key", scope_id=alice.id, budgets=SPENT
        )
        m.put_tag("chat", budgets=SPENT)
        await engine.invalidate()
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(model="openai/gpt-4o"),
            headers={"x-budget-key": alice.value, "x-budget-tags": "chat"},
        )
    print("refused by:", answer.json()["error"]["scope"])
    assert refused_by(answer) == (402, "budget_exceeded", "model_config")


async def test_provider_config_limits_apply_to_that_provider_of_the_key(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice",
            provider_configs=[
                {"provider": "openai", "allowed_models": ["*"], "budgets": SPENT},
                {"provider": "anthropic", "allowed_models": ["*"]},
            ],
        )
        await engine.invalidate()
        assert refused_by(await post(http, key.value)) == (
            402,
            "budget_exceeded",
            "provider_config",
        )
        assert (await post(http, key.value, model="anthropic/claude-haiku-4-5")).status_code == 200


async def test_tag_limits_apply_from_body_and_header_with_and_without_a_key(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_tag("product:chat", budgets=SPENT)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        in_body = await post(http, metadata={"tags": ["product:chat"]})
        in_header = await post(http, key.value, headers={"x-budget-tags": "a, product:chat"})
        untagged = await post(http, key.value, metadata={"tags": ["product:search"]})
    assert refused_by(in_body) == (402, "budget_exceeded", "tag")
    assert in_body.json()["error"]["scope"]["name"] == "product:chat"
    assert refused_by(in_header) == (402, "budget_exceeded", "tag")
    assert untagged.status_code == 200


async def test_a_tag_limit_on_any_name_the_admin_api_takes_applies_to_requests_naming_it(
    make_settings: Settings,
) -> None:
    """Names the admin API takes (printable or not by Python's rule: a no-break space, an
    emoji joined by U+200D) are the tags a request names: in the body, and in `x-budget-tags`
    as UTF-8 (what httpx and the SDKs send for a non-ASCII header value). A request's tags were
    read with '?' for every character `str.isprintable` refuses, and the header as latin-1
    ('cafÃ©'), so such a tag's limits never applied."""
    names = ["café", "coder 👩\u200d💻", "team\u00a0a"]
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        for name in names:
            m.put_tag(name, budgets=SPENT)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        in_body = [await post(http, key.value, metadata={"tags": [n]}) for n in names]
        in_header = [
            await post(http, key.value, headers={"x-budget-tags": n.encode()}) for n in names
        ]
        elsewhere = await post(http, key.value, metadata={"tags": ["cafe"]})
    told = [(refused_by(a), a.json()["error"]["scope"]["name"]) for a in in_body + in_header]
    print(told)
    assert told == [((402, "budget_exceeded", "tag"), n) for n in names + names]
    assert elsewhere.status_code == 200


async def test_a_key_s_tag_limit_holds_however_many_tags_a_client_sends(
    make_settings: Settings,
) -> None:
    """Tags are capped at 32 a request: the key's own are kept first, so 32 client tags that
    sort before them no longer push them (and their limits) out."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_tag("product:chat", budgets=SPENT)
        key = m.create_virtual_key(name="alice", tags=["product:chat"])
        await engine.invalidate()
        junk = [f"a{n:02}" for n in range(32)]
        answers = [
            await post(http, key.value),
            await post(http, key.value, headers={"x-budget-tags": ",".join(junk)}),
            await post(http, key.value, metadata={"tags": junk}),
        ]
    print([refused_by(a) for a in answers])
    assert [refused_by(a) for a in answers] == [(402, "budget_exceeded", "tag")] * 3


async def test_a_client_s_tag_limit_holds_however_many_other_tags_it_sends(
    make_settings: Settings,
) -> None:
    """SPEC §5: every tag of the request that has limits applies. Tags are capped at 32 a
    request, cut in name order: 32 other tags before it pushed `zz-prod` (and its spent budget)
    out of the request, which went through as if it had not named it."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        m.put_tag("zz-prod", budgets=SPENT)
        key = m.create_virtual_key(name="alice")
        await engine.invalidate()
        answers = []
        for n in (0, 32, 40, 250):
            junk = [f"a{i:03}" for i in range(n)]
            answers += [
                await post(http, headers={"x-budget-tags": ",".join([*junk, "zz-prod"])}),
                await post(http, key.value, metadata={"tags": [*junk, "zz-prod"]}),
            ]
    told = [refused_by(a) if a.status_code != 200 else 200 for a in answers]
    print(f"with 0, 32, 40 and 250 other tags (header, body): {told}")
    assert told == [(402, "budget_exceeded", "tag")] * 8


async def test_a_refusal_by_one_scope_consumes_no_other_limit(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        team = m.create_team(
            name="research", rate_limit={"request_max_limit": 5, "request_reset_duration": "1h"}
        )
        key = m.create_virtual_key(name="alice", team_id=team.id)
        m.put_tag("blocked", budgets=SPENT)
        await engine.invalidate()
        for _ in range(10):
            answer = await post(http, key.value, metadata={"tags": ["blocked"]})
            assert answer.status_code == 402
        for _ in range(5):  # the team's 5 requests are all still there
            assert (await post(http, key.value)).status_code == 200
        assert refused_by(await post(http, key.value)) == (429, "request_limit_exceeded", "team")
