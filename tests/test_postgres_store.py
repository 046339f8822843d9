"""The store on PostgreSQL: schema creation from several processes, delta writes, types."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from budget_middleware.core.records import Delta, UsageRecord
from budget_middleware.core.times import END_OF_TIME
from budget_middleware.store.database import Store
from budget_middleware.store.tables import SCHEMA_VERSION, UsageRecordRow
from conftest import POSTGRES_URL, need_postgres, reset_postgres
from support import budget_row

pytestmark = pytest.mark.services


@pytest.fixture
def store() -> Iterator[Store]:
    need_postgres()
    reset_postgres()
    store = Store(POSTGRES_URL)
    store.create_schema()
    yield store
    store.dispose()


def _usage(store: Store, id_: str) -> tuple[int, datetime]:
    budgets, _ = store.read_counters([id_], [])
    return budgets[id_].usage, budgets[id_].last_reset


def test_schema_is_created_by_two_processes_at_once() -> None:
    need_postgres()
    reset_postgres()
    code = (
        "from budget_middleware.store.database import Store;"
        f"s = Store({POSTGRES_URL!r}); s.create_schema(); print(s.schema_version())"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0] * 4
    assert outputs == [str(SCHEMA_VERSION)] * 4


def test_timestamps_come_back_in_utc(store: Store) -> None:
    moment = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    id_ = budget_row(store, 0, moment.astimezone(UTC))
    last_reset = _usage(store, id_)[1]
    assert last_reset == moment and last_reset.utcoffset() == timedelta(0)


def test_a_batch_is_applied_once(store: Store) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    id_ = budget_row(store, 0, start)
    batch = uuid.uuid4().hex
    record = UsageRecord(
        uuid.uuid4().hex, start.timestamp(), None, None, None, "openai", "gpt-4o",
        ("product:chat", "é"), 0, 0, 0, 10**12 + 3, "catalog", 200, False, "completed", False,
        None, 1.0,
    )  # fmt: skip
    for _ in range(2):
        store.apply_flush(batch, [Delta("budget", id_, start, END_OF_TIME, 10**12 + 3)], [record])
    assert _usage(store, id_)[0] == 10**12 + 3
    with store.session() as s:
        rows = list(s.exec(select(UsageRecordRow)).all())
    assert len(rows) == 1
    assert rows[0].tags == ["product:chat", "é"] and rows[0].cost_nanos == 10**12 + 3


def test_concurrent_deltas_are_never_lost(store: Store) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    id_ = budget_row(store, 0, start)

    def write(_: int) -> None:
        for _ in range(25):
            store.apply_flush(uuid.uuid4().hex, [Delta("budget", id_, start, END_OF_TIME, 3)], [])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert _usage(store, id_)[0] == 8 * 25 * 3
