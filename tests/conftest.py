"""Shared fixtures: a fresh store per test, on SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


from budget_middleware import BudgetSettings

POSTGRES_BASE_URL = os.environ.get(
    "BUDGET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pid_namespace() -> str:
    """This process's PID namespace (a container's own): a pid means a process only within it."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "0"


# Each test run gets a database of its own, so that runs going on at once (several developers,
# several checkouts, several containers on one PostgreSQL) never drop each other's tables. It is
# dropped when the run ends; one a killed run left is dropped by the next run of its namespace.
_RUN_PREFIX = f"bm_test_{_pid_namespace()}_"
_RUN_DATABASE = f"{_RUN_PREFIX}{os.getpid()}"
POSTGRES_URL = POSTGRES_BASE_URL.rsplit("/", 1)[0] + "/" + _RUN_DATABASE
_run_database_made = False


def _admin_engine() -> Any:
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_BASE_URL, isolation_level="AUTOCOMMIT")


def _make_run_database() -> None:
    global _run_database_made
    if _run_database_made:
        return
    from sqlalchemy import text

    engine = _admin_engine()
    with engine.connect() as conn:
        names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'bm_test_%'"))
        for (name,) in list(names):
            if not name.startswith(_RUN_PREFIX):  # another namespace's: not this one's to judge
                continue
            pid = name.removeprefix(_RUN_PREFIX)
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():  # a killed run's
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_RUN_DATABASE}"'))
        conn.execute(text(f'CREATE DATABASE "{_RUN_DATABASE}"'))
    engine.dispose()
    _run_database_made = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _run_database_made:
        from sqlalchemy import text

        engine = _admin_engine()
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{_RUN_DATABASE}" WITH (FORCE)'))
        engine.dispose()


REDIS_URL = os.environ.get("BUDGET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


POSTGRES_UP = _reachable("127.0.0.1", 5432)
REDIS_UP = _reachable("127.0.0.1", 6379)
# CI runs every test for real: a missing service there is a failure, not a skip.
IN_CI = os.environ.get("CI") == "true"


def need_postgres() -> None:
    if not POSTGRES_UP:
        if IN_CI:
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (CI must run it)")
        pytest.skip("PostgreSQL is not running at 127.0.0.1:5432")
    _make_run_database()


def need_redis() -> None:
    if not REDIS_UP:
        if IN_CI:
            pytest.fail("Redis is not reachable at 127.0.0.1:6379 (CI must run it)")
        pytest.skip("Redis is not running at 127.0.0.1:6379")


def reset_postgres(url: str = POSTGRES_URL) -> None:
    """Drop the package's tables so each test starts from an empty store."""
    from sqlalchemy import create_engine

    from budget_middleware.store.tables import metadata

    engine = create_engine(url)
    with engine.begin() as conn:
        metadata.drop_all(conn)
    engine.dispose()


STORES = os.environ.get("BUDGET_TEST_STORES", "sqlite,postgres").split(",")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store of a test: a new SQLite file, or an emptied PostgreSQL database."""
    if request.param == "postgres":
        need_postgres()
        reset_postgres()
        yield POSTGRES_URL
    else:
        yield f"sqlite:///{tmp_path}/budget.db"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/budget.db"


@pytest.fixture
def make_settings(store_url: str) -> Callable[..., BudgetSettings]:
    """Settings on this test's store; keyword arguments override fields."""

    def make(**overrides: Any) -> BudgetSettings:
        values: dict[str, Any] = {
            "database_url": store_url,
            "admin_key": "admin-secret",
            "flush_interval_seconds": 0.05,
            "cache_ttl_seconds": 5,
            # Hundreds of concurrent requests on a loaded machine can wait on Redis past the
            # 2 s default (a few 503s then); the timeout's own tests set theirs.
            "redis_timeout_seconds": 10,
        }
        values.update(overrides)
        return BudgetSettings(**values)

    return make


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl+C raises KeyboardInterrupt in the main thread for the test, as in a terminal: a
    suite started in the background (`cmd &` in a script, a CI runner's job) inherits SIGINT
    ignored, and Python then leaves it so (`_thread.interrupt_main()` and a real SIGINT both
    did nothing: the interrupt tests failed 10 of 10 runs started with `&`)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def _no_budget_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests configure through arguments; a developer's BUDGET_* variables must not leak in.
    Charges spilled in an outage go to the test's own folder (`BUDGET_SPILL_DIR`'s default is
    under `XDG_STATE_HOME`): not the user's, and not another test's on the same database."""
    for name in list(os.environ):
        if name.startswith("BUDGET_") and not name.startswith("BUDGET_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def _release_engines() -> Iterator[None]:
    """Each test gets engines of its own; their connection pools are closed when it ends, and
    those started in the background loop (a WSGI app's, a sync transport's) are shut down: left
    running, their flushers and Redis heartbeats went on there through the later tests (to a
    store dropped since, to a private Redis's port another test may take). Those held for the
    exit's write (`engine._held`: one stopped with slot releases Redis never got, its private
    Redis killed) are let go too: kept, the exit started each again on its test's database,
    dropped by then (`private_database`), and said "store unreachable" after the summary."""
    from budget_middleware.engine.engine import _engines, _held
    from budget_middleware.engine.portal import shut_down_engines

    yield
    shut_down_engines()
    for engine in list(_engines.values()):
        engine.store.dispose()
    _engines.clear()
    _held.clear()
