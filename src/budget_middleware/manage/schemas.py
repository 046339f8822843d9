"""The admin API's shapes (SPEC §9): request bodies and the objects answers carry.

Bodies are strict (unknown fields are a 422) and keep to their JSON Schema: a boolean is `true` or
`false` (not `0` or `"yes"`), a number is a JSON number (not a string), a time is an RFC 3339
date-time with its offset, and no text holds U+0000. Rules that tie fields together (a rate
limit's max and duration, a key's single parent, a model config's scope and `scope_id`) are in
the schema too, so a body valid by the document is never refused for its shape. Updates are
partial: a field left out is left alone, a field sent as `null` is cleared (`rate_limit: null`
removes the rate limit). Money is USD. Responses carry Bifrost's field names and, on budgets,
GoModel's status fields as well.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from budget_middleware.core.alerts import check_threshold
from budget_middleware.core.durations import Duration
from budget_middleware.core.identity import (
    KEY_VALUE_PATTERN,
    MAX_MODEL_CHARS,
    MAX_PROVIDER_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    NAME_PATTERN,
    key_value_problem,
    name_problem,
)
from budget_middleware.core.providers import canonical_provider
from budget_middleware.core.routing import (
    MAX_TARGETS,
    parse_target,
    route_name_problem,
    target_problem,
)

OwnerType = Literal[
    "customer", "team", "virtual_key", "provider_config", "provider", "model_config", "tag"
]
GroupBy = Literal["virtual_key", "team", "customer", "provider", "model", "tag", "day"]


# -- values as JSON has them ----------------------------------------------------------------

NO_NUL: Final = "^[^\\u0000]*$"
"""The pattern of every free text of the admin API: PostgreSQL cannot store U+0000."""

NUL_MESSAGE: Final = "must not contain U+0000 (NUL)"
# The length of a key's value chosen by the caller (a create's `value`, `set_virtual_key_value`)
KEY_VALUE_LENGTH: Final = (8, 512)


class TwiceGiven(ValueError):
    """A JSON object names a key twice."""


def json_float(text: str) -> float:
    """A JSON number with a fraction or an exponent (`json.loads`'s `parse_float`): one too
    small for a float (`1e-400`, which reads as 0.0) keeps its sign as the smallest float of
    it, so that a positive amount written stays positive (SPEC §6: a positive `max_limit`
    never becomes zero, however small) and a negative one is refused as negative."""
    value = float(text)
    if value == 0.0 and any(c in "123456789" for c in re.split("[eE]", text, maxsplit=1)[0]):
        return math.copysign(5e-324, value)
    return value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object (`json.loads`'s `object_pairs_hook`), refused when it names a key twice:
    the last would silently win. Admin API bodies and config files alike."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise TwiceGiven(f"the key {key!r} is given twice in one object")
        data[key] = value
    return data


SURROGATE_MESSAGE: Final = (
    "must not hold a lone surrogate (an escape from \\ud800 to \\udfff alone): it is no "
    "Unicode text"
)
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def text_problem_in(data: Any) -> tuple[str, str] | None:
    """Where the first string that no store can hold is (`budgets.0.id`), and what is wrong with
    it: U+0000 (PostgreSQL cannot store it) or a lone surrogate (JSON's `"\\ud800"`: no UTF-8
    encodes it, so a write or a lookup of it raised UnicodeEncodeError, a 500); or None. A body
    of the admin API and an entry of a config file (SPEC §10: a create body) alike. Not
    recursive: the nesting json.loads accepts may be deeper than the stack left here."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return where or "body", NUL_MESSAGE
            if _LONE_SURROGATE.search(value):
                return where or "body", SURROGATE_MESSAGE
        elif isinstance(value, dict):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
            stack.extend(reversed(items))  # popped in document order
        elif isinstance(value, list):
            items = [(f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value)]
            stack.extend(reversed(items))
    return None


RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
"""An RFC 3339 date-time (JSON Schema's `date-time`): with its offset; ranges are checked after."""

_UTC_MIN: Final = datetime.min.replace(tzinfo=UTC)
_UTC_MAX: Final = datetime.max.replace(tzinfo=UTC)


def failures(exc: ValidationError) -> list[dict[str, str]]:
    """Every failing field of `exc` as the admin API's 422 lists it in `errors` (`param`: the
    field's dotted path, `message`, `kind`); never the value given (a body may hold a key's)."""
    return [
        {"param": ".".join(str(part) for part in e["loc"]) or "body", "message": e["msg"],
         "kind": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]  # fmt: skip


def described(found: list[dict[str, str]]) -> str:
    """`failures` in one line, as the admin API's 422 words its message: the first failing field
    and what is wrong with it, and how many more there are."""
    if not found:
        return "body: invalid"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{found[0]['param']}: {found[0]['message']}{more}"


def to_utc(moment: datetime) -> datetime:
    """An aware time in UTC, naive ones taken as UTC. Times within a day of the calendar's ends
    (`0001-01-01T00:00:00+01:00`) are clamped to them instead of overflowing."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return _UTC_MIN if moment.year == 1 else _UTC_MAX


def _not_text_or_bool(value: Any) -> Any:
    # bool is an int, and lax validation would read "5" as 5: JSON Schema allows neither.
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be a JSON number")
    return value


def _usd_number(value: Any) -> Any:
    value = _not_text_or_bool(value)
    if isinstance(value, float) and not math.isfinite(value):  # NaN, inf: before the bounds
        raise ValueError("must be a finite amount of USD, at most 1e9")
    return value


def _json_time(value: Any) -> Any:
    # Lax validation would read 1700000000 or "2026-01-01" as times; the schema says date-time.
    if isinstance(value, str):
        if RFC3339.fullmatch(value) is None:
            raise ValueError("must be an RFC 3339 date-time with its offset (2027-01-01T00:00:00Z)")
    elif isinstance(value, bool | int | float):
        raise ValueError("must be an RFC 3339 date-time string")
    return value


def _utc_time(value: datetime) -> datetime:
    return to_utc(value) if value.tzinfo is not None else value


JsonBool = Annotated[bool, Strict()]
JsonTime = Annotated[datetime, BeforeValidator(_json_time), AfterValidator(_utc_time)]
# Constraints before the validator: so they reach the number's schema as minimum and maximum.
Usd = Annotated[float, Field(ge=0, le=1e9), BeforeValidator(_usd_number)]
Count = Annotated[int, Field(ge=0, le=2**62), BeforeValidator(_not_text_or_bool)]
Concurrency = Annotated[int, Field(ge=1, le=2**31), BeforeValidator(_not_text_or_bool)]
# A fraction of a budget's max_limit at which an alert fires (SPEC §14): a JSON number.
Threshold = Annotated[float, Field(gt=0, le=10), BeforeValidator(_not_text_or_bool)]


def _numbers_up_to(top: int) -> str:
    """A regular expression of the decimal numbers 1..top, without leading zeros."""
    digits = str(top)
    parts = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for i, digit in enumerate(digits):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(digits) - i - 1
            tail = "[0-9]" * (rest == 1) + f"[0-9]{{{rest}}}" * (rest > 1)
            top_digit = int(digit) - 1
            span = str(low) if top_digit == low else f"[{low}-{top_digit}]"
            parts.append(f"{digits[:i]}{span}{tail}")
    parts.append(digits)
    return "|".join(parts)


def _longest(unit: str) -> int:
    """The largest count of `unit` that Duration accepts (it caps durations at 100 years)."""
    low, high = 1, 1
    while _valid_duration(high, unit):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _valid_duration(middle, unit) else (low, middle)
    return low


def _valid_duration(count: int, unit: str) -> bool:
    try:
        Duration(count, unit)
    except ValueError:
        return False
    return True


def _duration_pattern() -> str:
    spelled = {"M": "(M|mo)"}
    forms = [
        f"0*({_numbers_up_to(_longest(unit))}){spelled.get(unit, unit)}" for unit in "smhdwMQY"
    ]
    return "^(" + "|".join(forms) + ")$"


DURATION_PATTERN: Final = _duration_pattern()
"""Exactly the durations `Duration.parse` accepts, without surrounding blanks: `<n>s|m|h|d|w|M|Q|Y`
(or `mo`), n >= 1 (leading zeros allowed: `01d` is `1d`), at most 100 years."""


def _duration(value: str | None) -> str | None:
    if value is None:
        return None
    if value != value.strip():
        raise ValueError(f"invalid duration {value!r}: no blanks around it")
    return str(Duration.parse(value))  # "1mo" is stored as "1M"


DurationText = Annotated[str, WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN})]


# -- model names -------------------------------------------------------------------------------
# The manager refuses a name with whitespace or control characters, a `/` at either end or an
# unclosed `[` (scopes.model_name_problem). Its Unicode rule (str.isprintable) has no regular
# expression a fuzzer can draw from in reasonable time, and no provider names a model outside
# ASCII: the admin API takes printable ASCII, which the document's pattern then says exactly.

_VISIBLE = "\\x21-\\x7e"  # printable ASCII but the space
_NOT_BANG = "\\x22-\\x7e"
_NOT_CLOSE = "\\x21-\\x5c\\x5e-\\x7e"  # not ]
_NOT_OPEN = "\\x21-\\x5a\\x5c-\\x7e"  # not [
_NOT_OPEN_OR_SLASH = "\\x21-\\x2e\\x30-\\x5a\\x5c-\\x7e"
# fnmatch's bracket: `[`, `!` (negation) or not, one member (which may be `]`), more, `]`.
_BRACKET = f"\\[(?:![{_VISIBLE}]|[{_NOT_BANG}])[{_NOT_CLOSE}]*\\]"
_EDGE = f"(?:{_BRACKET}|[{_NOT_OPEN_OR_SLASH}])"
MODEL_NAME_PATTERN: Final = f"^{_EDGE}(?:(?:{_BRACKET}|[{_NOT_OPEN}])*{_EDGE})?$"
"""A model name: an exact name, `*` or an fnmatch glob, in printable ASCII without spaces; no `/`
at either end; every `[` closed by a `]` (one right after `[` or `[!` is a member)."""


def _ascii_model_name(name: str) -> str:
    if not name.isascii():
        raise ValueError("a model name is printable ASCII")
    return name  # the rest is the manager's check, with its messages


# At most MAX_MODEL_CHARS, as a request's model is read (cut there): a longer entry of a key's
# `blocked_models` never matched, and the model it blocked was served.
ModelName = Annotated[
    str,
    Field(max_length=MAX_MODEL_CHARS),  # before the validator: a string's constraint
    AfterValidator(_ascii_model_name),
    Field(json_schema_extra={"pattern": MODEL_NAME_PATTERN}),
]


def _checked_name(kind: str, limit: int, carried: bool) -> AfterValidator:
    def check(name: str) -> str:
        problem = name_problem(kind, name, limit, carried=carried)
        if problem is not None:
            raise ValueError(problem)
        return name

    return AfterValidator(check)


KeyTag = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TAG_CHARS, json_schema_extra={"pattern": NAME_PATTERN}),
    _checked_name("tag", MAX_TAG_CHARS, carried=True),
]
"""A key's tag, which every request of the key carries: one a tag's limits can name, by the rule
`PUT /tags/{tag}` keeps (`identity.name_problem`: as a request's tag is read, at most 100
characters, no control character, no space at either end)."""


def _each_tag_once(tags: list[str]) -> list[str]:
    """A key's tags, each once: `["dup", "dup"]` was stored and shown twice (`tags: dup, dup`),
    while every request of the key carries the tag once."""
    for n, tag in enumerate(tags):
        if tag in tags[:n]:
            raise ValueError(f"tag {n + 1}, {tag!r}, is given twice: a key lists each tag once")
    return tags


# At most MAX_TAGS, as many as a request carries (the key's first): a key's tags past them
# were dropped from its requests, and their limits with them.
KeyTags = Annotated[
    list[KeyTag],
    Field(max_length=MAX_TAGS, json_schema_extra={"uniqueItems": True}),
    AfterValidator(_each_tag_once),
]


def _presentable(value: str) -> str:
    problem = key_value_problem(value)
    if problem is not None:  # accepted, every request presenting it was refused 401
        raise ValueError(problem)
    return value


KeyValue = Annotated[
    str,
    Field(
        min_length=KEY_VALUE_LENGTH[0],
        max_length=KEY_VALUE_LENGTH[1],
        description="default: a generated value; printable ASCII, no space at either end",
        json_schema_extra={"pattern": KEY_VALUE_PATTERN},
    ),
    AfterValidator(_presentable),
]
"""A key's value chosen by hand: one a request can present (`identity.key_value_problem`)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- limits ------------------------------------------------------------------------------


def _no_default(schema: dict[str, Any]) -> None:
    """A field's JSON Schema without its Python default (None, which is no JSON value of it)."""
    schema.pop("default", None)


class BudgetIn(_Body):
    """A budget as written through its owner. `id` (or else `reset_duration`) matches an existing
    budget of the owner on update, which then keeps its usage."""

    # JSON Schema: `max_limit` (never null), unless the budget is given by its id.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["max_limit"]},
                {"required": ["id"], "properties": {"id": {"type": "string"}}},
            ]
        }
    )

    id: str | None = None
    max_limit: Annotated[
        Usd | None, WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1e9})
    ] = Field(
        default=None,
        description="USD, at most 1e9; required, except in an update of a budget given by its "
        "id (left out: kept)",
        json_schema_extra=_no_default,  # (never null)
    )
    reset_duration: DurationText | None = Field(
        default=None, description="<n>s|m|h|d|w|M|Q|Y, or null: never resets"
    )
    calendar_aligned: JsonBool | None = Field(
        default=None, description="default: the owner's calendar_aligned"
    )
    soft: JsonBool = Field(default=False, description="counted and alerted, never refusing")
    alert_thresholds: list[Threshold] | None = Field(
        default=None,
        max_length=20,
        description="fractions of max_limit at which alerts fire; null: BUDGET_ALERT_THRESHOLDS",
    )

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        return sorted({check_threshold(v) for v in value})

    @field_validator("max_limit")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is None:
            raise ValueError("must be an amount of USD, not null")
        if not math.isfinite(value) or value > 1e9:
            raise ValueError("must be a finite amount of USD, at most 1e9")
        return value

    @model_validator(mode="after")
    def _limited(self) -> BudgetIn:
        # Only a budget matched by its id keeps a limit it is not given (`_completed`).
        if self.max_limit is None and self.id is None:
            raise ValueError(
                "max_limit is required, except to change the other terms of a budget given "
                "by its id"
            )
        return self

    @field_validator("reset_duration")
    @classmethod
    def _reset(cls, value: str | None) -> str | None:
        return _duration(value)


def _together(limit: str, duration: str) -> dict[str, Any]:
    """JSON Schema: `limit` and `duration` are both set (not null), or neither is."""
    both = {"required": [limit, duration],
            "properties": {limit: {"type": "integer"}, duration: {"type": "string"}}}  # fmt: skip
    neither = {"properties": {limit: {"type": "null"}, duration: {"type": "null"}}}
    return {"anyOf": [both, neither]}


class RateLimitIn(_Body):
    """A rate limit: each max goes with its duration (both, or neither)."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _together("request_max_limit", "request_reset_duration"),
                _together("token_max_limit", "token_reset_duration"),
            ]
        }
    )

    request_max_limit: Count | None = None
    request_reset_duration: DurationText | None = Field(default=None, description="with its max")
    token_max_limit: Count | None = None
    token_reset_duration: DurationText | None = Field(default=None, description="with its max")
    max_concurrent_requests: Concurrency | None = None

    @field_validator("request_reset_duration", "token_reset_duration")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return _duration(value)

    @model_validator(mode="after")
    def _pairs(self) -> RateLimitIn:
        for kind in ("request", "token"):
            limit = getattr(self, f"{kind}_max_limit")
            duration = getattr(self, f"{kind}_reset_duration")
            if (limit is None) != (duration is None):
                raise ValueError(
                    f"{kind}_max_limit and {kind}_reset_duration go together: give both or neither"
                )
        return self


class _Limits(_Body):
    """Budgets and a rate limit, written through their owner. `budget` is one more budget."""

    budgets: list[BudgetIn] | None = Field(default=None, max_length=100)
    budget: BudgetIn | None = None
    rate_limit: RateLimitIn | None = None

    def budget_list(self) -> list[BudgetIn] | None:
        """The budgets to write, or None to leave them alone: `budgets` and `budget` both left
        out or null (a null `budget` removed every budget, where a null `budgets` kept them)."""
        if self.budgets is None and self.budget is None:
            return None
        return [*(self.budgets or []), *([self.budget] if self.budget else [])]

    def touches_rate_limit(self) -> bool:
        return "rate_limit" in self.model_fields_set


# -- owners ------------------------------------------------------------------------------

# A customer's, a team's or a key's name: 1 to 200 characters, no control character or line
# break, no space at either end (`identity.name_problem`): it goes into answers, error messages,
# logs and `user_path`, and a config file names a team's customer by it.
MAX_OWNER_NAME_CHARS: Final = 200
_OWNER_NAME = Field(
    min_length=1, max_length=MAX_OWNER_NAME_CHARS, json_schema_extra={"pattern": NAME_PATTERN}
)
CustomerName = Annotated[
    str, _OWNER_NAME, _checked_name("customer", MAX_OWNER_NAME_CHARS, carried=False)
]
TeamName = Annotated[str, _OWNER_NAME, _checked_name("team", MAX_OWNER_NAME_CHARS, carried=False)]
KeyName = Annotated[
    str, _OWNER_NAME, _checked_name("virtual key", MAX_OWNER_NAME_CHARS, carried=False)
]


class CustomerCreate(_Limits):
    name: CustomerName
    calendar_aligned: JsonBool = False


class CustomerUpdate(_Limits):
    name: CustomerName | None = None
    calendar_aligned: JsonBool | None = None


class TeamCreate(CustomerCreate):
    name: TeamName
    customer_id: str | None = None


class TeamUpdate(CustomerUpdate):
    name: TeamName | None = None
    customer_id: str | None = None


def _provider(name: str) -> str:
    """A provider as written to the store: one a request can carry (`identity.name_problem`,
    as `PUT /providers/{provider}` takes it: `"a\\nb"` was stored and never met, `" openai\\n"`
    read as `openai`), by its one name (`OpenAI` is `openai`, `google` is `gemini`), as every
    request names it (`core/providers.py`)."""
    problem = name_problem("provider", name, MAX_PROVIDER_CHARS)
    if problem is not None:
        raise ValueError(problem)
    return canonical_provider(name)


def _any_or_provider(name: str) -> str | None:
    """A model config's provider: "" is any provider, stored as none is (it was stored as "",
    which no request's provider is: its limits never applied)."""
    return _provider(name) if name else None


ProviderName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROVIDER_CHARS, json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(_provider),
]
# A model config's provider: a provider's name, or "" (any).
AnyProvider = Annotated[
    str,
    Field(max_length=MAX_PROVIDER_CHARS, json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(_any_or_provider),
]


class ProviderConfigIn(_Limits):
    id: str | None = None
    provider: ProviderName
    allowed_models: list[ModelName] = Field(default_factory=lambda: ["*"], description='["*"]: all')
    blocked_models: list[ModelName] = Field(default_factory=list)


class _KeyFields(_Limits):
    # JSON Schema of the rule below: team_id or customer_id is absent or null.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"team_id": {"type": "null"}}},
                {"properties": {"customer_id": {"type": "null"}}},
            ]
        }
    )

    team_id: str | None = None
    customer_id: str | None = None
    is_active: JsonBool | None = None
    expires_at: JsonTime | None = Field(default=None, description="RFC 3339, with its offset")
    provider_configs: list[ProviderConfigIn] | None = Field(default=None, max_length=100)
    tags: KeyTags | None = None
    calendar_aligned: JsonBool | None = None

    @model_validator(mode="after")
    def _one_parent(self) -> _KeyFields:
        if self.team_id is not None and self.customer_id is not None:
            raise ValueError("a virtual key belongs to a team or to a customer, not both")
        return self


class VirtualKeyCreate(_KeyFields):
    name: KeyName
    is_active: JsonBool = True
    expires_at: JsonTime | None = Field(
        default=None,
        description="RFC 3339, with its offset; not in the past (a key created expired is a 422)",
    )
    tags: KeyTags = Field(default_factory=list)
    calendar_aligned: JsonBool = False
    value: KeyValue | None = None


class VirtualKeyUpdate(_KeyFields):
    name: KeyName | None = None


class ProviderPut(_Limits):
    calendar_aligned: JsonBool | None = None


class TagPut(ProviderPut):
    pass


class ModelConfigCreate(_Limits):
    # JSON Schema of the rule below: scope "virtual_key" with a scope_id, or global without one.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["scope", "scope_id"],
                 "properties": {"scope": {"const": "virtual_key"}, "scope_id": {"type": "string"}}},
                {"properties": {"scope": {"const": "global"}, "scope_id": {"type": "null"}}},
            ]
        }
    )  # fmt: skip

    model_name: ModelName = Field(
        min_length=1, max_length=MAX_MODEL_CHARS, description="'*': every model"
    )
    provider: AnyProvider | None = None
    scope: Literal["global", "virtual_key"] = "global"
    scope_id: str | None = Field(default=None, description="a key's id, with scope virtual_key")
    calendar_aligned: JsonBool = False

    @model_validator(mode="after")
    def _scoped(self) -> ModelConfigCreate:
        if (self.scope == "virtual_key") != (self.scope_id is not None):
            raise ValueError("scope 'virtual_key' needs a scope_id (a key's id), 'global' none")
        return self


class ModelConfigUpdate(_Limits):
    model_name: ModelName | None = Field(default=None, min_length=1, max_length=MAX_MODEL_CHARS)
    provider: AnyProvider | None = None
    calendar_aligned: JsonBool | None = None


# -- routes (SPEC §12) -------------------------------------------------------------------

_NOT_SLASH = "\\x21-\\x2e\\x30-\\x7e"
TARGET_PATTERN: Final = f"^[{_NOT_SLASH}](?:[{_VISIBLE}]*[{_NOT_SLASH}])?$"
"""A route's target: `provider/model` or a bare model, printable ASCII without spaces, no `/` at
either end (as model names)."""


def _checked(text: str, problem: str | None) -> str:
    if problem is not None:
        raise ValueError(problem)
    return text


def _target(text: str) -> str:
    return _checked(text, target_problem(text))


def _route_name(text: str) -> str:
    """A route's name: the `model` a request names, checked as a target is (its refusal says
    which of the two it is)."""
    return _checked(text, route_name_problem(text))


def _distinct_targets(targets: list[str] | None) -> list[str] | None:
    """A route names each target once: the same target twice (`openai/gpt-4o`, or spelt with
    another name of its provider, `OpenAI/gpt-4o`) was tried twice on one request and listed
    twice in an answer refusing them all."""
    if targets is None:
        return None
    seen: dict[tuple[str | None, str], tuple[int, str]] = {}
    for n, text in enumerate(targets, 1):
        target = parse_target(text)
        first = seen.setdefault((target.provider, target.model), (n, text))
        if first[0] != n:
            same = (
                f"target {first[0]} too"
                if first[1] == text
                else f"as {first[1]!r}, target {first[0]}"
            )
            raise ValueError(
                f"target {n}, {text!r}, names the same target twice ({same}): a route lists "
                "each target once"
            )
    return targets


RouteTargets = Annotated[
    list["RouteTargetText"],
    AfterValidator(_distinct_targets),
    Field(min_length=1, max_length=MAX_TARGETS, json_schema_extra={"uniqueItems": True}),
]

RouteTargetText = Annotated[
    str,
    AfterValidator(_target),
    Field(min_length=1, max_length=300, json_schema_extra={"pattern": TARGET_PATTERN}),
]
RouteName = Annotated[
    str,
    AfterValidator(_route_name),
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": TARGET_PATTERN}),
]
Strategy = Literal["ordered", "most_remaining"]


MAX_CONFIG_CHARS: Final = 4_000_000
"""The longest config file (`BUDGET_CONFIG_FILE`, `POST /config/apply`'s text), in characters."""


class ConfigApply(_Body):
    """A config file's text (BUDGET_CONFIG_FILE's format), applied as start-up applies it."""

    text: str = Field(max_length=MAX_CONFIG_CHARS, description="the file's content")
    format: Literal["yaml", "json"] = Field(default="yaml", description="yaml or json")


class RouteCreate(_Body):
    name: RouteName = Field(description="the `model` a request names to use this route")
    targets: RouteTargets = Field(
        description="'provider/model', tried in this order; each once (a provider by any of "
        "its names: 'OpenAI/gpt-4o' is 'openai/gpt-4o')"
    )
    strategy: Strategy = Field(
        default="ordered", description="ordered: the first that passes; most_remaining: most left"
    )


class RouteUpdate(_Body):
    name: RouteName | None = None
    targets: RouteTargets | None = None
    strategy: Strategy | None = None


# -- answers -----------------------------------------------------------------------------


class BudgetOut(BaseModel):
    """Bifrost's budget and GoModel's status, in one object. Owner fields: only the owner's."""

    id: str
    max_limit: float
    reset_duration: str | None
    last_reset: datetime
    current_usage: float
    calendar_aligned: bool
    config_hash: str | None
    created_at: datetime
    updated_at: datetime
    owner_type: OwnerType
    customer_id: str | None = None
    team_id: str | None = None
    virtual_key_id: str | None = None
    provider_config_id: str | None = None
    model_config_id: str | None = None
    provider: str | None = None
    tag: str | None = None
    amount: float
    spent: float
    remaining: float
    usage_ratio: float
    period_start: datetime
    period_end: datetime | None = Field(default=None, description="null: never resets")
    period_label: str
    period_seconds: int
    period_ratio: float
    last_reset_at: datetime
    source: str
    has_usage: bool
    soft: bool = False
    alert_thresholds: list[Annotated[float, Field(gt=0, le=10)]] | None = Field(
        default=None, description="null: BUDGET_ALERT_THRESHOLDS applies"
    )
    reserved: float = Field(default=0.0, description="held by requests in flight, in this process")
    user_path: str


class RateLimitOut(BaseModel):
    id: str
    owner_type: OwnerType
    owner_id: str
    request_max_limit: int | None
    request_reset_duration: str | None
    request_current_usage: int
    request_last_reset: datetime
    token_max_limit: int | None
    token_reset_duration: str | None
    token_current_usage: int
    token_last_reset: datetime
    max_concurrent_requests: int | None
    config_hash: str | None
    created_at: datetime
    updated_at: datetime
    source: str
    user_path: str


class _OwnerOut(BaseModel):
    budgets: list[BudgetOut]
    budget: BudgetOut | None = Field(default=None, description="the first budget, as Bifrost has")
    rate_limit: RateLimitOut | None = None
    calendar_aligned: bool
    config_hash: str | None
    source: str
    created_at: datetime
    updated_at: datetime


class CustomerOut(_OwnerOut):
    id: str
    name: str


class TeamOut(CustomerOut):
    customer_id: str | None


class ProviderConfigOut(BaseModel):
    id: str
    provider: str
    allowed_models: list[str]
    blocked_models: list[str]
    budgets: list[BudgetOut]
    rate_limit: RateLimitOut | None = None


class VirtualKeyOut(_OwnerOut):
    id: str
    name: str
    key_display: str
    value: str | None = Field(default=None, description="only in the answers of create and rotate")
    team_id: str | None
    customer_id: str | None
    is_active: bool
    expires_at: datetime | None
    tags: list[str]
    provider_configs: list[ProviderConfigOut]


class ProviderOut(_OwnerOut):
    id: str = Field(description="the provider's name: its id in paths (SPEC §9)")
    provider: str


class TagOut(_OwnerOut):
    id: str = Field(description="the tag's name: its id in paths (SPEC §9)")
    tag: str


class ModelConfigOut(_OwnerOut):
    id: str
    model_name: str
    provider: str | None
    scope: Literal["global", "virtual_key"]
    scope_id: str | None
    scope_name: str | None = None


class RouteOut(BaseModel):
    id: str
    name: str
    targets: list[str]
    strategy: Strategy
    config_hash: str | None
    source: str
    created_at: datetime
    updated_at: datetime


class UsageRow(BaseModel):
    key: str | None = Field(description="the group: an id, a provider, a model, a tag or a day")
    name: str | None = None
    deleted: bool = Field(
        default=False,
        description="the key, team or customer was deleted since: `name` is the one it had",
    )
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: float


class UsageOut(BaseModel):
    group_by: GroupBy
    start: datetime | None
    end: datetime | None
    usage: list[UsageRow]
    count: int
    total: UsageRow


class QuotaOut(BaseModel):
    virtual_key: VirtualKeyOut
    budgets: list[BudgetOut]
    rate_limits: list[RateLimitOut]
    server_time: datetime


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready answer; fields the builder never set (other owners' ids) are left out."""
    return model.model_dump(mode="json", exclude_unset=True)
