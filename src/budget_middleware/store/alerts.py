"""Alerts in the store (SPEC §14): raised once across every instance, and delivered.

The table's unique constraint (budget, window, type, threshold) decides which instance raises an
alert: the one whose insert lands; every other one's is ignored. Each alert's delivery to each
webhook URL is a row of its own, with its own retry schedule, and an instance delivers to the
URLs of its settings: one URL that hangs holds back no other's retry, and one instance's settings
close no delivery another instance would make. Deliveries are leased: an instance claims due ones
with a conditional update, so two instances never post one alert to one URL at the same time, and
a delivery left by a stopped instance is taken up once its lease runs out.
Blocking calls, run in a worker thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, or_, tuple_, update
from sqlalchemy import select as sql_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from budget_middleware.core.durations import parse_duration, window_end, window_start
from budget_middleware.core.providers import owner_name
from budget_middleware.core.times import rfc3339, utc
from budget_middleware.settings import shown_url
from budget_middleware.store.database import Store
from budget_middleware.store.tables import (
    AlertDeliveryRow,
    AlertRow,
    BudgetRow,
    new_id,
    owned_by,
)

OWNER_NAME_CHARS = 200  # `AlertRow.owner_name`'s length


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
    id: str = field(default_factory=new_id)  # in the body too: a receiver tells a repeat by it


@dataclass(slots=True)
class Due:
    """An alert's delivery to one URL, claimed."""

    alert_id: str
    url: str
    url_key: str
    body: str
    attempts: int  # this URL's
    claimed_until: datetime  # this claim: its outcome is recorded only while it holds
    first_attempt_at: datetime | None  # this URL's


# A delivery given up because no instance attempted it (its URL removed, or every instance with
# it down): kept, not deleted, so that the store still knows the URL (`adopt`'s backlog from its
# first alert), and counted as no delivery when the alert is summed up. Deleted, a URL whose every
# delivery was given up was new to the store when its instance came back: the last 10 minutes'
# alerts only, and the ones given up never reached it.
DROPPED = "dropped"


def url_key(url: str) -> str:
    """How the store knows a webhook URL: its SHA-256 (the URL's path may be a credential)."""
    return hashlib.sha256(url.encode()).hexdigest()


def _delivery_rows(
    alert_id: str, urls: Sequence[str], due: datetime, done: Sequence[str] = ()
) -> list[dict[str, Any]]:
    return [
        {
            "alert_id": alert_id,
            "url_key": url_key(url),
            "url_shown": shown_url(url)[:200],
            "delivery": "delivered" if url in done else "pending",
            "attempts": 0,
            "next_attempt_at": due,
        }
        for url in dict.fromkeys(urls)
    ]


def known_urls(since: datetime) -> Any:
    """The URLs (by key, and as shown) an instance attempted a post to since `since` (indexed:
    `ix_bm_alert_deliveries_first_attempt`; it scanned every delivery kept)."""
    return (
        select(col(AlertDeliveryRow.url_key), func.max(AlertDeliveryRow.url_shown))
        .where(col(AlertDeliveryRow.first_attempt_at) >= since)
        .group_by(col(AlertDeliveryRow.url_key))
    )


def raise_alerts(
    store: Store,
    alerts: Sequence[NewAlert],
    urls: Sequence[str] = (),
    known_since: datetime | None = None,
) -> list[AlertRow]:
    """Insert each alert unless it was raised already (here or by another instance), with its
    delivery to each of `urls`; the rows this call inserted, which only this caller reports, in
    the order of `alerts`. Inserted in the order of their unique key, as every instance inserts
    them: in each instance's own order, two raising the same alerts at once each waited for a
    row of the other's (PostgreSQL aborted one batch: `DeadlockDetected`). Raised with no URL
    (`delivery` "delivered": nowhere to deliver), an alert is pending to each URL an instance
    attempted a post to since `known_since` (one with it may be down): it was listed
    `delivered` in 0 attempts ("no webhook") though a URL set on another instance lacked it."""
    inserted: dict[int, AlertRow] = {}
    known: list[tuple[str, str]] = []
    ordered = sorted(
        range(len(alerts)),
        key=lambda i: (alerts[i].budget_id, alerts[i].window_start, alerts[i].type,
                       alerts[i].threshold),
    )  # fmt: skip
    with store.engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        if not urls and known_since is not None:
            known = [(key, shown) for key, shown in conn.execute(known_urls(known_since)).all()]
        for index in ordered:
            alert = alerts[index]
            if known and alert.delivery == "delivered":
                alert.delivery = "pending"
            values = {
                "attempts": 0,
                "delivered_to": [],
                "next_attempt_at": alert.raised_at,
                **{name: getattr(alert, name) for name in NewAlert.__slots__},
            }
            # As its column holds it (the body names it whole): a provider config's owner is
            # `<key name>/<provider>`, a model config's `<provider>/<model>`, up to 301
            # characters, and PostgreSQL refused the insert, and with it every alert of the
            # batch, every round, for ever.
            values["owner_name"] = alert.owner_name[:OWNER_NAME_CHARS]
            statement = dialect.insert(AlertRow).values(**values).on_conflict_do_nothing()
            # RETURNING says whether the row went in (PostgreSQL's driver here reports no rowcount)
            if conn.execute(statement.returning(col(AlertRow.id))).first() is not None:
                inserted[index] = AlertRow(**values)
                if urls and alert.delivery == "pending":
                    rows = _delivery_rows(values["id"], urls, alert.raised_at)
                    conn.execute(dialect.insert(AlertDeliveryRow).values(rows))
                elif known:
                    rows = [
                        {"alert_id": values["id"], "url_key": key, "url_shown": shown,
                         "delivery": "pending", "attempts": 0,
                         "next_attempt_at": alert.raised_at}
                        for key, shown in known
                    ]  # fmt: skip
                    conn.execute(dialect.insert(AlertDeliveryRow).values(rows))
    return [inserted[index] for index in sorted(inserted)]


def adopt(
    store: Store, urls: Sequence[str], now: datetime, recent: float, backlog: float = 0.0
) -> int:
    """This instance's URLs added to the alerts that lack them: those pending (raised before
    this release kept deliveries by URL, or by an instance with other URLs) and those raised in
    the last `recent` seconds (by an instance with no URL, or other ones): every instance's URLs
    get every alert, whichever instance raised it. With `backlog` (an instance's first round),
    a URL the store already delivers to also gets those raised in the last `backlog` seconds
    since its first alert: raised while every instance with it was down (past `recent`, an
    alert raised where no URL is set was never posted to it, and one given up by an instance
    without it was `failed` unposted). How many deliveries were added."""
    added = 0
    with store.engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        for url in dict.fromkeys(urls):
            since = now - timedelta(seconds=recent)
            if backlog > recent:
                first = conn.execute(
                    select(func.min(col(AlertRow.raised_at)))
                    .join(AlertDeliveryRow, col(AlertDeliveryRow.alert_id) == col(AlertRow.id))
                    .where(col(AlertDeliveryRow.url_key) == url_key(url))
                ).scalar_one_or_none()
                if first is not None:  # not a URL new to the store: no history posted to it
                    since = min(since, max(utc(first), now - timedelta(seconds=backlog)))
            mine = select(AlertDeliveryRow.alert_id).where(
                col(AlertDeliveryRow.alert_id) == AlertRow.id,
                col(AlertDeliveryRow.url_key) == url_key(url),
                col(AlertDeliveryRow.delivery) != DROPPED,  # given up: lacked, made again
            )
            lacking = conn.execute(
                select(col(AlertRow.id), col(AlertRow.delivered_to)).where(
                    or_(col(AlertRow.delivery) == "pending", col(AlertRow.raised_at) >= since),
                    ~mine.exists(),
                )
            ).all()
            for alert_id, delivered_to in lacking:
                _lock(conn, alert_id)  # summed up after any other instance's outcome
                conn.execute(
                    delete(AlertDeliveryRow).where(
                        col(AlertDeliveryRow.alert_id) == alert_id,
                        col(AlertDeliveryRow.url_key) == url_key(url),
                        col(AlertDeliveryRow.delivery) == DROPPED,
                    )
                )
                rows = _delivery_rows(alert_id, [url], now, delivered_to or ())
                done = conn.execute(
                    dialect.insert(AlertDeliveryRow)
                    .values(rows)
                    .on_conflict_do_nothing()
                    .returning(col(AlertDeliveryRow.alert_id))
                ).first()
                if done is not None:
                    added += 1
                    _sum_up(conn, alert_id)
    return added


def claim_due(
    store: Store, urls: Sequence[str], now: datetime, lease: float, limit: int = 20
) -> list[Due]:
    """Deliveries to `urls` whose next attempt is due and that no instance holds, claimed for
    `lease` seconds (an instance that stops mid-delivery holds them no longer than that)."""
    by_key = {url_key(url): url for url in urls}
    if not by_key:
        return []
    free = or_(
        col(AlertDeliveryRow.claimed_until).is_(None), col(AlertDeliveryRow.claimed_until) < now
    )
    due = and_(
        col(AlertDeliveryRow.url_key).in_(list(by_key)),
        col(AlertDeliveryRow.delivery) == "pending",
        col(AlertDeliveryRow.next_attempt_at) <= now,
        free,
    )
    until = now + timedelta(seconds=lease)
    claimed: list[Due] = []
    with store.session() as s:
        rows = s.exec(
            select(AlertDeliveryRow, AlertRow.body)
            .join(AlertRow, col(AlertRow.id) == col(AlertDeliveryRow.alert_id))
            .where(due)
            # as raised: thresholds up, then exhausted (a tie of clocks: by type, threshold)
            .order_by(col(AlertRow.raised_at), col(AlertRow.type).desc(), col(AlertRow.threshold))
            .limit(limit)
        ).all()
        for row, body in rows:
            taken = s.execute(
                update(AlertDeliveryRow)
                .where(
                    col(AlertDeliveryRow.alert_id) == row.alert_id,
                    col(AlertDeliveryRow.url_key) == row.url_key,
                    # still due, not only unheld: another instance may have claimed, posted
                    # and recorded it since it was read (it was posted twice)
                    due,
                )
                .values(claimed_until=until)
                .returning(col(AlertDeliveryRow.alert_id))
                # nothing evaluated in Python: SQLite gives back naive datetimes
                .execution_options(synchronize_session=False)
            ).first()
            if taken is not None:  # no other instance claimed (or delivered) it meanwhile
                first = row.first_attempt_at
                claimed.append(
                    Due(row.alert_id, by_key[row.url_key], row.url_key, body, row.attempts,
                        until, None if first is None else utc(first))
                )  # fmt: skip
        s.commit()
    return claimed


def record_attempt(
    store: Store, due: Due, delivery: str, next_attempt_at: datetime, error: str | None
) -> bool:
    """One URL's attempt, the claim released, and the alert's state summed up; False (nothing
    written) when the claim was no longer this one's (it ran past its lease and another
    instance took over)."""
    with store.engine.begin() as conn:
        _lock(conn, due.alert_id)
        done = conn.execute(
            update(AlertDeliveryRow)
            .where(
                col(AlertDeliveryRow.alert_id) == due.alert_id,
                col(AlertDeliveryRow.url_key) == due.url_key,
                col(AlertDeliveryRow.claimed_until) == due.claimed_until,
            )
            .values(
                delivery=delivery,
                attempts=AlertDeliveryRow.attempts + 1,
                first_attempt_at=due.first_attempt_at or datetime.now(UTC),
                next_attempt_at=next_attempt_at,
                claimed_until=None,
                last_error=None if error is None else error[:300],
            )
            .returning(col(AlertDeliveryRow.alert_id))
        ).first()
        if done is not None:
            _sum_up(conn, due.alert_id, error)
    return done is not None


def _lock(conn: Connection, alert_id: str) -> None:
    """The alert's row locked (SQLite: the write lock) before its deliveries are read: two
    instances recording two URLs of one alert at once sum up one after the other."""
    conn.execute(
        update(AlertRow).where(col(AlertRow.id) == alert_id).values(attempts=AlertRow.attempts)
    )


def _sum_up(conn: Connection, alert_id: str, error: str | None = None) -> None:
    """The alert's `delivery` and `attempts` from its deliveries: pending while any URL's is,
    else failed if any URL's failed (or none is left: every URL removed), else delivered;
    attempts are the most any URL took."""
    rows = conn.execute(
        select(col(AlertDeliveryRow.delivery), col(AlertDeliveryRow.attempts)).where(
            col(AlertDeliveryRow.alert_id) == alert_id, col(AlertDeliveryRow.delivery) != DROPPED
        )
    ).all()
    states = {row[0] for row in rows}
    if "pending" in states:
        state = "pending"
    elif "failed" in states or not rows:
        state = "failed"
    else:
        state = "delivered"
    before = conn.execute(select(col(AlertRow.attempts)).where(col(AlertRow.id) == alert_id))
    attempts = max([row[1] for row in rows] + [before.scalar_one_or_none() or 0])
    values: dict[str, Any] = {"delivery": state, "attempts": attempts}
    if error is not None:
        values["last_error"] = error[:300]
    conn.execute(update(AlertRow).where(col(AlertRow.id) == alert_id).values(**values))


def give_up_unattended(
    store: Store, now: datetime, idle: float, own: Sequence[str] = (), limit: int = 100
) -> int:
    """Deliveries to a URL that no instance has attempted for `idle` seconds past their due
    time (the URL removed from every instance's settings: none will) are dropped, and their
    alerts summed up again (failed when no URL is left); pending alerts with no delivery at all
    (raised before this release) idle that long are failed. How many were given up. An
    instance with a URL attempts what is due within a round and reschedules it at most
    `Alerts.max_delay` ahead: what it is retrying is never that idle. Deliveries to `own` (the
    URLs of the asking instance, by `url_key`) are never given up: it attempts them, however
    long they waited for it (a restart after a downtime finds more due than a round claims)."""
    idle_since = now - timedelta(seconds=idle)
    free = or_(
        col(AlertDeliveryRow.claimed_until).is_(None), col(AlertDeliveryRow.claimed_until) < now
    )
    stale = and_(
        col(AlertDeliveryRow.delivery) == "pending",
        col(AlertDeliveryRow.next_attempt_at) < idle_since,
        free,
        col(AlertDeliveryRow.url_key).not_in(list(own)),
    )
    any_delivery = select(AlertDeliveryRow.alert_id).where(
        col(AlertDeliveryRow.alert_id) == AlertRow.id
    )
    free_alert = or_(col(AlertRow.claimed_until).is_(None), col(AlertRow.claimed_until) < now)
    stale_alert = and_(
        col(AlertRow.delivery) == "pending",
        col(AlertRow.next_attempt_at) < idle_since,
        free_alert,
        ~any_delivery.exists(),
    )
    why = f"no instance with its webhook URL attempted it for {idle:g} s"
    given_up = 0
    with store.engine.connect() as conn:  # read first: the usual answer is none, no lock taken
        found = conn.execute(
            select(col(AlertDeliveryRow.alert_id), col(AlertDeliveryRow.url_key))
            .where(stale)
            .limit(limit)
        ).all()
        old = conn.execute(select(col(AlertRow.id)).where(stale_alert).limit(limit)).all()
    for alert_id, key in found:
        with store.engine.begin() as conn:
            _lock(conn, alert_id)
            gone = conn.execute(
                update(AlertDeliveryRow)
                .where(
                    col(AlertDeliveryRow.alert_id) == alert_id,
                    col(AlertDeliveryRow.url_key) == key,
                    stale,
                )
                .values(delivery=DROPPED, claimed_until=None, last_error=why[:300])
                .returning(col(AlertDeliveryRow.url_shown))
            ).first()
            if gone is not None:
                given_up += 1
                _sum_up(conn, alert_id, f"{gone[0]}: {why}")
    if old:
        with store.engine.begin() as conn:
            done = conn.execute(
                update(AlertRow)
                .where(col(AlertRow.id).in_([row[0] for row in old]), stale_alert)
                .values(delivery="failed", claimed_until=None, last_error=why)
                .returning(col(AlertRow.id))
            ).all()
            given_up += len(done)
    return given_up


_PRUNED_AT_ONCE = 1000  # deliveries deleted a transaction (`prune_deliveries`)


def prune_deliveries(
    store: Store, before: datetime, most: int | None = None, batch: int = _PRUNED_AT_ONCE
) -> int:
    """The deliveries of alerts raised before `before` and settled (neither the alert nor the
    delivery pending) deleted, a transaction a `batch`, but one of each URL's, its newest (of
    the alert raised last; of those raised at one time, the greatest id's): the URL stays
    known to the store (`adopt`'s backlog from its first alert), and so does that alert
    (`prune_alerts` leaves an alert a delivery names). Kept by the greatest alert id alone (ids
    are random: no clock's), a URL in use kept one delivery of any age, and with it an alert
    listed for ever. Nothing reads the others once settled: each alert's state and attempts
    are its own row's. `most`: how many at most (the rest left to the next call). How many
    went."""
    # Each URL's newest row, kept: one NOT IN of the grouped rows (a clause a URL was as deep
    # as SQLite parses, "Expression tree is too large" from ~1,000 URLs on).
    delivery, alert = aliased(AlertDeliveryRow), aliased(AlertRow)
    last = (
        select(col(delivery.url_key).label("url_key"), func.max(alert.raised_at).label("at"))
        .join(alert, col(alert.id) == col(delivery.alert_id))
        .group_by(col(delivery.url_key))
        .subquery()
    )
    kept = (
        select(col(delivery.url_key), func.max(col(delivery.alert_id)))
        .join(alert, col(alert.id) == col(delivery.alert_id))
        .join(last, and_(last.c.url_key == delivery.url_key, last.c.at == alert.raised_at))
        .group_by(col(delivery.url_key))
    )
    settled = and_(
        col(AlertRow.raised_at) < before,
        col(AlertRow.delivery) != "pending",
        col(AlertDeliveryRow.delivery) != "pending",
        tuple_(col(AlertDeliveryRow.url_key), col(AlertDeliveryRow.alert_id)).not_in(kept),
    )
    pruned = 0
    while True:
        limit = batch if most is None else min(batch, most - pruned)
        if limit <= 0:
            return pruned
        with store.engine.begin() as conn:
            found = conn.execute(
                select(col(AlertDeliveryRow.alert_id), col(AlertDeliveryRow.url_key))
                .join(AlertRow, col(AlertRow.id) == col(AlertDeliveryRow.alert_id))
                .where(settled)
                .limit(limit)
            ).all()
            if found:
                conn.execute(
                    delete(AlertDeliveryRow).where(
                        col(AlertDeliveryRow.alert_id) == bindparam("a"),
                        col(AlertDeliveryRow.url_key) == bindparam("k"),
                        col(AlertDeliveryRow.delivery) != "pending",
                    ),
                    [{"a": alert_id, "k": key} for alert_id, key in found],
                )
        pruned += len(found)
        if len(found) < limit:
            return pruned


def _window_over(terms: Any, start: datetime, now: datetime, before: datetime) -> bool:
    """Whether an alert's window (from `start`) ended before `before`, by its budget's terms as
    stored (`terms`: duration, calendar-aligned, last_reset; None: the budget is deleted):
    each instance takes a budget's window from the clock and those terms (SPEC §6), so one
    that is not the current one is no instance's any more, and none raises an alert in it."""
    if terms is None:
        return True  # no budget: nothing is charged to it, no alert raised for it
    text, aligned, last_reset = terms
    try:
        duration = parse_duration(text)
    except ValueError:  # a text no longer valid: left alone
        return False
    start, last_reset = utc(start), utc(last_reset)
    if duration is None:  # never resets: the window a reset (`last_reset`) began
        current = ended = last_reset
    else:
        current = window_start(duration, anchor=last_reset, now=now, calendar_aligned=aligned)
        ended = min(window_end(duration, start=start), current)  # or reset before its end
    return start < current and ended <= before


def prune_alerts(
    store: Store,
    before: datetime,
    now: datetime,
    most: int | None = None,
    batch: int = _PRUNED_AT_ONCE,
) -> int:
    """The alerts raised before `before` whose window ended before it too (or whose budget is
    deleted), settled (not pending) and named by no delivery (each URL's kept one holds its
    alert: `adopt` knows the URL by it), deleted, a transaction a `batch`; `most` at most. An
    alert's row is what raises its threshold once in its window (the unique key): one of a
    window no instance is in any more is never raised again, and a window still current (a
    prepaid budget's, a year's) keeps its alerts however old. How many went."""
    unnamed = ~(
        select(AlertDeliveryRow.alert_id)
        .where(col(AlertDeliveryRow.alert_id) == col(AlertRow.id))
        .exists()
    )
    old = and_(col(AlertRow.raised_at) < before, col(AlertRow.delivery) != "pending", unnamed)
    with store.engine.connect() as conn:  # each budget with such alerts, and its terms
        budgets = conn.execute(
            sql_select(
                col(AlertRow.budget_id), func.min(col(AlertRow.window_start)),
                col(BudgetRow.id), col(BudgetRow.reset_duration),
                col(BudgetRow.calendar_aligned), col(BudgetRow.last_reset),
            )
            .outerjoin(BudgetRow, col(BudgetRow.id) == col(AlertRow.budget_id))
            .where(old)
            .group_by(
                col(AlertRow.budget_id), col(BudgetRow.id), col(BudgetRow.reset_duration),
                col(BudgetRow.calendar_aligned), col(BudgetRow.last_reset),
            )
        ).all()  # fmt: skip
    terms: dict[str, Any] = {}  # those with an alert to prune (its oldest window ended)
    for budget_id, oldest, found, duration, aligned, last_reset in budgets:
        stored = None if found is None else (duration, bool(aligned), last_reset)
        if _window_over(stored, oldest, now, before):
            terms[budget_id] = stored
    budget_ids = sorted(terms)
    pruned = 0
    for first in range(0, len(budget_ids), 500):
        of_these = and_(old, col(AlertRow.budget_id).in_(budget_ids[first : first + 500]))
        after: tuple[datetime, str] | None = None  # the last row read (a page's are not all
        while True:  # pruned: a window still current keeps its alerts, which come last)
            query = select(
                col(AlertRow.id), col(AlertRow.budget_id), col(AlertRow.window_start),
                col(AlertRow.raised_at),
            ).where(of_these)  # fmt: skip
            if after is not None:
                query = query.where(
                    or_(
                        col(AlertRow.raised_at) > after[0],
                        and_(col(AlertRow.raised_at) == after[0], col(AlertRow.id) > after[1]),
                    )
                )
            limit = batch if most is None else min(batch, most - pruned)
            with store.engine.begin() as conn:
                rows = conn.execute(
                    query.order_by(col(AlertRow.raised_at), col(AlertRow.id)).limit(limit)
                ).all()
                ids = [row[0] for row in rows if _window_over(terms[row[1]], row[2], now, before)]
                if ids:
                    gone = conn.execute(delete(AlertRow).where(col(AlertRow.id).in_(ids), old))
                    pruned += gone.rowcount
            if most is not None and pruned >= most:
                return pruned
            if len(rows) < limit:
                break
            after = rows[-1][3], rows[-1][0]
    return pruned


_MOST_ROWS = 2**63 - 1  # a BIGINT's largest, SQLite's and PostgreSQL's


def list_alerts(
    store: Store,
    owner_type: str | None = None,
    owner_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Recent alerts, newest first, as `GET /alerts` answers them; and how many there are. A
    `limit` or `offset` past what a database's integer holds is taken as that (the CLI's
    `alerts list --limit 100000000000000000000` on the store raised OverflowError)."""
    limit, offset = min(limit, _MOST_ROWS), min(offset, _MOST_ROWS)
    where = []
    if owner_type is not None:
        where.append(col(AlertRow.owner_type) == owner_type)
    owner_id = owner_name(owner_type, owner_id)
    if owner_id is not None:
        where.append(
            owned_by(col(AlertRow.owner_type), col(AlertRow.owner_id), owner_type, owner_id)
        )
    query = select(AlertRow).where(*where)
    # Newest first; raised at one reading of the clock, the later raised first (`claim_due`'s
    # order reversed: exhausted, then thresholds down), not by random id.
    newest = (col(AlertRow.raised_at).desc(), col(AlertRow.type), col(AlertRow.threshold).desc())
    query = query.order_by(*newest, col(AlertRow.id)).offset(offset)
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
        "raised_at": rfc3339(row.raised_at),
        "delivery": row.delivery,
        "attempts": row.attempts,
    }
