"""The engine: one per settings in a process; caches, live counters, the flusher."""

from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine

__all__ = ["BudgetEngine", "ServiceUnavailable", "get_engine"]
