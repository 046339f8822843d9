"""Budget-aware routing (SPEC §12): a route's targets, and the order they are tried in.

A route is a name a request's `model` may use, with targets written `provider/model` (or a bare
model, whose provider is found as a request's would be). The request is admitted on the first
target that passes every check (`ordered`), or, of those that pass, on the one whose tightest
budget has the most left (`most_remaining`: targets are tried from the most room down, so the
first that passes is that one; a target with no budget has unlimited room; ties keep the route's
order). Which target passes, and the ranking, are admission's business, in the same step
(`admission.admit_first`, `admit.lua`): ranked earlier, on another instance's counters or an
old read of them, the most room is not where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from budget_middleware.core.providers import canonical_provider

if TYPE_CHECKING:
    from budget_middleware.core.scopes import LimitSet

STRATEGIES = ("ordered", "most_remaining")
MAX_TARGETS = 16


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """One target: `text` is written into the request's body as its `model`."""

    text: str
    provider: str | None  # None: a bare model, its provider found like a request's
    model: str


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    name: str
    targets: tuple[RouteTarget, ...]
    strategy: str = "ordered"


def parse_target(text: str) -> RouteTarget:
    """`provider/model` (the model may hold more `/`s: `openrouter/meta/llama`) or a bare model;
    the provider by its one name (`Google/…` is `gemini`), the text as written."""
    head, sep, rest = text.partition("/")
    if sep and head and rest:
        return RouteTarget(text, canonical_provider(head), rest)
    return RouteTarget(text, None, text)


def target_problem(text: object, what: str = "target", limit: int = 300) -> str | None:
    """Why `text` cannot be a target (or, `what` says, a route's name: a model a request
    names, checked as a target is, of at most `limit` characters); None when it can."""
    if not isinstance(text, str) or not text:
        return f"a {what} is a non-empty string like 'openai/gpt-4o', not {text!r}"
    if len(text) > limit:
        return f"{what} {text[:40]!r}… is longer than {limit} characters"
    if any(c.isspace() or not c.isprintable() for c in text):
        return f"{what} {text!r} contains whitespace or control characters"
    if text.startswith("/") or text.endswith("/") or "//" in text:
        return f"{what} {text!r} has an empty provider or model around '/'"
    if not text.isascii():
        return f"a {what} is printable ASCII"
    return None


def route_name_problem(text: object) -> str | None:
    """Why `text` cannot name a route (the `model` a request names: checked as a target is, of
    at most 200 characters); None when it can."""
    return target_problem(text, "route name", 200)


def room(limits: LimitSet, now: float) -> float:
    """What the tightest budget has left (limit - spent - reserved), a window that has ended
    counting as empty; `inf` without a budget."""
    least = float("inf")
    for counter in limits.budgets:
        spent = counter.value if now < counter.end else 0
        left = counter.limit - spent - counter.reserved
        if left < least:
            least = left
    return least


def by_room(candidates: list[tuple[float, int]]) -> list[int]:
    """Indexes of (room, index) pairs, most room first, ties in route order."""
    return [index for _, index in sorted(candidates, key=lambda c: (-c[0], c[1]))]


def trial_order(limits: Sequence[LimitSet], most_remaining: bool, now: float) -> list[int]:
    """The order a route's candidates (in route order) are tried in: the route's, or
    `most_remaining`'s, ranked by the counters as they are at admission (`admit.lua` ranks
    the same way on Redis's counters, which every instance shares)."""
    if not most_remaining or len(limits) < 2:
        return list(range(len(limits)))
    return by_room([(room(candidate, now), n) for n, candidate in enumerate(limits)])
