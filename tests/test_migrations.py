"""A store made by an earlier release is brought up to date on start-up (store/migrations.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from budget_middleware.store.database import Store


def test_a_version_3_store_is_brought_to_version_5(tmp_path: Path) -> None:
    """Version 4 added the records' direction; 5 soft budgets, alert thresholds, shadow refusals
    and the alerts table."""
    store = Store(f"sqlite:///{tmp_path}/old.db")
    store.create_schema()
    with store.engine.begin() as conn:  # as release 3 left it: one budget, one record
        conn.execute(text("ALTER TABLE bm_usage_records DROP COLUMN direction"))
        conn.execute(text("ALTER TABLE bm_usage_records DROP COLUMN would_refuse"))
        conn.execute(text("ALTER TABLE bm_budgets DROP COLUMN soft"))
        conn.execute(text("ALTER TABLE bm_budgets DROP COLUMN alert_thresholds"))
        conn.execute(text("DROP TABLE bm_alerts"))
        conn.execute(
            text(
                "INSERT INTO bm_budgets (id, owner_type, owner_id, max_limit_nanos,"
                " calendar_aligned, current_usage_nanos, last_reset, source, created_at,"
                " updated_at) VALUES ('b1', 'tag', 't', 1000, 0, 5, '2026-11-30 00:00:00',"
                " 'manual', '2026-11-30 00:00:00', '2026-11-30 00:00:00')"
            )
        )
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
        rows = conn.execute(
            text("SELECT request_id, direction, would_refuse FROM bm_usage_records")
        ).all()
        budgets = conn.execute(text("SELECT id, soft, alert_thresholds FROM bm_budgets")).all()
        alerts = conn.execute(text("SELECT count(*) FROM bm_alerts")).scalar_one()
        version = conn.execute(
            text("SELECT value FROM bm_meta WHERE key = 'schema_version'")
        ).scalar_one()
    store.dispose()
    print(f"after the upgrade: version {version}, records {rows}, budgets {budgets}")
    assert version == "5" and [tuple(r) for r in rows] == [("old", "inbound", None)]
    assert [tuple(b) for b in budgets] == [("b1", 0, None)] and alerts == 0


async def test_a_store_of_a_newer_release_stops_start_up_and_is_never_written(
    tmp_path: Path,
) -> None:
    """A store whose schema a newer release made: the lifespan start-up fails naming both
    versions (it logged the error and served: 503s saying the store could not be reached, a
    healthy `/health`, and a 500 from the admin API)."""
    import pytest

    from admin_support import ADMIN, admin_client, admin_settings
    from budget_middleware import StoreSchemaError
    from support import host_app, running

    settings = admin_settings(tmp_path)
    store = Store(settings.database_url)
    store.create_schema()
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE bm_meta SET value = '99' WHERE key = 'schema_version'"))
    store.dispose()
    with pytest.raises(RuntimeError, match="version 99, newer than this release"):
        async with running(host_app(settings)):
            pass
    async with admin_client(admin_settings(tmp_path, cache_ttl_seconds=7)) as c:
        health = await c.get("/health")  # an admin app of its own, started by nobody yet
        listed = await c.get("/customers", headers=ADMIN)
    print("admin:", listed.status_code, listed.json(), "health:", health.status_code, health.json())
    assert listed.status_code == 503 and "version 99" in listed.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["store"] == "down"
    assert issubclass(StoreSchemaError, RuntimeError) is False  # a ConfigurationError: final
