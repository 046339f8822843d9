"""A store made by an earlier release is brought up to date on start-up (store/migrations.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from budget_middleware import BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.database import Store
from budget_middleware.store.tables import SCHEMA_VERSION
from test_faults import sqlite_locked


def test_a_version_3_store_is_brought_to_the_current_version(tmp_path: Path) -> None:
    """Version 4 added the records' direction; 5 soft budgets, alert thresholds, shadow refusals
    and the alerts table; 6 an index on the applied batches' time (their prune); 7 the value a
    config file last gave a key; 8 renamed providers to their one name."""
    store = Store(f"sqlite:///{tmp_path}/old.db")
    store.create_schema()
    with store.engine.begin() as conn:  # as release 3 left it: one budget, one record
        conn.execute(text("ALTER TABLE bm_usage_records DROP COLUMN direction"))
        conn.execute(text("ALTER TABLE bm_usage_records DROP COLUMN would_refuse"))
        conn.execute(text("ALTER TABLE bm_budgets DROP COLUMN soft"))
        conn.execute(text("ALTER TABLE bm_budgets DROP COLUMN alert_thresholds"))
        conn.execute(text("DROP TABLE bm_alerts"))
        conn.execute(text("DROP INDEX ix_bm_flushes_applied_at"))
        conn.execute(text("ALTER TABLE bm_virtual_keys DROP COLUMN file_value_hash"))
        conn.execute(text("DROP TABLE bm_deleted"))
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
        deleted = conn.execute(text("SELECT count(*) FROM bm_deleted")).scalar_one()
        deliveries = conn.execute(text("SELECT count(*) FROM bm_alert_deliveries")).scalar_one()
        indexes = conn.execute(
            text(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'ix_bm_flushes%'"
            )
        ).all()
        version = conn.execute(
            text("SELECT value FROM bm_meta WHERE key = 'schema_version'")
        ).scalar_one()
    store.dispose()
    print(f"after the upgrade: version {version}, records {rows}, budgets {budgets}, {indexes}")
    assert [tuple(i) for i in indexes] == [("ix_bm_flushes_applied_at",)]
    assert version == str(SCHEMA_VERSION) and [tuple(r) for r in rows] == [("old", "inbound", None)]
    assert [tuple(b) for b in budgets] == [("b1", 0, None)] and alerts == 0 == deleted
    assert deliveries == 0


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


async def test_the_sweep_forgets_batch_ids_older_than_kept_and_only_them(tmp_path: Path) -> None:
    """`bm_flushes` grew a row a flush for ever (86,400 a day for a busy instance): the sweep
    forgets the ids applied more than FLUSH_IDS_KEPT ago, once an hour; a batch applied within
    it is still applied once when it comes again."""
    from datetime import timedelta

    from budget_middleware import BudgetSettings
    from budget_middleware.core.times import from_ts
    from budget_middleware.engine.engine import FLUSH_IDS_KEPT, PRUNE_SECONDS, BudgetEngine

    now = [1_800_000_000.0]
    engine = BudgetEngine(
        BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db"), clock=lambda: now[0]
    )
    store = engine.store
    store.create_schema()
    ages = {"old": FLUSH_IDS_KEPT + timedelta(hours=1), "recent": FLUSH_IDS_KEPT / 2}
    with store.engine.begin() as conn:
        for batch_id, age in ages.items():
            conn.execute(
                text("INSERT INTO bm_flushes (batch_id, applied_at) VALUES (:id, :at)"),
                {"id": batch_id, "at": from_ts(now[0]) - age},
            )

    def ids() -> list[str]:
        with store.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(text("SELECT batch_id FROM bm_flushes")))

    await engine.sweep()
    after_first = ids()
    with store.engine.begin() as conn:  # older than kept again, but within the hour
        conn.execute(
            text("UPDATE bm_flushes SET applied_at = :at"),
            {"at": from_ts(now[0]) - 2 * FLUSH_IDS_KEPT},
        )
    await engine.sweep()
    within_the_hour = ids()
    now[0] += PRUNE_SECONDS
    await engine.sweep()
    after_an_hour = ids()
    store.dispose()
    print(f"ids kept: {after_first}, then {within_the_hour}, an hour later {after_an_hour}")
    assert after_first == ["recent"]
    assert within_the_hour == ["recent"]
    assert after_an_hour == []


def _insert(conn: Any, table: str, **values: Any) -> None:
    names = ", ".join(values)
    conn.execute(text(f"INSERT INTO {table} ({names}) VALUES (:{', :'.join(values)})"), values)


_STAMPS = {"source": "manual", "created_at": "2026-11-30 00:00:00",
           "updated_at": "2026-11-30 00:00:00"}  # fmt: skip


def _budget(conn: Any, id_: str, owner_type: str, owner_id: str, usage: int) -> None:
    _insert(conn, "bm_budgets", id=id_, owner_type=owner_type, owner_id=owner_id,
            max_limit_nanos=10**7, reset_duration="1d", calendar_aligned=False,
            current_usage_nanos=usage, last_reset="2026-11-30 00:00:00", soft=False,
            **_STAMPS)  # fmt: skip


def _rate_limit(conn: Any, id_: str, owner_type: str, owner_id: str) -> None:
    _insert(conn, "bm_rate_limits", id=id_, owner_type=owner_type, owner_id=owner_id,
            request_max_limit=5, request_reset_duration="1m", request_current_usage=0,
            request_last_reset="2026-11-30 00:00:00", token_current_usage=0,
            token_last_reset="2026-11-30 00:00:00", **_STAMPS)  # fmt: skip


def _version_7_store(tmp_path: Path) -> Store:
    """A store as version 7 left it: providers spelled `google` and `gemini` (both with a
    budget), `OpenAI` with a rate limit, a key's provider config `X-AI`, a model config
    `Anthropic/claude-*`, a record of `google`."""
    store = Store(f"sqlite:///{tmp_path}/old.db")
    store.create_schema()
    with store.engine.begin() as conn:
        for name in ("google", "gemini", "OpenAI"):
            _insert(conn, "bm_providers", provider=name, calendar_aligned=False, **_STAMPS)
        _budget(conn, "b-google", "provider", "google", 4)
        _budget(conn, "b-gemini", "provider", "gemini", 6)
        _rate_limit(conn, "r-openai", "provider", "OpenAI")
        _insert(conn, "bm_provider_configs", id="pc1", virtual_key_id="k1", provider="X-AI",
                allowed_models='["*"]', blocked_models="[]",
                created_at="2026-11-30 00:00:00", updated_at="2026-11-30 00:00:00")  # fmt: skip
        _insert(conn, "bm_model_configs", id="mc1", model_name="claude-*", provider="Anthropic",
                scope="global", calendar_aligned=False, **_STAMPS)  # fmt: skip
        conn.execute(text("UPDATE bm_meta SET value = '7' WHERE key = 'schema_version'"))
    return store


def test_version_8_names_each_stored_provider_by_its_one_name(tmp_path: Path) -> None:
    store = _version_7_store(tmp_path)
    store.create_schema()  # the next start-up
    with store.engine.connect() as conn:
        providers = sorted(r[0] for r in conn.execute(text("SELECT provider FROM bm_providers")))
        budgets = sorted(
            tuple(r) for r in conn.execute(text("SELECT id, owner_id, current_usage_nanos "
                                                "FROM bm_budgets"))
        )  # fmt: skip
        limits = conn.execute(text("SELECT owner_id FROM bm_rate_limits")).scalars().all()
        config = conn.execute(text("SELECT provider FROM bm_provider_configs")).scalar_one()
        rule = conn.execute(text("SELECT provider FROM bm_model_configs")).scalar_one()
    store.dispose()
    print(f"after version 8: providers {providers}, budgets {budgets}, rate limits {limits}, "
          f"provider config {config!r}, model config {rule!r}")  # fmt: skip
    assert providers == ["gemini", "openai"]
    # Both Google budgets now cap `gemini`, each with its usage.
    assert budgets == [("b-gemini", "gemini", 6), ("b-google", "gemini", 4)]
    assert limits == ["openai"] and config == "xai" and rule == "anthropic"


def test_version_11_stores_a_model_config_for_any_provider_as_none(tmp_path: Path) -> None:
    """A model config written with `provider: ""` was stored as "", which no request names: its
    limits never applied. Version 11 stores it as a config for any provider is (NULL)."""
    store = Store(f"sqlite:///{tmp_path}/old.db")
    store.create_schema()
    with store.engine.begin() as conn:
        _insert(conn, "bm_model_configs", id="mc1", model_name="gpt-4o", provider="",
                scope="global", calendar_aligned=False, **_STAMPS)  # fmt: skip
        _insert(conn, "bm_model_configs", id="mc2", model_name="gpt-4o", provider="openai",
                scope="global", calendar_aligned=False, **_STAMPS)  # fmt: skip
        conn.execute(text("UPDATE bm_meta SET value = '10' WHERE key = 'schema_version'"))
    store.create_schema()  # the next start-up
    with store.engine.connect() as conn:
        rows = sorted(conn.execute(text("SELECT id, provider FROM bm_model_configs")).all())
    version = store.schema_version()
    store.dispose()
    print(f"after version 11: {rows}, schema version {version}")
    assert [tuple(r) for r in rows] == [("mc1", None), ("mc2", "openai")]
    assert version == SCHEMA_VERSION


async def test_a_version_5_store_made_before_first_attempt_at_lists_its_alerts(
    tmp_path: Path,
) -> None:
    """The first release with alerts (456185e, schema 5) made `bm_alerts` without
    `first_attempt_at`; the next commit (b571704) added the column and kept version 5, and no
    step added it: such a store, upgraded, answered `GET /alerts` with 503 "cannot be reached
    (no such column: bm_alerts.first_attempt_at)", and `budget-middleware alerts list` the
    same, for good. Version 12 adds it."""
    from admin_support import ADMIN, admin_client, admin_settings

    settings = admin_settings(tmp_path)
    store = Store(settings.database_url)
    store.create_schema()
    with store.engine.begin() as conn:  # as 456185e left it (its `AlertRow`), one alert raised
        conn.execute(text("ALTER TABLE bm_alerts DROP COLUMN first_attempt_at"))
        _insert(conn, "bm_alerts", id="a1", type="budget.threshold", budget_id="b1",
                window_start="2026-11-30 00:00:00", threshold=0.8, owner_type="virtual_key",
                owner_id="k1", owner_name="alice", raised_at="2026-11-30 00:00:00", body="{}",
                delivery="delivered", attempts=0, delivered_to="[]",
                next_attempt_at="2026-11-30 00:00:00")  # fmt: skip
        conn.execute(text("UPDATE bm_meta SET value = '5' WHERE key = 'schema_version'"))
    store.dispose()
    async with admin_client(settings) as c:
        listed = await c.get("/alerts", headers=ADMIN)
    print("GET /alerts after the upgrade:", listed.status_code, listed.text[:300])
    assert listed.status_code == 200
    assert [a["id"] for a in listed.json()["alerts"]] == ["a1"]


async def test_a_version_9_store_of_bm_deleted_owners_keeps_the_deleted_names(
    tmp_path: Path,
) -> None:
    """Version 9 was first (8750d9b) `bm_deleted_owners`: the names of deleted keys, teams and
    customers, for `GET /usage`. The next commit (2b6f70a) made it `bm_deleted`, at version 9
    still: a store of the first lost them all on its upgrade: the usage of a deleted key
    `leaver` was shown with no name, not marked deleted. Version 13 takes them over."""
    from admin_support import ADMIN, admin_client, admin_settings

    settings = admin_settings(tmp_path)
    store = Store(settings.database_url)
    store.create_schema()
    with store.engine.begin() as conn:  # as 8750d9b left it: a key deleted after it spent
        conn.execute(text("DROP TABLE bm_deleted"))
        conn.execute(
            text(
                "CREATE TABLE bm_deleted_owners (id VARCHAR(32) NOT NULL PRIMARY KEY, owner_type"
                " VARCHAR(16) NOT NULL, name VARCHAR(200) NOT NULL, deleted_at DATETIME NOT NULL)"
            )
        )
        _insert(conn, "bm_deleted_owners", id="k1", owner_type="virtual_key", name="leaver",
                deleted_at="2026-12-03 07:00:00")  # fmt: skip
        _insert(conn, "bm_usage_records", request_id="r1", created_at="2026-12-03 06:00:00",
                virtual_key_id="k1", provider="openai", model="gpt-4o", tags="[]",
                input_tokens=10, output_tokens=5, cached_tokens=0, cost_nanos=30_000_000,
                cost=0.03, cost_source="catalog", status=200, streamed=False,
                outcome="completed", estimated=False, duration_ms=1.0,
                direction="inbound")  # fmt: skip
        conn.execute(text("UPDATE bm_meta SET value = '9' WHERE key = 'schema_version'"))
    store.dispose()
    async with admin_client(settings) as c:
        usage = await c.get("/usage", params={"group_by": "virtual_key"}, headers=ADMIN)
    rows = [(u["key"], u["name"], u["deleted"], u["cost"]) for u in usage.json()["usage"]]
    print("GET /usage after the upgrade:", usage.status_code, rows)
    assert rows == [("k1", "leaver", True, 0.03)]


def test_two_rate_limits_of_one_provider_stop_start_up_and_change_nothing(tmp_path: Path) -> None:
    import pytest

    from budget_middleware import StoreSchemaError

    store = _version_7_store(tmp_path)
    with store.engine.begin() as conn:
        _insert(conn, "bm_providers", provider="openai", calendar_aligned=False, **_STAMPS)
        _rate_limit(conn, "r-openai-2", "provider", "openai")
    with pytest.raises(StoreSchemaError, match="'OpenAI' and 'openai' both have a rate limit"):
        store.create_schema()
    with store.engine.connect() as conn:
        version = conn.execute(
            text("SELECT value FROM bm_meta WHERE key = 'schema_version'")
        ).scalar_one()
        providers = sorted(r[0] for r in conn.execute(text("SELECT provider FROM bm_providers")))
    store.dispose()
    print(f"after the refused upgrade: version {version}, providers {providers}")
    assert version == "7" and providers == ["OpenAI", "gemini", "google", "openai"]


def _at_once(workers: int, work: Callable[[threading.Barrier], None]) -> None:
    """`work` in `workers` threads, each let go by one barrier (as processes starting together)."""
    barrier = threading.Barrier(workers)
    threads = [threading.Thread(target=work, args=(barrier,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def test_processes_starting_at_once_on_a_new_sqlite_store_all_start(tmp_path: Path) -> None:
    """Workers started together (`uvicorn --workers`, a deployment's replicas) on a SQLite file
    that does not exist yet each create the schema. On SQLite each table was created in a
    transaction of its own (the driver begins one only before a write): two of them found a
    table missing and made it, and one failed ("table bm_customers already exists", or the
    schema version's row twice); its start-up failed. Now the whole upgrade is one transaction
    that takes the write lock first: the next waits, and finds the schema made."""
    failures: list[str] = []
    rounds, workers = 5, 6
    for n in range(rounds):
        url = f"sqlite:///{tmp_path}/fresh-{n}.db"

        def start(barrier: threading.Barrier, url: str = url) -> None:
            engine = BudgetEngine(BudgetSettings(database_url=url, spill_dir=tmp_path / "spill"))

            async def up() -> None:
                barrier.wait()
                try:
                    await engine.ensure_started()
                except Exception as exc:
                    failures.append(str(exc).splitlines()[0])
                    return
                await engine.shutdown()

            asyncio.run(up())

        _at_once(workers, start)
        store = Store(url)
        assert store.schema_version() == SCHEMA_VERSION
        store.dispose()
    print(f"{len(failures)} of {rounds * workers} start-ups failed: {sorted(set(failures))[:3]}")
    assert failures == []


def test_connections_opened_at_once_on_a_new_sqlite_file_all_open(tmp_path: Path) -> None:
    """Each connection puts the file in WAL mode as it opens. SQLite answers "database is
    locked" at once, without its busy wait, to one asking while another turns the new file to
    WAL: a CI run saw 1 of 30 start-ups of the test above fail so (46 of 3,000 connections in
    a bare loop, 3 of 360 here). Asked again within the busy timeout, every connection opens."""
    failures: list[str] = []
    files, workers = 60, 6
    for n in range(files):
        url = f"sqlite:///{tmp_path}/new-{n}.db"

        def open_one(barrier: threading.Barrier, url: str = url) -> None:
            store = Store(url)  # one each, as processes have (one engine's first is one at a time)
            barrier.wait()
            try:
                with store.engine.connect() as conn:
                    mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
                if mode != "wal":
                    failures.append(f"journal mode {mode}")
            except Exception as exc:
                failures.append(str(exc).splitlines()[0])
            store.dispose()

        _at_once(workers, open_one)
    print(f"{len(failures)} of {files * workers} connections failed: {sorted(set(failures))[:3]}")
    assert failures == []


def test_a_start_up_on_an_up_to_date_sqlite_store_another_process_locks_asks_no_lock(
    tmp_path: Path,
) -> None:
    """Start-up on a store already at this release's version writes nothing, so it needs no
    write lock: another process holding the file locked (a `sqlite3` shell, a backup) lets
    it start, read and keep its charges on disk until the lock goes."""
    url = f"sqlite:///{tmp_path}/store.db?timeout=0.2"
    Store(url).create_schema()
    with sqlite_locked(tmp_path / "store.db"):
        store = Store(url)
        store.create_schema()  # raised "database is locked" when it asked for the write lock
        version = store.schema_version()
        store.dispose()
    assert version == SCHEMA_VERSION


def _known_urls_plan(store: Store) -> str:
    """The query plan of the URLs posted to in the last day (`raise_alerts`' `known_since`),
    as the database makes it (PostgreSQL told to avoid a scan of the whole table where it can:
    a table of a few rows is scanned whatever its indexes)."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store import alerts as stored

    query = str(stored.known_urls(datetime.now(UTC) - timedelta(days=1)))
    since = {"first_attempt_at_1": datetime.now(UTC) - timedelta(days=1)}
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            rows = conn.execute(text("EXPLAIN " + query), since).all()
        else:
            rows = conn.execute(text("EXPLAIN QUERY PLAN " + query), since).all()
    return " | ".join(str(row[-1]).strip() for row in rows if "Scan" in row[-1] or "SCAN" in row[-1]
                      or "SEARCH" in row[-1])  # fmt: skip


def test_a_version_13_store_gets_the_index_of_the_urls_posted_to_lately(store_url: str) -> None:
    """An instance with no webhook URL asks, as it raises an alert, which URLs any instance
    posted to in the last day (`first_attempt_at`): no index served it, and it read every
    delivery the store kept (SQLite: `SCAN bm_alert_deliveries`; PostgreSQL: `Seq Scan`).
    Version 14 indexes `first_attempt_at`; a store of version 13 is upgraded to it."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store import alerts as stored

    store = Store(store_url)
    store.create_schema()
    now = datetime.now(UTC)
    with store.engine.begin() as conn:  # as release 13 left it, 200 deliveries made
        conn.execute(text("DROP INDEX IF EXISTS ix_bm_alert_deliveries_first_attempt"))
        conn.execute(text("UPDATE bm_meta SET value = '13' WHERE key = 'schema_version'"))
    for day in range(200):
        raised = now - timedelta(days=day)
        alert = stored.NewAlert(
            type="budget.threshold", budget_id=f"b{day}", window_start=raised, threshold=0.8,
            owner_type="tag", owner_id="t", owner_name="t", raised_at=raised, body="{}",
            delivery="pending",
        )  # fmt: skip
        stored.raise_alerts(store, [alert], ["http://a.example/hook"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE bm_alert_deliveries SET first_attempt_at = next_attempt_at"))
    before = _known_urls_plan(store)
    store.create_schema()  # the next start-up
    after = _known_urls_plan(store)
    with store.engine.connect() as conn:
        known = [tuple(r) for r in conn.execute(stored.known_urls(now - timedelta(days=1))).all()]
    version = store.schema_version()
    store.dispose()
    print(f"the URLs posted to lately, version 13: {before}; upgraded to {version}: {after}; "
          f"found {known}")  # fmt: skip
    assert version == SCHEMA_VERSION == 14
    assert "ix_bm_alert_deliveries_first_attempt" not in before
    assert "ix_bm_alert_deliveries_first_attempt" in after
    assert [k[1] for k in known] == ["http://a.example/…"]  # the last day's one
