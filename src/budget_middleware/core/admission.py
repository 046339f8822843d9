"""Admission and settlement across every applicable limit (SPEC §5, §6), in process.

`admit` checks every counter first and changes nothing unless all pass, so a refused request
charges nothing and counts against no limit. It never awaits: within one event loop it is atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass, field

from budget_middleware.core.routing import trial_order
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.windows import Ledger, WindowCounter, charge, ensure_current


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
    counter: WindowCounter | None = None  # the budget that refused (budget_exceeded)


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


_NEVER = float("inf")  # the end of a window that never resets


def _reset_at(counter: WindowCounter) -> float | None:
    return None if counter.end == _NEVER else counter.end


def bring_to(limits: LimitSet, now: float, ledger: Ledger) -> None:
    """Roll every window of a request's limits that has ended at `now` (SPEC §6: on first
    touch), in process as on Redis (`RedisCounters.admit_first`, before admit.lua): a window
    behind the limit that refuses ends as one the request passes (`admit` rolls those it
    reaches; a refusal, the rest). Left to the next request that reached it, it was rolled by
    the clock as that one found it: after a step back (NTP), to a window older than the one
    the clock had reached, which Redis and the store had begun (the store dropped the 415
    tokens charged there)."""
    for windows in (limits.requests, limits.tokens, limits.budgets, limits.soft_budgets):
        ensure_current(windows, now, ledger)


def admit(
    limits: LimitSet, estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Ticket | Refusal:
    """All or nothing, in the order of SPEC §5: the rate limits of every scope (requests,
    tokens, concurrency), then the budgets of every scope. The first limit that refuses is the
    answer (an exhausted budget beats one that only reservations fill); nothing is changed
    unless every limit passes. On the way, the tightest limit of each kind is kept for the
    response headers (the least left; ties keep the first). The rate limits are read kind by
    kind over the flattened windows, which the usual request passes; one that refuses has
    `_rate_refusal` name the first in SPEC §5's order. `store/lua/admit.lua` is the same rule
    for Redis. A refusal brings the windows behind the limit that refused to `now` too
    (`bring_to`), as Redis does."""
    requests: WindowCounter | None = None
    requests_left = 0
    for counter in limits.requests:
        if now >= counter.end:
            counter.roll(now, ledger)
        left = counter.limit - counter.value
        if left <= 0:
            return _rate_refusal(limits, now, ledger)
        if requests is None or left < requests_left:
            requests, requests_left = counter, left
    tokens: WindowCounter | None = None
    tokens_left = 0
    for counter in limits.tokens:
        if now >= counter.end:
            counter.roll(now, ledger)
        left = counter.limit - counter.value
        if left <= 0:
            return _rate_refusal(limits, now, ledger)
        if tokens is None or left < tokens_left:
            tokens, tokens_left = counter, left
    for slots in limits.slots:
        if slots.limit is not None and slots.in_flight >= slots.limit:
            return _rate_refusal(limits, now, ledger)
    budget: WindowCounter | None = None
    budget_left = 0
    held: Refusal | None = None
    for counter in limits.budgets:
        if now >= counter.end:
            counter.roll(now, ledger)
        left = counter.limit - counter.value
        if left <= 0:
            bring_to(limits, now, ledger)
            return Refusal(
                "budget_exceeded",
                limits.owner_of(counter),
                counter.limit,
                counter.value,
                _reset_at(counter),
                0,
                counter,
            )
        if counter.reserved > 0 and held is None and reserve and estimate + counter.reserved > left:
            # Only the requests in flight fill it: retryable, unless another budget is exhausted.
            # (Nothing in flight, the usual case, is told by the first comparison.)
            held = Refusal(
                "budget_reserved",
                limits.owner_of(counter),
                counter.limit,
                counter.value,
                _reset_at(counter),
                counter.reserved,
            )
        if budget is None or left < budget_left:
            budget, budget_left = counter, left
    if held is not None:
        bring_to(limits, now, ledger)
        return held
    if limits.soft_budgets:  # charged when settled: their windows end now too, as on Redis
        ensure_current(limits.soft_budgets, now, ledger)
    ticket = admit_anyway(limits, estimate, reserve, now, ledger)
    if requests is not None:
        requests_left -= 1  # this request is counted now
    ticket.tightest = (requests, requests_left, tokens, tokens_left, budget, budget_left)
    return ticket


def _rate_refusal(limits: LimitSet, now: float, ledger: Ledger) -> Refusal:
    """The refusal of a request that a rate limit refuses (`admit` found one): the first in SPEC
    §5's order, scope by scope (its request window, its token window, its concurrency slots),
    its windows, and those of every other limit, brought to `now` (`bring_to`)."""
    bring_to(limits, now, ledger)
    for scope in limits.scopes:
        rate = scope.rate_limit
        if rate is None:
            continue
        counter = rate.requests
        if counter is not None and counter.value >= counter.limit:
            return Refusal(
                "request_limit_exceeded", scope, counter.limit, counter.value, _reset_at(counter)
            )
        counter = rate.tokens
        if counter is not None and counter.value >= counter.limit:
            return Refusal(
                "token_limit_exceeded", scope, counter.limit, counter.value, _reset_at(counter)
            )
        slots = rate.concurrency
        if slots is not None and slots.limit is not None and slots.in_flight >= slots.limit:
            return Refusal("concurrency_limit_exceeded", scope, slots.limit, slots.in_flight, None)
    raise AssertionError("no rate limit of these refuses")


def retry_at(limits: LimitSet, now: float) -> float | None:
    """When a request refused by a rate limit could pass every rate window that refuses it now:
    the latest end among its request and token windows spent at `now` (None: none is). The
    refusal names the first of them (SPEC §5's order); a client that waited for that one's end
    alone (a key's minute) was refused again by the next (its team's hour). On a refusal only."""
    spent = [c.end for c in (*limits.requests, *limits.tokens) if c.value >= c.limit > 0]
    return max((end for end in spent if now < end < _NEVER), default=None)


def admit_anyway(
    limits: LimitSet, estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Ticket:
    """Count the request on every limit without checking any: what `admit` does once every
    limit passed."""
    charge(limits.requests, 1, now, ledger)
    for slots in limits.slots:
        slots.in_flight += 1
    reservation = estimate if reserve else 0
    if reservation:
        for counter in limits.budgets:
            counter.reserved += reservation
    return Ticket(limits, reservation)


def count_refused(limits: LimitSet, now: float, ledger: Ledger) -> Ticket:
    """Shadow mode (SPEC §14): a request its limits refused (or one refused before them) goes
    on, charged to none of its limits, as enforce charges a refused request nothing: no
    request, cost or tokens, no concurrency slot, no reservation. Counted, it had shadow mode
    report the next requests as enforce would not: a key's request over its own limit counted
    on its team's request limit (or budget) had another key of the team reported
    `request_limit_exceeded` (`budget_exceeded`) where enforce admits it. Its money is in its
    usage record (`would_refuse`). Its windows are brought to `now` as admission brings them
    (`bring_to`; a window that had ended, behind the limit that refused, was shown in the
    answer's headers: 0 tokens left of it, resetting in 0s)."""
    bring_to(limits, now, ledger)
    held = copy(limits)  # settled charging nothing
    held.requests = held.tokens = held.slots = held.budgets = held.soft_budgets = ()
    return Ticket(held, 0)


@dataclass(slots=True)
class FirstAdmitted:
    """Of several candidates (a route's targets, SPEC §12), the first admitted: its index and
    ticket (-1 and None when every one refused), and the refusals of those tried before it,
    in the order tried, with their indexes in `tried`."""

    index: int = -1
    ticket: Ticket | None = None
    refusals: list[Refusal] = field(default_factory=list)
    tried: list[int] = field(default_factory=list)


def admit_first(
    candidates: Sequence[tuple[LimitSet, int]],
    reserve: bool,
    now: float,
    ledger: Ledger,
    most_remaining: bool = False,
) -> FirstAdmitted:
    """`admit` each (limits, estimate) in turn (the route's order, or `most_remaining`'s) until
    one is admitted: within one event loop (or under a lock) the whole choice, ranking
    included, is atomic, as one admission is."""
    result = FirstAdmitted()
    for limits, _ in candidates:  # every target's, tried or not, as on Redis
        bring_to(limits, now, ledger)
    for index in trial_order([c[0] for c in candidates], most_remaining, now):
        limits, estimate = candidates[index]
        decision = admit(limits, estimate, reserve, now, ledger)
        if type(decision) is Ticket:
            result.index, result.ticket = index, decision
            return result
        result.refusals.append(decision)  # type: ignore[arg-type]
        result.tried.append(index)
    return result


def settle(ticket: Ticket, cost: int, tokens: int, now: float, ledger: Ledger) -> None:
    """Replace the reservation by the actual cost, count tokens, free the concurrency slot."""
    if ticket.settled:
        return
    ticket.settled = True
    reservation = ticket.reservation
    limits = ticket.limits
    if reservation:
        for budget in limits.budgets:
            left = budget.reserved - reservation
            budget.reserved = left if left > 0 else 0
    if cost:
        charge(limits.budgets, cost, now, ledger)
        if limits.soft_budgets:
            charge(limits.soft_budgets, cost, now, ledger)
    if tokens:
        charge(limits.tokens, tokens, now, ledger)
    for slots in limits.slots:
        if slots.in_flight > 0:
            slots.in_flight -= 1
