"""Which limits apply to a request (SPEC §5): the owners in the key hierarchy and outside it.

A `Scope` is an owner with its live counters. Configuration is loaded from the store into these
objects; the set of scopes of a (key, provider, model, tags) is resolved once and kept.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from budget_middleware.core.routing import Route
from budget_middleware.core.windows import Concurrency, RateLimitCounters, WindowCounter

OWNER_TYPES = (
    "customer",
    "team",
    "virtual_key",
    "provider_config",
    "provider",
    "model_config",
    "tag",
)

_RESOLVED_MAX = 512  # tags come from clients: bound what we keep per key


@dataclass(slots=True, eq=False)
class Scope:
    """An owner of budgets and a rate limit."""

    type: str
    id: str
    name: str
    budgets: tuple[WindowCounter, ...] = ()
    rate_limit: RateLimitCounters | None = None
    soft_budgets: tuple[WindowCounter, ...] = ()  # counted and alerted, never refusing (§14)

    @property
    def has_limits(self) -> bool:
        return bool(self.budgets) or self.rate_limit is not None or bool(self.soft_budgets)


class LimitSet:
    """Every limit that applies to a request, resolved once per (key, provider, model, tags):
    the scopes in the order of SPEC §5, and their counters flattened by kind, so admission,
    settlement and the response headers loop over plain tuples. A cached key holds one, so it
    keeps no more than the hot path reads: a counter's owner is looked up when it is needed (a
    refusal, an alert), not stored beside it."""

    __slots__ = ("budgets", "requests", "scopes", "slots", "soft_budgets", "tokens")

    def __init__(self, scopes: tuple[Scope, ...]) -> None:
        self.scopes = scopes
        budgets: list[WindowCounter] = []
        requests: list[WindowCounter] = []
        tokens: list[WindowCounter] = []
        slots: list[Concurrency] = []
        soft: list[WindowCounter] = []
        for scope in scopes:
            budgets.extend(scope.budgets)
            soft.extend(scope.soft_budgets)
            rate = scope.rate_limit
            if rate is not None:
                if rate.requests is not None:
                    requests.append(rate.requests)
                if rate.tokens is not None:
                    tokens.append(rate.tokens)
                if rate.concurrency is not None:
                    slots.append(rate.concurrency)
        self.budgets = tuple(budgets)
        self.requests = tuple(requests)
        self.tokens = tuple(tokens)
        self.slots = tuple(slots)
        self.soft_budgets = tuple(soft)  # charged when settled; admission never looks at them

    def owner_of(self, budget: WindowCounter) -> Scope:
        """The scope whose (hard or soft) budget `budget` is."""
        for scope in self.scopes:
            if budget in scope.budgets or budget in scope.soft_budgets:
                return scope
        raise ValueError(f"budget {budget.id} is not one of these limits")


_NO_LIMITS = LimitSet(())
NO_POLICIES: Mapping[str, ProviderPolicy] = MappingProxyType({})  # shared by keys without any

# -- model names: an exact name, `*`, or a glob --------------------------------------------
#
# A model name in a model config or a provider config's allowed/blocked list is an exact name
# (`gpt-4o`, `openai/gpt-4o`), `*` (every model) or an fnmatch glob (`claude-opus-*`, `gpt-4o?`,
# `gpt-[34]o`), matched case-sensitively against the request's model and `provider/model`. A glob
# is compiled once, when the configuration is loaded; what a request's model matches is then kept
# with the resolved limits (or, for a provider config, per model), so no request pays for it.

_GLOB_CHARS = frozenset("*?[")
_Matcher = Callable[[str], object]


def is_glob(name: str) -> bool:
    return name != "*" and not _GLOB_CHARS.isdisjoint(name)


def model_name_problem(name: str) -> str | None:
    """Why `name` is neither an exact model name, `*` nor a glob; None when it is fine.

    Refused: an empty name, whitespace or control characters anywhere (a name that can never be
    a model's), a `/` at either end (an empty provider or model), and a `[` never closed by a
    `]` (fnmatch would match it literally: a typo that silently matches nothing).
    """
    if not name:
        return "'' is not a model name (use '*' for every model)"
    if any(c.isspace() or not c.isprintable() for c in name):
        return f"{name!r} contains whitespace or control characters"
    if name.startswith("/") or name.endswith("/"):
        return f"{name!r} has an empty provider or model around '/'"
    i, n = 0, len(name)
    while i < n:
        if name[i] == "[":  # fnmatch's rule: `]` right after `[` or `[!` is a member, not the end
            j = i + 1
            if j < n and name[j] == "!":
                j += 1
            if j < n and name[j] == "]":
                j += 1
            while j < n and name[j] != "]":
                j += 1
            if j >= n:
                return f"{name!r} has a '[' without its closing ']'"
            i = j
        i += 1
    return None


@functools.lru_cache(maxsize=4096)  # bounded: one entry per distinct glob in the configuration
def _compile(glob: str) -> _Matcher:
    return re.compile(fnmatch.translate(glob)).match  # translate anchors the end: a full match


class _Patterns:
    """A list of model names split once into exact names and compiled globs."""

    __slots__ = ("exact", "globs")

    def __init__(self, names: Collection[str]) -> None:
        self.exact = frozenset(n for n in names if not is_glob(n))
        self.globs = tuple(_compile(n) for n in names if is_glob(n))

    def match(self, model: str, qualified: str) -> bool:
        exact = self.exact
        if "*" in exact or model in exact or qualified in exact:
            return True
        return any(g(model) is not None or g(qualified) is not None for g in self.globs)


_VERDICTS_MAX = 256  # models are named by clients: bound what a provider config keeps


@dataclass(slots=True, eq=False)
class ProviderPolicy:
    """A key's provider config: which models it may use, and its own limits. Entries are exact
    names, `*`, or globs, bare (`gpt-4o`) or qualified (`openai/gpt-4o`)."""

    provider: str
    allowed_models: frozenset[str]  # contains "*" for every model
    blocked_models: frozenset[str]
    scope: Scope
    _allowed: _Patterns = field(init=False, repr=False)
    _blocked: _Patterns = field(init=False, repr=False)
    # The verdict per model, only where a glob is involved (exact names cost a set lookup).
    _verdicts: dict[str, bool] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._allowed = _Patterns(self.allowed_models)
        self._blocked = _Patterns(self.blocked_models)
        globs = self._allowed.globs or self._blocked.globs
        self._verdicts = {} if globs else None

    def allows(self, model: str) -> bool:
        verdicts = self._verdicts
        if verdicts is None:  # exact names only (the usual case): a few set lookups
            qualified = f"{self.provider}/{model}"
            blocked = self.blocked_models
            if "*" in blocked or model in blocked or qualified in blocked:
                return False
            allowed = self.allowed_models
            return "*" in allowed or model in allowed or qualified in allowed
        found = verdicts.get(model)
        if found is None:
            found = self._decide(model)
            if len(verdicts) >= _VERDICTS_MAX:
                verdicts.clear()
            verdicts[model] = found
        return found

    def _decide(self, model: str) -> bool:
        qualified = f"{self.provider}/{model}"
        return not self._blocked.match(model, qualified) and self._allowed.match(model, qualified)


@dataclass(slots=True, eq=False)
class ModelRule:
    """A model config: limits for a model (an exact name, `*` or a glob), optionally only for one
    provider."""

    model_name: str
    provider: str | None
    scope: Scope
    _glob: _Matcher | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._glob = _compile(self.model_name) if is_glob(self.model_name) else None

    def matches(self, provider: str, model: str) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        glob = self._glob
        if glob is None:
            return self.model_name in ("*", model, f"{provider}/{model}")
        return glob(model) is not None or glob(f"{provider}/{model}") is not None


@dataclass(slots=True, eq=False)
class GlobalConfig:
    """Limits outside the key hierarchy: providers, global model configs, tags; and routes."""

    providers: dict[str, Scope] = field(default_factory=dict)
    model_rules: tuple[ModelRule, ...] = ()
    tags: dict[str, Scope] = field(default_factory=dict)
    resolved: dict[tuple[str, str, tuple[str, ...]], LimitSet] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)  # by name (SPEC §12)

    def scopes_for(
        self,
        provider: str,
        model: str,
        tags: tuple[str, ...],
        own_rules: tuple[ModelRule, ...] = (),
    ) -> list[Scope]:
        """The provider, the model configs (the global ones, then a key's `own_rules`), the
        tags: SPEC §5's order, after the key's own hierarchy."""
        scopes = []
        provider_scope = self.providers.get(provider)
        if provider_scope is not None and provider_scope.has_limits:
            scopes.append(provider_scope)
        scopes.extend(r.scope for r in self.model_rules if r.matches(provider, model))
        scopes.extend(r.scope for r in own_rules if r.matches(provider, model))
        for tag in tags:
            tag_scope = self.tags.get(tag)
            if tag_scope is not None and tag_scope.has_limits:
                scopes.append(tag_scope)
        return scopes

    def limiting(self, tags: tuple[str, ...]) -> tuple[str, ...]:
        """The tags of a request that have a scope here, in order: the others change none of
        its limits. The limits resolved are kept by these (the rest are a client's to choose:
        a request id, a session, tags sent once each filled a key's resolved limits to their
        bound, 5 KB an entry, 2.5 MB a key, kept as long as the key is)."""
        known = self.tags
        return tuple(t for t in tags if t in known) if known else ()

    def resolve_anonymous(self, provider: str, model: str, tags: tuple[str, ...]) -> LimitSet:
        """The limits of a request without a virtual key."""
        if tags:
            tags = self.limiting(tags)
        key = (provider, model, tags)
        found = self.resolved.get(key)
        if found is None:
            if len(self.resolved) >= _RESOLVED_MAX:
                self.resolved.clear()
            scopes = tuple(self.scopes_for(provider, model, tags))
            found = self.resolved[key] = LimitSet(scopes) if scopes else _NO_LIMITS
        return found


@dataclass(slots=True, eq=False)
class KeyConfig:
    """A virtual key with everything above it (team, customer) and its own rules."""

    id: str
    name: str
    is_active: bool
    expires_at: float | None
    team_id: str | None
    team_name: str | None
    customer_id: str | None
    customer_name: str | None
    tags: tuple[str, ...]
    hierarchy: tuple[Scope, ...]  # key, team, customer: those that have limits
    policies: Mapping[str, ProviderPolicy]  # empty: every provider and model is allowed
    model_rules: tuple[ModelRule, ...]  # model configs scoped to this key
    # Resolved limits per (provider, model, tags): most keys use one, kept in slots; a dict
    # only for a key that sees several (each dict costs ~200 bytes a cached key).
    last_provider: str | None = None
    last_model: str = ""
    last_tags: tuple[str, ...] = ()
    last_limits: LimitSet = _NO_LIMITS
    resolved: dict[tuple[str, str, tuple[str, ...]], LimitSet] | None = None
    resolved_for: GlobalConfig | None = None

    def resolve(
        self, glob: GlobalConfig, provider: str, model: str, tags: tuple[str, ...]
    ) -> LimitSet:
        """Every applicable limit, its scopes in the order of SPEC §5 (provider config first)."""
        if tags:
            tags = glob.limiting(tags)
        if self.resolved_for is glob:
            if (
                provider == self.last_provider
                and model == self.last_model
                and tags == self.last_tags
            ):
                return self.last_limits
            if self.resolved is not None:
                found = self.resolved.get((provider, model, tags))
                if found is not None:
                    return found
        else:
            self.last_provider = None
            self.resolved = None
            self.resolved_for = glob
        scopes: list[Scope] = []
        policy = self.policies.get(provider)
        if policy is not None and policy.scope.has_limits:
            scopes.append(policy.scope)
        scopes.extend(self.hierarchy)
        scopes.extend(glob.scopes_for(provider, model, tags, self.model_rules))
        if not scopes:
            found = _NO_LIMITS
        else:  # the key's own hierarchy alone, the usual case: its tuple serves
            found = LimitSet(self.hierarchy if scopes == list(self.hierarchy) else tuple(scopes))
        if self.last_provider is None:
            self.last_provider, self.last_model, self.last_tags = provider, model, tags
            self.last_limits = found
        else:
            if self.resolved is None or len(self.resolved) >= _RESOLVED_MAX:
                self.resolved = {}
            self.resolved[(provider, model, tags)] = found
        return found

    def user_path(self) -> str:
        parts = [p for p in (self.customer_name, self.team_name, self.name) if p]
        return "/" + "/".join(parts)
