"""What the options mean: budgets (`10/1d`), limits (`60/1m`), moments (`7d`, `2026-01-01`) and
bodies (`--body JSON`, `--file body.json`). A value that cannot be read is a usage error naming
the option."""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from budget_middleware.core.durations import Duration, add_months
from budget_middleware.core.times import rfc3339

_MONTHS = {"M": 1, "Q": 3, "Y": 12}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str, option: str) -> Duration:
    try:
        return Duration.parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _number(text: str, option: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(text.strip().removeprefix("$"))
    except ValueError:
        what = "an amount of USD" if kind is float else "a whole number"
        raise click.BadParameter(f"{text!r} is not {what}", param_hint=option) from None
    if not math.isfinite(value):  # `nan`, `inf`, `1e400`: no JSON number (a traceback with --url)
        raise click.BadParameter(f"{text!r} is not a finite amount of USD", param_hint=option)
    if value < 0:
        raise click.BadParameter(f"{text!r} is negative", param_hint=option)
    from budget_middleware.manage.schemas import Count, Usd

    return within(value, Usd if kind is float else Count, option, text)


def within(value: Any, bounds: Any, option: str, text: str | None = None) -> Any:
    """`value` held to the admin API's bounds for it (`bounds`: the schema's type, `Usd`,
    `Count`, `Concurrency`): out of them it is this option's usage error, exit 2, as any other
    bad value is (`--budget 1e30/1d` was the API's 422 wording, `budgets.0.max_limit: Input
    should be less than or equal to 1000000000`, exit 1)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(bounds).validate_python(value)
    except ValidationError as exc:
        why = str(exc.errors()[0]["msg"])
        raise click.BadParameter(
            f"{text if text is not None else str(value)!r} is out of range: "
            f"{why[:1].lower()}{why[1:]}",
            param_hint=option,
        ) from None
    return value


def budget(text: str, option: str = "--budget") -> dict[str, Any]:
    """`10/1d` ($10 a day) or `10` ($10 that never resets) as a budget of the admin API; a
    `:soft` suffix (`50/1M:soft`) makes it a soft budget (alerts, never refuses)."""
    text, colon, flag = text.partition(":")
    if colon and flag != "soft":
        raise click.BadParameter(f"unknown budget flag {flag!r}: only ':soft'", param_hint=option)
    amount, slash, period = text.partition("/")
    out: dict[str, Any] = {"max_limit": _number(amount, option, float)}
    # `10/` (a duration forgotten, or `10/$PERIOD` with PERIOD unset) is no `10`: an error
    out["reset_duration"] = str(duration(period, option)) if slash else None
    if colon:
        out["soft"] = True
    return out


def limit(text: str, option: str) -> tuple[int, str]:
    """`60/1m` (60 per minute) as a maximum and its reset_duration."""
    count, sep, period = text.partition("/")
    if not sep:
        raise click.BadParameter(f"{text!r} is not N/DURATION (e.g. 60/1m)", param_hint=option)
    return _number(count, option, int), str(duration(period, option))


# A count and a unit: a duration whatever its count (`0d`, `99999Y`: their error says why).
_DURATION_SHAPE = re.compile(r"\d+(?:mo|[smhdwMQY])")


def is_duration(text: str | None) -> bool:
    """`7d`, `12h`: a time counted from now (a duration out of range is not: its error is
    told before anything is asked of a server)."""
    if text is None:
        return False
    try:
        Duration.parse(text)
    except ValueError:
        return False
    return True


def moment(text: str, option: str, *, ahead: bool = False, now: datetime | None = None) -> str:
    """A time as RFC 3339: a duration from now (`7d` ago, or ahead with `ahead`; `now` the
    server's time, when known), a date (`2026-01-01`, midnight UTC) or a date-time
    (`2026-01-01T12:00:00Z`; UTC when no offset)."""
    try:
        span = Duration.parse(text)
    except ValueError as exc:
        if _DURATION_SHAPE.fullmatch(text):  # a duration, out of range: say why
            raise click.BadParameter(str(exc), param_hint=option) from None
        span = None
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    if span is not None:
        sign = 1 if ahead else -1
        if span.unit in _MONTHS:
            at = add_months(now, sign * span.count * _MONTHS[span.unit])
        else:
            at = now + sign * timedelta(seconds=span.count * _SECONDS[span.unit])
        return _rfc3339(at)
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return _rfc3339(datetime(day.year, day.month, day.day, tzinfo=UTC))
        at = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration ({'7d' if not ahead else '30d'}, 12h, 1M), a date "
            "(2026-01-01) nor a time (2026-01-01T12:00:00Z)",
            param_hint=option,
        ) from None
    return _rfc3339(at if at.tzinfo is not None else at.replace(tzinfo=UTC))


def period(
    since: str | None, until: str | None, now: datetime | None = None
) -> tuple[str | None, str | None]:
    """`--since` and `--until` as RFC 3339 (a duration counted back from `now`, the server's
    time when known); `--until` not after `--since` (swapped by mistake) holds nothing and is a
    usage error, not an empty report."""
    start = moment(since, "--since", now=now) if since else None
    end = moment(until, "--until", now=now) if until else None
    if start and end and datetime.fromisoformat(end) <= datetime.fromisoformat(start):
        raise click.BadParameter(
            f"{until!r} ({end}) is not after --since {since!r} ({start}): the period holds nothing",
            param_hint="--until",
        )
    return start, end


def _rfc3339(at: datetime) -> str:
    # Clamped at the calendar's ends as the management API clamps (`9999-12-31T23:59:59-05:00`
    # is past year 9999 in UTC: astimezone raised OverflowError, a traceback).
    from budget_middleware.manage.schemas import to_utc

    return rfc3339(to_utc(at))


def _file_text(path: Path) -> str:
    """A body file's text as a config file's is read (`config_text`): UTF-8, a byte-order mark
    allowed, or UTF-16 with its mark, as Notepad and PowerShell's `>` write it (read as the
    locale's encoding, UTF-16 was a UnicodeDecodeError's traceback and a mark "not valid JSON")."""
    raw = path.read_bytes()
    return raw.decode("utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number as a float: one past a float's range (`1e400`) is refused, as `NaN` is:
    neither can be sent as JSON (`--url`: a traceback), nor is either a valid amount."""
    from budget_middleware.manage.schemas import json_float

    value = json_float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a number")
    return value


def body(text: str | None, file: str | None) -> dict[str, Any]:
    """The JSON object of `--body` or `--file` (`-`: standard input); {} when neither."""
    if text is not None and file is not None:
        raise click.UsageError("give --body or --file, not both")
    if file is not None:
        option = "--file"
        try:
            text = sys.stdin.read() if file == "-" else _file_text(Path(file))
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {file!r}: {exc.strerror}", param_hint=option
            ) from None
        except UnicodeDecodeError as exc:  # a ValueError, not an OSError: it was a traceback
            raise click.BadParameter(
                f"{file!r} is not {exc.encoding.upper().removesuffix('-SIG')} text "
                f"({exc.reason} at byte {exc.start}): save it as UTF-8",
                param_hint=option,
            ) from None
    else:
        option = "--body"
    if text is None:
        return {}
    from budget_middleware.manage.schemas import TwiceGiven, unique_keys

    try:  # a key given twice is refused, as the admin API and a config file refuse it
        data = json.loads(
            text, object_pairs_hook=unique_keys, parse_constant=_no_constant, parse_float=_finite
        )
    except TwiceGiven as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return data
