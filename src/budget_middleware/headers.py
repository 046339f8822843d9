"""The rate-limit and budget headers of an admitted request's response (SPEC §8).

They show the tightest applicable limit of each kind (the one with the least left; ties keep the
first), as admission found it (`Ticket.tightest`) or, for a request admitted by Redis, as the
local counters see it now (`tightest_now`).
"""

from __future__ import annotations

from collections.abc import Sequence

from budget_middleware.core.admission import Tightest
from budget_middleware.core.money import usd_header
from budget_middleware.core.scopes import LimitSet
from budget_middleware.core.times import FAR_FUTURE
from budget_middleware.core.windows import WindowCounter

_LIMIT_REQUESTS = b"x-ratelimit-limit-requests"
_REMAINING_REQUESTS = b"x-ratelimit-remaining-requests"
_RESET_REQUESTS = b"x-ratelimit-reset-requests"
_LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
_REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
_RESET_TOKENS = b"x-ratelimit-reset-tokens"


def tightest_now(limits: LimitSet) -> Tightest:
    """The tightest request window, token window and budget, and what each has left."""
    requests, requests_left = _tightest(limits.requests)
    tokens, tokens_left = _tightest(limits.tokens)
    budget, budget_left = _tightest(limits.budgets)
    return (requests, requests_left, tokens, tokens_left, budget, budget_left)


def _tightest(counters: Sequence[WindowCounter]) -> tuple[WindowCounter | None, int]:
    best = None
    least = 0
    for counter in counters:
        left = counter.limit - counter.value
        if left < 0:
            left = 0
        if best is None or left < least:
            best, least = counter, left
    return best, least


def add_limit_headers(out: list[tuple[bytes, bytes]], tight: Tightest, now: float) -> None:
    """Append the headers of the tightest limits to a response's headers (written out for each
    kind: this runs on every admitted request)."""
    requests, requests_left, tokens, tokens_left, budget, budget_left = tight
    if requests is not None:
        seconds = requests.end - now
        out += (
            (_LIMIT_REQUESTS, requests.limit_text),
            (_REMAINING_REQUESTS, b"%d" % requests_left if requests_left > 0 else b"0"),
            (_RESET_REQUESTS, _reset(seconds) if seconds != FAR_FUTURE else b"never"),
        )
    if tokens is not None:
        seconds = tokens.end - now
        out += (
            (_LIMIT_TOKENS, tokens.limit_text),
            (_REMAINING_TOKENS, b"%d" % tokens_left if tokens_left > 0 else b"0"),
            (_RESET_TOKENS, _reset(seconds) if seconds != FAR_FUTURE else b"never"),
        )
    if budget is not None:
        out += (
            (b"x-budget-limit", budget.limit_text),
            (b"x-budget-remaining", usd_header(budget_left)),
        )


def _reset(seconds: float) -> bytes:
    """Seconds until a window resets, as `12s`: round() as "%.0f" does (half to even),
    formatted as an int (twice as fast)."""
    return b"%ds" % round(seconds) if seconds > 0 else b"0s"
