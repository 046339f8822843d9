"""The engine: one per settings in a process, shared by the middleware and the admin app.

It owns the store, the caches, the live counters and the flusher, and answers the middleware's
three questions: who is this key, may this request pass, and what did it cost.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from cachetools import Cache, LRUCache, TTLCache

from budget_middleware.core.admission import FirstAdmitted, Refusal, Ticket
from budget_middleware.core.identity import hash_key, key_digest
from budget_middleware.core.records import Delta, UsageRecord
from budget_middleware.core.scopes import GlobalConfig, KeyConfig, LimitSet
from budget_middleware.core.times import from_ts
from budget_middleware.core.windows import Carry, CounterRegistry, reset_moment
from budget_middleware.engine.alerts import Alerts
from budget_middleware.engine.cache import NOT_CACHED, KeyCache, ScopeBuilder
from budget_middleware.engine.gate import Gate
from budget_middleware.engine.hooks import Hook, Hooks
from budget_middleware.engine.mounts import UNKNOWN, announce
from budget_middleware.engine.portal import (
    engines,
    exit_on_sigterm,
    is_background,
    keep_inherited,
    settle_open_at_exit,
    started_in_background,
)
from budget_middleware.engine.prices import PriceBook
from budget_middleware.engine.rounds import FailedRounds
from budget_middleware.exceptions import ConfigurationError, ServiceUnavailable, StoreSchemaError
from budget_middleware.settings import BudgetSettings, raised_again
from budget_middleware.store import alerts as stored_alerts
from budget_middleware.store.counters import CounterBackend, MemoryCounters
from budget_middleware.store.database import GlobalRecord, KeyRecord, Store, in_memory
from budget_middleware.store.spill import (
    Spill,
    legacy_spill_folder,
    spill_folder,
    spill_root,
    unclaimed_legacy_folder,
)

if TYPE_CHECKING:
    from budget_middleware.engine.exchange import Exchange
    from budget_middleware.manage.manager import BudgetManager

logger = logging.getLogger("budget_middleware")

_engines = engines  # every engine of this process, by its settings
# Every engine made in this process, of `engines` or not (one an app made itself,
# `BudgetEngine(settings)`, given to an adapter as `engine=`): each is a forked child's afresh.
# Left out, such an engine the master had started (gunicorn `--preload`) hung a worker's first
# request for ever on what its parent's loop held.
_made: weakref.WeakSet[BudgetEngine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (gunicorn `--preload`) starts every started engine afresh."""
    for engine in list(_made):
        if engine.started or engine.loop is not None:
            engine.after_fork_in_child()
        else:  # made, not started, in the parent (gunicorn --preload): this process's now
            engine.take_this_process()


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_engine(settings: BudgetSettings | None = None) -> BudgetEngine:
    """The engine for these settings; equal settings share one engine in a process."""
    settings = settings if settings is not None else BudgetSettings()
    if not isinstance(settings, BudgetSettings):  # a dict of them said "no attribute cache_key"
        raise TypeError(
            f"settings must be a BudgetSettings, not {type(settings).__name__}: "
            "settings=BudgetSettings(reserve=False), or BUDGET_* variables and no settings"
        )
    key = settings.cache_key()
    engine = _engines.get(key)
    if engine is None:
        engine = BudgetEngine(settings)
        _engines[key] = engine
    return engine


@dataclass(slots=True)
class Stats:
    """What the metrics endpoint reports (the engine keeps it up to date)."""

    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_requests: int = 0
    last_flush_at: float | None = None
    flush_failures: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # set aside, by kind
    shadow_refusals: dict[str, int] = field(default_factory=dict)  # by code (SPEC §14)
    spilled_batches: int = 0  # written to disk while the store was down (`store.spill`)
    spill_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_refused(self, code: str) -> None:
        """One request refused for `code`. A WSGI server refuses in its own threads (a 401,
        a 413), outside the engine's lock: the count is read and written under a lock of its
        own, or threads lose each other's."""
        with self.lock:
            self.refused[code] = self.refused.get(code, 0) + 1


@dataclass(slots=True)
class Batch:
    """Charges and usage records written in one transaction, under an id the store remembers
    (a batch retried after an unclear commit is not applied twice)."""

    id: str
    deltas: list[Delta]
    records: list[UsageRecord]
    refused: int = 0  # writes that failed while the store took others
    path: str | None = None  # its copy on disk, while the store cannot take it (`store.spill`)
    own: bool = True  # taken by this engine's flush: its charges are in this engine's ledger

    @property
    def size(self) -> int:
        return len(self.deltas) + len(self.records)

    def halves(self) -> list[Batch]:
        """Two smaller batches with ids of their own, derived from this one's (so a retried split
        is idempotent too); the records keep the ids they had in the whole batch."""
        records = [
            r if r.request_id else r._replace(request_id=f"{self.id[:16]}{i:016x}")
            for i, r in enumerate(self.records)
        ]
        if self.deltas and records:
            parts: list[tuple[list[Delta], list[UsageRecord]]] = [(self.deltas, []), ([], records)]
        elif len(self.deltas) > 1:
            middle = len(self.deltas) // 2
            parts = [(self.deltas[:middle], []), (self.deltas[middle:], [])]
        else:
            middle = len(records) // 2
            parts = [([], records[:middle]), ([], records[middle:])]
        return [
            Batch(hashlib.sha256(f"{self.id}/{n}".encode()).hexdigest()[:32], *part, own=self.own)
            for n, part in enumerate(parts)
        ]


def _spill_for(settings: BudgetSettings) -> Spill | None:
    """The spill folder of this store; none for a store in memory (it goes with the process)."""
    url = settings.database_url
    if in_memory(url):
        return None
    root = spill_root(settings.spill_dir)
    folder = spill_folder(root, url)
    unclaimed = unclaimed_legacy_folder(root, url)
    if unclaimed is not None:
        logger.warning(
            "budget-middleware: an earlier release left unwritten batches in %s for a store "
            "named %s, which may be this one or another app's with the same relative path: if "
            "it is this store's, move its .json files into %s and they are written",
            unclaimed,
            url,
            folder,
        )
    return Spill(folder, legacy_spill_folder(root, url))


_RESET_WAIT_SECONDS = 30.0
SWEEP_SECONDS = 60.0  # how often expired windows are reset in the store
PRUNE_SECONDS = 3600.0  # how often the ids of applied batches older than FLUSH_IDS_KEPT go
# A batch id is remembered this long: a batch tried again later (a spilled one, taken back after
# a crash between its write and its file's removal) is applied once if it comes within it.
FLUSH_IDS_KEPT = timedelta(days=30)
# An alert's deliveries (a row a webhook URL) are kept this long after it was raised, once
# settled, then pruned with the batch ids (`store.alerts.prune_deliveries`), each URL's newest
# kept.
ALERT_DELIVERIES_KEPT = timedelta(days=30)
# An alert, once settled, is kept (listed by `GET /alerts`) this long after it was raised and
# after its window ended (a window still current keeps its alerts), then pruned with them
# (`store.alerts.prune_alerts`; one a URL's kept delivery names stays): `bm_alerts` grew a row
# a budget, window and threshold crossed, for ever.
ALERTS_KEPT = timedelta(days=30)
# ... at most this many a sweep: the flusher waits for its sweep, and a store's first prune
# (its whole history, at the upgrade to schema 14) took it minutes (100,000 rows: 7 s with no
# flush and no re-read of the counters); what is left goes at the next sweeps.
ALERT_DELIVERIES_PRUNED_A_SWEEP = 10_000
ALERTS_PRUNED_A_SWEEP = 10_000  # (the same for alerts)


def _due(now: float, last: float, every: float) -> bool:
    """Whether a flusher round that runs every `every` seconds of the clock is due: that long
    has passed since `last`, or the clock was stepped back before `last` (NTP), which would
    otherwise hold the round back until the clock came back there (an hour's step: an hour with
    no re-read of the counters and configuration other instances write, and no sweep)."""
    return now - last >= every or now < last


def _written_at_exit(ref: weakref.ref[BudgetEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine._settle_at_exit()


# The engines kept for the exit's write (`BudgetEngine.held_for_exit`), written by one exit
# callback registered at import, so run after any registered later: an engine the collector
# finds holding charges during the exit (another handler's work) is held then, and written
# too. A callback of its own registered then never ran, and its weak one was cut: all lost.
_held: list[BudgetEngine] = []


def _write_held_at_exit() -> None:
    while _held:
        try:
            _held.pop(0)._settle_at_exit()
        except Exception:  # (as a callback of its own: the others are written all the same)
            logger.exception("budget-middleware could not write an engine's charges at exit")


atexit.register(_write_held_at_exit)


class _Handoff:
    """A reset sent to the engine's loop: done there unless its caller gave up waiting."""

    __slots__ = ("at", "gave_up", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gave_up = False
        self.at: float | None = None

    def take(self, reset: Callable[[str, str], float], kind: str, id: str) -> float | None:
        with self.lock:
            if not self.gave_up:
                self.at = reset(kind, id)
            return self.at


class BudgetEngine:
    def __init__(self, settings: BudgetSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.database_url)
        self.registry = CounterRegistry()
        self.builder = ScopeBuilder(self.registry, clock)
        self.keys = KeyCache(settings.cache_ttl_seconds)
        # Every key this process has seen valid, by digest, as last read: with fail-open, an
        # outage admits these (their last-known limits apply) and no other key.
        self.last_known: LRUCache[bytes, KeyConfig] = LRUCache(maxsize=1_000_000)
        # The digests of the keys seen valid, by id: a key `charge_to(virtual_key_id=...)` names
        # is found among `last_known` through it (`lookup_key_id`'s fail-open).
        self._id_digests: LRUCache[str, bytes] = LRUCache(maxsize=1_000_000)
        self.globals = GlobalConfig()
        self.globals_loaded_at = float("-inf")
        self._globals_reads = 0  # reads of them begun, numbered in order
        # The limits outside the key hierarchy as a write here left them, read by its thread
        # right after it (`written_here`), with when: served if the next re-read fails.
        self._written_globals: tuple[float, GlobalRecord] | None = None
        self._globals_read = 0  # the number of the read in place
        self.prices = PriceBook(
            settings.pricing_file, clock, settings.unpriced_models, settings.mode == "shadow"
        )
        self.counters: CounterBackend
        backend_needs = (self.registry, self.store, settings, clock, self._store_failed)
        if settings.redis_url:
            from budget_middleware.store.redis_counters import RedisCounters

            self.counters = RedisCounters(*backend_needs)
        else:
            self.counters = MemoryCounters(*backend_needs)
        # In process, admission and settlement are plain calls (no coroutine, no await).
        self.memory = self.counters if isinstance(self.counters, MemoryCounters) else None
        self.in_process = self.memory is not None
        self.stats = Stats()
        self.records: list[UsageRecord] = []
        # Batches taken and not yet written, oldest first: retried before anything newer.
        self.unwritten: list[Batch] = []
        # Where batches wait on disk while the store is down (None: a store in memory).
        self.spill = _spill_for(settings)
        self.counters.spill = self.spill
        self._spilled = self.spill is not None  # batches may wait there: look at start-up
        # Set aside (the store refuses them) and not yet saved in its table of rejects.
        self.rejects_to_save: list[tuple[str, str, str, float]] = []
        self.startup_hooks: list[Callable[[Store], None]] = []
        self.started = False
        self._prepared = False  # the schema made and BUDGET_CONFIG_FILE applied, once
        self.stale = False  # a write to reload before the next request (`ensure_current`)
        self._changed = False  # a write since the reload under way began
        self._writes = 0  # writes seen (mark_stale): a key read across one is read again
        self._forgotten: list[str] = []  # ids of keys and owners written since (`forget`)
        # Answers dropped when no loop ran this engine, settled by the next one (or at exit)
        # Dropped answers to settle, by id: while no loop runs the engine, and while one is
        # sent to a loop that may never run it again (it is taken out when it runs there).
        self._orphans: dict[int, tuple[Exchange, Callable[[], str | None]]] = {}
        self._settles_at_exit = False
        self._held_for_exit = False
        self.forked_at = 0.0  # perf_counter() at a fork: what was admitted before is the parent's
        self._pid = os.getpid()
        self._reloading: asyncio.Future[None] | None = None  # the reload under way
        self.store_ok = True
        # The loop a start is under way on (`ensure_started`), claimed under `_claim`, a
        # thread's lock: callers of other loops and threads wait for that start to end.
        self._starting: asyncio.AbstractEventLoop | None = None
        self._claim = threading.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._loop_end: AsyncGenerator[None, None] | None = None  # (`_at_the_loop_s_end`)
        self._flush_lock: asyncio.Lock | None = None
        self._transient_failures = 0  # store writes failed for the moment, in a row
        self._pruned_at = float("-inf")  # the last prune of applied batch ids (`sweep`)
        self._deliveries_left = False  # alert deliveries to prune at the next sweep (`sweep`)
        self._alerts_left = False  # alerts to prune at the next sweep (`sweep`)
        self._stopping = asyncio.Event()
        self._key_loads: dict[str, asyncio.Future[KeyConfig | None]] = {}
        self._manager: BudgetManager | None = None
        # A configuration error met at start-up (BUDGET_CONFIG_FILE naming what the store does
        # not hold): the engine never starts, and its middlewares are told (they then raise it).
        self.failure: ConfigurationError | None = None
        self.failure_listeners: list[weakref.WeakMethod[Callable[[Exception], None]]] = []
        # The start-up line, written at the first start (the WSGI middleware's: no lifespan).
        self.start_line: Callable[[], str] | None = None
        self.hooks = Hooks()  # the app's on_alert, on_refusal, on_settled (SPEC §14)
        self.alerts = Alerts(self)
        self.builder.on_budget = self.alerts.on_budget
        self.counters.on_thresholds = self.alerts.stored_thresholds
        self.counters.thresholds_here = self.alerts.thresholds.get
        self.counters.on_landed = self.alerts.check
        self.gate = Gate(self)  # the way in for every adapter's requests
        self.loop: asyncio.AbstractEventLoop | None = None  # the one it was started in
        self._keys_by_id: TTLCache[str, tuple[KeyConfig, bytes] | None] = TTLCache(
            maxsize=100_000, ttl=settings.cache_ttl_seconds
        )
        self._install_default_hooks()
        _made.add(self)  # (made whole: a forked child starts it afresh)

    def _install_default_hooks(self) -> None:
        if self.settings.config_file is not None:
            from budget_middleware.manage.config_file import check_config_file, load_config_file

            # What can be checked without the store fails here, with the settings' own errors.
            check_config_file(self.settings.config_file)
            settings = self.settings
            moved = self.terms_moved  # new terms carried in the live counters (Redis)
            forget = self.forget  # keys and owners written: not vouched for as last read
            priced = self.prices.add_deployments  # the file's deployment prices (LiteLLM's)
            self.startup_hooks.append(
                lambda store: load_config_file(store, settings, moved, forget, priced)
            )

    @property
    def pending_records(self) -> int:
        """Usage records not yet written to the store."""
        return len(self.records) + sum(len(b.records) for b in self.unwritten)

    @property
    def pending_deltas(self) -> int:
        """Counters with charges not yet written to the store."""
        ledger = self.registry.ledger
        return len(ledger.dirty) + len(ledger.sealed)

    @property
    def manager(self) -> BudgetManager:
        if self._manager is None:
            from budget_middleware.manage.manager import BudgetManager

            self._manager = BudgetManager(
                self.store,
                self.settings,
                on_change=self.written_here,
                on_owner_change=self.forget,
                reset_live=self.reset_live,
                on_new_terms=self.terms_moved,
                live=self.registry,
            )
        return self._manager

    # -- life cycle ----------------------------------------------------------------------

    async def ensure_started(self) -> None:
        """Create the schema, apply BUDGET_CONFIG_FILE, start the counters and the flusher.

        A store that cannot be reached raises, and the next call tries again; a configuration
        error (`ConfigurationError`) is final: every later call raises it again.
        """
        if self.started:
            loop = self.loop
            if loop is None or not loop.is_closed():
                return
        running = asyncio.get_running_loop()
        while True:
            with self._claim:
                if self.started:
                    loop = self.loop
                    if loop is None or not loop.is_closed():
                        return
                    # The event loop it ran in is gone (a script's `asyncio.run` per job): what
                    # it holds unwritten stays; its flusher and connections start again here.
                    self._left_closed_loop()
                if self.failure is not None:
                    raise raised_again(self.failure)
                starting = self._starting
                if starting is None or starting.is_closed():  # (one cut with its loop)
                    self._starting = running
                    break
            # Another call starts it, on this loop or on another thread's: waited for, not
            # with an asyncio lock (one of two loops: a release from the other thread never
            # woke the waiter, and a waiter of the other loop was refused "bound to a
            # different event loop"). Start-up only: a few polls.
            await asyncio.sleep(0.005)
        try:
            if not self._prepared:
                try:
                    await anyio.to_thread.run_sync(self._prepare_store)
                except ConfigurationError as exc:
                    self.failure = exc
                    self.store.dispose()  # nothing else was started
                    for ref in self.failure_listeners:
                        listener = ref()
                        if listener is not None:
                            listener(exc)
                    raise
                self._prepared = True
            await self.counters.start()
            await self.reload_globals()
            self._flush_lock = asyncio.Lock()
            await self._write_spilled()
            await self._reread_counters()
            self._stopping = asyncio.Event()
            self.loop = asyncio.get_running_loop()  # where sync callers send their work
            if is_background(self.loop):  # (shut down there at exit, made by the app or not)
                started_in_background.add(self)
            self.hooks.loop = self.loop
            self.alerts.start(self.loop)
            self._flusher = self.loop.create_task(self._flush_loop())
            self._loop_end = self._at_the_loop_s_end()
            await anext(self._loop_end)
            self.started = True
            if self.stats.last_flush_at is None:  # the lag of a writer that never wrote counts
                self.stats.last_flush_at = self.clock()  # from its start, not 0 for ever
            self.write_at_exit()
        finally:
            self._starting = None
        line, self.start_line = self.start_line, None  # once
        if line is not None:
            # In a worker thread, the loop left free: finding the admin mount may import the
            # host's URL conf (Django), whose code may call on this engine.
            try:
                announce(await anyio.to_thread.run_sync(line))
            except Exception:
                logger.exception("budget-middleware could not write its start-up line")
        await self._settle_orphans()

    async def _write_spilled(self) -> None:
        """Before the first request: write the batches gone engines left on disk (a process
        stopped or killed while the store could not be written). Their charges are in no live
        counter: served first, a budget they had spent was read from the store without them,
        and admitted whole again until the next re-read (a $0.50 budget: $1.00 spent). A store
        that cannot take them now leaves them to the flusher's rounds."""
        if self.spill is None or not self._spilled:
            return
        try:
            await self.flush()
        except Exception:
            logger.exception("budget-middleware could not write the spilled batches at start-up")

    async def _reread_counters(self) -> None:
        """Before the first request of a start, the live counters this engine holds already
        (none at a process's first start) re-read from the store, as the flusher re-reads them
        every TTL after: they may be of any age. A forked child's are its parent's as it last
        read them: each worker gunicorn `--preload` forks anew (`--max-requests`) admitted on
        the spend the master saw, for a TTL, and a budget of 30 requests' price took 38. A
        store that cannot be read leaves them as they are, for the flusher's next re-read."""
        try:
            await self._refresh_counters()
        except Exception as exc:
            self._store_failed(exc)

    async def _settle_orphans(self) -> None:
        """Settle the answers dropped while no loop ran this engine (`settle_later`)."""
        while self._orphans:
            exchange, outcome = self._orphans.pop(next(iter(self._orphans)))
            try:
                await exchange.settle_orphaned(outcome)
            except Exception:  # the request starting the engine goes on; the others are settled
                logger.exception("budget-middleware could not settle a dropped answer")

    def settle_later(self, exchange: Exchange, outcome: Callable[[], str | None]) -> None:
        """An answer dropped while no loop runs this engine: the next `ensure_started` settles
        it, or, if none comes, the process's exit (its charge written then)."""
        self._orphans[id(exchange)] = (exchange, outcome)
        self.held_for_exit()  # the answer's holder may go before it

    def __del__(self) -> None:
        """Collected while it holds charges it never wrote: its loop closed without its end (a
        script's `run_until_complete` then `close`: no task cancelled, no last flush) and the
        job's client, which alone held it (`engines` holds it weakly), dropped. Kept alive,
        from here, for the exit's write: the charges are not lost with it."""
        try:
            if os.getpid() == self._pid and (
                self._orphans or self.pending_records or self.pending_deltas or self.counters.owes()
            ):
                self.held_for_exit()
                # And the engine of its settings again, unless another is already: a new one
                # would admit on the store's spend, without these charges, until the exit.
                key = self.settings.cache_key()
                if _engines.get(key) is None:
                    _engines[key] = self
        except Exception:  # (made in part: its constructor failed; the interpreter ending)
            pass

    def held_for_exit(self) -> None:
        """Kept alive by the process's exit, which settles and writes what it holds then (once
        per engine): its adapters, which otherwise keep it, may go before (`engines` holds it
        weakly)."""
        if not self._held_for_exit:
            self._held_for_exit = True
            _held.append(self)  # (written by `_write_held_at_exit`)

    def write_at_exit(self) -> None:
        """At the process's exit, write what is pending if no loop will (once per engine; its
        adapter keeps it alive, so the exit holds it weakly)."""
        if not self._settles_at_exit:
            self._settles_at_exit = True
            atexit.register(_written_at_exit, weakref.ref(self))
            exit_on_sigterm()  # (an async script's engine: its loop's thread is the main one)

    def taken(self, exchange: Exchange) -> None:
        """A dropped answer's settlement ran on the engine's loop: not to settle later."""
        self._orphans.pop(id(exchange), None)

    def _settle_at_exit(self) -> None:
        """Dropped answers to settle, and charges and records to write, that no loop will: a
        script's `asyncio.run` ended, or a server was made to quit without its shutdown (a
        second Ctrl+C to uvicorn skips the lifespan's end, and with it the last flush)."""
        if os.getpid() != self._pid:
            return
        settle_open_at_exit()  # (no background loop, whose exit does it first: by the first)
        if not (
            self._orphans or self.pending_records or self.pending_deltas or self.counters.owes()
        ):
            return
        loop = self.loop
        run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
        if loop is not None and not loop.is_closed():
            if loop.is_running():
                return  # a loop runs the engine: it settled them as it started, and flushes
            # Left open and running nothing (a script's `run_until_complete`, never closed):
            # its flusher and connections are there, and it runs once more to write it all.
            run = loop.run_until_complete

        async def settle_and_write() -> None:
            try:
                await self.ensure_started()  # settles them
            except Exception as exc:  # the store unreachable: what is pending waits on disk
                if self.failure is not None or self.spill is None:
                    raise
                logger.warning("budget-middleware could not start at exit: %s", exc)
                if not self.started:  # never reached its store (fail-open): settled all the same
                    await self._settle_orphans()
            await self.shutdown()

        try:
            run(settle_and_write())
        except Exception:
            logger.exception(
                "budget-middleware could not write its pending charges at exit (%d dropped "
                "answers, %d usage records)",
                len(self._orphans),
                self.pending_records,
            )

    def add_hooks(
        self,
        on_alert: Hook | None = None,
        on_refusal: Hook | None = None,
        on_settled: Hook | None = None,
    ) -> None:
        """Hooks an adapter was given (SPEC §14); every adapter on this engine sees every event."""
        self.hooks.add(on_alert=on_alert, on_refusal=on_refusal, on_settled=on_settled)

    def describe(self, admin_path: str | None = None) -> str:
        """One line for the start-up log: the store and Redis (no password), the admin mount."""
        from budget_middleware.settings import without_password as hidden

        s = self.settings
        counters = (
            f"counters in Redis at {hidden(s.redis_url)}"
            if s.redis_url
            else ("counters in process (no BUDGET_REDIS_URL)")
        )
        if admin_path == UNKNOWN:  # the host app's routes cannot be read: not "none"
            admin = "admin API mount not known (an app whose routes cannot be read)"
        else:
            admin = f"admin API at {admin_path}" if admin_path else "no admin API mounted"
        mode = ", shadow mode" if s.mode == "shadow" else ""
        return f"budget-middleware: store {hidden(s.database_url)}, {counters}, {admin}{mode}"

    def needs_start(self) -> bool:
        """Not started yet, or started in an event loop that has closed since."""
        loop = self.loop
        return not self.started or loop is None or loop.is_closed()

    def _left_closed_loop(self) -> None:
        """The loop this engine started in has closed: forget what belonged to it (its tasks,
        locks, futures and connections), keep every charge, record and debt it holds."""
        self._forget_the_loop()
        self.counters.after_loop_closed()
        self.alerts.after_loop_closed()
        self.hooks.loop = None

    def _forget_the_loop(self) -> None:
        """Not started, and nothing of a loop's kept: tasks, locks and futures are a loop's."""
        self.started = False
        self.loop = None
        self._flusher = None
        self._loop_end = None  # (closed with its loop, or left to it: never run elsewhere)
        self._flush_lock = None
        self._starting = None
        self._stopping = asyncio.Event()
        self._key_loads = {}
        self._reloading = None

    def after_fork_in_child(self) -> None:
        """This process was forked from one where this engine had started (gunicorn
        `--preload`): its loop, threads, connections and unwritten charges are the parent's. The
        child starts afresh on first use; what the parent charged is written by the parent.
        The parent's loop and its tasks are kept, never closed nor collected (`keep_inherited`)."""
        keep_inherited(self.loop)
        self._forget_the_loop()
        self._claim = threading.Lock()  # (one some parent thread held at the fork stays held)
        self.forked_at = time.perf_counter()
        self._orphans = {}
        self.records = []
        self.unwritten = []
        self.rejects_to_save = []
        self.take_this_process()
        self.registry.forget_the_parent_s()
        self.counters.after_fork_in_child()
        self.alerts.after_fork_in_child()
        self.hooks.after_fork_in_child()

    def take_this_process(self) -> None:
        """In a forked child: this process's pid, store connections of its own (the parent's
        stay the parent's: a config seeded through the manager at import, gunicorn --preload,
        left pooled connections that every worker then shared), and a spill of its own (the
        parent's batches stay the parent's; the child looks for gone processes' at its first
        flush)."""
        self._pid = os.getpid()
        self.store.engine.dispose(close=False)
        if self.spill is not None:
            self.spill.after_fork()
            self._spilled = True

    def _prepare_store(self) -> None:
        self.store.create_schema()
        for hook in self.startup_hooks:
            hook(self.store)

    async def shutdown(self) -> None:
        """Stop the flusher and write every pending charge (lifespan shutdown).

        Every wait is bounded: a shutdown never hangs on a stuck flusher or a dead Redis.
        Called from another loop than the engine's (an app of equal settings served by another
        thread's loop, a script's next `asyncio.run`), it is done where the flusher runs.
        """
        loop = self.loop
        if self.started and loop is not None and loop is not asyncio.get_running_loop():
            if loop.is_running():  # its flusher, locks and connections are that loop's
                future = asyncio.run_coroutine_threadsafe(self.shutdown(), loop)
                await asyncio.wrap_future(future)
                return
            if loop.is_closed():  # what it holds unwritten stays, and is written below
                self._left_closed_loop()
        if not self.started:
            # Never started (the store unreachable from the first request on, fail-open): what
            # it admitted is written, or waits on disk for the next engine.
            if self.pending_records or self.pending_deltas or self.unwritten:
                await self._write_or_keep()
            return
        self.started = False
        # Claimed as a start is (`_starting`): a request meanwhile waits for this stop to end,
        # then starts the engine again. Started during it, the engine was left started with its
        # Redis client closed by this stop: every later request a 503 (fail-closed).
        with self._claim:
            self._starting = asyncio.get_running_loop()
        try:
            await self._stop()
        finally:
            self._starting = None

    async def _stop(self) -> None:
        grace = max(5.0, 3 * self.settings.flush_interval_seconds)
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            # Ask the loop to stop rather than cancel it: a flush under way finishes first.
            self._stopping.set()
            try:
                await asyncio.wait_for(asyncio.shield(flusher), grace)
            except TimeoutError:
                # Its write is stuck (a lock's busy wait, a server that does not answer): what
                # is held goes on disk first, the batch in that write too (applied after all,
                # its file goes; its id is applied once), as a kill may come before the wait
                # below ends (a supervisor's grace: every charge of the lock was lost).
                await self._spill_behind()
                flusher.cancel()  # a cancelled flush keeps its batch for the flush below
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
        await self.alerts.stop()
        leaving = await self._write_or_keep(give_up=False)
        try:  # (Redis's debts paid, now or never)
            await asyncio.wait_for(self.counters.stop(), grace)
        except TimeoutError:
            logger.warning("budget-middleware: the counter backend did not close in %ss", grace)
        finally:
            # Given up once the debts to Redis that name them are on disk: given up before, an
            # engine starting meanwhile took them over, unnamed, and counted their debts in its
            # seeds beside the file's payment (Redis $0.09 for $0.07 spent).
            if leaving:
                await self._give_up()
        # After the charges, the store's and Redis's: a receiver's wait delays no write (a kill
        # meanwhile lost Redis's debts).
        await self.alerts.deliver_last()
        # The async hooks under way (the last answers' `on_settled`, the alerts' `on_alert`):
        # the loop that runs them ends after this (a server's), cancelling what still runs.
        await self.hooks.finish()
        self.store.dispose()  # connections are opened again if the engine starts again
        loop_end, self._loop_end = self._loop_end, None
        if loop_end is not None:  # done: the counters closed their connections above
            await loop_end.aclose()

    async def _write_or_keep(self, *, give_up: bool = True) -> bool:
        """At the end: write what is pending, or leave it on disk to the next engine on this
        store (given up: anyone's), when the store cannot take it. Without `give_up`, the
        batches are named to the counters (`left_to_others`) and whether they are to be given
        up is returned, for `_give_up` once the counters have stopped."""
        if await self.flush():
            return False
        if self.spill is not None:  # a write failed for the moment too: on disk, not dropped
            await self._spill_behind()
        if self.spill is not None and all(b.path is not None for b in self.unwritten):
            self.counters.left_to_others(await anyio.to_thread.run_sync(self.spill.own_batches))
            if give_up:
                await self._give_up()
            return not give_up
        logger.error(
            "budget-middleware could not write %d usage records at shutdown: the store is "
            "unreachable",
            self.pending_records,
        )
        return False

    async def _give_up(self) -> None:
        """The batches this engine has on disk are anyone's now (`Spill.give_up`)."""
        assert self.spill is not None
        await anyio.to_thread.run_sync(self.spill.give_up)
        self.unwritten = []  # on disk, and anyone's: not this engine's to write
        self.registry.ledger.left_to_others()
        logger.warning(
            "budget-middleware could not write its pending charges at shutdown: the store "
            "is unreachable. They wait in %s, and the next engine on this store writes them",
            self.spill.folder,
        )

    async def _at_the_loop_s_end(self) -> AsyncGenerator[None, None]:
        """Held open while the engine runs on its loop; the loop closes it as it ends without a
        shutdown (a script's `asyncio.run`, pytest-asyncio's loop: `shutdown_asyncgens`), once
        every task it cancelled has finished (the flusher's last flush, the settlements of the
        answers those tasks held): the backend closes its connections there, on the loop. Left
        open, the collector found them after the loop had closed ("unclosed Connection", "loop
        is closed"), a warning in whatever code ran then: under `-W error`, a later test failed."""
        try:
            yield
        finally:
            if self.started and (self.pending_records or self.pending_deltas):
                # What the cancelled tasks settled after the flusher's last flush (a stream a
                # task was reading, closed in its cleanup): written while the loop runs, as the
                # engine may go with the job's last client, and what it held with it.
                with contextlib.suppress(Exception):
                    await self.flush()
            with contextlib.suppress(Exception):
                await self.counters.loop_ending()
            if self.pending_records or self.pending_deltas or self.counters.owes():
                self.held_for_exit()  # not written (the store down), or owed to Redis

    async def _flush_loop(self) -> None:
        try:
            await self._flush_rounds()
        except asyncio.CancelledError:
            # Cancelled by its loop's end (`asyncio.run` cancels what runs when it returns),
            # not by `shutdown` (which asks it to stop first): what is pending is written now.
            if not self._stopping.is_set():
                with contextlib.suppress(Exception):
                    await self.flush()
            raise

    async def _flush_rounds(self) -> None:
        interval = self.settings.flush_interval_seconds
        ttl = self.settings.cache_ttl_seconds
        last_refresh = last_sweep = self.clock()
        stopping = self._stopping
        failures = FailedRounds("flusher")
        # A flush an interval after the last one ended; woken every TTL meanwhile, for the
        # re-read (configuration outside the key hierarchy is trusted a TTL, as keys are: read
        # on the flush's rounds alone, a flush interval longer than the TTL kept a provider
        # budget lowered elsewhere from applying here for that interval).
        next_flush = time.monotonic() + interval
        tick = max(ttl, 0.01)  # (the shortest flush interval: a TTL of 1 µs spins no core)
        while not stopping.is_set():
            try:
                await asyncio.wait_for(
                    stopping.wait(), max(0.0, min(next_flush - time.monotonic(), tick))
                )
                return
            except TimeoutError:
                pass
            try:
                if time.monotonic() >= next_flush:
                    try:
                        await self.flush(drain=False)
                    finally:
                        next_flush = time.monotonic() + interval
                if _due(self.clock(), last_refresh, ttl):
                    last_refresh = self.clock()
                    await self.reload_globals()
                    await self._refresh_counters()
                    self.alerts.refreshed(self.registry.windows["budget"].values())
                if _due(self.clock(), last_sweep, SWEEP_SECONDS):
                    last_sweep = self.clock()
                    await self.sweep()
                    self._spilled = self.spill is not None  # a gone process's, since?
            except Exception as exc:  # the loop must survive anything; the next round retries
                failures.failed(exc)
            else:
                if self.store_ok:  # (a flush with the store away does not raise: it keeps)
                    failures.succeeded()

    @property
    def _flushing(self) -> asyncio.Lock:
        """The lock a flush and a re-read of the counters take turns under (made at its first
        use, on the loop that uses it)."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        return self._flush_lock

    async def _refresh_counters(self) -> None:
        """Re-read the live counters from the store (`CounterBackend.refresh`), never while a
        flush writes. A counter re-read is the store's usage plus what this process charged
        that the store does not hold yet (pending, or taken by a write not confirmed); a flush
        meanwhile (`flush()` called by an app, a script, a shutdown) moves charges from the one
        to the other under the read: read before its commit and taken in after it was
        confirmed, they were in neither (4 requests lost of 7), read after its commit and taken
        in before, in both (counted twice), until the next re-read. One uncontended lock a
        cache TTL; a flush waits for one store read at most."""
        async with self._flushing:
            forgotten = await self.counters.refresh()
        self.alerts.forget(c.id for c in forgotten if c.kind == "budget")

    async def sweep(self) -> int:
        """Reset the store's expired windows (SPEC §6's background sweep), and once an hour
        forget the ids of batches applied more than FLUSH_IDS_KEPT ago (else `bm_flushes` grows
        a row a flush for ever) and the deliveries of alerts settled and raised more than
        ALERT_DELIVERIES_KEPT ago (else `bm_alert_deliveries` grows a row an alert and URL),
        ALERT_DELIVERIES_PRUNED_A_SWEEP at most, the rest at the next sweeps; then the alerts
        settled, raised and out of their window more than ALERTS_KEPT ago (else `bm_alerts`
        grows a row a budget, window and threshold), the same way; 0 when the store cannot be
        written now (the next sweep tries again). The live windows that have ended roll first
        (`CounterRegistry.bring_to`): a charge made after the clock steps back lands in the
        window the store begins."""
        now = self.clock()
        self.registry.bring_to(now)
        try:
            swept = await anyio.to_thread.run_sync(self.store.sweep_windows, from_ts(now))
            if _due(now, self._pruned_at, PRUNE_SECONDS):
                await anyio.to_thread.run_sync(
                    self.store.prune_flushes, from_ts(now) - FLUSH_IDS_KEPT
                )
                self._pruned_at = now
                self._deliveries_left = True
            if self._deliveries_left:
                most = ALERT_DELIVERIES_PRUNED_A_SWEEP
                pruned = await anyio.to_thread.run_sync(
                    stored_alerts.prune_deliveries,
                    self.store,
                    from_ts(now) - ALERT_DELIVERIES_KEPT,
                    most,
                )
                self._deliveries_left = pruned >= most  # (more: the next sweep goes on)
                self._alerts_left = True  # (those whose deliveries went are free now)
            if self._alerts_left:
                most = ALERTS_PRUNED_A_SWEEP
                pruned = await anyio.to_thread.run_sync(
                    stored_alerts.prune_alerts, self.store, from_ts(now) - ALERTS_KEPT,
                    from_ts(now), most,
                )  # fmt: skip
                self._alerts_left = pruned >= most
            return swept
        except Exception as exc:
            logger.debug("budget-middleware window sweep failed: %s", exc)
            return 0

    # -- configuration -------------------------------------------------------------------

    async def reload_globals(self) -> None:
        """Read the limits outside the key hierarchy again. A read that began before the one
        in place (the flusher's, under way while a write was applied) never replaces it: it
        would put back what the write replaced, until the next re-read."""
        self._globals_reads += 1
        read = self._globals_reads
        began = time.monotonic()
        try:
            record = await anyio.to_thread.run_sync(self.store.load_globals)
        except Exception as exc:
            self._store_failed(exc)
            written, self._written_globals = self._written_globals, None
            if written is not None:  # what a write here left, read as it was made
                self.globals = self.builder.globals(written[1])
            return
        self.store_ok = True
        written = self._written_globals
        if written is not None and written[0] <= began:  # this read holds that write
            self._written_globals = None
        if read < self._globals_read:
            return
        self._globals_read = read
        self.globals = self.builder.globals(record)
        self.globals_loaded_at = self.clock()

    async def invalidate(self) -> None:
        """After a write through the admin API: the next request sees the change."""
        self.mark_stale()
        await self.ensure_current()

    def written_here(self) -> None:
        """A write committed through this process's management API, told by its thread right
        after the commit, once the write has let go of its connection (read holding it, as many
        writes at once as the pool has connections waited for each other: `_Writing`): the
        next request reloads what it changed (`mark_stale`), and the limits outside the key
        hierarchy are read now, while the store answers. An outage before that reload (fail
        open) served the provider, model or tag limits the write had replaced; it serves those
        written."""
        with contextlib.suppress(Exception):  # unread: the reload reads them, as before
            self._written_globals = (time.monotonic(), self.store.load_globals())
        self.mark_stale()

    def mark_stale(self) -> None:
        """After a write (the Python management API, from any thread): the next request in this
        process reloads what it needs. Only flags are set here; the event loop does the rest."""
        self._changed = True
        self._writes += 1
        self.stale = True

    def forget(self, owner_id: str) -> None:
        """A write through this process changed the key, team or customer of this id (from any
        thread): what this process last saw of the keys it holds vouches for them no more
        (fail-open) until they are read again. It served them in an outage as they were before
        the write: a key deactivated, or a key of a team given a $0 budget or deleted."""
        self._forgotten.append(owner_id)
        self.mark_stale()

    async def live_counters(self, ids: Collection[str] | None = None) -> CounterRegistry:
        """The live counters, as an answer from them shows them (SPEC §9's `from_memory`, the
        quota, §12's provider budgets, the metrics): with Redis, every instance's spend (`ids`:
        only these limits' are read again)."""
        await self.counters.read_live(ids)
        return self.registry

    async def ensure_current(self) -> None:
        """Reload what a write changed. `stale` stays set until the reload is done, so every
        request that comes meanwhile waits for it (one reload for all) instead of being decided
        on what the write replaced."""
        while self.stale:
            reloading = self._reloading
            if reloading is None:
                # A task of its own: a caller cancelled as it reloads leaves the reload to be
                # done (marked done before, the old limits served until the TTL).
                reloading = self._reloading = asyncio.ensure_future(self._reload())
                reloading.add_done_callback(_retrieved)
            await asyncio.shield(reloading)

    async def _reload(self) -> None:
        self._changed = False
        forgotten = self._forgotten
        if forgotten:  # after a write only: a pass over the keys vouched for
            written = set()
            while forgotten:  # one at a time: another thread may add to it meanwhile
                written.add(forgotten.pop())
            last_known = self.last_known
            for digest in list(last_known):
                config = Cache.__getitem__(last_known, digest)  # read, not made most recent
                if (
                    config.id in written
                    or config.team_id in written
                    or config.customer_id in written
                ):
                    last_known.pop(digest, None)
        try:
            self.keys.clear()
            self._keys_by_id.clear()
            await self.reload_globals()
        finally:
            self._reloading = None
        # A write during the reload (another thread's) leaves it stale: reloaded again.
        self.stale = self._changed

    def _store_failed(self, exc: BaseException) -> None:
        if self.store_ok:
            logger.warning("budget-middleware store unreachable: %s", type(exc).__name__)
        self.store_ok = False

    async def vouch_for(self, value: str, fail_open: bool) -> KeyConfig | None:
        """The key's configuration (None: unknown), as `lookup_key` reads it; with the store
        away and `fail_open`, the configuration this process last saw valid (a key admitted on
        its last-known limits). Raises ServiceUnavailable for a key nobody can vouch for: it is
        never admitted. Every adapter's way to a key it has not cached."""
        try:
            return await self.lookup_key(value)
        except ServiceUnavailable:
            found = self.last_known.get(key_digest(value)) if fail_open else None
            if found is None:
                raise
            return found

    async def lookup_key(self, value: str) -> KeyConfig | None:
        """The key's configuration; a cached key costs a hash and a dict lookup."""
        digest = key_digest(value)
        found = self.keys.get(digest)
        if found is not NOT_CACHED:
            return found
        key_hash = digest.hex()  # as the store keeps it
        pending = self._key_loads.get(key_hash)
        if pending is None:
            # Many first requests of one key share one store read, a task of its own: a caller
            # cancelled (`asyncio.wait_for` around an SDK call) leaves it to the others.
            pending = self._key_loads[key_hash] = asyncio.ensure_future(
                self._load_key(digest, key_hash)
            )
            pending.add_done_callback(_retrieved)
        return await asyncio.shield(pending)

    async def _load_key(self, digest: bytes, key_hash: str) -> KeyConfig | None:
        """A key not cached, read from the store and cached (`lookup_key`'s shared read)."""
        try:
            record, current = await self._read_across_writes(self.store.load_key, key_hash)
            config = None if record is None else self.builder.key(record)
            if current:
                self.keys.put(digest, config)
            if config is None:
                self.last_known.pop(digest, None)
            else:
                self.last_known[digest] = config
                self._id_digests[config.id] = digest  # (`charge_to(virtual_key_id=...)`)
            self.store_ok = True
            return config
        except Exception as exc:
            self._store_failed(exc)
            raise ServiceUnavailable("the budget store cannot be reached") from exc
        finally:
            del self._key_loads[key_hash]

    async def lookup_key_id(self, key_id: str) -> tuple[KeyConfig, bytes] | None:
        """A key's configuration by its id (`charge_to(virtual_key_id=...)`), cached as by value,
        with the key's digest: the value is not known there, and a model or provider holding
        it is told by its digest (SPEC §8). With the store away and BUDGET_FAIL_OPEN, the
        configuration this process last saw valid, as `vouch_for` finds a key by its value
        (SPEC §11); else ServiceUnavailable."""
        try:
            return self._keys_by_id[key_id]
        except KeyError:
            pass
        try:
            record, current = await self._read_across_writes(self.store.load_key_by_id, key_id)
        except Exception as exc:
            self._store_failed(exc)
            digest = self._id_digests.get(key_id) if self.settings.fail_open else None
            if digest is not None:
                known = self.last_known.get(digest)
                if known is not None and known.id == key_id:
                    return known, digest
            raise ServiceUnavailable("the budget store cannot be reached") from exc
        found = None
        if record is not None:
            found = (self.builder.key(record), bytes.fromhex(record.key.key_hash))
            self.last_known[found[1]] = found[0]
            self._id_digests[key_id] = found[1]
        else:
            gone = self._id_digests.pop(key_id, None)
            if gone is not None:
                self.last_known.pop(gone, None)
        if current:
            self._keys_by_id[key_id] = found
        return found

    async def _read_across_writes(
        self, load: Callable[[str], KeyRecord | None], arg: str
    ) -> tuple[KeyRecord | None, bool]:
        """A key's record, read again when a write landed while it was read (the read may
        have seen the store before it: cached, it would outlive the reload that the write
        asked for, until the cache TTL). With writes landing on every read, the last read is
        used for this request only: (record, False), not to be cached."""
        for _ in range(3):
            writes = self._writes
            record = await anyio.to_thread.run_sync(load, arg)
            if writes == self._writes:
                return record, True
        return record, False

    def limits_for(
        self, key: KeyConfig | None, provider: str, model: str, tags: tuple[str, ...]
    ) -> LimitSet:
        """Every limit that applies to a request (resolved once per key and target)."""
        if key is None:
            return self.globals.resolve_anonymous(provider, model, tags)
        return key.resolve(self.globals, provider, model, tags)

    # -- admission and settlement --------------------------------------------------------

    async def admit(self, limits: LimitSet, estimate: int) -> Ticket | Refusal:
        """Admission by the counters; the gate counts the request's outcome (`stats`)."""
        return await self.counters.admit(limits, estimate)

    def admit_now(self, limits: LimitSet, estimate: int) -> Ticket | Refusal:
        """Admission in process (memory counters only): atomic, no await."""
        memory = self.memory
        assert memory is not None, "admit_now needs the in-process counters"
        return memory.admit_now(limits, estimate)

    async def settle(self, ticket: Ticket, cost: int, tokens: int) -> None:
        await self.counters.settle(ticket, cost, tokens)  # its alerts: `on_landed`

    async def admit_first(
        self, candidates: Sequence[tuple[LimitSet, int]], most_remaining: bool = False
    ) -> FirstAdmitted:
        return await self.counters.admit_first(candidates, most_remaining)

    def settle_now(self, ticket: Ticket, cost: int, tokens: int) -> None:
        """Settlement in process (memory counters only)."""
        memory = self.memory
        assert memory is not None, "settle_now needs the in-process counters"
        memory.settle_now(ticket, cost, tokens)  # its alerts: `on_landed`

    def record(self, record: UsageRecord) -> None:
        stats = self.stats
        stats.input_tokens += record.input_tokens
        stats.output_tokens += record.output_tokens
        self.records.append(record)
        if self.hooks.on_settled:
            self.hooks.emit(self.hooks.on_settled, record)

    def reset_live(self, kind: str, id: str, after: float | None = None) -> float:
        """A budget's reset, in this process: its live counter starts a new window at a moment
        taken where requests settle (the engine's loop, or under its lock for WSGI), so that each
        charge falls on one side of it: before, the old window's; after, the new one's, requests
        admitted before included. Returns that moment, for the store to start the window at
        (`manage.BudgetManager.reset_budget`). From another thread it waits for the loop; a
        wait given up (the loop stuck) resets nothing. (A flush under way needs no waiting for:
        what it took ends before this moment, and the store keeps it out of the new window.)
        `after`: where the stored window began; the moment is after it (see `_reset_counter`)."""
        reset = functools.partial(self._reset_counter, after=after)
        loop = self.loop
        if loop is None or not loop.is_running() or self.cannot_wait():
            # No loop runs the engine, or this thread runs it or holds its lock: nothing
            # settles meanwhile.
            moment = reset(kind, id)
            self.counters.marks_soon()
            return moment
        handoff = _Handoff()
        future = asyncio.run_coroutine_threadsafe(self._reset_there(reset, kind, id, handoff), loop)
        try:
            at = future.result(timeout=_RESET_WAIT_SECONDS)
        except concurrent.futures.TimeoutError:
            with handoff.lock:
                handoff.gave_up = True
                if handoff.at is not None:  # it ran as the wait ended: its moment stands
                    return handoff.at
            raise ServiceUnavailable(
                f"the engine's event loop did not take the reset in {_RESET_WAIT_SECONDS} s"
            ) from None
        assert at is not None  # given up only once the wait has ended
        return at

    def terms_moved(self, carries: list[Carry]) -> None:
        """New terms written through this process moved windows (budgets', rate limits'), their
        usage carried over (`owner_limits.carried`): told to the counters on the engine's loop
        (Redis's carry it there, and mark it for the other instances)."""
        loop = self.loop
        if loop is not None and loop.is_running() and not self.cannot_wait():
            loop.call_soon_threadsafe(self.counters.terms_noted, carries)
        else:
            self.counters.terms_noted(carries)

    def cannot_wait(self) -> bool:
        """Whether this thread must not wait for the engine's loop (it would never answer): it
        runs that loop, or holds the lock its every step holds (`portal.LockedLoop`, the WSGI
        adapters' background loop; a collector finalizing an answer there, say)."""
        loop = self.loop
        if loop is None:
            return False
        # `_get_running_loop` (in asyncio's `__all__`, for libraries) answers None in a thread
        # running no loop; `get_running_loop` would raise, ~1 µs a sync transport's call.
        if asyncio._get_running_loop() is loop:
            return True
        held_here = getattr(loop, "held_here", None)
        return held_here is not None and bool(held_here())

    async def _reset_there(
        self, reset: Callable[[str, str], float], kind: str, id: str, handoff: _Handoff
    ) -> float | None:
        at = handoff.take(reset, kind, id)
        if at is not None:
            await self.counters.mark_now()  # the other instances see it when the reset returns
        return at

    def _reset_counter(self, kind: str, id: str, after: float | None = None) -> float:
        at = from_ts(self.clock()).timestamp()  # to the microsecond, as the store keeps it
        if after is not None:
            # The stored window may have begun at this clock's now or later (another
            # instance's clock ahead of this one's began it, or this one stepped back): a reset
            # before it reset nothing in the store, which kept that window and its spend ($0.50
            # answered by a reset), and a live counter here took it back at its next read.
            at = reset_moment(at, after)
        counter = self.registry.counter(kind, id)
        was = None
        if counter is not None:
            was = counter.start
            at = counter.reset(at, self.registry.ledger)
        if kind == "budget":
            self.counters.reset_noted(id, at, was)
        return at

    # -- the ledger's way to the store ---------------------------------------------------

    async def flush(self, *, drain: bool = True) -> bool:
        """Write pending deltas and usage records in one transaction per batch; False when the
        store cannot be written now (everything is kept for the next round). With `drain` (the
        default: shutdown, an explicit flush) it writes until nothing is pending, what was
        charged during its writes included; the flusher's rounds pass `drain=False`, to write
        what was pending when the round began and leave what comes meanwhile to the next round:
        under steady load, draining never ended, so the round's cache refresh and sweep never
        ran (an instance sharing a store stopped seeing the others' spend), and each write
        carried only what came during the one before.

        A batch whose write failed is kept whole and retried under its own id before anything
        newer; the store skips a batch id it has already applied, so every charge is written
        exactly once. A batch the store refuses while it takes other writes (asked with a probe
        that is rolled back) and has not applied is retried once, then split in halves until
        what the store can never take (an out-of-range value, a text it refuses) stands alone:
        that is set aside (`GET /usage/rejected`), and never holds back anyone else's charges.
        """
        async with self._flushing:
            if self.rejects_to_save and not await self._save_rejects():
                return False
            ledger = self.registry.ledger
            took = False  # a batch taken from what is pending, this call
            while True:
                if not self.unwritten:
                    spilled = await self._spilled_batch()
                    if spilled is not None:  # written before anything newer, oldest first
                        self.unwritten.append(spilled)
                    else:
                        if took and not drain:  # what came during the writes: the next round's
                            return True
                        took = True
                        await self.counters.before_take()
                        deltas = self.counters.take_deltas()
                        records, self.records = self.records, []
                        if not deltas and not records:
                            # caught up: the lag `/metrics` shows is counted from here
                            self.stats.last_flush_at = self.clock()
                            return not self.rejects_to_save or await self._save_rejects()
                        self.unwritten.append(Batch(uuid.uuid4().hex, deltas, records))
                batch = self.unwritten[0]
                # A write under way: a seed of its window waits for its confirmation, which
                # may say the store had it when that seed read the store; none waits for a
                # write that is not under way (the store down: it cannot come).
                self.counters.writing(True)
                try:
                    at: float | None = None  # the store's clock after the commit; None: unknown
                    read_at_commit = False
                    try:
                        at = await anyio.to_thread.run_sync(self._write_batch, batch)
                        read_at_commit = True
                    except BaseException as exc:  # cancelled too: nothing taken may be dropped
                        self.stats.flush_failures += 1
                        if not isinstance(exc, Exception):
                            raise
                        if _transient(exc):  # a deadlock, a lock wait: the next round tries again
                            self._transient_failures += 1
                            if self._transient_failures in (1, 10, 100, 1000):
                                logger.warning(
                                    "budget-middleware store write failed for the moment (%s, "
                                    "%d in a row): tried again",
                                    _error_text(exc),
                                    self._transient_failures,
                                )
                            # On disk meanwhile: a lock another process holds on a SQLite file
                            # lasts as long as that process wants (an outage), and a process
                            # stopped or killed during it lost every charge of it.
                            await self._spill_behind()
                            return False
                        refused = await self._refused(batch)
                        if refused is None:  # unreachable, or read-only: an outage, wait for it
                            self._store_failed(exc)
                            await self._spill_behind()
                            return False
                        if refused:
                            batch.refused += 1
                            if batch.refused >= 2:
                                halves = self._split(batch, exc)
                                self.unwritten[0:1] = halves
                                if batch.path is not None:  # the halves on disk in its place
                                    await self._spill_all(halves)
                                    self._unspill(batch.path)
                            continue
                    self.unwritten.pop(0)
                    if batch.path is not None:
                        self._unspill(batch.path)
                    self._transient_failures = 0
                    if not read_at_commit and self.counters.wants_commit_time:
                        # Applied by an earlier try (`_refused` found it): a moment read now is
                        # after that commit too.
                        with contextlib.suppress(Exception):
                            at = await anyio.to_thread.run_sync(self.store.clock)
                    if batch.own:  # another engine's charges were never in this ledger
                        self.counters.taken_written(batch.id)
                        self.counters.committed_at(at)
                        for d in batch.deltas:
                            ledger.confirmed(d.kind, d.id, d.start_ts, d.amount)
                    else:  # (when the store had them, for what that engine owed Redis)
                        await self.counters.written_for_others(batch.id, at)
                    self.store_ok = True
                    self.stats.last_flush_at = self.clock()
                finally:
                    self.counters.writing(False)

    def _write_batch(self, batch: Batch) -> float | None:
        """Write a batch (in a worker thread); for the counters that want it, the store's clock
        read right after the commit, in the same thread (None: unknown, taken as late as can
        be). Read in a second hop to a thread, it came as late as a loaded machine ran that
        hop: a write committed before another instance's seed read the store looked committed
        after it, and was added to the seed again after an empty restart."""
        self.store.apply_flush(batch.id, batch.deltas, batch.records)
        if not self.counters.wants_commit_time:
            return None
        try:
            return self.store.clock()
        except Exception:
            return None

    async def _spilled_batch(self) -> Batch | None:
        """The oldest batch waiting on disk that this process may write (its own, or a gone
        process's), while any may wait there; None otherwise."""
        spill = self.spill
        if spill is None or not self._spilled:
            return None
        found = await anyio.to_thread.run_sync(spill.oldest)
        if found is not None and not spill.is_own(found[0]):
            # A gone engine's charges are in no live counter here: taken over whole, all of its
            # batches, and counted as this engine's unwritten ones until the store holds them,
            # or a budget spent before a restart in an outage is spent again. With Redis too:
            # a window key seeded from the store (Redis restarted empty) holds them so, once
            # (left out, 14 admitted on a $0.10 budget, not 10). But for batches that debts
            # left to Redis name: their payment adds those debts, once.
            ledger = self.registry.ledger
            keep = await anyio.to_thread.run_sync(self.counters.batches_owed_for)
            for batch_id, deltas in await anyio.to_thread.run_sync(spill.claim_gone, keep):
                for d in deltas:
                    ledger.taken(d.kind, d.id, d.start_ts, d.amount)
                self.counters.took_over(batch_id, deltas)
            found = await anyio.to_thread.run_sync(spill.oldest)
        if spill.unreadable:
            self._set_aside_unreadable(spill)
        if found is None:
            self._spilled = False  # none left: look again when this process spills, or sweeps
            return None
        path, batch_id, deltas, records = found
        return Batch(batch_id, deltas, records, path=path, own=spill.is_own(path))

    def _set_aside_unreadable(self, spill: Spill) -> None:
        """Batch files that could not be read (kept as `.bad`): their charges never reach the
        store, so they are set aside as its refusals are, where an operator sees them (`GET
        /usage/rejected`, `budget_rejected_total{kind="spilled_batch"}`), not in a log alone."""
        for path, error in spill.unreadable:
            self.stats.rejected["spilled_batch"] = self.stats.rejected.get("spilled_batch", 0) + 1
            payload = json.dumps({"file": path}, ensure_ascii=True)
            self.rejects_to_save.append(("spilled_batch", payload, error, self.clock()))
        spill.unreadable.clear()

    async def _spill_behind(self) -> None:
        """The store is down: what is pending now goes into a batch of its own, and every batch
        not yet on disk is written there; in memory stays only the batch retried first. So an
        outage holds at most a round's charges in memory alone, however long it lasts, and a
        process that stops or dies meanwhile leaves them for the next one to write."""
        if self.spill is None:
            return
        await self.counters.before_take()  # resets made elsewhere: as a flush takes them
        deltas = self.counters.take_deltas()
        records, self.records = self.records, []
        if deltas or records:
            self.unwritten.append(Batch(uuid.uuid4().hex, deltas, records))
        if not self.unwritten:
            return
        await self._spill_all(self.unwritten)
        first, rest = self.unwritten[0], self.unwritten[1:]
        self.unwritten = [first, *(b for b in rest if b.path is None)]  # the rest on disk

    async def _spill_all(self, batches: list[Batch]) -> None:
        spill = self.spill
        assert spill is not None
        for batch in batches:
            if batch.path is None:
                try:
                    batch.path = await anyio.to_thread.run_sync(
                        spill.write, batch.id, batch.deltas, batch.records
                    )
                except OSError as exc:  # kept in memory, as without a spill folder
                    self.stats.spill_failures += 1
                    if self.stats.spill_failures in (1, 100, 10_000):
                        logger.error(
                            "budget-middleware cannot keep unwritten charges on disk in %s "
                            "(%s): they stay in memory until the store is back",
                            spill.folder,
                            exc,
                        )
                    return
                self._spilled = True
                self.stats.spilled_batches += 1

    def _unspill(self, path: str) -> None:
        """A batch on disk is in the store: its file goes (a batch has one only with a spill)."""
        assert self.spill is not None
        self.spill.remove(path)

    async def _refused(self, batch: Batch) -> bool | None:
        """After a failed write: None when the store takes no writes at all; False when the
        batch was applied after all (its commit's answer was lost); True when the store takes
        writes and refuses this batch."""
        try:
            if not await anyio.to_thread.run_sync(self.store.writable):
                return None
            return not await anyio.to_thread.run_sync(self.store.batch_applied, batch.id)
        except Exception:
            return None

    def _split(self, batch: Batch, exc: BaseException) -> list[Batch]:
        """A batch refused twice: its halves, or, alone, the delta or record set aside."""
        if batch.size > 1:
            return batch.halves()
        error = _error_text(exc)
        if batch.deltas:
            d = batch.deltas[0]
            # Still counted live: the money was spent, though the store cannot hold it.
            kind = "counter"
            what: dict[str, Any] = {
                "kind": d.kind,
                "id": d.id,
                "window_start": d.window_start.isoformat(),
                "window_end": d.window_end.isoformat(),
                "amount_nanos": d.amount,
            }
        else:
            kind, what = "usage_record", batch.records[0]._asdict()
        payload = json.dumps(what, ensure_ascii=True, default=str)
        self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + 1
        logger.error(
            "budget-middleware set aside a %s the store refuses (%s): %s",
            kind.replace("_", " "),
            error,
            payload[:500],
        )
        self.rejects_to_save.append((kind, payload, error, self.clock()))
        return []

    async def _save_rejects(self) -> bool:
        rejects = self.rejects_to_save
        try:
            await anyio.to_thread.run_sync(self.store.save_rejects, rejects)
        except Exception as exc:
            self._store_failed(exc)
            return False
        del rejects[: len(rejects)]
        return True

    async def health(self) -> dict[str, str]:
        if not self.started and self.failure is None:
            with contextlib.suppress(Exception):  # a store it cannot use is told below
                await self.ensure_started()
        try:
            if isinstance(self.failure, StoreSchemaError):
                raise self.failure  # reachable, not usable
            await anyio.to_thread.run_sync(self.store.ping)
            store = "ok"
        except Exception:
            store = "down"
        return {"store": store, "redis": await self.counters.health()}


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A shared task's end: its exception retrieved (its callers, if any left, raise it)."""
    if not future.cancelled():
        future.exception()


# PostgreSQL's deadlock, serialization failure and lock-wait timeout, a server short of room (a
# full disk, memory, connections; not 53400, a limit a batch's size may pass), and the classes of
# errors that are the server's, not the batch's: 08 (the connection), 57 (an operator or a timeout
# ended it: `statement_timeout`, a cancel, a shutdown) and 58 (an I/O error). The write may pass
# if tried again, and a refusal it is not (refused twice, a batch is split and its last delta set
# aside: a statement timeout while a lock was held set aside a budget's every charge of a round).
_TRANSIENT_SQLSTATES = {"40P01", "40001", "55P03", "53000", "53100", "53200", "53300"}
_TRANSIENT_CLASSES = {"08", "57", "58"}
# SQLite's busy timeout, and a full disk or an I/O error: the server's side of it, as above (a
# nearly full disk took a flush's probe and refused its batch: 388 records of 400 set aside).
_TRANSIENT_SQLITE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
}


def _transient(exc: BaseException) -> bool:
    """Whether a failed write failed for the moment only, not for what it writes."""
    seen: BaseException | None = exc
    for _ in range(10):  # the chain of causes, not followed round a loop
        if seen is None:
            break
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and (
            state in _TRANSIENT_SQLSTATES or state[:2] in _TRANSIENT_CLASSES
        ):
            return True
        code = getattr(seen, "sqlite_errorcode", None)
        if (
            isinstance(seen, sqlite3.OperationalError)
            and isinstance(code, int)
            and code & 0xFF in _TRANSIENT_SQLITE  # (an extended code's primary one)
        ):
            return True
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return False


def _error_text(exc: BaseException) -> str:
    """What the store said, short, on one line (no values: they may be a client's)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first}"[:300]


__all__ = ["BudgetEngine", "ServiceUnavailable", "get_engine", "hash_key"]
