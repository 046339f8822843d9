"""The admin API's shapes (SPEC §9): request bodies and the objects answers carry.

Bodies are strict (unknown fields are a 422). Updates are partial: a field left out is left alone,
a field sent as `null` is cleared (`rate_limit: null` removes the rate limit). Money is USD.
Responses carry Bifrost's field names and, on budgets, GoModel's status fields as well.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .durations import Duration

OwnerType = Literal[
    "customer", "team", "virtual_key", "provider_config", "provider", "model_config", "tag"
]
GroupBy = Literal["virtual_key", "team", "customer", "provider", "model", "tag", "day"]


def _duration(value: str | None) -> str | None:
    if value is None:
        return None
    return str(Duration.parse(value))  # "1mo" is stored as "1M"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- limits ------------------------------------------------------------------------------


class BudgetIn(_Body):
    """A budget as written through its owner. `id` (or else `reset_duration`) matches an existing
    budget of the owner on update, which then keeps its usage."""

    id: str | None = None
    max_limit: float = Field(ge=0, description="USD")
    reset_duration: str | None = Field(
        default=None, description="<n>s|m|h|d|w|M|Q|Y, or null: never resets"
    )
    calendar_aligned: bool | None = Field(
        default=None, description="default: the owner's calendar_aligned"
    )

    @field_validator("max_limit")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value > 1e9:
            raise ValueError("must be a finite amount of USD, at most 1e9")
        return value

    @field_validator("reset_duration")
    @classmethod
    def _reset(cls, value: str | None) -> str | None:
        return _duration(value)


class RateLimitIn(_Body):
    request_max_limit: int | None = Field(default=None, ge=0, le=2**62)
    request_reset_duration: str | None = None
    token_max_limit: int | None = Field(default=None, ge=0, le=2**62)
    token_reset_duration: str | None = None
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=2**31)

    @field_validator("request_reset_duration", "token_reset_duration")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return _duration(value)

    @model_validator(mode="after")
    def _pairs(self) -> RateLimitIn:
        for kind in ("request", "token"):
            limit = getattr(self, f"{kind}_max_limit")
            duration = getattr(self, f"{kind}_reset_duration")
            if (limit is None) != (duration is None):
                raise ValueError(
                    f"{kind}_max_limit and {kind}_reset_duration go together: give both or neither"
                )
        return self


class _Limits(_Body):
    """Budgets and a rate limit, written through their owner. `budget` is one more budget."""

    budgets: list[BudgetIn] | None = Field(default=None, max_length=100)
    budget: BudgetIn | None = None
    rate_limit: RateLimitIn | None = None

    def budget_list(self) -> list[BudgetIn] | None:
        """The budgets to write, or None to leave them alone."""
        if self.budgets is None and "budget" not in self.model_fields_set:
            return None
        return [*(self.budgets or []), *([self.budget] if self.budget else [])]

    def touches_rate_limit(self) -> bool:
        return "rate_limit" in self.model_fields_set


# -- owners ------------------------------------------------------------------------------


class CustomerCreate(_Limits):
    name: str = Field(min_length=1, max_length=200)
    calendar_aligned: bool = False


class CustomerUpdate(_Limits):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    calendar_aligned: bool | None = None


class TeamCreate(CustomerCreate):
    customer_id: str | None = None


class TeamUpdate(CustomerUpdate):
    customer_id: str | None = None


class ProviderConfigIn(_Limits):
    id: str | None = None
    provider: str = Field(min_length=1, max_length=100)
    allowed_models: list[str] = Field(default_factory=lambda: ["*"], description='["*"]: all')
    blocked_models: list[str] = Field(default_factory=list)


class _KeyFields(_Limits):
    team_id: str | None = None
    customer_id: str | None = None
    is_active: bool | None = None
    expires_at: datetime | None = None
    provider_configs: list[ProviderConfigIn] | None = Field(default=None, max_length=100)
    tags: list[str] | None = Field(default=None, max_length=100)
    calendar_aligned: bool | None = None

    @model_validator(mode="after")
    def _one_parent(self) -> _KeyFields:
        if self.team_id is not None and self.customer_id is not None:
            raise ValueError("a virtual key belongs to a team or to a customer, not both")
        return self


class VirtualKeyCreate(_KeyFields):
    name: str = Field(min_length=1, max_length=200)
    is_active: bool = True
    tags: list[str] = Field(default_factory=list, max_length=100)
    calendar_aligned: bool = False
    value: str | None = Field(
        default=None, min_length=8, max_length=512, description="default: a generated value"
    )


class VirtualKeyUpdate(_KeyFields):
    name: str | None = Field(default=None, min_length=1, max_length=200)


class ProviderPut(_Limits):
    calendar_aligned: bool | None = None


class TagPut(ProviderPut):
    pass


class ModelConfigCreate(_Limits):
    model_name: str = Field(min_length=1, max_length=200, description="'*': every model")
    provider: str | None = Field(default=None, max_length=100)
    scope: Literal["global", "virtual_key"] = "global"
    scope_id: str | None = None
    calendar_aligned: bool = False

    @model_validator(mode="after")
    def _scoped(self) -> ModelConfigCreate:
        if (self.scope == "virtual_key") != (self.scope_id is not None):
            raise ValueError("scope 'virtual_key' needs a scope_id (a key's id), 'global' none")
        return self


class ModelConfigUpdate(_Limits):
    model_name: str | None = Field(default=None, min_length=1, max_length=200)
    provider: str | None = Field(default=None, max_length=100)
    calendar_aligned: bool | None = None


# -- answers -----------------------------------------------------------------------------


class BudgetOut(BaseModel):
    """Bifrost's budget and GoModel's status, in one object. Owner fields: only the owner's."""

    id: str
    max_limit: float
    reset_duration: str | None
    last_reset: datetime
    current_usage: float
    calendar_aligned: bool
    config_hash: str | None
    created_at: datetime
    updated_at: datetime
    owner_type: OwnerType
    customer_id: str | None = None
    team_id: str | None = None
    virtual_key_id: str | None = None
    provider_config_id: str | None = None
    model_config_id: str | None = None
    provider: str | None = None
    tag: str | None = None
    amount: float
    spent: float
    remaining: float
    usage_ratio: float
    period_start: datetime
    period_end: datetime | None = Field(default=None, description="left out: never resets")
    period_label: str
    period_seconds: int
    period_ratio: float
    last_reset_at: datetime
    source: str
    has_usage: bool
    user_path: str


class RateLimitOut(BaseModel):
    id: str
    owner_type: OwnerType
    owner_id: str
    request_max_limit: int | None
    request_reset_duration: str | None
    request_current_usage: int
    request_last_reset: datetime
    token_max_limit: int | None
    token_reset_duration: str | None
    token_current_usage: int
    token_last_reset: datetime
    max_concurrent_requests: int | None
    config_hash: str | None
    created_at: datetime
    updated_at: datetime
    source: str
    user_path: str


class _OwnerOut(BaseModel):
    budgets: list[BudgetOut]
    budget: BudgetOut | None = Field(default=None, description="the first budget, as Bifrost has")
    rate_limit: RateLimitOut | None = None
    calendar_aligned: bool
    config_hash: str | None
    source: str
    created_at: datetime
    updated_at: datetime


class CustomerOut(_OwnerOut):
    id: str
    name: str


class TeamOut(CustomerOut):
    customer_id: str | None


class ProviderConfigOut(BaseModel):
    id: str
    provider: str
    allowed_models: list[str]
    blocked_models: list[str]
    budgets: list[BudgetOut]
    rate_limit: RateLimitOut | None = None


class VirtualKeyOut(_OwnerOut):
    id: str
    name: str
    key_display: str
    value: str | None = Field(default=None, description="only in the answers of create and rotate")
    team_id: str | None
    customer_id: str | None
    is_active: bool
    expires_at: datetime | None
    tags: list[str]
    provider_configs: list[ProviderConfigOut]


class ProviderOut(_OwnerOut):
    provider: str


class TagOut(_OwnerOut):
    tag: str


class ModelConfigOut(_OwnerOut):
    id: str
    model_name: str
    provider: str | None
    scope: Literal["global", "virtual_key"]
    scope_id: str | None
    scope_name: str | None = None


class UsageRow(BaseModel):
    key: str | None = Field(description="the group: an id, a provider, a model, a tag or a day")
    name: str | None = None
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: float


class UsageOut(BaseModel):
    group_by: GroupBy
    start: datetime | None
    end: datetime | None
    usage: list[UsageRow]
    count: int
    total: UsageRow


class QuotaOut(BaseModel):
    virtual_key: VirtualKeyOut
    budgets: list[BudgetOut]
    rate_limits: list[RateLimitOut]
    server_time: datetime


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready answer; fields the builder never set (other owners' ids) are left out."""
    return model.model_dump(mode="json", exclude_unset=True)
