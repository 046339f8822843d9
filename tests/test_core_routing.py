"""A route's targets and the order they are tried in (core/routing.py, SPEC §12)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from budget_middleware.core.durations import Duration
from budget_middleware.core.routing import RouteTarget, by_room, parse_target, room, target_problem
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.windows import CounterRegistry, WindowCounter

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()


def test_a_target_is_provider_slash_model_or_a_bare_model() -> None:
    assert parse_target("openai/gpt-4o") == RouteTarget("openai/gpt-4o", "openai", "gpt-4o")
    assert parse_target("openrouter/meta/llama") == RouteTarget(
        "openrouter/meta/llama", "openrouter", "meta/llama"
    )
    assert parse_target("gpt-4o") == RouteTarget("gpt-4o", None, "gpt-4o")
    assert parse_target("/gpt-4o") == RouteTarget("/gpt-4o", None, "/gpt-4o")
    assert parse_target("openai/") == RouteTarget("openai/", None, "openai/")


@pytest.mark.parametrize(
    "text", ["openai/gpt-4o", "gpt-4o", "a/b/c", "x" * 300, "openrouter/meta-llama/llama-3"]
)
def test_valid_targets(text: str) -> None:
    assert target_problem(text) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "non-empty string"),
        (None, "non-empty string"),
        (42, "not 42"),
        ("x" * 301, "longer than 300 characters"),
        ("open ai/gpt", "whitespace"),
        ("openai/gpt\x00", "control"),
        ("/gpt-4o", "empty provider or model"),
        ("openai/", "empty provider or model"),
    ],
)
def test_invalid_targets_are_explained(text: object, says: str) -> None:
    problem = target_problem(text)
    assert problem is not None and says in problem


def test_a_long_target_is_named_by_its_first_40_characters() -> None:
    text = "a" * 40 + "b" * 300
    assert target_problem(text) == f"target {'a' * 40!r}… is longer than 300 characters"


def budget(registry: CounterRegistry, name: str, limit: int, used: int = 0) -> WindowCounter:
    return registry.window(
        "budget",
        name,
        limit=limit,
        duration=Duration.parse("1h"),
        calendar_aligned=False,
        last_reset=datetime.fromtimestamp(T0, UTC),
        usage=used,
        now=T0,
    )


def test_room_is_what_the_tightest_budget_has_left_after_reservations() -> None:
    registry = CounterRegistry()
    wide, tight = budget(registry, "wide", 1000, used=100), budget(registry, "tight", 500, used=50)
    tight.reserved = 30
    limits = LimitSet((Scope("team", "t", "t", budgets=(wide, tight)),))
    assert room(limits, T0) == 500 - 50 - 30
    assert room(LimitSet(()), T0) == float("inf")
    # a window that has ended counts as spent nothing (its reservations still hold)
    assert room(limits, T0 + 3600) == 500 - 0 - 30
    assert room(limits, T0 + 3599) == 420


def test_targets_are_tried_from_the_most_room_down_ties_in_route_order() -> None:
    assert by_room([(5.0, 0), (9.0, 1), (float("inf"), 2)]) == [2, 1, 0]
    assert by_room([(5.0, 1), (5.0, 0), (1.0, 2)]) == [0, 1, 2]
    assert by_room([(-3.0, 0), (0.0, 1)]) == [1, 0]
    assert by_room([]) == []
