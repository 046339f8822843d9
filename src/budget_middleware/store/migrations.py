"""Schema creation and upgrades, the same on SQLite and PostgreSQL.

The schema version lives in `bm_meta`. Version 1 is created from the tables' metadata; each later
version adds one function to `_STEPS` that upgrades from the version before it, so a store made by
any release is brought up to date on start-up. Concurrent start-ups are safe: tables are created
with `checkfirst`, and on PostgreSQL an advisory lock serialises the steps.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine, MetaData, inspect, select, text

from budget_middleware.exceptions import StoreSchemaError

_LOCK_ID = 0x62756467  # "budg"

_STEPS: dict[int, Callable[[Connection], None]] = {
    # 2: bm_rejected, a new table: `create_all` below makes it; nothing else changes.
    2: lambda conn: None,
    # 3: bm_routes, a new table, made the same way.
    3: lambda conn: None,
    # 4: bm_usage_records.direction ("inbound" or "outbound"), for records already there.
    4: lambda conn: _add_column(
        conn, "bm_usage_records", "direction VARCHAR(8) NOT NULL DEFAULT 'inbound'"
    ),
    # 5: bm_alerts (a new table); soft budgets, their alert thresholds, shadow refusals.
    5: lambda conn: _add_columns(
        conn,
        ("bm_budgets", "soft BOOLEAN NOT NULL DEFAULT FALSE"),
        ("bm_budgets", "alert_thresholds JSON"),
        ("bm_usage_records", "would_refuse VARCHAR(40)"),
    ),
    # 6: bm_flushes.applied_at indexed: the flusher prunes the batch ids older than a month.
    6: lambda conn: _add_index(conn, "ix_bm_flushes_applied_at", "bm_flushes (applied_at)"),
    # 7: bm_virtual_keys.file_value_hash, the value a config file last gave a key.
    7: lambda conn: _add_column(conn, "bm_virtual_keys", "file_value_hash VARCHAR(64)"),
}


def _add_index(conn: Connection, name: str, on: str) -> None:
    """Add an index unless the store has it (a table made by this release already does)."""
    conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {on}"))


def _add_columns(conn: Connection, *columns: tuple[str, str]) -> None:
    for table, definition in columns:
        _add_column(conn, table, definition)


def _add_column(conn: Connection, table: str, definition: str) -> None:
    """Add a column unless the table has it (a table made by this release already does)."""
    name = definition.split()[0]
    if name not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {definition}"))


def upgrade(engine: Engine, metadata: MetaData, target: int) -> int:
    """Bring the store to `target`; returns the version it was at before (0 when new)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        metadata.create_all(conn, checkfirst=True)
        meta = metadata.tables["bm_meta"]
        row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
        current = int(row[0]) if row else 0
        if current > target:
            raise StoreSchemaError(
                f"the store's schema is version {current}, newer than this release's {target}: "
                "upgrade budget-middleware"
            )
        for version in range(max(current, 1) + 1, target + 1):
            _STEPS[version](conn)
        if row is None:
            conn.execute(meta.insert().values(key="schema_version", value=str(target)))
        elif current != target:
            conn.execute(
                meta.update().where(meta.c.key == "schema_version").values(value=str(target))
            )
        return current
