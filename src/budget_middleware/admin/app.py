"""`create_admin_app()`: the admin API (SPEC §9) as a plain Starlette app, mountable anywhere.

Mounted sub-apps get no lifespan, so every request first makes sure the engine has started (cheap
once it has). A request is authenticated first, then its query (an unknown or repeated parameter
is a 422), path parameters and body are checked against the OpenAPI document, then it is handled.
Errors of the manager become 404/409/422; a store that cannot be reached, 503. One route per path
serves all its methods, so that a 405 names every method of the path in `Allow`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Route

from budget_middleware.admin.answers import error
from budget_middleware.admin.auth import check_admin, first_joined, virtual_key_value
from budget_middleware.admin.context import Call, Operation, Refused, check_path, parse_query
from budget_middleware.admin.dashboard import dashboard_routes
from budget_middleware.admin.metrics import metrics_answer
from budget_middleware.admin.openapi import openapi_document
from budget_middleware.admin.routes import OPERATIONS
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.exceptions import AdminError, StoreSchemaError
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.settings import BudgetSettings

__all__ = ["create_admin_app"]

logger = logging.getLogger("budget_middleware.admin")

Handler = Callable[[Request], Awaitable[Response]]


class _Rest(Convertor[str]):
    """The rest of the path, whatever it holds (Starlette's `path` stops at a line break), but
    not nothing: `/tags/` is `/tags` with a trailing slash (redirected), not the tag ""."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("budget_rest", _Rest())


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


async def _guarded(answer: Callable[[], Awaitable[Response]]) -> Response:
    """The answer, or the error answer a refusal or a failure of the store calls for."""
    try:
        return await answer()
    except Refused as exc:
        return exc.answer
    except AdminError as exc:
        if exc.status == 422:  # a 422 lists its failure in `errors`, whoever found it
            failure = {"param": exc.param, "message": exc.message, "kind": "value_error"}
            return error(422, exc.code, exc.message, param=exc.param, errors=[failure])
        return error(exc.status, exc.code, exc.message, param=exc.param)
    except DataError:
        # A value the database cannot hold that no check caught: the request's fault, not the
        # store's (which answers, so a 503 would send the caller retrying for nothing).
        logger.warning("admin API: the store refused a value (DataError)")
        return error(422, "invalid_value", "a value is out of the range the store can hold",
                     error_type="invalid_request_error")  # fmt: skip
    except (ServiceUnavailable, SQLAlchemyError, OSError) as exc:
        logger.warning("admin API: store unavailable (%s)", type(exc).__name__)
        away = error(503, "store_unavailable", "the budget store cannot be reached")
        away.headers["Retry-After"] = "1"  # as the middleware's 503: a retry may pass
        return away
    except StoreSchemaError as exc:  # a newer release's store: nothing is read or written
        return error(503, "store_unavailable", f"the budget store cannot be used: {exc}")


async def _admin(call: Call, *, store_optional: bool = False) -> None:
    refused = await check_admin(call.request, call.engine.settings, _is_key(call, store_optional))
    if refused is not None:
        raise Refused(refused)


async def _virtual_key(call: Call) -> None:
    """The credential of `GET /virtual-keys/quota`: the virtual key itself."""
    value = virtual_key_value(call.request, call.manager.settings)
    call.key_id = await call.run(call.manager.find_virtual_key, value) if value else None
    if call.key_id is None and value and (first := first_joined(value)):
        call.key_id = await call.run(call.manager.find_virtual_key, first)  # a header sent twice
    if call.key_id is None:
        code = "invalid_virtual_key" if value else "virtual_key_required"
        message = "unknown virtual key" if value else "this route needs the virtual key itself"
        raise Refused(error(401, code, message, error_type="authentication_error"))


def _endpoint(op: Operation, holder: _Holder) -> Handler:
    async def endpoint(request: Request) -> Response:
        async def answer() -> Response:
            engine = holder.engine
            if op.auth != "open":
                await engine.ensure_started()
            call = Call(request, engine, holder.manager, dict(request.path_params))
            if op.auth == "admin":
                await _admin(call)
            elif op.auth == "virtual_key":
                await _virtual_key(call)
            call.query = parse_query(request, op.query)
            check_path(call.path, {name: op.path_schema(name) for name in call.path})
            return await op.handler(call)

        return await _guarded(answer)

    endpoint.__name__ = op.handler.__name__
    return endpoint


def _dispatch(by_method: dict[str, Handler]) -> Handler:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await by_method[method](request)

    return dispatch


def _slash_ended(handler: Handler) -> Handler:
    """A route whose tag is the rest of the path matched `/tags/chat/` as the tag `chat/`, where
    every other route redirects a trailing slash (`PUT /tags/chat/` capped a tag no request
    sends for `chat`): a slash the client wrote at the end is redirected here too; `%2F` is part
    of the tag (`_without_slash`)."""

    async def dispatch(request: Request) -> Response:
        moved = _without_slash(request)
        if moved is not None:
            return RedirectResponse(moved, status_code=307)
        return await handler(request)

    return dispatch


def _is_key(call: Call, store_optional: bool = False) -> Callable[[str], Awaitable[bool]]:
    async def is_key(token: str) -> bool:
        try:
            return await call.run(call.manager.find_virtual_key, token) is not None
        except (ServiceUnavailable, SQLAlchemyError, OSError):
            if not store_optional:
                raise
            # `/metrics` in a store outage: the token is BUDGET_ADMIN_KEY (checked first); the
            # figures that tell the outage are not held back for want of the store's word
            return False

    return is_key


def create_admin_app(settings: BudgetSettings | None = None, **_: Any) -> Starlette:
    """The admin API. With equal settings (or none) it shares the middleware's engine, so a
    change made here takes effect on the very next request in this process."""
    holder = _Holder(settings)
    paths: dict[str, dict[str, Handler]] = {}
    for op in OPERATIONS:  # in order: /virtual-keys/quota comes before /virtual-keys/{id}
        paths.setdefault(op.path, {})[op.method] = _endpoint(op, holder)
    paths["/openapi.json"] = {"GET": _openapi(holder)}
    paths["/metrics"] = {"GET": _metrics(holder)}
    routes: list[BaseRoute] = [
        # A tag may hold a `/` (`team/search`), sent as %2F: the rest of the path is the tag,
        # line breaks too (`path`'s `.*` stops at one: a 404, or `ab\n` taken as `ab`).
        Route(
            path.replace("{tag}", "{tag:budget_rest}"),
            _slash_ended(_dispatch(handlers)) if "{tag}" in path else _dispatch(handlers),
            methods=list(handlers),
            name=path,
        )
        for path, handlers in paths.items()
    ]
    routes += dashboard_routes()  # the page and its assets: no data, no admin key (SPEC §9)
    for route in routes:
        _whole_path(route)
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    # "/customers/" is a 307 to "/customers" (`_not_found`), not Starlette's own redirect, which
    # would also send an id ending in an encoded slash (`/customers/x%2F`) to another object.
    app.router.redirect_slashes = False
    app.state.budget = holder
    return app


def _whole_path(route: BaseRoute) -> None:
    """Match `route` against the whole path: Starlette's `$` also matches before a final line
    break, so `POST /customers%0A` created a customer and `GET /health%0A` answered."""
    if isinstance(route, Route) and route.path_regex.pattern.endswith("$"):
        route.path_regex = re.compile(route.path_regex.pattern[:-1] + r"\Z")


def _admin_only(
    holder: _Holder,
    answer: Callable[[Call], Awaitable[Response]],
    *,
    store_optional: bool = False,
) -> Handler:
    """An admin route outside the route table: authenticated, takes no query parameters;
    `store_optional`: answered in a store outage too."""

    async def endpoint(request: Request) -> Response:
        async def guarded() -> Response:
            engine = holder.engine
            try:
                await engine.ensure_started()
            except (ServiceUnavailable, SQLAlchemyError, OSError):
                if not store_optional:
                    raise
            call = Call(request, engine, holder.manager)
            await _admin(call, store_optional=store_optional)
            parse_query(request, ())
            return await answer(call)

        return await _guarded(guarded)

    return endpoint


def _openapi(holder: _Holder) -> Handler:
    document: dict[str, Any] | None = None

    async def openapi(call: Call) -> Response:
        """The document, its `servers` the mount point (`root_path`: a Starlette `Mount`, a
        WSGI `SCRIPT_NAME`), so that a client generated from it calls the API where it is."""
        nonlocal document
        if document is None:
            document = openapi_document(OPERATIONS)
        mounted_at = call.request.scope.get("root_path") or "/"
        return JSONResponse({**document, "servers": [{"url": mounted_at}]})

    return _admin_only(holder, openapi)


def _metrics(holder: _Holder) -> Handler:
    return _admin_only(holder, metrics_answer, store_optional=True)


async def _not_found(request: Request, exc: Exception) -> Response:
    moved = _without_slash(request)
    if moved is not None:
        return RedirectResponse(moved, status_code=307)
    return error(404, "route_not_found", f"no admin route {request.url.path}")


def _without_slash(request: Request) -> str | None:
    """Where a path written with a trailing slash is a route without it (`/customers/`,
    `/customers/{id}/`): that URL, its query kept, as Starlette's and FastAPI's
    `redirect_slashes` answer (307: the method and body go with it). Only a slash the client
    wrote as one: a `%2F` at the end of an id is part of the id."""
    scope = request.scope
    path, raw = scope["path"], scope.get("raw_path")
    if not path.endswith("/") or (raw is not None and not raw.split(b"?")[0].endswith(b"/")):
        return None
    moved = {**scope, "path": path.rstrip("/")}
    if len(moved["path"]) <= len(scope.get("root_path", "")):  # the mount point itself
        return None
    app = scope.get("app")
    routes = app.router.routes if isinstance(app, Starlette) else ()
    if any(route.matches(moved)[0] is not Match.NONE for route in routes):
        return str(URL(scope=moved))
    return None


async def _not_allowed(request: Request, exc: Exception) -> Response:
    answer = error(405, "method_not_allowed", f"{request.method} is not allowed here",
                   error_type="invalid_request_error")  # fmt: skip
    if isinstance(exc, HTTPException) and exc.headers and "Allow" in exc.headers:
        methods = sorted(m.strip() for m in exc.headers["Allow"].split(","))
        answer.headers["Allow"] = ", ".join(methods)  # every method of this path
    return answer
