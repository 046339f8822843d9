"""One admin request: its engine, parsed parameters and body, and manager calls in a thread."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, ParamSpec, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from ..engine import BudgetEngine
from ..manage import BudgetManager
from .answers import AdminAnswer, invalid, invalid_param

P = ParamSpec("P")
T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)


class Refused(Exception):
    """Stops a handler with a prepared answer (an invalid parameter or body)."""

    def __init__(self, answer: AdminAnswer) -> None:
        super().__init__(answer.status_code)
        self.answer = answer


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    schema: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of the admin API, and what its OpenAPI entry says of it."""

    method: str
    path: str
    handler: Callable[[Call], Awaitable[AdminAnswer]]
    summary: str
    answers: Mapping[int, type[BaseModel] | None]
    body: type[BaseModel] | None = None
    query: tuple[QueryParam, ...] = ()
    auth: Literal["admin", "virtual_key", "open"] = "admin"
    tag: str = "admin"


@dataclass(slots=True)
class Call:
    request: Request
    engine: BudgetEngine
    manager: BudgetManager
    path: dict[str, str] = field(default_factory=dict)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A blocking manager call, in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A write: the next request in this process sees it."""
        result = await self.run(fn, *args, **kwargs)
        await self.engine.invalidate()
        return result

    async def body(self, model: type[B]) -> B:
        raw = await self.request.body()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise Refused(invalid_param("body", "is not valid JSON")) from None
        if not isinstance(data, dict):
            raise Refused(invalid_param("body", "must be a JSON object"))
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise Refused(invalid(exc)) from None

    def text(self, name: str) -> str | None:
        value = self.request.query_params.get(name)
        return value if value not in (None, "") else None

    def flag(self, name: str) -> bool:
        value = self.text(name)
        if value is None:
            return False
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise Refused(invalid_param(name, "must be true or false"))

    def number(self, name: str, *, minimum: int, default: int | None = None) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise Refused(invalid_param(name, "must be an integer")) from None
        if number < minimum:
            raise Refused(invalid_param(name, f"must be at least {minimum}"))
        return number

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(name)
        if value is not None and value not in choices:
            raise Refused(invalid_param(name, f"must be one of {', '.join(choices)}"))
        return value

    def moment(self, name: str) -> datetime | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                moment = datetime.combine(date.fromisoformat(value), datetime.min.time())
            except ValueError:
                raise Refused(invalid_param(name, "must be an ISO 8601 date or time")) from None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
