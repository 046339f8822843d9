"""Schema creation and upgrades, the same on SQLite and PostgreSQL.

The schema version lives in `bm_meta`. Version 1 is created from the tables' metadata; each later
version adds one function to `_STEPS` that upgrades from the version before it, so a store made by
any release is brought up to date on start-up. Concurrent start-ups are safe: the whole upgrade
is one transaction, serialised by an advisory lock on PostgreSQL and by SQLite's write lock
(`BEGIN IMMEDIATE`) on SQLite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, inspect, select, text

from budget_middleware.core.providers import canonical_provider
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
    # 8: provider names by their one name (`OpenAI` is `openai`, `google` is `gemini`).
    8: lambda conn: _one_provider_name(conn),
    # 9: bm_deleted, a new table: what was deleted through the API (names, file entry hashes).
    9: lambda conn: None,
    # 10: bm_alert_deliveries, a new table: each alert's delivery to each URL.
    10: lambda conn: None,
    # 11: a model config for any provider stored as none, not "" (which no request names: its
    # limits never applied).
    11: lambda conn: _execute(
        conn, "UPDATE bm_model_configs SET provider = NULL WHERE provider = ''"
    ),
    # 12: bm_alerts.first_attempt_at, which the first release with alerts did not make (the
    # column came later within version 5, with no step).
    12: lambda conn: _add_column(
        conn,
        "bm_alerts",
        "first_attempt_at " + DateTime(timezone=True).compile(dialect=conn.dialect),
    ),
    # 13: the names of deleted owners from bm_deleted_owners, version 9's first table, into
    # bm_deleted, which took its place within version 9 (with no step).
    13: lambda conn: _deleted_owners(conn),
    # 14: bm_alert_deliveries.first_attempt_at indexed: an instance with no webhook URL asks
    # which URLs were posted to in the last day as it raises an alert (it scanned the table).
    14: lambda conn: _add_index(
        conn, "ix_bm_alert_deliveries_first_attempt", "bm_alert_deliveries (first_attempt_at)"
    ),
}


def _execute(conn: Connection, statement: str) -> None:
    conn.execute(text(statement))


def _deleted_owners(conn: Connection) -> None:
    """The deleted keys', teams' and customers' names a store of bm_deleted_owners holds, kept
    in bm_deleted (`GET /usage` shows them by name, marked deleted); the old table goes."""
    if "bm_deleted_owners" not in inspect(conn).get_table_names():
        return
    conn.execute(
        text(
            "INSERT INTO bm_deleted (kind, entity_id, name, deleted_at) "
            "SELECT o.owner_type, o.id, o.name, o.deleted_at FROM bm_deleted_owners o "
            "WHERE NOT EXISTS (SELECT 1 FROM bm_deleted d "
            "WHERE d.kind = o.owner_type AND d.entity_id = o.id)"
        )
    )
    conn.execute(text("DROP TABLE bm_deleted_owners"))


def _one_provider_name(conn: Connection) -> None:
    """Every stored provider name by its one name (`core/providers.py`), as requests now name
    providers: a provider budget made as `google`, `OpenAI` or `x-ai` keeps capping the requests
    to `gemini`, `openai`, `xai`. Where both spellings are stored for one owner (`google` and
    `gemini` provider budgets), the alias's budgets join the one name's (each still applies),
    and its rate limit too when the one name has none; two rate limits, or a key's two provider
    configs that allow different models, cannot be one without lifting a limit: start-up stops
    naming both, and the store is left as it was (one transaction)."""
    rows = conn.execute(text("SELECT provider FROM bm_providers")).all()
    stored = {r[0] for r in rows}
    for (old,) in rows:
        new = canonical_provider(old)
        if new == old:
            continue
        if new in stored:
            _merge_owner(conn, "provider", old, new, f"bm_providers {old!r} and {new!r}")
            conn.execute(text("DELETE FROM bm_providers WHERE provider = :o"), {"o": old})
        else:
            conn.execute(
                text("UPDATE bm_providers SET provider = :n WHERE provider = :o"),
                {"n": new, "o": old},
            )
            _merge_owner(conn, "provider", old, new, "")
            stored.add(new)
        conn.execute(
            text(
                "UPDATE bm_alerts SET owner_id = :n WHERE owner_type = 'provider' AND owner_id = :o"
            ),
            {"n": new, "o": old},
        )
    configs = conn.execute(
        text("SELECT id, virtual_key_id, provider, allowed_models, blocked_models "
             "FROM bm_provider_configs")
    ).all()  # fmt: skip
    by_name = {(c.virtual_key_id, c.provider): c for c in configs}
    for c in configs:
        new = canonical_provider(c.provider)
        if new == c.provider:
            continue
        other = by_name.get((c.virtual_key_id, new))
        if other is None:
            conn.execute(
                text("UPDATE bm_provider_configs SET provider = :n WHERE id = :i"),
                {"n": new, "i": c.id},
            )
            by_name[(c.virtual_key_id, new)] = c
            continue
        where = f"bm_provider_configs {c.provider!r} and {new!r} of virtual key {c.virtual_key_id}"
        if _models(c.allowed_models) != _models(other.allowed_models) or _models(
            c.blocked_models
        ) != _models(other.blocked_models):
            raise StoreSchemaError(f"{where} allow different models: {_ONE_OF_THEM}")
        _merge_owner(conn, "provider_config", c.id, other.id, where)
        conn.execute(text("DELETE FROM bm_provider_configs WHERE id = :i"), {"i": c.id})
    rules = conn.execute(
        text("SELECT id, model_name, provider, scope, scope_id FROM bm_model_configs "
             "WHERE provider IS NOT NULL")
    ).all()  # fmt: skip
    by_rule = {(r.model_name, r.provider, r.scope, r.scope_id): r for r in rules}
    for r in rules:
        new = canonical_provider(r.provider)
        if new == r.provider:
            continue
        other = by_rule.get((r.model_name, new, r.scope, r.scope_id))
        if other is None:
            conn.execute(
                text("UPDATE bm_model_configs SET provider = :n WHERE id = :i"),
                {"n": new, "i": r.id},
            )
            by_rule[(r.model_name, new, r.scope, r.scope_id)] = r
            continue
        where = f"bm_model_configs {r.provider}/{r.model_name} and {new}/{r.model_name}"
        _merge_owner(conn, "model_config", r.id, other.id, where)
        conn.execute(text("DELETE FROM bm_model_configs WHERE id = :i"), {"i": r.id})
    # The usage already recorded, so that `GET /usage?group_by=provider` shows one provider.
    for (old,) in conn.execute(text("SELECT DISTINCT provider FROM bm_usage_records")).all():
        if canonical_provider(old) != old:
            conn.execute(
                text("UPDATE bm_usage_records SET provider = :n WHERE provider = :o"),
                {"n": canonical_provider(old), "o": old},
            )


_ONE_OF_THEM = (
    "they are one provider now; delete one of them with the release before (or merge them by "
    "hand) and start again"
)


def _models(value: object) -> frozenset[str]:
    """A provider config's model list as stored (JSON: a list, or its text on some drivers)."""
    if isinstance(value, str):
        value = json.loads(value)
    return frozenset(value) if isinstance(value, list) else frozenset()


def _merge_owner(conn: Connection, owner_type: str, old: str, new: str, where: str) -> None:
    """The budgets and rate limit of `old` moved to `new` (`where` names both when `new` is an
    owner already: a second rate limit cannot join it)."""
    params = {"t": owner_type, "o": old, "n": new}
    conn.execute(
        text("UPDATE bm_budgets SET owner_id = :n WHERE owner_type = :t AND owner_id = :o"), params
    )
    limits = conn.execute(
        text("SELECT owner_id FROM bm_rate_limits WHERE owner_type = :t AND owner_id IN (:o, :n)"),
        params,
    ).all()
    if len(limits) == 2:
        raise StoreSchemaError(f"{where} both have a rate limit: {_ONE_OF_THEM}")
    conn.execute(
        text("UPDATE bm_rate_limits SET owner_id = :n WHERE owner_type = :t AND owner_id = :o"),
        params,
    )


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
    if engine.dialect.name == "sqlite":
        # Up to date (every start-up but the first of a release): nothing to write, and no
        # write lock asked for, which another process may hold for long (a `sqlite3` shell's
        # transaction, a backup), while reads still work and the flusher keeps charges on disk.
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if tables >= set(metadata.tables) and _version(conn, metadata) == target:
                return target
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        elif conn.dialect.name == "sqlite":
            # The driver begins a transaction only before a write, so each CREATE TABLE and
            # ALTER was a transaction of its own: processes starting together on a new file
            # both made a table, and one failed. IMMEDIATE: the write lock first; the next
            # waits (the busy timeout), then finds the schema made. An upgrade cut short
            # leaves nothing of itself.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn, checkfirst=True)
        row = _version_row(conn, metadata)
        current = int(row[0]) if row else 0
        if current > target:
            raise StoreSchemaError(
                f"the store's schema is version {current}, newer than this release's {target}: "
                "upgrade budget-middleware"
            )
        for version in range(max(current, 1) + 1, target + 1):
            _STEPS[version](conn)
        meta = metadata.tables["bm_meta"]
        if row is None:
            conn.execute(meta.insert().values(key="schema_version", value=str(target)))
        elif current != target:
            conn.execute(
                meta.update().where(meta.c.key == "schema_version").values(value=str(target))
            )
        return current


def _version_row(conn: Connection, metadata: MetaData) -> Any:
    meta = metadata.tables["bm_meta"]
    return conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()


def _version(conn: Connection, metadata: MetaData) -> int:
    row = _version_row(conn, metadata)
    return int(row[0]) if row else 0
