"""The durable store: SQLModel tables behind a synchronous SQLAlchemy engine.

Every call here is blocking and is run in a worker thread by the engine; none is on the hot path
of a cached key. Counters are written as deltas (`current = current + :delta`), never overwritten,
so any number of processes can share one store.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    literal,
    update,
)
from sqlalchemy import select as sql_select  # sqlmodel's takes at most four columns
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, col, select

from budget_middleware.core.durations import Duration, parse_duration, window_bounds
from budget_middleware.core.money import NANOS_PER_USD
from budget_middleware.core.records import Delta, UsageRecord
from budget_middleware.core.times import utc
from budget_middleware.core.usage import json_dumps
from budget_middleware.exceptions import ServiceUnavailable
from budget_middleware.store.tables import (
    SCHEMA_VERSION,
    BudgetRow,
    CustomerRow,
    FlushRow,
    MetaRow,
    ModelConfigRow,
    ProviderConfigRow,
    ProviderRow,
    RateLimitRow,
    RejectedRow,
    RouteRow,
    TagRow,
    TeamRow,
    UsageRecordRow,
    VirtualKeyRow,
    metadata,
    new_id,
)


class StoredBudget(NamedTuple):
    """A budget's counter as the store holds it (`Store.read_counters`): its usage, where its
    window began, the terms that window runs on, its alert thresholds (None: the default) and
    its limit (nano-dollars; None: not read)."""

    usage: int
    last_reset: datetime
    reset_duration: str | None
    calendar_aligned: bool
    alert_thresholds: list[float] | None = None
    limit: int | None = None


@dataclass(slots=True)
class OwnerLimits:
    budgets: list[BudgetRow] = field(default_factory=list)
    rate_limit: RateLimitRow | None = None


@dataclass(slots=True)
class KeyRecord:
    """A key's rows and everything its scopes need, read in one go."""

    key: VirtualKeyRow
    team: TeamRow | None
    customer: CustomerRow | None
    provider_configs: list[ProviderConfigRow]
    model_configs: list[ModelConfigRow]
    limits: dict[tuple[str, str], OwnerLimits]


@dataclass(slots=True)
class GlobalRecord:
    providers: list[ProviderRow]
    model_configs: list[ModelConfigRow]
    tags: list[TagRow]
    limits: dict[tuple[str, str], OwnerLimits]
    routes: list[RouteRow]


def in_memory(url: str) -> bool:
    """A SQLite store in this process's memory: it goes with the process."""
    base = url.split("?", 1)[0]
    return base.endswith(":memory:") or base.rstrip("/") in ("sqlite:", "sqlite+pysqlite:")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        memory = in_memory(url)
        connect: dict[str, Any] = {"check_same_thread": False}
        query = make_url(url).query
        if "timeout" not in query:  # the URL's own (`?timeout=5`) stands
            connect["timeout"] = 30
        busy_wait = _seconds(connect.get("timeout", query.get("timeout")), 5.0)  # sqlite3's
        engine = create_engine(
            url,
            connect_args=connect,
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            if not memory:
                _write_ahead_log(cursor, busy_wait)
            cursor.execute("PRAGMA synchronous=NORMAL")
            # 1 MiB of page cache a connection, not SQLite's 2 MiB: the pool may hold 15 of
            # them, the reads are index lookups, and the OS caches the file anyway.
            cursor.execute("PRAGMA cache_size=-1024")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _seconds(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _write_ahead_log(cursor: Any, busy_wait: float) -> None:
    """Put the file in WAL mode. SQLite answers "database is locked" at once, without its busy
    wait, to a connection asking this while another turns a new file to WAL: processes
    starting together on a new file (46 of 3,000 connections in a test) failed their start-up.
    Asked again until the connection's busy timeout has passed."""
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            busy = code is not None and code & 0xFF == sqlite3.SQLITE_BUSY  # BUSY_RECOVERY too
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class Store:
    within_transaction = False  # True for the stores `one_transaction` yields

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        from budget_middleware.store.migrations import upgrade

        upgrade(self.engine, metadata, SCHEMA_VERSION)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def one_transaction(self) -> Iterator[Store]:
        """A store whose sessions all write in one transaction, committed when the block ends
        and rolled back if it raises: a config file is applied whole or not at all. A session's
        own commit is a savepoint's (its rollback, after a conflict, undoes only its own)."""
        with self.engine.connect() as conn:
            conn.begin()  # begun before any session: theirs join it
            if conn.dialect.name == "sqlite":
                # The driver begins a transaction only before a write: a savepoint would start
                # one, and releasing it would commit. IMMEDIATE: the write lock now, not at the
                # first write, which would fail at once if another connection wrote meanwhile.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                # One at a time (workers starting together each apply the file): the next one
                # waits, then finds what the first wrote, instead of colliding with its rows.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_ONE_AT_A_TIME,))
            joined = _Joined(self, conn)
            try:
                yield joined
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        for done in joined.committed:
            done()

    def when_committed(self, done: Callable[[], None]) -> None:
        """Run `done` once what a session just committed is written for good: now (a
        `one_transaction` store: once its transaction commits)."""
        done()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def clock(self) -> float:
        """The store's own time (epoch seconds), one clock for every instance: a moment read
        after a write commits is later than the commit, one read before a read begins is earlier
        than what that read sees (`RedisCounters`' debts after an empty restart). SQLite's
        instances share a machine: its clock."""
        if self.engine.dialect.name == "sqlite":
            return time.time()
        with self.engine.connect() as conn:
            return float(
                conn.exec_driver_sql("SELECT extract(epoch FROM clock_timestamp())").scalar_one()
            )

    def dispose(self) -> None:
        self.engine.dispose()

    # -- reading configuration -----------------------------------------------------------

    def load_key(self, key_hash: str) -> KeyRecord | None:
        with self.session() as s:
            key = s.exec(select(VirtualKeyRow).where(VirtualKeyRow.key_hash == key_hash)).first()
            return None if key is None else self._key_record(s, key)

    def load_key_by_id(self, key_id: str) -> KeyRecord | None:
        with self.session() as s:
            key = s.get(VirtualKeyRow, key_id)
            return None if key is None else self._key_record(s, key)

    def _key_record(self, s: Session, key: VirtualKeyRow) -> KeyRecord:
        team = s.get(TeamRow, key.team_id) if key.team_id else None
        customer_id = key.customer_id or (team.customer_id if team else None)
        customer = s.get(CustomerRow, customer_id) if customer_id else None
        policies = list(
            s.exec(
                select(ProviderConfigRow).where(col(ProviderConfigRow.virtual_key_id) == key.id)
            ).all()
        )
        rules = list(
            s.exec(
                select(ModelConfigRow).where(
                    col(ModelConfigRow.scope) == "virtual_key",
                    col(ModelConfigRow.scope_id) == key.id,
                )
            ).all()
        )
        owners = [("virtual_key", key.id)]
        owners += [("team", team.id)] if team else []
        owners += [("customer", customer.id)] if customer else []
        owners += [("provider_config", p.id) for p in policies]
        owners += [("model_config", r.id) for r in rules]
        return KeyRecord(key, team, customer, policies, rules, self._limits(s, owners))

    def load_globals(self) -> GlobalRecord:
        with self.session() as s:
            providers = list(s.exec(select(ProviderRow)).all())
            rules = list(
                s.exec(select(ModelConfigRow).where(col(ModelConfigRow.scope) == "global")).all()
            )
            tags = list(s.exec(select(TagRow)).all())
            routes = list(s.exec(select(RouteRow)).all())
            owners = [("provider", p.provider) for p in providers]
            owners += [("model_config", r.id) for r in rules]
            owners += [("tag", t.tag) for t in tags]
            return GlobalRecord(providers, rules, tags, self._limits(s, owners), routes)

    def _limits(
        self, s: Session, owners: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], OwnerLimits]:
        found: dict[tuple[str, str], OwnerLimits] = {o: OwnerLimits() for o in owners}
        if not owners:
            return found
        ids = sorted({owner_id for _, owner_id in owners})
        for chunk in _chunks(ids, 500):
            for budget in s.exec(select(BudgetRow).where(col(BudgetRow.owner_id).in_(chunk))):
                target = found.get((budget.owner_type, budget.owner_id))
                if target is not None:
                    target.budgets.append(budget)
            for rate in s.exec(select(RateLimitRow).where(col(RateLimitRow.owner_id).in_(chunk))):
                target = found.get((rate.owner_type, rate.owner_id))
                if target is not None:
                    target.rate_limit = rate
        for limits in found.values():
            limits.budgets.sort(key=lambda b: (b.created_at, b.id))
        return found

    # -- counters ------------------------------------------------------------------------

    def read_counters(
        self, budget_ids: Iterable[str], rate_limit_ids: Iterable[str]
    ) -> tuple[dict[str, StoredBudget], dict[str, RateLimitRow]]:
        budgets: dict[str, StoredBudget] = {}
        rates: dict[str, RateLimitRow] = {}
        with self.session() as s:
            for chunk in _chunks(sorted(budget_ids), 500):
                rows = s.execute(
                    sql_select(
                        col(BudgetRow.id),
                        col(BudgetRow.current_usage_nanos),
                        col(BudgetRow.last_reset),
                        col(BudgetRow.reset_duration),
                        col(BudgetRow.calendar_aligned),
                        col(BudgetRow.alert_thresholds),
                        col(BudgetRow.max_limit_nanos),
                    ).where(col(BudgetRow.id).in_(chunk))
                )
                for id_, usage, last_reset, duration, aligned, thresholds, limit in rows:
                    budgets[id_] = StoredBudget(
                        usage=usage,
                        last_reset=utc(last_reset),
                        reset_duration=duration,
                        calendar_aligned=bool(aligned),
                        alert_thresholds=thresholds,
                        limit=limit,
                    )
            for chunk in _chunks(sorted(rate_limit_ids), 500):
                for rate in s.exec(select(RateLimitRow).where(col(RateLimitRow.id).in_(chunk))):
                    rates[rate.id] = rate
        return budgets, rates

    def apply_flush(
        self, batch_id: str, deltas: Sequence[Delta], records: Sequence[UsageRecord]
    ) -> None:
        """Write one batch in one transaction; a batch already applied is skipped."""
        try:
            with self.engine.begin() as conn:
                # The batch's mark first: if it is there already, the batch was applied.
                marked = conn.exec_driver_sql(
                    _MARK_SQL[conn.dialect.name], (batch_id, _utcnow_for(conn))
                )
                if marked.rowcount == 0:
                    return
                _apply_deltas(conn, deltas)
                if records:
                    _insert_records(conn, records, batch_id)
        except SQLAlchemyError as exc:
            raise ServiceUnavailable(f"store write failed: {type(exc).__name__}") from exc

    def sweep_windows(self, now: datetime) -> int:
        """Expired windows reset in the store, as SPEC §6 has them (on first touch, and by
        this sweep): a counter with usage whose window has ended starts the current window with
        none. Each row is updated only if it is still as read (a charge written meanwhile
        started the window itself). Returns how many were reset."""
        swept = 0
        # (table, id, kind, duration, calendar-aligned, last_reset as stored): columns only, no
        # ORM objects, for a sweep that reads every counter with usage once a minute
        rows: list[tuple[Any, str, str, str, bool, Any]] = []
        with self.engine.connect() as conn:
            budgets = select(
                BudgetRow.id, BudgetRow.reset_duration, BudgetRow.calendar_aligned,
                BudgetRow.last_reset,
            ).where(
                col(BudgetRow.reset_duration).is_not(None), col(BudgetRow.current_usage_nanos) != 0
            )  # fmt: skip
            for id_, duration, aligned, last in conn.execute(budgets):
                rows.append((BudgetRow, id_, "budget", duration, aligned, last))
            for kind in ("request", "token"):
                _, usage, reset = _COUNTER_COLUMNS[kind]
                duration_column = getattr(RateLimitRow, f"{kind}_reset_duration")
                rates = select(
                    RateLimitRow.id, duration_column, getattr(RateLimitRow, reset)
                ).where(col(duration_column).is_not(None), getattr(RateLimitRow, usage) != 0)
                for id_, duration, last in conn.execute(rates):
                    rows.append((RateLimitRow, id_, kind, duration, False, last))
        due: list[tuple[Any, str, str, Any, datetime]] = []
        for table, id_, kind, duration, aligned, stored in rows:
            length = parse_duration(duration)  # never None: the query leaves those out
            assert length is not None
            start, _ = window_bounds(length, anchor=utc(stored), now=now, calendar_aligned=aligned)
            if start > utc(stored):
                due.append((table, id_, kind, stored, start))
        # In id order, a few hundred rows a transaction: few commits when many windows end at
        # once (midnight, for calendar-aligned daily budgets). Should one meet a flush's locks
        # in a deadlock, the database ends one of the two: the flush is tried again next round,
        # and these rows are swept next time.
        due.sort(key=lambda row: (row[2], row[1]))
        for first in range(0, len(due), _SWEPT_PER_TRANSACTION):
            chunk = due[first : first + _SWEPT_PER_TRANSACTION]
            try:
                with self.engine.begin() as conn:
                    for kind in ("budget", "request", "token"):
                        params = [
                            {"row": id_, "read": stored, "start": start}
                            for table, id_, k, stored, start in chunk
                            if k == kind
                        ]
                        if params:
                            done = conn.execute(_sweep_update(kind), params)
                            swept += done.rowcount
            except SQLAlchemyError:
                if first == 0:
                    raise
                break  # what is left is swept next time
        return swept

    def writable(self) -> bool:
        """Whether the store takes writes now: a flush mark written and rolled back (False when
        it is read-only; raises when it cannot be reached)."""
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                conn.exec_driver_sql(
                    _MARK_SQL[conn.dialect.name], ("probe" + new_id()[:27], _utcnow_for(conn))
                )
            except SQLAlchemyError:
                return False
            finally:
                transaction.rollback()
        return True

    def batches_applied(self, batch_ids: Iterable[str]) -> set[str]:
        """Which of these batches the store has applied."""
        applied: set[str] = set()
        with self.session() as s:
            for chunk in _chunks(sorted(batch_ids), 500):
                rows = s.execute(
                    sql_select(col(FlushRow.batch_id)).where(col(FlushRow.batch_id).in_(chunk))
                )
                applied.update(str(batch_id) for (batch_id,) in rows)
        return applied

    def batch_applied(self, batch_id: str) -> bool:
        with self.session() as s:
            return s.get(FlushRow, batch_id) is not None

    def save_rejects(self, rejects: Sequence[tuple[str, str, str, float]]) -> None:
        """Set aside what the store refused: (kind, JSON payload, error, epoch seconds)."""
        with self.session() as s:
            for kind, payload, error, at in rejects:
                s.add(
                    RejectedRow(
                        kind=kind,
                        payload=payload,
                        error=error[:300],
                        created_at=datetime.fromtimestamp(at, UTC),
                    )
                )
            s.commit()

    def list_rejects(self, limit: int, offset: int) -> tuple[list[RejectedRow], int]:
        """Set-aside records and counters, newest first, and how many there are."""
        with self.session() as s:
            total = s.exec(select(func.count()).select_from(RejectedRow)).one()
            rows = s.exec(
                select(RejectedRow).order_by(col(RejectedRow.id).desc()).offset(offset).limit(limit)
            ).all()
            return list(rows), int(total)

    def prune_flushes(self, before: datetime) -> int:
        """Forget the ids of batches applied before `before`; how many went."""
        with self.engine.begin() as conn:
            gone = conn.execute(delete(FlushRow).where(col(FlushRow.applied_at) < before))
            return int(gone.rowcount or 0)

    def schema_version(self) -> int | None:
        with self.session() as s:
            row = s.get(MetaRow, "schema_version")
            return int(row.value) if row else None


# kind -> (table, usage column, last-reset column)
_COUNTER_COLUMNS = {
    "budget": (BudgetRow.__tablename__, "current_usage_nanos", "last_reset"),
    "request": (RateLimitRow.__tablename__, "request_current_usage", "request_last_reset"),
    "token": (RateLimitRow.__tablename__, "token_current_usage", "token_last_reset"),
}
_DELTAS_PER_UPDATE = 2000  # x 6 parameters: under SQLite's 32,766


def _stored_terms(kind: str) -> str:
    """A row's terms as SQL text, as `_terms_text` writes a delta's."""
    table = _COUNTER_COLUMNS[kind][0]
    if kind == "budget":
        return (
            f"COALESCE({table}.reset_duration, '-') || "
            f"CASE WHEN {table}.calendar_aligned THEN '@' ELSE '' END"
        )
    return f"COALESCE({table}.{kind}_reset_duration, '-')"


def _terms_text(terms: tuple[Duration | None, bool] | None) -> str | None:
    """`Delta.terms` as the store's text: the duration as stored (`1d`; `-`: never resets), `@`
    after it when calendar-aligned; None: not known."""
    if terms is None:
        return None
    return _terms_key(*terms)


def _terms_key(duration: Duration | str | None, aligned: bool) -> str:
    """Terms as `_stored_terms` writes a row's: a duration as stored, or `-`; `@` if aligned."""
    return f"{'-' if duration is None else duration}{'@' if aligned else ''}"


@functools.cache
def _delta_sql(dialect: str, kind: str, rows: int) -> str:
    """Add deltas to the windows they belong to, in one statement: a stored window that is older
    is started anew; a newer one (reset meanwhile) does not take charges of a window that has
    ended. A row whose terms are not those the delta was counted on (new terms written by
    another process, which this one has not read yet) is left to `_by_stored_terms`: the
    stored window older than the delta's may be one the stored terms have not ended (a minute
    made a day). A per-row executemany hands the GIL back and forth once a row (see
    `_values_sql`). SQLite gets the rows as bound VALUES, PostgreSQL as one JSON parameter
    (psycopg would parse the placeholders of a long statement in Python on every call)."""
    table, usage, reset = _COUNTER_COLUMNS[kind]
    if dialect == "sqlite":
        source = f"d(id, s, e, p, amount, t) AS (VALUES {', '.join(['(?, ?, ?, ?, ?, ?)'] * rows)})"
    else:
        source = (
            "d AS (SELECT * FROM json_to_recordset(%s::json) "
            "AS x(id text, s timestamptz, e timestamptz, p timestamptz, amount bigint, t text))"
        )
    ended = f"{table}.{reset} < d.s AND {table}.{reset} <= d.p"  # `Delta.ended_from`
    return (
        f"WITH {source} UPDATE {table} SET "
        f"{usage} = CASE WHEN {ended} THEN d.amount ELSE {table}.{usage} + d.amount END, "
        f"{reset} = CASE WHEN {ended} THEN d.s ELSE {table}.{reset} END "
        f"FROM d WHERE {table}.id = d.id AND {table}.{reset} < d.e "
        f"AND (d.t IS NULL OR {_stored_terms(kind)} = d.t)"
    )


def _by_stored_terms(conn: Any, kind: str, deltas: Sequence[Delta]) -> None:
    """The deltas `_delta_sql` left because their row's terms are not those they were counted
    on: new terms written by another process, which this one counts on once its cache reloads
    them (SPEC §11). Each goes to the stored window if the stored terms have not ended it where
    the delta's window begins, else it begins their window that holds that moment. On the
    old terms' rule, a delta of the minute after the one a day was made of (a request admitted
    on the old terms and settled after the minute) was written as a window begun anew, and the
    day dropped what it held ($0.0003 of $0.0006). Read, in the flush's transaction, only when
    the statement updated fewer rows than it had deltas (this, a reset since, a limit deleted)."""
    table = BudgetRow if kind == "budget" else RateLimitRow
    _, usage_name, reset_name = _COUNTER_COLUMNS[kind]
    usage, reset = getattr(table, usage_name), getattr(table, reset_name)
    duration_column = getattr(
        table, "reset_duration" if kind == "budget" else f"{kind}_reset_duration"
    )
    aligned_column = col(BudgetRow.calendar_aligned) if kind == "budget" else literal(False)
    ids = sorted({d.id for d in deltas if d.terms is not None})
    stored: dict[str, tuple[datetime, str | None, bool]] = {}
    for chunk in _chunks(ids, 500):
        query = sql_select(col(table.id), reset, duration_column, aligned_column).where(
            col(table.id).in_(chunk)
        )
        locked = query.order_by(col(table.id)).with_for_update()  # (PostgreSQL; SQLite's is held)
        for id_, last_reset, duration, aligned in conn.execute(locked):
            stored[id_] = (utc(last_reset), duration, bool(aligned))
    added: list[dict[str, Any]] = []
    begun: list[dict[str, Any]] = []
    for d in deltas:
        row = stored.get(d.id)
        if row is None or d.terms is None:
            continue  # a limit deleted; terms not known (the statement's)
        last_reset, text, aligned = row
        if _terms_key(text, aligned) == _terms_text(d.terms):
            continue  # the same terms: the statement's
        if last_reset >= d.window_end:
            continue  # a reset since: its window holds none of it (as the statement's rule)
        try:
            duration = parse_duration(text)
        except ValueError:  # (a text no longer valid: nothing reads it as a window)
            duration = None
        if duration is not None:
            bounds = window_bounds(
                duration, anchor=last_reset, now=last_reset, calendar_aligned=aligned
            )
            if bounds[1] <= d.window_start:
                start = window_bounds(
                    duration, anchor=last_reset, now=d.window_start, calendar_aligned=aligned
                )[0]
                begun.append({"row": d.id, "amount": d.amount, "start": start})
                continue
        added.append({"row": d.id, "amount": d.amount})
    where = col(table.id) == bindparam("row")
    if added:
        more = update(table).where(where).values({usage_name: usage + bindparam("amount")})
        conn.execute(more, added)
    if begun:
        conn.execute(
            update(table)
            .where(where)
            .values({usage_name: bindparam("amount"), reset_name: bindparam("start")}),
            begun,
        )


def _apply_deltas(conn: Any, deltas: Sequence[Delta]) -> None:
    """Every delta of a batch, a few statements in all. One counter can have several deltas in
    a batch (a window that ended, then the next): they go in rounds, oldest first, so that no
    statement updates a row twice."""
    dialect = conn.dialect.name
    rounds: list[dict[tuple[str, str], Delta]] = []
    for d in deltas:
        key = (d.kind, d.id)
        for batch in rounds:
            if key not in batch:
                batch[key] = d
                break
        else:
            rounds.append({key: d})
    names = {terms: _terms_text(terms) for terms in {d.terms for d in deltas}}  # once each
    for batch in rounds:
        by_kind: dict[str, list[Delta]] = {}
        for d in batch.values():
            by_kind.setdefault(d.kind, []).append(d)
        for kind, rows in by_kind.items():
            if dialect == "postgresql":
                payload = json_dumps(
                    [
                        {
                            "id": d.id,
                            "s": d.window_start.isoformat(),
                            "e": d.window_end.isoformat(),
                            "p": (d.ended_from or d.window_start).isoformat(),
                            "amount": d.amount,
                            "t": names[d.terms],
                        }
                        for d in rows
                    ]
                )
                done = conn.exec_driver_sql(_delta_sql(dialect, kind, 0), (payload,))
                if done.rowcount < len(rows):
                    _by_stored_terms(conn, kind, rows)
                continue
            texts: dict[datetime, str] = {}  # windows often share their bounds: format once
            for start in range(0, len(rows), _DELTAS_PER_UPDATE):
                chunk = rows[start : start + _DELTAS_PER_UPDATE]
                params: list[Any] = []
                for d in chunk:
                    begin = texts.get(d.window_start)
                    if begin is None:
                        begin = texts[d.window_start] = _sqlite_time(d.window_start)
                    end = texts.get(d.window_end)
                    if end is None:
                        end = texts[d.window_end] = _sqlite_time(d.window_end)
                    before = d.ended_from or d.window_start
                    ended = texts.get(before)
                    if ended is None:
                        ended = texts[before] = _sqlite_time(before)
                    params += (d.id, begin, end, ended, d.amount, names[d.terms])
                done = conn.exec_driver_sql(_delta_sql(dialect, kind, len(chunk)), tuple(params))
                if done.rowcount < len(chunk):
                    _by_stored_terms(conn, kind, chunk)


def _sqlite_time(moment: datetime) -> str:
    """A datetime as SQLAlchemy stores it in SQLite (UTC, no zone): text that compares in order."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


_RECORD_COLUMNS = [c.name for c in UsageRecordRow.__table__.columns if c.name != "id"]  # type: ignore[attr-defined]
_COST_AT = _RECORD_COLUMNS.index("cost")
if _RECORD_COLUMNS[:_COST_AT] + _RECORD_COLUMNS[_COST_AT + 1 :] != list(UsageRecord._fields):
    raise RuntimeError("UsageRecord fields and the bm_usage_records columns disagree")


# Rows per INSERT (x 20 columns). SQLite keeps each statement prepared per connection, ~0.9 MB
# for 256 rows (2.9 MB for 1000): statements of 256 rows and the powers of two below hold ~2.5 MB
# in all, and a batch of 4,500 records still takes only 18 statements.
_ROWS_PER_INSERT = 256


@functools.cache
def _values_sql(dialect: str, rows: int) -> str:
    """One INSERT of `rows` rows. The driver binds every value in one call and the database
    inserts them in one statement: a per-row executemany hands the GIL back and forth once a
    row, and under load each hand-back waits for the event loop's switch interval (measured:
    ~40 µs a record and 50-90 ms p99 spikes)."""
    mark = "?" if dialect == "sqlite" else "%s"
    row = f"({', '.join([mark] * len(_RECORD_COLUMNS))})"
    return (
        f"INSERT INTO {UsageRecordRow.__tablename__} ({', '.join(_RECORD_COLUMNS)}) "
        f"VALUES {', '.join([row] * rows)}"
    )


class _UtcText:
    """Epoch seconds as the text SQLAlchemy stores for a UTC datetime (with `+00` for
    PostgreSQL), the date and time formatted once per second: a batch's records mostly share it."""

    __slots__ = ("prefix", "second", "suffix")

    def __init__(self, suffix: str = "") -> None:
        self.second = -1
        self.prefix = ""
        self.suffix = suffix

    def __call__(self, ts: float) -> str:
        second = int(ts)
        micros = round((ts - second) * 1_000_000)  # as datetime.fromtimestamp rounds
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.prefix}.{micros:06d}{self.suffix}"


def _insert_records(conn: Any, records: Sequence[UsageRecord], batch_id: str) -> None:
    """The batch's records; one without an id takes its batch's (random) id and its place in
    the batch, which stay the same when a failed batch is written again."""
    dialect = conn.dialect.name
    prefix = batch_id[:16]
    # UsageRecord's order, `cost` after `cost_nanos`; datetimes and JSON as text, as SQLAlchemy
    # would store them (psycopg sends text untyped: PostgreSQL casts it to the column's type);
    # flags as 1 / 0, stored the same (sqlite3 binds a bool, not an exact int, only after an
    # adapter lookup that fails and formats its error: ~3.3k instructions a flag, callgrind)
    when = _UtcText("" if dialect == "sqlite" else "+00")
    dumps = json_dumps
    values: list[Any] = []
    extend = values.extend
    for i, r in enumerate(records):
        extend(
            (
                r.request_id or f"{prefix}{i:016x}",
                when(r.created_at),
                r.virtual_key_id,
                r.team_id,
                r.customer_id,
                r.provider,
                r.model,
                dumps(r.tags),
                r.input_tokens,
                r.output_tokens,
                r.cached_tokens,
                r.cost_nanos,
                r.cost_nanos / NANOS_PER_USD,  # the `cost` column, in USD
                r.cost_source,
                r.status,
                1 if r.streamed else 0,  # flags as ints (see above)
                r.outcome,
                1 if r.estimated else 0,
                r.note,
                r.duration_ms,
                r.direction,
                r.would_refuse,
            )
        )
    if dialect == "postgresql":
        _copy_records(conn, values)
        return
    width = len(_RECORD_COLUMNS)
    start = 0
    for rows in _statement_rows(len(records)):
        end = start + rows * width
        conn.exec_driver_sql(_values_sql(dialect, rows), tuple(values[start:end]))
        start = end


def _statement_rows(total: int) -> Iterator[int]:
    """Rows per INSERT: whole statements of _ROWS_PER_INSERT, the rest in powers of two. So at
    most 9 statements exist, each kept once (here, and prepared in SQLite's statement cache of
    each connection); one per remainder, as before, grew both with every new batch size."""
    while total >= _ROWS_PER_INSERT:
        yield _ROWS_PER_INSERT
        total -= _ROWS_PER_INSERT
    size = _ROWS_PER_INSERT // 2
    while total:
        if total >= size:
            yield size
            total -= size
        size //= 2


_MARK_SQL = {
    dialect: f"INSERT INTO {FlushRow.__tablename__} (batch_id, applied_at) "
    f"VALUES ({mark}, {mark}) ON CONFLICT (batch_id) DO NOTHING"
    for dialect, mark in (("sqlite", "?"), ("postgresql", "%s"))
}


def _utcnow_for(conn: Any) -> Any:
    now = datetime.now(UTC)
    return _sqlite_time(now) if conn.dialect.name == "sqlite" else now


_COPY_SQL = f"COPY {UsageRecordRow.__tablename__} ({', '.join(_RECORD_COLUMNS)}) FROM STDIN"


def _copy_records(conn: Any, values: list[Any]) -> None:
    """PostgreSQL's bulk load, in the flush's transaction (psycopg parses the placeholders of a
    long INSERT in Python on every call: ~90 µs a record; COPY takes ~2)."""
    width = len(_RECORD_COLUMNS)
    cursor = conn.connection.cursor()  # the DB-API cursor of this connection: same transaction
    try:
        with cursor.copy(_COPY_SQL) as copy:
            for start in range(0, len(values), width):
                copy.write_row(values[start : start + width])
    finally:
        cursor.close()


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_SWEPT_PER_TRANSACTION = 200  # rows of `Store.sweep_windows` committed at once


@functools.cache
def _sweep_update(kind: str) -> Any:
    """A swept counter's window started anew, if the row is still as the sweep read it."""
    table = BudgetRow if kind == "budget" else RateLimitRow
    _, usage, reset = _COUNTER_COLUMNS[kind]
    return (
        update(table)
        .where(col(table.id) == bindparam("row"), getattr(table, reset) == bindparam("read"))
        .values({usage: 0, reset: bindparam("start")})
    )


_ONE_AT_A_TIME = 0x62756467  # the advisory lock of `Store.one_transaction` ("budg")


class _Joined(Store):
    """The store of `Store.one_transaction`: its sessions join one connection's transaction."""

    within_transaction = True

    def __init__(self, store: Store, conn: Connection) -> None:
        self.url = store.url
        self.engine = store.engine
        self.conn = conn
        self.committed: list[Callable[[], None]] = []  # run once the transaction commits

    def when_committed(self, done: Callable[[], None]) -> None:
        self.committed.append(done)

    def create_schema(self) -> None:
        """Made by the store itself before (a schema change would end the transaction)."""

    def session(self) -> Session:
        return Session(
            bind=self.conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
