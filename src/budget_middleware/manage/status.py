"""Budgets and rate limits as the admin API shows them: stored rows (or live counters) with their
current window, and the owner's place in the hierarchy (`user_path`).

A stored usage counts only while its window is the current one: a row whose `last_reset` is before
the current window's start holds the spend of a window that has ended (it is reset on first touch),
so its current usage is 0.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from budget_middleware.core.durations import Duration, parse_duration, window_bounds
from budget_middleware.core.money import usd_from_nanos
from budget_middleware.core.times import from_ts, utc
from budget_middleware.core.windows import CounterRegistry, WindowCounter
from budget_middleware.manage.schemas import BudgetOut, RateLimitOut
from budget_middleware.store.tables import (
    BudgetRow,
    CustomerRow,
    ModelConfigRow,
    ProviderConfigRow,
    RateLimitRow,
    TeamRow,
    VirtualKeyRow,
)

OWNER_FIELDS = {
    "customer": "customer_id",
    "team": "team_id",
    "virtual_key": "virtual_key_id",
    "provider_config": "provider_config_id",
    "model_config": "model_config_id",
    "provider": "provider",
    "tag": "tag",
}

_LABELS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "M": "month"}
_LABELS |= {"Q": "quarter", "Y": "year"}
_ONE = {"day": "daily", "week": "weekly", "month": "monthly", "quarter": "quarterly"}
_ONE |= {"year": "yearly", "hour": "hourly"}


def period_label(duration: Duration | None) -> str:
    """`daily`, `monthly`, `every 2 weeks`, ...; `lifetime` for a budget that never resets."""
    if duration is None:
        return "lifetime"
    unit = _LABELS[duration.unit]
    if duration.count == 1:
        return _ONE.get(unit, f"every {unit}")
    return f"every {duration.count} {unit}s"


def current_window(
    reset_duration: str | None, last_reset: datetime, calendar_aligned: bool, now: datetime
) -> tuple[datetime, datetime | None]:
    if reset_duration is None:
        return utc(last_reset), None
    anchor = utc(last_reset)
    start, end = window_bounds(
        Duration.parse(reset_duration), anchor=anchor, now=now, calendar_aligned=calendar_aligned
    )
    if start < anchor < end:  # a calendar window reset (or made) midway starts there, as live
        start = anchor
    return start, end


def current_usage(usage: int, last_reset: datetime, start: datetime) -> int:
    return usage if utc(last_reset) >= start else 0


class Paths:
    """Owners' places in the hierarchy by name, read once per answer: a table's first owner
    by its id alone, every row of it once a second one is asked for (a list). Reading every
    customer to name one made each create O(store): `config apply` of 3,000 customers 83 s."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self._all: dict[type[Any], dict[str, Any]] = {}
        self._first: dict[type[Any], tuple[str, Any]] = {}

    def _row(self, table: type[Any], id_: str | None) -> Any:
        if not id_:
            return None
        rows = self._all.get(table)
        if rows is not None:
            return rows.get(id_)
        first = self._first.get(table)
        if first is None:
            row = self.s.get(table, id_)
            self._first[table] = (id_, row)
            return row
        if first[0] == id_:
            return first[1]
        rows = self._all[table] = {r.id: r for r in self.s.exec(select(table))}
        return rows.get(id_)

    def customer(self, id_: str | None) -> str:
        customer: CustomerRow | None = self._row(CustomerRow, id_)
        return f"/{customer.name}" if customer else ""

    def team(self, id_: str | None) -> str:
        team: TeamRow | None = self._row(TeamRow, id_)
        return f"{self.customer(team.customer_id)}/{team.name}" if team else ""

    def key(self, id_: str | None) -> str:
        key: VirtualKeyRow | None = self._row(VirtualKeyRow, id_)
        if key is None:
            return ""
        parent = self.team(key.team_id) if key.team_id else self.customer(key.customer_id)
        return f"{parent}/{key.name}"

    def key_name(self, id_: str | None) -> str | None:
        key: VirtualKeyRow | None = self._row(VirtualKeyRow, id_)
        return key.name if key else None

    def model(self, rule: ModelConfigRow) -> str:
        name = f"{rule.provider}/{rule.model_name}" if rule.provider else rule.model_name
        owner = self.key(rule.scope_id) if rule.scope == "virtual_key" else ""
        return f"{owner}/model/{name}"

    def of(self, owner_type: str, owner_id: str) -> str:
        if owner_type == "customer":
            return self.customer(owner_id)
        if owner_type == "team":
            return self.team(owner_id)
        if owner_type == "virtual_key":
            return self.key(owner_id)
        if owner_type == "provider_config":
            policy = self.s.get(ProviderConfigRow, owner_id)
            return f"{self.key(policy.virtual_key_id)}/provider/{policy.provider}" if policy else ""
        if owner_type == "model_config":
            rule = self.s.get(ModelConfigRow, owner_id)
            return self.model(rule) if rule else ""
        return f"/{owner_type}/{owner_id}"  # provider and tag: the id is the name


def _owner(row: BudgetRow) -> dict[str, Any]:
    return {OWNER_FIELDS[row.owner_type]: row.owner_id}


def budget_out(
    row: BudgetRow, path: str, now: datetime, counters: CounterRegistry | None = None
) -> BudgetOut:
    """One budget with its status; from the live counter when `counters` has one."""
    live: WindowCounter | None = counters.counter("budget", row.id) if counters else None
    moved = _moved(live, row.reset_duration, row.calendar_aligned, row.last_reset, now)
    if moved is not None:
        used, start, end = moved
    elif live is not None and live.duration is not None and live.start:
        if now.timestamp() < live.end:
            start = from_ts(live.start)
            end = from_ts(live.end) if live.end != float("inf") else None
            used = live.value
        else:  # its window has ended and no request has rolled it yet: a new window, unused
            anchor = max(utc(row.last_reset), from_ts(live.anchor))
            start, end = current_window(row.reset_duration, anchor, row.calendar_aligned, now)
            used = 0
    else:
        start, end = current_window(row.reset_duration, row.last_reset, row.calendar_aligned, now)
        used = current_usage(row.current_usage_nanos, row.last_reset, start)
        if live is not None:
            used = live.value
    # `last_reset`: where the current window began (the stored one is the anchor it rolls from)
    last_reset = start if row.reset_duration is not None else utc(row.last_reset)
    amount = row.max_limit_nanos
    return BudgetOut(
        id=row.id,
        max_limit=usd_from_nanos(amount),
        reset_duration=row.reset_duration,
        last_reset=last_reset,
        calendar_aligned=row.calendar_aligned,
        config_hash=row.config_hash,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        owner_type=row.owner_type,  # type: ignore[arg-type]
        amount=usd_from_nanos(amount),
        period_label=period_label(parse_duration(row.reset_duration)),
        last_reset_at=last_reset,
        source=row.source,
        soft=row.soft,
        alert_thresholds=row.alert_thresholds,
        reserved=usd_from_nanos(live.reserved) if live is not None else 0.0,
        user_path=path,
        **_owner(row),
        **spend_and_window(amount, used, start, end, now),
    )


def _moved(
    live: WindowCounter | None,
    reset_duration: str | None,
    calendar_aligned: bool,
    last_reset: datetime,
    now: datetime,
) -> tuple[int, datetime, datetime | None] | None:
    """A live counter whose terms (duration, calendar alignment) were changed since this process
    last used it still holds the old terms' window: an hourly budget made monthly read "resets
    in an hour" until the owner's next request. Its usage and current window as that request
    takes them (`WindowCounter.configure`): the new terms' window from the later anchor, the
    usage carried over unless that window begins where the old one ended or later. None when
    there is no live counter or its terms are the row's."""
    terms = parse_duration(reset_duration)
    if live is None or (live.duration, live.calendar_aligned) == (terms, calendar_aligned):
        return None
    anchor = max(utc(last_reset), from_ts(live.anchor))
    start, end = current_window(reset_duration, anchor, calendar_aligned, now)
    return (0 if start.timestamp() >= live.end else live.value), start, end


def spend_and_window(
    amount: int, used: int, start: datetime, end: datetime | None, now: datetime
) -> dict[str, Any]:
    """A budget's spend in its window, as its answers show it: `budget_out` at `now`, and an
    alert's budget as its crossing found it (`engine.alerts`), by the one rule. A $0 budget is
    used up (ratio 1.0): it refuses every request (SPEC §6)."""
    seconds = int((end - start).total_seconds()) if end else 0
    elapsed = (now - start).total_seconds()
    return {
        "current_usage": usd_from_nanos(used),
        "spent": usd_from_nanos(used),
        "remaining": usd_from_nanos(max(amount - used, 0)),
        "usage_ratio": used / amount if amount else 1.0,
        "has_usage": used > 0,
        "period_start": start,
        "period_end": end,
        "period_seconds": seconds,
        "period_ratio": min(max(elapsed / seconds, 0.0), 1.0) if seconds else 0.0,
    }


def _rate_usage(
    kind: str,
    row: RateLimitRow,
    now: datetime,
    counters: CounterRegistry | None,
) -> tuple[int, datetime]:
    """The request or token count of the current window, and where that window began."""
    live = counters.counter(kind, row.id) if counters else None
    duration: str | None = getattr(row, f"{kind}_reset_duration")
    last_reset: datetime = utc(getattr(row, f"{kind}_last_reset"))
    moved = _moved(live, duration, False, last_reset, now)
    if moved is not None:
        return moved[0], moved[1]
    if duration is None:
        return (live.value if live is not None else 0), last_reset
    if live is not None and live.start and now.timestamp() < live.end:
        return live.value, from_ts(live.start)
    if live is not None and live.anchor:
        last_reset = max(last_reset, from_ts(live.anchor))
    start, _ = current_window(duration, last_reset, False, now)
    if live is not None:
        return 0, start  # its window has ended and no request has rolled it yet
    return current_usage(getattr(row, f"{kind}_current_usage"), last_reset, start), start


def rate_limit_out(
    row: RateLimitRow, path: str, now: datetime, counters: CounterRegistry | None = None
) -> RateLimitOut:
    requests, requests_start = _rate_usage("request", row, now, counters)
    tokens, tokens_start = _rate_usage("token", row, now, counters)
    return RateLimitOut(
        id=row.id,
        owner_type=row.owner_type,  # type: ignore[arg-type]
        owner_id=row.owner_id,
        request_max_limit=row.request_max_limit,
        request_reset_duration=row.request_reset_duration,
        request_current_usage=requests,
        request_last_reset=requests_start,
        token_max_limit=row.token_max_limit,
        token_reset_duration=row.token_reset_duration,
        token_current_usage=tokens,
        token_last_reset=tokens_start,
        max_concurrent_requests=row.max_concurrent_requests,
        config_hash=row.config_hash,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        source=row.source,
        user_path=path,
    )
