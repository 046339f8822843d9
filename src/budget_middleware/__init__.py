"""budget-middleware: LLM spend budgets and rate limits in front of any ASGI app.

app.add_middleware(BudgetMiddleware)            # configured from BUDGET_* variables
app.mount("/budget-admin", create_admin_app())  # optional admin API
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from budget_middleware.asgi.middleware import BudgetMiddleware, BudgetState
from budget_middleware.core.admission import Refusal
from budget_middleware.core.pricing import PriceBook, PricingFileError
from budget_middleware.core.usage import TokenUsage
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.settings import BudgetSettings, ConfigurationError, SettingsError

if TYPE_CHECKING:
    from budget_middleware.manage.manager import BudgetManager


def create_admin_app(settings: BudgetSettings | None = None, **kwargs: Any) -> Any:
    """The admin API as an ASGI app, sharing the engine of a middleware with equal settings."""
    from budget_middleware.admin.app import create_admin_app as build

    return build(settings, **kwargs)


def get_manager(settings: BudgetSettings | None = None) -> BudgetManager:
    """The Python management API of the engine for these settings."""
    return get_engine(settings).manager


__all__ = [
    "BudgetEngine",
    "BudgetMiddleware",
    "BudgetSettings",
    "BudgetState",
    "ConfigurationError",
    "PriceBook",
    "PricingFileError",
    "Refusal",
    "ServiceUnavailable",
    "SettingsError",
    "TokenUsage",
    "create_admin_app",
    "get_engine",
    "get_manager",
]
