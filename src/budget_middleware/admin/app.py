"""`create_admin_app()`: the admin API (SPEC §9) as a plain Starlette app, mountable anywhere.

Mounted sub-apps get no lifespan, so every request first makes sure the engine has started (cheap
once it has). Errors of the manager become 404/409/422; a store that cannot be reached, 503.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine import BudgetEngine, ServiceUnavailable, get_engine
from ..errors_admin import AdminError
from ..manage import BudgetManager
from ..settings import BudgetSettings
from ..store.database import StoreUnavailable
from .answers import error
from .auth import check_admin
from .context import Call, Operation, Refused
from .metrics import metrics_answer
from .openapi import openapi_document
from .routes import OPERATIONS

__all__ = ["create_admin_app"]

logger = logging.getLogger("budget_middleware.admin")


class _Holder:
    """The engine, found on first use: creating the app does no I/O and reads no environment."""

    def __init__(self, settings: BudgetSettings | None) -> None:
        self.settings = settings
        self._engine: BudgetEngine | None = None

    @property
    def engine(self) -> BudgetEngine:
        if self._engine is None:
            self._engine = get_engine(self.settings)
        return self._engine

    @property
    def manager(self) -> BudgetManager:
        return self.engine.manager  # its writes notify the engine (stale flag, budget resets)


def _endpoint(op: Operation, holder: _Holder) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            engine = holder.engine
            if op.auth != "open":
                await engine.ensure_started()
            call = Call(request, engine, holder.manager, dict(request.path_params))
            if op.auth == "admin":
                refused = await check_admin(request, engine.settings, _is_key(call))
                if refused is not None:
                    return refused
            return await op.handler(call)
        except Refused as exc:
            return exc.answer
        except AdminError as exc:
            return error(exc.status, exc.code, exc.message, param=exc.param)
        except (StoreUnavailable, ServiceUnavailable, SQLAlchemyError, OSError) as exc:
            logger.warning("admin API: store unavailable (%s)", type(exc).__name__)
            return error(503, "store_unavailable", "the budget store cannot be reached")

    endpoint.__name__ = op.handler.__name__
    return endpoint


def _is_key(call: Call) -> Callable[[str], Awaitable[bool]]:
    async def is_key(token: str) -> bool:
        return await call.run(call.manager.find_virtual_key, token) is not None

    return is_key


def create_admin_app(settings: BudgetSettings | None = None, **_: Any) -> Starlette:
    """The admin API. With equal settings (or none) it shares the middleware's engine, so a
    change made here takes effect on the very next request in this process."""
    holder = _Holder(settings)
    routes = [
        Route(op.path, _endpoint(op, holder), methods=[op.method], name=op.handler.__name__)
        for op in OPERATIONS
    ]
    routes.append(Route("/openapi.json", _openapi(holder), methods=["GET"]))
    routes.append(Route("/metrics", _metrics(holder), methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.budget = holder
    return app


def _openapi(holder: _Holder) -> Callable[[Request], Awaitable[Response]]:
    document: dict[str, Any] | None = None

    async def openapi(request: Request) -> Response:
        nonlocal document
        engine = holder.engine
        await engine.ensure_started()
        call = Call(request, engine, holder.manager)
        refused = await check_admin(request, engine.settings, _is_key(call))
        if refused is not None:
            return refused
        if document is None:
            document = openapi_document(OPERATIONS)
        return JSONResponse(document)

    return openapi


def _metrics(holder: _Holder) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(request: Request) -> Response:
        engine = holder.engine
        try:
            await engine.ensure_started()
            call = Call(request, engine, holder.manager)
            refused = await check_admin(request, engine.settings, _is_key(call))
            if refused is not None:
                return refused
            return await metrics_answer(call)
        except (StoreUnavailable, SQLAlchemyError, OSError):
            return error(503, "store_unavailable", "the budget store cannot be reached")

    return metrics


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "route_not_found", f"no admin route {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, "method_not_allowed", f"{request.method} is not allowed here",
                 error_type="invalid_request_error")  # fmt: skip
