"""Stored owners as the admin API answers them, each with its budgets and rate limit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, select

from budget_middleware.core.times import utc
from budget_middleware.core.windows import CounterRegistry
from budget_middleware.manage.owner_limits import owner_budgets, owner_rate_limit
from budget_middleware.manage.schemas import (
    BudgetOut,
    CustomerOut,
    ModelConfigOut,
    ProviderConfigOut,
    ProviderOut,
    RateLimitOut,
    TagOut,
    TeamOut,
    VirtualKeyOut,
)
from budget_middleware.manage.status import Paths, budget_out, rate_limit_out
from budget_middleware.store.tables import (
    CustomerRow,
    ModelConfigRow,
    ProviderConfigRow,
    ProviderRow,
    TagRow,
    TeamRow,
    VirtualKeyRow,
)

OwnerRow = CustomerRow | TeamRow | VirtualKeyRow | ProviderRow | TagRow | ModelConfigRow


class Reader:
    """Builds answers inside one session; `counters` makes them from the live counters."""

    def __init__(
        self, s: Session, counters: CounterRegistry | None = None, now: datetime | None = None
    ) -> None:
        self.s = s
        self.paths = Paths(s)
        self.counters = counters
        self.now = now or datetime.now(UTC)

    def limits(self, owner_type: str, owner_id: str) -> tuple[list[BudgetOut], RateLimitOut | None]:
        path = self.paths.of(owner_type, owner_id)
        budgets = [
            budget_out(row, path, self.now, self.counters)
            for row in owner_budgets(self.s, owner_type, owner_id)
        ]
        rate = owner_rate_limit(self.s, owner_type, owner_id)
        return budgets, rate_limit_out(rate, path, self.now, self.counters) if rate else None

    def _owner_fields(self, owner_type: str, owner_id: str, row: OwnerRow) -> dict[str, Any]:
        budgets, rate = self.limits(owner_type, owner_id)
        return {
            "budgets": budgets,
            "budget": budgets[0] if budgets else None,
            "rate_limit": rate,
            "calendar_aligned": row.calendar_aligned,
            "config_hash": row.config_hash,
            "source": row.source,
            "created_at": utc(row.created_at),
            "updated_at": utc(row.updated_at),
        }

    def customer(self, row: CustomerRow) -> CustomerOut:
        return CustomerOut(id=row.id, name=row.name, **self._owner_fields("customer", row.id, row))

    def team(self, row: TeamRow) -> TeamOut:
        return TeamOut(
            id=row.id,
            name=row.name,
            customer_id=row.customer_id,
            **self._owner_fields("team", row.id, row),
        )

    def provider_config(self, row: ProviderConfigRow) -> ProviderConfigOut:
        budgets, rate = self.limits("provider_config", row.id)
        return ProviderConfigOut(
            id=row.id,
            provider=row.provider,
            allowed_models=list(row.allowed_models),
            blocked_models=list(row.blocked_models),
            budgets=budgets,
            rate_limit=rate,
        )

    def virtual_key(self, row: VirtualKeyRow, value: str | None = None) -> VirtualKeyOut:
        policies = self.s.exec(
            select(ProviderConfigRow).where(ProviderConfigRow.virtual_key_id == row.id)
        ).all()
        out = VirtualKeyOut(
            id=row.id,
            name=row.name,
            key_display=row.key_display,
            team_id=row.team_id,
            customer_id=row.customer_id,
            is_active=row.is_active,
            expires_at=utc(row.expires_at) if row.expires_at else None,
            tags=list(row.tags or []),
            provider_configs=[
                self.provider_config(p) for p in sorted(policies, key=lambda p: p.provider)
            ],
            **self._owner_fields("virtual_key", row.id, row),
        )
        if value is not None:
            out.value = value  # the only answers that carry it: create and rotate
        return out

    def provider(self, row: ProviderRow) -> ProviderOut:
        return ProviderOut(
            id=row.provider,
            provider=row.provider,
            **self._owner_fields("provider", row.provider, row),
        )

    def tag(self, row: TagRow) -> TagOut:
        return TagOut(id=row.tag, tag=row.tag, **self._owner_fields("tag", row.tag, row))

    def model_config(self, row: ModelConfigRow) -> ModelConfigOut:
        return ModelConfigOut(
            id=row.id,
            model_name=row.model_name,
            provider=row.provider,
            scope=row.scope,  # type: ignore[arg-type]
            scope_id=row.scope_id,
            scope_name=self.paths.key_name(row.scope_id) if row.scope_id else None,
            **self._owner_fields("model_config", row.id, row),
        )
