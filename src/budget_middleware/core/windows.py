"""Live counters of budgets and rate limits, and the in-process admission that uses them.

A counter is bound once to its limit (by id) and survives configuration reloads: reloading a
limit changes its parameters, never its usage. Every check here runs without an `await`, so in
one event loop an admission is atomic across every counter it touches (all or nothing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Container, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, NamedTuple, TypeVar

from cachetools import LRUCache

from budget_middleware.core.durations import Duration, window_bounds
from budget_middleware.core.money import usd_header
from budget_middleware.core.times import FAR_FUTURE, from_ts

T = TypeVar("T")


# Limits come from the store and are shared by many counters: each (limit, its header text) and
# each window bound is kept once (LRU-bounded: a value that falls out only stops being shared).
# A budget's limit, with its text (six decimals or nine) and its text in nine decimals.
_LIMITS: LRUCache[int, tuple[int, bytes, bytes]] = LRUCache(10_000)
_COUNTS: LRUCache[int, int] = LRUCache(10_000)  # a rate window's
_FLOATS: LRUCache[float, float] = LRUCache(10_000)
# Read beside the loop by threads (a WSGI server's, the admin API's and the store's workers),
# and a cachetools cache is not thread-safe (its LRU order changes on every read): one lock for
# the three, held for a look-up and an insertion, taken when a key's counters are built (a
# cache miss) and when a window rolls, never otherwise on a request's path.
_SHARING = threading.Lock()
# A child forked while a thread held it (gunicorn --preload) would wait for it for ever.
os.register_at_fork(after_in_child=_SHARING._at_fork_reinit)  # type: ignore[attr-defined]


class Carry(NamedTuple):
    """A window new terms moved (`owner_limits.carried`), its usage carried over."""

    kind: str  # "budget", "request" or "token"
    id: str  # the limit's
    was: float  # where the live window began
    start: float  # where the new terms' window begins (`was` when theirs began before)
    end: float  # where it ends (FAR_FUTURE: never)
    added: int  # the stored usage the live window takes (when the new one begins with it)
    # The stored usage the new window holds once the terms are written: what a key of it seeded
    # from the store before the carry holds of the window before.
    held: int
    # The new terms (duration, calendar alignment); None when only the window's end moved (a
    # budget that never resets, deleted or reset: `owner_limits.ended_for_good`).
    terms: tuple[Duration | None, bool] | None = None


def _shared_budget_limit(limit: int) -> tuple[int, bytes, bytes]:
    """A budget's limit and its texts in dollars for the response headers (as it reads alone,
    and in nine decimals, beside a remaining amount that needs them), formatted once; equal
    limits (keys of one plan) share the objects (~80 bytes a counter)."""
    with _SHARING:
        found = _LIMITS.get(limit)
        if found is None:
            found = _LIMITS[limit] = (limit, usd_header(limit), usd_header(limit, nine=True))
    return found


def shared(table: MutableMapping[T, T], value: T) -> T:
    """One object for equal values, kept in `table` (a bounded cache); any thread."""
    with _SHARING:
        found = table.get(value)
        if found is None:
            found = table[value] = value
    return found


def _shared_float(value: float) -> float:
    """One float object for equal window bounds (24 bytes each): the request and token windows
    of a rate limit, calendar-aligned windows, limits set up together share theirs."""
    return shared(_FLOATS, value)


def _starts_at(duration: Duration | None, aligned: bool, base: float, at: float) -> bool:
    """Whether a window of these terms counted from `base` begins at `at` (to the ms)."""
    if abs(at - base) < 0.001:
        return True
    if duration is None:  # a window that never ends begins where it was counted from
        return False
    start, _ = window_bounds(
        duration, anchor=from_ts(base), now=from_ts(at), calendar_aligned=aligned
    )
    return abs(start.timestamp() - at) < 0.001


def reset_moment(now: float, began: float) -> float:
    """The moment a reset at `now` starts a new window at, of one that began at `began`: `now`,
    or a millisecond after `began` when that is later. A clock behind the window's start (one
    stepped back, or another instance's ahead began it) or within its first millisecond would
    start a window older than the one it ends, or the same one (Redis keeps a window by the
    millisecond of its start: `_window_key`), and reset nothing. To the microsecond, as
    stored."""
    if now < began + 0.001:
        return from_ts(began + 0.001).timestamp()
    return now


class WindowCounter:
    """A value that resets when its window ends (a budget's spend, a request or token count)."""

    # `kind` ("budget", "request" or "token") is its class's, and so is what only a budget has
    # (`calendar_aligned`, the limit's text in dollars): two slots less are 16 bytes less a
    # rate window (two a cached key), as CPython rounds objects up to 16 bytes.
    kind: ClassVar[str]
    calendar_aligned: bool  # a budget's own; never for a rate window (a class attribute there)
    limit_text: bytes  # a budget's own: its limit in dollars as the headers show it
    limit_text_nine: bytes  # the same in nine decimals, beside a remaining amount that needs them

    __slots__ = (
        "anchor",
        "duration",
        "end",
        "id",
        "limit",
        "pending",
        "pending_start",
        "reserved",
        "start",
        "value",
    )

    def __init__(self, id: str) -> None:
        self.id = id
        self.limit = 0
        self.duration: Duration | None = None
        self.anchor = 0.0
        self.start = 0.0
        self.end = FAR_FUTURE
        self.value = 0  # usage in this window (nano-dollars for budgets), as far as we know
        self.reserved = 0  # held by requests in flight (budgets only)
        self.pending = 0  # charged here and not yet written to the store
        # The window `pending` belongs to: while something is pending, always the current one
        # (whatever moves `start` seals it first, or moves it along: `charge` relies on it).
        self.pending_start = 0.0

    def configure(
        self,
        limit: int,
        duration: Duration | None,
        calendar_aligned: bool,
        anchor: float,
        now: float,
        ledger: Ledger,
        carried: bool = False,
    ) -> None:
        """Apply (new) limit parameters; the usage is kept (changing a limit never resets it),
        unless the window it was counted in has ended: a newer anchor from the store (another
        instance rolled the window) moves the window on, and the old window's usage stays there.
        A newer anchor inside the window (a reset elsewhere) takes what this instance has not
        written into the new window: charged after the reset or shortly before it, it counts
        (limits tighten by what the flush interval holds at most; never lift). New terms, here
        or elsewhere (`carried`: learnt from the shared counters), carry the window's usage over
        to the window they start, which is no reset: nothing of it stays behind."""
        moved = (duration, calendar_aligned) != (self.duration, self.calendar_aligned)
        reset = not carried and self.start < anchor < self.end
        if reset and moved:
            # New terms move the stored start only to a start of theirs (`_new_terms`): one
            # elsewhere is a reset, read with terms written since (a reset on one instance,
            # then a duration changed on another: the pending charges of the window before
            # the reset were carried into it, $0.30 of a $1 reset budget refused).
            reset = self.anchor > 0 and not any(  # (a counter made now has none)
                _starts_at(duration, calendar_aligned, base, anchor)
                for base in (self.anchor, self.start)
            )
        if reset and ledger.before_reset_elsewhere:
            ledger.before_reset_elsewhere(self, anchor)
        self._set_terms(limit, calendar_aligned)
        if moved or anchor > self.anchor:
            self.duration = duration
            self.anchor = _shared_float(max(anchor, self.anchor))
            start, end = self._window_at(now)
            ended = self.end
            if moved:
                # New terms: what we counted carries over to their window that holds the
                # anchor (the store's `last_reset`, which the change moved there), not to the
                # one `now` is in: read after that window ended (no request since the change),
                # it was taken as this window's usage, and refused a key whose new window was
                # empty (1h -> 2m: $0.04 of the ended window blocked the next one's $0.03).
                ended = min(ended, self._window_at(self.anchor)[1])
            if start >= ended:  # a later window: what we counted belongs to the one before
                self._seal(ledger)
                self.value = 0
            elif self.pending and self.pending_start == self.start:
                if ledger.carried_along is not None and not reset:
                    ledger.carried_along(self, start)
                self.pending_start = start
            self._enter(start, end)
            if reset:
                # The old window's usage stays there: the new one holds what this instance has
                # not written (its spend elsewhere comes with the next read). Kept whole, a
                # threshold of the new window was raised at the old one's spend, and it told
                # that spend ($1.20 where $0.60 was spent since the reset).
                self.value = self.unwritten(ledger)

    def move_to(self, anchor: float, now: float, ledger: Ledger, carried: bool = False) -> None:
        """A reset elsewhere, at `anchor`, learnt from the shared counters: as `configure`
        takes it from the store (terms unchanged); `carried`: new terms elsewhere started a
        window there, which the usage carries over to (the terms come with the next reload)."""
        limit, duration, aligned = self.limit, self.duration, self.calendar_aligned
        self.configure(limit, duration, aligned, anchor, now, ledger, carried)

    def _set_terms(self, limit: int, calendar_aligned: bool) -> None:
        if calendar_aligned:
            raise ValueError(f"a {self.kind} window is never calendar-aligned")
        self.limit = shared(_COUNTS, limit)

    def unwritten(self, ledger: Ledger) -> int:
        """This process's charges to the current window that the store does not hold yet: still
        pending, or taken by a flush that has not been written (failed, or under way)."""
        mine = self.pending if self.pending_start == self.start else 0
        if ledger.unconfirmed:
            mine += ledger.unconfirmed.get((self.kind, self.id, self.start), 0)
        return mine

    def seed(self, stored_value: int, stored_reset: float, ledger: Ledger) -> None:
        """Take the store's usage; it counts for our window only if its window is ours. What
        this process charged and the store does not hold yet counts too: while writes fail, a
        counter never goes back down. A stored window older than the one this counter took
        from the store (its anchor: a reset, new terms) is a read from before that: it is left
        alone (a re-read begun before new terms, taken as another window's, set the usage
        they carried over to what was unwritten, $0, and the limit lifted).

        A stored window that begins where ours ends or later (another instance rolled ours, or
        reset it, and wrote there) is the current one: the counter moves there first, as a
        reload of its terms would (`configure`). Taken as ours, it was rolled away by our next
        request, and the others' spend in it was lost until the next re-read."""
        if stored_reset < self.anchor:
            return
        if stored_reset >= self.end:
            self.configure(
                self.limit, self.duration, self.calendar_aligned, stored_reset, stored_reset, ledger
            )
        mine = self.unwritten(ledger)
        self.value = stored_value + mine if stored_reset >= self.start else mine

    def _enter(self, start: float, end: float) -> None:
        """Make [start, end) the current window."""
        self.start, self.end = start, end

    def _seal(self, ledger: Ledger) -> None:
        """What is pending for the window that ends goes to the ledger as its own delta."""
        if self.pending:
            ledger.sealed.append((self.kind, self.id, self.pending_start, self.pending))
            self.pending = 0

    def _window_at(self, now: float) -> tuple[float, float]:
        if self.duration is None:
            return self.anchor, FAR_FUTURE
        start, end = window_bounds(
            self.duration,
            anchor=from_ts(self.anchor),
            now=from_ts(max(now, self.anchor)),
            calendar_aligned=self.calendar_aligned,
        )
        first, last = start.timestamp(), end.timestamp()
        if first < self.anchor < last:
            # A calendar window started midway (reset, or made, then): from there, as every
            # instance reads it from the store's `last_reset` (its Redis key with it).
            first = self.anchor
        return _shared_float(first), _shared_float(last)

    def window_before(self, start: float) -> float:
        """Where the window before the one beginning at `start` began, as this counter's terms
        have it: a stored window that began after it (a reset made elsewhere within it) rolls
        on past `start` (`Delta.ended_from`). `start` itself for a calendar-aligned window (one
        reset midway ends at the calendar's boundary), a window that never ends, or the first."""
        if self.duration is None or self.calendar_aligned or start <= self.anchor:
            return start
        return self._window_at(start - 0.001)[0]

    def begun_anew_at(self, at: float) -> bool:
        """Whether a stored window beginning at `at`, after this counter's anchor, was begun
        anew there (a reset, new terms) rather than rolled to: a window that rolls from the
        anchor begins where this counter's terms roll it (to the millisecond)."""
        if self.duration is None:
            return True
        return abs(self._window_at(at + 0.001)[0] - at) >= 0.001

    def window_end(self, start: float) -> float:
        """Where the window that contains `start` ends, as this counter's limit has it now."""
        return self._window_at(start)[1]

    def roll(self, now: float, ledger: Ledger) -> None:
        """Start the window that contains `now` (called only when `now >= self.end`)."""
        self._seal(ledger)
        self._enter(*self._window_at(now))
        self.value = 0

    def add(self, amount: int, ledger: Ledger) -> None:
        """Add to the current window (see `charge`)."""
        charge((self,), amount, self.start, ledger)

    def reset(self, now: float, ledger: Ledger) -> float:
        """Start a new window now (`POST /budgets/{id}/reset`); returns its start. What was
        charged before stays the old window's: sealed as its delta, which ends here (the store
        drops it once it holds the reset, and adds it to the old window before). What is charged
        from now on counts in the new window, requests admitted before included. The new window
        goes to the store as a delta of nothing from now: should the store's own reset fail, the
        flusher writes it (its rule starts a window the store holds an older one of).

        A clock stepped back (NTP) to the current window's start or before it starts the new
        window a millisecond after that start instead: everything counted so far was charged
        before the reset, and a window starting earlier would be older than the store's (which
        keeps its own, and what it holds) and than the charges sealed here (which the store
        would take back as a window of their own). The same within the millisecond the current
        window began (a clock stood still or stepped back there, two resets at once): Redis
        keeps a window by the millisecond of its start, and a new window in the same
        millisecond was the old one's key, its spend kept after the reset."""
        now = reset_moment(now, self.start)
        self._seal(ledger)
        self.anchor = now
        self.value = 0
        self._enter(*self._window_at(now))  # from now, calendar-aligned or not
        ledger.sealed.append((self.kind, self.id, self.start, 0))
        return now

    @property
    def remaining(self) -> int:
        return max(self.limit - self.value, 0)


class BudgetWindow(WindowCounter):
    """A budget's spend. `alert_at`: the spend at which its next alert threshold is crossed in
    the current window (SPEC §14); 0 until the alerts have looked at it in this window."""

    __slots__ = ("alert_at", "calendar_aligned", "limit_text", "limit_text_nine")
    kind = "budget"

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.calendar_aligned = False
        self.limit_text = b"0"  # the limit as the response headers show it, formatted once
        self.limit_text_nine = b"0"
        self.alert_at = 0

    def _set_terms(self, limit: int, calendar_aligned: bool) -> None:
        self.limit, self.limit_text, self.limit_text_nine = _shared_budget_limit(limit)
        self.calendar_aligned = calendar_aligned

    def _enter(self, start: float, end: float) -> None:
        if start != self.start:  # a window begun: its thresholds looked at anew (`alerts.check`)
            self.alert_at = 0
        self.start, self.end = start, end


class RequestWindow(WindowCounter):
    __slots__ = ()
    kind = "request"
    calendar_aligned = False


class TokenWindow(WindowCounter):
    __slots__ = ()
    kind = "token"
    calendar_aligned = False


_WINDOW_CLASSES: dict[str, type[WindowCounter]] = {
    "budget": BudgetWindow,
    "request": RequestWindow,
    "token": TokenWindow,
}


@dataclass(slots=True)
class Concurrency:
    id: str
    limit: int | None = None
    in_flight: int = 0


@dataclass(slots=True)
class Ledger:
    """Charges waiting for the flusher: dirty counters and deltas of windows that have ended;
    and, by (kind, id, window start), what flushes have taken and the store has not confirmed."""

    dirty: set[WindowCounter] = field(default_factory=set)
    sealed: list[tuple[str, str, float, int]] = field(default_factory=list)
    unconfirmed: dict[tuple[str, str, float], int] = field(default_factory=dict)
    # Told of a reset made elsewhere before a counter moves to it (`configure`), by a backend
    # that knows which unwritten charges the old window already holds (Redis's).
    before_reset_elsewhere: Callable[[WindowCounter, float], None] | None = None
    # Told of new terms carrying a counter's unwritten charges to the window starting at the
    # float (`configure`), by the same backend: the new window's key holds them now.
    carried_along: Callable[[WindowCounter, float], None] | None = None
    # Told of each charge the store confirmed (Redis's backend: what a seed from the store
    # read before it may have missed).
    after_confirmed: Callable[[str, str, float, int], None] | None = None

    def unseal(self, counter: WindowCounter) -> None:
        """Charges sealed, and not taken by a flush yet, of windows that begin in the counter's
        current one (none, unless new terms lengthened it over windows the old terms rolled it
        through: `CounterRegistry.window`) are pending in it again: counted there, and written
        there (as a window of their own, the store started it anew and dropped the rest)."""
        kind, id, start, end = counter.kind, counter.id, counter.start, counter.end
        kept: list[tuple[str, str, float, int]] = []
        amount = 0
        for entry in self.sealed:  # (a reset's mark, of nothing, stays: `WindowCounter.reset`)
            if entry[3] and entry[1] == id and entry[0] == kind and start <= entry[2] < end:
                amount += entry[3]
            else:
                kept.append(entry)
        if not amount:
            return
        self.sealed = kept
        if not counter.pending:
            counter.pending_start = start
            self.dirty.add(counter)
        counter.pending += amount

    def taken(self, kind: str, id: str, start: float, amount: int) -> None:
        """A flush took this charge: it counts as ours until the store confirms it."""
        key = (kind, id, start)
        self.unconfirmed[key] = self.unconfirmed.get(key, 0) + amount

    def confirmed(self, kind: str, id: str, start: float, amount: int) -> None:
        """The store holds this charge now."""
        key = (kind, id, start)
        if self.after_confirmed is not None:
            self.after_confirmed(kind, id, start, amount)
        left = self.unconfirmed.get(key, 0) - amount
        if left > 0:
            self.unconfirmed[key] = left
        else:
            self.unconfirmed.pop(key, None)

    def left_to_others(self) -> None:
        """This engine stops with what the store has not confirmed on disk, anyone's to write
        (`store.spill`): none of it is ours any more, or started again it would count it beside
        the store that another engine wrote it to."""
        self.unconfirmed.clear()


@dataclass(slots=True)
class RateLimitCounters:
    id: str
    requests: WindowCounter | None
    tokens: WindowCounter | None
    concurrency: Concurrency | None


class CounterRegistry:
    """Every live counter of this process, by limit id."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        # kind ("budget", "request", "token") -> limit id -> counter: no key tuple per counter
        self.windows: dict[str, dict[str, WindowCounter]] = {
            "budget": {},
            "request": {},
            "token": {},
        }
        self.concurrency: dict[str, Concurrency] = {}

    def window(
        self,
        kind: str,
        id: str,
        *,
        limit: int,
        duration: Duration | None,
        calendar_aligned: bool,
        last_reset: datetime,
        usage: int,
        now: float,
    ) -> WindowCounter:
        windows = self.windows[kind]
        counter = windows.get(id)
        anchor = last_reset.timestamp()
        if counter is None:
            counter = windows[id] = _WINDOW_CLASSES[kind](id)
            counter.configure(limit, duration, calendar_aligned, anchor, now, self.ledger)
            counter.seed(usage, anchor, self.ledger)
        else:
            began, ended = counter.start, counter.end
            terms = (counter.duration, counter.calendar_aligned)
            counter.configure(limit, duration, calendar_aligned, anchor, now, self.ledger)
            if counter.start >= ended:
                # Moved on to a later window, from the store's `last_reset`: another instance
                # rolled there, and the usage read with it is that window's (`seed`), not $0.
                counter.seed(usage, anchor, self.ledger)
            elif began < counter.start < ended and terms == (duration, calendar_aligned):
                # Reset elsewhere within the window: the usage read with the terms is the new
                # window's (`configure` kept only what this instance has not written).
                counter.seed(usage, anchor, self.ledger)
            elif counter.start < began:
                # Moved back: new terms' window holds the one the old terms rolled the counter
                # to (a request settled past the old window's end before they were read), and
                # what it counted in the windows before, sealed (pending again) or written
                # since (the store's usage, read with them), counts in it too: carried back
                # alone, the rolled window's usage left the rest out ($0.0003 of $0.0006).
                self.ledger.unseal(counter)
                counter.seed(usage, anchor, self.ledger)
        return counter

    def carried(self, carries: Sequence[Carry], now: float) -> None:
        """New terms written through this process moved windows (`Carry`): a live counter in
        the window they carry from takes what they carried into it (`Carry.added`: rolled there
        by a request since the stored window, it kept $0 there, where the store and Redis hold
        it), and the terms themselves, as their reload will (`window`, from the store's
        `last_reset`, which is `Carry.start`): a request in flight that settled past the old
        window's end before that reload rolled it on the old terms, to a window the new ones do
        not have (in process a flush then wrote that window as one the store began anew, which
        dropped what the window before held: $0.000324 stored of $0.0006 spent). Their window
        holds now, and the live one did (it is current: `was`), so the counter's usage carries
        over into it, as in the store. A window of theirs that ended before this runs (a few
        milliseconds after the commit) is left to the reload, which seeds the next from the
        store. One in another window takes them at the reload too."""
        for carry in carries:
            counter = self.counter(carry.kind, carry.id)
            if counter is None or abs(counter.start - carry.was) >= 0.001:
                continue
            if carry.added:
                counter.value += carry.added
            terms = carry.terms
            if (
                terms is not None
                and terms != (counter.duration, counter.calendar_aligned)
                and now < carry.end
            ):
                counter.configure(counter.limit, *terms, carry.start, now, self.ledger)

    def bring_to(self, now: float) -> None:
        """Roll every live window that has ended at `now`, as the store's sweep at `now` ends
        the stored ones (`Store.sweep_windows`; done first, so that the live counters are in
        the windows it begins). Left to the next charge, a window no request had touched since
        was rolled by the clock as that charge found it: after a step back (NTP), to a window
        older than the one the sweep had begun, which dropped the charge (415 tokens and
        $0.004015 stored as 0 and $0)."""
        ledger = self.ledger
        for windows in self.windows.values():
            for counter in windows.values():
                if now >= counter.end:
                    counter.roll(now, ledger)

    def counter(self, kind: str, id: str) -> WindowCounter | None:
        """The live counter of a limit, if this process has one."""
        return self.windows[kind].get(id)

    def forget_deleted(
        self,
        budgets: Iterable[str],
        stored_budgets: Container[str],
        rate_limits: Iterable[str],
        stored_rate_limits: Container[str],
    ) -> list[WindowCounter]:
        """Forget the counters of these budgets and rate limits that the store no longer holds
        (not among the stored ones: deleted, with their key, team or owner). Kept, every
        counter this process ever built stayed for good: a server whose keys come and go (one
        a user, one a job) held them all, and read them all again every cache TTL. One that
        this process has something of still to write (pending, sealed, not confirmed by the
        store), or that requests hold (a reservation, a concurrency slot), stays until it has
        none. The counters forgotten."""
        ledger = self.ledger
        unwritten = {(kind, id) for kind, id, _, _ in ledger.sealed}
        unwritten.update((kind, id) for kind, id, _ in ledger.unconfirmed)
        forgotten: list[WindowCounter] = []
        for kinds, ids, stored in (
            (("budget",), budgets, stored_budgets),
            (("request", "token"), rate_limits, stored_rate_limits),
        ):
            for id in ids:
                if id in stored:
                    continue
                counters = [c for c in (self.windows[k].get(id) for k in kinds) if c is not None]
                slots = self.concurrency.get(id) if kinds[0] != "budget" else None
                if not counters and slots is None:
                    continue
                if any(c.pending or c.reserved or (c.kind, id) in unwritten for c in counters) or (
                    slots is not None and slots.in_flight
                ):
                    continue
                for counter in counters:
                    del self.windows[counter.kind][id]
                if slots is not None:
                    del self.concurrency[id]
                forgotten += counters
        return forgotten

    def forget_the_parent_s(self) -> None:
        """In a forked child: what the parent charged and holds is the parent's to write and to
        release. The child keeps the counters' values (what is spent) and nothing to write, no
        reservation and no request in flight."""
        ledger = self.ledger
        ledger.dirty.clear()
        ledger.sealed.clear()
        ledger.unconfirmed.clear()
        for windows in self.windows.values():
            for counter in windows.values():
                counter.pending = 0
                counter.reserved = 0
        for slots in self.concurrency.values():
            slots.in_flight = 0

    def slots(self, id: str, limit: int | None) -> Concurrency:
        slots = self.concurrency.get(id)
        if slots is None:
            slots = self.concurrency[id] = Concurrency(id)
        slots.limit = limit
        return slots


def charge(counters: Sequence[WindowCounter], amount: int, now: float, ledger: Ledger) -> None:
    """Add `amount` to each counter's window at `now` (a window that has ended rolls first).

    The counter's value grows, and so does what it holds for the flusher (`pending`), which is
    always the current window's: a window that ends (`roll`, `reset`, `configure`) seals what is
    pending first. A counter with something pending is in `ledger.dirty` already (the flusher
    takes both at once)."""
    for counter in counters:
        if now >= counter.end:
            counter.roll(now, ledger)
        counter.value += amount
        if counter.pending:  # the usual case: more for the same window (see `pending_start`)
            counter.pending += amount
        else:  # the first charge since a flush, or of a window
            counter.pending = amount
            counter.pending_start = counter.start
            ledger.dirty.add(counter)


def ensure_current(counters: Sequence[WindowCounter], now: float, ledger: Ledger) -> None:
    for counter in counters:
        if now >= counter.end:
            counter.roll(now, ledger)
