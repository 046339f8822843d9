"""`GET /metrics`: Prometheus text, built at scrape time from the store, the live counters and the
engine's statistics, in a registry of our own (never the process-global one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from budget_middleware.admin.answers import AdminAnswer, error
from budget_middleware.admin.context import Call
from budget_middleware.admin.provider_budgets import tightest
from budget_middleware.exceptions import ServiceUnavailable
from budget_middleware.manage.schemas import BudgetOut

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - the "metrics" extra is not installed
    CollectorRegistry = None  # type: ignore[assignment,misc]

from starlette.responses import Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
logger = logging.getLogger("budget_middleware.admin")


def _families(budgets: Sequence[BudgetOut], engine: Any, now: float) -> Iterator[Metric]:
    stats = engine.stats
    labels = ["budget_id", "owner_type", "user_path", "reset_duration"]
    remaining = GaugeMetricFamily(
        "budget_remaining_usd", "USD left in the budget's current window", labels=labels
    )
    spent = GaugeMetricFamily(
        "budget_spent_usd", "USD spent in the budget's current window", labels=labels
    )
    limit = GaugeMetricFamily("budget_limit_usd", "The budget's max_limit", labels=labels)
    for b in budgets:
        values = [b.id, b.owner_type, b.user_path, b.reset_duration or "never"]
        remaining.add_metric(values, b.remaining)
        spent.add_metric(values, b.spent)
        limit.add_metric(values, b.max_limit)
    yield from (remaining, spent, limit)
    provider = GaugeMetricFamily(
        "budget_provider_remaining_usd",
        "USD left in each provider's tightest provider-wide budget (GET /provider/budgets)",
        labels=["provider"],
    )
    for name, budget in tightest(budgets, engine.registry).items():
        provider.add_metric([name], budget.remaining)
    yield provider
    admitted = CounterMetricFamily("budget_requests_admitted", "Inference requests admitted")
    admitted.add_metric([], stats.admitted)
    yield admitted
    refused = CounterMetricFamily(
        "budget_requests_refused", "Inference requests refused, by reason", labels=["reason"]
    )
    for reason, count in sorted(stats.refused.items()):
        refused.add_metric([reason], count)
    yield refused
    tokens = CounterMetricFamily("budget_tokens", "Tokens measured", labels=["direction"])
    tokens.add_metric(["input"], stats.input_tokens)
    tokens.add_metric(["output"], stats.output_tokens)
    yield tokens
    unpriced = CounterMetricFamily("budget_unpriced_requests", "Requests of a model with no price")
    unpriced.add_metric([], stats.unpriced_requests)
    yield unpriced
    pending = GaugeMetricFamily("budget_pending_writes", "Not yet written", labels=["kind"])
    pending.add_metric(["usage_records"], engine.pending_records)
    pending.add_metric(["counter_deltas"], engine.pending_deltas)
    yield pending
    lag = GaugeMetricFamily(
        "budget_flush_lag_seconds",
        "Seconds since the writer last had everything written (0 to a flush interval when idle)",
    )
    lag.add_metric([], now - stats.last_flush_at if stats.last_flush_at is not None else 0.0)
    yield lag
    failures = CounterMetricFamily("budget_flush_failures", "Flushes that failed and were kept")
    failures.add_metric([], stats.flush_failures)
    yield failures
    spilled = CounterMetricFamily(
        "budget_spilled_batches",
        "Batches of charges kept on disk while the store was down (BUDGET_SPILL_DIR)",
    )
    spilled.add_metric([], stats.spilled_batches)
    yield spilled
    rejected = CounterMetricFamily(
        "budget_rejected",
        "Usage records and counter charges the store refused, and spilled batches that could "
        "not be read, set aside (GET /usage/rejected)",
        labels=["kind"],
    )
    for kind in ("usage_record", "counter", "spilled_batch"):
        rejected.add_metric([kind], stats.rejected.get(kind, 0))
    yield rejected
    alerts = engine.alerts
    raised = CounterMetricFamily(
        "budget_alerts_raised", "Alerts this instance raised (SPEC §14), by type", labels=["type"]
    )
    for type_ in ("budget.threshold", "budget.exhausted"):
        raised.add_metric([type_], alerts.raised.get(type_, 0))
    yield raised
    failed = CounterMetricFamily(
        "budget_alert_deliveries_failed", "Alert deliveries that failed (each attempt, each URL)"
    )
    failed.add_metric([], alerts.failed_deliveries)
    yield failed
    shadow = CounterMetricFamily(
        "budget_shadow_refusals",
        "Requests shadow mode let through that would have been refused, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(stats.shadow_refusals.items()):
        shadow.add_metric([reason], count)
    yield shadow


class _Snapshot:
    """A collector over one scrape's data."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def metrics_answer(call: Call) -> Response | AdminAnswer:
    if CollectorRegistry is None:
        return error(
            501,
            "metrics_unavailable",
            "GET /metrics needs prometheus-client: pip install 'budget-middleware[metrics]'",
            error_type="not_implemented",
        )
    engine = call.engine
    live = await engine.live_counters()
    try:
        budgets = await call.run(call.manager.list_budgets, from_memory=True, counters=live)
        store_up = 1.0
    except (ServiceUnavailable, SQLAlchemyError, OSError) as exc:
        # The store down: the budgets cannot be listed, but the writer's figures are what tell
        # the outage (failures, pending writes, lag): answered without the budgets' gauges.
        logger.warning("GET /metrics: the store cannot be read (%s)", type(exc).__name__)
        budgets, store_up = [], 0.0
    families = list(_families(budgets, engine, engine.clock()))
    up = GaugeMetricFamily("budget_store_up", "1 when /metrics could read the store, else 0")
    up.add_metric([], store_up)
    families.append(up)
    registry = CollectorRegistry(auto_describe=False)
    collector: Collector = _Snapshot(families)
    registry.register(collector)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
