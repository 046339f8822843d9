"""Money: whole nano-dollars (1e-9 USD) in integers everywhere, one rounding rule (half up).

Amounts are converted from USD once, where they enter (a limit written, a cost reported), and
back to USD only to show them.
"""

from __future__ import annotations

import math
from typing import Final

NANOS_PER_USD: Final = 1_000_000_000
# One request's charge at most, whatever an upstream reports ($1,000,000): the store's counters
# are 64-bit integers of nano-dollars.
MAX_CHARGE_NANOS: Final = 10**15


def nanos_from_usd(usd: float) -> int:
    """USD as whole nano-dollars, rounded half up; negatives are 0, NaN and infinities raise
    ValueError."""
    if not math.isfinite(usd):
        raise ValueError(f"not a finite amount of USD: {usd!r}")
    if usd <= 0:
        return 0
    # round(..., 4) first drops binary noise (2.5e-9 * 1e9 == 2.4999999999999996) before the tie.
    return math.floor(round(usd * NANOS_PER_USD, 4) + 0.5)


def limit_nanos(usd: float) -> int:
    """A limit as nano-dollars: a positive limit never becomes zero, however small (LiteLLM's
    `0.000000000001` is one nano-dollar: the first request passes, the next is refused)."""
    nanos = nanos_from_usd(usd)
    return 1 if nanos == 0 and usd > 0 else nanos


def charge_nanos(usd: float) -> int:
    """A reported cost as nano-dollars, at most `MAX_CHARGE_NANOS`; NaN and infinities raise
    ValueError (nothing to read), negatives are 0."""
    if not math.isfinite(usd):  # before the cap: `inf` is no cost, not $1,000,000
        raise ValueError(f"not a finite amount of USD: {usd!r}")
    if usd >= MAX_CHARGE_NANOS / NANOS_PER_USD:
        return MAX_CHARGE_NANOS
    return nanos_from_usd(usd)


def usd_from_nanos(nanos: int) -> float:
    return nanos / NANOS_PER_USD


_CENT_NANOS = 10_000_000
_LAST_DECIMAL_NANOS = 100_000  # $0.0001: four decimals' last digit


def usd_text(nanos: int) -> str:
    """An amount as messages show it: four decimals (`$10.0100`, SPEC §8), and exactly an
    amount under a cent that four decimals would round, its trailing zeros left out
    (`$0.00002`, `$0.000000001`): a budget of a fraction of a cent (LiteLLM's
    `0.000000000001` is one nano-dollar) read `$0.0000 spent of $0.0000` when it refused."""
    if abs(nanos) >= _CENT_NANOS or nanos % _LAST_DECIMAL_NANOS == 0:
        return usd_fixed(nanos, 4)
    return ("-$" if nanos < 0 else "$") + usd_header(abs(nanos)).decode().rstrip("0")


def usd_fixed(nanos: int, decimals: int, grouped: bool = False, down: bool = False) -> str:
    """`$` and the amount to `decimals` places (`grouped`: with thousands separators), rounded
    half up on the whole nano-dollars, not on a binary float's (0.02265 is 0.0226499…: $0.02265
    read `$0.0226` here where the dashboard shows `$0.0227`, and $10.00005 `$10.0000`), or
    toward zero (`down`). A negative amount's sign comes first, `-$5.0000`, as the dashboard
    writes it (the one place money's sign is placed: the CLI wrote `$-5.0000`)."""
    step = 10 ** (9 - decimals)
    units = (abs(nanos) + (0 if down else step // 2)) // step
    whole, part = divmod(units, 10**decimals)
    sign = "-" if nanos < 0 else ""
    return (
        f"{sign}${whole:,}.{part:0{decimals}d}"
        if grouped
        else f"{sign}${whole}.{part:0{decimals}d}"
    )


_NANOS_PER_MICRO: Final = 1000
_MICROS_PER_USD: Final = NANOS_PER_USD // _NANOS_PER_MICRO


def usd_header(nanos: int, nine: bool = False) -> bytes:
    """An amount as the response headers show it, exactly: `10.010000` (six decimals), or nine
    when it holds a part of a micro-dollar (`0.000000001`: a positive amount never reads 0) or
    when `nine` asks for them (the other amount of the answer has nine)."""
    if nanos < 0:
        return b"-" + usd_header(-nanos, nine)
    if nine or nanos % _NANOS_PER_MICRO:
        return b"%d.%09d" % divmod(nanos, NANOS_PER_USD)  # dollars, nano-dollars
    return b"%d.%06d" % divmod(nanos // _NANOS_PER_MICRO, _MICROS_PER_USD)
