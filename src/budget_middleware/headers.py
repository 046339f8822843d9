"""The rate-limit and budget headers of an admitted request's response (SPEC §8).

They show the tightest applicable limit of each kind (the one with the least left; ties keep the
first), as admission found it (`Ticket.tightest`) or, for a request admitted by Redis, as the
local counters see it now (`tightest_now`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import ceil
from operator import itemgetter
from typing import TypeVar

from budget_middleware.core.admission import Tightest
from budget_middleware.core.money import usd_header
from budget_middleware.core.scopes import LimitSet
from budget_middleware.core.times import FAR_FUTURE
from budget_middleware.core.windows import WindowCounter

_REQUESTS = (
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-reset-requests",
)
_TOKENS = (
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-tokens",
)
_BUDGET_LIMIT = b"x-budget-limit"
_BUDGET_REMAINING = b"x-budget-remaining"


# Every header an answer may get from us (SPEC §8, §12, §14), as bytes (ASGI) and text (WSGI).
ROUTE_HEADER = b"x-budget-route"  # the route's target that answered (SPEC §12)
SHADOW_HEADER = b"x-budget-shadow-refusal"  # what shadow mode would have refused (SPEC §14)
ADDED_NAMES = frozenset(
    {*_REQUESTS, *_TOKENS, _BUDGET_LIMIT, _BUDGET_REMAINING, ROUTE_HEADER, SHADOW_HEADER}
)
# Their text, by their bytes (WSGI's headers: the latin-1 text of the bytes, PEP 3333).
ADDED_TEXT = {name: name.decode("latin-1") for name in ADDED_NAMES}
ADDED_TEXT_NAMES = frozenset(ADDED_TEXT.values())

_Name = TypeVar("_Name", bytes, str)
_NAME = itemgetter(0)


def replaced(
    headers: Sequence[tuple[_Name, _Name]],
    added: list[tuple[_Name, _Name]],
    names: frozenset[_Name],
    lower: Callable[[_Name], _Name],
) -> Sequence[tuple[_Name, _Name]]:
    """An app's `headers` less those our `added` ones replace: ours win over the app's of the
    same name (a proxy's upstream `x-ratelimit-*` would come doubled), those of a kind we add
    none of pass. `names`: `ADDED_NAMES` or `ADDED_TEXT_NAMES`, which an app seldom sends, looked
    for first in C; `lower`: `bytes.lower` or `str.lower`."""
    if not added or names.isdisjoint(map(lower, map(_NAME, headers))):
        return headers
    ours = {name for name, _ in added}
    return [h for h in headers if lower(h[0]) not in ours]


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


def add_limit_headers(
    out: list[tuple[bytes, bytes]],
    tight: Tightest,
    now: float,
    clock: Callable[[], float] | None = None,
) -> None:
    """Append the headers of the tightest limits to a response's headers: as found at `now`,
    for an answer that starts at `clock()` (read only for a window begun after `now`, which is
    seldom; None: `now`)."""
    requests, requests_left, tokens, tokens_left, budget, budget_left = tight
    if requests is not None:
        out += _window(_REQUESTS, requests, requests_left, now, clock)
    if tokens is not None:
        out += _window(_TOKENS, tokens, tokens_left, now, clock)
    if budget is not None:
        if budget_left % 1000 or budget.limit % 1000:  # part of a micro-dollar: nine decimals
            out += (
                (_BUDGET_LIMIT, budget.limit_text_nine),
                (_BUDGET_REMAINING, usd_header(budget_left, True)),
            )
        else:  # both amounts with the same decimals: six
            out += (
                (_BUDGET_LIMIT, budget.limit_text),
                (_BUDGET_REMAINING, usd_header(budget_left)),
            )


def _window(
    names: tuple[bytes, bytes, bytes],
    window: WindowCounter,
    left: int,
    now: float,
    clock: Callable[[], float] | None,
) -> tuple[tuple[bytes, bytes], ...]:
    """A rate window's three headers: its limit, what is left, the whole seconds until it
    resets, rounded up as `Retry-After` is (a client that waits them finds the window ended;
    one already over resets in 0s, compared rather than max()ed, which costs as much as the
    formatting). `ceil` makes the seconds an int: `%d` formats a float ~3x slower.

    `now` is when admission found the window (`left`): a counter that began a window after it
    (rolled by another request while this one ran) tells the end of the window `now` is in,
    not of the one after (a minute too late for a one-minute limit). A window that begins
    after the answer's start too (`clock()`) was not rolled to since: the clock stepped back
    (NTP) into the window before, and the request was counted in this one, which ends at its
    own end (its reset said the end of the window before: 10s where the refusals said 70)."""
    limit_name, left_name, reset_name = names
    end = window.end
    if window.start > now and clock is not None and window.start <= clock():
        end = window.window_end(now)  # (the clock read here only: once a request, it cost one)
    seconds = end - now
    if seconds == FAR_FUTURE:
        reset = b"never"
    elif seconds > 0:
        reset = b"%ds" % ceil(seconds)
    else:
        reset = b"0s"
    return (
        (limit_name, b"%d" % window.limit),
        (left_name, b"%d" % left if left > 0 else b"0"),
        (reset_name, reset),
    )
