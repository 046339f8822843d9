"""Start-up (SPEC §2, §3): invalid settings, BUDGET_CONFIG_FILE or BUDGET_PRICING_FILE stop it,
naming the variable, the file and the entry, and never leave a half-started middleware; a store
that is merely unreachable does not stop it (later requests try again)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, BudgetSettings, SettingsError, get_engine
from budget_middleware.engine.engine import _engines
from budget_middleware.exceptions import PricingFileError
from budget_middleware.manage.config_file import ConfigFileError
from support import chat, client

BAD_ENTRY = """
customers:
  - name: acme
model_configs:
  - model_name: gpt-4o
    budgets: [{max_limit: -1, reset_duration: 1d}]
"""
UNKNOWN_CUSTOMER = """
teams:
  - name: research
    customer: nobody
"""


class Host:
    """A Starlette app that says whether its own startup ran."""

    def __init__(self, settings: BudgetSettings | None) -> None:
        self.started = False

        async def completions(request: Request) -> JSONResponse:
            return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        async def hello(request: Request) -> JSONResponse:
            return JSONResponse({"hello": "world"})

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.started = True
            yield

        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", completions, methods=["POST"]),
                Route("/hello", hello),
            ],
            lifespan=lifespan,
        )
        self.app.add_middleware(BudgetMiddleware, settings=settings)


async def startup(app: Any) -> dict[str, Any]:
    """Run a lifespan: the answer to lifespan.startup (then shut down)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    answer = await asyncio.wait_for(outbox.get(), 30)
    await inbox.put({"type": "lifespan.shutdown"})  # what a server that carries on would send
    ended = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
    if answer["type"] == "lifespan.startup.failed":  # then raised, as Starlette's router does
        assert isinstance(ended[0], Exception) and str(ended[0]) == answer["message"]
    return answer


def test_a_settings_error_stops_starlettes_test_client_instead_of_hanging_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`with TestClient(app)` (FastAPI's and Starlette's) runs the lifespan in a thread until the
    lifespan ends: a middleware that answered startup.failed and returned let the error pass,
    and the client hung at its exit, waiting for an answer to lifespan.shutdown."""
    from starlette.testclient import TestClient

    monkeypatch.setenv("BUDGET_MAX_BODY_BYTES", "lots")
    host = Host(None)
    ended: list[BaseException] = []

    def enter() -> None:
        try:
            with TestClient(host.app) as http:
                http.post("/v1/chat/completions", json=chat())
        except BaseException as exc:
            ended.append(exc)

    worker = threading.Thread(target=enter, daemon=True)  # a hang must not hang the suite
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "TestClient hung"
    assert len(ended) == 1 and isinstance(ended[0], SettingsError)
    assert "BUDGET_MAX_BODY_BYTES" in str(ended[0])
    assert not host.started


async def test_settings_given_as_a_dict_fail_the_lifespan_saying_what_is_expected() -> None:
    """`add_middleware(BudgetMiddleware, settings={...})` failed with "'dict' object has no
    attribute 'cache_key'"."""
    with pytest.raises(TypeError, match="settings must be a BudgetSettings, not dict"):
        get_engine({"reserve": False})  # type: ignore[arg-type]
    host = Host({"reserve": False})  # type: ignore[arg-type]
    answer = await startup(host.app)
    assert answer["type"] == "lifespan.startup.failed"
    assert answer["message"].startswith("settings must be a BudgetSettings, not dict: ")
    assert not host.started


def config(tmp_path: Path, text: str, **overrides: Any) -> BudgetSettings:
    path = tmp_path / "budget.yaml"
    path.write_text(text)
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/b.db",
        "config_file": path,
        "flush_interval_seconds": 0.05,
    }
    return BudgetSettings(**{**values, **overrides})


# -- settings ------------------------------------------------------------------------------


async def test_a_settings_error_fails_the_lifespan_and_every_later_request_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BUDGET_MAX_BODY_BYTES", "lots")
    host = Host(None)
    with caplog.at_level("DEBUG", logger="budget_middleware"):
        answer = await startup(host.app)
    # The error is the lifespan's answer: no start is tried, no store's failure logged with it.
    logged = [r.getMessage() for r in caplog.records]
    print("logged at the failed startup:", logged)
    assert not [m for m in logged if "could not start" in m]
    assert answer["type"] == "lifespan.startup.failed"
    assert "BUDGET_MAX_BODY_BYTES" in answer["message"]
    assert not host.started  # the host app was not started either
    async with client(host.app) as http:  # a server that carries on anyway
        for _ in range(2):
            with pytest.raises(SettingsError, match="BUDGET_MAX_BODY_BYTES"):
                await http.post("/v1/chat/completions", json=chat())
        with pytest.raises(SettingsError, match="BUDGET_MAX_BODY_BYTES"):
            await http.get("/hello")


async def test_without_a_lifespan_every_request_raises_the_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUDGET_EXCEEDED_STATUS", "418")
    host = Host(None)
    async with client(host.app) as http:  # httpx's ASGITransport sends no lifespan
        for _ in range(2):
            with pytest.raises(SettingsError, match="BUDGET_EXCEEDED_STATUS"):
                await http.post("/v1/chat/completions", json=chat())
        with pytest.raises(SettingsError, match="BUDGET_EXCEEDED_STATUS"):
            await http.get("/hello")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BUDGET_DATABASE_URL", "sqlite:", "not a valid SQLAlchemy URL"),
        ("BUDGET_DATABASE_URL", "postgresql://bm:pw%40SECRET@db:5432x/budgets", "port"),
        ("BUDGET_DATABASE_URL", "postgresql://bm:pwSECRET@db:99999/budgets", "port"),
        ("BUDGET_REDIS_URL", "redis://:pwSECRET@127.0.0.1:63x79/7", "port"),
        ("BUDGET_REDIS_URL", "redis://:pwSECRET@127.0.0.1:6379/seven", "database number"),
        ("BUDGET_REDIS_URL", "redis://:pwSECRET@127.0.0.1:6379/0?db=seven", "db"),
    ],
)
async def test_a_store_or_redis_url_that_cannot_be_read_fails_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """A URL no driver can read is a setting's error, not an outage: `sqlite:` failed start-up
    with SQLAlchemy's "Could not parse SQLAlchemy URL" (no variable named); a port that is no
    number let the server start and answered 503 to every request, logged as "could not start"
    (Redis: "Port could not be cast to integer value"); and `redis://…/seven` was Redis'
    database 0, silently shared with whatever else uses it."""
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/b.db")
    monkeypatch.setenv(variable, value)
    host = Host(None)
    answer = await startup(host.app)
    print(answer)
    assert answer["type"] == "lifespan.startup.failed"
    assert variable in answer["message"] and says in answer["message"]
    assert "SECRET" not in answer["message"]
    assert not host.started


async def test_a_raw_asgi_middleware_with_bad_settings_raises_on_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUDGET_CACHE_TTL_SECONDS", "-1")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the host app must not be reached")

    wrapped = BudgetMiddleware(app)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    for _ in range(2):
        with pytest.raises(SettingsError, match="BUDGET_CACHE_TTL_SECONDS") as raised:
            await wrapped(scope, _no_body, _ignore)
        assert len(_frames(raised.value)) < 5  # one object re-raised would grow its traceback


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def _ignore(message: Any) -> None:
    pass


def _frames(exc: BaseException) -> list[Any]:
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


# -- the pricing file ----------------------------------------------------------------------


async def test_an_invalid_pricing_file_fails_the_lifespan_and_later_requests(
    tmp_path: Path,
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"gpt-4o": {"input_per_mtok": "cheap", "output_per_mtok": 1}}}')
    host = Host(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", pricing_file=prices))
    answer = await startup(host.app)
    assert answer["type"] == "lifespan.startup.failed"
    assert "BUDGET_PRICING_FILE" in answer["message"] and "gpt-4o" in answer["message"]
    assert not host.started
    async with client(host.app) as http:
        with pytest.raises(PricingFileError, match=r"BUDGET_PRICING_FILE.*models\.gpt-4o"):
            await http.post("/v1/chat/completions", json=chat())


# -- the config file -----------------------------------------------------------------------


async def test_an_invalid_config_entry_fails_the_lifespan_naming_the_file_and_the_entry(
    tmp_path: Path,
) -> None:
    settings = config(tmp_path, BAD_ENTRY)
    host = Host(settings)
    answer = await startup(host.app)
    assert answer["type"] == "lifespan.startup.failed"
    message = answer["message"]
    assert "BUDGET_CONFIG_FILE" in message and str(tmp_path / "budget.yaml") in message
    assert "model_configs[0] (gpt-4o)" in message and "max_limit" in message
    assert not host.started
    async with client(host.app) as http:
        with pytest.raises(ConfigFileError, match=r"model_configs\[0\] \(gpt-4o\)"):
            await http.post("/v1/chat/completions", json=chat())
    assert not any(e.started for e in _engines.values())  # no flusher, no counters
    with pytest.raises(ConfigFileError, match="model_configs"):
        get_engine(settings)  # found when the engine is made, like an invalid setting


async def test_without_a_lifespan_an_invalid_config_entry_raises_on_the_first_request(
    tmp_path: Path,
) -> None:
    host = Host(config(tmp_path, BAD_ENTRY))
    async with client(host.app) as http:
        for _ in range(2):
            with pytest.raises(ConfigFileError, match=r"budget\.yaml.*model_configs\[0\]"):
                await http.post("/v1/chat/completions", json=chat())


async def test_a_config_entry_naming_an_unknown_owner_fails_the_lifespan(tmp_path: Path) -> None:
    settings = config(tmp_path, UNKNOWN_CUSTOMER)
    host = Host(settings)
    answer = await startup(host.app)
    assert answer["type"] == "lifespan.startup.failed"
    assert "teams[0] (research)" in answer["message"] and "'nobody'" in answer["message"]
    assert not host.started and not get_engine(settings).started
    async with client(host.app) as http:  # not a 503 "store cannot be reached"
        with pytest.raises(ConfigFileError, match=r"teams\[0\] \(research\)"):
            await http.post("/v1/chat/completions", json=chat())


async def test_without_a_lifespan_a_config_entry_naming_an_unknown_owner_raises_at_once(
    tmp_path: Path,
) -> None:
    host = Host(config(tmp_path, UNKNOWN_CUSTOMER))
    async with client(host.app) as http:
        for _ in range(2):
            with pytest.raises(ConfigFileError, match=r"teams\[0\] \(research\)"):
                await http.post("/v1/chat/completions", json=chat())


async def test_a_store_unreachable_at_startup_does_not_stop_it_and_requests_try_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server starts, its log saying why the budgets could not (the operator's one sign
    until the first request is refused 503)."""
    later = tmp_path / "not-yet"  # SQLite cannot open a file in a directory that does not exist
    settings = BudgetSettings(database_url=f"sqlite:///{later}/b.db", flush_interval_seconds=0.05)
    host = Host(settings)
    with caplog.at_level("ERROR", logger="budget_middleware"):
        answer = await startup(host.app)
    said = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
    print("logged at startup:", said)
    assert answer["type"] == "lifespan.startup.complete"
    assert len(said) == 1
    assert host.started
    async with client(host.app) as http:
        refused = await http.post("/v1/chat/completions", json=chat())
        assert refused.status_code == 503
        later.mkdir()
        admitted = await http.post("/v1/chat/completions", json=chat())
        assert admitted.status_code == 200
    engine = get_engine(settings)
    assert engine.started
    await engine.shutdown()


def test_the_start_up_line_names_the_store_redis_and_the_admin_mount(tmp_path: Path) -> None:
    """A first run under uvicorn says, in one line, which store and Redis it uses (no password)
    and where the admin API is mounted."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "BUDGET_ADMIN_KEY": "x",
        "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
    }
    code = (
        "import asyncio, sys; sys.path.insert(0, 'examples'); from app import app\n"
        "async def main():\n"
        "    sent = []\n"
        "    queue = [{'type': 'lifespan.startup'}, {'type': 'lifespan.shutdown'}]\n"
        "    async def receive(): return queue.pop(0)\n"
        "    async def send(m): sent.append(m['type'])\n"
        "    scope = {'type': 'lifespan', 'asgi': {'version': '3.0'}, 'state': {}}\n"
        "    await app(scope, receive, send)\n"
        "    print(sent)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    print(done.stderr)
    lines = [x for x in done.stderr.splitlines() if x.startswith("budget-middleware: store")]
    assert lines == [
        f"budget-middleware: store sqlite:///{tmp_path}/s.db, counters in process "
        "(no BUDGET_REDIS_URL), admin API at /budget-admin"
    ]
    engine = get_engine(
        BudgetSettings(
            database_url="postgresql+psycopg://app:hunter2@db.internal:5432/llm",
            redis_url="redis://:s3cret@cache.internal:6379/0",
            mode="shadow",
        )
    )
    line = engine.describe(None)
    print(line)
    assert "hunter2" not in line and "s3cret" not in line
    assert line == (
        "budget-middleware: store postgresql+psycopg://app:***@db.internal:5432/llm, counters in "
        "Redis at redis://:***@cache.internal:6379/0, no admin API mounted, shadow mode"
    )


def test_charges_are_written_when_uvicorn_is_made_to_quit(tmp_path: Path) -> None:
    """Ctrl+C twice on uvicorn (its "force quit") while 20 streams are in flight: it skips the
    lifespan's shutdown, the engine's last flush, and the requests settle as they are
    cancelled. Before, 1 record of 21 admitted was written; what is pending is written at
    exit now."""
    import json
    import os
    import signal
    import socket
    import sqlite3
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    db = tmp_path / "s.db"
    env = {**os.environ, "BUDGET_DATABASE_URL": f"sqlite:///{db}", "BUDGET_ADMIN_KEY": "x",
           "BUDGET_FLUSH_INTERVAL_SECONDS": "5", "PYTHONPATH": str(root / "src")}  # fmt: skip
    made = subprocess.run(
        [sys.executable, "-c", "from budget_middleware import get_manager; print(get_manager()"
         ".create_virtual_key(name='k', budgets=[{'max_limit': 100}]).value)"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    key = made.stdout.strip().splitlines()[-1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(root / "examples"),
         "--port", str(port), "--log-level", "warning", "--http", "h11"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        messages = [{"role": "user", "content": "hello"}]
        chat_ = {"model": "openai/gpt-4o-mini", "stream": True, "max_tokens": 40}
        body = json.dumps({**chat_, "messages": messages}).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-budget-key: {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "x-mock-delay-ms: 80\r\n\r\n"
        ).encode() + body
        streams = []
        for _ in range(20):
            stream = socket.create_connection(("127.0.0.1", port), timeout=10)
            stream.sendall(request)
            assert stream.recv(12).startswith(b"HTTP/1.1 200")  # admitted
            streams.append(stream)
        server.send_signal(signal.SIGINT)  # a graceful shutdown starts: it waits for them
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)  # force quit
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
        for stream in streams:
            stream.close()
    with sqlite3.connect(db) as conn:
        count, cost = conn.execute(
            "SELECT count(*), coalesce(sum(cost_nanos), 0) FROM bm_usage_records"
        ).fetchone()
        spent = conn.execute("SELECT current_usage_nanos FROM bm_budgets").fetchone()[0]
    print(f"20 in flight at a force quit: {count} records ({cost} nano-USD), budget {spent}")
    assert count == 20 and spent == cost > 0


NO_LIFESPAN_APP = """
import json

from budget_middleware import BudgetMiddleware


async def host(scope, receive, send):
    if scope["type"] != "http":  # as Django's ASGI handler says it
        raise ValueError("Django can only handle ASGI/HTTP connections, not %s." % scope["type"])
    while (await receive()).get("more_body"):
        pass
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
    body = json.dumps({"object": "chat.completion", "usage": usage}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


app = BudgetMiddleware(host)
"""


def _three_posted_then_sigterm(tmp_path: Path, app_text: str, path: str) -> tuple[int, int, str]:
    """`app_text` served by uvicorn in a process of its own (flushes a minute apart), 3 chat
    completions posted to `path` and answered 200, then SIGTERM (uvicorn re-raises it: no
    `atexit`): the usage records and nano-dollars written, and uvicorn's log."""
    import os
    import signal
    import socket
    import sqlite3
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "host.py").write_text(app_text)
    db = tmp_path / "s.db"
    env = {**os.environ, "BUDGET_DATABASE_URL": f"sqlite:///{db}",
           "BUDGET_FLUSH_INTERVAL_SECONDS": "60", "PYTHONPATH": str(root / "src")}  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "host:app", "--app-dir", str(tmp_path),
         "--port", str(port), "--log-level", "info", "--http", "h11"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        body = b'{"model": "openai/gpt-4o", "messages": [], "max_tokens": 1000}'
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(request)
                assert conn.recv(12).startswith(b"HTTP/1.1 200")
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    with sqlite3.connect(db) as conn:
        count, cost = conn.execute(
            "SELECT count(*), coalesce(sum(cost_nanos), 0) FROM bm_usage_records"
        ).fetchone()
    return int(count), int(cost), log


# A raw ASGI app that answers the lifespan's startup and returns, done with it.
STARTED_THEN_RETURNS_APP = NO_LIFESPAN_APP.replace(
    """    if scope["type"] != "http":  # as Django's ASGI handler says it
        raise ValueError("Django can only handle ASGI/HTTP connections, not %s." % scope["type"])
""",
    """    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        return  # nothing of its own to close: it does not wait for the shutdown
""",
)
assert STARTED_THEN_RETURNS_APP != NO_LIFESPAN_APP
# One whose lifespan fails after its startup (a task it ran there crashed).
STARTED_THEN_FAILS_APP = STARTED_THEN_RETURNS_APP.replace(
    "        return  # nothing of its own to close: it does not wait for the shutdown\n",
    '        raise RuntimeError("the cache warmer crashed")\n',
)
assert STARTED_THEN_FAILS_APP != STARTED_THEN_RETURNS_APP


@pytest.mark.parametrize(
    "app_text",
    [NO_LIFESPAN_APP, STARTED_THEN_RETURNS_APP, STARTED_THEN_FAILS_APP],
    ids=["no-lifespan", "started-then-returns", "started-then-fails"],
)
def test_charges_are_written_when_uvicorn_stops_a_host_app_without_a_lifespan(
    tmp_path: Path, app_text: str
) -> None:
    """A host app that does not speak the ASGI lifespan (Django's ASGI app raises on it, a bare
    ASGI function): uvicorn started the middleware with it, took the app's error as "lifespan
    unsupported", and never sent the shutdown that writes what is pending. Stopped by SIGTERM
    (`docker stop`, Kubernetes), uvicorn re-raises the signal, so no `atexit` runs either: the
    charges of the last flush interval were lost (3 admitted, 0 written). The middleware now
    answers the lifespan itself when the app does not, and its shutdown writes them.
    The same for an app that answers the startup and returns, not waiting for a shutdown it
    has nothing to do at: its lifespan ended there, and with it the middleware's, so uvicorn
    had no one to send the shutdown to (3 admitted, 0 written), and for one whose lifespan
    fails after its startup, which uvicorn only logs (0 written): the failure is logged, with
    its traceback, and the lifespan carried on."""
    count, cost, log = _three_posted_then_sigterm(tmp_path, app_text, "/v1/chat/completions")
    print(log)
    print(f"3 admitted, then SIGTERM: {count} records written ({cost} nano-USD)")
    assert count == 3 and cost > 0
    if app_text is STARTED_THEN_FAILS_APP:
        assert "the host app's lifespan failed after its startup" in log
        assert "RuntimeError: the cache warmer crashed" in log


@pytest.mark.parametrize(
    ("variable", "value", "missing", "extra"),
    [
        ("BUDGET_REDIS_URL", "redis://127.0.0.1:6379/7", "redis", "redis"),
        ("BUDGET_DATABASE_URL", "postgresql://bm@127.0.0.1:5432/budgets", "psycopg", "postgres"),
    ],
)
async def test_a_url_whose_driver_is_not_installed_fails_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
    value: str,
    missing: str,
    extra: str,
) -> None:
    """`pip install budget-middleware` without the extra, then BUDGET_REDIS_URL (or a
    PostgreSQL BUDGET_DATABASE_URL) set: start-up failed with "import of redis halted" / "No
    module named 'psycopg'", naming neither the variable nor what to install."""
    import sys

    for name in [missing, *(m for m in sys.modules if m.startswith(f"{missing}."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "budget_middleware.store.redis_counters", raising=False)
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/b.db")
    monkeypatch.setenv(variable, value)
    host = Host(None)
    answer = await startup(host.app)
    print(answer)
    assert answer["type"] == "lifespan.startup.failed"
    assert variable in answer["message"]
    assert f"budget-middleware[{extra}]" in answer["message"]
    assert not host.started


async def test_a_store_url_with_a_line_break_after_it_is_the_store_it_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A variable set from a file or a Kubernetes secret often ends with a line break
    (`echo "sqlite:///…" | base64`). BUDGET_DATABASE_URL was taken with it: SQLite made a
    second store, a file whose name ends with the line break, and `b.db` (the store the CLI,
    the admin API of a process without it, and the operator read) was not even made. A URL
    never ends with a blank: it is read without them."""
    import os

    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/b.db\n")
    monkeypatch.setenv("BUDGET_REDIS_URL", "")
    host = Host(None)
    async with client(host.app) as http:  # no lifespan: started by the first request
        answer = await http.post("/v1/chat/completions", json=chat())
        assert answer.status_code == 200
    engine = get_engine(BudgetSettings())
    await engine.shutdown()
    made = sorted(os.listdir(tmp_path))
    print(made)
    assert "b.db" in made and "b.db\n" not in made
    assert engine.settings.database_url == f"sqlite:///{tmp_path}/b.db"


MOUNTED_APP = """
from contextlib import asynccontextmanager

from fastapi import FastAPI

from budget_middleware import BudgetMiddleware, get_engine

llm = FastAPI()


@llm.post("/v1/chat/completions")
async def completions():
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
    return {"object": "chat.completion", "usage": usage}


llm.add_middleware(BudgetMiddleware)


@asynccontextmanager
async def lifespan(app):
    yield
    await get_engine().shutdown()  # the sub-app gets no lifespan: its charges written here


app = FastAPI(lifespan=lifespan)
app.mount("/llm", llm)
"""


def test_a_middleware_on_a_mounted_sub_app_writes_its_charges_as_readme_says(
    tmp_path: Path,
) -> None:
    """Starlette and FastAPI run the lifespan of the top app only: a middleware added to a
    mounted sub-app starts on its first request and never hears the shutdown. Under uvicorn
    stopped by SIGTERM (which re-raises the signal, so no `atexit` runs) the charges of the
    last flush interval were lost: 3 admitted, 0 written (this app without its lifespan).
    README's recipe, the engine shut down in the top app's lifespan, writes them: 3 of 3."""
    count, _, _ = _three_posted_then_sigterm(tmp_path, MOUNTED_APP, "/llm/v1/chat/completions")
    print(f"3 admitted, then SIGTERM: {count} written")
    assert count == 3


async def _three_charged_then_shut_down(
    app: Any, db: Path
) -> tuple[int, list[str], BaseException | None]:
    """Run `app`'s lifespan by hand as a server does: start it, send 3 metered requests, tell it
    to shut down. The usage records written to `db`, what the app told the server after the
    shutdown, and what its lifespan ended with."""
    import sqlite3

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.startup.complete"
    async with client(app) as http:
        for _ in range(3):
            answer = await http.post("/v1/chat/completions", json=chat())
            assert answer.status_code == 200
    await inbox.put({"type": "lifespan.shutdown"})
    ended = (await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30))[0]
    told = []
    while not outbox.empty():
        told.append(outbox.get_nowait()["type"])
    with sqlite3.connect(db) as conn:
        count = conn.execute("SELECT count(*) FROM bm_usage_records").fetchone()[0]
    return count, told, ended


async def _answered(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
    await JSONResponse({"object": "chat.completion", "usage": usage})(scope, receive, send)


async def test_charges_are_written_when_the_host_app_s_own_shutdown_fails(
    tmp_path: Path,
) -> None:
    """The host app's lifespan raises after its `yield` (a pool that will not close): Starlette
    answers `lifespan.shutdown.failed`, and the middleware wrote nothing, waiting for a
    `shutdown.complete` that never came (3 admitted, 0 written; under uvicorn stopped by SIGTERM
    no `atexit` writes them later). SPEC §2: lifespan shutdown writes every pending charge."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("the app's pool would not close")

    async def completions(request: Request) -> JSONResponse:
        usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
        return JSONResponse({"object": "chat.completion", "usage": usage})

    db = tmp_path / "b.db"
    host = Starlette(
        routes=[Route("/v1/chat/completions", completions, methods=["POST"])], lifespan=lifespan
    )
    settings = BudgetSettings(database_url=f"sqlite:///{db}", flush_interval_seconds=60)
    host.add_middleware(BudgetMiddleware, settings=settings)
    count, told, _ = await _three_charged_then_shut_down(host, db)
    print(f"3 admitted, the app's shutdown failed ({told}): {count} written")
    assert told == ["lifespan.shutdown.failed"]
    assert count == 3
    await get_engine(settings).shutdown()


@pytest.mark.parametrize("ending", ["raises", "returns"])
async def test_charges_are_written_when_the_host_app_ends_its_lifespan_without_answering(
    tmp_path: Path, ending: str
) -> None:
    """A raw ASGI host app that handles the lifespan itself and, told to shut down, raises
    before it answers (the middleware saw neither `shutdown.complete` nor `shutdown.failed`,
    and wrote nothing: 3 admitted, 0 written), or returns without answering (its own work
    done): the server's shutdown still writes every pending charge (SPEC §2); none may wait for
    an exit that runs no `atexit` (uvicorn stopped by SIGTERM)."""

    async def host(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await _answered(scope, receive, send)
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown, never answered
        if ending == "raises":
            raise RuntimeError("the app's pool would not close")

    db = tmp_path / "b.db"
    settings = BudgetSettings(database_url=f"sqlite:///{db}", flush_interval_seconds=60)
    app = BudgetMiddleware(host, settings)
    count, told, ended = await _three_charged_then_shut_down(app, db)
    print(f"3 admitted, the app {ending} at shutdown without answering: {count} written")
    assert told == []
    if ending == "raises":  # the app's error goes on to the server
        assert isinstance(ended, RuntimeError)
    else:
        assert ended is None
    assert count == 3
    await get_engine(settings).shutdown()


@pytest.mark.parametrize(
    "kind", ["no-lifespan", "bare", "started-then-returns", "started-then-fails"]
)
async def test_the_middleware_carries_on_the_lifespan_of_a_host_app_that_does_not(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In process, what the uvicorn tests above see from outside: a host app that raises on the
    lifespan (Django's), returns at once (a bare ASGI function), answers the startup and
    returns, or answers it and then fails: the middleware answers the startup if the app did
    not, waits for the server's shutdown, writes every charge then (SPEC §2) and answers it.
    Only the app that failed after its startup is logged an error; the one that raises on the
    lifespan, a note."""

    async def host(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await _answered(scope, receive, send)
        if kind == "no-lifespan":
            raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
        if kind == "bare":
            return None
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        if kind == "started-then-fails":
            raise RuntimeError("the cache warmer crashed")
        return None

    db = tmp_path / "b.db"
    settings = BudgetSettings(database_url=f"sqlite:///{db}", flush_interval_seconds=60)
    with caplog.at_level("INFO", logger="budget_middleware"):
        count, told, ended = await _three_charged_then_shut_down(
            BudgetMiddleware(host, settings), db
        )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    noted = [r.getMessage() for r in caplog.records if "does not handle" in r.getMessage()]
    print(f"{kind}: 3 admitted, {count} written; told {told}, ended {ended!r}; errors {errors}")
    assert (count, told, ended) == (3, ["lifespan.shutdown.complete"], None)
    if kind == "started-then-fails":
        assert errors == ["the host app's lifespan failed after its startup"]
    else:
        assert errors == []
    assert len(noted) == (kind == "no-lifespan")
    await get_engine(settings).shutdown()


async def test_charges_are_written_before_the_server_is_told_the_shutdown_is_complete(
    tmp_path: Path,
) -> None:
    """A server may end the process as soon as it reads `lifespan.shutdown.complete` (uvicorn
    returns from its shutdown then, and the rest of the lifespan task is cancelled): the
    charges are written before that message goes out, not after the host app returned."""
    import sqlite3

    async def completions(request: Request) -> JSONResponse:
        usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
        return JSONResponse({"object": "chat.completion", "usage": usage})

    db = tmp_path / "b.db"
    host = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    settings = BudgetSettings(database_url=f"sqlite:///{db}", flush_interval_seconds=60)
    host.add_middleware(BudgetMiddleware, settings=settings)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    written_when_told: list[int] = []
    told = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT count(*) FROM bm_usage_records").fetchone()
            written_when_told.append(row[0])
            told.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(host(scope, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    async with client(host) as http:
        for _ in range(3):
            assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(told.wait(), 30)
    print("records written when the server was told the shutdown is complete:", written_when_told)
    assert written_when_told == [3]
    await asyncio.wait_for(task, 30)


async def test_a_host_app_whose_startup_fails_before_it_answers_fails_the_lifespan(
    tmp_path: Path,
) -> None:
    """A raw host app that reads the startup and raises before answering it (its own start
    failed): its error goes on to the server, nothing is answered for it (the server must not
    take it for started, nor for an app without a lifespan)."""

    async def host(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "lifespan.startup"
        raise RuntimeError("the app's database is away")

    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    sent: list[dict[str, Any]] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    app = BudgetMiddleware(host, settings)
    with pytest.raises(RuntimeError, match="database is away"):
        await asyncio.wait_for(app(scope, inbox.get, _append_to(sent)), 30)
    print("sent to the server:", sent)
    assert sent == []
    await get_engine(settings).shutdown()


def _append_to(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


@pytest.mark.parametrize(
    "entry",
    [
        {"input_per_mtok": 1e300, "output_per_mtok": 1},
        {"input_per_mtok": 1, "output_per_mtok": 1, "cached_input_per_mtok": 1e300},
    ],
    ids=["input", "cached_input"],
)
async def test_a_price_too_large_to_count_fails_the_lifespan_naming_the_entry(
    tmp_path: Path, entry: dict[str, float]
) -> None:
    """A price JSON holds as a finite number but that is no finite rate a token (1e300 $/Mtok:
    1e309 femto-dollars a token) is refused as any bad price is, naming the file and the entry,
    not an OverflowError from deep inside."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"gpt-4o": entry}}))
    host = Host(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", pricing_file=prices))
    answer = await startup(host.app)
    print("lifespan answer:", answer)
    assert answer["type"] == "lifespan.startup.failed"
    message = answer["message"]
    assert "BUDGET_PRICING_FILE" in message and "models.gpt-4o" in message
    assert "from 0 to 1e299" in message
    async with client(host.app) as http:
        with pytest.raises(PricingFileError, match=r"BUDGET_PRICING_FILE.*models\.gpt-4o"):
            await http.post("/v1/chat/completions", json=chat())


_ASGI_LIFESPAN = (
    "import asyncio\n"
    "async def main():\n"
    "    queue = [{'type': 'lifespan.startup'}, {'type': 'lifespan.shutdown'}]\n"
    "    async def receive(): return queue.pop(0)\n"
    "    async def send(m): pass\n"
    "    scope = {'type': 'lifespan', 'asgi': {'version': '3.0'}, 'state': {}}\n"
    "    await application(scope, receive, send)\n"
    "asyncio.run(main())\n"
)
_WSGI_FIRST_CALL = (
    "from werkzeug.test import Client\n"
    "answer = Client(application).get('/budget-admin/health')\n"
    "print(answer.status_code)\n"
)
_MOUNTS = {
    "Django's ASGI handler": (
        "examples/django_app",
        "from llmsite.asgi import application\n" + _ASGI_LIFESPAN,
        "admin API at /budget-admin",
    ),
    "Django's WSGI handler": (
        "examples/django_app",
        "from llmsite.wsgi import application\n" + _WSGI_FIRST_CALL,
        "admin API at /budget-admin",
    ),
    "Flask, DispatcherMiddleware": (
        "examples",
        "from flask_app import create_app\napplication = create_app()\n" + _WSGI_FIRST_CALL,
        "admin API at /budget-admin",
    ),
    "a bare ASGI app": (
        "examples",
        "from budget_middleware import BudgetMiddleware\n"
        "async def app(scope, receive, send): pass\n"
        "application = BudgetMiddleware(app)\n" + _ASGI_LIFESPAN,
        "admin API mount not known (an app whose routes cannot be read)",
    ),
}


@pytest.mark.parametrize("host", list(_MOUNTS))
def test_the_start_up_line_tells_where_the_admin_api_is_mounted(tmp_path: Path, host: str) -> None:
    """Under Django (ASGI and WSGI, `admin_urls("budget-admin/")` in the URL conf) the line
    said "no admin API mounted" with the admin API answering at /budget-admin; under WSGI
    (Django, Flask with werkzeug's DispatcherMiddleware) no line was written at all; and an app
    whose routes cannot be read was said to have no admin API. The line names the mount, or
    says it cannot know."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    where, code, expected = _MOUNTS[host]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env |= {"BUDGET_ADMIN_KEY": "x", "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / where)])}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=root / where, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("budget-middleware: store")]
    print(host, lines)
    assert lines == [
        f"budget-middleware: store sqlite:///{tmp_path}/s.db, counters in process "
        f"(no BUDGET_REDIS_URL), {expected}"
    ]


async def test_the_start_up_line_finds_an_admin_api_mounted_in_a_mounted_app(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`app.mount("/api", api)` with the admin API mounted in `api` at `/admin`: the line
    looked at the top router only and said "no admin API mounted"."""
    import logging

    from starlette.applications import Starlette
    from starlette.routing import Mount

    from budget_middleware import create_admin_app

    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/s.db", admin_key="x")
    api = Starlette(routes=[Mount("/admin", create_admin_app(settings))])
    app = Starlette(routes=[Route("/hello", lambda r: JSONResponse({})), Mount("/api", api)])
    app.add_middleware(BudgetMiddleware, settings=settings)
    with caplog.at_level(logging.INFO, logger="budget_middleware"):
        answer = await startup(app)
    lines = [r.getMessage() for r in caplog.records if "budget-middleware: store" in r.getMessage()]
    print(answer, lines)
    assert answer["type"] == "lifespan.startup.complete"
    assert len(lines) == 1 and lines[0].endswith(", admin API at /api/admin")
    await get_engine(settings).shutdown()


def test_the_start_up_line_reads_a_django_url_conf_that_runs_sync_code(tmp_path: Path) -> None:
    """Under Django's ASGI handler the URL conf was imported on the event loop to find the
    admin mount: a URL conf that runs the project's sync code as it loads (a query, anything
    Django marks `async_unsafe`) raised SynchronousOnlyOperation there, and the line said
    "admin API mount not known". It is read in a worker thread, as Django's handler would."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "syncurls.py").write_text(
        "from django.utils.asyncio import async_unsafe\n"
        "from budget_middleware.wsgi.django import admin_urls\n"
        "async_unsafe('a query as the URL conf loads')(lambda: None)()\n"
        'urlpatterns = [*admin_urls("budget-admin/")]\n'
    )
    (tmp_path / "syncsettings.py").write_text(
        "from llmsite.settings import *\nROOT_URLCONF = 'syncurls'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env |= {"BUDGET_ADMIN_KEY": "x", "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
            "DJANGO_SETTINGS_MODULE": "syncsettings",
            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "examples/django_app"),
                                           str(tmp_path)])}  # fmt: skip
    code = "from llmsite.asgi import application\n" + _ASGI_LIFESPAN
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("budget-middleware: store")]
    print(lines)
    assert len(lines) == 1 and lines[0].endswith(", admin API at /budget-admin")


def test_starts_from_loops_of_two_threads_at_once_start_the_engine_once(tmp_path: Path) -> None:
    """Two threads, each with a loop of its own (`asyncio.run`), start one engine at once, 10
    times, the first start slow. The start was guarded by an asyncio lock, which is one
    loop's: the second thread's wait was refused ("bound to a different event loop") or, let
    go from the other thread, never woken (waiting for ever). Now each returns, and the engine
    starts once a round."""
    from budget_middleware.engine.engine import BudgetEngine

    outcomes: list[str] = []
    started_counters = 0
    for trial in range(10):
        engine = BudgetEngine(BudgetSettings(database_url=f"sqlite:///{tmp_path}/s{trial}.db"))
        start = engine.counters.start
        first_in = threading.Event()

        async def slow_start(start: Any = start, first_in: threading.Event = first_in) -> None:
            nonlocal started_counters
            started_counters += 1
            first_in.set()
            await asyncio.sleep(0.1)
            await start()

        engine.counters.start = slow_start  # type: ignore[method-assign]

        both_back = threading.Event()

        def starter(
            engine: BudgetEngine = engine, hold: bool = False, both_back: Any = both_back
        ) -> None:
            async def begin() -> None:
                await engine.ensure_started()
                outcomes.append("started")
                if hold:  # the first's loop runs on (closed, the engine would start again)
                    await asyncio.get_running_loop().run_in_executor(None, both_back.wait, 10)

            try:
                asyncio.run(begin())
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

        first = threading.Thread(target=starter, kwargs={"hold": True}, daemon=True)
        first.start()
        first_in.wait(5)
        second = threading.Thread(target=starter, daemon=True)
        second.start()
        second.join(10)
        both_back.set()
        first.join(10)
        if first.is_alive() or second.is_alive():
            outcomes.append("waiting for ever")
        engine.store.dispose()
    print(f"10 rounds of 2 starts at once: {sorted(set(outcomes))}, {outcomes.count('started')} "
          f"returned, the counters started {started_counters} times")  # fmt: skip
    assert outcomes == ["started"] * 20 and started_counters == 10


def test_one_app_s_shutdown_in_its_own_loop_writes_what_the_shared_engine_holds(
    sqlite_url: str,
) -> None:
    """Two apps with equal settings share one engine (SPEC §2), each run by a test client of
    its own (an event loop in a thread of its own). The engine started in the first one's loop;
    the second one's lifespan shutdown raised "The future belongs to a different loop" (its
    client's exit too) and wrote none of its 3 charges; they are written now."""
    from fastapi.testclient import TestClient

    from support import host_app

    def settings() -> BudgetSettings:
        return BudgetSettings(database_url=sqlite_url, flush_interval_seconds=60)

    manager = get_engine(settings()).manager
    key = manager.create_virtual_key(name="k", budgets=[{"max_limit": 100}]).value
    first, second = TestClient(host_app(settings())), TestClient(host_app(settings()))
    with first:
        second.__enter__()
        for _ in range(3):
            answer = second.post("/v1/chat/completions", json=chat(), headers={"x-budget-key": key})
            assert answer.status_code == 200
        second.__exit__(None, None, None)
        written = manager.list_budgets()[0].current_usage
        print(f"3 admitted through the second app, written at its shutdown: {written} USD")
        assert written > 0
        answer = first.post("/v1/chat/completions", json=chat(), headers={"x-budget-key": key})
        assert answer.status_code == 200
    total = manager.list_budgets()[0].current_usage
    print(f"4 admitted, written at the last shutdown: {total} USD")
    assert total == pytest.approx(written * 4 / 3)


def test_an_engine_shut_down_by_a_later_asyncio_run_writes_and_raises_nothing(
    sqlite_url: str,
) -> None:
    """README: `await get_engine().shutdown()` writes what is pending. A script that ran its
    requests in one `asyncio.run` and shut the engine down in the next got "The future belongs
    to a different loop" from the engine's own shutdown."""
    from support import host_app

    settings = BudgetSettings(database_url=sqlite_url, flush_interval_seconds=60)
    engine = get_engine(settings)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 100}]).value
    app = host_app(settings)

    async def job() -> None:
        async with client(app) as http:
            answer = await http.post(
                "/v1/chat/completions", json=chat(), headers={"x-budget-key": key}
            )
            assert answer.status_code == 200

    asyncio.run(job())
    asyncio.run(engine.shutdown())
    spent = engine.manager.list_budgets()[0].current_usage
    print(f"1 admitted, in the store after the shutdown: {spent} USD")
    assert spent > 0 and not engine.started


FORKED_READS = """
import os, sys
from budget_middleware import BudgetSettings, get_manager

manager = get_manager(BudgetSettings(database_url=sys.argv[1]))
manager.create_virtual_key(name="seeded", budgets=[{"max_limit": 100}])  # at import, in the master
read, write = os.pipe()


def reads() -> int:
    failed = 0
    for _ in range(300):
        try:
            manager.list_budgets()
        except Exception:
            failed += 1
    return failed


child = os.fork()
if child == 0:
    os.write(write, str(reads()).encode())
    os._exit(0)
os.close(write)
mine = reads()
os.waitpid(child, 0)
print(mine, int(os.read(read, 100)))
"""


def test_workers_forked_from_a_master_that_seeded_the_store_have_connections_of_their_own(
    tmp_path: Path,
) -> None:
    """gunicorn --preload: the app module seeds its configuration through `get_manager()` at
    import (README: "a config seeded at import"), in the master, whose engine does not start.
    Its pooled PostgreSQL connections went to every forked worker, which then read and wrote
    on one server session at once: "server closed the connection", "can't change 'autocommit'
    now" (3 of 600 reads failed in a run, and a session's answers went to the wrong process)."""
    import subprocess
    import sys

    from conftest import POSTGRES_URL, need_postgres, reset_postgres

    need_postgres()
    reset_postgres()
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "forked.py"
    script.write_text(FORKED_READS)
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ran = subprocess.run(
        [sys.executable, str(script), POSTGRES_URL],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    parent, child = map(int, ran.stdout.split())
    print(f"reads failed after the fork: {parent} of 300 in the master, {child} of 300 in a worker")
    assert (parent, child) == (0, 0)


async def test_a_hook_that_is_not_callable_fails_the_lifespan_naming_it(sqlite_url: str) -> None:
    """`add_middleware(BudgetMiddleware, on_alert="https://hooks…")`: the TypeError came out of
    Starlette's middleware stack, built at lifespan startup, with no startup.failed answer;
    uvicorn (`--lifespan auto`) logged "ASGI 'lifespan' protocol appears unsupported", served
    on, and answered every request 500, `/health` included. It fails the start now."""
    from fastapi import FastAPI

    app = FastAPI()
    settings = BudgetSettings(database_url=sqlite_url)
    app.add_middleware(BudgetMiddleware, settings=settings, on_alert="https://hooks.example.com/x")
    answer = await startup(app)
    print(answer)
    assert answer["type"] == "lifespan.startup.failed"
    assert answer["message"] == "on_alert must be callable, got str"
