"""One admin request: its engine, parsed parameters and body, and manager calls in a thread."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any, Literal, ParamSpec, TypeVar

import anyio.to_thread
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request

from budget_middleware.admin.answers import (
    AdminAnswer,
    error,
    invalid,
    invalid_param,
    unknown_param,
)
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.manage.schemas import (
    NO_NUL,
    NUL_MESSAGE,
    RFC3339,
    TwiceGiven,
    json_float,
    text_problem_in,
    to_utc,
    unique_keys,
)

P = ParamSpec("P")
T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)


# The largest body an admin route reads: `POST /config/apply`'s 4,000,000 characters of text
# JSON-escaped (`\uXXXX`, 12 bytes for a character past U+FFFF), with room to spare.
MAX_BODY_BYTES = 64 * 1024 * 1024


class Refused(Exception):
    """Stops a handler with a prepared answer (an invalid parameter or body)."""

    def __init__(self, answer: AdminAnswer) -> None:
        super().__init__(answer.status_code)
        self.answer = answer


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A query parameter: its JSON Schema is both what the document says and what is accepted.

    Understood schemas: `integer` (`minimum`, `maximum`: give one, an integer of more than 18
    digits fits no database and is refused anyway), `boolean`, `string` with `enum`, `string` with
    `format: date-time` (an RFC 3339 date-time or a date), and plain `string` (no U+0000).
    """

    name: str
    schema: Mapping[str, Any]
    description: str = ""
    at_most: int | None = None  # an integer above it is taken as it (a page past every list)

    def parse(self, value: str) -> Any:
        """The value read from the query string; `Refused` (422, naming it) when invalid."""
        kind = self.schema.get("type")
        if kind == "integer":
            return self._integer(value)
        if kind == "boolean":
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise self._refuse("must be true or false")
        if "enum" in self.schema:
            if value not in self.schema["enum"]:
                raise self._refuse(f"must be one of {', '.join(self.schema['enum'])}")
            return value
        if self.schema.get("format") == "date-time":
            return self._moment(value)
        if "\x00" in value:
            raise self._refuse(_NUL)
        if len(value) > self.schema.get("maxLength", len(value)):
            raise self._refuse(f"has at most {self.schema['maxLength']} characters")
        return value

    def openapi(self) -> dict[str, Any]:
        """The schema as documented: plain strings say that they hold no U+0000."""
        schema = dict(self.schema)
        if schema.get("type") == "string" and not {"enum", "format", "pattern"} & schema.keys():
            schema["pattern"] = NO_NUL
        if schema.get("format") == "date-time":  # a date alone is accepted too
            schema.pop("format")
            schema["anyOf"] = [{"format": "date-time"}, {"format": "date"}]
        return schema

    def _refuse(self, message: str) -> Refused:
        return Refused(invalid_param(self.name, message))

    def _integer(self, value: str) -> int:
        # ASCII digits only: int() would also take "1_000", " 7" and other scripts' digits.
        if _INTEGER.fullmatch(value) is None:
            raise self._refuse("must be an integer")
        minimum, maximum = self.schema.get("minimum"), self.schema.get("maximum")
        negative = value.startswith("-")
        digits = value.lstrip("+-").lstrip("0")  # int() refuses 4,301 digits and more
        at_most = self.at_most
        if (
            at_most is not None
            and not negative
            and (len(digits) > len(str(at_most)) or int(digits or "0") > at_most)
        ):
            return at_most
        if len(digits) > 18:  # beyond any database's integer
            bound = minimum if negative else maximum
            side = "least" if negative else "most"
            raise self._refuse(f"must be at {side} {bound}" if bound is not None else _RANGE)
        number = -int(digits or "0") if negative else int(digits or "0")
        if minimum is not None and number < minimum:
            raise self._refuse(f"must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise self._refuse(f"must be at most {maximum}")
        return number

    def _moment(self, value: str) -> datetime:
        try:
            if _DATE.fullmatch(value):
                return datetime.combine(date.fromisoformat(value), time(), UTC)
            if RFC3339.fullmatch(value):
                return to_utc(_MOMENT.validate_python(value))
        except (ValueError, ValidationError):
            pass
        if _PLUS_AS_SPACE.search(value) and RFC3339.fullmatch(_PLUS_AS_SPACE.sub(r"+\1", value)):
            shown = value if len(value) <= 60 else value[:60] + "…"
            raise self._refuse(
                f"{shown!r} is a time whose '+' a URL's query read as a space: "
                "send the offset's '+' as %2B (2027-01-01T00:00:00%2B01:00)"
            )
        raise self._refuse("must be an RFC 3339 date-time with its offset "
                           "(2027-01-01T00:00:00Z) or a date (2027-01-01)")  # fmt: skip


# A FastAPI route's `bool` query parameter's spellings (pydantic's), lowercased.
_TRUE = ("true", "1", "yes", "on", "t", "y")
_FALSE = ("false", "0", "no", "off", "f", "n")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PLUS_AS_SPACE = re.compile(r" ([0-9]{2}:[0-9]{2})$")  # `+01:00` sent unescaped in a query
_MOMENT: TypeAdapter[datetime] = TypeAdapter(datetime)
_NUL = NUL_MESSAGE
_RANGE = "is out of range"
PATH_PARAM: Mapping[str, Any] = {"type": "string", "minLength": 1, "pattern": NO_NUL}


def parse_query(request: Request, params: tuple[QueryParam, ...]) -> dict[str, Any]:
    """The declared parameters present in the query, parsed. An unknown parameter, or one given
    twice, is a 422 naming it: a misspelt filter must not silently list everything."""
    declared = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        param = declared.get(name)
        if param is None:
            known = ", ".join(declared) or "none"
            raise Refused(unknown_param(name, f"this route's query parameters: {known}"))
        if name in values:
            raise Refused(invalid_param(name, "is given more than once"))
        values[name] = param.parse(value)
    return values


def check_path(path: Mapping[str, str], schemas: Mapping[str, Mapping[str, Any]]) -> None:
    """Path parameters keep to their documented schema (no U+0000, lengths)."""
    for name, value in path.items():
        schema = schemas.get(name, PATH_PARAM)
        if "\x00" in value:
            raise Refused(invalid_param(name, _NUL))
        if len(value) > schema.get("maxLength", len(value)):
            raise Refused(invalid_param(name, f"has at most {schema['maxLength']} characters"))


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
    path_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Schemas of path parameters other than the default (a non-empty string)."""
    description: str = ""
    """The OpenAPI entry's `description`: a rule its schemas cannot state (two parameters)."""

    def path_schema(self, name: str) -> Mapping[str, Any]:
        return self.path_params.get(name, PATH_PARAM)


@dataclass(slots=True)
class Call:
    request: Request
    engine: BudgetEngine
    manager: BudgetManager
    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    """The declared query parameters present, parsed (see `parse_query`)."""
    key_id: str | None = None
    """On a route whose credential is a virtual key: that key's id."""

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A blocking manager call, in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A write: the next request in this process sees it."""
        result = await self.run(fn, *args, **kwargs)
        await self.engine.invalidate()
        return result

    async def _raw_body(self) -> bytes:
        """The body's bytes, at most MAX_BODY_BYTES: past them a 413, read no further."""
        too_large = Refused(
            error(413, "request_too_large",
                  f"body: is over the admin API's {MAX_BODY_BYTES:,} bytes",
                  error_type="invalid_request_error", param="body")
        )  # fmt: skip
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def body(self, model: type[B]) -> B:
        """The JSON object of the request, validated by `model`; else `Refused` (422, or 413
        over MAX_BODY_BYTES)."""
        raw = await self._raw_body()
        if not raw.strip():
            raise Refused(invalid_param("body", "is required: a JSON object"))
        try:
            data = json.loads(
                raw,
                parse_constant=_no_constant,
                parse_float=json_float,
                object_pairs_hook=unique_keys,
            )
        except RecursionError:
            raise Refused(invalid_param("body", "is nested too deeply")) from None
        except TwiceGiven as exc:
            raise Refused(invalid_param("body", str(exc))) from None
        except (ValueError, UnicodeDecodeError):
            raise Refused(invalid_param("body", "is not valid JSON")) from None
        if not isinstance(data, dict):
            raise Refused(invalid_param("body", "must be a JSON object"))
        problem = text_problem_in(data)
        if problem is not None:
            raise Refused(invalid_param(*problem))
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise Refused(invalid(exc)) from None
        except RecursionError:
            raise Refused(invalid_param("body", "is nested too deeply")) from None

    def text(self, name: str) -> str | None:
        value = self.query.get(name)
        return value if isinstance(value, str) and value else None

    def flag(self, name: str) -> bool:
        return self.query.get(name) is True

    def number(
        self, name: str, *, minimum: int | None = None, default: int | None = None
    ) -> int | None:
        """An integer parameter (its declared schema has checked it), or `default`."""
        value = self.query.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return default
        if minimum is not None and value < minimum:
            raise Refused(invalid_param(name, f"must be at least {minimum}"))
        return value

    def choice(self, name: str, choices: tuple[str, ...] = ()) -> str | None:
        value = self.text(name)
        if value is not None and choices and value not in choices:
            raise Refused(invalid_param(name, f"must be one of {', '.join(choices)}"))
        return value

    def moment(self, name: str) -> datetime | None:
        value = self.query.get(name)
        return value if isinstance(value, datetime) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
