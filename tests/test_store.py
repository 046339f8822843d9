"""The store writes usage records the same way on every database, and reads them back as given."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import select

from budget_middleware.store.database import Store, UsageRecord
from budget_middleware.store.tables import UsageRecordRow

WHEN = datetime(2026, 11, 22, 10, 30, 15, 123456, tzinfo=UTC)


def record(request_id: str, **changes: object) -> dict[str, object]:
    """The row as it must read back; `pending` makes the record the request path leaves."""
    row: dict[str, object] = {
        "request_id": request_id,
        "created_at": WHEN,
        "virtual_key_id": "k" * 32,
        "team_id": None,
        "customer_id": "c" * 32,
        "provider": "openai",
        "model": "gpt-4o",
        "tags": ["product:chat", "env:prod"],
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_tokens": 5,
        "cost_nanos": 123_456_789,
        "cost": 0.123456789,
        "cost_source": "catalog",
        "status": 200,
        "streamed": True,
        "outcome": "completed",
        "estimated": False,
        "note": None,
        "duration_ms": 12.5,
    }
    row.update(changes)
    return row


def pending(row: dict[str, object]) -> UsageRecord:
    values = {k: v for k, v in row.items() if k != "cost"}
    values["created_at"] = row["created_at"].timestamp()  # type: ignore[attr-defined]
    values["tags"] = tuple(row["tags"])  # type: ignore[call-overload]
    return UsageRecord(**values)  # type: ignore[arg-type]


def test_usage_records_read_back_exactly_as_written(store_url: str) -> None:
    store = Store(store_url)
    store.create_schema()
    written = [
        record("a" * 32),
        record("b" * 32, tags=[], streamed=False, estimated=True, note="no usage in the response"),
    ]
    store.apply_flush("batch-1", [], [pending(r) for r in written])
    store.apply_flush("batch-1", [], [pending(r) for r in written])  # the same batch: skipped
    with store.session() as s:
        rows = list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.request_id)))  # type: ignore[arg-type]
    store.dispose()
    assert len(rows) == 2
    for row, want in zip(rows, written, strict=True):
        got = row.model_dump(exclude={"id"})
        got["created_at"] = got["created_at"].replace(tzinfo=UTC)  # SQLite keeps no zone
        assert got == want
