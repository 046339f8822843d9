"""The admin API: mount `create_admin_app()` anywhere in a host app (SPEC §9)."""

from __future__ import annotations

from budget_middleware.admin.app import create_admin_app

__all__ = ["create_admin_app"]
