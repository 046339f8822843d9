"""Read-side of the admin API: budget and rate-limit lists, model-config pages, usage reports.

Usage is aggregated by the database (GROUP BY); only tags, kept as a JSON list per record, are
split in Python after the database has summed the records of each distinct tag list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import String, case, cast, func, update
from sqlmodel import Session, col, select

from budget_middleware.core.money import NANOS_PER_USD, usd_from_nanos
from budget_middleware.core.times import utc
from budget_middleware.core.windows import CounterRegistry
from budget_middleware.exceptions import InvalidRequest, NotFound
from budget_middleware.manage.owner_limits import ended_for_good
from budget_middleware.manage.schemas import (
    BudgetOut,
    ModelConfigOut,
    RateLimitOut,
    UsageOut,
    UsageRow,
    to_utc,
)
from budget_middleware.manage.status import Paths, budget_out, rate_limit_out
from budget_middleware.manage.views import Reader
from budget_middleware.store.tables import (
    BudgetRow,
    CustomerRow,
    DeletedRow,
    ModelConfigRow,
    RateLimitRow,
    TeamRow,
    UsageRecordRow,
    VirtualKeyRow,
    owned_by,
)

GROUPS = ("virtual_key", "team", "customer", "provider", "model", "tag", "day")


def _now() -> datetime:
    return datetime.now(UTC)


def budgets(
    s: Session,
    *,
    owner_type: str | None,
    owner_id: str | None,
    counters: CounterRegistry | None,
) -> list[BudgetOut]:
    found = _owned(s, BudgetRow, owner_type, owner_id)
    rows = sorted(found, key=lambda b: (b.owner_type, b.owner_id, b.created_at))
    paths, now = Paths(s), _now()
    return [budget_out(r, paths.of(r.owner_type, r.owner_id), now, counters) for r in rows]


def _budget_row(s: Session, id_: str) -> BudgetRow:
    row = s.get(BudgetRow, id_)
    if row is None:
        raise NotFound(f"budget {id_!r} not found")
    return row


def budget(s: Session, id_: str) -> BudgetOut:
    row = _budget_row(s, id_)
    return budget_out(row, Paths(s).of(row.owner_type, row.owner_id), _now())


def window_began(s: Session, id_: str) -> float:
    """Where a budget's stored window began (its `last_reset`), in epoch seconds."""
    return utc(_budget_row(s, id_).last_reset).timestamp()


def reset_budget(s: Session, id_: str, now: datetime) -> BudgetOut:
    """A new window from `now` (the moment this process's live counter started it at), in one
    statement: a flush may have written charges of that window already (settled after `now`,
    they started it in the store), and they stay; the old window's usage goes."""
    row = _budget_row(s, id_)
    if row.reset_duration is None and utc(row.last_reset) < now:
        ended_for_good(s, [(row.id, row.last_reset)])  # (its window's key in Redis expires)
    older = col(BudgetRow.last_reset) < now
    s.execute(
        update(BudgetRow)
        .where(col(BudgetRow.id) == id_)
        .values(
            current_usage_nanos=case((older, 0), else_=col(BudgetRow.current_usage_nanos)),
            last_reset=case((older, now), else_=col(BudgetRow.last_reset)),
            updated_at=now,
        )
    )
    s.commit()
    row = _budget_row(s, id_)
    s.refresh(row)
    return budget_out(row, Paths(s).of(row.owner_type, row.owner_id), now)


_Owned = TypeVar("_Owned", BudgetRow, RateLimitRow)


def _owned(
    s: Session, table: type[_Owned], owner_type: str | None, owner_id: str | None
) -> Sequence[_Owned]:
    """The rows of a limits table, of one owner type and owner if given."""
    query = select(table)
    if owner_type is not None:
        query = query.where(table.owner_type == owner_type)
    if owner_id is not None:
        query = query.where(owned_by(table.owner_type, table.owner_id, owner_type, owner_id))
    return s.exec(query).all()


def rate_limits(
    s: Session,
    *,
    owner_type: str | None,
    owner_id: str | None,
    counters: CounterRegistry | None,
) -> list[RateLimitOut]:
    found = _owned(s, RateLimitRow, owner_type, owner_id)
    rows = sorted(found, key=lambda r: (r.owner_type, r.owner_id))
    paths, now = Paths(s), _now()
    return [rate_limit_out(r, paths.of(r.owner_type, r.owner_id), now, counters) for r in rows]


def model_configs(
    s: Session,
    *,
    limit: int | None,
    offset: int,
    search: str | None,
    scope: str | None,
    provider: str | None,
    counters: CounterRegistry | None,
) -> tuple[list[ModelConfigOut], int]:
    if limit is not None and limit < 1:
        raise InvalidRequest("limit must be at least 1", param="limit")
    if offset < 0:
        raise InvalidRequest("offset must be at least 0", param="offset")
    query = select(ModelConfigRow)
    if search:
        # a substring as written: `_` and `%` are no LIKE wildcards here
        found = func.lower(ModelConfigRow.model_name).contains(search.lower(), autoescape=True)
        query = query.where(found)
    if scope is not None:
        query = query.where(ModelConfigRow.scope == scope)
    if provider is not None:
        query = query.where(ModelConfigRow.provider == provider)
    total = s.exec(select(func.count()).select_from(query.subquery())).one()
    query = query.order_by(col(ModelConfigRow.model_name), col(ModelConfigRow.id)).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    reader = Reader(s, counters)
    return [reader.model_config(r) for r in s.exec(query).all()], int(total)


def _group_column(s: Session, group_by: str) -> Any:
    if group_by == "day":
        if s.get_bind().dialect.name == "postgresql":
            return func.to_char(func.timezone("UTC", UsageRecordRow.created_at), "YYYY-MM-DD")
        return func.substr(cast(UsageRecordRow.created_at, String), 1, 10)
    if group_by == "tag":
        return cast(UsageRecordRow.tags, String)  # JSON cannot be grouped on PostgreSQL
    return getattr(UsageRecordRow, {"virtual_key": "virtual_key_id", "team": "team_id"}.get(
        group_by, "customer_id" if group_by == "customer" else group_by
    ))  # fmt: skip


def usage(s: Session, group_by: str, start: datetime | None, end: datetime | None) -> UsageOut:
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}", param="group_by")
    # clamped at the calendar's ends, as the admin API's bounds are (`to_utc`)
    start = to_utc(start) if start is not None else None
    end = to_utc(end) if end is not None else None
    if start is not None and end is not None and end < start:  # swapped: not an empty report
        raise InvalidRequest(
            f"end {end.isoformat()} is before start {start.isoformat()}: swapped? (an end equal "
            "to the start is an empty period)",
            param="end",
        )
    group = _group_column(s, group_by)
    query = select(  # type: ignore[call-overload]
        group,
        func.count(),
        func.coalesce(func.sum(UsageRecordRow.input_tokens), 0),
        func.coalesce(func.sum(UsageRecordRow.output_tokens), 0),
        func.coalesce(func.sum(UsageRecordRow.cached_tokens), 0),
        # Nano-dollars summed as whole dollars and the nano-dollars left over: SQLite's sum()
        # of integers fails past 2**63 ($9.2 billion, 9,224 charges at the $1,000,000 cap),
        # the whole report a 503 "store cannot be reached"; each part is far from it.
        func.coalesce(func.sum(UsageRecordRow.cost_nanos // NANOS_PER_USD), 0),
        func.coalesce(func.sum(UsageRecordRow.cost_nanos % NANOS_PER_USD), 0),
    )
    if start is not None:
        query = query.where(col(UsageRecordRow.created_at) >= start)
    if end is not None:
        query = query.where(col(UsageRecordRow.created_at) < end)
    rows: Sequence[tuple[Any, ...]] = [
        (*sums[:5], int(sums[5]) * NANOS_PER_USD + int(sums[6]))
        for sums in s.exec(query.group_by(group)).all()
    ]
    # The total of the same read (a second query saw the records written since): each group
    # holds records no other holds, by tag too before a record with two tags is split in two.
    total = _total(rows)
    if group_by == "tag":
        rows = _split_tags(rows)
    names = _names(s, group_by)
    deleted = _deleted_names(
        s, group_by, [r[0] for r in rows if r[0] is not None and r[0] not in names]
    )
    names.update(deleted)
    found = [
        UsageRow(
            key=None if key is None else str(key),
            name=names.get(key) if key is not None else None,
            deleted=key in deleted,
            requests=int(n),
            input_tokens=int(i),
            output_tokens=int(o),
            cached_tokens=int(c),
            cost=usd_from_nanos(int(cost)),
        )
        for key, n, i, o, c, cost in rows
    ]
    if group_by == "day":  # a time series: in date order
        found.sort(key=lambda r: r.key or "")
    else:  # the most spent first
        found.sort(key=lambda r: (-r.cost, r.key or ""))
    return UsageOut(
        group_by=group_by,  # type: ignore[arg-type]
        start=start,
        end=end,
        usage=found,
        count=len(found),
        total=total,
    )


def _split_tags(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows grouped by tag list -> rows by tag; a record with two tags counts under each."""
    sums: dict[str | None, list[int]] = {}
    for tags_json, *numbers in rows:
        tags = json.loads(tags_json) if tags_json else []
        for tag in tags or [None]:
            acc = sums.setdefault(tag, [0, 0, 0, 0, 0])
            for i, number in enumerate(numbers):
                acc[i] += int(number)
    return [(tag, *numbers) for tag, numbers in sums.items()]


def _total(rows: Sequence[tuple[Any, ...]]) -> UsageRow:
    """The sums of groups of distinct records (a group, then its five sums)."""
    n = i = o = c = cost = 0
    for _group, *numbers in rows:
        n += int(numbers[0])
        i += int(numbers[1])
        o += int(numbers[2])
        c += int(numbers[3])
        cost += int(numbers[4])
    return UsageRow(
        key=None,
        requests=n,
        input_tokens=i,
        output_tokens=o,
        cached_tokens=c,
        cost=usd_from_nanos(cost),
    )


def _deleted_names(s: Session, kind: str, ids: list[Any]) -> dict[Any, str]:
    """The names the deleted keys, teams or customers of these ids had (`remember_deleted`)."""
    found: dict[Any, str] = {}
    # In parts: PostgreSQL takes at most 65,535 parameters a query (66,000 gone keys that
    # spent in the period were a 503 "store cannot be reached" for the whole report).
    for at in range(0, len(ids), _IDS_PER_QUERY):
        query = select(DeletedRow.entity_id, DeletedRow.name).where(
            DeletedRow.kind == kind, col(DeletedRow.entity_id).in_(ids[at : at + _IDS_PER_QUERY])
        )
        found.update(s.exec(query).all())
    return found


_IDS_PER_QUERY = 10_000


def _names(s: Session, group_by: str) -> dict[Any, str]:
    table: Any = {"virtual_key": VirtualKeyRow, "team": TeamRow, "customer": CustomerRow}.get(
        group_by
    )
    if table is None:
        return {}
    return {id_: name for id_, name in s.exec(select(table.id, table.name)).all()}
