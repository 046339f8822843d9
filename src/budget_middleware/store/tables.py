"""The store's tables, in the package's own metadata (never the host app's `SQLModel.metadata`).

Money is kept in whole nano-dollars (1e-9 USD) in 64-bit integers, so that deltas written by any
number of processes add up exactly.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ColumnElement, DateTime, Index, Text, UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from budget_middleware.core.providers import stored_provider

# 2: bm_rejected; 3: bm_routes; 4: bm_usage_records.direction; 5: bm_alerts, bm_budgets.soft and
# .alert_thresholds, bm_usage_records.would_refuse; 8: provider names by their one name;
# 9: bm_deleted; 10: bm_alert_deliveries; 11: a model config for any provider stored as none;
# 12: bm_alerts.first_attempt_at in stores that lack it; 13: bm_deleted_owners into bm_deleted;
# 14: bm_alert_deliveries.first_attempt_at indexed
SCHEMA_VERSION = 14


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreModel(SQLModel, registry=registry()):
    """Base of every table; its `metadata` is ours alone."""


class _Stamped(StoreModel):
    source: str = Field(default="manual", max_length=16)
    config_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class CustomerRow(_Stamped, table=True):
    __tablename__ = "bm_customers"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(unique=True, max_length=200)
    calendar_aligned: bool = False


class TeamRow(_Stamped, table=True):
    __tablename__ = "bm_teams"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(unique=True, max_length=200)
    customer_id: str | None = Field(default=None, index=True, max_length=32)
    calendar_aligned: bool = False


class VirtualKeyRow(_Stamped, table=True):
    __tablename__ = "bm_virtual_keys"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(unique=True, max_length=200)
    key_hash: str = Field(unique=True, max_length=64)  # SHA-256 hex; the value is never stored
    key_display: str = Field(max_length=32)  # prefix and last characters, for people
    team_id: str | None = Field(default=None, index=True, max_length=32)
    customer_id: str | None = Field(default=None, index=True, max_length=32)
    is_active: bool = True
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    tags: list[str] = Field(default_factory=list, sa_type=JSON)
    calendar_aligned: bool = False
    # The SHA-256 hex of the value a config file last gave it (never shown): a value rotated
    # through the API since stands until the file's value changes (`config_file`).
    file_value_hash: str | None = Field(default=None, max_length=64)


class ProviderConfigRow(StoreModel, table=True):
    __tablename__ = "bm_provider_configs"
    __table_args__ = (UniqueConstraint("virtual_key_id", "provider"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    virtual_key_id: str = Field(index=True, max_length=32)
    provider: str = Field(max_length=100)
    allowed_models: list[str] = Field(default_factory=lambda: ["*"], sa_type=JSON)
    blocked_models: list[str] = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class ProviderRow(_Stamped, table=True):
    """Provider-wide governance (budgets and a rate limit for every request to a provider)."""

    __tablename__ = "bm_providers"
    provider: str = Field(primary_key=True, max_length=100)
    calendar_aligned: bool = False


class ModelConfigRow(_Stamped, table=True):
    __tablename__ = "bm_model_configs"
    __table_args__ = (UniqueConstraint("model_name", "provider", "scope", "scope_id"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    model_name: str = Field(max_length=200)
    provider: str | None = Field(default=None, max_length=100)
    scope: str = Field(default="global", max_length=16)
    scope_id: str | None = Field(default=None, index=True, max_length=32)
    calendar_aligned: bool = False


class TagRow(_Stamped, table=True):
    __tablename__ = "bm_tags"
    tag: str = Field(primary_key=True, max_length=200)
    calendar_aligned: bool = False


class RouteRow(_Stamped, table=True):
    """A route (SPEC §12): a name a request's `model` may use, and its targets in order."""

    __tablename__ = "bm_routes"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(unique=True, max_length=200)
    targets: list[str] = Field(default_factory=list, sa_type=JSON)  # "provider/model", in order
    strategy: str = Field(default="ordered", max_length=16)


class BudgetRow(_Stamped, table=True):
    __tablename__ = "bm_budgets"
    __table_args__ = (Index("ix_bm_budgets_owner", "owner_type", "owner_id"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    owner_type: str = Field(max_length=20)
    owner_id: str = Field(max_length=200)
    max_limit_nanos: int = Field(sa_type=BigInteger)
    reset_duration: str | None = Field(default=None, max_length=16)
    calendar_aligned: bool = False
    current_usage_nanos: int = Field(default=0, sa_type=BigInteger)
    last_reset: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    soft: bool = False  # counted and alerted, never refusing (SPEC §14)
    alert_thresholds: list[float] | None = Field(default=None, sa_type=JSON)  # None: the default


class RateLimitRow(_Stamped, table=True):
    __tablename__ = "bm_rate_limits"
    __table_args__ = (UniqueConstraint("owner_type", "owner_id"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    owner_type: str = Field(max_length=20)
    owner_id: str = Field(max_length=200)
    request_max_limit: int | None = None
    request_reset_duration: str | None = Field(default=None, max_length=16)
    request_current_usage: int = Field(default=0, sa_type=BigInteger)
    request_last_reset: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    token_max_limit: int | None = Field(default=None, sa_type=BigInteger)
    token_reset_duration: str | None = Field(default=None, max_length=16)
    token_current_usage: int = Field(default=0, sa_type=BigInteger)
    token_last_reset: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    max_concurrent_requests: int | None = None


class UsageRecordRow(StoreModel, table=True):
    __tablename__ = "bm_usage_records"
    __table_args__ = (Index("ix_bm_usage_records_created_at", "created_at"),)
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(unique=True, max_length=32)  # makes a retried batch idempotent
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    virtual_key_id: str | None = Field(default=None, index=True, max_length=32)
    team_id: str | None = Field(default=None, max_length=32)
    customer_id: str | None = Field(default=None, max_length=32)
    provider: str = Field(max_length=100)
    model: str = Field(max_length=200)
    tags: list[str] = Field(default_factory=list, sa_type=JSON)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_nanos: int = Field(default=0, sa_type=BigInteger)
    cost: float = 0.0
    cost_source: str = Field(default="none", max_length=16)
    status: int = 0
    streamed: bool = False
    outcome: str = Field(default="completed", max_length=24)
    estimated: bool = False
    note: str | None = Field(default=None, max_length=200)
    duration_ms: float = 0.0
    direction: str = Field(default="inbound", max_length=8)  # or "outbound" (SPEC §13)
    would_refuse: str | None = Field(default=None, max_length=40)  # shadow mode (SPEC §14)


class AlertRow(StoreModel, table=True):
    """An alert (SPEC §14), raised once per budget, window and threshold across every instance:
    the unique constraint decides which instance raised it. Its delivery state lives here too, so
    deliveries pending survive a restart; `claimed_until` lets one instance at a time deliver.
    Pruned by the flusher's sweep once settled and both it and its window's end are more than
    `engine.ALERTS_KEPT` (30 days) old (`store.alerts.prune_alerts`)."""

    __tablename__ = "bm_alerts"
    __table_args__ = (
        UniqueConstraint(
            "budget_id", "window_start", "type", "threshold", name="uq_bm_alerts_once"
        ),
        Index("ix_bm_alerts_due", "delivery", "next_attempt_at"),
    )
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    type: str = Field(max_length=24)  # budget.threshold, budget.exhausted
    budget_id: str = Field(max_length=32)
    window_start: datetime = Field(sa_type=DateTime(timezone=True))
    threshold: float = 0.0  # 0 for budget.exhausted
    owner_type: str = Field(max_length=20)
    owner_id: str = Field(max_length=200)
    owner_name: str = Field(default="", max_length=200)
    raised_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True), index=True)
    body: str = Field(sa_type=Text)  # the JSON delivered, fixed when raised
    delivery: str = Field(default="pending", max_length=10)  # pending, delivered, failed
    attempts: int = 0
    delivered_to: list[str] = Field(default_factory=list, sa_type=JSON)
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    first_attempt_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    claimed_until: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_error: str | None = Field(default=None, max_length=300)


class AlertDeliveryRow(StoreModel, table=True):
    """An alert's delivery to one webhook URL (SPEC §14): each URL keeps its own retry
    schedule, so one that hangs holds back no other's retry. The URL is known by its SHA-256
    (a Slack or Discord URL's path is its credential); an instance delivers to the URLs of its
    own settings, so one instance's settings never close another's deliveries. Those of alerts
    settled and raised more than `engine.ALERT_DELIVERIES_KEPT` (30 days) ago are pruned by the
    flusher's sweep, each URL's newest kept (`store.alerts.prune_deliveries`)."""

    __tablename__ = "bm_alert_deliveries"
    __table_args__ = (
        Index("ix_bm_alert_deliveries_due", "delivery", "next_attempt_at"),
        # the URLs posted to lately (`store.alerts.raise_alerts`' `known_since`)
        Index("ix_bm_alert_deliveries_first_attempt", "first_attempt_at"),
    )
    alert_id: str = Field(primary_key=True, max_length=32)
    url_key: str = Field(primary_key=True, max_length=64)  # the URL's SHA-256, hex
    url_shown: str = Field(default="", max_length=200)  # scheme://host:port/… for messages
    # pending, delivered, failed; dropped: given up unattempted (`store.alerts.DROPPED`)
    delivery: str = Field(default="pending", max_length=10)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    first_attempt_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    claimed_until: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_error: str | None = Field(default=None, max_length=300)


class FlushRow(StoreModel, table=True):
    """An applied flush batch: a batch retried after an unclear commit is not applied twice.
    Kept `engine.FLUSH_IDS_KEPT` (30 days), then pruned by the flusher's sweep."""

    __tablename__ = "bm_flushes"
    batch_id: str = Field(primary_key=True, max_length=32)
    applied_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )


class RejectedRow(StoreModel, table=True):
    """A usage record or counter delta the store refused while it took other writes, set aside
    (as JSON text with every non-ASCII character escaped, which any store takes) for an operator
    to see at `GET /usage/rejected`; it no longer holds back the charges behind it."""

    __tablename__ = "bm_rejected"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)  # usage_record, counter
    created_at: datetime = Field(sa_type=DateTime(timezone=True), index=True)
    error: str = Field(max_length=300)
    payload: str = Field(sa_type=Text)


class DeletedRow(StoreModel, table=True):
    """An entity deleted through the management API: a key's, team's or customer's name, so
    where its money went stays readable by name (`GET /usage`, marked deleted), and the hash of
    the config file's entry it was made from or last declared by (any kind), so the next
    start-up does not make it again while that entry is unchanged (SPEC §10: a change made
    through the API stands until the file's entry changes)."""

    __tablename__ = "bm_deleted"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)  # virtual_key, team, customer, model_config, route, ...
    entity_id: str = Field(index=True, max_length=200)  # its id (a provider's or tag's name)
    name: str = Field(max_length=300)
    config_hash: str | None = Field(default=None, index=True, max_length=64)
    deleted_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class MetaRow(StoreModel, table=True):
    __tablename__ = "bm_meta"
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=200)


metadata = StoreModel.metadata


def owned_by(
    type_column: Any, id_column: Any, owner_type: str | None, owner_id: str
) -> ColumnElement[bool]:
    """Rows of the owner `owner_id` names (of `owner_type`, when given, filtered apart): with no
    type, a provider by any spelling of its one name too (`OpenAI`), as `owner_type=provider`
    finds it; the other owners' ids and names are taken as given."""
    found: ColumnElement[bool] = id_column == owner_id
    provider = stored_provider(owner_id)
    if owner_type is None and provider != owner_id:
        found = found | ((type_column == "provider") & (id_column == provider))
    return found
