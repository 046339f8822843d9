"""What people see: plain aligned tables and `field: value` listings of the admin API's dicts.
Scripts use `--json`, which prints the dicts themselves."""

from __future__ import annotations

import codecs
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from budget_middleware.core.identity import CONTROL
from budget_middleware.core.money import limit_nanos, nanos_from_usd, usd_fixed, usd_text

Json = dict[str, Any]
Column = tuple[str, Callable[[Json], Any]]


def emit_json(data: Any) -> None:
    """Written as it is encoded, a few kB at a time: one write of a whole large list into a
    pipe whose reader left (`| head -1`) was cut short without an error, and the command went
    on to exit 0 as if all of it had been read."""
    piece: list[str] = []
    size = 0
    # Characters as themselves where the output is Unicode; else as their `\\u` escapes, the
    # same JSON: output redirected on Windows is in cp1252, which has no byte for `名`.
    try:
        unicode_out = codecs.lookup(getattr(sys.stdout, "encoding", None) or "").name[:3] == "utf"
    except LookupError:
        unicode_out = False
    for chunk in json.JSONEncoder(indent=2, ensure_ascii=not unicode_out).iterencode(data):
        piece.append(chunk)
        size += len(chunk)
        if size >= 8192:
            click.echo("".join(piece), nl=False)
            piece.clear()
            size = 0
    click.echo("".join(piece))


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(text(v) for v in value) or "-"
    # A name stored as an older release or a client wrote it may hold a line break or a
    # terminal's escape: shown as "?", never sent to the terminal (a title, the clipboard).
    return CONTROL.sub("?", str(value))


def usd(value: Any) -> str:
    """USD to 4 decimals; an amount under a cent as it is charged, to the nano-dollar, as the
    refusals and alerts write it (`$0.0049996`, `$0.000000001`): no amount that is not 0 shows
    as 0, and none is rounded to another amount that it is not ($0.0049996 read `$0.005`)."""
    if value is None:
        return "-"
    amount = float(value)
    if 0 < abs(amount) < 0.01:
        nanos = limit_nanos(abs(amount))
        return usd_text(nanos if amount > 0 else -nanos)
    return usd_fixed(_nanos(amount), 4, grouped=True)


def _nanos(amount: float) -> int:
    """An amount of the admin API's JSON (nano-dollars written as USD) as its nano-dollars."""
    nanos = nanos_from_usd(abs(amount))
    return -nanos if amount < 0 else nanos


def spent_usd(spent: Any, limit: Any) -> str:
    """Spend (or what remains) beside its limit: while under it, never the limit's own text
    ($0.99996 of $1 read `$1.0000` of `$1.0000`, a budget that still admits shown as used up;
    $0.9999781 left of $1 read as untouched), but the fewest decimals, up to the nano-dollar a
    charge is counted in, that tell the two apart."""
    shown = usd(spent)
    if spent is None or limit is None or not float(spent) < float(limit) or shown != usd(limit):
        return shown
    for digits in range(5, 10):
        text = usd_fixed(_nanos(float(spent)), digits, grouped=True).rstrip("0")
        text = text if len(text.partition(".")[2]) >= 4 else usd(spent)
        if text != usd(limit):
            return text
    return shown


def _spent(budget: Json) -> str:
    return spent_usd(budget.get("spent", budget.get("current_usage")), budget.get("max_limit"))


def when(value: Any) -> str:
    """An RFC 3339 time, to the minute: `2026-11-30 10:00Z`."""
    if not isinstance(value, str) or len(value) < 16:
        return text(value)
    return value[:10] + " " + value[11:16] + "Z"


def columns_of(cell: str) -> int:
    """The columns a cell takes on a terminal: two for a wide character (CJK, most emoji),
    none for a combining one (an accent written after its letter), one for the rest."""
    if cell.isascii():
        return len(cell)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in cell
    )


def table(rows: Iterable[Json], columns: Sequence[Column], *, empty: str = "(none)") -> None:
    cells = [[text(get(row)) for _, get in columns] for row in rows]
    if not cells:
        click.echo(empty)
        return
    heads = [head for head, _ in columns]
    widths = [max(columns_of(line[i]) for line in [heads, *cells]) for i in range(len(heads))]
    for line in [heads, *cells]:
        padded = (
            cell + " " * (width - columns_of(cell))
            for cell, width in zip(line, widths, strict=True)
        )
        click.echo("  ".join(padded).rstrip())


def delivery(alert: Json) -> str:
    """An alert's delivery state (SPEC §14), for people: one "delivered" in 0 attempts had no
    webhook URL to go to (nothing to deliver), and was sent nowhere: "no webhook"."""
    state = alert.get("delivery")
    if state == "delivered" and alert.get("attempts") == 0:
        return "no webhook"
    return text(state)


def fields(item: Json, names: Sequence[str]) -> None:
    """`name: value` lines of the item's fields that are present, in this order."""
    present = [n for n in names if n in item]
    width = max((len(n) for n in present), default=0)
    for name in present:
        value = item[name]
        shown = when(value) if name.endswith("_at") or name == "last_reset" else text(value)
        click.echo(f"{name + ':':<{width + 1}} {shown}")


def budgets_summary(item: Json) -> str:
    """An owner's budgets in one cell: `$0.0100 of $10.0000 /1d, $2.0000 of $100.0000 /1M`."""
    parts = []
    for b in item.get("budgets") or []:
        period = f"/{b['reset_duration']}" if b.get("reset_duration") else " total"
        soft = " (soft)" if b.get("soft") else ""
        parts.append(f"{_spent(b)} of {usd(b['max_limit'])}{period}{soft}")
    return ", ".join(parts) or "-"


def rate_summary(item: Json) -> str:
    """A rate limit in one cell: `60 req/1m, 100000 tok/1h, 4 concurrent`."""
    rate = item.get("rate_limit")
    if not rate:
        return "-"
    parts = []
    if rate.get("request_max_limit") is not None:
        parts.append(f"{rate['request_max_limit']} req/{rate['request_reset_duration']}")
    if rate.get("token_max_limit") is not None:
        parts.append(f"{rate['token_max_limit']} tok/{rate['token_reset_duration']}")
    if rate.get("max_concurrent_requests") is not None:
        parts.append(f"{rate['max_concurrent_requests']} concurrent")
    return ", ".join(parts) or "-"


def _window(budget: Json) -> str:
    window = str(budget.get("reset_duration") or "never resets")
    return f"{window} (soft)" if budget.get("soft") else window


BUDGET_COLUMNS: list[Column] = [
    ("ID", lambda b: b["id"]),
    ("OWNER", lambda b: b.get("user_path") or b.get("owner_type")),
    ("SPENT", _spent),
    ("LIMIT", lambda b: usd(b.get("max_limit"))),
    # (a remainder under the limit by less than its last digit shows that digit too)
    ("REMAINING", lambda b: spent_usd(b.get("remaining"), b.get("max_limit"))),
    ("WINDOW", lambda b: _window(b)),
    ("RESETS", lambda b: when(b.get("period_end"))),
    ("SOURCE", lambda b: b.get("source")),
]
# `budgets list`: with what requests in flight hold, which the serving processes alone know
# (`--url`: their live counters, `from_memory=true`; on the store directly: `-`, not known)
LIVE_BUDGET_COLUMNS: list[Column] = [
    *BUDGET_COLUMNS[:5],
    ("RESERVED", lambda b: usd(b.get("reserved"))),
    *BUDGET_COLUMNS[5:],
]


def show_limits(item: Json) -> None:
    """An owner's budgets (a table) and rate limit (a line), after its fields."""
    budgets = item.get("budgets")
    if budgets is not None:
        click.echo("budgets:")
        table(budgets, BUDGET_COLUMNS[:1] + BUDGET_COLUMNS[2:], empty="  (none)")
    if "rate_limit" in item:
        click.echo(f"rate limit: {rate_summary(item)}")
