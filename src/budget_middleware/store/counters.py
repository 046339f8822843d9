"""Counter backends: where admission decides and settlement lands.

`MemoryCounters` decides in process (one event loop, no awaits: atomic). A shared backend (Redis)
implements the same interface. Either way the charges made by this process are kept in the
registry's ledger until the flusher has written them to the store as deltas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import anyio.to_thread

from budget_middleware.core import admission
from budget_middleware.core.admission import FirstAdmitted, Refusal, Ticket
from budget_middleware.core.durations import parse_duration
from budget_middleware.core.records import Delta
from budget_middleware.core.routing import trial_order
from budget_middleware.core.scopes import LimitSet
from budget_middleware.core.times import FAR_FUTURE, from_ts, utc
from budget_middleware.core.windows import Carry, CounterRegistry, Ledger, WindowCounter

if TYPE_CHECKING:
    from budget_middleware.core.durations import Duration
    from budget_middleware.settings import BudgetSettings
    from budget_middleware.store.database import Store, StoredBudget
    from budget_middleware.store.spill import Spill


class CounterBackend(ABC):
    """Where admission decides and settlement lands. A backend gets what it needs: the live
    counters (`registry`), the store (to read counters), the settings, the clock, and a callback
    for when the store cannot be read (`on_store_failed`)."""

    def __init__(
        self,
        registry: CounterRegistry,
        store: Store,
        settings: BudgetSettings,
        clock: Callable[[], float],
        on_store_failed: Callable[[BaseException], None],
    ) -> None:
        self.registry = registry
        self.ledger = registry.ledger
        self.store = store
        self.settings = settings
        self.clock = clock
        self.on_store_failed = on_store_failed
        # Told of each budget's alert thresholds as `refresh` reads them, and whether its limit
        # was new (the engine's alerts); and asked for the thresholds this process holds of a
        # budget (by id), which a reload here sets as it sets the limit (`_terms_here`).
        self.on_thresholds: Callable[[WindowCounter, list[float] | None, bool], None] | None = None
        self.thresholds_here: Callable[[str], object] | None = None
        # Told of each charge as it lands on a budget's live counter (the engine's alerts look
        # at its budgets then): with no await between, so that the spend an alert tells is its
        # crossing's, not one that later charges of this process added meanwhile.
        self.on_landed: Callable[[LimitSet], None] | None = None
        # The engine's batches on disk (`store.spill`; None: a store in memory): a shared
        # backend's seeds count those of other engines that no live one counts as its own.
        self.spill: Spill | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (shared backends)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect (shared backends)."""

    async def health(self) -> str:
        return "disabled"

    def after_fork_in_child(self) -> None:  # noqa: B027 - optional hook
        """Forget the parent's connections (shared backends)."""

    def reset_noted(  # noqa: B027 - optional hook
        self, budget_id: str, at: float, was: float | None = None
    ) -> None:
        """A budget was reset at `at` through this process, its live window here begun at
        `was` (shared backends tell the others, by `mark_now` on the loop or `marks_soon` from
        elsewhere)."""

    def terms_noted(self, carries: Sequence[Carry]) -> None:
        """New terms written through this process moved windows (`Carry`: budgets', rate
        limits'): their usage carries over (shared backends carry it and tell the others),
        and the live counters here take it, and the terms, at once (`CounterRegistry.carried`;
        with Redis a shadow answer refused by another limit, which admit.lua alone tells this
        process of, showed a budget without the usage carried)."""
        self.registry.carried(carries, self.clock())

    async def mark_now(self) -> None:  # noqa: B027 - optional hook
        """Tell the other instances of the resets noted, now."""

    def marks_soon(self) -> None:  # noqa: B027 - optional hook
        """Tell the other instances of the resets noted, from a thread that cannot wait."""

    async def before_take(self) -> None:  # noqa: B027 - optional hook
        """Before a flush takes what is pending: learn the resets made elsewhere that the
        pending charges predate (shared backends), so that they go to the old window."""

    async def read_live(self, ids: Collection[str] | None = None) -> None:  # noqa: B027
        """Bring the live copies here up to the shared counters (shared backends), for an
        answer from the live counters (`from_memory`, the quota, the provider budgets); `ids`:
        only these limits'. An optional hook."""

    # A backend that needs to know when the store committed the charges it confirms (Redis's:
    # which of them a seed made after an empty restart holds) says so; the flusher then reads
    # the store's clock after each write it confirms and hands the moment over first
    # (`committed_at`).
    @property
    def wants_commit_time(self) -> bool:
        return False

    def committed_at(self, at: float | None) -> None:  # noqa: B027 - optional hook
        """The store's clock right after it committed the charges confirmed next (None: not
        known)."""

    def writing(self, under_way: bool) -> None:  # noqa: B027 - optional hook
        """A batch's write to the store begins (True), or has ended, written or not (False):
        its charges are confirmed before it ends (`committed_at`), if they are."""

    def left_to_others(self, batch_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """The engine stops with the charges the store has not confirmed in these batches on
        disk, given up to the next engine on the store (`Spill.give_up`)."""

    def took_over(self, batch_id: str, deltas: Sequence[Delta]) -> None:  # noqa: B027
        """A batch a gone engine left on disk is this engine's unwritten charges now
        (`Spill.claim_gone`)."""

    def taken_written(self, batch_id: str) -> None:  # noqa: B027 - optional hook
        """One of this engine's batches is in the store (its charges confirmed next)."""

    def batches_owed_for(self) -> set[str]:
        """The ids of batches given up on disk that debts left to shared counters name (their
        payment adds those debts once): none in process."""
        return set()

    async def written_for_others(self, batch_id: str, at: float | None) -> None:  # noqa: B027
        """A batch another engine gave up as it stopped is in the store now: the store's clock
        right after the commit (None: not known)."""

    async def loop_ending(self) -> None:  # noqa: B027 - optional hook
        """The engine's event loop ends without a shutdown (a script's `asyncio.run` returns):
        close the connections opened on it (shared backends), keep what is owed."""

    def owes(self) -> bool:
        """Whether it holds charges the shared counters lack (paid on the next loop, or at
        exit): none in process."""
        return False

    def after_loop_closed(self) -> None:  # noqa: B027 - optional hook
        """The engine's event loop closed: forget its connections and tasks (shared backends),
        keep what is owed."""

    @abstractmethod
    async def admit(self, limits: LimitSet, estimate: int) -> Ticket | Refusal: ...

    @abstractmethod
    async def settle(self, ticket: Ticket, cost: int, tokens: int) -> None: ...

    def landed(self, limits: LimitSet, cost: int) -> None:
        """A charge of `cost` on `limits` landed on their live counters: `on_landed`."""
        if cost and self.on_landed is not None:
            self.on_landed(limits)

    def admit_anyway(self, limits: LimitSet, estimate: int) -> Ticket:
        """Shadow mode (SPEC §14): a request its limits refused goes on, charged to none of
        them and holding nothing (`admission.count_refused`)."""
        return admission.count_refused(limits, self.clock(), self.ledger)

    async def admit_first(
        self, candidates: Sequence[tuple[LimitSet, int]], most_remaining: bool = False
    ) -> FirstAdmitted:
        """The first of several candidates admitted (a route's targets), one `admit` each."""
        result = FirstAdmitted()
        for index in trial_order([c[0] for c in candidates], most_remaining, self.clock()):
            limits, estimate = candidates[index]
            decision = await self.admit(limits, estimate)
            if type(decision) is Ticket:
                result.index, result.ticket = index, decision
                return result
            result.refusals.append(decision)  # type: ignore[arg-type]
            result.tried.append(index)
        return result

    async def refresh(self) -> list[WindowCounter]:
        """Re-read the counters from the store, every cache TTL (instances sharing a store);
        those of limits deleted from it are forgotten (`CounterRegistry.forget_deleted`), and
        returned. A budget's limit and a reset made elsewhere are taken too (`_take_stored`)."""
        windows = self.registry.windows
        budget_ids = list(windows["budget"])
        rate_ids = {*windows["request"], *windows["token"], *self.registry.concurrency}
        if not budget_ids and not rate_ids:
            return []
        here = {id_: self._terms_here(windows["budget"][id_]) for id_ in budget_ids}
        budgets, rates = await anyio.to_thread.run_sync(
            self.store.read_counters, budget_ids, rate_ids
        )
        forgotten = self.registry.forget_deleted(budget_ids, budgets, rate_ids, rates)
        ledger = self.ledger
        now = self.clock()
        for id_, stored in budgets.items():
            counter = windows["budget"].get(id_)
            if counter is not None:
                # Terms a reload here changed during the read are newer than the read's: the
                # limit and the thresholds alike (one rule). Read back, the thresholds the
                # reload had replaced were put back for a TTL, and one of them raised.
                changed_here = self._terms_here(counter) != here.get(id_)
                new_limit = _take_stored(counter, stored, changed_here, now, ledger)
                if self.on_thresholds is not None and not changed_here:
                    self.on_thresholds(counter, stored.alert_thresholds, new_limit)
        for id_, row in rates.items():
            requests = windows["request"].get(id_)
            if requests is not None:
                requests.seed(
                    row.request_current_usage, utc(row.request_last_reset).timestamp(), ledger
                )
            tokens = windows["token"].get(id_)
            if tokens is not None:
                tokens.seed(row.token_current_usage, utc(row.token_last_reset).timestamp(), ledger)
        return forgotten

    def _terms_here(self, counter: WindowCounter) -> tuple[int, object]:
        """A budget's terms as this process holds them, which a reload here sets and a re-read
        from the store could put back: its limit and its alert thresholds."""
        ask = self.thresholds_here
        return counter.limit, None if ask is None else ask(counter.id)

    def take_deltas(self) -> list[Delta]:
        """Everything charged here since the last flush, moved out of the ledger's pending
        charges into its unconfirmed ones (`Ledger.confirmed` once the store holds them)."""
        ledger = self.ledger
        deltas = [
            Delta(
                kind,
                id_,
                from_ts(start),
                from_ts(_end_of(kind, id_, start, self)),
                amount,
                start,
                _ended_from(kind, id_, start, self),
                _terms_of(kind, id_, self),
            )
            for kind, id_, start, amount in ledger.sealed
        ]
        ledger.sealed = []
        # A delta ends no later than now: all of it was charged before, so a window the store
        # starts after now (a reset made while the write is under way, or failed and retried)
        # does not take it. (A clock behind the window, a test's, leaves the window's end.)
        now = self.clock()
        for counter in ledger.dirty:
            if counter.pending:
                end = counter.end if counter.pending_start == counter.start else FAR_FUTURE
                if counter.pending_start < now < end:
                    end = now
                start = counter.pending_start
                deltas.append(
                    Delta(
                        counter.kind,
                        counter.id,
                        from_ts(start),
                        from_ts(end),
                        counter.pending,
                        start,
                        from_ts(counter.window_before(start)),
                        (counter.duration, counter.calendar_aligned),
                    )
                )
                counter.pending = 0
        ledger.dirty = set()
        for d in deltas:
            ledger.taken(d.kind, d.id, d.start_ts, d.amount)
        return deltas


def _take_stored(
    counter: WindowCounter, stored: StoredBudget, changed_here: bool, now: float, ledger: Ledger
) -> bool:
    """A budget's counter as `refresh` read it from the store: a reset made elsewhere within
    this window, the usage, and the limit (not when `changed_here`: a reload here changed the
    budget's terms during the read). Whether the limit was new. Both are taken as a reload of
    the key would take them: read only with the key, a limit lowered (or a reset made) through
    another instance raised no alert for the spend already recorded while no request of the key
    came."""
    at = stored.last_reset.timestamp()
    same_terms = parse_duration(stored.reset_duration) == counter.duration and (
        stored.calendar_aligned == counter.calendar_aligned
    )
    if same_terms and counter.start < at < counter.end and at > counter.anchor:
        counter.move_to(at, now, ledger)  # (new terms move windows at the key's reload)
    counter.seed(stored.usage, at, ledger)
    # Not a limit changed here during the read: the reload that did it is newer.
    if changed_here or stored.limit is None or stored.limit == counter.limit:
        return False
    counter.configure(
        stored.limit, counter.duration, counter.calendar_aligned, counter.anchor, now, ledger
    )
    return True


def _end_of(kind: str, id_: str, start: float, backend: CounterBackend) -> float:
    """The end of a sealed window: where the counter's window after it begins, or never; and no
    later than its own end (the counter may have rolled on again before a flush took it: a late
    charge must not land in a window the store started after it, by a reset elsewhere)."""
    counter: WindowCounter | None = backend.registry.counter(kind, id_)
    if counter is not None and counter.start > start:
        return min(counter.start, counter.window_end(start))
    return FAR_FUTURE


def _ended_from(kind: str, id_: str, start: float, backend: CounterBackend) -> datetime | None:
    """`Delta.ended_from` of a sealed window, from its counter (None without one)."""
    counter: WindowCounter | None = backend.registry.counter(kind, id_)
    return None if counter is None else from_ts(counter.window_before(start))


def _terms_of(kind: str, id_: str, backend: CounterBackend) -> tuple[Duration | None, bool] | None:
    """`Delta.terms` of a sealed window, from its counter (None without one)."""
    counter: WindowCounter | None = backend.registry.counter(kind, id_)
    return None if counter is None else (counter.duration, counter.calendar_aligned)


class MemoryCounters(CounterBackend):
    """Counters in this process: exact for one process; shared stores converge every TTL."""

    def admit_now(self, limits: LimitSet, estimate: int) -> Ticket | Refusal:
        """Admission without an await: atomic within the event loop (or under a lock)."""
        return admission.admit(limits, estimate, self.settings.reserve, self.clock(), self.ledger)

    def settle_now(self, ticket: Ticket, cost: int, tokens: int) -> None:
        admission.settle(ticket, cost, tokens, self.clock(), self.ledger)
        self.landed(ticket.limits, cost)

    def admit_first_now(
        self, candidates: Sequence[tuple[LimitSet, int]], most_remaining: bool = False
    ) -> FirstAdmitted:
        """A route's admission: the first target admitted, atomically (no await). The caller
        counts the request's outcome (one per request, not per target)."""
        reserve = self.settings.reserve
        return admission.admit_first(candidates, reserve, self.clock(), self.ledger, most_remaining)

    async def admit_first(
        self, candidates: Sequence[tuple[LimitSet, int]], most_remaining: bool = False
    ) -> FirstAdmitted:
        return self.admit_first_now(candidates, most_remaining)

    async def admit(self, limits: LimitSet, estimate: int) -> Ticket | Refusal:
        return self.admit_now(limits, estimate)

    async def settle(self, ticket: Ticket, cost: int, tokens: int) -> None:
        self.settle_now(ticket, cost, tokens)
