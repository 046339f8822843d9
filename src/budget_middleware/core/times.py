"""Time: epoch seconds on the hot path, aware UTC datetimes everywhere else."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

FAR_FUTURE: Final = float("inf")  # the end of a window that never ends, in epoch seconds
END_OF_TIME: Final = datetime(9999, 12, 31, tzinfo=UTC)  # the same, as the store writes it


def utc(moment: datetime) -> datetime:
    """An aware UTC datetime: a naive one (SQLite hands datetimes back without their zone;
    everything we write is UTC) is taken as UTC, an aware one converted."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)


def rfc3339(moment: datetime) -> str:
    """A time as every answer writes it: RFC 3339 in UTC with `Z` (`2026-12-04T16:20:24.4Z`),
    as pydantic writes the models' times; a naive one taken as UTC (`utc`)."""
    return utc(moment).isoformat().replace("+00:00", "Z")


def from_ts(ts: float) -> datetime:
    """Epoch seconds as an aware UTC datetime; `FAR_FUTURE` as `END_OF_TIME`."""
    return END_OF_TIME if ts == FAR_FUTURE else datetime.fromtimestamp(ts, UTC)
