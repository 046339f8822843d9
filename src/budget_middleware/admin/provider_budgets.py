"""`GET /provider/budgets` (SPEC §12): each provider's tightest provider-wide budget in LiteLLM's
shape, from the live counters (what `GET /budgets?from_memory=true` reads). `GET /metrics` shows
the same budgets' remaining USD as `budget_provider_remaining_usd`.

The tightest budget is the hard one with the least left, counting what requests in flight have
reserved (limit - spent - reserved, as routing's `most_remaining` ranks them); on a tie, the one
whose window ends first. A soft budget caps nothing: a provider with only soft ones is not listed.
`spend` and `budget_reset_at` mean what they mean in LiteLLM: the spend of the current window, and
when that window ends (and spend goes back to 0); null for a budget that never resets.
"""

from __future__ import annotations

from collections.abc import Iterable

from budget_middleware.admin.answers import AdminAnswer, ok
from budget_middleware.admin.context import Call
from budget_middleware.admin.envelopes import ProviderBudgetOut, ProviderBudgets
from budget_middleware.core.money import usd_from_nanos
from budget_middleware.core.windows import CounterRegistry
from budget_middleware.manage.litellm_config import litellm_period
from budget_middleware.manage.schemas import BudgetOut, dump


def _left(budget: BudgetOut, counters: CounterRegistry) -> float:
    """USD left once the reservations of requests in flight are counted."""
    live = counters.counter("budget", budget.id)
    reserved = usd_from_nanos(live.reserved) if live is not None else 0.0
    return budget.max_limit - budget.spent - reserved


def tightest(budgets: Iterable[BudgetOut], counters: CounterRegistry) -> dict[str, BudgetOut]:
    """Of the provider-wide budgets among `budgets`, each provider's tightest, by provider name."""
    by_provider: dict[str, list[BudgetOut]] = {}
    for budget in budgets:
        # A soft budget never refuses (SPEC §14): it caps nothing, and routing never ranks it.
        if budget.owner_type == "provider" and budget.provider is not None and not budget.soft:
            by_provider.setdefault(budget.provider, []).append(budget)
    return {
        provider: min(
            candidates,
            key=lambda b: (
                _left(b, counters),
                b.period_end.timestamp() if b.period_end else float("inf"),
                b.id,
            ),
        )
        for provider, candidates in sorted(by_provider.items())
    }


def litellm_shape(budget: BudgetOut) -> ProviderBudgetOut:
    return ProviderBudgetOut(
        budget_limit=budget.max_limit,
        time_period=litellm_period(budget.reset_duration),
        spend=budget.spent,
        budget_reset_at=budget.period_end,
    )


async def provider_budgets(call: Call) -> AdminAnswer:
    counters = await call.engine.live_counters()
    budgets = await call.run(
        call.manager.list_budgets, owner_type="provider", from_memory=True, counters=counters
    )
    chosen = tightest(budgets, counters)
    out = ProviderBudgets(providers={p: litellm_shape(b) for p, b in chosen.items()})
    return ok(dump(out))
