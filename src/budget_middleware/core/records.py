"""The records the core hands to the store: usage records and counter deltas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from budget_middleware.core.durations import Duration


class UsageRecord(NamedTuple):
    """What one metered request leaves (SPEC §7), as the request path builds it (by keyword);
    the flusher writes it as a row of `bm_usage_records` (its `cost` in USD derived there)."""

    request_id: str  # "" on the request path: the flush names it after its batch
    created_at: float  # epoch seconds
    virtual_key_id: str | None
    team_id: str | None
    customer_id: str | None
    provider: str
    model: str
    tags: tuple[str, ...]
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_nanos: int
    cost_source: str
    status: int
    streamed: bool
    outcome: str
    estimated: bool
    note: str | None
    duration_ms: float
    direction: str = "inbound"  # "outbound": a call the app made, metered by the transport
    would_refuse: str | None = None  # shadow mode: the code it would have been refused with


@dataclass(slots=True)
class Delta:
    """A charge to one counter's window, as the flusher writes it: `current += amount` when the
    stored window is this one, a new window when the stored one has ended, nothing when it
    began after `window_end` (a reset since). The stored one has ended when it began before
    `window_start` and no later than `ended_from`: the start of the window before in a rolling
    series, since a window reset elsewhere within that one rolls on from the reset, past
    `window_start` (the instance that wrote this had not read the reset yet).

    That rule holds for a stored window on the terms the delta was counted on (`terms`). New
    terms written elsewhere, which this instance had not read yet, may make the stored window
    another: its end is the stored terms' (`store.database._by_stored_terms`)."""

    kind: str  # budget, request, token
    id: str
    window_start: datetime
    window_end: datetime
    amount: int
    start_ts: float = 0.0  # window_start as the live counter holds it (epoch seconds)
    ended_from: datetime | None = None  # None: `window_start` (any older window has ended)
    # The counter's (duration, calendar-aligned) it was counted on; None: not known (the stored
    # ones taken)
    terms: tuple[Duration | None, bool] | None = None
