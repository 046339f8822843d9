"""Alerts in the store (SPEC §14): raised once across every instance, and delivered.

The table's unique constraint (budget, window, type, threshold) decides which instance raises an
alert: the one whose insert lands; every other one's is ignored. Deliveries are leased: an
instance claims due alerts with a conditional update, so two instances never post one alert at
the same time, and a delivery left by a stopped instance is taken up once its lease runs out.
Blocking calls, run in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select

from budget_middleware.core.providers import owner_name
from budget_middleware.core.times import utc
from budget_middleware.store.database import Store
from budget_middleware.store.tables import AlertRow, new_id


@dataclass(slots=True)
class NewAlert:
    """An alert to raise: what identifies it once, who owns the budget, the body to deliver."""

    type: str
    budget_id: str
    window_start: datetime
    threshold: float
    owner_type: str
    owner_id: str
    owner_name: str
    raised_at: datetime
    body: str
    delivery: str  # "pending", or "delivered" when there is nowhere to deliver


@dataclass(slots=True)
class Due:
    """An alert claimed for delivery."""

    id: str
    body: str
    delivered_to: list[str]
    attempts: int
    raised_at: datetime
    claimed_until: datetime  # this claim: its outcome is recorded only while it holds
    first_attempt_at: datetime | None


def raise_alerts(store: Store, alerts: Sequence[NewAlert]) -> list[AlertRow]:
    """Insert each alert unless it was raised already (here or by another instance); the rows
    this call inserted, which only this caller reports."""
    inserted: list[AlertRow] = []
    with store.engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        for alert in alerts:
            values = {
                "id": new_id(),
                "attempts": 0,
                "delivered_to": [],
                "next_attempt_at": alert.raised_at,
                **{name: getattr(alert, name) for name in NewAlert.__slots__},
            }
            statement = dialect.insert(AlertRow).values(**values).on_conflict_do_nothing()
            # RETURNING says whether the row went in (PostgreSQL's driver here reports no rowcount)
            if conn.execute(statement.returning(col(AlertRow.id))).first() is not None:
                inserted.append(AlertRow(**values))
    return inserted


def claim_due(store: Store, now: datetime, lease: float, limit: int = 20) -> list[Due]:
    """Pending alerts whose next attempt is due and that no instance holds, claimed for `lease`
    seconds (an instance that stops mid-delivery holds them no longer than that)."""
    free = or_(col(AlertRow.claimed_until).is_(None), col(AlertRow.claimed_until) < now)
    due = and_(col(AlertRow.delivery) == "pending", col(AlertRow.next_attempt_at) <= now, free)
    claimed: list[Due] = []
    with store.session() as s:
        rows = s.exec(
            select(AlertRow).where(due).order_by(col(AlertRow.raised_at)).limit(limit)
        ).all()
        for row in rows:
            until = now + timedelta(seconds=lease)
            taken = s.execute(
                update(AlertRow)
                .where(col(AlertRow.id) == row.id, free)
                .values(claimed_until=until)
                .returning(col(AlertRow.id))
                # nothing evaluated in Python: SQLite gives back naive datetimes
                .execution_options(synchronize_session=False)
            ).first()
            if taken is not None:  # no other instance claimed it meanwhile
                first = row.first_attempt_at
                claimed.append(
                    Due(row.id, row.body, list(row.delivered_to), row.attempts,
                        utc(row.raised_at), until, None if first is None else utc(first))
                )  # fmt: skip
        s.commit()
    return claimed


def record_attempt(
    store: Store,
    due: Due,
    delivered_to: list[str],
    delivery: str,
    next_attempt_at: datetime,
    error: str | None,
) -> bool:
    """One delivery round's outcome, and the claim released; False (nothing written) when the
    claim was no longer this round's (it ran past its lease and another instance took over)."""
    with store.session() as s:
        done = s.execute(
            update(AlertRow)
            .where(col(AlertRow.id) == due.id, col(AlertRow.claimed_until) == due.claimed_until)
            .values(
                delivered_to=delivered_to,
                delivery=delivery,
                attempts=AlertRow.attempts + 1,
                first_attempt_at=due.first_attempt_at or datetime.now(UTC),
                next_attempt_at=next_attempt_at,
                claimed_until=None,
                last_error=None if error is None else error[:300],
            )
            .returning(col(AlertRow.id))
            .execution_options(synchronize_session=False)
        ).first()
        s.commit()
    return done is not None


def list_alerts(
    store: Store,
    owner_type: str | None = None,
    owner_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Recent alerts, newest first, as `GET /alerts` answers them; and how many there are."""
    where = []
    if owner_type is not None:
        where.append(col(AlertRow.owner_type) == owner_type)
    owner_id = owner_name(owner_type, owner_id)
    if owner_id is not None:
        where.append(col(AlertRow.owner_id) == owner_id)
    query = select(AlertRow).where(*where)
    query = query.order_by(col(AlertRow.raised_at).desc(), col(AlertRow.id)).offset(offset)
    with store.session() as s:
        total = s.exec(select(func.count()).select_from(AlertRow).where(*where)).one()
        return [alert_out(row) for row in s.exec(query.limit(limit)).all()], int(total)


def alert_out(row: AlertRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "budget_id": row.budget_id,
        "owner": {"type": row.owner_type, "id": row.owner_id, "name": row.owner_name},
        "threshold": row.threshold if row.type == "budget.threshold" else None,
        "raised_at": utc(row.raised_at).isoformat(),
        "delivery": row.delivery,
        "attempts": row.attempts,
    }
