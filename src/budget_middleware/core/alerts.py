"""Alert thresholds (SPEC §14): which of a budget's thresholds its spend has reached, and the
spend at which the next one is reached. Plain functions on integers; no I/O."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from fractions import Fraction
from typing import Any

NEVER = 2**63  # an `alert_at` no spend reaches


def check_threshold(value: Any) -> float:
    """An alert threshold: a fraction of a budget above 0 and at most 10 (1.0 is all of it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"alert threshold {value!r} is not a number")
    if not 0 < value <= 10:
        raise ValueError(f"alert threshold {value!r} must be above 0 and at most 10")
    return float(value)


def threshold_nanos(limit: int, threshold: float) -> int:
    """The spend at which `threshold` of `limit` is reached (rounded up: 0.8 of $1 is $0.80).
    Exact, with the threshold as written (its shortest repr: 0.55, not its binary neighbour):
    in floating point 0.55 of $100 was 55000000000.00001 nano-dollars, so a spend of $55.00
    exactly never reached 55 %."""
    exact = Fraction(repr(float(threshold))) * limit
    return -(-exact.numerator // exact.denominator)


def reached(
    value: int,
    limit: int,
    thresholds: Sequence[float],
    raised: Collection[float],
    hard: bool = True,
) -> tuple[list[float], int]:
    """The thresholds (ascending) that `value` has reached and that are not in `raised`, and the
    spend at which the lowest one not yet reached will be (`NEVER` when none is left)."""
    new: list[float] = []
    next_at = NEVER
    if limit <= 0 and hard:  # a $0 budget (a key blocked): no share of it to reach; its first
        return new, next_at  # refusal raises `budget.exhausted`, which says it all (a soft one
    # never refuses: its thresholds are all it raises, reached with its first charge)
    for threshold in thresholds:
        # No spend reaches a threshold: a soft $0 budget's are all at $0, and a look at it
        # before its first charge (a re-read's) raised them all at $0 spent.
        at = max(threshold_nanos(limit, threshold), 1)
        if value >= at:
            if threshold not in raised:
                new.append(threshold)
        elif at < next_at:
            next_at = at
    return new, next_at
