"""core/alerts.py: which thresholds a budget's spend has reached, and where the next one is."""

from __future__ import annotations

import math

import pytest

from budget_middleware.core.alerts import NEVER, check_threshold, reached, threshold_nanos

DOLLAR = 1_000_000_000


def test_a_threshold_is_reached_at_its_share_of_the_limit_rounded_up() -> None:
    assert threshold_nanos(DOLLAR, 0.8) == 800_000_000
    assert threshold_nanos(3, 0.5) == 2  # 1.5 nano-dollars: reached at 2, not at 1
    assert threshold_nanos(DOLLAR, 1.0) == DOLLAR
    assert threshold_nanos(0, 0.8) == 0


def test_reached_gives_the_new_thresholds_and_the_next_one() -> None:
    thresholds = (0.5, 0.8, 1.0)
    assert reached(0, DOLLAR, thresholds, set()) == ([], 500_000_000)
    assert reached(499_999_999, DOLLAR, thresholds, set()) == ([], 500_000_000)
    assert reached(500_000_000, DOLLAR, thresholds, set()) == ([0.5], 800_000_000)
    # one charge over two thresholds: both, in order
    assert reached(900_000_000, DOLLAR, thresholds, set()) == ([0.5, 0.8], DOLLAR)
    # already raised: not again; the next one is still where it is
    assert reached(900_000_000, DOLLAR, thresholds, {0.5, 0.8}) == ([], DOLLAR)
    assert reached(DOLLAR, DOLLAR, thresholds, {0.5, 0.8}) == ([1.0], NEVER)
    assert reached(5 * DOLLAR, DOLLAR, thresholds, {0.5, 0.8, 1.0}) == ([], NEVER)
    assert reached(5, DOLLAR, (), set()) == ([], NEVER)


def test_a_budget_of_0_has_no_threshold_to_reach() -> None:
    """A $0 budget (a key blocked) raised 80 % and 100 % "of $0.0000" with its first refusal (a
    fault hunt's); its `budget.exhausted` says it all. The least limit above 0 still has them."""
    assert reached(0, 0, (0.8, 1.0), ()) == ([], NEVER)
    assert reached(5, 0, (0.8, 1.0), ()) == ([], NEVER)  # a limit lowered to 0 below the spend
    assert reached(1, 1, (0.8, 1.0), ()) == ([0.8, 1.0], NEVER)
    # a soft one never refuses, so never raises `budget.exhausted`: its thresholds it raises
    assert reached(5, 0, (0.8, 1.0), (), hard=False) == ([0.8, 1.0], NEVER)
    # with its first charge, not before: nothing spent reaches nothing (it raised them at $0)
    assert reached(0, 0, (0.8, 1.0), (), hard=False) == ([], 1)


def test_the_next_threshold_is_the_lowest_not_reached_whatever_the_order() -> None:
    assert reached(0, DOLLAR, (1.0, 0.5), set()) == ([], 500_000_000)
    assert reached(600_000_000, DOLLAR, (1.0, 0.5, 0.9), set()) == ([0.5], 900_000_000)


@pytest.mark.parametrize("good", [0.5, 1, 10, 1e-9])
def test_a_threshold_above_0_and_at_most_10_is_taken(good: float) -> None:
    assert check_threshold(good) == float(good) and type(check_threshold(good)) is float


@pytest.mark.parametrize(
    ("bad", "says"),
    [(0, "above 0"), (-0.5, "above 0"), (10.5, "at most 10"), (math.nan, "not a number"),
     (True, "not a number"), ("0.8", "not a number"), (None, "not a number")],
)  # fmt: skip
def test_anything_else_is_refused_saying_why(bad: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_threshold(bad)
