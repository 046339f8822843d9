"""A store made by an earlier release is brought up to date on start-up (store/migrations.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from budget_middleware.store.database import Store


def test_a_version_3_store_gains_the_direction_of_its_usage_records(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/old.db")
    store.create_schema()
    with store.engine.begin() as conn:  # as release 3 left it: no direction, one record
        conn.execute(text("ALTER TABLE bm_usage_records DROP COLUMN direction"))
        conn.execute(text("UPDATE bm_meta SET value = '3' WHERE key = 'schema_version'"))
        conn.execute(
            text(
                "INSERT INTO bm_usage_records (request_id, created_at, provider, model, tags,"
                " input_tokens, output_tokens, cached_tokens, cost_nanos, cost, cost_source,"
                " status, streamed, outcome, estimated, duration_ms) VALUES ('old', "
                "'2026-11-30 00:00:00.000000', 'openai', 'gpt-4o', '[]', 1, 2, 0, 3, 3e-9,"
                " 'catalog', 200, 0, 'completed', 0, 1.0)"
            )
        )
    store.create_schema()  # the next start-up
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT request_id, direction FROM bm_usage_records")).all()
        version = conn.execute(
            text("SELECT value FROM bm_meta WHERE key = 'schema_version'")
        ).scalar_one()
    store.dispose()
    print(f"after the upgrade: version {version}, records {rows}")
    assert version == "4" and [tuple(r) for r in rows] == [("old", "inbound")]
