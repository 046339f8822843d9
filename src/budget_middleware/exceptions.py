"""Every error the package raises on purpose, under one root.

BudgetError
 ├── ConfigurationError   the configuration cannot be used; start-up fails on it, never retried
 │    ├── SettingsError        an invalid `BUDGET_*` setting (the message names the variable)
 │    ├── ConfigFileError      an invalid `BUDGET_CONFIG_FILE` (names the file and the entry)
 │    ├── PricingFileError     an invalid `BUDGET_PRICING_FILE` (names the file and the entry)
 │    └── StoreSchemaError     the store's schema is newer than this release (an older one is
 │                             upgraded)
 ├── ServiceUnavailable   the store or Redis cannot be reached (503 unless fail-open)
 └── AdminError           a management call refused (the admin API maps `status`)
      ├── NotFound        404  an id (or name) that does not exist
      ├── Conflict        409  a duplicate name, a duplicate `reset_duration` on one owner
      └── InvalidRequest  422  a value the body's schema cannot catch (e.g. a team's customer id)
           └── InvalidBody     a body its schema refuses, from the Python API (`errors` lists
                               every failing field; pydantic's ValidationError is `__cause__`)

`ConfigurationError` is also a `ValueError` and `ServiceUnavailable` a `RuntimeError`, as before;
`InvalidBody` is a `ValueError` too, as the pydantic `ValidationError` it replaces was.
"""

from __future__ import annotations

__all__ = [
    "AdminError",
    "BudgetError",
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
]


class BudgetError(Exception):
    """The root of every error of budget-middleware."""


class ConfigurationError(BudgetError, ValueError):
    """The configuration cannot be used: invalid settings, an invalid `BUDGET_CONFIG_FILE` or
    `BUDGET_PRICING_FILE`. Start-up fails on it; it is never retried."""


class SettingsError(ConfigurationError):
    """Invalid settings; the message names each offending environment variable."""


class ConfigFileError(ConfigurationError):
    """The file of `BUDGET_CONFIG_FILE` cannot be read or one of its entries is invalid."""

    def __init__(self, message: str) -> None:
        # A name quoted from the file may hold a lone surrogate (YAML's or JSON's `\ud800`),
        # which no UTF-8 text holds: escaped, so the message can be logged and answered (the
        # 422 of `POST /config/apply` raised UnicodeEncodeError).
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8"))


class PricingFileError(ConfigurationError):
    """`BUDGET_PRICING_FILE` cannot be used; the message says which file and what is wrong."""


class StoreSchemaError(ConfigurationError):
    """The store was made by a newer release: this one refuses to start on it (it would write
    what that release does not expect)."""


class ServiceUnavailable(BudgetError, RuntimeError):
    """The store or Redis cannot be reached (or refused a write) and the settings say to fail
    closed."""


class AdminError(BudgetError):
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


class InvalidBody(InvalidRequest, ValueError):
    """A body (keyword arguments or a mapping) its schema refuses, in a call of the Python
    management API. The message names the first failing field and what is wrong with it, as the
    admin API's 422 does (`budgets.0.reset_duration: Value error, invalid duration ...`),
    without the values given (pydantic's `input`; a rule's message may quote what it refused,
    as that duration); `param` is that field; `errors` lists every failure as the admin
    API's `errors` does (`param`, `message`, `kind`). pydantic's ValidationError is `__cause__`;
    a `ValueError`, as that error is (`except ValueError` catches both)."""

    def __init__(
        self, message: str, *, param: str | None = None, errors: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.errors = list(errors or [])
