"""budget-middleware for WSGI apps (Flask, Django; SPEC §15).

    from budget_middleware.wsgi import BudgetWSGIMiddleware, create_admin_wsgi_app

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app)                              # Flask
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/budget-admin": create_admin_wsgi_app()})

    application = BudgetWSGIMiddleware(get_wsgi_application())                     # Django
    urlpatterns = [*budget_middleware.wsgi.django.admin_urls("budget-admin/"), ...]

The engine (counters, flusher, cache refresh, Redis) runs in one background event loop per
process, started on the first request; pending charges are written when the process exits
(`atexit`), or when `shutdown()` is called (a gunicorn `worker_exit` hook, say).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from budget_middleware.engine.portal import shut_down_engines
from budget_middleware.settings import BudgetSettings
from budget_middleware.wsgi.middleware import STATE_KEY, BudgetWSGIMiddleware, budget_state

if TYPE_CHECKING:
    from budget_middleware.wsgi.admin import AdminWSGIApp


def create_admin_wsgi_app(settings: BudgetSettings | None = None) -> AdminWSGIApp:
    """The admin API (SPEC §9) as a WSGI app, sharing the engine of a `BudgetWSGIMiddleware`
    with equal settings (or both with none): a change made through it takes effect on the very
    next request in this process."""
    from budget_middleware.wsgi.admin import AdminWSGIApp

    return AdminWSGIApp(settings)


def shutdown(timeout: float = 30.0) -> None:
    """Write every pending charge and usage record now and stop the flusher (the engines start
    again on the next request). Runs by itself at process exit; call it from gunicorn's
    `worker_exit(server, worker)` hook, or wherever a process ends without `atexit`."""
    shut_down_engines(timeout)


__all__ = [
    "STATE_KEY",
    "BudgetWSGIMiddleware",
    "budget_state",
    "create_admin_wsgi_app",
    "shutdown",
]
