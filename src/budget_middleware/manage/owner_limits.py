"""Writing an owner's budgets and rate limit (SPEC §9): changing a limit never resets its usage.

In an update, each budget of the body is matched to one of the owner's budgets by `id`, or else
by `reset_duration` (as written, then as meant: `24h` is `1d`), and keeps its usage; when one
budget of the body and one of the owner's are left unmatched, both hard or both soft, they are
the same budget on new terms (a config file cannot name ids); budgets of the owner left out of
the list are removed; an update without `budgets` leaves them alone. Two budgets of one owner
never share a reset_duration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, case, event, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import object_session
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, col, delete, select

from budget_middleware.core.durations import Duration, parse_duration
from budget_middleware.core.money import limit_nanos
from budget_middleware.core.scopes import model_name_problem
from budget_middleware.core.times import FAR_FUTURE, utc
from budget_middleware.core.windows import Carry, CounterRegistry
from budget_middleware.exceptions import Conflict, InvalidRequest, NotFound
from budget_middleware.manage.schemas import BudgetIn, RateLimitIn, _Limits
from budget_middleware.manage.status import current_window
from budget_middleware.settings import BudgetSettings
from budget_middleware.store.database import Store
from budget_middleware.store.tables import (
    BudgetRow,
    CustomerRow,
    DeletedRow,
    ModelConfigRow,
    ProviderConfigRow,
    RateLimitRow,
    TeamRow,
    VirtualKeyRow,
    utcnow,
)

R = TypeVar("R")
logger = logging.getLogger("budget_middleware")
# Told of windows that new terms moved, once written (`carried`, `OwnerWriter`).
OnNewTerms = Callable[[list[Carry]], None]
CARRIED = "budget_middleware.carried"  # a session's key for `carried`
COMMITTED = "budget_middleware.committed"  # a session's: whom to tell once it has closed


def config_hash(entry: Any) -> str:
    """sha256 of an entry's canonical JSON (keys sorted, no spaces)."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Origin:
    """Where a write comes from: the admin API (`manual`) or the config file (with its hash)."""

    def __init__(self, source: str = "manual", entry_hash: str | None = None) -> None:
        self.source = source
        self.entry_hash = entry_hash

    def stamp(self, row: Any, *, created: bool) -> None:
        """Rows from the file carry its hash; a manual edit keeps the hash (and the source) of
        the file's entry, so the entry is applied again only when the file changes."""
        if created or self.source == "config":
            row.source = self.source
            row.config_hash = self.entry_hash
        row.updated_at = utcnow()

    def part(self, entry: Any) -> Origin:
        """The origin of a budget or rate limit written with its owner: from the file, it carries
        the hash of its own entry."""
        if self.source != "config":
            return self
        return Origin(self.source, config_hash(entry))


MANUAL = Origin()


def check_model_names(names: Iterable[str], param: str, where: str | None = None) -> None:
    """Refuse (422) a model name that is neither exact, `*` nor a glob: it would match nothing.
    `where` names the field in the message when it is deeper than `param`."""
    for name in names:
        problem = model_name_problem(name)
        if problem is not None:
            raise InvalidRequest(
                f"{where or param}: {problem}; a model name is an exact name, '*', or a glob "
                "such as 'claude-opus-*'",
                param=param,
            )


def owner_budgets(s: Session, owner_type: str, owner_id: str) -> list[BudgetRow]:
    rows = s.exec(
        select(BudgetRow).where(BudgetRow.owner_type == owner_type, BudgetRow.owner_id == owner_id)
    ).all()
    return sorted(rows, key=lambda b: (b.created_at, b.id))


def owner_rate_limit(s: Session, owner_type: str, owner_id: str) -> RateLimitRow | None:
    return s.exec(
        select(RateLimitRow).where(
            RateLimitRow.owner_type == owner_type, RateLimitRow.owner_id == owner_id
        )
    ).first()


def write_limits(
    s: Session,
    owner_type: str,
    owner_id: str,
    body: _Limits,
    *,
    calendar_aligned: bool,
    origin: Origin,
    realign: bool = False,
) -> None:
    """Apply the body's budgets and rate limit to the owner (in the caller's transaction).

    `calendar_aligned` is the owner's: budgets that do not say otherwise take it. With `realign`
    (the owner's setting changed and the body has no budgets) every budget of the owner takes it.
    """
    budgets = body.budget_list()
    if budgets is not None:
        write_budgets(s, owner_type, owner_id, budgets, calendar_aligned, origin)
    elif realign:
        for row in owner_budgets(s, owner_type, owner_id):
            _new_terms(row, "", row.reset_duration, calendar_aligned)
            row.calendar_aligned = calendar_aligned
            s.add(row)
    if body.touches_rate_limit():
        write_rate_limit(s, owner_type, owner_id, body.rate_limit, origin)


def check_budget_durations(owner_type: str, budgets: Sequence[BudgetIn]) -> None:
    """An owner holds at most one budget per `reset_duration` (409 otherwise), as meant: `24h`
    beside `1d` is the same duration twice (an update matches either by it)."""
    lengths = [_duration_length(b.reset_duration) for b in budgets]
    for length in lengths:
        if lengths.count(length) > 1:
            shown = " and ".join(
                sorted({b.reset_duration or "null (never resets)"
                        for b, n in zip(budgets, lengths, strict=True) if n == length})
            )  # fmt: skip
            raise Conflict(
                f"two budgets of one {owner_type} have reset_duration {shown}: an owner holds "
                "at most one budget per reset_duration (`24h` is `1d` spelt otherwise)",
                param="budgets",
            )


def write_budgets(
    s: Session,
    owner_type: str,
    owner_id: str,
    budgets: list[BudgetIn],
    calendar_aligned: bool,
    origin: Origin,
) -> None:
    existing = {row.id: row for row in owner_budgets(s, owner_type, owner_id)}
    budgets = [_completed(budget, existing.get(budget.id or "")) for budget in budgets]
    check_budget_durations(owner_type, budgets)
    unmatched = dict(existing)
    matched: list[tuple[BudgetIn, BudgetRow | None]] = []
    for budget in budgets:
        if budget.id is not None and budget.id not in existing:
            raise NotFound(f"budget {budget.id!r} is not a budget of this {owner_type}")
        if budget.id is not None and budget.id not in unmatched:  # the second made a new one
            raise Conflict(f"budget {budget.id!r} is given twice", param="budgets")
        row = unmatched.pop(budget.id, None) if budget.id is not None else None
        matched.append((budget, row))
    # By reset_duration as written, then as meant: `24h` is `1d` spelt otherwise, `7d` is `1w`,
    # `12M` is `1Y` (a config file respelling two durations at once, or one along with another
    # change, left more than one unmatched: they were removed and made anew at $0).
    for same in (_duration_text, _duration_length):
        for i, (budget, row) in enumerate(matched):
            if row is None and budget.id is None:
                wanted = same(budget.reset_duration)
                row = next(
                    (r for r in unmatched.values() if same(r.reset_duration) == wanted), None
                )
                if row is not None:
                    del unmatched[row.id]
                    matched[i] = (budget, row)
    new = [i for i, (budget, row) in enumerate(matched) if row is None and budget.id is None]
    if (
        len(new) == 1
        and len(unmatched) == 1
        and matched[new[0]][0].soft == next(iter(unmatched.values())).soft
    ):
        # One budget replaced by one on other terms (a config file's entry cannot name ids): the
        # same budget changed, so it keeps its usage rather than start again from 0.
        matched[new[0]] = (matched[new[0]][0], unmatched.popitem()[1])
    for row in unmatched.values():
        s.delete(row)
    gone = unmatched.values()
    ended_for_good(s, [(r.id, r.last_reset) for r in gone if r.reset_duration is None])
    s.flush()  # removed budgets free their reset_duration before the new ones are written
    for budget, row in matched:
        _write_budget(s, owner_type, owner_id, budget, row, calendar_aligned, origin)


# What a budget matched by its id keeps of its terms when the update leaves them out (its
# `calendar_aligned` left out is its owner's, as ever: an update may change the owner's).
_KEPT_TERMS = ("reset_duration", "soft", "alert_thresholds")  # and its limit: `_write_budget`


def _completed(budget: BudgetIn, row: BudgetRow | None) -> BudgetIn:
    """A budget matched by its `id`, with the terms the update leaves out as they are: an update
    of its limit alone (`{"id": ..., "max_limit": 20}`) made a daily budget one that never
    resets, and a soft one a hard one that refuses."""
    if row is None:
        return budget
    kept = {name: getattr(row, name) for name in _KEPT_TERMS if name not in budget.model_fields_set}
    return budget.model_copy(update=kept) if kept else budget


def _duration_text(duration: str | None) -> object:
    return duration


def _duration_length(duration: str | None) -> object:
    """What a duration means, however it is spelt: seconds for s..w, months for M/Q/Y."""
    if duration is None:
        return None
    try:
        parsed = Duration.parse(duration)
    except ValueError:  # a stored text no longer valid (an older release's): as written
        return duration
    return (parsed.unit in "MQY", parsed.approx_seconds)  # a month's seconds are nominal


def _write_budget(
    s: Session,
    owner_type: str,
    owner_id: str,
    budget: BudgetIn,
    row: BudgetRow | None,
    calendar_aligned: bool,
    origin: Origin,
) -> None:
    created = row is None
    if row is None:
        row = BudgetRow(owner_type=owner_type, owner_id=owner_id, max_limit_nanos=0)
    aligned = budget.calendar_aligned
    aligned = calendar_aligned if aligned is None else aligned
    if not created:
        _new_terms(row, "", budget.reset_duration, aligned)
    if budget.max_limit is not None:  # (None: matched by its id, and its limit kept)
        row.max_limit_nanos = limit_nanos(budget.max_limit)
    row.reset_duration = budget.reset_duration
    row.calendar_aligned = aligned
    row.soft = budget.soft
    row.alert_thresholds = budget.alert_thresholds
    origin.part(budget.model_dump(exclude={"id"})).stamp(row, created=created)
    s.add(row)


def _new_terms(row: Any, prefix: str, duration: str | None, aligned: bool) -> None:
    """A stored window whose terms change (its duration, its calendar alignment): changing a
    limit never resets its usage (SPEC §9). What the window holds now carries over to the window
    that holds now under the new terms, which starts no earlier than the stored one (so every
    reader, sweep and instance takes that usage as current): a limit may tighten by what was
    spent before that window began, never lift. Only a stored window that ended before the new
    one began holds nothing of it (one that ended since, not swept yet, was spent in it).
    Nor does it start earlier than the window the live counters count in now (the stored one,
    or one the old terms rolled it to and nothing has been written in yet): one that began
    before holds what the stored one held, and begins with the live one, so that the live
    counters' charges stay in it (the store takes a charge of a window later than its own as
    that window's beginning, and drops what it held).
    `prefix`: "" for a budget, "request_" or "token_" for a rate limit's windows."""
    old_duration = getattr(row, f"{prefix}reset_duration")
    old_aligned = bool(getattr(row, "calendar_aligned", False)) if not prefix else False
    if (old_duration, old_aligned) == (duration, aligned):
        return
    usage_column = "current_usage_nanos" if not prefix else f"{prefix}current_usage"
    stamp_column = f"{prefix}last_reset"
    stamp = getattr(row, stamp_column)
    anchor = utc(stamp)
    now = utcnow()
    start, end = current_window(duration, anchor, aligned, now)
    stored_end = current_window(old_duration, anchor, old_aligned, anchor)[1]  # the stored one's
    spent_before = stored_end is not None and stored_end <= start
    was, was_end = current_window(old_duration, anchor, old_aligned, now)  # the live window
    held = 0 if spent_before else getattr(row, usage_column)  # the new window's, once written
    added = 0  # the stored usage the live window's counters lack (it was not theirs)
    if start < was:
        added = held
        start, end = current_window(duration, was, aligned, now)
    if start > was or added or end != was_end:
        # The usage carries over to a window beginning later than the one live counters count
        # in now, or they take the stored usage, or the live window ends elsewhere (its key in
        # Redis expires with it: one that never ended was kept for good): told to them after the
        # commit (`carried`), a budget's and a rate limit's request and token windows alike.
        carried(row).append(
            Carry(
                kind=prefix.rstrip("_") or "budget",
                id=row.id,
                was=was.timestamp(),
                start=start.timestamp(),
                end=FAR_FUTURE if end is None else end.timestamp(),
                added=added,
                held=held,
                terms=(parse_duration(duration), aligned),
            )
        )
    if spent_before:
        # All of it was spent before the new window began: what was read goes, and only that.
        # Written as an expression, so that a charge another instance's flusher writes between
        # this read and the commit stays (more on this window, or a window it began).
        table = type(row)
        usage, read = getattr(table, usage_column), getattr(row, usage_column)
        left = case((usage > read, usage - read), else_=0)
        setattr(row, usage_column, case((getattr(table, stamp_column) == stamp, left), else_=usage))
    if start > anchor:
        setattr(row, f"{prefix}last_reset", start)


def ended_for_good(s: Session, budgets: list[tuple[str, datetime]]) -> None:
    """Budgets that never reset (id, last_reset), deleted or reset in this session: their
    window ends now, a `Carry` to no later window, told after the commit as new terms are
    (`carried`), so that its key in Redis (and the key's seed record) expires as an ended
    window's does (carry.lua). Only an instance that held the live counter let it expire
    (`refresh`, `reset_noted`): one deleted or reset after a restart, or by the CLI, kept its two
    keys in Redis for good."""
    if not budgets:
        return
    now = utcnow().timestamp()
    found: list[Carry] = s.info.setdefault(CARRIED, [])
    for id_, last_reset in budgets:
        start = utc(last_reset).timestamp()
        found.append(Carry("budget", id_, was=start, start=start, end=now, added=0, held=0))


def carried(row: Any) -> list[Carry]:
    """The windows new terms moved in the session of `row` (`_new_terms`), a budget's or a rate
    limit's (`Carry`); told to the live counters once the session commits
    (`OwnerWriter.on_new_terms`)."""
    session = object_session(row)
    assert session is not None
    found: list[Carry] = session.info.setdefault(CARRIED, [])
    return found


def write_rate_limit(
    s: Session, owner_type: str, owner_id: str, rate: RateLimitIn | None, origin: Origin
) -> None:
    row = owner_rate_limit(s, owner_type, owner_id)
    if rate is None:
        if row is not None:
            s.delete(row)
        return
    created = row is None
    if row is None:
        row = RateLimitRow(owner_type=owner_type, owner_id=owner_id)
    else:
        for kind in ("request", "token"):
            _new_terms(row, f"{kind}_", getattr(rate, f"{kind}_reset_duration"), False)
    for name, value in rate.model_dump().items():
        setattr(row, name, value)
    origin.part(rate.model_dump()).stamp(row, created=created)
    s.add(row)


def remember_deleted(s: Session, kind: str, entity_id: str, name: str, row: Any) -> None:
    """Record an entity being deleted through the API (`DeletedRow`): its name, and the hash
    of the config file entry it stands for, if any (the file leaves it deleted while that
    entry is unchanged)."""
    s.add(DeletedRow(kind=kind, entity_id=entity_id, name=name, config_hash=row.config_hash))


# The advisory lock of writes that check before they write (`one_writer_at_a_time`); the
# schema's upgrade holds another ("budg").
_CHECKED_WRITES = 0x62756477  # "budw"


def one_writer_at_a_time(s: Session) -> None:
    """Hold, until the session's transaction ends, the lock that makes a check of what is
    stored and the write that follows one step among the writers of every process: taken as
    the transaction's first statement (so that what it then reads is what the last writer
    committed). PostgreSQL: a transaction-level advisory lock; SQLite: its write lock."""
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CHECKED_WRITES})
    else:  # the write lock, before anything is read: a writer waits for the one before
        conn.execute(text("UPDATE bm_meta SET value = value WHERE key = 'schema_version'"))


def delete_limits(s: Session, owner_type: str, owner_ids: list[str]) -> None:
    """Remove the budgets and rate limits of these owners."""
    if not owner_ids:
        return
    owned = (col(BudgetRow.owner_type) == owner_type, col(BudgetRow.owner_id).in_(owner_ids))
    lifetime = select(BudgetRow.id, BudgetRow.last_reset).where(
        *owned, col(BudgetRow.reset_duration).is_(None)
    )
    ended_for_good(s, list(s.exec(lifetime)))
    s.exec(delete(BudgetRow).where(*owned))
    s.exec(
        delete(RateLimitRow).where(
            col(RateLimitRow.owner_type) == owner_type, col(RateLimitRow.owner_id).in_(owner_ids)
        )
    )


# Stores whose schema this process has created or checked. The management API may be used
# before any engine has started (a script on a fresh database): its first call creates the schema.
_schema_ready: weakref.WeakSet[Store] = weakref.WeakSet()
_schema_lock = threading.Lock()


def ensure_schema(store: Store) -> None:
    if store.within_transaction or store in _schema_ready:
        # (a store of `Store.one_transaction`: its own store's schema was made before; waiting
        # here for another thread making another store's could wait on this very transaction)
        return
    with _schema_lock:  # admin calls run in worker threads
        if store not in _schema_ready:
            store.create_schema()  # idempotent, and safe against other processes doing the same
            _schema_ready.add(store)


def _carry_in_redis(settings: BudgetSettings, carries: list[Carry]) -> None:
    """New terms written without an engine: carried in Redis from here (`carry.lua`), so that
    the instances sharing it move at their next admission, their usage carried over."""
    try:
        from budget_middleware.store.redis_counters import carry_now  # the redis extra

        carry_now(settings, carries)
    except Exception as exc:  # the terms stand; the instances take them within the cache TTL
        logger.warning("budget-middleware could not carry new terms in Redis: %s", exc)


WRITTEN_OWNERS = "budget_middleware.written_owners"  # session.info: ids a write changed
NEW_OWNERS = "budget_middleware.new_owners"  # rows it created: nobody vouched for them


def _owner_of(row: object) -> str | None:
    """The key, team or customer whose terms a written row is part of (None: no key's)."""
    if isinstance(row, VirtualKeyRow | TeamRow | CustomerRow):
        return row.id
    if isinstance(row, BudgetRow | RateLimitRow):
        return row.owner_id  # a key's, team's or customer's (or a config's: matches no key)
    if isinstance(row, ProviderConfigRow):
        return row.virtual_key_id
    if isinstance(row, ModelConfigRow) and row.scope == "virtual_key":
        return row.scope_id
    return None


def _note_owners(session: Session, _context: object) -> None:
    """After a flush (its rows still listed as new, changed, deleted): the owners it wrote.
    Limits deleted in bulk (`delete_limits`) go with their owner's row, which is noted."""
    found = session.info.setdefault(WRITTEN_OWNERS, set())
    for row in (*session.new, *session.dirty, *session.deleted):
        owner_id = _owner_of(row)
        if owner_id is not None:
            found.add(owner_id)
    created = session.info.setdefault(NEW_OWNERS, set())
    for row in session.new:  # a key, team, customer or config: the owner of its limits
        row_id = getattr(row, "id", None)
        if isinstance(row_id, str):
            created.add(row_id)


def _tell(forget: Callable[[str], None], owners: set[str]) -> None:
    for owner_id in owners:
        forget(owner_id)


def is_held(s: Session, table: Any, id_: str) -> bool:
    """Whether the row `id_` of `table` exists, locked for the session's transaction: a parent
    a child is written into, or one deleted with its children. The statement changes nothing
    (the id set to itself) but takes the row's lock (SQLite's write lock is the whole store's),
    so of a child's write and its parent's delete, one waits for the other to commit. Checked
    by a plain read, a child made as its parent was deleted was written naming it after the
    delete had looked for its children: left naming a parent that was gone, for ever."""
    (key,) = table.__table__.primary_key.columns  # `id`; a tag's and a provider's name
    held = s.execute(update(table).where(key == id_).values({key.name: id_}))
    return bool(cast(CursorResult[Any], held).rowcount)


class OwnerWriter:
    """What every writer of owners shares: the store, where writes come from, and checks."""

    def __init__(
        self,
        store: Store,
        settings: BudgetSettings,
        origin: Origin = MANUAL,
        *,
        on_change: Callable[[], None] | None = None,
        on_owner_change: Callable[[str], None] | None = None,
        reset_live: Callable[[str, str, float | None], float] | None = None,
        on_new_terms: OnNewTerms | None = None,
        live: CounterRegistry | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.origin = origin
        self.on_change = on_change  # the engine of this process: the next request sees a write
        # Told the id of each key, team and customer a write changed, once committed (the
        # engine's `forget`: it vouches for their keys no more as it last read them).
        self.on_owner_change = on_owner_change
        self.live = live  # the engine's live counters, which `from_memory` reads
        # The engine's live counter of a budget being reset: starts its window, says when.
        self.reset_live = reset_live
        # The engine's live counters, told of windows that new terms moved (`carried`);
        # with no engine (the CLI, a config file on the store), Redis's counters directly.
        if on_new_terms is None and settings.redis_url:
            on_new_terms = functools.partial(_carry_in_redis, settings)
        self.on_new_terms = on_new_terms

    def live_counters(
        self, from_memory: bool, given: CounterRegistry | None
    ) -> CounterRegistry | None:
        """The live counters a `from_memory` listing reads: those given, else this manager's
        engine's; None without `from_memory`. A manager of no engine (`BudgetManager(store,
        settings)`) has none to read: refused, where it read the store without a word."""
        if not from_memory:
            return None
        found = given if given is not None else self.live
        if found is None:
            raise InvalidRequest(
                "from_memory reads an engine's live counters, and this manager has no engine: "
                "use the engine's (get_engine(settings).manager) or pass counters=",
                param="from_memory",
            )
        return found

    def _session(self) -> _Writing:
        ensure_schema(self.store)
        session = self.store.session()
        if self.on_change is not None:
            # Told once the session has let go of its connection (`_Writing.__exit__`), not at
            # the commit: the engine reads the store then (`written_here`), and, told while the
            # writer still held its own, as many writers at once as the pool has connections
            # each waited for a second one: none was answered before the pool's 30 s timeout.
            notify = self.on_change
            event.listen(
                session, "after_commit", lambda done: done.info.update({COMMITTED: notify})
            )
        if self.on_owner_change is not None:
            forget = self.on_owner_change
            event.listen(session, "after_flush", _note_owners)

            def written(done: Session) -> None:
                # A key, team or customer created is in no key the engine vouches for: a new
                # key's budgets, say, cost it no pass over those it does (`BudgetEngine.forget`).
                owners = done.info.pop(WRITTEN_OWNERS, set()) - done.info.pop(NEW_OWNERS, set())
                if owners:  # once written for good (a config file's: once all of it is)
                    self.store.when_committed(functools.partial(_tell, forget, owners))

            event.listen(session, "after_commit", written)
        if self.on_new_terms is not None:
            tell = self.on_new_terms

            def moved(done: Session) -> None:
                carries = done.info.pop(CARRIED, None)
                if carries:  # once written for good (a config file's: once all of it is)
                    self.store.when_committed(functools.partial(tell, carries))

            event.listen(session, "after_commit", moved)
        return _Writing(session)

    @staticmethod
    def _commit(s: Session, what: str) -> None:  # (`_Writing` says which, when it cannot)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            raise Conflict(f"{what} conflicts with an existing one (duplicate name?)") from None

    @staticmethod
    def _get(s: Session, table: type[R], id_: str, what: str, held: bool = False) -> R:
        """The row `id_` of `table`, or NotFound; `held`: locked till the session commits
        (`is_held`), as a delete that looks for the row's children next needs it."""
        if not isinstance(id_, str):  # update_team({...}): the body given for the id
            raise InvalidRequest(f"a {what} id is a string, not {type(id_).__name__}", param="id")
        row = s.get(table, id_) if not held or is_held(s, table, id_) else None
        if row is None:
            raise NotFound(f"{what} {id_!r} not found")
        return row

    @staticmethod
    def _unique_name(s: Session, table: Any, name: str, what: str, own_id: str | None) -> None:
        found = s.exec(select(table).where(table.name == name)).first()
        if found is not None and found.id != own_id:
            raise Conflict(f"a {what} named {name!r} already exists", param="name")

    def _update_owner(self, s: Session, owner_type: str, row: Any, data: Any) -> None:
        """Apply an update's name, calendar_aligned, budgets and rate limit to an owner row."""
        name = getattr(data, "name", None)
        if name is not None and name != row.name:
            self._unique_name(s, type(row), name, owner_type.replace("_", " "), row.id)
            row.name = name
        aligned = data.calendar_aligned
        realign = aligned is not None and aligned != row.calendar_aligned
        if aligned is not None:
            row.calendar_aligned = aligned
        self.origin.stamp(row, created=False)
        s.add(row)
        owner_id = getattr(row, "id", None) or getattr(row, owner_type)
        write_limits(s, owner_type, owner_id, data, calendar_aligned=row.calendar_aligned,
                     origin=self.origin, realign=realign)  # fmt: skip


class _Writing:
    """A manager's session, as `with self._session() as s:` uses it: a write the store refuses
    as a duplicate wherever it is found (a flush before the commit: two creates of one name at
    once, a key's provider configs renamed into each other) is a `Conflict` (409), as one found
    at the commit is, not the store's raw `IntegrityError` (which the admin API answered 503,
    "the store cannot be reached", with a `Retry-After`)."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    def __enter__(self) -> Session:
        return self.session.__enter__()

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        self.session.__exit__(kind, error, trace)
        notify = self.session.info.pop(COMMITTED, None)
        if notify is not None:  # committed, and its connection back in the pool
            notify()
        if isinstance(error, StaleDataError):  # its row deleted as it wrote it (no lock held)
            raise NotFound("what this request changes was deleted meanwhile") from None
        if isinstance(error, IntegrityError):
            raise Conflict(
                "the write conflicts with what the store holds (a duplicate name, made at the "
                "same time?): read it again and retry"
            ) from None
