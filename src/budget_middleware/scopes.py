"""Which limits apply to a request (SPEC §5): the owners in the key hierarchy and outside it.

A `Scope` is an owner with its live counters. Configuration is loaded from the store into these
objects; the set of scopes of a (key, provider, model, tags) is resolved once and kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .limits import Concurrency, RateLimitCounters, WindowCounter

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

    @property
    def has_limits(self) -> bool:
        return bool(self.budgets) or self.rate_limit is not None


class LimitSet:
    """Every limit that applies to a request, resolved once per (key, provider, model, tags):
    the scopes in the order of SPEC §5, and their counters flattened by kind, so admission,
    settlement and the response headers loop over plain tuples."""

    __slots__ = ("budgets", "requests", "scopes", "slots", "tokens")

    def __init__(self, scopes: tuple[Scope, ...]) -> None:
        self.scopes = scopes
        budgets: list[WindowCounter] = []
        requests: list[WindowCounter] = []
        tokens: list[WindowCounter] = []
        slots: list[Concurrency] = []
        for scope in scopes:
            budgets.extend(scope.budgets)
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


_NO_LIMITS = LimitSet(())
NO_POLICIES: Mapping[str, ProviderPolicy] = MappingProxyType({})  # shared by keys without any


@dataclass(slots=True, eq=False)
class ProviderPolicy:
    """A key's provider config: which models it may use, and its own limits."""

    provider: str
    allowed_models: frozenset[str]  # contains "*" for every model
    blocked_models: frozenset[str]
    scope: Scope

    def allows(self, model: str) -> bool:
        qualified = f"{self.provider}/{model}"
        if model in self.blocked_models or qualified in self.blocked_models:
            return False
        return (
            "*" in self.allowed_models
            or model in self.allowed_models
            or qualified in self.allowed_models
        )


@dataclass(slots=True, eq=False)
class ModelRule:
    """A model config: limits for a model (or `*`), optionally only for one provider."""

    model_name: str
    provider: str | None
    scope: Scope

    def matches(self, provider: str, model: str) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        return self.model_name in ("*", model, f"{provider}/{model}")


@dataclass(slots=True, eq=False)
class GlobalConfig:
    """Limits outside the key hierarchy: providers, global model configs, tags."""

    providers: dict[str, Scope] = field(default_factory=dict)
    model_rules: tuple[ModelRule, ...] = ()
    tags: dict[str, Scope] = field(default_factory=dict)
    resolved: dict[tuple[str, str, tuple[str, ...]], LimitSet] = field(default_factory=dict)

    def scopes_for(self, provider: str, model: str, tags: tuple[str, ...]) -> list[Scope]:
        scopes = []
        provider_scope = self.providers.get(provider)
        if provider_scope is not None and provider_scope.has_limits:
            scopes.append(provider_scope)
        scopes.extend(r.scope for r in self.model_rules if r.matches(provider, model))
        for tag in tags:
            tag_scope = self.tags.get(tag)
            if tag_scope is not None and tag_scope.has_limits:
                scopes.append(tag_scope)
        return scopes

    def resolve_anonymous(self, provider: str, model: str, tags: tuple[str, ...]) -> LimitSet:
        """The limits of a request without a virtual key."""
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
    cached_until: float = 0.0  # monotonic time until which the key cache trusts this config

    def resolve(
        self, glob: GlobalConfig, provider: str, model: str, tags: tuple[str, ...]
    ) -> LimitSet:
        """Every applicable limit, its scopes in the order of SPEC §5 (provider config first)."""
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
        scopes.extend(glob.scopes_for(provider, model, tags))
        scopes.extend(r.scope for r in self.model_rules if r.matches(provider, model))
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
