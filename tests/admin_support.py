"""Helpers for the admin API tests: an admin app on a fresh SQLite store, and its client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from budget_middleware import BudgetSettings, get_engine
from budget_middleware.admin import create_admin_app

ADMIN = {"Authorization": "Bearer admin-secret"}


def admin_settings(tmp_path: Path, **overrides: Any) -> BudgetSettings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/b.db",
        "admin_key": "admin-secret",
        "flush_interval_seconds": 0.05,
    }
    values.update(overrides)
    return BudgetSettings(**values)


@asynccontextmanager
async def admin_client(
    settings: BudgetSettings, app: Any = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the admin app (or `app`); the engine is shut down afterwards."""
    engine = get_engine(settings)
    app = app if app is not None else create_admin_app(settings)
    transport = httpx.ASGITransport(app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await engine.shutdown()
        engine.store.dispose()
