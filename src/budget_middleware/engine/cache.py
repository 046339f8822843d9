"""Configuration read from the store, turned into scopes bound to live counters, and cached.

Keys are cached by their hash in a TTL cache (unknown keys too, briefly), the limits outside the
key hierarchy in one `GlobalConfig` that is reloaded every TTL. The caches are touched only from
the event loop; the store is read in a worker thread.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from cachetools import LRUCache, TTLCache

from budget_middleware.core.durations import parse_duration
from budget_middleware.core.routing import Route, parse_target
from budget_middleware.core.scopes import (
    NO_POLICIES,
    GlobalConfig,
    KeyConfig,
    ModelRule,
    ProviderPolicy,
    Scope,
)
from budget_middleware.core.times import utc
from budget_middleware.core.windows import CounterRegistry, RateLimitCounters, WindowCounter, shared
from budget_middleware.store.database import GlobalRecord, KeyRecord, OwnerLimits
from budget_middleware.store.tables import RateLimitRow


class ScopeBuilder:
    """Builds scopes whose counters are the registry's live ones."""

    def __init__(self, registry: CounterRegistry, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.clock = clock
        # Keys of one team share its scope (and the customer's): one object per owner and
        # configuration, not one per key, which keeps 10,000 cached keys small.
        self._shared: LRUCache[tuple[str, str], tuple[tuple[object, ...], Scope]] = LRUCache(
            200_000
        )
        # Team and customer ids and names, one string object for all of their keys
        self._strings: LRUCache[str, str] = LRUCache(100_000)
        # Told of every budget counter built, with its alert thresholds and owner (the engine's
        # alerts).
        self.on_budget: Callable[[WindowCounter, list[float] | None, Scope], None] | None = None

    def intern(self, text: str) -> str:
        return shared(self._strings, text)

    def scope(
        self, type_: str, id_: str, name: str, limits: OwnerLimits | None, *, shared: bool = True
    ) -> Scope:
        """The owner's scope, bound to the live counters. `shared=False` for an owner of one key
        (the key itself, its provider configs): nothing else could share its scope."""
        if limits is None:
            return Scope(type_, id_, name)
        if not shared:
            return self._build(type_, id_, name, limits)
        signature = _signature(name, limits)
        known = self._shared.get((type_, id_))
        if known is not None and known[0] == signature:
            return known[1]
        scope = self._build(type_, id_, name, limits)
        self._shared[(type_, id_)] = (signature, scope)
        return scope

    def _build(self, type_: str, id_: str, name: str, limits: OwnerLimits) -> Scope:
        now = self.clock()
        hard: list[WindowCounter] = []
        soft: list[WindowCounter] = []
        built: list[tuple[WindowCounter, list[float] | None]] = []
        for b in limits.budgets:
            counter = self.registry.window(
                "budget",
                b.id,
                limit=b.max_limit_nanos,
                duration=parse_duration(b.reset_duration),
                calendar_aligned=b.calendar_aligned,
                last_reset=utc(b.last_reset),
                usage=b.current_usage_nanos,
                now=now,
            )
            (soft if b.soft else hard).append(counter)
            built.append((counter, b.alert_thresholds))
        budgets = tuple(hard)
        rate = limits.rate_limit
        counters = None
        if rate is not None:
            requests = self._rate_window("request", rate, now)
            tokens = self._rate_window("token", rate, now)
            slots = None
            if rate.max_concurrent_requests is not None:
                slots = self.registry.slots(rate.id, rate.max_concurrent_requests)
            if requests or tokens or slots:
                counters = RateLimitCounters(rate.id, requests, tokens, slots)
        scope = Scope(type_, id_, name, budgets, counters, tuple(soft))
        if self.on_budget is not None:
            for counter, thresholds in built:
                self.on_budget(counter, thresholds, scope)
        return scope

    def _rate_window(self, kind: str, rate: RateLimitRow, now: float) -> WindowCounter | None:
        """The request or token window of a rate limit (columns `<kind>_max_limit`, ...)."""
        limit = getattr(rate, f"{kind}_max_limit")
        if limit is None:
            return None
        return self.registry.window(
            kind,
            rate.id,
            limit=limit,
            duration=parse_duration(getattr(rate, f"{kind}_reset_duration")),
            calendar_aligned=False,
            last_reset=utc(getattr(rate, f"{kind}_last_reset")),
            usage=getattr(rate, f"{kind}_current_usage"),
            now=now,
        )

    def key(self, record: KeyRecord) -> KeyConfig:
        key, team, customer = record.key, record.team, record.customer
        lim = record.limits
        hierarchy = [
            self.scope(
                "virtual_key", key.id, key.name, lim.get(("virtual_key", key.id)), shared=False
            )
        ]
        if team is not None:
            hierarchy.append(self.scope("team", team.id, team.name, lim.get(("team", team.id))))
        if customer is not None:
            hierarchy.append(
                self.scope(
                    "customer", customer.id, customer.name, lim.get(("customer", customer.id))
                )
            )
        policies = {
            p.provider: ProviderPolicy(
                p.provider,
                frozenset(p.allowed_models),
                frozenset(p.blocked_models),
                self.scope(
                    "provider_config",
                    p.id,
                    f"{key.name}/{p.provider}",
                    lim.get(("provider_config", p.id)),
                    shared=False,
                ),
            )
            for p in record.provider_configs
        }
        rules = tuple(self._rule(r.id, r.model_name, r.provider, lim) for r in record.model_configs)
        return KeyConfig(
            id=key.id,
            name=key.name,
            is_active=key.is_active,
            expires_at=utc(key.expires_at).timestamp() if key.expires_at else None,
            team_id=self.intern(team.id) if team else None,
            team_name=self.intern(team.name) if team else None,
            customer_id=self.intern(customer.id) if customer else None,
            customer_name=self.intern(customer.name) if customer else None,
            tags=tuple(key.tags) if key.tags else (),
            hierarchy=tuple(s for s in hierarchy if s.has_limits),
            policies=policies or NO_POLICIES,
            model_rules=tuple(r for r in rules if r.scope.has_limits),
        )

    def _rule(
        self,
        id_: str,
        model_name: str,
        provider: str | None,
        lim: dict[tuple[str, str], OwnerLimits],
    ) -> ModelRule:
        name = f"{provider}/{model_name}" if provider else model_name
        return ModelRule(
            model_name,
            provider,
            self.scope("model_config", id_, name, lim.get(("model_config", id_))),
        )

    def globals(self, record: GlobalRecord) -> GlobalConfig:
        lim = record.limits
        rules = (self._rule(r.id, r.model_name, r.provider, lim) for r in record.model_configs)
        return GlobalConfig(
            providers={
                p.provider: self.scope(
                    "provider", p.provider, p.provider, lim.get(("provider", p.provider))
                )
                for p in record.providers
            },
            model_rules=tuple(r for r in rules if r.scope.has_limits),
            tags={
                t.tag: self.scope("tag", t.tag, t.tag, lim.get(("tag", t.tag))) for t in record.tags
            },
            routes={
                r.name: Route(r.id, r.name, tuple(parse_target(t) for t in r.targets), r.strategy)
                for r in record.routes
            },
        )


def _signature(name: str, limits: OwnerLimits) -> tuple[object, ...]:
    """What a scope is built from: equal signatures give interchangeable scopes."""
    rate = limits.rate_limit
    return (
        name,
        tuple(
            (
                b.id,
                b.max_limit_nanos,
                b.reset_duration,
                b.calendar_aligned,
                b.last_reset,
                b.soft,
                None if b.alert_thresholds is None else tuple(b.alert_thresholds),
            )
            for b in limits.budgets
        ),
        None
        if rate is None
        else (
            rate.id,
            rate.request_max_limit,
            rate.request_reset_duration,
            rate.request_last_reset,
            rate.token_max_limit,
            rate.token_reset_duration,
            rate.token_last_reset,
            rate.max_concurrent_requests,
        ),
    )


class NotCached(enum.Enum):
    """What `KeyCache.get` answers for a key it holds nothing about (the store must be asked)."""

    NOT_CACHED = enum.auto()


NOT_CACHED = NotCached.NOT_CACHED


def _monotonic() -> float:
    return time.monotonic()  # looked up on each call, so that tests can move the clock


class KeyCache:
    """Key digest (SHA-256, 32 bytes) -> its KeyConfig, or None for a key the store does not
    know; each trusted for the cache TTL. cachetools' TTLCache: when it is full, expired entries
    go first, then the least recently used. Touched only from the event loop."""

    def __init__(self, ttl: float, maxsize: int = 1_000_000) -> None:
        self.ttl = ttl
        self._cache: TTLCache[bytes, KeyConfig | None] = TTLCache(maxsize, ttl, timer=_monotonic)

    def get(self, digest: bytes) -> KeyConfig | NotCached | None:
        """The cached config, None for a cached unknown key, `NOT_CACHED` when not cached."""
        try:  # one __getitem__ (0.4 µs a hit); TTLCache.get checks the expiry twice (1.4 µs)
            return self._cache[digest]
        except KeyError:
            return NOT_CACHED

    def put(self, digest: bytes, config: KeyConfig | None) -> None:
        self._cache[digest] = config

    def clear(self) -> None:
        self._cache.clear()

    def values(self) -> list[KeyConfig]:
        self._cache.expire()
        return [c for c in self._cache.values() if c is not None]

    def __len__(self) -> int:
        self._cache.expire()
        return len(self._cache)
