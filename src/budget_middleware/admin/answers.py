"""The admin API's answers: JSON objects, and errors in OpenAI's shape (SPEC §8).

A validation error lists every failing field (`errors`) and names the first one in `param` and
its message (with how many more fail); it never echoes the submitted values (a body may hold a
key's value).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from budget_middleware.answers import error_body
from budget_middleware.manage.schemas import described
from budget_middleware.manage.schemas import failures as validation_failures

AdminAnswer = JSONResponse


def ok(body: dict[str, Any], status: int = 200) -> AdminAnswer:
    return JSONResponse(body, status_code=status)


def error(
    status: int,
    code: str,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> AdminAnswer:
    body = error_body(status, code, message, error_type=error_type, param=param, **extra)
    # A 401 names the scheme of the credential it wants (RFC 9110 15.5.2), as FastAPI's
    # `HTTPBearer` does: the admin key's and the quota route's virtual key, both bearers.
    headers = _CHALLENGE if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def invalid(exc: ValidationError, *, prefix: str = "") -> AdminAnswer:
    failures = [{**f, "param": prefix + f["param"]} for f in validation_failures(exc)]
    return error(
        422,
        "invalid_value",
        described(failures),  # as the management API's InvalidBody: "(and N more)"
        error_type="invalid_request_error",
        param=failures[0]["param"] if failures else None,
        errors=failures,
    )


def invalid_param(param: str, message: str) -> AdminAnswer:
    return error(
        422,
        "invalid_value",
        f"{param}: {message}",
        error_type="invalid_request_error",
        param=param,
        errors=[{"param": param, "message": message, "kind": "value_error"}],
    )


def unknown_param(param: str, hint: str) -> AdminAnswer:
    """A query parameter the route does not take (a typo must not pass as "no filter")."""
    shown = param if len(param) <= 100 else param[:100] + "…"
    message = f"unknown query parameter {shown!r}"
    return error(
        422,
        "unknown_parameter",
        f"{message}; {hint}",
        error_type="invalid_request_error",
        param=shown,
        errors=[{"param": shown, "message": message, "kind": "unknown_parameter"}],
    )
