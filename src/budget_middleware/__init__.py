"""budget-middleware: LLM spend budgets and rate limits inside the app you already have.

app.add_middleware(BudgetMiddleware)            # configured from BUDGET_* variables
app.mount("/budget-admin", create_admin_app())  # optional admin API

Everything a user calls is importable from here; the modules behind it are internal (see
docs/architecture.md for the layout).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from budget_middleware.exceptions import (
    AdminError,
    BudgetError,
    ConfigFileError,
    ConfigurationError,
    Conflict,
    InvalidBody,
    InvalidRequest,
    NotFound,
    PricingFileError,
    ServiceUnavailable,
    SettingsError,
    StoreSchemaError,
)

if TYPE_CHECKING:
    from budget_middleware.asgi.middleware import BudgetMiddleware
    from budget_middleware.core.records import UsageRecord
    from budget_middleware.engine import BudgetEngine, get_engine
    from budget_middleware.engine.exchange import BudgetState
    from budget_middleware.manage.manager import BudgetManager
    from budget_middleware.outbound import BudgetSyncTransport, BudgetTransport, charge_to
    from budget_middleware.settings import BudgetSettings
    from budget_middleware.wsgi import BudgetWSGIMiddleware, create_admin_wsgi_app

# Imported when first used (PEP 562): `import budget_middleware.cli` (the command's `--help`)
# or `budget_middleware.exceptions` need no web framework, database or HTTP client.
_LAZY = {
    "BudgetMiddleware": "budget_middleware.asgi.middleware",
    "BudgetEngine": "budget_middleware.engine",
    "get_engine": "budget_middleware.engine",
    "BudgetState": "budget_middleware.engine.exchange",
    "BudgetManager": "budget_middleware.manage.manager",
    "BudgetSyncTransport": "budget_middleware.outbound.transport",
    "BudgetTransport": "budget_middleware.outbound.transport",
    "charge_to": "budget_middleware.outbound.payer",
    "UsageRecord": "budget_middleware.core.records",  # what `on_settled` hooks get
    "BudgetSettings": "budget_middleware.settings",
    # SPEC §15's entry points; SPEC §2: everything public is importable from here.
    "BudgetWSGIMiddleware": "budget_middleware.wsgi",
    "create_admin_wsgi_app": "budget_middleware.wsgi",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'budget_middleware' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def create_admin_app(settings: BudgetSettings | None = None, **kwargs: Any) -> Any:
    """The admin API as an ASGI app, sharing the engine of a middleware with equal settings."""
    from budget_middleware.admin.app import create_admin_app as build

    return build(settings, **kwargs)


def get_manager(settings: BudgetSettings | None = None) -> BudgetManager:
    """The Python management API of the engine for these settings."""
    from budget_middleware.engine import get_engine

    return get_engine(settings).manager


__all__ = [
    "AdminError",
    "BudgetEngine",
    "BudgetError",
    "BudgetManager",
    "BudgetMiddleware",
    "BudgetSettings",
    "BudgetState",
    "BudgetSyncTransport",
    "BudgetTransport",
    "BudgetWSGIMiddleware",
    "ConfigFileError",
    "ConfigurationError",
    "Conflict",
    "InvalidBody",
    "InvalidRequest",
    "NotFound",
    "PricingFileError",
    "ServiceUnavailable",
    "SettingsError",
    "StoreSchemaError",
    "UsageRecord",
    "charge_to",
    "create_admin_app",
    "create_admin_wsgi_app",
    "get_engine",
    "get_manager",
]
