"""Which limits apply to a request (core/scopes.py, SPEC §5): owners, their order, provider
configs' model lists, and the resolution kept per (key, provider, model, tags)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from budget_middleware.core.durations import Duration
from budget_middleware.core.scopes import (
    NO_POLICIES,
    GlobalConfig,
    KeyConfig,
    LimitSet,
    ModelRule,
    ProviderPolicy,
    Scope,
    is_glob,
    model_name_problem,
)
from budget_middleware.core.windows import Concurrency, CounterRegistry, RateLimitCounters

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()
registry = CounterRegistry()


def budget(id: str) -> object:
    return registry.window(
        "budget",
        id,
        limit=100,
        duration=Duration.parse("1d"),
        calendar_aligned=False,
        last_reset=datetime.fromtimestamp(T0, UTC),
        usage=0,
        now=T0,
    )


def limited(type: str, id: str) -> Scope:
    return Scope(type, id, id, budgets=(budget(f"{type}-{id}"),))  # type: ignore[arg-type]


def policy(
    allowed: set[str],
    blocked: set[str] = frozenset(),
    limits: bool = False,  # type: ignore[assignment]
) -> ProviderPolicy:
    scope = limited("provider_config", "pc") if limits else Scope("provider_config", "pc", "pc")
    return ProviderPolicy("openai", frozenset(allowed), frozenset(blocked), scope)


def key(
    hierarchy: tuple[Scope, ...] = (),
    policies: dict[str, ProviderPolicy] | None = None,
    rules: tuple[ModelRule, ...] = (),
    **names: str | None,
) -> KeyConfig:
    return KeyConfig(
        id="k1",
        name=names.get("name", "alice") or "",
        is_active=True,
        expires_at=None,
        team_id=None,
        team_name=names.get("team_name"),
        customer_id=None,
        customer_name=names.get("customer_name"),
        tags=(),
        hierarchy=hierarchy,
        policies=policies if policies is not None else NO_POLICIES,
        model_rules=rules,
    )


# --- owners ---------------------------------------------------------------------------------------


def test_a_scope_has_limits_with_a_budget_or_a_rate_limit() -> None:
    assert not Scope("team", "t", "t").has_limits
    assert limited("team", "t").has_limits
    rate = RateLimitCounters("r", None, None, None)
    assert Scope("team", "t", "t", rate_limit=rate).has_limits


def test_a_limit_set_flattens_counters_by_kind_keeping_each_budgets_owner() -> None:
    slots = Concurrency("c", 2)
    a, b = limited("team", "a"), limited("customer", "b")
    rate = RateLimitCounters("r", None, None, slots)
    c = Scope("virtual_key", "c", "c", rate_limit=rate)
    limits = LimitSet((a, c, b))
    assert limits.scopes == (a, c, b)
    assert limits.budgets == a.budgets + b.budgets
    assert [limits.owner_of(budget) for budget in limits.budgets] == [a, b]
    soft = Scope("tag", "s", "s", soft_budgets=(budget("soft"),))  # type: ignore[arg-type]
    assert LimitSet((a, soft)).owner_of(soft.soft_budgets[0]) is soft
    with pytest.raises(ValueError, match="is not one of these limits"):
        limits.owner_of(limited("team", "z").budgets[0])
    assert limits.requests == () and limits.tokens == ()
    assert limits.slots == (slots,)


# --- model names ----------------------------------------------------------------------------------


def test_globs_are_names_with_wildcards_but_not_the_lone_star() -> None:
    assert not is_glob("*")
    assert not is_glob("gpt-4o")
    assert is_glob("gpt-*")
    assert is_glob("gpt-4o?")
    assert is_glob("gpt-[34]o")
    assert is_glob("**")


def test_bracket_rules_follow_fnmatch() -> None:
    assert model_name_problem("[]]") is None  # `]` right after `[` is a member
    assert model_name_problem("[!]]") is None
    assert model_name_problem("[!]") is not None
    assert model_name_problem("[]") is not None
    assert model_name_problem("a[b]c[d]") is None
    assert model_name_problem("a[b]c[d") is not None
    assert model_name_problem("[") is not None
    assert model_name_problem("x[!") is not None
    assert model_name_problem("/") is not None
    assert model_name_problem("a\x7fb") is not None


def test_provider_config_with_exact_names() -> None:
    only = policy({"gpt-4o"})
    assert only.allows("gpt-4o") is True
    assert only.allows("gpt-4o-mini") is False
    assert policy({"*"}, {"gpt-4o"}).allows("gpt-4o") is False
    assert policy({"openai/gpt-4o"}).allows("gpt-4o")
    assert not policy({"azure/gpt-4o"}).allows("gpt-4o")
    everything = policy({"*"}, {"o1"})
    assert everything.allows("gpt-4o")
    assert not everything.allows("o1")
    assert not policy({"*"}, {"openai/o1"}).allows("o1")
    assert not policy({"gpt-4o"}, {"*"}).allows("gpt-4o")
    assert not policy(set()).allows("gpt-4o")


def test_provider_config_with_globs() -> None:
    minis = policy({"gpt-*"}, {"*-mini"})
    assert minis.allows("gpt-4o")
    assert not minis.allows("gpt-4o-mini")
    assert not minis.allows("o1")
    assert policy({"openai/gpt-*"}).allows("gpt-4o")
    assert not policy({"azure/gpt-*"}).allows("gpt-4o")
    assert policy({"gpt-?o", "o1"}).allows("o1")  # an exact name beside a glob
    assert not policy({"gpt-?o"}, {"gpt-4o"}).allows("gpt-4o")
    assert not policy({"gpt-?o"}, {"openai/gpt-4o"}).allows("gpt-4o")
    assert not policy({"gpt-?o"}, {"openai/*"}).allows("gpt-4o")
    assert policy({"*"}, {"o?"}).allows("gpt-4o")
    assert not policy({"*"}, {"o?"}).allows("o1")
    assert not policy({"*"}, {"*"}).allows("gpt-4o")


def test_a_provider_configs_verdicts_are_kept_bounded() -> None:
    globs = policy({"gpt-*"})
    assert globs.allows("gpt-4o") and not globs.allows("o1")
    verdicts = globs._verdicts
    assert verdicts == {"gpt-4o": True, "o1": False}
    for n in range(254):
        assert globs.allows(f"gpt-{n}")
    assert len(verdicts) == 256
    assert not globs.allows("o3")  # full: it starts again
    assert verdicts == {"o3": False}
    assert globs.allows("gpt-4o")
    # exact names only: nothing is kept
    assert policy({"gpt-4o"})._verdicts is None


# --- model configs --------------------------------------------------------------------------------


def test_a_model_config_for_one_provider_matches_only_that_provider() -> None:
    scope = Scope("model_config", "m", "m")
    assert ModelRule("gpt-4o", "openai", scope).matches("openai", "gpt-4o")
    assert ModelRule("gpt-4o", "openai", scope).matches("azure", "gpt-4o") is False
    assert ModelRule("gpt-4o", None, scope).matches("azure", "gpt-4o")
    assert ModelRule("gpt-*", "openai", scope).matches("openai", "gpt-4o")
    assert not ModelRule("gpt-*", "openai", scope).matches("azure", "gpt-4o")
    assert ModelRule("azure/gpt-*", None, scope).matches("azure", "gpt-4o")
    assert not ModelRule("gpt-*", None, scope).matches("openai", "o1")


# --- which scopes, in which order -----------------------------------------------------------------


def test_global_scopes_are_provider_then_model_configs_then_tags_with_limits_only() -> None:
    provider, model = limited("provider", "p"), limited("model_config", "m")
    tag = limited("tag", "t")
    glob = GlobalConfig(
        providers={"openai": provider, "azure": Scope("provider", "az", "az")},
        model_rules=(ModelRule("gpt-*", None, model), ModelRule("o1", None, limited("x", "o"))),
        tags={"t": tag, "empty": Scope("tag", "e", "e")},
    )
    assert glob.scopes_for("openai", "gpt-4o", ("t",)) == [provider, model, tag]
    assert glob.scopes_for("azure", "gpt-4o", ("empty", "nope")) == [model]
    assert glob.scopes_for("other", "o3", ()) == []


def test_anonymous_limits_are_resolved_once_and_kept_bounded() -> None:
    provider = limited("provider", "p")
    glob = GlobalConfig(providers={"openai": provider})
    first = glob.resolve_anonymous("openai", "gpt-4o", ())
    assert first.scopes == (provider,)
    assert glob.resolve_anonymous("openai", "gpt-4o", ()) is first
    none = glob.resolve_anonymous("azure", "gpt-4o", ())
    assert none.scopes == () and none.budgets == ()
    for n in range(510):
        glob.resolve_anonymous("openai", f"m{n}", ())
    assert len(glob.resolved) == 512
    glob.resolve_anonymous("openai", "one-more", ())
    assert len(glob.resolved) == 1
    assert glob.resolve_anonymous("openai", "gpt-4o", ()) is not first


def test_a_keys_scopes_are_its_provider_config_hierarchy_provider_model_configs_then_tags() -> None:
    team, customer = limited("team", "t"), limited("customer", "c")
    own_rule = limited("model_config", "own")
    glob_scope, glob_rule = limited("provider", "p"), limited("model_config", "g")
    tag = limited("tag", "chat")
    glob = GlobalConfig(
        providers={"openai": glob_scope},
        model_rules=(ModelRule("*", None, glob_rule),),
        tags={"chat": tag},
    )
    config = key(
        hierarchy=(team, customer),
        policies={"openai": policy({"*"}, limits=True)},
        rules=(ModelRule("gpt-*", None, own_rule),),
    )
    limits = config.resolve(glob, "openai", "gpt-4o", ("chat",))
    pc = config.policies["openai"].scope
    # SPEC §5: every model config (the global ones, then the key's own) before the tags
    assert limits.scopes == (pc, team, customer, glob_scope, glob_rule, own_rule, tag)
    # a provider config without limits takes no place
    bare = key(hierarchy=(team,), policies={"openai": policy({"*"})})
    assert bare.resolve(GlobalConfig(), "openai", "gpt-4o", ()).scopes == (team,)
    assert key().resolve(GlobalConfig(), "openai", "o1", ()).scopes == ()
    # keys without any limit share one empty set
    empty = key().resolve(GlobalConfig(), "a", "b", ())
    assert key().resolve(GlobalConfig(), "c", "d", ()) is empty


def test_a_key_with_only_its_hierarchy_shares_its_tuple() -> None:
    team = limited("team", "t")
    hierarchy = (team,)
    assert key(hierarchy=hierarchy).resolve(GlobalConfig(), "openai", "m", ()).scopes is hierarchy


def test_a_keys_resolutions_are_kept_until_the_global_config_changes() -> None:
    tag = limited("tag", "t")
    glob = GlobalConfig(tags={"t": tag})
    config = key(hierarchy=(limited("team", "x"),))
    a = config.resolve(glob, "openai", "m", ())
    assert config.resolve(glob, "openai", "m", ()) is a
    b = config.resolve(glob, "openai", "m", ("t",))
    assert b.scopes[-1] is tag
    assert config.resolve(glob, "openai", "m", ("t",)) is b
    assert config.resolve(glob, "openai", "m", ()) is a
    c = config.resolve(glob, "azure", "m", ())
    assert config.resolve(glob, "azure", "m", ()) is c
    d = config.resolve(glob, "openai", "n", ())
    assert config.resolve(glob, "openai", "n", ()) is d and d is not a
    # another global configuration: everything is resolved again against it
    other = GlobalConfig()
    fresh = config.resolve(other, "openai", "m", ("t",))
    assert fresh is not b and fresh.scopes == config.hierarchy
    assert config.resolve(other, "openai", "m", ("t",)) is fresh
    assert config.resolve(glob, "openai", "m", ("t",)) is not b


def test_a_keys_kept_resolutions_are_bounded() -> None:
    config = key(hierarchy=(limited("team", "x"),))
    glob = GlobalConfig()
    config.resolve(glob, "openai", "first", ())
    for n in range(512):
        config.resolve(glob, "openai", f"m{n}", ())
    assert config.resolved is not None and len(config.resolved) == 512
    config.resolve(glob, "openai", "one-more", ())
    assert len(config.resolved) == 1


def test_a_keys_user_path_names_its_owners() -> None:
    assert key(name="alice", team_name="research", customer_name="acme").user_path() == (
        "/acme/research/alice"
    )
    assert key(name="alice").user_path() == "/alice"
    assert key(name="alice", customer_name="acme").user_path() == "/acme/alice"
