"""Errors of the management API, raised by `BudgetManager` and mapped to HTTP by the admin app.

AdminError
 ├── NotFound        404  an id (or name) that does not exist
 ├── Conflict        409  a duplicate name, a duplicate `reset_duration` on one owner
 └── InvalidRequest  422  a value the body's schema cannot catch (e.g. a team's customer id)
"""

from __future__ import annotations

__all__ = ["AdminError", "Conflict", "InvalidRequest", "NotFound"]


class AdminError(Exception):
    """Base of every management error; `param` names the offending field when there is one."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(AdminError):
    status = 404
    code = "not_found"


class Conflict(AdminError):
    status = 409
    code = "conflict"


class InvalidRequest(AdminError):
    status = 422
    code = "invalid_value"
