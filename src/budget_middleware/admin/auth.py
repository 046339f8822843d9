"""Who may call the admin API: the bearer of `BUDGET_ADMIN_KEY`, never a virtual key.

`GET /virtual-keys/quota` is the exception: its credential is the virtual key itself, found in the
same headers as the middleware reads.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request

from budget_middleware.admin.answers import AdminAnswer, error
from budget_middleware.core.identity import API_KEY_HEADERS
from budget_middleware.settings import BudgetSettings


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization` header's value `Bearer <token>` (None for another scheme,
    or no token): the one reading of it, for the admin API and for WSGI's `holds_admin_key`."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_admin_key(token: str, admin_key: str) -> bool:
    """Whether `token` is `admin_key`, compared in constant time."""
    return hmac.compare_digest(token.encode("latin-1", "replace"), admin_key.encode())


def first_joined(value: str) -> str | None:
    """The first of a header's values joined into one (`a,b`, `a, b`: a header sent twice, as a
    WSGI server passes it, PEP 3333 having one value a name, and as some proxies do), for a
    credential that is not found whole; None when nothing was joined. ASGI keeps each line, and
    a header sent twice counts by its first (Starlette's `request.headers`, the middleware's
    `header_reader`): every adapter then reads the same request alike."""
    first, comma, _ = value.partition(",")
    return first.strip() if comma else None


def admin_token(authorization: str, admin_key: str) -> str | None:
    """The bearer token an `Authorization` value presents to the admin API: whole when it is
    the admin key (one with a comma in it included), else its first joined value's
    (`first_joined`)."""
    token = bearer_token(authorization)
    if token is not None and not is_admin_key(token, admin_key):
        first = first_joined(authorization)
        if first is not None:
            token = bearer_token(first)
    return token


def bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization", ""))


async def check_admin(
    request: Request,
    settings: BudgetSettings,
    is_virtual_key: Callable[[str], Awaitable[bool]],
) -> AdminAnswer | None:
    """None when the caller holds the admin key, else the refusal to send."""
    if not settings.admin_key:
        return error(
            503,
            "admin_api_disabled",
            "the admin API is disabled: set BUDGET_ADMIN_KEY to enable it",
            error_type="service_unavailable",
        )
    token = admin_token(request.headers.get("authorization", ""), settings.admin_key)
    if token is None:
        return error(
            401,
            "admin_key_required",
            "this route needs 'Authorization: Bearer <BUDGET_ADMIN_KEY>'",
            error_type="authentication_error",
        )
    virtual = "a virtual key is not an admin credential: use BUDGET_ADMIN_KEY"
    if token.startswith(settings.key_prefix):
        return error(401, "virtual_key_not_allowed", virtual, error_type="authentication_error")
    if not is_admin_key(token, settings.admin_key):
        return error(
            401,
            "invalid_admin_key",
            "the bearer token is not BUDGET_ADMIN_KEY",
            error_type="authentication_error",
        )
    # The admin key itself is also a stored virtual key's value: refuse it rather than guess.
    if await is_virtual_key(token):
        return error(401, "virtual_key_not_allowed", virtual, error_type="authentication_error")
    return None


def virtual_key_value(request: Request, settings: BudgetSettings) -> str | None:
    """The virtual key of a request, first found wins (SPEC §4)."""
    value = request.headers.get(settings.key_header)
    if value:
        return value.strip()
    prefix = settings.key_prefix
    token = bearer(request)
    if token and token.startswith(prefix):
        return token
    for header in API_KEY_HEADERS:
        value = request.headers.get(header.decode(), "").strip()
        if value.startswith(prefix):
            return value
    return None
