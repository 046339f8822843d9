"""The core without HTTP: admission is all or nothing, reservations, settlement, windows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from budget_middleware.core import admission
from budget_middleware.core.admission import (
    Refusal,
    Ticket,
    settle,
)
from budget_middleware.core.durations import Duration
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.windows import (
    CounterRegistry,
    Ledger,
    RateLimitCounters,
    WindowCounter,
    ensure_current,
)
from budget_middleware.headers import tightest_now

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()


def admit(
    scopes: tuple[Scope, ...] | list[Scope],
    estimate: int,
    reserve: bool,
    now: float,
    ledger: Ledger,
) -> Ticket | Refusal:
    """Admission of a request to which these scopes apply."""
    return admission.admit(LimitSet(tuple(scopes)), estimate, reserve, now, ledger)


USD = 1_000_000_000


def budget_scope(
    registry: CounterRegistry,
    name: str,
    limit_usd: float,
    duration: str | None = "1d",
    *,
    calendar_aligned: bool = False,
    used: int = 0,
    now: float = T0,
) -> Scope:
    counter = registry.window(
        "budget",
        f"b-{name}",
        limit=int(limit_usd * USD),
        duration=Duration.parse(duration) if duration else None,
        calendar_aligned=calendar_aligned,
        last_reset=datetime.fromtimestamp(now, UTC),
        usage=used,
        now=now,
    )
    return Scope("team", name, name, budgets=(counter,))


def rate_scope(
    registry: CounterRegistry,
    name: str,
    *,
    requests: int | None = None,
    tokens: int | None = None,
    concurrent: int | None = None,
    duration: str = "1m",
) -> Scope:
    def window(kind: str, limit: int | None) -> object:
        if limit is None:
            return None
        return registry.window(
            kind,
            f"r-{name}",
            limit=limit,
            duration=Duration.parse(duration),
            calendar_aligned=False,
            last_reset=datetime.fromtimestamp(T0, UTC),
            usage=0,
            now=T0,
        )

    slots = registry.slots(f"r-{name}", concurrent) if concurrent is not None else None
    counters = RateLimitCounters(
        f"r-{name}",
        window("request", requests),
        window("token", tokens),
        slots,  # type: ignore[arg-type]
    )
    return Scope("virtual_key", name, name, rate_limit=counters)


def test_a_refusal_by_one_scope_touches_no_other_scope() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", requests=10, concurrent=5)
    team = budget_scope(registry, "research", 1.0, used=USD)  # exhausted
    decision = admit((key, team), estimate=100, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(decision, Refusal)
    assert decision.code == "budget_exceeded"
    assert decision.scope is team
    rate = key.rate_limit
    assert rate is not None and rate.requests is not None and rate.concurrency is not None
    assert rate.requests.value == 0
    assert rate.concurrency.in_flight == 0
    assert not registry.ledger.dirty


def test_rate_limits_are_checked_before_budgets() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", requests=0)
    team = budget_scope(registry, "research", 1.0, used=USD)
    decision = admit((team, key), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(decision, Refusal)
    assert decision.code == "request_limit_exceeded"


def test_the_first_scope_s_rate_limit_that_refuses_is_named_whatever_its_kind() -> None:
    """SPEC §5: rate limits scope by scope (requests, tokens, concurrency). `admit` reads them
    kind by kind, which every request passes as a rule; a refusal is named in the spec's order:
    the key's spent tokens (or its full slots), not its team's spent requests read first."""
    registry = CounterRegistry()
    ledger = registry.ledger
    key = rate_scope(registry, "alice", tokens=5, concurrent=1)
    team = rate_scope(registry, "research", requests=1)
    assert key.rate_limit is not None and key.rate_limit.tokens is not None
    assert team.rate_limit is not None and team.rate_limit.requests is not None
    key.rate_limit.tokens.value = 5
    team.rate_limit.requests.value = 1
    first = admit((key, team), estimate=0, reserve=True, now=T0, ledger=ledger)
    assert isinstance(first, Refusal)
    print(f"refused by {first.scope.name}'s {first.code}")
    assert (first.code, first.scope, first.used) == ("token_limit_exceeded", key, 5)
    key.rate_limit.tokens.value = 0
    assert key.rate_limit.concurrency is not None
    key.rate_limit.concurrency.in_flight = 1
    slots = admit((key, team), estimate=0, reserve=True, now=T0, ledger=ledger)
    assert isinstance(slots, Refusal)
    assert (slots.code, slots.scope) == ("concurrency_limit_exceeded", key)
    key.rate_limit.concurrency.in_flight = 0
    requests = admit((key, team), estimate=0, reserve=True, now=T0, ledger=ledger)
    assert isinstance(requests, Refusal)
    assert (requests.code, requests.scope, requests.used) == ("request_limit_exceeded", team, 1)
    assert key.rate_limit.concurrency.in_flight == 0 and not ledger.dirty  # nothing counted


def test_reservations_hold_the_budget_until_settled_with_the_actual_cost() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0)
    first = admit((team,), estimate=600_000_000, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(first, Ticket)
    second = admit((team,), estimate=600_000_000, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(second, Refusal)
    assert second.code == "budget_reserved"
    assert second.reserved == 600_000_000
    settle(first, cost=100_000_000, tokens=0, now=T0, ledger=registry.ledger)
    counter = team.budgets[0]
    assert (counter.value, counter.reserved, counter.pending) == (100_000_000, 0, 100_000_000)
    third = admit((team,), estimate=600_000_000, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(third, Ticket)


def test_a_soft_budget_is_charged_when_settled_and_never_refuses() -> None:
    registry = CounterRegistry()
    hard = budget_scope(registry, "research", 1.0)
    spent = budget_scope(registry, "watched", 0.5, used=USD)  # over its limit already
    soft = Scope("tag", "watched", "watched", soft_budgets=spent.budgets)
    ticket = admit((hard, soft), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, cost=300_000_000, tokens=0, now=T0, ledger=registry.ledger)
    assert hard.budgets[0].value == 300_000_000
    assert soft.soft_budgets[0].value == USD + 300_000_000
    assert soft.soft_budgets[0] in registry.ledger.dirty


def test_with_nothing_in_flight_a_request_passes_while_the_budget_is_not_exhausted() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0, used=USD - 1)
    decision = admit((team,), estimate=50 * USD, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(decision, Ticket)


def test_exhausted_beats_reserved_when_both_apply() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0)
    customer = budget_scope(registry, "acme", 1.0, used=USD)
    held = admit((team,), estimate=USD, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(held, Ticket)
    decision = admit((team, customer), estimate=USD, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(decision, Refusal) and decision.code == "budget_exceeded"
    assert decision.scope is customer


def test_settling_twice_charges_once() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0)
    ticket = admit((team,), estimate=10, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, cost=7, tokens=0, now=T0, ledger=registry.ledger)
    settle(ticket, cost=7, tokens=0, now=T0, ledger=registry.ledger)
    assert team.budgets[0].value == 7


def test_concurrency_slot_is_taken_at_admission_and_freed_at_settlement() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", concurrent=1)
    first = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(first, Ticket)
    refused = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(refused, Refusal) and refused.code == "concurrency_limit_exceeded"
    settle(first, cost=0, tokens=0, now=T0, ledger=registry.ledger)
    assert isinstance(
        admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger), Ticket
    )


def test_tokens_count_when_measured_and_block_once_the_limit_is_reached() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", tokens=100)
    ticket = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, cost=0, tokens=100, now=T0, ledger=registry.ledger)
    refused = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(refused, Refusal) and refused.code == "token_limit_exceeded"
    assert refused.used == 100
    # the window rolls: one minute later tokens are counted afresh
    assert isinstance(
        admit((key,), estimate=0, reserve=True, now=T0 + 60, ledger=registry.ledger), Ticket
    )


def test_request_window_resets_when_it_ends() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", requests=2, duration="2s")
    for _ in range(2):
        assert isinstance(admit((key,), 0, True, T0, registry.ledger), Ticket)
    refused = admit((key,), 0, True, T0 + 1.9, registry.ledger)
    assert isinstance(refused, Refusal) and refused.reset_at == T0 + 2
    assert isinstance(admit((key,), 0, True, T0 + 2, registry.ledger), Ticket)


def test_a_charge_made_in_an_ended_window_is_kept_for_the_store_under_that_window() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0, duration="1d", calendar_aligned=True)
    counter = team.budgets[0]
    day_one = counter.start
    assert day_one == T0  # made at T0, midway through a day: its first window starts then
    midnight = (T0 // 86_400 + 1) * 86_400
    ticket = admit((team,), 0, True, T0, registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, cost=5, tokens=0, now=T0, ledger=registry.ledger)
    next_day = T0 + 86_400
    ticket = admit((team,), 0, True, next_day, registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, cost=3, tokens=0, now=next_day, ledger=registry.ledger)
    assert counter.value == 3
    assert registry.ledger.sealed == [("budget", counter.id, day_one, 5)]
    assert (counter.pending, counter.pending_start) == (3, midnight)


def test_calendar_month_budget_resets_on_the_first_not_after_30_days() -> None:
    registry = CounterRegistry()
    jan_31 = datetime(2027, 1, 31, 12, tzinfo=UTC).timestamp()
    team = budget_scope(registry, "research", 1.0, duration="1M", calendar_aligned=True, now=jan_31)
    counter = team.budgets[0]
    assert counter.start == jan_31  # made then: its first window starts there, to the 1st
    assert counter.end == datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    counter.value = USD
    feb_2 = datetime(2027, 2, 2, tzinfo=UTC).timestamp()
    assert isinstance(admit((team,), 0, True, feb_2, registry.ledger), Ticket)
    assert counter.end == datetime(2027, 3, 1, tzinfo=UTC).timestamp()


def test_changing_a_limit_keeps_its_usage() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0)
    team.budgets[0].value = 400
    again = budget_scope(registry, "research", 2.0, used=0)
    assert again.budgets[0] is team.budgets[0]
    assert (again.budgets[0].value, again.budgets[0].limit) == (400, 2 * USD)


# -- the flattened fast path decides and settles exactly as the scopes do ------------------------


def _world(spec: list[dict[str, Any]], used_at: float) -> tuple[CounterRegistry, list[Scope]]:
    """One registry with a scope per entry of `spec` (each limit present or None)."""
    registry = CounterRegistry()
    scopes = []
    for n, s in enumerate(spec):
        budgets: tuple[WindowCounter, ...] = ()
        if s["budget"] is not None:
            b = registry.window(
                "budget",
                f"b{n}",
                limit=s["budget"],
                duration=Duration.parse("1h"),
                calendar_aligned=False,
                last_reset=datetime.fromtimestamp(T0, UTC),
                usage=s["budget_used"] or 0,
                now=used_at,
            )
            b.reserved = s["reserved"] or 0
            budgets = (b,)
        windows = {}
        for kind in ("request", "token"):
            limit = s[kind]
            windows[kind] = None
            if limit is not None:
                windows[kind] = registry.window(
                    kind,
                    f"r{n}",
                    limit=limit,
                    duration=Duration.parse("1m"),
                    calendar_aligned=False,
                    last_reset=datetime.fromtimestamp(T0, UTC),
                    usage=s[f"{kind}_used"] or 0,
                    now=used_at,
                )
        slots = None
        if s["concurrent"] is not None:
            slots = registry.slots(f"r{n}", s["concurrent"])
            slots.in_flight = s["in_flight"] or 0
        rate = None
        if windows["request"] or windows["token"] or slots:
            rate = RateLimitCounters(f"r{n}", windows["request"], windows["token"], slots)
        if s["charged"]:  # charged before in this window: the usual case for a live counter
            for counter in (*budgets, windows["request"], windows["token"]):
                if counter is not None:
                    counter.add(1, registry.ledger)
        scopes.append(Scope("team", f"s{n}", f"s{n}", budgets, rate))
    return registry, scopes


def _state(registry: CounterRegistry, now: float) -> object:
    """Everything admission and settlement change. Windows are rolled to `now` first: a roll is
    lazy (each counter rolls when touched), so which counters a refusal happened to roll is no
    difference."""
    for by_id in registry.windows.values():
        ensure_current(list(by_id.values()), now, registry.ledger)
    windows = {
        (kind, id_): (c.value, c.pending, c.pending_start, c.reserved, c.start, c.end)
        for kind, by_id in registry.windows.items()
        for id_, c in by_id.items()
    }
    slots = {id_: s.in_flight for id_, s in registry.concurrency.items()}
    ledger = registry.ledger
    return windows, slots, sorted(ledger.sealed), sorted((c.kind, c.id) for c in ledger.dirty)


# small numbers, so that values meet their limits exactly (the boundaries) often
_limit = st.one_of(st.none(), st.integers(1, 12))
_used = st.integers(0, 5)
_scope_spec = st.fixed_dictionaries(
    {
        "budget": _limit,
        "budget_used": _used,
        "reserved": st.integers(0, 3),
        "request": _limit,
        "request_used": _used,
        "token": _limit,
        "token_used": _used,
        "concurrent": st.one_of(st.none(), st.integers(0, 4)),
        "in_flight": st.integers(0, 3),
        "charged": st.booleans(),
    }
)


def check_rate_limits(scopes: list[Scope], now: float, ledger: Ledger) -> Refusal | None:
    """SPEC §5's rate limits read scope by scope, as a person would check them."""
    for scope in scopes:
        rate = scope.rate_limit
        if rate is None:
            continue
        for code, counter in (
            ("request_limit_exceeded", rate.requests),
            ("token_limit_exceeded", rate.tokens),
        ):
            if counter is None:
                continue
            if now >= counter.end:
                counter.roll(now, ledger)
            if counter.value >= counter.limit:
                reset = None if counter.end == float("inf") else counter.end
                return Refusal(code, scope, counter.limit, counter.value, reset)
        slots = rate.concurrency
        if slots is not None and slots.limit is not None and slots.in_flight >= slots.limit:
            return Refusal("concurrency_limit_exceeded", scope, slots.limit, slots.in_flight, None)
    return None


def check_budgets(
    scopes: list[Scope], estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Refusal | None:
    """SPEC §5's budgets read scope by scope: exhausted first, then filled by reservations."""
    held: Refusal | None = None
    for scope in scopes:
        for budget in scope.budgets:
            if now >= budget.end:
                budget.roll(now, ledger)
            reset = None if budget.end == float("inf") else budget.end
            if budget.value >= budget.limit:
                return Refusal("budget_exceeded", scope, budget.limit, budget.value, reset)
            if (
                held is None
                and reserve
                and budget.reserved > 0
                and budget.value + budget.reserved + estimate > budget.limit
            ):
                held = Refusal(
                    "budget_reserved", scope, budget.limit, budget.value, reset, budget.reserved
                )
    return held


def _reference_admit(
    scopes: list[Scope], estimate: int, reserve: bool, now: float, ledger: Ledger
) -> Refusal | int:
    """Admission as SPEC §5 reads, scope by scope: the refusal, or the reservation taken."""
    refusal = check_rate_limits(scopes, now, ledger) or check_budgets(
        scopes, estimate, reserve, now, ledger
    )
    if refusal is not None:
        return refusal
    reservation = estimate if reserve else 0
    for scope in scopes:
        rate = scope.rate_limit
        if rate is not None:
            if rate.requests is not None:
                rate.requests.add(1, ledger)
            if rate.concurrency is not None:
                rate.concurrency.in_flight += 1
        for budget in scope.budgets:
            budget.reserved += reservation
    return reservation


def _reference_settle(
    scopes: list[Scope], reservation: int, cost: int, tokens: int, now: float, ledger: Ledger
) -> None:
    for scope in scopes:
        for budget in scope.budgets:
            budget.reserved = max(budget.reserved - reservation, 0)
            if now >= budget.end:
                budget.roll(now, ledger)
            if cost:
                budget.add(cost, ledger)
        rate = scope.rate_limit
        if rate is not None:
            if rate.tokens is not None and tokens:
                if now >= rate.tokens.end:
                    rate.tokens.roll(now, ledger)
                rate.tokens.add(tokens, ledger)
            if rate.concurrency is not None and rate.concurrency.in_flight > 0:
                rate.concurrency.in_flight -= 1


@given(
    spec=st.lists(_scope_spec, min_size=1, max_size=3),
    estimate=st.integers(0, 5),
    reserve=st.booleans(),
    later=st.sampled_from([0.0, 30.0, 90.0, 4000.0]),  # within, or past, the windows' ends
    cost=st.integers(0, 6),
    tokens=st.integers(0, 6),
)
@settings(max_examples=400, deadline=None)
def test_admission_and_settlement_over_flattened_limits_match_the_scopes_exactly(
    spec: list[dict[str, Any]],
    estimate: int,
    reserve: bool,
    later: float,
    cost: int,
    tokens: int,
) -> None:
    """The one pass over counters flattened by kind decides and charges exactly as SPEC §5's
    reading, scope by scope, would (a plain model here)."""
    model_registry, model_scopes = _world(spec, T0)
    registry, scopes = _world(spec, T0)
    now = T0 + later
    expected = _reference_admit(model_scopes, estimate, reserve, now, model_registry.ledger)
    got = admission.admit(LimitSet(tuple(scopes)), estimate, reserve, now, registry.ledger)
    assert isinstance(got, Refusal) == isinstance(expected, Refusal)
    assert _state(registry, now) == _state(model_registry, now)  # a refusal touched nothing
    if isinstance(got, Refusal):
        assert isinstance(expected, Refusal)
        assert (got.code, got.scope.id, got.limit, got.used, got.reserved) == (
            expected.code, expected.scope.id, expected.limit, expected.used, expected.reserved
        )  # fmt: skip
        return
    assert got.reservation == expected
    # the tightest limits, found on the way, are those the answer's headers would look for
    assert got.tightest == tightest_now(LimitSet(tuple(scopes)))
    _reference_settle(model_scopes, got.reservation, cost, tokens, now + 1, model_registry.ledger)
    settle(got, cost, tokens, now + 1, registry.ledger)
    assert _state(registry, now + 1) == _state(model_registry, now + 1)


def test_counters_with_the_same_window_share_its_bounds_and_keep_their_kind() -> None:
    """Memory: the request and token windows of a rate limit (and any limits set up together)
    hold one float object per bound, not one each; a counter's kind is its class's."""
    registry = CounterRegistry()
    rate = rate_scope(registry, "team", requests=10, tokens=1000, duration="1h").rate_limit
    assert rate is not None and rate.requests is not None and rate.tokens is not None
    budget = budget_scope(registry, "other", 1.0, "1h").budgets[0]
    windows = (rate.requests, rate.tokens, budget)
    assert [w.kind for w in windows] == ["request", "token", "budget"]
    assert rate.requests.start == T0 and rate.requests.end == T0 + 3600
    assert not hasattr(budget, "__dict__")  # slots only
    for attribute in ("anchor", "start", "end"):
        held = [getattr(w, attribute) for w in windows]  # held: ids of live objects
        assert len({id(bound) for bound in held}) == 1, attribute


def test_only_a_budget_reserved_refusal_carries_what_is_reserved() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 1.0, used=USD // 2)
    held = admit((team,), estimate=USD // 4, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(held, Ticket)
    refused = admit((team,), estimate=USD // 3, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.reserved) == ("budget_reserved", USD // 4)
    exhausted = budget_scope(registry, "spent", 1.0, used=USD)
    refused = admit((exhausted,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.reserved) == ("budget_exceeded", 0)
    key = rate_scope(registry, "alice", requests=0)
    refused = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.reserved) == ("request_limit_exceeded", 0)


def test_a_ticket_names_its_scopes_and_is_unsettled_until_settled() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", concurrent=1)
    team = budget_scope(registry, "research", 1.0)
    limits = LimitSet((key, team))
    ticket = Ticket(limits, 0)  # as a backend that admits elsewhere (Redis) builds one
    assert ticket.scopes == (key, team)
    assert ticket.settled is False
    rate = key.rate_limit
    assert rate is not None and rate.concurrency is not None
    rate.concurrency.in_flight = 1
    settle(ticket, 5, 0, T0, registry.ledger)
    assert ticket.settled is True
    assert rate.concurrency.in_flight == 0
    assert team.budgets[0].value == 5


def test_settling_when_no_slot_is_held_leaves_none_negative() -> None:
    registry = CounterRegistry()
    key = rate_scope(registry, "alice", concurrent=2)
    ticket = admit((key,), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    rate = key.rate_limit
    assert rate is not None and rate.concurrency is not None
    rate.concurrency.in_flight = 0  # the slots were reset meanwhile
    settle(ticket, 0, 0, T0, registry.ledger)
    assert rate.concurrency.in_flight == 0


def test_a_cost_and_tokens_settled_at_the_instant_their_windows_end_count_in_the_next() -> None:
    registry = CounterRegistry()
    team = budget_scope(registry, "research", 10.0, duration="1h")
    key = rate_scope(registry, "alice", tokens=1000, duration="1h")
    ticket = admit((key, team), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    settle(ticket, 7, 30, T0, registry.ledger)  # the first window: 7 nano-dollars, 30 tokens
    ticket = admit((key, team), estimate=0, reserve=True, now=T0, ledger=registry.ledger)
    assert isinstance(ticket, Ticket)
    end = T0 + 3600
    settle(ticket, 5, 20, end, registry.ledger)
    budget = team.budgets[0]
    rate = key.rate_limit
    assert rate is not None and rate.tokens is not None
    assert (budget.start, budget.value) == (end, 5)
    assert (rate.tokens.start, rate.tokens.value) == (end, 20)
    assert ("budget", "b-research", T0, 7) in registry.ledger.sealed
    assert ("token", "r-alice", T0, 30) in registry.ledger.sealed


def test_of_several_candidates_the_first_admitted_wins_after_the_refusals_before_it() -> None:
    registry = CounterRegistry()
    spent = LimitSet((budget_scope(registry, "spent", 1.0, used=USD),))
    closed = LimitSet((rate_scope(registry, "closed", requests=0),))
    team = budget_scope(registry, "open", 1.0)
    open_ = LimitSet((team,))
    ledger = registry.ledger

    first = admission.admit_first([(open_, 10), (spent, 10)], True, T0, ledger)
    assert first.index == 0 and first.refusals == []
    assert isinstance(first.ticket, Ticket) and first.ticket.limits is open_
    assert first.ticket.reservation == 10

    later = admission.admit_first([(spent, 10), (closed, 10), (open_, 20)], True, T0, ledger)
    assert later.index == 2
    assert isinstance(later.ticket, Ticket) and later.ticket.limits is open_
    assert [r.code for r in later.refusals] == ["budget_exceeded", "request_limit_exceeded"]
    assert later.tried == [0, 1]  # each refusal with the candidate it came from
    assert team.budgets[0].reserved == 30  # both tickets hold their reservation

    none = admission.admit_first([(spent, 10), (closed, 10)], True, T0, ledger)
    assert (none.index, none.ticket) == (-1, None)
    assert [r.code for r in none.refusals] == ["budget_exceeded", "request_limit_exceeded"]
    assert none.tried == [0, 1]
    nothing = admission.admit_first([], True, T0, ledger)
    assert (nothing.index, nothing.ticket, nothing.refusals) == (-1, None, [])


def test_a_rate_window_s_reset_header_rounds_up_as_retry_after_does() -> None:
    """`x-ratelimit-reset-*` in whole seconds, rounded up: a window ending in 0.4 s said `0s`
    (a client that waited it was refused), one 1.6 s away `2s` either way, one a minute away
    `60s`; an hour's, admitted 0.6 s in, `3600s` (it said `3599s` on a loaded machine)."""
    from budget_middleware.headers import add_limit_headers

    registry = CounterRegistry()
    key = rate_scope(registry, "alice", requests=5, duration="1m")
    told = {}
    for before_end in (60.0, 59.4, 1.6, 0.4, 0.0005):
        ticket = admit((key,), 0, True, T0 + 60 - before_end, registry.ledger)
        assert isinstance(ticket, Ticket) and ticket.tightest is not None
        out: list[tuple[bytes, bytes]] = []
        add_limit_headers(out, ticket.tightest, T0 + 60 - before_end)
        told[before_end] = dict(out)[b"x-ratelimit-reset-requests"].decode()
    print("reset header by seconds left:", told)
    assert told == {60.0: "60s", 59.4: "60s", 1.6: "2s", 0.4: "1s", 0.0005: "1s"}


def test_most_remaining_admits_the_candidate_whose_tightest_budget_has_the_most_left() -> None:
    """most_remaining tries the candidates from the most room down: of $1 with $0.90 spent, $1
    with $0.20 spent and a spent $1, the second is admitted first-hand (nothing tried before
    it); the spent one, ranked last, is never tried."""
    registry = CounterRegistry()
    low = LimitSet((budget_scope(registry, "low", 1.0, used=9 * USD // 10),))
    roomy = LimitSet((budget_scope(registry, "roomy", 1.0, used=2 * USD // 10),))
    spent = LimitSet((budget_scope(registry, "spent", 1.0, used=USD),))
    candidates = [(low, 10), (spent, 10), (roomy, 10)]
    first = admission.admit_first(candidates, True, T0, registry.ledger, most_remaining=True)
    print(f"most_remaining admitted candidate {first.index}, tried {first.tried} before it")
    assert (first.index, first.tried, first.refusals) == (2, [], [])
    assert isinstance(first.ticket, Ticket) and first.ticket.limits is roomy
    ordered = admission.admit_first(candidates, True, T0, registry.ledger)
    assert (ordered.index, ordered.tried) == (0, [])


def test_retry_at_is_the_latest_end_of_the_rate_windows_spent_now() -> None:
    """`retry_at`: when every spent request and token window has ended (the refusal names the
    first; a client waiting for that one alone was refused again by the next)."""
    registry = CounterRegistry()
    key = rate_scope(registry, "key", requests=1, duration="1m")
    team = rate_scope(registry, "team", tokens=100, duration="1h")
    customer = rate_scope(registry, "customer", requests=5, duration="1d")  # not spent
    never = rate_scope(registry, "zero", requests=0, duration="1w")  # a limit of 0: final
    limits = LimitSet((key, team, customer, never))
    assert admission.retry_at(limits, T0) is None  # nothing spent
    key.rate_limit.requests.value = 1  # type: ignore[union-attr]
    assert admission.retry_at(limits, T0) == T0 + 60
    team.rate_limit.tokens.value = 150  # type: ignore[union-attr]  (over: measured after)
    assert admission.retry_at(limits, T0) == T0 + 3600
    assert admission.retry_at(limits, T0 + 60) == T0 + 3600  # the minute's end: ended
    assert admission.retry_at(limits, T0 + 3600) is None  # both ended
    team.rate_limit.tokens.value = 99  # type: ignore[union-attr]  (one left: not spent)
    assert admission.retry_at(limits, T0) == T0 + 60
    # A request window that never resets, spent: no retry passes, so no end to wait for (an
    # infinite wait would be no Retry-After at all: it raised).
    lifetime = registry.window(
        "request", "r-lifetime", limit=1, duration=None, calendar_aligned=False,
        last_reset=datetime.fromtimestamp(T0, UTC), usage=1, now=T0,
    )  # fmt: skip
    rate = RateLimitCounters("r-lifetime", lifetime, None, None)
    only = LimitSet((Scope("team", "t", "t", rate_limit=rate),))
    assert admission.retry_at(only, T0) is None
    print("retry at +60 s, then +3,600 s with the team's hour spent too; never for a lifetime")


def test_a_stored_window_is_begun_anew_where_the_terms_do_not_roll_to() -> None:
    """`begun_anew_at`: a window starting where a counter's terms roll (its anchor plus whole
    durations) was rolled to; one starting anywhere else was begun anew (a reset, new terms).
    A window that never ends is only ever begun anew."""
    registry = CounterRegistry()
    hourly = budget_scope(registry, "hourly", 1.0, "1h").budgets[0]
    forever = budget_scope(registry, "forever", 1.0, None).budgets[0]
    rolled = [hourly.begun_anew_at(T0 + n * 3600) for n in (1, 2, 24)]
    anew = [hourly.begun_anew_at(T0 + s) for s in (1800, 3600.5, 3599, 7200 + 0.01)]
    print("rolled to:", rolled, "begun anew:", anew)
    assert rolled == [False, False, False]
    assert anew == [True, True, True, True]
    assert forever.begun_anew_at(T0 + 60) is True
    assert forever.begun_anew_at(T0) is True  # even where it was made: it never rolls
