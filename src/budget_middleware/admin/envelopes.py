"""The objects answers wrap results in: one object under its singular name, lists with a count."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, create_model

from budget_middleware.manage.schemas import (
    BudgetOut,
    CustomerOut,
    ModelConfigOut,
    ProviderOut,
    RateLimitOut,
    RouteOut,
    TagOut,
    TeamOut,
    VirtualKeyOut,
)


def one(name: str, model: type[BaseModel]) -> type[BaseModel]:
    title = "".join(part.title() for part in name.split("_")) + "Answer"
    # "model_config" is pydantic's own attribute: the field gets another name and the alias.
    fields: Any = {f"{name}_": (model, Field(alias=name))}
    return create_model(title, **fields)


def many(name: str, model: type[BaseModel], count: str = "count", **more: Any) -> type[BaseModel]:
    title = "".join(part.title() for part in name.split("_")) + "List"
    fields: Any = {name: (list[model], ...), count: (int, ...), **more}  # type: ignore[valid-type]
    return create_model(title, **fields)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None
    errors: list[dict[str, Any]] | None = None


class ErrorAnswer(BaseModel):
    error: ErrorDetail


class HealthAnswer(BaseModel):
    status: str = Field(description="ok, or degraded when a part is down")
    store: str
    redis: str


class RejectedOut(BaseModel):
    """A usage record or counter delta the store refused, set aside (SPEC §11)."""

    id: str
    kind: str = Field(description="usage_record or counter")
    created_at: datetime
    error: str = Field(description="what the store said (no values)")
    record: dict[str, Any] = Field(description="the record or delta, as it was to be written")
    saved: bool = Field(description="false while it waits in memory to be saved in the store")


class AlertOwner(BaseModel):
    type: str
    id: str
    name: str


class AlertOut(BaseModel):
    """An alert (SPEC §14) and its delivery state."""

    id: str
    type: str = Field(description="budget.threshold or budget.exhausted")
    budget_id: str
    owner: AlertOwner
    threshold: float | None = Field(description="null for budget.exhausted")
    raised_at: datetime
    delivery: str = Field(
        description="pending, delivered or failed (delivered with 0 attempts: no webhook URL was "
        "configured, nothing to deliver, nothing sent)"
    )
    attempts: int


class RefusalOut(BaseModel):
    """A recent refusal in this process (or, in shadow mode, a request that would have been)."""

    code: str
    status: int | None = Field(description="the answer's status; null in shadow mode")
    scope: AlertOwner | None = Field(description="the owner whose limit refused, when one did")
    virtual_key_id: str | None
    key_name: str | None
    team_id: str | None = Field(description="the caller's team (SPEC §2's identity)")
    customer_id: str | None = Field(description="the caller's customer (the team's, or the key's)")
    provider: str | None
    model: str | None
    tags: list[str] = Field(description="the request's tags, when they were read")
    shadow: bool
    at: datetime


class ConfigApplied(BaseModel):
    applied: bool
    entries: dict[str, int] = Field(description="the file's entries, by section")
    ignored: list[str] | None = Field(
        None, description="of a LiteLLM file, the parts not read (absent when none)"
    )
    warnings: list[str] | None = Field(
        None,
        description="the apply's warnings, as the server's log says them, the file named "
        "`(the config sent)` (absent when none)",
    )


class Deleted(BaseModel):
    deleted: bool
    id: str


class ProviderBudgetOut(BaseModel):
    """A provider's tightest budget in LiteLLM's shape (`GET /provider/budgets`, SPEC §12)."""

    budget_limit: float = Field(description="USD: the budget's max_limit")
    time_period: str | None = Field(description="its reset_duration; null: it never resets")
    spend: float = Field(description="USD spent in its current window (live counters)")
    budget_reset_at: datetime | None = Field(
        description="when its current window ends and spend goes back to 0; null: never"
    )


class ProviderBudgets(BaseModel):
    providers: dict[str, ProviderBudgetOut] = Field(
        description="by provider name; only providers that have a provider-wide budget"
    )


CustomerAnswer = one("customer", CustomerOut)
CustomerList = many("customers", CustomerOut)
TeamAnswer = one("team", TeamOut)
TeamList = many("teams", TeamOut)
VirtualKeyAnswer = one("virtual_key", VirtualKeyOut)
VirtualKeyList = many("virtual_keys", VirtualKeyOut)
ProviderAnswer = one("provider", ProviderOut)
ProviderList = many("providers", ProviderOut)
TagAnswer = one("tag", TagOut)
TagList = many("tags", TagOut)
RouteAnswer = one("route", RouteOut)
RouteList = many("routes", RouteOut)
ModelConfigAnswer = one("model_config", ModelConfigOut)
ModelConfigList = many("model_configs", ModelConfigOut, count="total_count")
BudgetAnswer = one("budget", BudgetOut)
BudgetList = many("budgets", BudgetOut, server_time=(datetime, ...))
RateLimitList = many("rate_limits", RateLimitOut)
RejectedList = many("rejected", RejectedOut)
AlertList = many("alerts", AlertOut)
RefusalList = many("refusals", RefusalOut)
