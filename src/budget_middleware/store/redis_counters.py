"""Counters shared by every instance through Redis (SPEC §11).

Admission is one Lua script call across every applicable counter, all or nothing, with the same
rules as `admission.admit` (a route's targets go in the same call: the first that passes is
admitted, `admission.admit_first`'s rule); settlement is one call too. Keys, under a prefix
(default `bm:`):

- `w:{kind}:{id}:{window start ms}`: a window's value (budget spend in nano-dollars, a request
  or token count). The client computes the window from its `WindowCounter`, so every instance
  agrees on the key; the key expires by itself some time after the window ends.
- `sv:w:{kind}:{id}:{window start ms}`: beside a window key a seed set, when the seed read the
  store (the store's clock) and which instance made it (`_leave_out_seeded`).
- `c:{rate limit id}`: a ZSET of request ids holding a concurrency slot, scored by expiry.
- `rs:{budget id}`, `rs:request:{rate limit id}`, `rs:token:{rate limit id}`: where a window
  began anew elsewhere (a budget's reset, new terms: `mark_key`); every admission and
  settlement reads the marks of its windows, and moves there first.
- `rz:{budget id}` / `rh:{budget id}`: the reservations in flight on a budget, a ZSET of
  request id -> expiry and a HASH of request id -> amount. The script removes expired entries
  and sums the live ones on every admission (no running total that could drift).

Slots and reservations expire `slot_ttl_seconds` after they were taken or last refreshed; a
heartbeat refreshes those of this instance's requests in flight every flush interval (at least
three times a slot TTL), so a SIGKILLed instance's holds disappear by themselves.

A window key that does not exist (a new window, an emptied Redis) is seeded from the store with
SET NX, so that concurrent instances never add the store's value twice: the admission script
reports the missing keys, the client seeds them and calls again (two round trips, once per
window). Every charge is also kept in this process's ledger; the flusher writes it to the store,
which stays the durable record.

When Redis cannot be reached, `BUDGET_FAIL_OPEN` decides: closed raises `ServiceUnavailable`
(503), open admits with the in-process `admission.admit` on the local counters (the charge still
reaches the store through the ledger). After a failure Redis is left alone for a short back-off.
What was charged without Redis (requests admitted locally, settlements it did not take) is owed
to it: when it answers again, the amounts are added to the window keys it kept
(`reconcile.lua`) before the next admission, so a Redis that kept its data does not forget them.
What an engine still owes as it stops is left on disk, for the next process on the same store and
Redis to add (`_leave_debts`, `_pay_left`).

Each instance's mark (`i:{instance}`) holds the number of the heartbeat that wrote it; its
admissions and heartbeats send the last number Redis answered (`_beat_floor`). A mark with an
older one is a Redis back from an older snapshot: that call drops every key of the prefix
(`lua/rolled_back.lua`), an empty restart, recovered from as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import anyio.to_thread
from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budget_middleware.core import admission
from budget_middleware.core.admission import FirstAdmitted, Refusal, Ticket
from budget_middleware.core.durations import parse_duration
from budget_middleware.core.money import NANOS_PER_USD
from budget_middleware.core.records import Delta
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.times import FAR_FUTURE, utc
from budget_middleware.core.windows import Carry, CounterRegistry, WindowCounter, ensure_current
from budget_middleware.exceptions import ServiceUnavailable
from budget_middleware.store.counters import CounterBackend
from budget_middleware.store.database import in_memory
from budget_middleware.store.spill import (
    LeftDebts,
    debts_folder,
    debts_paid,
    left_debts,
    note_written,
    spill_root,
    still_spilled,
    write_debts,
    written_at,
)

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from budget_middleware.settings import BudgetSettings
    from budget_middleware.store.database import Store, StoredBudget
    from budget_middleware.store.tables import RateLimitRow

logger = logging.getLogger("budget_middleware")

PREFIX = "bm:"  # every key of ours in Redis starts with it
WINDOW_MARGIN_SECONDS = 300.0  # a window's key outlives its window, for late settlements
BACKOFF_MIN_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 2.0
MAX_POOL_CONNECTIONS = 64

_KINDS = {"request": "r", "token": "t", "budget": "b"}
# A forked child's copies of its parent's Redis clients (`after_fork_in_child`), held for the
# child's life and never closed nor collected there: their sockets are the parent's loop's, and
# that loop's epoll instance is the child's too (a stream writer collected here closes its
# transport, which unregisters the socket there: the parent never hears Redis's replies again).
_PARENT_S: list[Redis] = []
# A charge to a window's key: (key, counter, amount).
_Charge = tuple[str, WindowCounter, int]
# A call that went unanswered, which Redis may have run: its done key, its charges, and where
# the store has those that are debts, by key (`_Track.fresh`).
_Unsure = tuple[str, list[_Charge], dict[str, list[list[int]]]]
_NO_SCOPE = Scope("", "", "")  # a window seeded outside an admission: no refusal names it


def _script(name: str) -> str:
    folder = resources.files("budget_middleware").joinpath("store", "lua")
    text = folder.joinpath(name).read_text("utf-8")
    if name in ("admit.lua", "heartbeat.lua"):  # (they tell a Redis rolled back: `_beat_floor`)
        return folder.joinpath("rolled_back.lua").read_text("utf-8") + text
    return text


def mark_ttl_ms(settings: BudgetSettings) -> int:
    """How long a reset's mark is kept: until every instance has read the budget again, a day
    at least (the instances' cache TTL may be longer than this process's: the CLI's)."""
    return int(max(2 * settings.cache_ttl_seconds, 86400) * 1000)


def _key_ttl_ms(end: float, now: float) -> int:
    """How long the key of a window ending at `end` is kept: past its end, for late
    settlements; 0 (for ever) for a window that never ends."""
    if end == FAR_FUTURE:
        return 0
    return max(int((end - now + WINDOW_MARGIN_SECONDS) * 1000), 1)


def _seed_record_key(prefix: str, key: str) -> str:
    """Where `seed.lua` records when (the store's clock) and by whom a window key was seeded."""
    return f"{prefix}sv:{key[len(prefix) :]}"


def _seed_batches_key(prefix: str, key: str) -> str:
    """Where `seed.lua` records the batches on disk a window key's seed counted (`sb:`)."""
    return f"{prefix}sb:{key[len(prefix) :]}"


def mark_key(prefix: str, kind: str, id: str) -> str:
    """The mark of a window begun anew elsewhere (`mark_reset.lua`, `carry.lua`): a budget's by
    its id, a rate limit's request and token windows (one id) each by its kind."""
    return f"{prefix}rs:{id}" if kind == "budget" else f"{prefix}rs:{kind}:{id}"


class _Carrying(NamedTuple):
    """A window new terms moved, to carry in Redis: carry.lua's keys and arguments."""

    mark: str  # the window's mark (`mark_key`)
    old: str  # the old window's key
    new: str  # the new window's key
    record: str  # the new window's seed record (`RedisCounters._seed_record_key`)
    start: float  # where the new window begins
    ttl_ms: int  # the new key's (0: none)
    added: int  # `Carry.added`
    held: int  # `Carry.held`


_RATE_REFUSALS = frozenset(("request_limit_exceeded", "token_limit_exceeded"))


def _in_flight(scope: Scope) -> int:
    """This instance's requests in flight on a scope's concurrency limit: Redis may hold no
    slot for some of them (admitted in process while it was away, under fail-open; lost by an
    empty restart until the next heartbeat writes them again), and admitted 2 more on a limit
    of 2 either way (a fault hunt's). admit.lua counts at least these, in SPEC §5's order: they
    were refused before the script ran, ahead of a scope's request window named first."""
    rate = scope.rate_limit
    slots = None if rate is None else rate.concurrency
    return 0 if slots is None else slots.in_flight


def _window_key(prefix: str, kind: str, id: str, start: float) -> str:
    return f"{prefix}w:{kind}:{id}:{int(start * 1000)}"


def _carrying(prefix: str, carries: Sequence[Carry], now: float) -> list[_Carrying]:
    return [
        _Carrying(
            mark=mark_key(prefix, carry.kind, carry.id),
            old=_window_key(prefix, carry.kind, carry.id, carry.was),
            new=_window_key(prefix, carry.kind, carry.id, carry.start),
            record=_seed_record_key(prefix, _window_key(prefix, carry.kind, carry.id, carry.start)),
            start=carry.start,
            ttl_ms=_key_ttl_ms(carry.end, now),
            added=carry.added,
            held=carry.held,
        )
        for carry in carries
    ]


def _carry_call(carries: list[_Carrying], mark_ttl: int) -> tuple[list[str], list[Any]]:
    """carry.lua's keys and arguments for these carries, in the order the terms were written
    (a window moved twice before Redis took the first is carried twice, the second from the
    first's new window: whether or not Redis ran the first already, its mark tells)."""
    keys: list[str] = []
    args: list[Any] = []
    for carry in carries:
        keys += [carry.mark, carry.old, carry.new, carry.record]
        args += [repr(carry.start), mark_ttl, carry.ttl_ms, carry.added, carry.held]
    return keys, args


def carry_now(settings: BudgetSettings, carries: Sequence[Carry]) -> None:
    """Carry windows that new terms moved (`RedisCounters.terms_noted`'s) from a writer with no
    engine (the CLI, a config file applied on the store), under `PREFIX`."""
    keys, args = _carry_call(_carrying(PREFIX, carries, time.time()), mark_ttl_ms(settings))
    timeout = settings.redis_timeout_seconds
    client = SyncRedis.from_url(
        settings.redis_url or "", socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        client.eval(_script("carry.lua"), len(keys), *keys, *args)
    finally:
        client.close()


def mark_resets_now(url: str, timeout: float, marks: dict[str, tuple[float, int]]) -> None:
    """Write reset marks (key -> moment, ttl_ms) from a thread that runs no event loop."""
    args: list[Any] = []
    for at, ttl_ms in marks.values():
        args += [repr(at), ttl_ms]
    client = SyncRedis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.eval(_script("mark_reset.lua"), len(marks), *marks, *args)
    finally:
        client.close()


class _Debt(NamedTuple):
    """A window key charges are owed to (`RedisCounters._owe`): its counter, and the window's
    bounds when they were charged."""

    counter: WindowCounter
    start: float
    end: float


@dataclass(slots=True)
class _Reading:
    """A seed of ours reading the store: what happened meanwhile to the charges of its windows
    (`_seed_now`)."""

    # The store confirmed them: window -> [(the store's clock after the commit, amount)].
    confirmed: dict[tuple[str, str, float], list[tuple[float, int]]]
    # A heartbeat owed them to Redis, after a loss (`_owe_unwritten`): window -> amount. The
    # seed took them as ours, not in transit, before it read; their payment adds them.
    owed: dict[tuple[str, str, float], int]


@dataclass(slots=True)
class _Track:
    """This instance's charges to one window by their place in the order the store confirms
    them (from 0 when the track began; a flush writes what was pending, in order), kept while
    some were charged without Redis (`_owe`, `fresh`): a seed that another instance made after
    Redis came back empty may hold them already, and which it holds is told by when the store
    committed them (`stamps`) against when that seed read it (`seed.lua`'s record)."""

    confirmed: int = 0  # confirmed by the store since the track began
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (store clock, confirmed)
    fresh: list[list[int]] = field(default_factory=list)  # places [lo, hi) of charges owed
    beat: int = 0  # `confirmed` at the last heartbeat answered (`_written` holds the rest)
    base: int = 0  # the place of the oldest charge it holds (below 0: `reach_back`)

    def held(self, read_at: float) -> int:
        """How far the charges confirmed before this moment of the store's clock reach: a
        seed that read the store then holds them."""
        held = self.base
        for committed, confirmed in self.stamps:
            if committed >= read_at:
                break
            held = confirmed
        return held


def _reach_back(track: _Track, chunks: Sequence[list[float]]) -> None:
    """Give the track the places of the charges the store confirmed since the last heartbeat
    (these [commit moment, amount] chunks, oldest first) before it began, below its first."""
    before = int(sum(amount for _, amount in chunks)) - (track.confirmed - track.beat)
    if before <= 0:
        return
    stamps: list[tuple[float, int]] = []
    place = track.base - before
    for at, amount in chunks:
        taken = min(int(amount), track.base - place)
        if taken <= 0:
            break
        place += taken
        stamps.append((at, place))
    track.stamps[:0] = stamps
    track.base = track.beat = track.base - before


def _newest_between(segments: list[list[int]], lo: int, hi: int, amount: int) -> list[list[int]]:
    """The newest `amount` of the places in [lo, hi) that these segments leave free."""
    free: list[list[int]] = []
    top = hi
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in segments if b > lo and a < hi)[::-1]:
        if b < top:
            free.append([b, top])
        top = min(top, a)
    if top > lo:
        free.append([lo, top])
    placed: list[list[int]] = []
    for a, b in free:  # (newest first)
        if amount <= 0:
            break
        taken = min(b - a, amount)
        placed.insert(0, [b - taken, b])
        amount -= taken
    return placed


def _take_oldest(chunks: list[list[float]], amount: int) -> None:
    """Take `amount` off the oldest of these (commit moment, amount) chunks."""
    while amount > 0 and chunks:
        taken = min(int(chunks[0][1]), amount)
        chunks[0][1] -= taken
        amount -= taken
        if not chunks[0][1]:
            del chunks[0]


def _below(segments: list[list[int]], at: int, floor: int = -(2**62)) -> int:
    """How much of these places lies in [floor, at)."""
    return sum(max(0, min(hi, at) - max(lo, floor)) for lo, hi in segments)


def _written_track(chunks: Sequence[list[float]], lo: int, owed: int) -> _Track:
    """The track, begun at the last heartbeat, of debts a heartbeat found after a loss: the
    charges the store confirmed since (these [commit moment, amount] chunks, in order) come
    first, then those not written; those owed are at places [lo, lo + owed)."""
    track = _Track()
    for at, amount in chunks:
        track.confirmed += int(amount)
        track.stamps.append((at, track.confirmed))
    track.beat = track.confirmed
    track.fresh = [[lo, lo + owed]]
    return track


def _held_of_left(
    debt: dict[str, Any],
    record: str,
    instance: str,
    settled: float | None,
    held_batches: Callable[[float], bool] = lambda read_at: False,
) -> int:
    """How much of a debt an engine left on disk (`RedisCounters._leave_debts`) the seed of its
    window key holds (this record: `seed.lua`'s), as `_leave_out_seeded` weighs it: none when
    that engine's instance made the seed (its seeds left its debts out) or nobody did; all when
    the seed read the store after that engine's last write confirmed them all (`settled`), or
    when it holds every batch the debts' charges wait in (`held_batches`, by when the seed read
    the store: counted from disk, or in the store then); else those committed before the seed
    read the store, by their places (`_Track`)."""
    seeded, _, seeder = record.partition(" ")
    amount = int(debt["amount"])
    if not seeded or seeder == instance:
        return 0
    read_at = float(seeded)
    if settled is not None and read_at >= settled:
        return amount
    if held_batches(read_at):
        return amount
    stamps = [(float("inf") if at is None else at, n) for at, n in debt["stamps"]]
    track = _Track(stamps=stamps, base=debt["base"])
    return min(_below(debt["places"], track.held(read_at)), amount)


@dataclass(slots=True)
class _Entry:
    """One counter as the scripts see it."""

    kind: str  # r, t, c, b, s (a soft budget)
    scope: Scope
    keys: tuple[str, ...]
    limit: int
    ttl_ms: int
    counter: WindowCounter | None  # None for concurrency slots


@dataclass(slots=True)
class _Failure:
    retry_at: float = 0.0
    backoff: float = 0.0
    logged: bool = False
    live: dict[str, Ticket] = field(default_factory=dict)


class RedisCounters(CounterBackend):
    def __init__(
        self,
        registry: CounterRegistry,
        store: Store,
        settings: BudgetSettings,
        clock: Callable[[], float],
        on_store_failed: Callable[[BaseException], None],
        prefix: str = PREFIX,
    ) -> None:
        super().__init__(registry, store, settings, clock, on_store_failed)
        self.prefix = prefix
        self.url = settings.redis_url or "redis://127.0.0.1:6379/0"
        self.slot_ttl = settings.slot_ttl_seconds
        self.client: Redis | None = None
        self._admit: AsyncScript | None = None
        self._settle: AsyncScript | None = None
        self._seed: AsyncScript | None = None
        self._reconcile: AsyncScript | None = None
        self._once: AsyncScript | None = None
        self._beat: AsyncScript | None = None
        self._mark: AsyncScript | None = None
        self._carry: AsyncScript | None = None
        self._expire: AsyncScript | None = None
        self._unadmit: AsyncScript | None = None
        self._instance = uuid.uuid4().hex  # its mark in Redis: there, Redis kept what we hold
        # Charged while Redis could not be reached, by window key: added to it when it is back.
        self._owed: dict[str, int] = {}
        self._owed_to: dict[str, _Debt] = {}  # the counter and window of each key owed
        # Windows with charges owed since they were made without Redis, by window key: what a
        # seed by another instance holds of them is not added again (`_leave_out_seeded`).
        self._tracks: dict[str, _Track] = {}
        self._commit_at: float | None = None  # the store's clock after the write confirmed
        self._write_came: asyncio.Event | None = None  # a heartbeat waits for a write under way
        self._writing = False  # a batch's write to the store under way (`writing`)
        self._seeds_reading: list[_Reading] = []  # the seeds of ours reading the store
        # Per counter, this instance's charges in its ledger that its own calls will add to
        # Redis (a settlement under way, a debt): a seed leaves them out, so that each is added
        # once, by its own call, whoever seeds the key.
        self._transit: dict[WindowCounter, int] = {}
        # Requests settled while Redis could not be reached: their slots and reservations, held
        # there still, released when it answers again (settle.lua's keys and arguments, with
        # nothing to add), not left to fill a concurrency limit until they expire; admissions
        # given up on: what Redis may have counted of them. The script's name, its keys and its
        # arguments.
        self._releases: list[tuple[str, list[str], list[Any]]] = []
        # Settlements whose call failed without an answer: Redis may have run them (a reply past
        # the timeout). Per request: its done key, and its charges (key, counter, amount); added
        # by `settled_once.lua` only if settle.lua did not run (the done key says which). A
        # payment of debts (reconcile.lua's) is one too, with the places of its charges in the
        # store's order by key (`_Track.fresh`): should they be added after all, another
        # instance's seed may hold some of them (`_leave_out_seeded`).
        self._unsure: list[_Unsure] = []
        # Per window, the settlements under way (by done key) whose charge the store may write
        # before their call adds it to Redis: [how much of the window's charges up to and
        # including it the store has yet to confirm, when the store committed the last of it
        # (None: not yet)]. Should the call go unanswered or find the key gone, another
        # instance's seed may hold it (`_committed_before`).
        self._settling: dict[tuple[str, str, float], dict[str, list[Any]]] = {}
        # (done key -> window key -> window)
        self._settling_of: dict[str, dict[str, tuple[str, str, float]]] = {}
        self._seeding: dict[str, asyncio.Future[None]] = {}  # one seed per key at a time
        # Budgets reset here whose mark Redis has not taken yet: mark key -> (moment, ttl_ms).
        self._marks: dict[str, tuple[float, int]] = {}
        # The keys of windows left by resets and new terms, to expire with the marks' writing.
        self._left: list[str] = []
        # Windows new terms moved, not carried in Redis yet (`terms_noted`), in order.
        self._carries: list[_Carrying] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # marks being written
        self._paying: set[asyncio.Task[None]] = set()  # debts being paid, settlements (`settle`)
        self._debts_paid: asyncio.Task[None] | None = None  # the payment of debts under way
        self._debts_paid_by = 0.0  # and when admissions stop waiting for it (the loop's clock)
        # Per budget, this instance's charges (their window's start, amount) that Redis added to
        # that window's key, since the flusher last took them: a reset elsewhere leaves them in
        # the old window (`_keep_the_old_window_s`).
        self._since: dict[WindowCounter, list[tuple[float, int]]] = {}
        self._takes = 0  # how many times the flusher took the pending charges
        self.ledger.before_reset_elsewhere = self._keep_the_old_window_s
        self.ledger.carried_along = self._carried_along
        self.ledger.after_confirmed = self._confirmed
        self._state = _Failure()
        self._heartbeat: asyncio.Task[None] | None = None
        # Should Redis lose its data, another instance may seed a window key from the store
        # before this one: the charges this instance added to that key and the store did not hold
        # then are in no key. Its heartbeat finds its mark gone and adds them again: what is not
        # written, and what the store confirmed since the heartbeat before but after that seed
        # read it (`_seed_records`), in every current window but those whose key it seeded
        # itself after the loss (the seed holds its unwritten charges; told by the seed's
        # record, as Redis may have lost that key too since): twice at worst (a seed made while
        # the heartbeat pays), never lost.
        # Confirmed since the last beat, per window: [the store's clock after the commit, amount]
        self._written: dict[tuple[str, str, float], list[list[float]]] = {}
        self._seeded_after_loss: set[str] = set()  # window keys, since the last beat
        # Per counter, charges settle.lua added after Redis lost its data and before the
        # heartbeat found it (its answer said the mark was gone): in the keys already, not owed
        # again as unwritten (added twice, two workers: 200 requests' price for 196 admitted).
        self._after_loss: dict[WindowCounter, int] = {}
        self._beaten = False  # a first heartbeat finds no mark: nothing was lost
        # The mark holds the number of the beat that wrote it (`_beats`, never lowered there):
        # one lower than the last Redis answered (`_beat_floor`) is a Redis back from an older
        # snapshot, which admit.lua and heartbeat.lua make an empty restart (`rolled_back.lua`).
        self._beats = 0
        self._beat_floor = 0
        # The last beat got no answer: Redis may have run it (found the mark gone, set it again).
        self._beat_unanswered = False
        self._beating = False  # a heartbeat under way (`pay_debts` does not begin another)
        # Where debts are left as the engine stops with Redis away, and read back (`_pay_left`):
        # none for a store in memory (its charges go with the process).
        url = settings.database_url
        root = spill_root(settings.spill_dir)
        self._debts = None if in_memory(url) else debts_folder(root, url, self.url)
        self._debts_left = None if self._debts is None else LeftDebts(self._debts)
        self._confirmed_all = True  # the store confirmed every charge taken (`settled`)
        self._given_up: list[str] = []  # the batches the engine left to others as it stopped
        # The batches this engine took over from gone ones (`took_over`), their charges by
        # window: unwritten, and written since the last beat. Another instance's seed counts
        # them from disk (`_read_and_seed`, its record says which: `seed.lua`), so the
        # heartbeat that finds Redis emptied does not add them again (`_owe_unwritten`).
        self._taken: dict[str, dict[tuple[str, str, float], int]] = {}
        self._taken_since_beat: dict[str, dict[tuple[str, str, float], int]] = {}

    @property
    def _mark_key(self) -> str:
        """This instance's mark: there, Redis has kept its data since the last heartbeat."""
        return f"{self.prefix}i:{self._instance}"

    @property
    def _fence_ms(self) -> int:
        """How long admissions that take holds wait once Redis is found emptied (`admit.lua`):
        twice the heartbeat interval, by when every instance's heartbeat has written its holds
        again (theirs are as far apart as this one's: the same settings)."""
        return max(int(2000 * self._beat_interval), 1)

    @property
    def _beat_interval(self) -> float:
        # Every flush interval, and at least three times a slot TTL: a flush interval at or past
        # the TTL (fewer writes to the store) let a running request's slot expire.
        return min(self.settings.flush_interval_seconds, self.slot_ttl / 3)

    @property
    def _mark_ttl_ms(self) -> int:
        """Longer than beats are apart, however long the flush interval (else every beat would
        find it gone, and add again what it owes); an hour at least: a snapshot Redis comes back
        from holds it then, older beat and all (`rolled_back.lua`), unless older than that."""
        every = self.settings.flush_interval_seconds
        return int(max(self.slot_ttl * 4, 3600, every * 4) * 1000)

    # -- life cycle ----------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """The parent's connections, heartbeat and requests in flight are the parent's."""
        if self.client is not None:
            _PARENT_S.append(self.client)
        self.after_loop_closed()
        self._state.live.clear()
        self._owed.clear()
        self._owed_to.clear()
        self._tracks.clear()
        self._transit.clear()
        self._releases.clear()
        self._unsure.clear()
        self._settling.clear()
        self._settling_of.clear()
        self._since.clear()
        self._instance = uuid.uuid4().hex  # a mark of its own: the parent's is the parent's
        self._written.clear()
        self._seeded_after_loss.clear()
        self._after_loss.clear()
        self._beaten = False
        self._beat_unanswered = False
        self._beats = self._beat_floor = 0
        self._taken.clear()
        self._taken_since_beat.clear()

    async def loop_ending(self) -> None:
        """The loop's connections closed as it ends, once the settlements under way are
        answered (else owed, and added again); the next loop makes a pool of its own
        (`after_loop_closed`), and what is owed is paid there or at exit."""
        if self._paying:
            await asyncio.gather(*self._paying, return_exceptions=True)
        client = self.client
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.connection_pool.disconnect()

    def owes(self) -> bool:
        return bool(self._owed or self._releases or self._unsure)

    def after_loop_closed(self) -> None:
        """The connections, the heartbeat and any seed under way were the closed loop's; debts
        stay owed."""
        self.client = None
        self._heartbeat = None
        self._beating = False  # (a beat the closed loop cut: its `finally` never ran)
        self._write_came = None
        self._writing = False
        self._seeding.clear()
        self._seeds_reading.clear()  # (the closed loop's seeds: their `finally` never ran)
        self._paying.clear()
        self._debts_paid = None

    async def start(self) -> None:
        # BUDGET_REDIS_TIMEOUT_SECONDS bounds every call (connecting, then each reply): past it
        # the call fails as if Redis were down. Waiting for a free pooled connection is local
        # contention, given at least as long.
        timeout = self.settings.redis_timeout_seconds
        pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_POOL_CONNECTIONS,
            timeout=max(5.0, timeout),
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        # Failures are ours to handle (fail open or closed, then back off), never retried here.
        self.client = Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._admit = self.client.register_script(_script("admit.lua"))
        self._settle = self.client.register_script(_script("settle.lua"))
        self._seed = self.client.register_script(_script("seed.lua"))
        self._reconcile = self.client.register_script(_script("reconcile.lua"))
        self._once = self.client.register_script(_script("settled_once.lua"))
        self._beat = self.client.register_script(_script("heartbeat.lua"))
        self._mark = self.client.register_script(_script("mark_reset.lua"))
        self._carry = self.client.register_script(_script("carry.lua"))
        self._expire = self.client.register_script(_script("expire_left.lua"))
        self._unadmit = self.client.register_script(_script("unadmit.lua"))
        self._loop = asyncio.get_running_loop()
        if not self._beaten:  # the mark, before anything is charged (once: a restart on
            # another loop leaves it to the heartbeat, which then tells a loss meanwhile)
            try:
                self._beats += 1
                beat = self._beats
                await self.client.set(self._mark_key, f"1 {beat}", px=self._mark_ttl_ms)
                self._beat_floor = max(self._beat_floor, beat)
                self._beaten = True
                await self._pay_left()
            except (RedisError, OSError) as exc:
                # Redis away as this instance starts: the back-off begins here, as after any
                # call, so the first request is not held for a second timeout (it waited two).
                self._failed(exc)
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def stop(self) -> None:
        if self._tasks:  # marks and carries being written: answered before the connections go
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if (self._marks or self._carries) and self.client is not None:  # now or never
            with contextlib.suppress(RedisError, OSError):
                await self.write_marks()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._paying:  # answered before the connections go (else owed, and added again)
            await asyncio.gather(*self._paying, return_exceptions=True)
        if (self._owed or self._releases or self._unsure) and self.client is not None:
            # Now or never, back-off or not: what this instance charged without Redis is added
            # by nobody else, and a Redis that kept its data would lack it for the rest of the
            # window (stopped before its heartbeat after Redis came back: 13 admitted on 10).
            with contextlib.suppress(RedisError, OSError, _StoreDown):
                await self._pay_debts_whole()
        owed = [(self._owed_to[k].counter, a) for k, a in self._owed.items()]
        owed += [(counter, a) for _, charges, _ in self._unsure for _, counter, a in charges]
        if owed:  # (the store holds them: a Redis restarted empty seeds them from it)
            spend = sum(a for counter, a in owed if counter.kind == "budget") / NANOS_PER_USD
            left = await self._leave_debts()
            if left is not None:
                logger.warning(
                    "budget-middleware could not add what it owed to Redis (unreachable as it "
                    "stopped): $%.9g of budget spend, left in %s for the next process on this "
                    "store to add",
                    spend,
                    left,
                )
            else:
                logger.warning(
                    "budget-middleware could not add what it owed to Redis (unreachable as it "
                    "stopped): $%.9g of budget spend; a Redis that kept its data lacks it for "
                    "the rest of its windows",
                    spend,
                )
        if self.client is not None:
            if self._paying:  # settlements begun meanwhile: answered before the connections go
                await asyncio.gather(*self._paying, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.client.aclose(close_connection_pool=True)
            self.client = None

    def left_to_others(self, batch_ids: Sequence[str]) -> None:
        self._given_up = list(batch_ids)
        self._taken.clear()  # (given up again, with the rest: anyone's)
        self._taken_since_beat.clear()

    def took_over(self, batch_id: str, deltas: Sequence[Delta]) -> None:
        windows: dict[tuple[str, str, float], int] = {}
        for d in deltas:
            window = (d.kind, d.id, d.start_ts)
            windows[window] = windows.get(window, 0) + d.amount
        self._taken[batch_id] = windows

    def taken_written(self, batch_id: str) -> None:
        windows = self._taken.pop(batch_id, None)
        if windows is not None:
            self._taken_since_beat[batch_id] = windows

    def batches_owed_for(self) -> set[str]:
        """The batches the debts left on disk name (`_leave_debts`): their payment counts those
        debts once (when the window's key is seeded, or once the store has them), so the engine
        that takes the other batches over, into the charges its seeds add, leaves these be."""
        if self._debts is None:
            return set()
        return {b for _, left in left_debts(self._debts) for b in left.get("batches", [])}

    async def written_for_others(self, batch_id: str, at: float | None) -> None:
        """Noted beside the debts to Redis (`spill.note_written`): the engine that gave the
        batch up may have left debts whose charges it holds."""
        if self._debts is None or at is None:
            return
        try:
            await anyio.to_thread.run_sync(note_written, self._debts, batch_id, at)
        except OSError as exc:  # (its debts are added whole: twice at worst)
            logger.error("budget-middleware could not note a batch written for debts: %s", exc)

    async def _leave_debts(self) -> str | None:
        """What this engine still owes Redis as it stops, on disk (`spill.write_debts`) for the
        next process to add (`_pay_left`); the file's path, or None when it cannot be written.
        Each debt with its keys, its window, the done key of a payment or settlement Redis may
        have run (`_unsure`), and where the store has it (`_Track`): a Redis restarted empty
        meanwhile is seeded from the store, which holds it. The debts are the file's then:
        forgotten here, under a new instance (its seeds hold them now)."""
        if self._debts is None:
            return None
        debts: list[dict[str, Any]] = []

        def debt(key: str, counter: WindowCounter, amount: int, start: float, end: float,
                 done: str | None, places: list[list[int]]) -> None:  # fmt: skip
            track = self._tracks.get(key) or _Track()
            debts.append(
                {
                    "key": key,
                    "mark": mark_key(self.prefix, counter.kind, counter.id),
                    "record": self._seed_record_key(key),
                    "amount": amount,
                    "start": start,
                    "end": None if end == FAR_FUTURE else end,
                    "done": done,
                    "places": places,
                    "stamps": [[None if at == float("inf") else at, n] for at, n in track.stamps],
                    "base": track.base,
                }
            )

        for key, amount in self._owed.items():
            owed, track = self._owed_to[key], self._tracks.get(key)
            debt(
                key, owed.counter, amount, owed.start, owed.end, None, track.fresh if track else []
            )
        for done, charges, places in self._unsure:
            for key, counter, amount in charges:
                if key == self.window_key(counter):  # (else its window is over, or begun anew)
                    end = counter.end
                    debt(key, counter, amount, counter.start, end, done, places.get(key, []))
        ledger = self.ledger  # (all its charges in the store: none pending, none unconfirmed)
        written = self._confirmed_all and not (ledger.dirty or ledger.sealed or ledger.unconfirmed)
        # Else, when the rest is in batches given up to the next engine (the store unreachable
        # too), settled once the store has those (`spill.written_at`): without, a window seeded
        # from the store after another engine wrote them had them added again.
        spilled = [] if written or ledger.dirty or ledger.sealed else self._given_up
        paid = uuid.uuid4().hex  # the file's id
        left = {
            "id": paid,
            "done": self._done_key(paid),  # (its prefix's)
            "instance": self._instance,
            "settled": self._commit_at if written else None,
            "batches": spilled,
            "debts": debts,
        }
        # The file's from here: a payment meanwhile (a request settling as Redis came back,
        # which pays the debts first) added them to Redis too, and the next process added the
        # file again (Redis $0.09 for $0.06 spent). Owed again if it cannot be written.
        amounts, owed_to, unsure = self._owed, self._owed_to, self._unsure
        self._owed, self._owed_to, self._unsure = {}, {}, []
        try:
            path = await anyio.to_thread.run_sync(write_debts, self._debts, left)
        except OSError as exc:
            logger.error("budget-middleware could not leave its debts to Redis on disk: %s", exc)
            for key, amount in amounts.items():
                self._owed[key] = self._owed.get(key, 0) + amount
            self._owed_to = {**owed_to, **self._owed_to}
            self._unsure[:0] = unsure
            return None
        self._given_up = []
        self._owed.clear()
        self._owed_to.clear()
        self._unsure.clear()
        self._settling.clear()
        self._settling_of.clear()
        self._tracks.clear()
        self._transit.clear()
        self._written.clear()
        self._seeded_after_loss.clear()
        self._after_loss.clear()
        self._instance = uuid.uuid4().hex
        self._beaten = False
        return path

    async def _pay_left(self) -> None:
        """Add the debts engines left on disk as they stopped (`_leave_debts`), each file once."""
        if self._debts_left is None or self.client is None:
            return
        try:
            files = await anyio.to_thread.run_sync(self._debts_left.read)
        except OSError as exc:
            logger.error("budget-middleware could not read the debts to Redis on disk: %s", exc)
            return
        for path, left in files:
            if await self._pay_left_file(left):
                await anyio.to_thread.run_sync(debts_paid, path, left.get("batches", []))

    async def _pay_left_file(self, left: dict[str, Any]) -> bool:
        """One file's debts, by reconcile.lua under the file's id (a file paid twice is added
        once), to the window keys Redis kept, less what a seed made since holds
        (`_held_of_left`); skipped: a window over, a key gone (seeded from the store, which has
        them), a window begun anew elsewhere, a payment or settlement Redis ran (its done key).
        Whether the file is paid: not while a key is gone and the batches that hold its charges
        wait on disk still (a seed from the store lacks them; paid once it is seeded, or once
        they are written)."""
        assert self.client is not None and self._reconcile is not None and self._debts is not None
        now = self.clock()
        debts = [d for d in left["debts"] if d["end"] is None or now < d["end"]]
        if not debts:
            return True
        settled = left["settled"]
        if settled is None and left.get("batches"):  # (given up in batches: when written)
            settled = await anyio.to_thread.run_sync(written_at, self._debts, left["batches"])
        unwritten = False  # (its batches on disk still: a seed from the store lacks them)
        if settled is None and left.get("batches"):
            spilled = self._debts.parent
            unwritten = await anyio.to_thread.run_sync(still_spilled, spilled, left["batches"])
        dones = [d["done"] for d in debts if d["done"]]
        keys_now = [d["key"] for d in debts] if unwritten else []
        named = [str(b) for b in left.get("batches", [])]
        counted_keys = [_seed_batches_key(self.prefix, d["key"]) for d in debts] if named else []
        found = await self.client.mget(
            [d["record"] for d in debts] + dones + keys_now + counted_keys
        )
        n = len(debts) + len(dones)
        if unwritten and any(value is None for value in found[n : n + len(keys_now)]):
            # Skipped as "seeded from the store", they were in no key: the store had them only
            # later, from their spilled batch (Redis $0.03 for $0.06 spent).
            return False
        ran = dict(zip(dones, found[len(debts) : n], strict=True))
        counted = [set(str(c or "").split()) for c in found[n + len(keys_now) :]]
        noted: dict[str, float] = {}
        if named:  # (when the store had those written: `spill.note_written`)
            for batch_id in named:
                at = await anyio.to_thread.run_sync(written_at, self._debts, [batch_id])
                if at is not None:
                    noted[batch_id] = at

        def held_batches(index: int) -> Callable[[float], bool]:
            # Every batch the debts name counted by the seed (from disk: `_read_and_seed`), or
            # in the store when it read it: the debts' charges are all there (the charges
            # Redis had held beside them too, which their payment alone left out: 12 admitted
            # on $0.10 after an empty restart).
            seen = counted[index] if index < len(counted) else set()
            return lambda read_at: (
                bool(named)
                and all(b in seen or noted.get(b, float("inf")) <= read_at for b in named)
            )

        keys: list[str] = []
        args: list[Any] = []
        ttl = 0
        for index, (debt, record) in enumerate(zip(debts, found, strict=False)):
            done = ran.get(debt["done"]) if debt["done"] else None
            if done is not None and debt["key"] not in str(done).split("\n"):
                continue  # added by the call Redis ran
            seen = str(record or "")
            amount = int(debt["amount"]) - _held_of_left(
                debt, seen, left["instance"], settled, held_batches(index)
            )
            if amount <= 0:
                continue
            end = debt["end"]
            keys += [debt["key"], debt["mark"], debt["record"]]
            args += [amount, repr(debt["start"]), "1e300" if end is None else repr(end), seen]
            ttl = -1 if end is None or ttl < 0 else max(ttl, _key_ttl_ms(end, now))
        if keys:
            await self._reconcile(
                keys=[*keys, left["done"]], args=[*args, max(ttl, 0), left["instance"]]
            )
        return True

    async def health(self) -> str:
        if self.client is None:
            return "down"
        try:
            await self.client.ping()
        except (RedisError, OSError):
            return "down"
        return "ok"

    # -- keys ----------------------------------------------------------------------------

    def window_key(self, counter: WindowCounter) -> str:
        return _window_key(self.prefix, counter.kind, counter.id, counter.start)

    def _told(self, counter: WindowCounter, key: str, value: int) -> None:
        """What Redis answered for a counter's window (`key`), into the live copy here, which
        headers, alerts, `from_memory` and fail-open admissions read. Answers to calls made at
        once come back in any order and a window's value only grows: a late one never sets it
        back. An answer for a window the counter has left since is not this window's."""
        if value > counter.value and key == self.window_key(counter):
            counter.value = value

    async def refresh(self) -> list[WindowCounter]:
        """As every backend re-reads the counters; the keys of a window that never ends, of a
        limit deleted from the store (its counter forgotten: `CounterRegistry.forget_deleted`),
        expire after the margin any window's key has (late settlements), as one that ends
        does: kept for ever, every key made and deleted left two in Redis for good."""
        forgotten = await super().refresh()
        never = [self.window_key(c) for c in forgotten if c.end == FAR_FUTURE]
        if never and self.client is not None and not self._backing_off():
            try:
                await self._expire_left(never)
            except (RedisError, OSError) as exc:  # the next instance to forget them tries
                self._failed(exc)
        return forgotten

    async def _expire_left(self, keys: list[str]) -> None:
        """The keys of windows left for good, and their seed records, expire after the margin
        any window's key has (`expire_left.lua`): kept for ever (a window that never ends),
        every lifetime budget deleted or reset, or given a reset period, left two in Redis
        for good."""
        if self._expire is not None:
            keys = keys + [
                made(self.prefix, key)
                for made in (_seed_record_key, _seed_batches_key)
                for key in keys
            ]
            await self._expire(keys=keys, args=[int(WINDOW_MARGIN_SECONDS * 1000)])

    async def read_live(self, ids: Collection[str] | None = None) -> None:
        """Every instance's spend into the live copies here (`_told`), in one round trip: an
        answer from the live counters shows it, not this instance's copy as of its last
        request or re-read. `ids`: only these limits' (a key's quota), else every counter. A
        window reset elsewhere (its mark after the copy's anchor) is left to the next request;
        one that has ended rolls first, as a request's admission rolls it, and its next window
        is read: left to the next request here, the answer showed $0 spent in it while the
        other instances had spent there. When Redis cannot answer (or is known down), the
        copies stand."""
        client = self.client
        now = self.clock()
        counters = [
            counter
            for windows in self.registry.windows.values()
            for counter in (
                windows.values()
                if ids is None
                else [c for c in map(windows.get, ids) if c is not None]
            )
        ]
        if client is None or not counters or self._backing_off():  # down: no wait for it
            return
        ensure_current(counters, now, self.ledger)
        keys = [self.window_key(c) for c in counters]
        marks = [mark_key(self.prefix, c.kind, c.id) for c in counters]
        try:
            values = await client.mget(keys + marks)
        except (RedisError, OSError):
            return
        for counter, key, value, mark in zip(
            counters, keys, values, values[len(keys) :], strict=False
        ):
            with contextlib.suppress(ValueError, IndexError):  # none of ours: left alone
                if value is not None and (mark is None or float(mark.split()[0]) <= counter.anchor):
                    self._told(counter, key, int(value))

    def _ttl_ms(self, counter: WindowCounter, now: float) -> int:
        return _key_ttl_ms(counter.end, now)

    def _plan(self, scopes: Sequence[Scope], now: float, settling: bool) -> list[_Entry]:
        """The counters of these scopes in the order `admission.admit` checks them."""
        entries: list[_Entry] = []
        p = self.prefix
        for scope in scopes:
            rate = scope.rate_limit
            if rate is None:
                continue
            if rate.requests is not None and not settling:
                c = rate.requests
                entries.append(
                    _Entry("r", scope, (self.window_key(c),), c.limit, self._ttl_ms(c, now), c)
                )
            if rate.tokens is not None:
                c = rate.tokens
                entries.append(
                    _Entry("t", scope, (self.window_key(c),), c.limit, self._ttl_ms(c, now), c)
                )
            slots = rate.concurrency
            if slots is not None and (settling or slots.limit is not None):
                entries.append(_Entry("c", scope, (f"{p}c:{slots.id}",), slots.limit or 0, 0, None))
        for scope in scopes:
            for c in scope.budgets:
                keys = (self.window_key(c), f"{p}rz:{c.id}", f"{p}rh:{c.id}")
                entries.append(_Entry("b", scope, keys, c.limit, self._ttl_ms(c, now), c))
            # Soft budgets (SPEC §14): their window is seeded and shared like any budget's, so
            # every instance sees the spend its alerts watch; they refuse and reserve nothing.
            for c in scope.soft_budgets:
                entries.append(
                    _Entry("s", scope, (self.window_key(c),), c.limit, self._ttl_ms(c, now), c)
                )
        return entries

    # -- resets --------------------------------------------------------------------------

    def take_deltas(self) -> list[Delta]:
        deltas = super().take_deltas()
        self._since.clear()  # nothing is pending any more
        if deltas:
            self._confirmed_all = False  # (until a write commits: `committed_at`)
        self._takes += 1
        return deltas

    def _confirmed(self, kind: str, id: str, start: float, amount: int) -> None:
        """The store holds this charge now: a seed that read the store before may lack it, and
        it is no longer unwritten (`_owe_unwritten`). Counted when confirmed, not when taken: a
        write taken before the last beat may commit after another instance's seed."""
        window = (kind, id, start)
        at = float("inf") if self._commit_at is None else self._commit_at
        for reading in self._seeds_reading:
            during = reading.confirmed.get(window)
            if during is not None:
                during.append((at, amount))
        for waiting in self._settling.get(window, {}).values():
            if waiting[1] is None:
                waiting[0] -= amount
                if waiting[0] <= 0:
                    waiting[1] = at
        chunks = self._written.get(window)
        if not chunks:  # (none yet, or `_leave_out_seeded` took them all: an IndexError here
            self._written[window] = [[at, amount]]  # left the rest of a batch unconfirmed)
        elif chunks[-1][0] == at:
            chunks[-1][1] += amount
        else:
            chunks.append([at, amount])
        if self._tracks:
            track = self._tracks.get(_window_key(self.prefix, kind, id, start))
            if track is not None:
                track.confirmed += amount
                track.stamps.append((at, track.confirmed))

    @property
    def wants_commit_time(self) -> bool:
        return True  # (one read of the store's clock a flush: `_written`, `_Track.stamps`)

    def committed_at(self, at: float | None) -> None:
        self._commit_at = at
        self._confirmed_all = True  # (a flush takes nothing new before its last batch is written)
        if self._write_came is not None:  # (its charges are confirmed before anything else runs)
            self._write_came.set()

    def writing(self, under_way: bool) -> None:
        self._writing = under_way
        if not under_way and self._write_came is not None:  # (failed: it will not confirm)
            self._write_came.set()

    def _applied(self, counter: WindowCounter, window: float, amount: int) -> None:
        """A charge of the window starting at `window` that settle.lua added to that window's
        key (no reset marked there yet), still pending here: that window's, should a reset
        turn up."""
        charges = self._since.get(counter)
        if charges is None:
            self._since[counter] = [(window, amount)]
        else:
            charges.append((window, amount))

    async def before_take(self) -> None:
        """The resets marked by other instances in the windows of the charges Redis added here
        before any mark (`_applied`), read before a flush takes them: a flush that took them
        unaware wrote them as the current window's, and the store (which holds the reset) and
        every seed from it counted charges made before the reset in the new window (10 of 10
        made on one instance just before a reset on another; 0 now). One round trip a flush
        round, only while such charges are pending."""
        client = self.client
        if client is None or not self._since or self._backing_off():
            return
        counters = list(self._since)
        try:
            marks = await client.mget([mark_key(self.prefix, c.kind, c.id) for c in counters])
        except (RedisError, OSError) as exc:
            # As before: the next admission or re-read finds the reset. Redis is left alone for
            # the back-off, as after any call that failed: a stalled Redis cost the next request
            # the whole timeout again.
            self._failed(exc)
            return
        now = self.clock()
        for counter, mark in zip(counters, marks, strict=True):
            if mark is None:
                continue
            with contextlib.suppress(ValueError, IndexError):
                text = mark.decode() if isinstance(mark, bytes) else str(mark)
                if counter.anchor < float(text.split()[0]) < counter.end:
                    self._moved(counter, text, now)

    def _keep_the_old_window_s(self, counter: WindowCounter, at: float) -> None:
        """Before a counter moves to a reset made elsewhere (`Ledger.before_reset_elsewhere`,
        called by `configure`, learnt from Redis's mark or from the store):
        what this instance's charges added to the old window's key before the mark was there,
        and it has not written yet, stays in the old window, as in Redis (a delta ending at
        `at`); the rest of what it has not written (settlements under way, made without Redis)
        counts in the new window (a limit tightens by that much)."""
        if counter.kind != "budget":
            return
        charges = self._since.pop(counter, None)
        if (
            charges
            and counter.start < at
            and counter.pending
            and counter.pending_start == counter.start
        ):
            start = counter.start  # (a charge of a window before was sealed with it)
            before = min(sum(a for window, a in charges if window == start), counter.pending)
            if before:
                counter.pending -= before
                self.ledger.sealed.append((counter.kind, counter.id, start, before))

    def _carried_along(self, counter: WindowCounter, start: float) -> None:
        """New terms carried a counter's unwritten charges to the window beginning at `start`
        (`Ledger.carried_along`): those Redis added to the old window's key are in the new
        one's now (carry.lua copied them), and stay in it should a reset turn up there. Left
        as the old window's, a reset after new terms found none of them (theirs no longer the
        counter's window): they were written into the reset's window, $1.10 stored for a $1
        budget that Redis had filled with $1.00."""
        charges = self._since.get(counter)
        if charges:
            was = counter.start
            self._since[counter] = [(start if w == was else w, a) for w, a in charges]

    def reset_noted(self, budget_id: str, at: float, was: float | None = None) -> None:
        """A budget reset through this process (at `at`), for the other instances' admissions:
        its mark is written by `mark_now` or `marks_soon` (the reset's), else by the heartbeat
        or the next admission, and kept in Redis until every instance has read the budget
        again from the store."""
        key = mark_key(self.prefix, "budget", budget_id)
        if was is not None and (left := _window_key(self.prefix, "budget", budget_id, was)) != (
            _window_key(self.prefix, "budget", budget_id, at)
        ):
            self._left.append(left)
        known = self._marks.get(key)
        if known is None or known[0] < at:
            self._marks[key] = (at, mark_ttl_ms(self.settings))

    async def mark_now(self) -> None:
        """The resets' marks written now, on the loop (a reset waits for it: the instances see
        the reset as soon as it is made); kept for later should Redis not answer."""
        if (self._marks or self._carries) and self.client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.write_marks()

    def marks_soon(self) -> None:
        """The resets' marks written as soon as can be from a thread that cannot wait for the
        loop: a task on the loop if it runs, else written from here."""
        if not self._marks:
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._write_marks_soon)
            return
        marks, self._marks = self._marks, {}  # no loop to write them: written from here
        try:
            mark_resets_now(self.url, self.settings.redis_timeout_seconds, marks)
        except (RedisError, OSError) as exc:
            logger.warning("budget-middleware could not mark a reset in Redis: %s", exc)
            for key, mark in marks.items():
                if key not in self._marks or self._marks[key][0] < mark[0]:
                    self._marks[key] = mark

    def _write_marks_soon(self) -> None:
        if self._marks or self._carries:
            task = asyncio.get_running_loop().create_task(self.mark_now())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def terms_noted(self, carries: Sequence[Carry]) -> None:
        """New terms written through this process moved windows, a budget's or a rate limit's
        (`Carry`, `owner_limits.carried`): the usage carries over in Redis too (carry.lua, by
        `write_marks` on the loop now, or before the next admission or settlement), and the
        other instances move there at their next one; the copies here take it at once
        (`CounterBackend.terms_noted`)."""
        super().terms_noted(carries)
        carrying = _carrying(self.prefix, carries, self.clock())
        self._carries += carrying
        self._left += [c.old for c in carrying if c.old != c.new]
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._write_marks_soon)

    def _moved(self, counter: WindowCounter, mark: Any, now: float) -> None:
        """A counter's window begun anew elsewhere, as its mark in Redis says: reset there, or
        new terms (" carried", carry.lua's: the usage carried over)."""
        at, _, how = str(mark).partition(" ")
        counter.move_to(float(at), now, self.ledger, carried=how == "carried")

    async def write_marks(self) -> None:
        """The resets' marks, and the carries of windows new terms moved (`_new_terms`); the
        keys of the windows they left expire (`_expire_left`). The marks first: a carry of
        terms written after a reset, to the window the reset began (the same moment), marked
        it carried, and a reset's mark never replaces one of its moment; written in that order
        once Redis was back, the reset read as a carry elsewhere, and charges of the window
        before it were carried into it ($0.30 of a $1 budget just reset)."""
        if self._mark is not None and self._marks:
            marks, self._marks = self._marks, {}
            args: list[Any] = []
            for at, ttl_ms in marks.values():
                args += [repr(at), ttl_ms]
            try:
                await self._mark(keys=list(marks), args=args)
            except BaseException:
                for key, mark in marks.items():  # still to write, unless a later reset did
                    if key not in self._marks or self._marks[key][0] < mark[0]:
                        self._marks[key] = mark
                raise
        if self._carries and self._carry is not None:
            carries, self._carries = self._carries, []
            keys, values = _carry_call(carries, mark_ttl_ms(self.settings))
            try:
                await self._carry(keys=keys, args=values)
            except BaseException:
                # Still to carry, before any noted since (Redis may have run them: their marks
                # then leave them as they are).
                self._carries[:0] = carries
                raise
        if self._left:  # the windows they left (a key kept for ever: one that never ends)
            left, self._left = self._left, []
            try:
                await self._expire_left(left)
            except BaseException:
                self._left[:0] = left
                raise

    # -- admission -----------------------------------------------------------------------

    async def admit(self, limits: LimitSet, estimate: int) -> Ticket | Refusal:
        first = await self.admit_first(((limits, estimate),))
        return first.ticket if first.ticket is not None else first.refusals[0]

    async def admit_first(
        self, candidates: Sequence[tuple[LimitSet, int]], most_remaining: bool = False
    ) -> FirstAdmitted:
        """One script call for every candidate (a route's targets): the first that passes is
        admitted, atomically across instances, whatever the number of targets; with
        `most_remaining`, ranked there on the counters every instance shares."""
        now = self.clock()
        reserve = self.settings.reserve
        plans: list[list[_Entry]] = []
        for limits, _ in candidates:
            admission.bring_to(limits, now, self.ledger)
            plans.append(self._plan(limits.scopes, now, settling=False))
        if not any(plans):
            return admission.admit_first(candidates, reserve, now, self.ledger, most_remaining)
        if self._backing_off():
            return self._fallback(candidates, now, None, most_remaining)
        if (
            self._owed or self._releases or self._unsure or self._debts_paid is not None
        ):  # holds let go first, and debts paid (or being paid) before admitting on top
            try:
                await self._pay_debts_whole()
            except (RedisError, OSError) as exc:
                self._failed(exc)
                return self._fallback(candidates, now, exc, most_remaining)
            except _StoreDown as exc:  # a lost key could not be seeded: the store is away
                return self._fallback(candidates, now, exc.__cause__, most_remaining)
        request_id = uuid.uuid4().hex
        try:
            for _ in range(4):
                if self._marks or self._carries:
                    await self.write_marks()
                try:
                    answer = await self._run_admit(
                        plans, candidates, request_id, now, most_remaining
                    )
                except _Moved:  # a seed found a reset this instance had missed: moved there
                    plans = [self._plan(lim.scopes, now, settling=False) for lim, _ in candidates]
                    continue
                if answer[0] != "moved":
                    break
                # A window begun anew elsewhere since it began here (a budget reset, new terms
                # for a budget or a rate limit): it starts there here too, before anything is
                # charged to it.
                entries = [entry for plan in plans for entry in plan]
                for n in range(1, len(answer), 2):
                    counter = entries[int(answer[n]) - 1].counter
                    assert counter is not None
                    self._moved(counter, answer[n + 1], now)
                plans = [self._plan(limits.scopes, now, settling=False) for limits, _ in candidates]
            else:
                raise RedisError("budget windows kept moving while being admitted")
        except (RedisError, OSError, asyncio.CancelledError) as exc:
            # Redis may have run it all the same (an answer past the timeout, or a caller that
            # stopped waiting for it: `asyncio.wait_for` around an SDK call): whatever it holds
            # under this request's id is let go, not left to fill a concurrency limit or a
            # budget's room until it expires, and what it counted on request windows is taken
            # back (a 503 counts against nothing; admitted in process, it is owed: counted once).
            let_go = self._admission_key(request_id)
            for n, (limits, _) in enumerate(candidates):
                self._release_later(Ticket(limits, 0, request_id=request_id), now)
                counted = [entry.keys[0] for entry in plans[n] if entry.kind == "r"]
                self._releases.append(("unadmit", [let_go, *counted], [n + 1]))
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._failed(exc)
            return self._fallback(candidates, now, exc, most_remaining)
        except _StoreDown as exc:
            return self._fallback(candidates, now, exc.__cause__, most_remaining)
        self._recovered()
        result = FirstAdmitted()
        admitted = answer[0] == "ok"
        # Those refused before the admitted one (or all): (candidate, why) each, in the order
        # the script tried them.
        refused = int(answer[2]) if admitted else len(plans)
        why = answer[3:] if admitted else answer[1:]
        for n in range(refused):
            index = int(why[5 * n]) - 1
            result.tried.append(index)
            result.refusals.append(self._refusal(plans[index], why[5 * n + 1 : 5 * n + 5]))
        if admitted:
            index = int(answer[1]) - 1
            limits, estimate = candidates[index]
            values = why[5 * refused :]
            reservation = estimate if reserve else 0
            result.index = index
            result.ticket = self._admitted(limits, plans[index], values, reservation, request_id)
        if result.ticket is None:  # refused: nothing admitted is held across this await
            await self._read_rate_windows(plans, result)
        return result

    async def _read_rate_windows(self, plans: list[list[_Entry]], result: FirstAdmitted) -> None:
        """Every candidate refused, one by a rate window: its other request and token windows
        as every instance has spent them, into the copies here (one more round trip, on such a
        refusal only: never while an admitted ticket waits, which a cancellation would lose).
        The answer names the first window that refuses and waits for the last
        (`admission.retry_at`, which reads the copies): admit.lua tells the first alone, and
        a team's hour another instance spent read as this instance last saw it (1 of 3), so a
        key refused by its minute was told to retry in 60 s, and refused then by the hour."""
        entries = [
            entry
            for index, refusal in zip(result.tried, result.refusals, strict=True)
            if refusal.code in _RATE_REFUSALS
            for entry in plans[index]
            if entry.kind in "rt" and entry.counter is not None
        ]
        client = self.client
        if client is None or len(entries) < 2:  # the one that refused is told already
            return
        try:
            values = await client.mget([entry.keys[0] for entry in entries])
        except (RedisError, OSError):  # the refusal stands; its wait may be short of the last
            return
        for entry, value in zip(entries, values, strict=True):
            if value is not None and entry.counter is not None:
                self._told(entry.counter, entry.keys[0], int(value))

    async def _run_admit(
        self,
        plans: list[list[_Entry]],
        candidates: Sequence[tuple[LimitSet, int]],
        request_id: str,
        now: float,
        most_remaining: bool,
    ) -> list[Any]:
        """admit.lua's answer; window keys it found missing seeded, and asked again."""
        assert self._admit is not None
        reserve = self.settings.reserve
        p = self.prefix
        keys: list[str] = []
        args: list[Any] = [int(now * 1000), request_id, int((now + self.slot_ttl) * 1000)]
        args += [1 if reserve else 0, 1 if most_remaining else 0, len(candidates)]
        for (_, estimate), plan in zip(candidates, plans, strict=True):
            args += [estimate if reserve else 0, len(plan)]
            for entry in plan:
                keys += entry.keys
                counter = entry.counter
                if counter is not None:  # a window: its mark, and where it was begun here
                    keys.append(mark_key(p, counter.kind, counter.id))
                    args += [entry.kind, entry.limit, repr(counter.anchor)]
                else:  # slots: with this instance's own requests in flight, at the least
                    args += [entry.kind, entry.limit, _in_flight(entry.scope)]
        keys += [self._mark_key, f"{p}fence", self._admission_key(request_id)]
        args += [self._fence_ms if self._beaten else 0, self._beat_floor, p]
        entries = [entry for plan in plans for entry in plan]
        waited = 0.0
        for _ in range(6):
            answer: list[Any] = await self._admit(keys=keys, args=args)
            if answer[0] == "fence":
                # Redis was emptied: the slots and reservations of the requests in flight are
                # not all written again yet (racing admissions passed a concurrency limit: 9 at
                # once on 8). Waited out, at most twice (a fence set again: a late heartbeat).
                wait = int(answer[1]) / 1000
                if waited + wait > 2 * self._fence_ms / 1000:
                    raise RedisError("Redis was emptied and its holds are not back yet")
                waited += wait
                await asyncio.sleep(wait)
                continue
            if answer[0] != "seed":
                if answer[0] == "gone":  # (only a call this client gave up on meets its mark)
                    raise RedisError("the admission was let go before it ran")
                return answer
            await self._seed_windows([entries[int(i) - 1] for i in answer[1:]], now)
        raise RedisError("window keys vanished while being seeded")

    async def _seed_windows(self, missing: list[_Entry], now: float) -> None:
        """Seed missing window keys (SET NX) with the store's value where the store's window is
        theirs, plus this instance's charges to the window that the store may not hold yet,
        less those its own calls will add (`_transit`). One seed per key at a time in this
        instance: the others wait for it."""
        waits: list[asyncio.Future[None]] = []
        mine: dict[str, _Entry] = {}
        for entry in missing:
            key = entry.keys[0]
            future = self._seeding.get(key)
            if future is None:
                mine.setdefault(key, entry)
            elif future not in waits:
                waits.append(future)
        if mine:
            # A task of its own, which those who wait for it wait on: the request that began it
            # cancelled (its client gone) leaves the seed to them (they were told Redis was
            # down: 503, and a back-off began).
            seed = asyncio.ensure_future(self._seed_now(list(mine.values()), now))
            for key in mine:
                self._seeding[key] = seed
            seed.add_done_callback(lambda done: self._seeded(list(mine), done))
            waits.append(seed)
        for future in waits:
            await asyncio.shield(future)

    def _seeded(self, keys: list[str], seed: asyncio.Future[None]) -> None:
        """A seed's end: its keys are no longer being seeded; what it raised is its waiters'."""
        for key in keys:
            if self._seeding.get(key) is seed:
                del self._seeding[key]
        if not seed.cancelled():
            seed.exception()  # retrieved: those who wait are told by their await

    async def _seed_now(self, missing: list[_Entry], now: float) -> None:
        # What this instance has not written is taken before the store is read, and the
        # charges the store confirms meanwhile are watched (`_confirmed`): one committed before
        # the read is in what it sees, and taken off once (`late` below).
        transit = self._transit
        mine = [
            entry.counter.unwritten(self.ledger) - transit.get(entry.counter, 0)
            if entry.counter
            else 0
            for entry in missing
        ]
        windows = [(e.counter.kind, e.counter.id, e.counter.start) for e in missing if e.counter]
        reading = _Reading({window: [] for window in windows}, dict.fromkeys(windows, 0))
        self._seeds_reading.append(reading)
        try:
            await self._read_and_seed(missing, now, mine, reading)
        finally:
            self._seeds_reading.remove(reading)

    async def _read_and_seed(
        self,
        missing: list[_Entry],
        now: float,
        mine: list[int],
        reading: _Reading,
    ) -> None:
        confirming, owed = reading.confirmed, reading.owed
        budget_ids = [e.counter.id for e in missing if e.counter and e.kind in "bs"]
        rate_ids = [e.counter.id for e in missing if e.counter and e.kind not in "bs"]

        spill = self.spill

        def read() -> tuple[
            float, dict[str, StoredBudget], dict[str, RateLimitRow], dict[str, list[Delta]]
        ]:
            # The store's clock before the read: every write committed before it is in what
            # the read sees (`_leave_out_seeded`).
            at = self.store.clock()
            # The batches on disk that no live engine counts as its own (given up, taken over
            # by another engine, a gone one's): in no seed else, their charges that Redis held
            # before it restarted empty were admitted again (12 on a $0.10 budget). Listed
            # before the store says which it has applied, and that before it is read: one
            # written meanwhile is counted twice at worst, never missed.
            spilled = {} if spill is None else spill.others_unwritten()
            if spilled:
                applied = self.store.batches_applied(spilled)
                spilled = {b: d for b, d in spilled.items() if b not in applied}
            return (at, *self.store.read_counters(budget_ids, rate_ids), spilled)

        for _ in range(3):
            try:
                read_at, budgets, rates, spilled = await anyio.to_thread.run_sync(read)
            except Exception as exc:
                self.on_store_failed(exc)
                raise _StoreDown from exc
            # A write under way may have committed before the read: its confirmation (with the
            # moment it committed) tells so.
            if confirming:
                await self._writes_confirmed(confirming)
            # One whose moment is not before the clock read may be in what the read saw, or
            # not: read again, after it (counted twice, a commit between the clock read and
            # the read: Redis $0.61 for $0.31 spent, 70 admitted on a limit of 100).
            if all(at < read_at for during in confirming.values() for at, _ in during):
                break
        on_disk: dict[tuple[str, str, float], int] = {}
        for deltas in spilled.values():
            for d in deltas:
                window = (d.kind, d.id, d.start_ts)
                on_disk[window] = on_disk.get(window, 0) + d.amount
        counted = " ".join(spilled)  # (recorded beside each key it seeds: `_held_of_left`)
        keys: list[str] = []
        args: list[Any] = []
        moved = False
        reset: list[WindowCounter] = []  # moved by a reset, not new terms
        for entry, unwritten in zip(missing, mine, strict=True):
            counter = entry.counter
            assert counter is not None
            stored, reset_at = 0, float("-inf")
            own = (counter.duration, counter.calendar_aligned)
            terms = own  # the store's, where it holds the limit
            if entry.kind in "bs" and counter.id in budgets:
                budget = budgets[counter.id]
                stored, reset_at = budget.usage, budget.last_reset.timestamp()
                terms = (parse_duration(budget.reset_duration), budget.calendar_aligned)
            elif counter.id in rates:
                row = rates[counter.id]
                if entry.kind == "r":
                    stored, reset_at = (
                        row.request_current_usage,
                        utc(row.request_last_reset).timestamp(),
                    )
                    terms = (parse_duration(row.request_reset_duration), False)
                else:
                    stored, reset_at = (
                        row.token_current_usage,
                        utc(row.token_last_reset).timestamp(),
                    )
                    terms = (parse_duration(row.token_reset_duration), False)
            # A rate window begins within another only by new terms.
            carried = terms != own or entry.kind not in "bs"
            if counter.start < reset_at < counter.end or (
                counter.anchor < reset_at < counter.start and counter.begun_anew_at(reset_at)
            ):
                # The store's window began since this one did (or since the window this one
                # rolled from did: a reset just before it rolled), and its mark is gone (Redis
                # restarted empty) or not there yet: the window moves there, not seeded as it
                # was. New terms (the store's differ from the counter's, which reads them at
                # its next reload) carry what this instance has not written along, as their
                # mark does (`_moved`); a budget's reset leaves it in the old window, and its
                # mark is written again for the other instances. (Theirs of new terms need
                # none: the window key they charge is gone too, and its seed finds the same.)
                counter.move_to(reset_at, now, self.ledger, carried=carried)
                if not carried:
                    reset.append(counter)
                    mark = mark_key(self.prefix, "budget", counter.id)
                    if mark not in self._marks or self._marks[mark][0] < reset_at:
                        self._marks[mark] = (reset_at, mark_ttl_ms(self.settings))
                moved = True
                continue
            if terms != own:
                # New terms the counter has not read yet (at its next reload): on its old ones it
                # rolled into a window theirs may not have (a minute made a day, settled past the
                # minute's end: the next minute's key, which no admission reads once the counter
                # has read the day, took the charge). It takes them now, as its reload would, and
                # moves to their window with what it counted (`configure`), before anything is
                # seeded or charged where the old terms put it.
                start = counter.start
                counter.configure(counter.limit, *terms, reset_at, now, self.ledger)
                if counter.start != start:
                    moved = True
                    continue
            value = stored if counter.start <= reset_at < counter.end else 0
            # Our own charges of this window not yet in the store: Redis lost them too. Those
            # the store committed after they were taken and before it was read are in `value`
            # already: unwritten then, or in transit (a debt, a settlement), which their own
            # calls add. Counted again, the debts a heartbeat owed after an empty restart and
            # the flusher wrote before this seed read the store were added twice: Redis $0.60
            # for $0.30 spent, 70 admitted on a limit of 100.
            window = (counter.kind, counter.id, counter.start)
            late = sum(amount for at, amount in confirming.get(window, ()) if at < read_at)
            # Those a heartbeat owed Redis since they were taken (it found the loss, and no
            # seed recorded yet) are added by their payment: counted here too, a threaded
            # server's seed made as the store came back from a lock held them twice (Redis 176
            # requests' price for 112 admitted on a budget of 120).
            unwritten -= owed.get(window, 0)
            keys.append(entry.keys[0])
            spent = max(value - min(late, value) + unwritten, 0) + on_disk.get(window, 0)
            args += [spent, self._ttl_ms(counter, now), counted]
        assert self._seed is not None
        if keys:
            records = [self._seed_record_key(k) for k in keys]
            batches = [_seed_batches_key(self.prefix, k) for k in keys]
            done = await self._seed(
                keys=[*keys, *records, *batches, self._mark_key],
                args=[*args, f"{read_at!r} {self._instance}"],
            )
            if not int(done[-1]):  # Redis lost its data since the last heartbeat read
                seeded = zip(keys, done[:-1], strict=True)
                self._seeded_after_loss.update(k for k, d in seeded if int(d))
        if moved:
            raise _Moved(reset)

    def _refusal(self, plan: list[_Entry], why: list[Any]) -> Refusal:
        """A candidate's refusal from the script's (counter from 1, code, used, reserved)."""
        entry = plan[int(why[0]) - 1]
        used, reserved = int(why[2]), int(why[3])
        counter = entry.counter
        reset_at: float | None = None
        if counter is not None:
            self._told(counter, entry.keys[0], used)
            reset_at = None if counter.end == FAR_FUTURE else counter.end
        code = str(why[1])
        refused_by = counter if code == "budget_exceeded" else None
        return Refusal(code, entry.scope, entry.limit, used, reset_at, reserved, refused_by)

    def _admitted(
        self,
        limits: LimitSet,
        plan: list[_Entry],
        values: list[Any],
        reservation: int,
        request_id: str,
    ) -> Ticket:
        holds: list[str] = []
        for n, entry in enumerate(plan):
            value = int(values[2 * n])
            counter = entry.counter
            if entry.kind == "r" and counter is not None:
                counter.add(1, self.ledger)  # the flusher writes the request count as a delta
                counter.value -= 1  # counted in Redis's answer
                self._told(counter, entry.keys[0], value)
            elif entry.kind == "c":
                holds.append(entry.keys[0])
            elif counter is not None:
                self._told(counter, entry.keys[0], value)
                if entry.kind == "b" and reservation:
                    holds += entry.keys[1:]  # the reservation's ZSET and HASH
        # The local counters keep this process's own holds, as `admission.admit` would: they
        # decide alone when Redis is down (fail open).
        for slots in limits.slots:
            slots.in_flight += 1
        if reservation:
            for budget in limits.budgets:
                budget.reserved += reservation
        ticket = Ticket(limits, reservation, request_id=request_id, holds=tuple(holds))
        self._state.live[request_id] = ticket
        return ticket

    def _fallback(
        self,
        candidates: Sequence[tuple[LimitSet, int]],
        now: float,
        exc: BaseException | None,
        most_remaining: bool,
    ) -> FirstAdmitted:
        if not self.settings.fail_open:
            raise ServiceUnavailable("the budget counters (Redis) cannot be reached") from exc
        reserve = self.settings.reserve
        first = admission.admit_first(candidates, reserve, now, self.ledger, most_remaining)
        if first.ticket is not None:
            for counter in first.ticket.limits.requests:
                self._owe(counter, 1, fresh=True)
        return first

    def _owe(
        self, counter: WindowCounter, amount: int, in_transit: bool = False, fresh: bool = False
    ) -> None:
        """A charge Redis has not seen, to add to its window key when it answers again (it is
        in transit until then: a seed leaves it out). `fresh`: just charged to the ledger here
        (the newest of its window), so its place in the store's order is known (`_Track`)."""
        if amount:
            key = self.window_key(counter)
            self._owed[key] = self._owed.get(key, 0) + amount
            self._owed_to[key] = _Debt(counter=counter, start=counter.start, end=counter.end)
            if not in_transit:
                self._in_transit(counter, amount)
            if fresh:
                track = self._tracks.get(key)
                if track is None:
                    track = self._tracks[key] = _Track()
                hi = track.confirmed + counter.unwritten(self.ledger)
                segments = track.fresh
                if segments and segments[-1][1] == hi - amount:
                    segments[-1][1] = hi
                else:
                    segments.append([hi - amount, hi])

    def _owe_settlement(self, ticket: Ticket, cost: int, tokens: int) -> None:
        limits = ticket.limits
        for budget in limits.budgets + limits.soft_budgets:
            self._owe(budget, cost, fresh=True)
        for counter in limits.tokens:
            self._owe(counter, tokens, fresh=True)

    def _owe_unwritten(
        self,
        written: dict[tuple[str, str, float], list[list[float]]],
        seeds: dict[str, tuple[float, str]],
        after_loss: dict[WindowCounter, int] | None = None,
        early: dict[str, int] | None = None,
        counted: dict[str, set[str]] | None = None,
        taken: dict[str, dict[tuple[str, str, float], int]] | None = None,
    ) -> None:
        """Redis lost its data: this instance's charges to the current windows that a seed by
        another instance may have missed are owed to it (`pay_debts` adds them). `seeds`: the
        seed now in a window key, when it read the store and who made it (`_seed_records`);
        this instance's holds them. `early`: of the debts in transit, by key, those the store
        confirmed before the last beat (`_confirmed_before_beat`). `counted`: by key, the
        batches on disk that seed counted; of those, the ones this engine took over (`taken`:
        unwritten, or written since the last beat) it holds too."""
        now = self.clock()
        for windows in self.registry.windows.values():
            for counter in windows.values():
                if not counter.start <= now < counter.end:
                    continue
                key = self.window_key(counter)
                seed = seeds.get(key)
                if seed is not None and seed[1] == self._instance:
                    continue
                window = (counter.kind, counter.id, counter.start)
                transit = self._transit.get(counter, 0)
                # Confirmed before the last beat, they are neither unwritten nor in `written`:
                # taken off the rest all the same, as many of ours were owed to no key (a
                # payment of $0.05 written before a beat failed across the loss: 105 on 100).
                transit -= min(transit, (early or {}).get(key, 0))
                chunks = written.get(window, ())
                confirmed = int(sum(amount for _, amount in chunks))
                mine = counter.unwritten(self.ledger) - transit + confirmed
                if after_loss:  # settled into the key since the loss: there already
                    mine -= after_loss.get(counter, 0)
                # Those in transit (a debt, a settlement under way) are added by their own
                # calls, which leave out what a seed holds: taken as the oldest confirmed, but
                # for the debts whose places are known (`_places`), which are where those
                # say, confirmed or not, before that seed read the store or after. (Taken as
                # the oldest confirmed, debts written after the seed's read or not at all were
                # taken for ours that it held, which were owed again: added twice, Redis 287
                # for 276 admitted after an empty restart under load.)
                track = self._tracks.get(key)
                if track is not None:
                    _reach_back(track, chunks)
                places, floor = (self._places(key, track), track.beat) if track else ([], 0)
                unplaced = max(0, transit - _below(places, 2**62, floor))
                lo = min(
                    unplaced + _below(places, track.confirmed if track else 0, floor), confirmed
                )
                if seed is not None:
                    read_at = seed[0]
                    # Committed before that seed read the store: in it; taken as all held,
                    # never twice off.
                    held = int(sum(amount for at, amount in chunks if at < read_at))
                    in_seed = unplaced + (
                        _below(places, track.held(read_at), floor) if track else 0
                    )
                    mine -= max(0, held - in_seed)
                    lo = max(lo, held)
                    in_disk = (counted or {}).get(key)
                    if in_disk and taken:
                        # Taken over from a gone engine, and counted by that seed from disk
                        # (not written when it read the store): added again, Redis $0.02 over
                        # the spend, 8 admitted on $0.10.
                        mine -= sum(w.get(window, 0) for b, w in taken.items() if b in in_disk)
                if mine > 0:
                    self._owe(counter, mine)
                    for reading in self._seeds_reading:  # (a seed of ours counted them)
                        if window in reading.owed:
                            reading.owed[window] += mine
                    if track is not None:
                        # Their places beside the debts', the newest of ours that are not
                        # debts: without, a payment added them whole to a seed made after
                        # this beat that held them (Redis 396 for 368 admitted).
                        top = track.confirmed + counter.unwritten(self.ledger)
                        track.fresh += _newest_between(places, floor, top, mine)
                    else:
                        # Their places, for the payment (`_leave_out_seeded`): another
                        # instance may seed the key from the store after the records were read
                        # above and before it, holding what was committed here before that
                        # seed read the store. Added to it all the same, one instance's 10
                        # requests were counted twice on every scope: Redis 30 for 20 admitted;
                        # with nothing confirmed since the last beat too (the flusher writes
                        # them after this beat: Redis $0.61 for $0.31 spent, 70 admitted).
                        self._tracks[key] = _written_track(chunks, lo, mine)

    def _confirmed_before_beat(self) -> dict[str, int]:
        """By window key, how much of the debts in transit whose places are known (owed:
        `_Track.fresh`; in a payment unanswered: `_unsure`) the store confirmed before the
        last heartbeat answered (`_Track.beat`)."""
        early: dict[str, int] = {}
        for key, track in self._tracks.items():
            below = _below(self._places(key, track), track.beat)
            if below:
                early[key] = below
        return early

    def _places(self, key: str, track: _Track) -> list[list[int]]:
        """The places of the debts in transit to this key that are known (owed: `_Track.fresh`;
        in a payment unanswered: `_unsure`)."""
        segments = list(track.fresh)
        for _, _, places in self._unsure:
            segments += places.get(key, [])
        return segments

    async def _seed_records(
        self, taken: Collection[tuple[str, str, float]] = ()
    ) -> tuple[dict[str, tuple[float, str]], dict[str, set[str]]]:
        """After a loss, per window key this instance seeded since its last heartbeat or
        confirmed charges to, the seed there now (`seed.lua`'s record): when it read the store
        and which instance made it.
        - Another's holds what was committed before (added again, $0.50 written by one instance
          just before Redis restarted empty counted twice, and the other refused at once).
        - One of ours holds every charge of ours (left out whole). A key this instance seeded
          after the loss is told so by its record, not by having seeded it: Redis restarted
          empty again before this heartbeat, and another instance's seed, without our
          unwritten charges, was taken for ours (120 admitted on 100, a fault hunt's).
        None read (Redis away): none holds any, every charge is added (twice at worst).
        With them, for the windows of the batches this engine took over (`taken`), the batches
        on disk each seed counted (`seed.lua`)."""
        assert self.client is not None
        keys = list(self._seeded_after_loss)
        keys += [_window_key(self.prefix, *w) for w in self._written]
        keys += [_window_key(self.prefix, *w) for w in taken]
        keys = list(dict.fromkeys(keys))
        counted_keys = [_seed_batches_key(self.prefix, k) for k in keys] if taken else []
        try:
            records = await self.client.mget(
                [self._seed_record_key(k) for k in keys] + counted_keys
            )
        except (RedisError, OSError):
            return {}, {}
        seeds: dict[str, tuple[float, str]] = {}
        for key, record in zip(keys, records, strict=False):
            seeded, _, seeder = str(record or "").partition(" ")
            if seeded:
                seeds[key] = (float(seeded), seeder)
        counted = {
            key: set(str(batches).split())
            for key, batches in zip(keys, records[len(keys) :], strict=False)
            if batches
        }
        return seeds, counted

    async def pay_debts(self) -> None:
        """Release the holds of requests settled without Redis; add what was charged without
        it to the window keys it kept, or to the window begun anew within theirs elsewhere
        meanwhile (a reset, new terms: its mark, as a settlement moves there); seed those it
        lost (restarted empty) where their window is still the counter's, then add to them."""
        await self._release_held()
        if (self._unsure or self._owed) and await self._lost_unbeaten():
            # Redis lost its data since the last heartbeat, which has not found it yet: it goes
            # first, owing again what is unwritten and not in transit, then paying it all. Paid
            # before it, these debts reached the key another instance seeded, and the heartbeat
            # owed them again as unwritten (two workers, Redis killed mid-load: 200 requests'
            # price in Redis for 196 admitted, the budget refused early).
            await self.heartbeat()
        await self._settle_unsure()
        for _ in range(3):  # (owed again where a window moved elsewhere: added there now)
            if not self._owed or self._reconcile is None:
                return
            owed, self._owed = self._owed, {}
            debts, self._owed_to = self._owed_to, {}
            fresh = self._take_fresh(owed)
            seen: dict[str, str] = {}
            try:
                if fresh:
                    fresh, seen = await self._leave_out_seeded(owed, debts, fresh)
            except BaseException:
                for key, amount in owed.items():  # still owed, with anything owed meanwhile
                    self._owe(debts[key].counter, amount, in_transit=True)  # (in transit)
                for key, segments in fresh.items():  # and where the store has them
                    track = self._tracks.get(key)
                    if track is not None:
                        track.fresh[:0] = segments
                raise
            charges = [(key, debts[key].counter, a) for key, a in owed.items() if a]
            bounds = [(debts[key].start, debts[key].end) for key, a in owed.items() if a]
            # Unanswered: `_unsure`, once, with the places of its charges.
            gone = await self._reconciled(charges, bounds, seen, fresh)
            lost = [charges[i] for i in gone]  # (gone, or seeded by another since it looked)
            try:  # (the places of what it adds: another instance may seed first)
                await self._into_windows(lost, {k: fresh[k] for k, _, _ in lost if k in fresh})
            finally:
                self._drop_tracks()

    async def _lost_unbeaten(self) -> bool:
        """Whether this instance's mark is gone (Redis lost its data) and no heartbeat of ours
        is under way to find it."""
        if not self._beaten or self._beating or self.client is None:
            return False
        return not await self.client.exists(self._mark_key)

    def _take_fresh(self, owed: dict[str, int]) -> dict[str, list[list[int]]]:
        """The places of the charges owed (`_Track.fresh`) to these keys, taken off their
        tracks (given back should the debts stay owed)."""
        fresh: dict[str, list[list[int]]] = {}
        for key in owed:
            track = self._tracks.get(key)
            if track is not None and track.fresh:
                fresh[key], track.fresh = track.fresh, []
        return fresh

    def _drop_tracks(self) -> None:
        """Tracks with nothing owed left to place (a window moved, its debts went elsewhere),
        nor a payment unanswered whose charges they place (`_unsure`)."""
        unsure = {key for _, _, places in self._unsure for key in places}
        for key in [
            k
            for k, t in self._tracks.items()
            if k not in unsure and (not t.fresh or k not in self._owed)
        ]:
            del self._tracks[key]

    async def _leave_out_seeded(
        self, owed: dict[str, int], debts: dict[str, _Debt], fresh: dict[str, list[list[int]]]
    ) -> tuple[dict[str, list[list[int]]], dict[str, str]]:
        """Take off the debts what a seed by another instance holds already. After an empty
        restart, a window key another instance seeded from the store holds every charge of
        ours the store had committed when that seed read it (`seed.lua` records when, by the
        store's clock); added again, the outage's charges counted twice for the rest of the
        window. A charge committed before that moment (by the clock read after the write) is
        left out, and out of transit; one committed later, or not known to be, is added. Returns
        the places still owed (for `pay_debts` to give back should this round fail), and the
        records read: the payment adds to a key only while its record is the one read here
        (`reconcile.lua`), as a seed made in between may hold the debts too."""
        assert self.client is not None
        keys = list(fresh)
        records = await self.client.mget([self._seed_record_key(k) for k in keys])
        left: dict[str, list[list[int]]] = {}
        seen: dict[str, str] = {}
        for key, record in zip(keys, records, strict=True):
            segments = fresh[key]
            track = self._tracks.get(key)
            seen[key] = str(record or "")
            seeded, _, seeder = seen[key].partition(" ")
            if track is None or not seeded or seeder == self._instance:
                left[key] = segments  # kept from before, or our own seed, which left them out
                continue
            held = track.held(float(seeded))  # confirmed before that seed read the store
            taken = min(_below(segments, held), owed[key])
            if taken <= 0:
                left[key] = segments
                continue
            owed[key] -= taken
            debt = debts[key]
            self._arrived(debt.counter, taken)
            # What the heartbeat weighs after a loss (`_owe_unwritten`) holds those confirmed
            # since the last beat: in the seed too.
            window = (debt.counter.kind, debt.counter.id, debt.start)
            chunks = self._written.get(window)
            if chunks:  # (the oldest: those places come first since the beat)
                _take_oldest(chunks, _below(segments, held, track.beat))
            left[key] = [[max(lo, held), hi] for lo, hi in segments if hi > held]
        return left, seen

    def _seed_record_key(self, key: str) -> str:
        return _seed_record_key(self.prefix, key)

    async def _pay_debts_whole(self) -> None:
        """`pay_debts` in a task of its own, which the caller waits for: a caller that stops
        waiting (a client gone, `asyncio.wait_for` around an SDK call, `stop`) does not cut it
        between Redis adding a debt and its answer, which would leave the debt owed, and
        added again."""
        under_way = self._debts_paid
        if (
            under_way is not None
            and not under_way.done()
            and under_way is not asyncio.current_task()  # (the heartbeat it runs pays too)
        ):
            # Another caller's payment: waited for, not run beside it. It took the debts, which
            # are in transit until it is answered (a seed leaves them out): an admission that
            # went on meanwhile was admitted on a window without them (a threaded server,
            # Redis killed as it started: 135 admitted on a budget of 120). Waited for as long
            # as Redis's timeout from the payment's start, no longer: a payment slower than that
            # (Redis answering each of its calls late) is left to run, and what waits goes on.
            left = self._debts_paid_by - asyncio.get_running_loop().time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(under_way), left)
        if not (self._owed or self._releases or self._unsure):
            return  # (paid by that one, or by one that ended just before)
        task = asyncio.get_running_loop().create_task(self.pay_debts())
        self._paying.add(task)
        if under_way is None or under_way.done():  # (else this one is run by that one)
            self._debts_paid = task
            self._debts_paid_by = task.get_loop().time() + self.settings.redis_timeout_seconds
        task.add_done_callback(self._paid)
        await asyncio.shield(task)

    def _paid(self, task: asyncio.Task[None]) -> None:
        self._paying.discard(task)
        if self._debts_paid is task:
            self._debts_paid = None
        exc = None if task.cancelled() else task.exception()  # (retrieved: its caller may
        if isinstance(exc, RedisError | OSError):  # have left; Redis is left alone all the same)
            self._failed(exc)

    async def _reconciled(
        self,
        charges: list[_Charge],
        bounds: list[tuple[float, float]],
        seen: dict[str, str] | None = None,
        places: dict[str, list[list[int]]] | None = None,
    ) -> list[int]:
        """Add charges (key, counter, amount) of windows with these bounds (start, end) to their
        keys (reconcile.lua); returns the indices of those whose key is gone, or was seeded by
        another instance since its seed record was read (`seen`, by key: keys not in it are
        added to whoever seeded them). A charge whose window began anew elsewhere (its mark)
        moves its counter there, and is owed to the window begun there as `_to_new_windows`
        takes it (added by the next round; arrived, should the counter have left that window
        too). `places`: where the store has the debts among them (`_Track.fresh`), kept with
        the payment should it go unanswered."""
        assert self._reconcile is not None
        keys: list[str] = []
        args: list[Any] = []
        seen = seen or {}
        for (key, counter, amount), (start, end) in zip(charges, bounds, strict=True):
            keys += [key, mark_key(self.prefix, counter.kind, counter.id)]
            keys.append(self._seed_record_key(key))
            # (a window that never ends: a number later than any mark, not "inf", for Lua)
            args += [amount, repr(start), repr(end) if end != FAR_FUTURE else "1e300"]
            args.append(seen.get(key, "*"))
        done = self._done_key(uuid.uuid4().hex)
        try:
            answer: list[Any] = await self._reconcile(
                keys=[*keys, done], args=[*args, 60000, self._instance]
            )
        except BaseException:
            # Unanswered, it may have run (an answer past the timeout): added by
            # settled_once.lua only if it did not (its done key says), as a settlement is. Kept
            # owed, it was added again: 3 debts counted twice, 7 admitted on a $0.10 budget.
            # With their places: a key it found missing may be seeded by another instance
            # before they are added, from a store that holds them (without, counted twice:
            # Redis 11 for 6 requests admitted).
            if charges:
                keys_owed = {key for key, _, _ in charges}
                kept = {k: p for k, p in (places or {}).items() if k in keys_owed}
                self._unsure.append((done, list(charges), kept))
            raise
        now = self.clock()
        gone: list[int] = []
        moved: dict[int, str] = {}
        for n in range(0, len(answer), 2):
            if answer[n + 1] and answer[n + 1] != "seeded":
                moved[int(answer[n]) - 1] = str(answer[n + 1])
            else:
                gone.append(int(answer[n]) - 1)
        there: list[_Charge] = []
        reset: list[WindowCounter] = []
        for n, (key, counter, amount) in enumerate(charges):
            mark = moved.get(n)
            if mark is None:
                if n not in gone:
                    self._arrived(counter, amount)
                continue
            self._moved(counter, mark, now)
            at, _, how = mark.partition(" ")
            if not how:
                reset.append(counter)
            if self.window_key(counter) == _window_key(
                self.prefix, counter.kind, counter.id, float(at)
            ):
                there.append((key, counter, amount))
            else:
                self._arrived(counter, amount)
        for _, counter, amount in self._to_new_windows(there, reset):
            self._owe(counter, amount, in_transit=True)
        return gone

    def _done_key(self, request_id: str) -> str:
        return f"{self.prefix}sd:{request_id}"

    def _committed(self, done: str) -> dict[str, float]:
        """By window key, when the store committed the charge of this settlement under way
        (by its clock read after the commit), where it has."""
        committed: dict[str, float] = {}
        for key, window in self._settling_of.get(done, {}).items():
            waiting = self._settling.get(window, {}).get(done)
            if waiting is not None and waiting[1] is not None:
                committed[key] = waiting[1]
        return committed

    def _settled_out(self, done: str) -> None:
        """A settlement no longer under way: its charge is added, or owed (`_settling`)."""
        for window in self._settling_of.pop(done, {}).values():
            waiting = self._settling.get(window)
            if waiting is not None:
                waiting.pop(done, None)
                if not waiting:
                    del self._settling[window]

    async def _committed_before(
        self, todo: list[_Charge], committed: dict[str, float], seen: dict[str, str]
    ) -> list[_Charge]:
        """Of settlements' charges to add to keys that were missing, those another instance's
        seed holds (it read the store after the store committed them) are there already, and
        out of transit; the rest are added only while the seed record is the one read here
        (`seen`, for `reconcile.lua`)."""
        assert self.client is not None
        keys = [k for k, _, _ in todo if k in committed]
        if not keys:
            return todo
        records = await self.client.mget([self._seed_record_key(k) for k in keys])
        held: set[str] = set()
        for key, record in zip(keys, records, strict=True):
            text = record.decode() if isinstance(record, bytes) else str(record or "")
            seeded, _, seeder = text.partition(" ")
            if seeded and seeder != self._instance and committed[key] < float(seeded):
                held.add(key)
            else:
                seen[key] = text
        left: list[_Charge] = []
        for key, counter, amount in todo:
            if key in held:
                self._arrived(counter, amount)
            else:
                left.append((key, counter, amount))
        return left

    def _admission_key(self, request_id: str) -> str:
        """admit.lua's mark of the candidate it counted (`unadmit.lua`)."""
        return f"{self.prefix}ad:{request_id}"

    async def _settle_unsure(self) -> None:
        """Settlements that failed without an answer: what Redis did not run is added now
        (once: the done key settle.lua sets makes a late run of it add nothing). Debts among
        them are added with their places (`_Track.fresh`): a seed by another instance since may
        hold some (`_leave_out_seeded`)."""
        if not self._unsure or self._once is None:
            return
        unsure, self._unsure = self._unsure, []
        try:
            await self._settle_each(unsure)
        finally:
            self._drop_tracks()  # (kept for these while they were unsure)

    async def _settle_each(
        self,
        unsure: list[_Unsure],
    ) -> None:
        assert self._once is not None  # (`_settle_unsure` saw it set)
        for n, (done, charges, places) in enumerate(unsure):
            # A key another instance seeded holding debts whose places are known is left to
            # `_into_windows`, which leaves out what that seed holds (added whole, a payment
            # refused a connection after an empty restart counted them twice: Redis $0.61 for
            # $0.31 spent, 70 admitted on a limit of 100).
            keys = [k for k, _, _ in charges]
            # A settlement's charge the store may hold (committed, or in a write under way) and
            # another instance's seed read after it commits is held there: left to
            # `_into_windows` too (added whole, the settlements Redis died under while the
            # flusher wrote them counted twice: Redis $9.13-9.97 for $9.00 admitted, two
            # instances under load, Redis restarted empty), which weighs its commit then. (Left
            # to it only once committed, one whose write committed as this call went, and
            # another instance seeded the key, was added to that seed: Redis $0.06 for $0.05.)
            settling = self._settling_of.get(done, {})
            try:
                missing = await self._once(
                    keys=[done, *keys, *map(self._seed_record_key, keys)],
                    args=[
                        *(a for _, _, a in charges),
                        self._instance,
                        *("1" if k in places or k in settling else "0" for k in keys),
                    ],
                )
            except BaseException:
                self._unsure[:0] = unsure[n:]
                raise
            gone = {int(i) - 1 for i in missing if int(i) > 0}
            for i, (_, counter, amount) in enumerate(charges):
                if i not in gone:
                    self._arrived(counter, amount)  # added now, or by settle.lua late
            lost = [c for i, c in enumerate(charges) if i in gone]
            if not lost:
                self._settled_out(done)
                continue
            try:
                await self._into_windows(
                    lost, {k: places[k] for k, _, _ in lost if k in places}, done
                )
            except BaseException:
                self._unsure[:0] = unsure[n + 1 :]
                raise
            finally:
                self._settled_out(done)

    async def _release_held(self) -> None:
        if not self._releases or self._settle is None or self._unadmit is None:
            return
        # Taken whole, so that settlements and the heartbeat releasing at once (as they do
        # when Redis comes back) each release their own; what fails is kept for the next round.
        held, self._releases = self._releases, []
        for n, (name, keys, args) in enumerate(held):
            script = self._settle if name == "settle" else self._unadmit
            try:
                await script(keys=keys, args=args)
            except BaseException:
                self._releases[:0] = held[n:]
                raise

    def _release_later(self, ticket: Ticket, now: float) -> None:
        keys, kinds = self._settle_layout(self._plan(ticket.scopes, now, settling=True))
        self._releases.append(("settle", keys, [ticket.request_id, 0, 0, *kinds]))

    def _settle_layout(self, plan: list[_Entry]) -> tuple[list[str], list[Any]]:
        """settle.lua's keys, and its arguments after the amounts, for this plan."""
        keys: list[str] = []
        kinds: list[Any] = []
        for entry in plan:
            keys += entry.keys
            kinds.append(entry.kind)
            counter = entry.counter
            if counter is not None:  # a window: its mark, and where it was begun here
                keys.append(mark_key(self.prefix, counter.kind, counter.id))
                kinds.append(repr(counter.anchor))
        return keys, kinds

    async def _into_windows(
        self,
        charges: list[_Charge],
        fresh: dict[str, list[list[int]]] | None = None,
        settling: str | None = None,
    ) -> None:
        """Charges of ours in transit (key, counter, amount) whose window key is missing: the
        key is seeded (without them: they are in transit), then each is added once. A charge is
        out of transit once added, or once its window has ended (the store holds it, and no
        admission reads that key any more); one that is neither when this fails is owed.
        `fresh`: where the store has the debts of these keys (`_Track`): another instance's
        seed, made first, may hold some of them (`_leave_out_seeded`). `settling`: the done key
        of the settlement these charges are, whose commit in the store is weighed once the key
        is seeded (`_committed_before`), not before: a write under way when its call answered
        commits meanwhile, and the seed waited for it (`_seed_now`)."""
        assert self._reconcile is not None
        now = self.clock()
        todo: list[_Charge] = []
        for key, counter, amount in charges:
            if now < counter.end and key == self.window_key(counter):
                todo.append((key, counter, amount))
            else:
                self._arrived(counter, amount)
        try:
            for _ in range(4):
                if not todo:
                    return
                entries = [
                    _Entry(_KINDS[c.kind], _NO_SCOPE, (k,), c.limit, 0, c) for k, c, _ in todo
                ]
                try:
                    await self._seed_windows(entries, now)
                except _Moved as moved:  # to the window begun anew: charged there
                    todo = self._to_new_windows(todo, moved.reset)
                    continue
                seen: dict[str, str] = {}
                if fresh:  # (the keys of a debt: one charge each)
                    owed = {k: a for k, _, a in todo}
                    debts = {k: _Debt(c, c.start, c.end) for k, c, _ in todo}
                    fresh, seen = await self._leave_out_seeded(
                        owed, debts, {k: p for k, p in fresh.items() if k in owed}
                    )
                    todo = [(k, c, owed[k]) for k, c, _ in todo if owed[k]]
                # A settlement's charge, which the store may hold: when it committed, as known
                # now (taken when its call answered, a write under way then was weighed as
                # none, and added to a seed another instance made after the commit: Redis $0.05
                # for $0.04 spent).
                committed = {} if settling is None else self._committed(settling)
                if committed:
                    todo = await self._committed_before(todo, committed, seen)
                adding, todo = todo, []  # (unanswered: `_unsure`, not owed again)
                bounds = [(c.start, c.end) for _, c, _ in adding]
                gone = await self._reconciled(adding, bounds, seen, fresh)
                todo = [adding[i] for i in gone]  # vanished again: seeded again
            raise RedisError("window keys vanished while being seeded")
        except BaseException:
            for key, counter, amount in todo:
                self._owe(counter, amount, in_transit=True)
                # With their places again, for the payment that adds them: owed without, a
                # seed by another instance that holds them had them added again (+1 after an
                # unanswered payment whose key a seed failed to make).
                track = self._tracks.get(key)
                if fresh and key in fresh and track is not None:
                    track.fresh[:0] = fresh[key]
            raise

    def _to_new_windows(
        self, todo: list[_Charge], reset: Collection[WindowCounter]
    ) -> list[_Charge]:
        """Charges in transit whose counters moved to a window begun anew (found in the store
        by a seed, `_Moved`, or by its mark, `_reconciled`), to add to the new window's key.
        New terms carry them all over; a reset takes of them only what the ledger counts in the
        new window now (settled since, made without Redis): what the store holds already in
        the old window, or what stays there (`_keep_the_old_window_s`), is out of transit, not
        added to the new window (a heartbeat that found Redis emptied owed the $0.30 it wrote
        before a reset: charged again in the new window, 70 admitted after the reset, not 100)."""
        room: dict[WindowCounter, int] = {}
        for _, counter, amount in todo:
            if counter in reset:
                room[counter] = room.get(counter, 0) + amount
        for counter, ours in room.items():
            others = self._transit.get(counter, 0) - ours  # added by their own calls
            room[counter] = max(counter.unwritten(self.ledger) - others, 0)
        moved: list[_Charge] = []
        for _, counter, amount in todo:
            if counter in room:
                take = min(amount, room[counter])
                room[counter] -= take
                if take < amount:
                    self._arrived(counter, amount - take)
                amount = take
            if amount:
                moved.append((self.window_key(counter), counter, amount))
        return moved

    def _arrived(self, counter: WindowCounter, amount: int) -> None:
        """A charge in transit reached Redis (or needs not: its window ended)."""
        left = self._transit.get(counter, 0) - amount
        if left > 0:
            self._transit[counter] = left
        else:
            self._transit.pop(counter, None)

    def _in_transit(self, counter: WindowCounter, amount: int) -> None:
        self._transit[counter] = self._transit.get(counter, 0) + amount

    # -- settlement ----------------------------------------------------------------------

    async def settle(self, ticket: Ticket, cost: int, tokens: int) -> None:
        if ticket.settled:
            return
        now = self.clock()
        # Locally exactly as in process: the charge goes to the ledger (and so to the store).
        admission.settle(ticket, cost, tokens, now, self.ledger)
        limits = ticket.limits
        # Its budgets are looked at as the charge lands here, and again as Redis answers with
        # every instance's spend (`_settle_there`), each with no await between: looked at once
        # the settlement was awaited, the charges of requests settled here meanwhile were in
        # the spend its alert told (a crossing at $0.10 of $0.20 told "$0.20 of $0.20").
        self.landed(limits, cost)
        takes = self._takes  # a flush taking the charge before the script answers: written
        windows = {c: c.start for c in limits.budgets + limits.soft_budgets} if cost else {}
        if not ticket.request_id:  # admitted in process while Redis was down
            self._owe_settlement(ticket, cost, tokens)
            return
        self._state.live.pop(ticket.request_id, None)
        # Stopped (no client): owed as with Redis away, paid when the engine next starts or at
        # exit. Run on the closed client, each reopened a connection nobody closed, and one
        # that paid debts first failed an assertion: the request answered with an exception.
        if self._backing_off() or self._settle is None:
            self._owe_settlement(ticket, cost, tokens)
            self._release_later(ticket, now)
            return
        plan = self._plan(ticket.scopes, now, settling=True)
        # In transit until the script has added it: a seed meanwhile leaves it out.
        done = self._done_key(ticket.request_id)
        for entry in plan:
            if entry.counter is not None:
                amount = tokens if entry.kind == "t" else cost
                if amount:
                    self._in_transit(entry.counter, amount)
                    # The newest charge of its window here: confirmed once the store has
                    # confirmed all the window's charges it has not yet.
                    counter = entry.counter
                    window = (counter.kind, counter.id, counter.start)
                    waiting = self._settling.setdefault(window, {})
                    waiting[done] = [counter.unwritten(self.ledger), None]
                    self._settling_of.setdefault(done, {})[entry.keys[0]] = window
        # A task of its own, which the caller waits for: a caller that stops waiting (a client
        # gone, `asyncio.wait_for` around an SDK call, a task group's cancellation) does not
        # cut it before settle.lua has run, nor between Redis adding a charge and its answer.
        # (anyio's shielded scope stops no `task.cancel()`: a settlement cut while it paid the
        # debts first never reached Redis, whose window then missed its cost for good.)
        task = asyncio.get_running_loop().create_task(
            self._settle_there(ticket, cost, tokens, plan, now, takes, windows)
        )
        self._paying.add(task)
        task.add_done_callback(self._paid)
        # Its caller may stop waiting (Starlette's `StreamingResponse` cancels the send that
        # settles a stream as its last chunk goes): the charge lands all the same, and its
        # budgets are looked at as Redis answers.
        await asyncio.shield(task)

    async def _settle_there(
        self,
        ticket: Ticket,
        cost: int,
        tokens: int,
        plan: list[_Entry],
        now: float,
        takes: int,
        windows: dict[WindowCounter, float],
    ) -> None:
        """`settle`'s part in Redis: the debts first, then settle.lua, then any window key
        it found missing."""
        if (
            self._owed or self._releases or self._unsure
        ):  # what was charged while Redis was away first
            with contextlib.suppress(RedisError, OSError, _StoreDown):
                await self._pay_debts_whole()
        if self._carries:  # a window new terms moved: carried before it is charged
            with contextlib.suppress(RedisError, OSError):
                await self.write_marks()
        assert self._settle is not None  # (`settle` saw it set)
        keys, kinds = self._settle_layout(plan)
        moved: set[WindowCounter] = set()
        try:
            for _ in range(3):
                answer: list[Any] = await self._settle(
                    keys=[*keys, self._done_key(ticket.request_id), self._mark_key],
                    args=[ticket.request_id, cost, tokens, *kinds],
                )
                if not answer or answer[0] != "moved":
                    kept = int(answer.pop()) if answer else 1  # the mark: Redis kept its data
                    break
                # A window begun anew elsewhere since it began here (a budget reset, new
                # terms): what settles now counts in the new window (as `admission.settle`
                # counts it there).
                for n in range(1, len(answer), 2):
                    counter = plan[int(answer[n]) - 1].counter
                    assert counter is not None
                    self._moved(counter, answer[n + 1], now)
                    moved.add(counter)
                plan = self._plan(ticket.scopes, now, settling=True)
                keys, kinds = self._settle_layout(plan)
            else:
                raise RedisError("budget windows kept moving while being settled")
        except (RedisError, OSError, asyncio.CancelledError) as exc:
            # It may have run (answered past the timeout, or after its caller stopped
            # waiting: `asyncio.wait_for` around an SDK call): added later only if it did
            # not, and out of transit then, not left out of every seed of its windows.
            charges = [
                (e.keys[0], e.counter, tokens if e.kind == "t" else cost)
                for e in plan
                if e.counter is not None and (tokens if e.kind == "t" else cost)
            ]
            if charges:
                self._unsure.append((self._done_key(ticket.request_id), charges, {}))
            else:
                self._settled_out(self._done_key(ticket.request_id))
            self._releases.append(("settle", keys, [ticket.request_id, 0, 0, *kinds]))
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._failed(exc)
            return
        self._recovered()
        lost: list[_Charge] = []
        for entry, value in zip(plan, answer, strict=True):
            counter = entry.counter
            if counter is None:
                continue
            amount = tokens if entry.kind == "t" else cost
            if int(value) >= 0:
                self._told(counter, entry.keys[0], int(value))
                if amount:
                    self._arrived(counter, amount)
                    if not kept:  # in a key made since the loss (`heartbeat` takes it)
                        self._after_loss[counter] = self._after_loss.get(counter, 0) + amount
                    if entry.kind in "bs" and takes == self._takes and counter not in moved:
                        self._applied(counter, windows[counter], amount)
            elif amount:
                # Its window has no key yet (the window just began, or Redis restarted
                # empty): the charge must reach it all the same.
                lost.append((entry.keys[0], counter, amount))
        self.landed(ticket.limits, cost)  # the spend of every instance, as Redis answered it
        done = self._done_key(ticket.request_id)
        if not lost:
            self._settled_out(done)
            return
        try:  # what it cannot add stays owed
            await self._into_windows(lost, settling=done)
        except (RedisError, OSError) as exc:
            self._failed(exc)
        except _StoreDown:
            pass
        finally:
            self._settled_out(done)

    # -- slots of live requests ----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self._beat_interval
        task = asyncio.current_task()
        assert task is not None
        while True:
            await asyncio.sleep(interval)
            try:
                if (self._owed or self._releases or self._unsure) and not self._backing_off():
                    await self._pay_debts_whole()
                    self._recovered()
            except (RedisError, OSError) as exc:
                self._failed(exc)
            except _StoreDown:
                pass  # a lost key could not be seeded: the store is away; the next round tries
            if task.cancelling():  # (as below)
                raise asyncio.CancelledError
            # The beat goes on whether or not the debts were paid: skipped with them, a debt
            # waiting for the store (a key to seed) left the slots of the requests in flight to
            # expire (another instance admitted 3 at once on a limit of 2), and a rollback untold.
            try:
                if (self._marks or self._carries) and not self._backing_off():
                    await self.write_marks()  # a reset made while Redis was away, say
                await self.heartbeat()
                await self._pay_left()  # (left by engines stopped while Redis was away)
            except (RedisError, OSError) as exc:
                self._failed(exc)
            except _StoreDown:
                pass  # a lost key could not be seeded: the store is away; the next round tries
            if task.cancelling():
                # Cancelled (`stop`) during a Redis call that turned the cancellation into a
                # connection error: going round again would keep `stop` waiting for ever.
                raise asyncio.CancelledError

    async def heartbeat(self) -> None:
        """Push out the expiry of this instance's slots and reservations in flight, and renew
        its mark (also with nothing in flight: gone, it means Redis lost its data)."""
        # Not skipped while backing off: it runs in the background, so trying costs no request a
        # wait, and a slot left to expire after Redis is back would lift a concurrency limit.
        if self.client is None or self._beat is None:
            return
        self._beating = True
        try:
            await self._beat_once()
        finally:
            self._beating = False

    async def _beat_once(self) -> None:
        assert self.client is not None and self._beat is not None
        live = self._state.live
        now = self.clock()
        keys = [self._mark_key, f"{self.prefix}fence"]
        self._beats += 1
        beat = self._beats
        args: list[Any] = [
            int((now + self.slot_ttl) * 1000),
            int(self.slot_ttl * 2000),
            self._mark_ttl_ms,
            1 if self._beat_unanswered else 0,
            self._fence_ms if self._beaten else 0,
            beat,
            self._beat_floor,
            self.prefix,
        ]
        hashes = f"{self.prefix}rh:"
        beating = list(live.values())
        for ticket in beating:
            for key in ticket.holds:
                keys.append(key)
                if key.startswith(hashes):
                    args += [ticket.request_id, "h", ticket.reservation]
                else:
                    args += [ticket.request_id, "z", 0]
        try:
            lost, restored, rolled = await self._beat(keys=keys, args=args)
        except BaseException:
            # Unanswered: what the store confirmed is still to weigh, and a loss this call found
            # (and marked "0") is told by the next.
            self._beat_unanswered = True
            raise
        self._beat_unanswered = False
        self._beat_floor = max(self._beat_floor, beat)
        if int(rolled):
            logger.warning(
                "budget-middleware: Redis came back from an older snapshot (this instance's "
                "mark had an older heartbeat); its keys are dropped and seeded from the store"
            )
        owe = int(lost) and self._beaten
        if owe:
            await self._writes_confirmed()
        # Read before what the store confirmed and what is unwritten are taken: a flush that
        # confirmed in between moved charges from one to the other unseen.
        seeds: dict[str, tuple[float, str]] = {}
        counted: dict[str, set[str]] = {}
        taking = [*self._taken.values(), *self._taken_since_beat.values()] if owe else []
        if owe and (self._written or self._seeded_after_loss or taking):
            seeds, counted = await self._seed_records({w for batch in taking for w in batch})
        # What the store confirmed, taken once the answer is here: a payment of debts that ran
        # meanwhile took off it what another instance's seed holds (`_leave_out_seeded`); taken
        # before, the outage's charges were owed again (16 admitted on $0.25, not 25).
        written, self._written = self._written, {}
        taken = {**self._taken, **self._taken_since_beat}  # (as `written`: taken at once)
        self._taken_since_beat = {}
        early = self._confirmed_before_beat() if owe else {}
        beats = {key: track.confirmed for key, track in self._tracks.items()}
        # A seed of ours made before the beat found the mark gone, or after but before its
        # answer was read (the mark "0"), has its key here (its record read above); one made
        # after finds it "1" (and holds nothing of the loss).
        self._seeded_after_loss = set()
        after_loss, self._after_loss = self._after_loss, {}
        if owe:  # (the places of debts since the beat before: `_Track.beat`, not moved yet)
            self._owe_unwritten(written, seeds, after_loss, early, counted, taken)
        for key, confirmed in beats.items():  # `_written` holds what was confirmed since
            track = self._tracks.get(key)
            if track is not None:
                track.beat = confirmed
        self._beaten = True
        if int(lost):
            # Written again in a body: a request that settled meanwhile lets its holds go.
            settled = [t for t in beating if t.request_id not in live]
            if settled:
                pipe = self.client.pipeline(transaction=False)
                for ticket in settled:
                    for key in ticket.holds:
                        if key.startswith(hashes):
                            pipe.hdel(key, ticket.request_id)
                        else:
                            pipe.zrem(key, ticket.request_id)
                await pipe.execute()
            if int(restored):
                logger.warning(
                    "budget-middleware: Redis had lost %d slots and reservations of requests "
                    "in flight here; they are held again",
                    int(restored),
                )
        if owe and self._owed:
            await self._pay_debts_whole()
        self._recovered()

    async def _writes_confirmed(self, windows: Collection[tuple[str, str, float]] = ()) -> None:
        """After a loss, a write the flusher has under way (taken, not confirmed yet) is let
        come back before the heartbeat weighs: the store may have committed it before another
        instance's seed read the store, so that seed holds it, and only its confirmation (with
        the moment it committed) tells so. Weighed before, it counted as unwritten, in no seed,
        and was added again ($0.30 written just before an empty restart, confirmed late on a
        loaded loop: $0.61 in Redis for $0.31 spent, 70 admitted on a limit of 100). A seed
        of ours waits so for a write of its `windows` (`_seed_now`). Only while a write is
        under way (`writing`): charges taken by a write that failed (the store away, batches
        taken over from a gone engine) wait for no write that can come, and a seed of their
        window waited a whole beat interval (2 s a request, a flush every 2 s). Bounded by a
        beat interval: a write that hangs is weighed as unwritten, twice at worst."""
        deadline = time.monotonic() + self._beat_interval
        while self._writing and (
            any(w in self.ledger.unconfirmed for w in windows)
            if windows
            else self.ledger.unconfirmed
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            came = self._write_came  # set by `committed_at`, for every waiter
            if came is None or came.is_set():
                came = self._write_came = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(came.wait(), left)

    # -- faults --------------------------------------------------------------------------

    def _backing_off(self) -> bool:
        """Redis is left alone: backing off after a failure, or no client (the counters
        stopped: a request admitted as the engine shuts down, or after, is served as with Redis
        away; on the closed client, one that paid debts first failed an assertion, a 500)."""
        return self.client is None or self._state.retry_at > time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        """A call failed: Redis is left alone for a back-off that doubles once per round of
        tries (the calls that fail together are one round, not one doubling each: 40 at once
        took it from 0.25 to 2 s), and the pool's connections are dropped, so that none left
        from before is what the next request tries once Redis is back."""
        state = self._state
        now = time.monotonic()
        if not state.logged:
            logger.warning("budget-middleware Redis unreachable: %s", type(exc).__name__)
            state.logged = True
        if state.retry_at > now:
            return  # backing off already: a call of the round that failed
        state.backoff = min(max(state.backoff * 2, BACKOFF_MIN_SECONDS), BACKOFF_MAX_SECONDS)
        state.retry_at = now + state.backoff
        client = self.client
        if client is not None and isinstance(
            exc, RedisConnectionError | RedisTimeoutError | OSError
        ):
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to drop now
                task = asyncio.get_running_loop().create_task(_drop_connections(client))
                _DROPPING.add(task)
                task.add_done_callback(_DROPPING.discard)

    def _recovered(self) -> None:
        state = self._state
        if state.logged:
            logger.warning("budget-middleware Redis reachable again")
        state.logged = False
        state.backoff = 0.0
        state.retry_at = 0.0


_DROPPING: set[asyncio.Task[None]] = set()


async def _drop_connections(client: Redis) -> None:
    """The pool's idle connections (those in use fail or answer by themselves)."""
    with contextlib.suppress(RedisError, OSError):
        await client.connection_pool.disconnect(inuse_connections=False)


class _StoreDown(Exception):
    """The store could not be read to seed a window."""


class _Moved(Exception):
    """A window to seed was found begun anew since it began (`_seed_now`): the counter has moved
    to the new window, whose key is another; the caller plans again. `reset`: the counters moved
    by a reset (the others by new terms)."""

    def __init__(self, reset: list[WindowCounter]) -> None:
        super().__init__()
        self.reset = reset
