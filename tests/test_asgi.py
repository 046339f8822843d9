"""ASGI traps (PITFALLS): body replayed once, start-up failures, lazy start, shared stores."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from sqlmodel import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, BudgetSettings, SettingsError, get_engine
from budget_middleware.store.tables import UsageRecordRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat, client, engine_of, host_app, post_scope, running, serve_lifespan

# The raw scopes here say ASGI spec 2.4, as current uvicorn does (Starlette's streaming answers
# then leave disconnects to `send`).
_scope = functools.partial(post_scope, asgi={"version": "3.0", "spec_version": "2.4"})

Settings = Callable[..., BudgetSettings]


async def test_the_body_is_replayed_once_then_receive_is_the_real_one(
    make_settings: Settings,
) -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        seen.append(await receive())
        seen.append(await receive())  # waiting for a disconnect, as a streaming app does
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped = BudgetMiddleware(app, settings=make_settings())
    body = json.dumps(chat()).encode()
    parts = [body[:10], body[10:]]

    async def receive() -> dict[str, Any]:
        if parts:
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    async with running(wrapped):
        await asyncio.wait_for(wrapped(scope, receive, send), 2)
    assert seen[0] == {"type": "http.request", "body": body, "more_body": False}
    assert seen[1] == {"type": "http.disconnect"}


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_a_body_in_one_message_is_read_whatever_bytes_like_type_it_comes_as(
    make_settings: Settings, kind: type
) -> None:
    """A server that hands the body over as a bytearray or a memoryview (ASGI says bytes) is
    served as one that sends bytes: a memoryview raised AttributeError ('find') in the gate's
    media test, a 500 where the same request as bytes is answered."""
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        seen.append(bytes((await receive())["body"]))
        usage = {"prompt_tokens": 10, "completion_tokens": 5}
        answer = json.dumps({"model": "gpt-4o", "choices": [], "usage": usage}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    wrapped = BudgetMiddleware(app, settings=make_settings())
    picture = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    body = json.dumps(chat(messages=[{"role": "user", "content": [picture]}])).encode()
    messages = [{"type": "http.request", "body": kind(body), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope("/v1/chat/completions", [])
    async with running(wrapped):
        await asyncio.wait_for(wrapped(scope, receive, send), 5)
    print(kind.__name__, [m.get("status") for m in sent], seen == [body])
    assert sent[0]["status"] == 200 and seen == [body]


async def test_invalid_settings_stop_the_server_at_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUDGET_FLUSH_INTERVAL_SECONDS", "soon")
    app = Starlette()
    app.add_middleware(BudgetMiddleware)
    with pytest.raises(RuntimeError, match="BUDGET_FLUSH_INTERVAL_SECONDS"):
        async with running(app):
            pass
    with pytest.raises(SettingsError, match="BUDGET_FLUSH_INTERVAL_SECONDS"):
        BudgetSettings()


def test_database_urls_name_the_driver_we_ship_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    for plain in ("postgresql://u@db:5432/app", "postgres://u@db:5432/app"):
        assert BudgetSettings(database_url=plain).database_url == (
            "postgresql+psycopg://u@db:5432/app"
        )
    monkeypatch.setenv("BUDGET_DATABASE_URL", "postgresql+asyncpg://u@db/app")
    with pytest.raises(SettingsError, match=r"BUDGET_DATABASE_URL.*psycopg 3"):
        BudgetSettings()


async def test_sqlite_named_with_its_driver_is_a_store(tmp_path: Path) -> None:
    """`sqlite+pysqlite:///` is the same store as `sqlite:///` (SQLAlchemy's URL with the
    driver named): it was refused."""
    url = f"sqlite+pysqlite:///{tmp_path}/b.db"
    settings = BudgetSettings(database_url=url)
    app = host_app(settings)
    async with running(app), client(app) as http:
        key = engine_of(app).manager.create_virtual_key(name="k")
        answer = await http.post(
            "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key.value}"}
        )
        await engine_of(app).flush()
    assert answer.status_code == 200
    assert engine_of(app).manager.usage(group_by="virtual_key").total.requests == 1


async def test_a_bad_pricing_file_fails_at_startup_naming_it(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"gpt-4o": {"input_per_mtok": -1, "output_per_mtok": 1}}}')
    app = Starlette()
    app.add_middleware(
        BudgetMiddleware,
        settings=BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", pricing_file=prices),
    )
    with pytest.raises(RuntimeError, match="BUDGET_PRICING_FILE"):
        async with running(app):
            pass


async def test_without_a_lifespan_the_first_request_starts_the_engine(
    make_settings: Settings,
) -> None:
    async def completions(request: Request) -> JSONResponse:
        return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": []})

    settings = make_settings()
    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    assert not engine.started
    async with client(app) as http:  # httpx's ASGITransport sends no lifespan
        answer = await http.post("/v1/chat/completions", json=chat())
    assert answer.status_code == 200
    assert engine.started
    await engine.shutdown()
    assert engine.manager.usage(group_by="model").total.requests == 1


async def test_two_processes_on_one_store_add_their_charges_not_overwrite(
    sqlite_url: str, tmp_path: Path
) -> None:
    from support import host_app

    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 0, "output_per_mtok": 1}}})
    )
    # two engines on one store, as two processes would have (their settings differ slightly)
    first = host_app(
        BudgetSettings(database_url=sqlite_url, pricing_file=prices, flush_interval_seconds=0.05)
    )
    second = host_app(
        BudgetSettings(database_url=sqlite_url, pricing_file=prices, flush_interval_seconds=0.06)
    )
    engine_one = get_engine(first.user_middleware[0].kwargs["settings"])
    engine_two = get_engine(second.user_middleware[0].kwargs["settings"])
    assert engine_one is not engine_two
    async with running(first), running(second):
        key = engine_one.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 10, "reset_duration": "1d"}]
        )
        async with client(first) as one, client(second) as two:
            for index in range(20):
                http = one if index % 2 else two
                answer = await http.post(
                    "/v1/chat/completions",
                    json=chat(max_tokens=1000),
                    headers={"authorization": f"Bearer {key.value}"},
                )
                assert answer.status_code == 200
    budgets = engine_one.manager.list_budgets()
    assert budgets[0].current_usage == pytest.approx(20 * 0.001)
    assert engine_one.manager.usage(group_by="virtual_key").total.requests == 20


USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}


async def test_a_response_s_background_task_holds_no_slot_and_no_reservation(
    make_settings: Settings,
) -> None:
    """Starlette runs background tasks after the answer's last chunk, inside the app's call: the
    request is over for the client (SPEC §6: concurrency counts until the response ends)."""
    release = asyncio.Event()
    app = FastAPI()
    calls: list[int] = []

    @app.post("/v1/chat/completions")
    async def completions(tasks: BackgroundTasks) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:  # an email, an audit write: seconds after the answer
            tasks.add_task(release.wait)
        return {"id": "c1", "choices": [], "usage": USAGE}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice",
            rate_limit={"max_concurrent_requests": 1},
            budgets=[{"max_limit": 10, "reset_duration": "1d"}],
        )
        await engine.invalidate()
        body = json.dumps(chat(max_tokens=500)).encode()
        answered = asyncio.Event()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        auth = [(b"authorization", f"Bearer {key.value}".encode())]
        first = asyncio.create_task(app(_scope("/v1/chat/completions", auth), receive, send))
        await asyncio.wait_for(answered.wait(), 5)
        budget = engine.registry.windows["budget"][key.budgets[0].id]
        slots = engine.registry.concurrency[key.rate_limit.id]  # type: ignore[union-attr]
        during = (slots.in_flight, budget.reserved, budget.value)
        second = await http.post(
            "/v1/chat/completions",
            json=chat(),
            headers={"authorization": f"Bearer {key.value}"},
        )
        release.set()
        await asyncio.wait_for(first, 5)
        rows = engine.stats.admitted
    print(f"while the background task ran: in flight, reserved, spent = {during}")
    print(f"the next request: {second.status_code} {second.text[:80]}")
    assert during[:2] == (0, 0) and during[2] > 0  # settled when the answer ended
    assert second.status_code == 200
    assert rows == 2


async def test_a_file_the_server_sends_itself_is_read_for_its_usage(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A server that offers `http.response.pathsend` (Granian, Hypercorn) gets Starlette's
    `FileResponse` as a path, not as body chunks: a cached answer's usage is in that file."""
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps({"id": "c1", "choices": [], "usage": USAGE}))
    sent, measured = await _sent_as_a_file(make_settings(), answer, "application/json")
    print(f"sent: {sent}; charged (input, output, estimated): {measured}")
    assert sent == ["http.response.start", "http.response.pathsend"]
    assert measured == [(1000, 500, False)]


async def _sent_as_a_file(
    settings: Settings, answer: Path, media_type: str
) -> tuple[list[str], list[tuple[int, int, bool]]]:
    """A metered app answering with `FileResponse(answer)` to a server that offers
    `http.response.pathsend`: the kinds of message sent, and what was charged (input, output,
    estimated)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions() -> FileResponse:
        return FileResponse(answer, media_type=media_type)

    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(app)
    body = json.dumps(chat(max_tokens=500)).encode()
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    extensions = {"http.response.pathsend": {}}
    async with running(app):
        scope = _scope("/v1/chat/completions", [], extensions=extensions)
        await asyncio.wait_for(app(scope, receive, send), 5)
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow)))
    return sent, [(r.input_tokens, r.output_tokens, r.estimated) for r in rows]


def _sse_starlette_like(chunks: int) -> Callable[..., Any]:
    """An app that streams as sse-starlette's `EventSourceResponse` does: the events and a ping
    sent from two tasks at once, each awaiting `send` while the other may (PITFALLS)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        request = json.loads((await receive())["body"])
        usage_asked = (request.get("stream_options") or {}).get("include_usage") is True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        def event(data: dict[str, Any] | str) -> bytes:
            text = data if isinstance(data, str) else json.dumps(data)
            return b"data: " + text.encode() + b"\r\n\r\n"

        async def stream() -> None:
            for n in range(chunks):
                delta = {"choices": [{"index": 0, "delta": {"content": f"w{n} "}}]}
                await send({"type": "http.response.body", "body": event(delta), "more_body": True})
                await asyncio.sleep(0)
            if usage_asked:
                usage = {"prompt_tokens": 7, "completion_tokens": chunks}
                last = {"choices": [], "usage": usage}
                await send({"type": "http.response.body", "body": event(last), "more_body": True})
            await send({"type": "http.response.body", "body": event("[DONE]"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def ping() -> None:
            ping = {"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True}
            while True:
                await send(ping)
                await asyncio.sleep(0)

        pinging = asyncio.create_task(ping())
        try:
            await stream()
        finally:
            pinging.cancel()

    return app


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_stream_sent_from_two_tasks_is_passed_whole_and_charged_its_usage(
    make_settings: Settings, tmp_path: Path, backend: str
) -> None:
    """On Redis the settlement awaits: a ping sent by the other task while the last chunk's
    settlement waits on Redis must find the exchange settled already (its state set before the
    await), or the request is charged twice."""
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2}}})
    )
    overrides: dict[str, Any] = {"pricing_file": prices}
    prefix = unique_prefix()
    if backend == "redis":
        need_redis()
        overrides["redis_url"] = REDIS_URL
    wrapped = BudgetMiddleware(_sse_starlette_like(50), settings=make_settings(**overrides))
    engine = get_engine(wrapped.engine.settings)
    if backend == "redis":
        use_prefix(engine, prefix)
    try:
        await _two_tasks_stream(wrapped, engine)
    finally:
        if backend == "redis":
            delete_prefix(REDIS_URL, prefix)


async def _two_tasks_stream(wrapped: BudgetMiddleware, engine: Any) -> None:
    async with running(wrapped), client(wrapped) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(stream=True),  # no include_usage: the middleware asks, and removes it
            headers={"x-budget-key": key.value},
        )
        # The same through a server that takes (and drops) a send after the last chunk, as the
        # ping task may make one while the last chunk's settlement awaits.
        late: list[dict[str, Any]] = []

        async def take(message: dict[str, Any]) -> None:
            late.append(message)

        body = json.dumps(chat(stream=True)).encode()
        gone = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if gone:
                return gone.pop()
            await asyncio.Event().wait()  # the client stays
            raise AssertionError

        scope = _scope("/v1/chat/completions", [(b"x-budget-key", (key.value or "").encode())])
        await asyncio.wait_for(wrapped(scope, receive, take), 10)
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow)))
    events = [e for e in answer.text.split("\r\n\r\n") if e]
    data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    pings = [e for e in events if e == ": ping"]
    seen = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(f"{len(data)} chunks, {len(pings)} pings, records {seen}")
    assert [d["choices"][0]["delta"]["content"] for d in data] == [f"w{n} " for n in range(50)]
    assert pings  # the other task's sends went by too
    assert events[-1] == "data: [DONE]"
    budget = engine.manager.list_budgets(from_memory=True, counters=engine.registry)[0]
    print(f"spent ${budget.spent}, reserved {budget.reserved}")
    assert seen == [(7, 50, 7 * 1000 + 50 * 2000, False)] * 2
    assert budget.spent == pytest.approx(2 * 107000 / 1e9) and budget.reserved == 0


def test_building_the_middleware_touches_neither_the_store_nor_redis(tmp_path: Path) -> None:
    # Starlette builds its middleware stack on the first request, inside the event loop: the
    # middleware's __init__ must do no I/O (PITFALLS). A listening socket stands for Redis.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    database = tmp_path / "budget.db"
    app = FastAPI()
    app.add_middleware(
        BudgetMiddleware,
        settings=BudgetSettings(
            database_url=f"sqlite:///{database}", redis_url=f"redis://127.0.0.1:{port}/0"
        ),
    )
    app.build_middleware_stack()
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    finally:
        listener.close()
    print(f"store file made: {database.exists()}, Redis connected to: {connected}")
    assert not database.exists()
    assert not connected


async def test_a_context_variable_set_by_the_endpoint_is_seen_around_the_middleware(
    make_settings: Settings,
) -> None:
    # A pure ASGI middleware runs the app in the request's own task (BaseHTTPMiddleware does
    # not, and what the endpoint sets in a ContextVar is lost to the middleware around it).
    import contextvars

    handled_by: contextvars.ContextVar[str] = contextvars.ContextVar("handled_by", default="")
    app = host_app(make_settings())

    @app.post("/v1/marked/completions")
    async def marked() -> dict[str, Any]:
        handled_by.set("endpoint")
        return {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    seen: list[str] = []

    async def outer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        if scope["type"] == "http":
            seen.append(handled_by.get())

    async with running(app), client(outer) as http:
        answer = await http.post("/v1/marked/completions", json=chat())
    print("seen after the call:", seen)
    assert answer.status_code == 200
    assert seen == ["endpoint"]


async def test_an_app_that_fails_after_its_headers_gets_no_second_start_from_us(
    make_settings: Settings,
) -> None:
    # PITFALLS: after the headers have gone, a middleware can only pass on or stop; the error is
    # the server's to handle, and the request is settled as an upstream error.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunk = {"choices": [{"index": 0, "delta": {"content": "partial answer"}}]}
        body = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})
        raise RuntimeError("upstream went away")

    wrapped = BudgetMiddleware(app, settings=make_settings())
    sent: list[dict[str, Any]] = []
    body = json.dumps(chat(stream=True)).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope("/v1/chat/completions", [])
    engine = get_engine(wrapped.engine.settings)
    async with running(wrapped):
        with pytest.raises(RuntimeError, match="upstream went away"):
            await wrapped(scope, receive, send)
        await engine.flush()
        with engine.store.session() as s:
            rows = list(s.exec(select(UsageRecordRow)))
    kinds = [m["type"] for m in sent]
    print("sent:", kinds, "record:", [(r.outcome, r.estimated, r.output_tokens) for r in rows])
    assert kinds == ["http.response.start", "http.response.body"]
    assert [(r.outcome, r.estimated) for r in rows] == [("upstream_error", True)]


async def test_a_request_with_an_unknown_or_missing_key_is_answered_before_its_body_is_read(
    make_settings: Settings,
) -> None:
    """A client with no valid key could make the middleware read (and hold) a body of up to
    BUDGET_MAX_BODY_BYTES before it answered 401: the key is checked first, the body left
    unread; a known key's request is read and served as ever."""
    app = host_app(make_settings(require_virtual_key=True))
    engine = engine_of(app)
    chunk = json.dumps(chat()).encode()
    async with running(app):
        key = engine.manager.create_virtual_key(name="alice")
        await engine.invalidate()
        found: dict[str, tuple[int, int]] = {}
        for name, auth in (
            ("unknown", [(b"authorization", b"Bearer sk-bm-not-a-key")]),
            ("missing", []),
            ("known", [(b"authorization", f"Bearer {key.value}".encode())]),
        ):
            read = 0
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                nonlocal read
                read += 1
                return {"type": "http.request", "body": chunk, "more_body": False}

            async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            await asyncio.wait_for(app(_scope("/v1/chat/completions", auth), receive, send), 5)
            found[name] = (sent[0]["status"], read)
    print(found)
    assert found == {"unknown": (401, 0), "missing": (401, 0), "known": (200, 1)}


def _served_by_two_loops(
    settings: Callable[[], BudgetSettings], key: str, requests: int
) -> tuple[Counter[int], list[str]]:
    """Two apps of equal settings (one engine), each served by a Starlette test client of its
    own (an event loop in a thread of its own), open together; `requests` metered requests
    sent through both at once, 8 at a time. Their statuses, and what the servers raised (their
    lifespan's shutdown too)."""
    from fastapi.testclient import TestClient

    first = TestClient(host_app(settings()), raise_server_exceptions=False)
    second = TestClient(host_app(settings()), raise_server_exceptions=False)
    statuses: Counter[int] = Counter()
    raised: list[str] = []
    lock = threading.Lock()

    def post(number: int) -> None:
        http = (first, second)[number % 2]
        answer = http.post("/v1/chat/completions", json=chat(), headers={"x-budget-key": key})
        with lock:
            statuses[answer.status_code] += 1
            if answer.status_code == 500:
                raised.append(answer.text[:200])

    with first:
        second.__enter__()
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, range(requests)))
        finally:
            try:
                second.__exit__(None, None, None)
            except Exception as exc:  # its shutdown, on its loop: what the test reports
                raised.append(f"at the second's shutdown: {exc!r}"[:200])
    return statuses, raised


def _charged(settings: BudgetSettings) -> tuple[int, float, float]:
    """The requests charged in the store (usage records), their cost, and the budget's spend."""
    manager = get_engine(settings).manager
    total = manager.usage().total
    return total.requests, total.cost, manager.list_budgets()[0].current_usage


def test_two_loops_serving_one_redis_engine_admit_and_charge_every_request(
    make_settings: Settings,
) -> None:
    """README (it was a known gap): with BUDGET_REDIS_URL, two apps of equal settings (one
    engine) served at once by two event loops of one process (two test clients open together;
    an app served from another thread) failed metered requests with 500 ("attached to a
    different loop": the engine's Redis connections are its loop's; 15 and 20 of 40 in two
    runs), and those were not charged. The second loop's requests are now decided, admitted
    and settled on the engine's loop, as the outbound transports and the WSGI middleware hand
    theirs: every one answered and charged once."""
    need_redis()
    prefix = unique_prefix()
    use_prefix(get_engine(make_settings(redis_url=REDIS_URL)), prefix)
    manager = get_engine(make_settings(redis_url=REDIS_URL)).manager
    key = manager.create_virtual_key(name="k", budgets=[{"max_limit": 100}]).value
    try:
        statuses, raised = _served_by_two_loops(lambda: make_settings(redis_url=REDIS_URL), key, 40)
        charged, cost, spent = _charged(make_settings(redis_url=REDIS_URL))
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(f"40 requests through two loops: {dict(statuses)}; admitted {statuses[200]}, "
          f"charged {charged} (${cost:.6f}, budget ${spent:.6f}), 500s {statuses[500]} "
          f"{raised[:1]}")  # fmt: skip
    assert statuses == {200: 40} and not raised
    assert charged == 40 and spent == pytest.approx(cost) and cost > 0


def test_two_loops_serving_one_in_process_engine_never_pass_its_limit(
    make_settings: Settings,
) -> None:
    """The same without Redis (in-process counters): two loops of two threads reading a key
    at once shared one store read, an asyncio future of the loop that began it, and the other
    loop's requests failed 500 ("attached to a different loop"; 33 and 34 of 300 in two runs
    with a short cache TTL, a read each TTL). Every admission and settlement now runs on
    the engine's loop: a hard cap of 100 requests admits 100 of 300 sent through both loops,
    each charged once, and the rest are refused 429."""
    settings = functools.partial(make_settings, cache_ttl_seconds=0.05)
    manager = get_engine(settings()).manager
    key = manager.create_virtual_key(
        name="k",
        budgets=[{"max_limit": 100}],
        rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"},
    ).value
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: a race made likely
    try:
        statuses, raised = _served_by_two_loops(settings, key, 300)
    finally:
        sys.setswitchinterval(switch)
    charged, cost, spent = _charged(settings())
    print(f"300 requests through two loops, a cap of 100: {dict(statuses)}; admitted "
          f"{statuses[200]}, charged {charged} (${cost:.6f}, budget ${spent:.6f}), "
          f"500s {statuses[500]} {raised[:1]}")  # fmt: skip
    assert statuses == {200: 100, 429: 200} and not raised
    assert charged == 100 and spent == pytest.approx(cost) and cost > 0


def test_a_stream_served_on_a_second_loop_is_charged_once(make_settings: Settings) -> None:
    """A streamed answer (Starlette's `StreamingResponse`, which listens for the client's
    disconnect beside the stream) served on a loop other than its engine's: its last chunk
    settles it on the engine's loop; the test client then says the client left, Starlette
    cancels the stream's task while that settlement is on its way there, and the middleware
    saw it unsettled and settled it a second time. Each stream is charged once."""
    from fastapi.testclient import TestClient

    settings = functools.partial(make_settings, redis_url=REDIS_URL)
    need_redis()
    prefix = unique_prefix()
    use_prefix(get_engine(settings()), prefix)
    manager = get_engine(settings()).manager
    key = manager.create_virtual_key(name="k", budgets=[{"max_limit": 100}]).value
    first = TestClient(host_app(settings()), raise_server_exceptions=False)
    second = TestClient(host_app(settings()), raise_server_exceptions=False)
    statuses: Counter[int] = Counter()
    try:
        with first, second:
            for _ in range(30):
                answer = second.post(
                    "/v1/chat/completions",
                    json=chat(stream=True),
                    headers={"x-budget-key": key},
                )
                statuses[answer.status_code] += 1
        charged, cost, spent = _charged(settings())
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(f"30 streams through the second loop: {dict(statuses)}; usage records {charged} "
          f"(${cost:.6f}), budget ${spent:.6f}")  # fmt: skip
    assert statuses == {200: 30}
    assert charged == 30 and spent == pytest.approx(cost)


@pytest.mark.parametrize(
    ("path", "model", "asked"),
    [
        ("/v1/chat/completions", "openai/gpt-4o", True),
        ("/v1/messages", "anthropic/claude-3-5-haiku-latest", False),
        ("/v1/responses", "openai/gpt-4o", False),
    ],
)
async def test_only_an_openai_style_stream_reaches_the_app_asked_for_its_usage(
    make_settings: Settings, path: str, model: str, asked: bool
) -> None:
    """README: a stream that does not ask for its usage is sent with
    `stream_options.include_usage` on `/chat/completions` and `/completions`. Anthropic's
    Messages API and OpenAI's Responses API have no such field (Anthropic answers 400 to a body
    that carries it): a stream sent there reaches the app as the client wrote it."""
    seen: list[bytes] = []
    app = FastAPI()

    @app.post("/{rest:path}")
    async def catch_all(rest: str, request: Request) -> dict[str, Any]:
        seen.append(await request.body())
        return {}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    body = json.dumps(chat(model, stream=True)).encode()
    async with running(app), client(app) as http:
        answer = await http.post(path, content=body, headers={"content-type": "application/json"})
    got = json.loads(seen[0])
    print(f"{path}: {answer.status_code}; the app got stream_options {got.get('stream_options')}")
    assert answer.status_code == 200
    if asked:
        assert got["stream_options"] == {"include_usage": True}
    else:
        assert seen[0] == body


async def test_an_event_stream_the_server_sends_itself_is_read_to_its_last_event(
    make_settings: Settings, tmp_path: Path
) -> None:
    """An event stream sent as a file (`http.response.pathsend`) is read a MiB at a time as one
    stream: an event across the first MiB's end is read whole, and its last event, without a
    blank line after it, too. A mutation run's survivors: each MiB read as the answer's last
    chunk, or the file's end never told, lost that usage: charged an estimate."""
    usage = json.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
    )
    answer = tmp_path / "answer.sse"
    answer.write_bytes(b": " + b"p" * ((1 << 20) - 40) + b"\n\n" + b"data: " + usage.encode())
    _, measured = await _sent_as_a_file(make_settings(), answer, "text/event-stream")
    print(f"a {answer.stat().st_size}-byte event stream sent as a file: charged {measured}")
    assert measured == [(1000, 500, False)]


async def test_a_last_body_message_without_more_body_ends_the_body(
    make_settings: Settings,
) -> None:
    """`more_body` is optional in ASGI and False when absent: a body in two messages whose last
    one leaves it out is read whole, metered and served, not waited on until a disconnect."""
    app = host_app(make_settings())
    body = json.dumps(chat()).encode()
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:]},  # no "more_body": the last one
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with running(app):
        await asyncio.wait_for(app(_scope("/v1/chat/completions"), receive, send), 5)
        await engine_of(app).flush()
    print("status:", sent[0]["status"] if sent else None)
    assert sent[0]["status"] == 200
    assert engine_of(app).manager.usage().total.requests == 1


async def test_an_engine_failing_at_one_app_s_start_stops_every_app_it_serves(
    tmp_path: Path,
) -> None:
    """Two apps of equal settings share one engine: when its start fails at the second's
    lifespan (its config file broken since), the first one, built before, raises that error
    on every request too, its plain routes as well, as the second does; and so does a third
    built after the failure, lifespan or not."""
    config = tmp_path / "budgets.yaml"
    config.write_text("teams:\n  - name: research\n")

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    def app() -> BudgetMiddleware:
        settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", config_file=config)
        return BudgetMiddleware(Starlette(routes=[Route("/hello", hello)]), settings=settings)

    first, second = app(), app()
    assert first.engine is second.engine
    config.write_text("teams: [")
    with pytest.raises(RuntimeError, match="BUDGET_CONFIG_FILE"):
        async with running(second):
            pass
    third = app()  # on the engine that failed: it fails from the start
    raised = []
    for middleware in (first, second, third):
        async with client(middleware) as http:
            with pytest.raises(Exception, match="BUDGET_CONFIG_FILE") as error:
                await http.get("/hello")
            raised.append(type(error.value).__name__)
    print("GET /hello on the first, the second and the third app raised:", raised)


def test_apps_built_again_and_again_on_one_engine_leave_no_listener_behind(tmp_path: Path) -> None:
    """A test suite's app factory builds the middleware once a test, on one engine (equal
    settings): each keeps a weak reference to be told of the engine's failure, and the ones
    of the apps since dropped are let go as the next is built, not kept for the process."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    engine = get_engine(settings)
    for _ in range(200):
        BudgetMiddleware(Starlette(), settings=settings)
    kept = BudgetMiddleware(Starlette(), settings=settings)
    listeners = engine.failure_listeners
    print("listeners kept after 201 apps, one still alive:", len(listeners))
    assert kept.engine is engine
    assert len(listeners) <= 2


async def test_a_stream_that_asked_for_its_usage_reaches_the_app_with_the_codings_accepted(
    make_settings: Settings,
) -> None:
    """Only a stream whose usage chunk is cut out is asked of the app in clear: a stream that
    asked for its usage itself keeps the client's `accept-encoding: gzip`."""
    seen: list[str] = []

    async def completions(request: Request) -> JSONResponse:
        seen.append(request.headers.get("accept-encoding", ""))
        return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": []})

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app.add_middleware(BudgetMiddleware, settings=make_settings())
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(stream=True, stream_options={"include_usage": True}),
            headers={"accept-encoding": "gzip"},
        )
    print("status:", answer.status_code, "accept-encoding the app saw:", seen)
    assert answer.status_code == 200
    assert seen == ["gzip"]
