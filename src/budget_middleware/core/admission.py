"""Admission and settlement across every applicable limit (SPEC §5, §6), in process.

`admit` checks every counter first and changes nothing unless all pass, so a refused request
charges nothing and counts against no limit. It never awaits: within one event loop it is atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.windows import Ledger, WindowCounter


@dataclass(slots=True, frozen=True)
class Refusal:
    """Why a request is refused, with what a client needs to act on it."""

    code: str  # request_limit_exceeded, token_limit_exceeded, concurrency_limit_exceeded,
    #            budget_exceeded, budget_reserved
    scope: Scope
    limit: int  # nano-dollars for budgets, a count otherwise
    used: int
    reset_at: float | None  # epoch seconds, None when the window never resets
    reserved: int = 0


@dataclass(slots=True)
class Ticket:
    """An admitted request's hold on its limits, released exactly once by `settle`."""

    limits: LimitSet  # every limit the request holds, flattened by kind
    reservation: int  # nano-dollars held on every budget
    settled: bool = False
    # The tightest request window, token window and budget with what each has left, found while
    # admitting (for the response headers): (counter, left) * 3, None where the kind is absent.
    tightest: Tightest | None = None
    # Admitted by Redis (`redis_counters`): the id its slots and reservations are held under
    # there, and the ZSETs that hold them; "" and () when admitted in process.
    request_id: str = ""
    holds: tuple[str, ...] = ()

    @property
    def scopes(self) -> tuple[Scope, ...]:
        return self.limits.scopes


Tightest = tuple[
    "WindowCounter | None", int, "WindowCounter | None", int, "WindowCounter | None", int
]


def _reset_at(counter: WindowCounter) -> float | None:
    return None if counter.end == float("inf") else counter.end


def check_rate_limits(scopes: Sequence[Scope], now: float, ledger: Ledger) -> Refusal | None:
    for scope in scopes:
        rate = scope.rate_limit
        if rate is None:
            continue
        requests = rate.requests
        if requests is not None:
            if now >= requests.end:
                requests.roll(now, ledger)
            if requests.value + 1 > requests.limit:
                return Refusal(
                    "request_limit_exceeded",
                    scope,
                    requests.limit,
                    requests.value,
                    _reset_at(requests),
                )
        tokens = rate.tokens
        if tokens is not None:
            if now >= tokens.end:
                tokens.roll(now, ledger)
            if tokens.value >= tokens.limit:
                return Refusal(
                    "token_limit_exceeded", scope, tokens.limit, tokens.value, _reset_at(tokens)
                )
        slots = rate.concurrency
        if slots is not None and slots.limit is not None and slots.in_flight >= slots.limit:
            return Refusal("concurrency_limit_exceeded", scope, slots.limit, slots.in_flight, None)
    return None


def check_budgets(
    scopes: Sequence[Scope], estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Refusal | None:
    held: Refusal | None = None
    for scope in scopes:
        for budget in scope.budgets:
            if now >= budget.end:
                budget.roll(now, ledger)
            if budget.value >= budget.limit:
                return Refusal(
                    "budget_exceeded", scope, budget.limit, budget.value, _reset_at(budget)
                )
            if (
                held is None
                and reserve
                and budget.reserved > 0
                and budget.value + budget.reserved + estimate > budget.limit
            ):
                # Exhausted elsewhere beats "wait for the requests in flight": keep looking.
                held = Refusal(
                    "budget_reserved",
                    scope,
                    budget.limit,
                    budget.value,
                    _reset_at(budget),
                    budget.reserved,
                )
    return held


def admit(
    limits: LimitSet, estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Ticket | Refusal:
    """All or nothing: either every applicable limit takes the request, or none is touched.

    One pass over the counters, flattened by kind, decides and keeps the tightest limit of each
    kind for the response headers (each check is `left > 0`: value < limit); only a refused
    request looks at the scopes in the order of SPEC §5, to say which limit refuses (`_refusal`:
    the same conditions)."""
    requests, requests_left = _least_left(limits.requests, now, ledger)
    tokens, tokens_left = _least_left(limits.tokens, now, ledger)
    if (requests is not None and requests_left == 0) or (tokens is not None and tokens_left == 0):
        return _refusal(limits, estimate, reserve, now, ledger)
    for slots in limits.slots:
        if slots.limit is not None and slots.in_flight >= slots.limit:
            return _refusal(limits, estimate, reserve, now, ledger)
    budget = None
    budget_left = 0
    for counter in limits.budgets:
        if now >= counter.end:
            counter.roll(now, ledger)
        left = counter.limit - counter.value
        if left <= 0 or (reserve and counter.reserved > 0 and estimate + counter.reserved > left):
            return _refusal(limits, estimate, reserve, now, ledger)
        if budget is None or left < budget_left:
            budget, budget_left = counter, left
    dirty = ledger.dirty
    for counter in limits.requests:
        if counter.pending_start == counter.start:  # `counter.add(1)`, inlined: the usual case
            counter.value += 1
            counter.pending += 1
            dirty.add(counter)
        else:
            counter.add(1, ledger)
    for slots in limits.slots:
        slots.in_flight += 1
    reservation = estimate if reserve else 0
    if reservation:
        for counter in limits.budgets:
            counter.reserved += reservation
    if requests is not None:
        requests_left -= 1  # this request is counted now
    tightest = (requests, requests_left, tokens, tokens_left, budget, budget_left)
    return Ticket(limits, reservation, False, tightest)


def _least_left(
    counters: tuple[WindowCounter, ...], now: float, ledger: Ledger
) -> tuple[WindowCounter | None, int]:
    """The request or token window with the least left (each rolled to `now` first) and what it
    has left; a window with nothing left at once, with 0. (None, 0) for no window."""
    best = None
    least = 0
    for counter in counters:
        if now >= counter.end:
            counter.roll(now, ledger)
        left = counter.limit - counter.value
        if left <= 0:
            return counter, 0
        if best is None or left < least:
            best, least = counter, left
    return best, least


def _refusal(limits: LimitSet, estimate: int, reserve: bool, now: float, ledger: Ledger) -> Refusal:
    scopes = limits.scopes
    refusal = check_rate_limits(scopes, now, ledger) or check_budgets(
        scopes, estimate, reserve, now, ledger
    )
    if refusal is None:  # the two readings of one rule disagree: a bug, never a free pass
        raise AssertionError("admission refused a request that no limit refuses")
    return refusal


def settle(ticket: Ticket, cost: int, tokens: int, now: float, ledger: Ledger) -> None:
    """Replace the reservation by the actual cost, count tokens, free the concurrency slot."""
    if ticket.settled:
        return
    ticket.settled = True
    reservation = ticket.reservation
    limits = ticket.limits
    dirty = ledger.dirty
    for budget in limits.budgets:
        if reservation:
            left = budget.reserved - reservation
            budget.reserved = left if left > 0 else 0
        if now >= budget.end:
            budget.roll(now, ledger)
        if cost:
            if budget.pending_start == budget.start:  # `budget.add(cost)`, inlined
                budget.value += cost
                budget.pending += cost
                dirty.add(budget)
            else:
                budget.add(cost, ledger)
    if tokens:
        for counter in limits.tokens:
            if now >= counter.end:
                counter.roll(now, ledger)
            if counter.pending_start == counter.start:
                counter.value += tokens
                counter.pending += tokens
                dirty.add(counter)
            else:
                counter.add(tokens, ledger)
    for slots in limits.slots:
        if slots.in_flight > 0:
            slots.in_flight -= 1
