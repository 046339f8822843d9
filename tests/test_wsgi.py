"""The WSGI adapter (SPEC §15), in process: Flask's and Django's own test clients, werkzeug's
client around Django's WSGI app, threads. Real servers are in test_wsgi_servers.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask, Response, request, send_file
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from werkzeug.test import Client

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.engine.portal import on_loop, shut_down_engines
from budget_middleware.wsgi import BudgetWSGIMiddleware, budget_state, create_admin_wsgi_app
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, private_redis, unique_prefix
from support import (
    CALL_NANOS,
    CALL_OUTPUT,
    Meeting,
    call_priced,
    meet_between_check_and_reservation,
    meet_inside_a_budget_s_charge,
    running,
    set_up_django_example,
)

Settings = Callable[..., BudgetSettings]
ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"authorization": "Bearer admin-secret"}

# A fixed OpenAI answer: 26 + 20 tokens of gpt-4o-mini ($0.15 and $0.60 a million) = $0.0000159.
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 26, "completion_tokens": 20, "total_tokens": 46},
    }
).encode()
PRICE_NANOS = 15_900


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 64,
        **extra,
    }


def posted(body: bytes, key: str, **extra: Any) -> dict[str, Any]:
    """A raw WSGI environ: `body` posted to the chat path with this virtual key."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/chat/completions",
        "SCRIPT_NAME": "",
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": f"Bearer {key}",
        **extra,
    }


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


class Sent(io.RawIOBase):
    """What a client sends (`data`), counted as the app reads it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.read_bytes, self.reads = memoryview(data), 0, 0

    def read(self, size: int = -1) -> bytes:
        n = len(self.data) if size < 0 else min(size, len(self.data))
        out, self.data = bytes(self.data[:n]), self.data[n:]
        self.read_bytes += n
        self.reads += 1
        return out


@pytest.fixture(autouse=True)
def _engines_shut_down() -> Iterator[None]:
    """The engines a test started in the background loop are shut down when it ends."""
    yield
    shut_down_engines()


def flask_host(settings: BudgetSettings | None, **hooks: Any) -> Flask:
    """A Flask app: the fixed completion, a stream that counts what it has produced, an app
    error mid-stream; with the middleware unless `settings` is None."""
    app = Flask(__name__)
    app.config["produced"] = []

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        body = request.get_json(force=True)
        if not body.get("stream"):
            return Response(COMPLETION, content_type="application/json")
        produced: list[int] = app.config["produced"]
        words = int(request.headers.get("x-words", "5"))
        fail = request.headers.get("x-fail-after")

        def events() -> Iterator[bytes]:
            base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
            for i in range(words):
                if fail is not None and i == int(fail):
                    raise RuntimeError("upstream cut")
                produced.append(i)
                delta = {"content": f"word{i} "}
                yield b"data: " + json.dumps({**base, "choices": [{"delta": delta}]}).encode()
                yield b"\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 26, "completion_tokens": words}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return Response(events(), content_type="text/event-stream")

    @app.post("/v1/state/completions")
    def state() -> dict[str, Any]:
        found = budget_state(request.environ)
        assert found is not None
        return {**found._asdict(), "tags": list(found.tags)}

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    if settings is not None:
        app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings, **hooks)  # type: ignore[method-assign]
    return app


def engine_of(app: Flask) -> BudgetEngine:
    wrapped: BudgetWSGIMiddleware = app.wsgi_app  # type: ignore[assignment]
    return wrapped.engine


def records(engine: BudgetEngine) -> list[dict[str, Any]]:
    on_loop(engine, engine.flush)
    with engine.store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT virtual_key_id, provider, model, input_tokens, output_tokens, cost_nanos,"
                " streamed, outcome, estimated, status, direction FROM bm_usage_records"
                " ORDER BY id"
            )
        )
        return [dict(r._mapping) for r in rows]


# -- the same answers as the ASGI middleware -----------------------------------------------------


def _scenario(manager: Any) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Keys in every state of §5, and the requests that meet them (in order)."""
    plain = manager.create_virtual_key(
        name="plain",
        budgets=[{"max_limit": 5, "reset_duration": "1d"}],
        rate_limit={"request_max_limit": 100, "request_reset_duration": "1h",
                    "token_max_limit": 10_000, "token_reset_duration": "1d"},
    ).value  # fmt: skip
    inactive = manager.create_virtual_key(name="inactive", is_active=False).value
    anthropic_only = manager.create_virtual_key(
        name="anthropic-only", provider_configs=[{"provider": "anthropic", "allowed_models": ["*"]}]
    ).value
    tiny = manager.create_virtual_key(name="tiny", budgets=[{"max_limit": 0.000000000001}]).value
    one = manager.create_virtual_key(
        name="one-a-minute", rate_limit={"request_max_limit": 1, "request_reset_duration": "1m"}
    ).value
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    return [
        ("unknown key", chat(), bearer("sk-bm-nobody")),
        ("inactive key", chat(), bearer(inactive)),
        ("provider not allowed", chat(), bearer(anthropic_only)),
        ("first of a tiny budget", chat(), bearer(tiny)),
        ("exhausted budget", chat(), bearer(tiny)),
        ("first of one a minute", chat(), bearer(one)),
        ("rate limited", chat(), bearer(one)),
        ("admitted, with headers", chat(), bearer(plain)),
        ("too large", chat(**big), bearer(plain)),
        ("model not priced", chat(model="openai/no-such-model"), bearer(plain)),
    ]


def _normal(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """An answer with what must differ between two stores blanked: ids, times."""
    kept = {
        name.lower(): ("<t>" if "reset" in name.lower() or "retry-after" in name.lower() else v)
        for name, v in headers.items()
        if name.lower() not in ("date", "server", "content-length")
    }
    body = re.sub(rb'"id": ?"[0-9a-f]{32}"', b'"id": "<id>"', body)
    # a window's reset time, in a message: the two calls may fall in different seconds
    body = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b"<time>", body)
    return {"status": status, "headers": kept, "body": body.decode()}


def test_answers_codes_and_headers_are_the_asgi_middleware_s(
    make_settings: Settings, tmp_path: Path
) -> None:
    """Every check of §5 and §8 met through both adapters, against the same upstream answer:
    statuses, error bodies and headers are the same."""
    options = {"max_body_bytes": 4096, "unpriced_models": "refuse"}
    wsgi_app = flask_host(make_settings(**options))
    asgi_settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/asgi.db", admin_key="admin-secret", **options
    )

    async def upstream(request: Request) -> StarletteResponse:
        await request.body()
        return StarletteResponse(COMPLETION, media_type="application/json")

    asgi_app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", upstream, methods=["POST"])]),
        settings=asgi_settings,
    )

    wsgi_cases = _scenario(engine_of(wsgi_app).manager)
    client = wsgi_app.test_client()
    through_wsgi = []
    for _, body, headers in wsgi_cases:
        answer = client.post("/v1/chat/completions", json=body, headers=headers, buffered=True)
        through_wsgi.append(_normal(answer.status_code, dict(answer.headers), answer.data))

    async def through_asgi() -> list[dict[str, Any]]:
        out = []
        async with running(asgi_app):
            cases = _scenario(get_engine(asgi_settings).manager)
            transport = httpx.ASGITransport(asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for _, body, headers in cases:
                    answer = await c.post("/v1/chat/completions", json=body, headers=headers)
                    out.append(_normal(answer.status_code, dict(answer.headers), answer.content))
        return out

    by_asgi = asyncio.run(through_asgi())
    for (name, _, _), wsgi_answer, asgi_answer in zip(
        wsgi_cases, through_wsgi, by_asgi, strict=True
    ):
        code = json.loads(wsgi_answer["body"]).get("error", {}).get("code", "")
        print(f"{name}: {wsgi_answer['status']} {code}")
        assert wsgi_answer == asgi_answer, name
    statuses = [a["status"] for a in through_wsgi]
    assert statuses == [401, 403, 403, 200, 402, 200, 429, 200, 413, 403]
    assert through_wsgi[4]["headers"]["x-should-retry"] == "false"
    assert through_wsgi[6]["headers"]["retry-after"] == "<t>"
    admitted = through_wsgi[7]["headers"]
    assert admitted["x-ratelimit-limit-requests"] == "100"
    assert admitted["x-ratelimit-remaining-requests"] == "99"
    assert admitted["x-budget-limit"] == "5.000000"


def test_a_proxy_s_own_limit_headers_give_way_to_ours_never_doubled(
    make_settings: Settings,
) -> None:
    """As through the ASGI middleware (test_middleware.py): the app's `x-ratelimit-*` and
    `x-budget-*` headers of a kind we set are replaced by ours, the others pass on."""
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def proxied() -> Response:
        return Response(
            COMPLETION,
            content_type="application/json",
            headers={
                "X-RateLimit-Remaining-Requests": "9999",
                "x-budget-remaining": "123.000000",
                "x-ratelimit-remaining-tokens": "29999990",
            },
        )

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    manager = engine_of(app).manager
    key = manager.create_virtual_key(
        name="alice",
        rate_limit={"request_max_limit": 10, "request_reset_duration": "1h"},
        budgets=[{"max_limit": 5, "reset_duration": "1d"}],
    )
    answer = app.test_client().post(
        "/v1/chat/completions", json=chat(), headers=bearer(key.value or "")
    )
    seen = {
        name: answer.headers.getlist(name)
        for name in (
            "x-ratelimit-remaining-requests",
            "x-budget-remaining",
            "x-ratelimit-remaining-tokens",
        )
    }
    print(seen)
    assert seen == {
        "x-ratelimit-remaining-requests": ["9"],
        "x-budget-remaining": ["5.000000"],
        "x-ratelimit-remaining-tokens": ["29999990"],
    }


# -- streams, close(), errors ---------------------------------------------------------------------


def test_a_tag_with_limits_after_256_others_is_met(make_settings: Settings) -> None:
    """`x-budget-tags` sent on two lines, which the WSGI server joins: the client's 256 tags,
    then a gateway's tag with a $0 budget. It was not read: served, against none of its limits."""
    app = flask_host(make_settings())
    engine = engine_of(app)
    engine.manager.put_tag("capped", budgets=[{"max_limit": 0, "reset_duration": "1d"}])
    key = engine.manager.create_virtual_key(name="k")
    joined = ",".join(["a"] * 256) + ",capped"  # as gunicorn and werkzeug join the two lines
    answer = Client(app).post(
        "/v1/chat/completions",
        json=chat(),
        headers={**bearer(key.value), "x-budget-tags": joined},
    )
    print(f"tag 'capped' ($0 budget) after 256 others: {answer.status_code}")
    assert answer.status_code == 402
    assert answer.json["error"]["scope"]["name"] == "capped"


def test_a_get_flask_serves_as_post_by_a_method_override_is_metered(
    make_settings: Settings,
) -> None:
    """Flask's docs' `HTTPMethodOverrideMiddleware`, installed inside the middleware: `GET` with
    `X-HTTP-Method-Override: POST` reaches the POST view. It passed unmetered: served past an
    exhausted budget (200 after a 402) at $0."""

    class HTTPMethodOverrideMiddleware:
        allowed_methods = frozenset(["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"])

        def __init__(self, app: Any) -> None:
            self.app = app

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            method = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE", "").upper()
            if method in self.allowed_methods:
                environ["REQUEST_METHOD"] = method
            return self.app(environ, start_response)

    app = flask_host(None)
    app.wsgi_app = HTTPMethodOverrideMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    engine = engine_of(app)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 0.000001}])
    headers = {**bearer(key.value), "x-http-method-override": "POST"}
    http = Client(app)
    statuses = [
        http.open("/v1/chat/completions", method=method, json=chat(), headers=headers).status_code
        for method in ("POST", "GET")
    ]
    charged = engine.registry.windows["budget"][key.budgets[0].id].value
    print(f"(POST, GET + override): {statuses}; charged {charged} nano-USD of a 1,000 budget")
    assert statuses == [200, 402]


def test_a_stream_passes_chunk_by_chunk_and_is_metered_from_its_last_chunk(
    make_settings: Settings,
) -> None:
    app = flask_host(make_settings())
    produced: list[int] = app.config["produced"]
    answer = app.test_client().post(
        "/v1/chat/completions", json=chat(stream=True), headers={"x-words": "40"}, buffered=False
    )
    chunks = answer.response
    first = next(iter(chunks))
    produced_at_first = len(produced)
    body = first + b"".join(chunks)
    answer.close()
    rows = records(engine_of(app))
    print(f"first chunk after {produced_at_first} of 40 words; record {rows}")
    assert produced_at_first == 1 and len(produced) == 40  # not buffered
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")  # the chunk it asked for
    assert len(rows) == 1
    row = rows[0]
    assert (row["streamed"], row["outcome"], row["estimated"]) == (True, "completed", False)
    assert (row["input_tokens"], row["output_tokens"]) == (26, 40)


def test_a_stream_flask_sends_as_text_html_is_read_as_the_stream_it_is(
    make_settings: Settings,
) -> None:
    """Flask's `Response(generator)` says `text/html; charset=utf-8` unless told. The SDKs read
    the stream they asked for whatever its type says; it was read as JSON: the usage chunk we
    asked for reached a client that had not asked (`choices: []`, which breaks
    `chunk.choices[0]`), and an estimate of the prompt was charged, no output, for 26 in, 3 out."""
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        body = request.get_json(force=True)
        base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}

        def events() -> Iterator[bytes]:
            for word in ("one ", "two ", "three"):
                chunk = {**base, "choices": [{"index": 0, "delta": {"content": word}}]}
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 26, "completion_tokens": 3}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return Response(events())  # text/html: Flask's default

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    answer = app.test_client().post("/v1/chat/completions", json=chat(stream=True))
    body = answer.get_data()
    answer.close()
    rows = records(engine_of(app))
    charged = [(r["input_tokens"], r["output_tokens"], bool(r["estimated"])) for r in rows]
    print(answer.headers["content-type"], "expected (26, 3, False), charged", charged)
    assert answer.headers["content-type"].startswith("text/html")
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")
    assert charged == [(26, 3, False)]


def test_close_before_the_end_is_a_disconnect_settled_once(make_settings: Settings) -> None:
    """The server gives up (a client gone): `close()` settles, once, whatever comes after; the
    slot and the reservation are free again."""
    app = flask_host(make_settings())
    engine = engine_of(app)
    key = engine.manager.create_virtual_key(
        name="alice",
        budgets=[{"max_limit": 1}],
        rate_limit={"max_concurrent_requests": 1},
    )
    client = app.test_client()
    answer = client.post(
        "/v1/chat/completions",
        json=chat(stream=True),
        headers={**bearer(key.value), "x-words": "50"},
        buffered=False,
    )
    iterator = iter(answer.response)
    next(iterator), next(iterator)
    busy = client.post(
        "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
    )
    answer.close()
    answer.close()
    after = client.post(
        "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
    )
    rows = records(engine)
    budget = engine.registry.counter("budget", key.budgets[0].id)
    print(f"while streaming: {busy.status_code}; after close: {after.status_code}; {rows}")
    assert busy.status_code == 429 and busy.json["error"]["code"] == "concurrency_limit_exceeded"
    assert after.status_code == 200
    assert [r["outcome"] for r in rows] == ["client_disconnected", "completed"]
    assert bool(rows[0]["estimated"]) and rows[0]["output_tokens"] > 0
    assert budget is not None and budget.reserved == 0


def test_a_json_answer_given_up_midway_is_read_to_its_end_for_its_usage(
    make_settings: Settings,
) -> None:
    """An app that passes a provider's JSON on in pieces; the server gives up after the first
    (a client gone). The provider made and bills all of it: the rest is read for its usage and
    charged (the prompt alone, estimated, was charged before). A stream given up is not read on:
    it is estimated (the test above)."""
    host = Flask(__name__)
    pieces = [COMPLETION[:20], COMPLETION[20:60], COMPLETION[60:]]
    passed: list[int] = []

    @host.post("/v1/chat/completions")
    def proxied() -> Response:
        def relay() -> Iterator[bytes]:
            for n, piece in enumerate(pieces):
                passed.append(n)
                yield piece

        return Response(relay(), content_type="application/json")

    settings = make_settings()
    host.wsgi_app = BudgetWSGIMiddleware(host.wsgi_app, settings)  # type: ignore[method-assign]
    engine = get_engine(settings)
    key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1}])
    answer = host.test_client().post(
        "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=False
    )
    next(iter(answer.response))
    answer.close()  # given up after the first piece
    rows = records(engine)
    print(f"pieces passed: {passed}; record {rows}")
    assert passed == [0, 1, 2]
    assert [
        (r["outcome"], r["input_tokens"], r["output_tokens"], r["estimated"]) for r in rows
    ] == [("client_disconnected", 26, 20, 0)]
    assert rows[0]["cost_nanos"] == PRICE_NANOS


def _length_said(make_settings: Settings, app: Any) -> tuple[BudgetWSGIMiddleware, str]:
    """`app` behind the middleware, and a key of one request in flight."""
    middleware = BudgetWSGIMiddleware(app, make_settings())
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 10}], rate_limit={"max_concurrent_requests": 1}
    )
    return middleware, key.value or ""


def _in_flight(engine: BudgetEngine) -> int:
    return sum(slots.in_flight for slots in engine.registry.concurrency.values())


def _served_at_length(
    make_settings: Settings, pieces: list[bytes], length: int, how: str
) -> tuple[BudgetEngine, list[bytes], list[int], list[tuple[str, int, int]]]:
    """An app that says `length` bytes and gives `pieces` (by its iterable, or `write()`),
    served once: its engine, what the server got, the slots in flight as the chunk that
    reaches the length went to the server, and each record's (outcome, estimated, cost)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "application/json"),
                                          ("Content-Length", str(length))])  # fmt: skip
        if how == "iterable":
            return iter(pieces)
        for piece in pieces:
            write(piece)
        return iter([])

    middleware, key = _length_said(make_settings, app)
    engine = middleware.engine
    sent: list[bytes] = []
    held: list[int] = []

    def send(data: bytes) -> None:  # the server's: its client has its answer once it is sent
        if sum(map(len, sent)) < length <= sum(map(len, sent)) + len(data):
            held.append(_in_flight(engine))
        sent.append(data)

    answer: Any = middleware(posted(json.dumps(chat()).encode(), key), lambda *_: send)
    for chunk in answer:
        send(chunk)
    answer.close()
    charged = [(r["outcome"], r["estimated"], r["cost_nanos"]) for r in records(engine)]
    return engine, sent, held, charged


@pytest.mark.parametrize("said", ["its length", "100 bytes"])
@pytest.mark.parametrize("how", ["iterable", "write"])
def test_an_answer_is_settled_as_its_content_length_completes_unless_cut_short_there(
    make_settings: Settings, how: str, said: str
) -> None:
    """The answer is settled as the bytes that complete its `Content-Length` go to the server
    (its client may call again at once, before the app returns or the server asks for more),
    and charged what it reports. Given by `write()`, its slot was still held then (the length
    counted only the iterable's chunks). An app that says 100 bytes and gives the 228 of its
    JSON (its usage past byte 100) in two chunks, the first ending at byte 100, was settled
    there as JSON cut short, charged its most output (43,500 nano-USD), where one chunk across
    the length was read on (15,900: `test_answers.py`): JSON cut short at its length is read on
    to the app's end, and whole JSON settled there as before."""
    length = len(COMPLETION) if said == "its length" else 100
    cut = 50 if said == "its length" else 100
    pieces = [COMPLETION[:cut], COMPLETION[cut:]]
    engine, _, held, charged = _served_at_length(make_settings, pieces, length, how)
    print(f"{how}, {said}: slots held as its length was sent {held}; records {charged}")
    assert held == ([0] if said == "its length" else [1])  # cut short there: read on
    assert charged == [("completed", 0, PRICE_NANOS)]
    assert _in_flight(engine) == 0


@pytest.mark.parametrize("usage", ["asked", "added by the middleware"])
@pytest.mark.parametrize("how", ["iterable", "write"])
def test_a_stream_is_settled_as_its_done_goes(
    make_settings: Settings, how: str, usage: str
) -> None:
    """A stream with no Content-Length is settled as its `[DONE]` event goes to the server:
    its client has its answer then (the OpenAI SDK stops reading at it and may call again at
    once, before the server asks the app for more), and is charged what it reports, 26 in and
    5 out (6,900 nano-USD). Its slot was held until the app's generator ended: a key of one
    request in flight had the next call refused 429 meanwhile (under gunicorn and waitress,
    test_wsgi_servers.py). What the app gives after `[DONE]` is no part of the answer."""
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events = [
        f"data: {json.dumps({**base, 'choices': [{'delta': {'content': f'w{i} '}}]})}\n\n"
        .encode() for i in range(5)
    ]  # fmt: skip
    counted = {"prompt_tokens": 26, "completion_tokens": 5}
    events.append(f"data: {json.dumps({**base, 'choices': [], 'usage': counted})}\n\n".encode())
    events += [b"data: [DO", b"NE]\n\n", b": a comment past the end\n\n"]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "text/event-stream")])
        if how == "iterable":
            return iter(events)
        for event in events:
            write(event)
        return iter([])

    middleware, key = _length_said(make_settings, app)
    engine = middleware.engine
    sent: list[bytes] = []
    held: list[int] = []

    def send(data: bytes) -> None:  # the server's: its client has its answer once it is sent
        if b"NE]" in data:
            held.append(_in_flight(engine))
        sent.append(data)

    body = chat(
        stream=True, **({"stream_options": {"include_usage": True}} if usage == "asked" else {})
    )
    answer: Any = middleware(posted(json.dumps(body).encode(), key), lambda *_: send)
    for chunk in answer:
        send(chunk)
    answer.close()
    charged = [(r["outcome"], r["estimated"], r["cost_nanos"]) for r in records(engine)]
    print(f"{how}, usage {usage}: slots held as its [DONE] was sent {held}; records {charged}")
    assert held == [0]
    assert charged == [("completed", 0, 6_900)]
    assert b"".join(sent).endswith(b"data: [DONE]\n\n: a comment past the end\n\n")
    assert (b'"usage"' in b"".join(sent)) == (usage == "asked")
    assert _in_flight(engine) == 0


_TRAILING = COMPLETION + b'{"trailing": true}'  # an app's bytes past its Content-Length
_AT = len(COMPLETION)
_ACROSS = {
    "one chunk": [_TRAILING],
    "split at the length": [_TRAILING[:_AT], _TRAILING[_AT:]],
    "split before it": [_TRAILING[:100], _TRAILING[100:]],
    "split after it": [_TRAILING[: _AT + 3], _TRAILING[_AT + 3 :]],
    "three chunks, the middle across it": [
        _TRAILING[:100],
        _TRAILING[100 : _AT + 3],
        _TRAILING[_AT + 3 :],
    ],
}


@pytest.mark.parametrize("how", ["iterable", "write"])
@pytest.mark.parametrize("chunking", list(_ACROSS))
def test_bytes_past_an_answer_s_content_length_change_nothing_of_its_charge(
    make_settings: Settings, chunking: str, how: str
) -> None:
    """An app that says the length of its whole JSON answer and writes bytes after it: charged
    what the answer reports (15,900 nano-USD), settled as its length goes, however the app
    chunks its bytes. A chunk across the length had the bytes past it read into the JSON,
    which then did not parse: charged its most output (43,500), its slot held until the app's
    end; split at the length, it was charged what it reports. The server gets every byte the
    app wrote (gunicorn and waitress send the length and drop the rest: the server's rule)."""
    engine, sent, held, charged = _served_at_length(make_settings, _ACROSS[chunking], _AT, how)
    print(f"{chunking}, {how}: slots held as its length was sent {held}; records {charged}")
    assert b"".join(sent) == _TRAILING
    assert charged == [("completed", 0, PRICE_NANOS)]
    assert held == [0]
    assert _in_flight(engine) == 0


def test_a_stream_s_content_length_left_out_bounds_nothing(make_settings: Settings) -> None:
    """A stream that did not ask for usage: the middleware asks for it, cuts out the usage
    chunk, and leaves out the app's Content-Length (it no longer fits), so the server sends
    all the app gives. An app whose length counted its events but not the usage chunk and
    `[DONE]` after them was settled at that length: the usage unread (charged an estimate of
    39 in, 4 out, 8,250 nano-USD, where 26 in, 5 out cost 6,900) and the usage chunk passed on
    to a client that never asked for it. A length the server never sees bounds nothing."""
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    words = [
        f"data: {json.dumps({**base, 'choices': [{'delta': {'content': f'w{i} '}}]})}\n\n"
        .encode() for i in range(5)
    ]  # fmt: skip
    usage = {"prompt_tokens": 26, "completion_tokens": 5}
    tail = [f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode(),
            b"data: [DONE]\n\n"]  # fmt: skip

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        asked = json.loads(environ["wsgi.input"].read())
        assert asked["stream_options"] == {"include_usage": True}
        length = str(sum(map(len, words)))  # the events, not what follows them
        start_response("200 OK", [("content-type", "text/event-stream"),
                                  ("Content-Length", length)])  # fmt: skip
        return [*words, *tail]

    middleware, key = _length_said(make_settings, app)
    headers: list[tuple[str, str]] = []
    answer = middleware(
        posted(json.dumps(chat(stream=True)).encode(), key),
        lambda status, given, exc=None: headers.extend(given),
    )
    body = b"".join(answer)
    answer.close()  # type: ignore[attr-defined]
    rows = records(middleware.engine)
    charged = [
        (r["input_tokens"], r["output_tokens"], r["estimated"], r["cost_nanos"]) for r in rows
    ]
    print(f"usage chunk sent to the client: {b'usage' in body}; records {charged}")
    assert "content-length" not in {name.lower() for name, _ in headers}
    assert b'"usage": {' not in body and body.endswith(b"data: [DONE]\n\n")
    assert charged == [(26, 5, 0, 6_900)]


def test_an_app_error_is_an_upstream_error_settled_once(make_settings: Settings) -> None:
    app = flask_host(make_settings())
    app.testing = False  # Flask answers 500 for an error raised in a view
    client = Client(app)
    answer = client.post(
        "/v1/chat/completions",
        json=chat(stream=True),
        headers={"x-fail-after": "3", "x-words": "10"},
        buffered=False,
    )
    with pytest.raises(RuntimeError, match="upstream cut"):
        b"".join(answer.response)
    answer.close()
    rows = records(engine_of(app))
    print(f"cut after 3 chunks: {rows}")
    assert [r["outcome"] for r in rows] == ["upstream_error"]


def test_requests_that_are_not_metered_pass_untouched(make_settings: Settings) -> None:
    seen: list[Any] = []
    answer = [b"as it was"]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"])
        start_response("200 OK", [("content-type", "text/plain")])
        return answer

    wrapped = BudgetWSGIMiddleware(app, make_settings())
    for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/other")):
        stream = object()
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": stream}
        assert wrapped(environ, lambda *a: None) is answer  # the app's own iterable
        assert seen[-1] is stream
    assert not wrapped.engine.started  # nothing started for them


def test_a_slashed_inference_path_is_metered(make_settings: Settings) -> None:
    """Flask serves `/v1/chat/completions/` for a route declared with its slash: metered."""
    host = Flask(__name__)

    @host.post("/v1/chat/completions/")
    def slashed() -> Response:
        return Response(COMPLETION, content_type="application/json")

    settings = make_settings(require_virtual_key=True)
    host.wsgi_app = BudgetWSGIMiddleware(host.wsgi_app, settings)  # type: ignore[method-assign]
    key = get_engine(settings).manager.create_virtual_key(name="alice")
    http = host.test_client()
    missing = http.post("/v1/chat/completions/", json=chat())
    paid = http.post("/v1/chat/completions/", json=chat(), headers=bearer(key.value))
    print("slashed path under Flask:", missing.status_code, paid.status_code)
    assert missing.status_code == 401 and paid.status_code == 200
    assert paid.headers.get("x-ratelimit-limit-requests") is None  # no limits: none shown
    assert missing.json["error"]["code"] == "virtual_key_required"


def test_the_app_sees_who_is_calling(make_settings: Settings) -> None:
    app = flask_host(make_settings())
    key = engine_of(app).manager.create_virtual_key(name="alice", tags=["team:a"])
    answer = app.test_client().post(
        "/v1/state/completions",
        json=chat(model="anthropic/claude-sonnet-4"),
        headers={**bearer(key.value), "x-budget-tags": "feature:x", "x-budget-key": "   "},
    )  # a blank key header holds no key: the bearer token is read (SPEC §4, first found)
    print(answer.json)
    assert answer.json["virtual_key_id"] == key.id
    assert answer.json["provider"] == "anthropic" and answer.json["model"] == "claude-sonnet-4"
    assert answer.json["tags"] == ["feature:x", "team:a"]


def test_a_tag_header_sent_as_utf_8_is_the_tag_it_names(make_settings: Settings) -> None:
    """`x-budget-tags: café` as httpx sends it (UTF-8 bytes, which the environ holds as their
    latin-1 text, PEP 3333) is the tag `café`, as on the ASGI side; bytes that are no UTF-8
    are read as latin-1."""
    app = flask_host(make_settings())
    key = engine_of(app).manager.create_virtual_key(name="alice")
    sent = {"café 👩\u200d💻".encode().decode("latin-1"): "café 👩\u200d💻", "caf\xe9": "café"}
    seen = []
    for header in sent:
        answer = app.test_client().post(
            "/v1/state/completions",
            json=chat(),
            headers={**bearer(key.value), "x-budget-tags": header},
        )
        seen.append(answer.json["tags"])
    print(seen)
    assert seen == [[tag] for tag in sent.values()]


def test_a_tag_header_a_test_client_puts_in_the_environ_as_text_is_read(
    make_settings: Settings,
) -> None:
    """Flask's and Django's test clients put a header's text in the environ as given, not as
    the latin-1 text of its bytes: a tag or provider beyond latin-1 (`🙂`) is read as it is,
    where the UTF-8 reading of PEP 3333 text raised UnicodeEncodeError (a 500 in the app's
    tests for a header every real server passes)."""
    app = flask_host(make_settings())
    key = engine_of(app).manager.create_virtual_key(name="alice")
    answer = app.test_client().post(
        "/v1/state/completions",
        json=chat(model="gpt-4o"),
        headers={**bearer(key.value), "x-budget-tags": "café,🙂", "x-budget-provider": "openai🙂"},
    )
    print(answer.status_code, answer.json)
    assert answer.status_code == 200
    assert answer.json["tags"] == ["café", "🙂"]
    assert answer.json["provider"] == "openai🙂"


def test_a_route_rewrites_the_model_and_names_its_target(make_settings: Settings) -> None:
    app = flask_host(make_settings())
    manager = engine_of(app).manager
    manager.put_provider("openai", budgets=[{"max_limit": 0.000000000001}])
    manager.create_route(name="smart", targets=["openai/gpt-4o-mini", "azure/gpt-4o-mini"])
    client = app.test_client()
    routed = [
        client.post("/v1/state/completions", json=chat(model="smart"), buffered=True)
        for _ in range(2)
    ]
    print([(a.headers.get("x-budget-route"), a.json["provider"]) for a in routed])
    assert [a.headers["x-budget-route"] for a in routed] == [
        "openai/gpt-4o-mini",
        "azure/gpt-4o-mini",
    ]
    assert routed[1].json["provider"] == "azure"


def test_a_compressed_request_body_is_read_and_charged(make_settings: Settings) -> None:
    """As under ASGI: a gzipped body is read from a decoded copy (the app gets it as sent), a
    rewritten one goes as plain JSON without the encoding (it was charged as model unknown)."""
    import gzip

    seen: list[tuple[str | None, str]] = []
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        raw = request.get_data()
        encoding = request.headers.get("content-encoding")
        body = json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
        seen.append((encoding, body["model"]))
        return Response(COMPLETION, content_type="application/json")

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    engine = engine_of(app)
    engine.manager.create_route(name="smart", targets=["openai/gpt-4o-mini"])
    client = app.test_client()
    statuses = [
        client.post(
            "/v1/chat/completions",
            data=gzip.compress(json.dumps(chat(model=model)).encode()),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        ).status_code
        for model in ("gpt-4o-mini", "smart")
    ]
    rows = records(engine)
    print("the app saw:", seen, "; charged:", [(r["model"], r["cost_nanos"]) for r in rows])
    assert statuses == [200, 200]
    assert seen == [("gzip", "gpt-4o-mini"), (None, "openai/gpt-4o-mini")]
    assert [(r["provider"], r["model"], r["cost_nanos"]) for r in rows] == [
        ("openai", "gpt-4o-mini", PRICE_NANOS)
    ] * 2


def test_a_gzip_body_that_does_not_decode_is_refused(make_settings: Settings) -> None:
    """As under ASGI: a gzip body cut short of its trailer cannot be read to be metered: 400
    `undecodable_body`, the app never called; the whole body is served, and so is JSON sent as
    it is under a `gzip` label it does not keep (read as it is: its model is charged)."""
    import gzip

    called: list[bytes] = []
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        called.append(request.get_data())
        return Response(COMPLETION, content_type="application/json")

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    plain = json.dumps(chat()).encode()
    whole = gzip.compress(plain)
    answers = [
        app.test_client().post(
            "/v1/chat/completions",
            data=content,
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        for content in (whole[:-8], whole, plain)
    ]
    codes = [(a.status_code, (a.get_json() or {}).get("error", {}).get("code")) for a in answers]
    models = [r["model"] for r in records(engine_of(app))]
    print(f"cut short, whole, JSON labelled gzip: {codes}; the app called {len(called)} "
          f"time(s); charged {models}")  # fmt: skip
    assert codes == [(400, "undecodable_body"), (200, None), (200, None)]
    assert called == [whole, plain] and models == ["gpt-4o-mini"] * 2


def test_a_metered_request_asks_the_app_only_for_codings_whose_usage_can_be_read(
    make_settings: Settings,
) -> None:
    """As under ASGI: a client accepting br or zstd would get an answer whose usage cannot be
    read; the app is asked for the codings that can be (a stream whose usage we asked for, in
    clear), and the charges are exact. A request that is not metered keeps its header."""
    seen: list[str | None] = []
    app = flask_host(make_settings())

    @app.get("/accept")
    def accept() -> dict[str, str | None]:
        return {"accept": request.headers.get("accept-encoding")}

    @app.before_request
    def keep() -> None:
        seen.append(request.headers.get("accept-encoding"))

    engine = engine_of(app)
    client = app.test_client()
    accepted = {"accept-encoding": "br, gzip, zstd"}
    plain = client.post("/v1/chat/completions", json=chat(), headers=accepted, buffered=True)
    stream = client.post(
        "/v1/chat/completions", json=chat(stream=True), headers=accepted, buffered=True
    )
    other = client.get("/accept", headers=accepted)
    rows = records(engine)
    print("the app was asked:", seen, "; charged:", [r["cost_nanos"] for r in rows])
    assert plain.status_code == stream.status_code == 200
    assert seen == ["gzip", "identity", "br, gzip, zstd"]
    assert other.get_json() == {"accept": "br, gzip, zstd"}
    assert [r["estimated"] for r in rows] == [False, False]
    assert rows[0]["cost_nanos"] == PRICE_NANOS


def test_hooks_hear_refusals_and_settlements(make_settings: Settings) -> None:
    heard: dict[str, list[Any]] = {"refusal": [], "settled": []}
    app = flask_host(
        make_settings(),
        on_refusal=heard["refusal"].append,
        on_settled=heard["settled"].append,
    )
    client = app.test_client()
    client.post("/v1/chat/completions", json=chat(), headers=bearer("sk-bm-unknown"), buffered=True)
    client.post("/v1/chat/completions", json=chat(), buffered=True)
    engine = engine_of(app)
    on_loop(engine, engine.flush)
    engine.hooks.drain()
    print({k: len(v) for k, v in heard.items()})
    assert [r["code"] for r in heard["refusal"]] == ["invalid_virtual_key"]
    assert len(heard["settled"]) == 1


def test_shadow_mode_refuses_nothing_and_says_what_it_would_have(
    make_settings: Settings,
) -> None:
    app = flask_host(make_settings(mode="shadow"))
    key = engine_of(app).manager.create_virtual_key(
        name="tiny", budgets=[{"max_limit": 0.000000000001}]
    )
    client = app.test_client()
    answers = [
        client.post("/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True)
        for _ in range(2)
    ]
    unknown = client.post(
        "/v1/chat/completions", json=chat(), headers=bearer("sk-bm-nobody"), buffered=True
    )
    said = [a.headers.get("x-budget-shadow-refusal") for a in (*answers, unknown)]
    print(f"shadow: {[a.status_code for a in (*answers, unknown)]} {said}")
    assert [a.status_code for a in (*answers, unknown)] == [200, 200, 200]
    assert said == [None, "budget_exceeded", "invalid_virtual_key"]


# -- threads ---------------------------------------------------------------------------------------


def test_threads_admit_exactly_in_process(make_settings: Settings) -> None:
    """400 requests from 8 threads at once on one budget of exactly 25 requests' price; then one
    at a time until the final 402: 25 admitted in all, spend 25 x price, overshoot 0."""
    app = flask_host(make_settings(flush_interval_seconds=3600))
    engine = engine_of(app)
    limit_nanos = 25 * PRICE_NANOS
    key = engine.manager.create_virtual_key(
        name="alice", budgets=[{"max_limit": limit_nanos / 1e9}]
    )
    statuses: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def worker() -> None:
        client = app.test_client()
        go.wait()
        for _ in range(50):
            answer = client.post(
                "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
            )
            with lock:
                statuses.append(answer.status_code)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(worker) for _ in range(8)]:
            future.result()
    at_once = statuses.count(200)
    client = app.test_client()
    while (
        answer := client.post(
            "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
        )
    ).status_code == 200:
        statuses.append(200)
    rows = records(engine)
    spent = sum(r["cost_nanos"] for r in rows)
    counter = engine.registry.counter("budget", key.budgets[0].id)
    assert counter is not None
    print(
        f"400 requests on 8 threads: admitted {at_once} "
        f"({statuses.count(429)} x 429 budget_reserved, {statuses.count(402)} x 402); then one by "
        f"one: {statuses.count(200)} admitted in all, spent ${spent / 1e9:.7f} = "
        f"{statuses.count(200)} x ${PRICE_NANOS / 1e9:.7f}, overshoot "
        f"${max(0, spent - limit_nanos) / 1e9:.7f}"
    )
    assert answer.status_code == 402
    assert statuses.count(200) == len(rows) == 25
    assert {r["cost_nanos"] for r in rows} == {PRICE_NANOS}
    assert spent == counter.value == limit_nanos and counter.reserved == 0
    assert set(statuses) <= {200, 402, 429}


def _a_call_s_worth(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """An app answering every call `CALL_OUTPUT` output tokens of gpt-4o (`CALL_NANOS` at
    `call_priced`'s prices)."""
    start_response("200 OK", [("content-type", "application/json")])
    usage = {"prompt_tokens": 10, "completion_tokens": CALL_OUTPUT}
    return [json.dumps({"model": "gpt-4o", "choices": [], "usage": usage}).encode()]


# Where threads are made to meet, and the budget there: (the budget's owner, how many requests'
# price it holds, whether the request that starts the engine pays it, the code that must hold
# `loop_lock`). Each case fails with that lock taken out.
_MEETINGS = {
    "admission, a cached key": ("key", 2, True, "_metered: the cached key's decision"),
    "admission, a key read just now": ("key", 1, False, "_metered: after the key's read"),
    "admission, no key": ("provider", 2, True, "_metered: a keyless request's decision"),
    "settlement": ("key", 2, False, "MeteredResponse.settle: the direct booking"),
}


@pytest.mark.parametrize("case", list(_MEETINGS))
def test_threads_never_overspend_whatever_they_interleave(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    """Two threads made to meet where only `loop_lock` keeps them apart: between an admission's
    check and its reservation (a key cached, a key read on the loop just before, no key), or
    inside a settlement's read and write of the budget's spend. A budget of N requests' price
    admits N, never more; spend N x the price, overshoot 0. Without the lock there, one more is
    admitted ($0.001 over)."""
    owner, calls, warm_up_pays, guarded = _MEETINGS[case]
    settings = make_settings(flush_interval_seconds=3600, pricing_file=call_priced(tmp_path))
    app = BudgetWSGIMiddleware(_a_call_s_worth, settings)
    engine = app.engine
    limit = [{"max_limit": calls * CALL_NANOS / 1e9}]
    paid: dict[str, str] = {}  # the paying key's header (none: a provider budget pays)
    if owner == "key":
        key = engine.manager.create_virtual_key(name="k", budgets=limit)
        budget_id, paid = key.budgets[0].id, bearer(key.value)
    else:
        budget_id = engine.manager.put_provider("openai", budgets=limit).budgets[0].id
    body = chat(model="gpt-4o", max_tokens=CALL_OUTPUT)

    def call(headers: dict[str, str]) -> int:
        answer = Client(app).post("/v1/chat/completions", json=body, headers=headers, buffered=True)
        return answer.status_code

    # The engine started (and the key cached, when the warm-up pays with it).
    assert call(paid if warm_up_pays else {}) == 200
    meeting = Meeting(others=1)
    if case == "settlement":
        meet_inside_a_budget_s_charge(monkeypatch, meeting)
    else:
        meet_between_check_and_reservation(monkeypatch, meeting)
    statuses = [200] if warm_up_pays else []
    go = threading.Barrier(2)

    def in_a_thread() -> None:
        go.wait()
        statuses.append(call(paid))

    started = time.perf_counter()
    workers = [threading.Thread(target=in_a_thread) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    took = time.perf_counter() - started
    while len(statuses) < 8:  # then one at a time, until refused
        statuses.append(call(paid))
        if statuses[-1] != 200:
            break
    monkeypatch.undo()
    rows = [r for r in records(engine) if owner != "key" or r["virtual_key_id"] == key.id]
    spent = sum(r["cost_nanos"] for r in rows)
    counter = engine.registry.counter("budget", budget_id)
    assert counter is not None
    admitted = statuses.count(200)
    print(
        f"{case} ({guarded}): 2 threads made to meet there: met {meeting.met} (the first waited "
        f"{meeting.waited:.3f} s, {took:.3f} s in all); {admitted} admitted by a budget of "
        f"{calls} requests ({statuses}); spent ${spent / 1e9:.6f} in {len(rows)} records, live "
        f"${counter.value / 1e9:.6f}, overshoot ${max(0, spent - calls * CALL_NANOS) / 1e9:.6f}"
    )
    assert (admitted, len(rows)) == (calls, calls) and statuses[-1] in (402, 429)
    assert spent == counter.value == calls * CALL_NANOS and counter.reserved == 0
    assert meeting.met is False  # nobody got in while the first was there


# -- the admin API under Flask and Django ---------------------------------------------------------


def test_the_admin_api_under_flask_shares_the_engine(make_settings: Settings) -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    settings = make_settings()
    app = flask_host(settings)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/budget-admin": create_admin_wsgi_app(settings)}
    )
    client = app.test_client()
    assert client.get("/budget-admin/health").json["status"] == "ok"
    assert client.get("/budget-admin/customers").status_code == 401
    document = client.get("/budget-admin/openapi.json", headers=ADMIN).json
    assert document["servers"] == [{"url": "/budget-admin"}]  # where generated clients call
    created = client.post(
        "/budget-admin/virtual-keys",
        json={"name": "alice", "budgets": [{"max_limit": 1}]},
        headers=ADMIN,
    )
    assert created.status_code == 201
    key = created.json["virtual_key"]
    first = client.post(
        "/v1/chat/completions", json=chat(), headers=bearer(key["value"]), buffered=True
    )
    changed = client.put(
        f"/budget-admin/virtual-keys/{key['id']}",
        json={"budgets": [{"max_limit": 0.00001}]},
        headers=ADMIN,
    )
    second = client.post(
        "/v1/chat/completions", json=chat(), headers=bearer(key["value"]), buffered=True
    )
    live = client.get("/budget-admin/budgets?from_memory=true", headers=ADMIN).json["budgets"]
    print(
        f"{first.status_code} then, after the update, {second.status_code}; live {live[0]['spent']}"
    )
    assert (first.status_code, changed.status_code, second.status_code) == (200, 200, 402)
    assert live[0]["spent"] == pytest.approx(PRICE_NANOS / 1e9)


def test_a_trailing_slash_on_the_wsgi_admin_api_is_redirected_under_its_mount(
    make_settings: Settings,
) -> None:
    """`create_admin_wsgi_app()` under Flask at `/budget-admin`: `GET .../customers/` and
    `POST .../teams/` answered 404 where `.../customers` and `.../teams` answer. A 307 to the
    route without the slash, under the mount point (`SCRIPT_NAME`), the query kept; httpx (over
    WSGI) follows it with the method and the body."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    settings = make_settings()
    app = flask_host(settings)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/budget-admin": create_admin_wsgi_app(settings)}
    )
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://localhost", headers=ADMIN) as client:
        created = client.post("/budget-admin/customers/", json={"name": "acme"})
        print(
            "POST /budget-admin/customers/:", created.status_code, created.headers.get("location")
        )
        assert created.status_code == 307
        assert created.headers["location"] == "http://localhost/budget-admin/customers"
        assert client.get("/budget-admin/customers").json()["count"] == 0  # nothing made yet
        created = client.post("/budget-admin/customers/", json={"name": "acme"},
                              follow_redirects=True)  # fmt: skip
        assert created.status_code == 201, created.text
        customer_id = created.json()["customer"]["id"]
        team = client.post("/budget-admin/teams/", json={"name": "r", "customer_id": customer_id},
                           follow_redirects=True)  # fmt: skip
        assert team.status_code == 201, team.text
        listed = client.get("/budget-admin/teams/?limit=5")
        assert listed.headers["location"] == "http://localhost/budget-admin/teams?limit=5"
        listed = client.get("/budget-admin/teams/?limit=5", follow_redirects=True)
        assert [t["name"] for t in listed.json()["teams"]] == ["r"]
        one = client.get(f"/budget-admin/customers/{customer_id}/", follow_redirects=True)
        assert one.status_code == 200 and one.json()["customer"]["name"] == "acme"
        assert client.get("/budget-admin/nothing/").status_code == 404


def test_a_tag_ending_in_an_escaped_slash_is_that_tag_under_the_wsgi_admin_api(
    make_settings: Settings,
) -> None:
    """WSGI decodes `%2F` in `PATH_INFO`: the admin app took `PUT .../tags/team%2F` (the tag
    `team/`, 201 under ASGI) for a trailing slash the client wrote and redirected it to
    `.../tags/team`, so a `DELETE .../tags/team%2F` that followed it removed the tag `team`.
    The path as the client sent it is read from the server's request line (`RAW_URI`)."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    settings = make_settings()
    app = flask_host(settings)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/budget-admin": create_admin_wsgi_app(settings)}
    )
    client = app.test_client()
    assert client.put("/budget-admin/tags/team", json={"budgets": [{"max_limit": 1}]},
                      headers=ADMIN).status_code == 201  # fmt: skip
    put = client.put("/budget-admin/tags/team%2F", json={"budgets": [{"max_limit": 3}]},
                     headers=ADMIN)  # fmt: skip
    tags = {t["tag"]: t["budgets"][0]["max_limit"]
            for t in client.get("/budget-admin/tags", headers=ADMIN).json["tags"]}  # fmt: skip
    deleted = client.delete("/budget-admin/tags/team%2F", headers=ADMIN, follow_redirects=True)
    left = [t["tag"] for t in client.get("/budget-admin/tags", headers=ADMIN).json["tags"]]
    slashed = client.put("/budget-admin/tags/chat/", json={"budgets": [{"max_limit": 1}]},
                         headers=ADMIN)  # fmt: skip
    print("PUT tags/team%2F:", put.status_code, put.headers.get("location"), "tags:", tags,
          "after DELETE tags/team%2F:", left, "PUT tags/chat/:", slashed.status_code)  # fmt: skip
    assert put.status_code == 201 and tags == {"team": 1.0, "team/": 3.0}
    assert deleted.status_code == 200 and left == ["team"]
    assert slashed.status_code == 307  # a slash written as one is still redirected
    assert slashed.headers["location"] == "http://localhost/budget-admin/tags/chat"


def test_a_tag_outside_latin_1_is_managed_through_the_wsgi_admin_api_under_httpx(
    make_settings: Settings,
) -> None:
    """httpx's WSGI transport (a test client) puts the path in the environ decoded (UTF-8),
    not as WSGI's latin-1 text: the admin app read it so (`_text`), then failed to encode its
    `raw_path`, and `PUT /budget-admin/tags/产品` raised a UnicodeEncodeError out of the app;
    so did any header werkzeug's client (Flask's) sent beyond latin-1 (it puts a header's text
    in the environ as given). Their bytes are taken as the middleware takes a header's."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    settings = make_settings()
    app = flask_host(settings)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/budget-admin": create_admin_wsgi_app(settings)}
    )
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://localhost", headers=ADMIN) as client:
        put = client.put("/budget-admin/tags/产品", json={"budgets": [{"max_limit": 5}]})
        listed = client.get("/budget-admin/tags")
        gone = client.delete("/budget-admin/tags/产品")
    # werkzeug's client (Flask's) puts a header's text in the environ as given: beyond latin-1
    noted = app.test_client().get("/budget-admin/health", headers={"x-note": "产品"})
    print("PUT tag:", put.status_code, "listed:", listed.text[:120], "DELETE:", gone.status_code,
          "a header beyond latin-1:", noted.status_code)  # fmt: skip
    assert noted.status_code == 200
    assert put.status_code in (200, 201)
    assert "产品" in json.dumps(listed.json(), ensure_ascii=False)
    assert gone.status_code in (200, 204)


def test_the_wsgi_admin_api_reads_no_body_before_the_admin_key(make_settings: Settings) -> None:
    """The WSGI admin app read the whole body a request announced before the API checked its
    credential: anyone could have a server thread read and hold what they sent (a lying
    `Content-Length: 1000000000` here, 10 MB of it sent). A body is read for the admin key's
    bearer only; the API refuses any other first."""
    app = create_admin_wsgi_app(make_settings())
    read = {}
    for name, authorization in (("none", None), ("wrong", "Bearer nope"),
                                ("admin", "Bearer admin-secret")):  # fmt: skip
        sent = Sent(b" " * 10_000_000)
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/customers", "SERVER_NAME": "t",
                   "SERVER_PORT": "80", "wsgi.input": sent, "CONTENT_LENGTH": "1000000000",
                   "CONTENT_TYPE": "application/json"}  # fmt: skip
        if authorization:
            environ["HTTP_AUTHORIZATION"] = authorization
        statuses: list[str] = []
        b"".join(app(environ, lambda status, headers, *_, into=statuses: into.append(status)))
        read[name] = (statuses[0][:3], sent.read_bytes)
    print("status and bytes read:", read)
    assert read["none"] == ("401", 0) and read["wrong"] == ("401", 0)
    # Nor for the admin key when it announces more than the admin API's 64 MiB: a 413, none
    # of it read (the 1,000,000,000 bytes announced here were read, to be refused as not JSON).
    assert read["admin"] == ("413", 0)


def django_site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The example Django project (examples/django_app) set up on this test's store: its WSGI
    application, `BudgetWSGIMiddleware(get_wsgi_application())`."""
    set_up_django_example(monkeypatch, tmp_path)
    from llmsite.wsgi import application

    return application


def test_django_test_client_serves_the_admin_urls_and_the_middleware_wraps_its_wsgi_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The example Django project: its admin URL prefix through Django's test client, and its
    WSGI application (`BudgetWSGIMiddleware(get_wsgi_application())`) through a WSGI client."""
    from django.test import Client as DjangoClient

    application = django_site(monkeypatch, tmp_path)
    django_client = DjangoClient()
    health = django_client.get("/budget-admin/health")
    created = django_client.post(
        "/budget-admin/virtual-keys",
        data=json.dumps({"name": "alice", "budgets": [{"max_limit": 0.000000000001}]}),
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer admin-secret",
    )
    assert health.status_code == 200 and created.status_code == 201, created.content
    value = created.json()["virtual_key"]["value"]
    client = Client(application)
    answers = [
        client.post("/v1/chat/completions", json=chat(), headers=bearer(value), buffered=True)
        for _ in range(2)
    ]
    streamed = client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=3))
    budgets = django_client.get("/budget-admin/budgets", HTTP_AUTHORIZATION="Bearer admin-secret")
    print(f"Django: {[a.status_code for a in answers]}, stream {streamed.status_code}")
    assert [a.status_code for a in answers] == [200, 402]
    assert answers[1].json["error"]["code"] == "budget_exceeded"
    assert streamed.data.count(b"data: ") == 5 and b'"usage"' not in streamed.data
    assert budgets.json()["count"] == 1


def test_the_django_admin_urls_read_no_body_before_the_admin_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Django view read the whole body (`request.body`, up to Django's 2.5 MB) before the
    admin API checked its credential: anyone could have a server thread read and hold it. A body
    is read for the admin key's bearer only; the API refuses any other first."""
    application = django_site(monkeypatch, tmp_path)
    body = json.dumps({"name": "alice"}).encode().ljust(2_000_000)  # under Django's limit
    read = {}
    for name, authorization in (("none", None), ("wrong", "Bearer nope"),
                                ("admin", "Bearer admin-secret")):  # fmt: skip
        sent = Sent(body)
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/budget-admin/virtual-keys",
                   "SERVER_NAME": "t", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                   "wsgi.input": sent, "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": "application/json"}  # fmt: skip
        if authorization:
            environ["HTTP_AUTHORIZATION"] = authorization
        statuses: list[str] = []
        answer = application(environ, lambda status, headers, *_, i=statuses: i.append(status))
        b"".join(answer)
        getattr(answer, "close", lambda: None)()
        read[name] = (statuses[0][:3], sent.read_bytes)
    print("status and bytes read:", read)
    assert read["none"] == ("401", 0) and read["wrong"] == ("401", 0)
    assert read["admin"] == ("201", len(body))  # read, and the key created


# -- Redis, and the exit ---------------------------------------------------------------------------


def test_on_redis_the_loop_admits_and_settles(make_settings: Settings) -> None:
    need_redis()
    prefix = unique_prefix()
    app = flask_host(make_settings(redis_url=REDIS_URL, flush_interval_seconds=3600))
    engine = engine_of(app)
    engine.counters.prefix = prefix  # type: ignore[attr-defined]
    try:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 3 * PRICE_NANOS / 1e9}]
        )
        client = app.test_client()
        statuses = [
            client.post(
                "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
            ).status_code
            for _ in range(5)
        ]
        rows = records(engine)
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(f"on Redis: {statuses}")
    assert statuses == [200, 200, 200, 402, 402] and len(rows) == 3


def _records_written_by(script: str, database: Path) -> int:
    """How many usage records the SQLite store `database` holds once `script` has run in a
    process of its own (without this run's BUDGET_ settings) and exited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=env)
    from sqlalchemy import create_engine

    store = create_engine(f"sqlite:///{database}")
    with store.connect() as conn:
        written: int = conn.execute(text("SELECT count(*) FROM bm_usage_records")).scalar_one()
    store.dispose()
    return written


def test_pending_charges_are_written_when_the_process_exits(tmp_path: Path) -> None:
    """A script serves requests through Flask's test client and exits: `atexit` writes what
    the flusher (once an hour) had not."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "examples")!r})
from budget_middleware import BudgetSettings
from flask_app import create_app
settings = BudgetSettings(database_url="sqlite:///{tmp_path}/exit.db", flush_interval_seconds=3600)
client = create_app(settings).test_client()
for _ in range(7):
    answer = client.post("/v1/chat/completions", json={{"model": "gpt-4o-mini"}}, buffered=True)
    assert answer.status_code == 200
"""
    written = _records_written_by(script, tmp_path / "exit.db")
    print(f"written at exit: {written} usage records")
    assert written == 7


@pytest.mark.parametrize("raced", [False, True], ids=["", "raced"])
@pytest.mark.parametrize("adapter", ["BudgetWSGIMiddleware", "BudgetSyncTransport"])
def test_pending_charges_of_an_engine_the_app_made_are_written_when_the_process_exits(
    tmp_path: Path, adapter: str, raced: bool
) -> None:
    """As above, with an engine the app made itself (`BudgetEngine(settings)`, given to the
    adapter as `engine=`), which `get_engine` does not know: the exit shut down the engines
    `get_engine` made alone, and this one's charges since its last flush were lost (0 of 7
    written). `raced`: the exit's first read of the engines started meets another thread's
    addition (an engine starting on the background loop as the process exits: "Set changed
    size during iteration", made here to happen): it took the whole shutdown with it, every
    engine's charges lost (0 of 7); read again."""
    script = f"""
import httpx2
from budget_middleware import BudgetEngine, BudgetSettings, BudgetSyncTransport
from budget_middleware.wsgi import BudgetWSGIMiddleware
settings = BudgetSettings(database_url="sqlite:///{tmp_path}/exit.db", flush_interval_seconds=3600)
engine = BudgetEngine(settings)
usage = {{"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
answer = {{"model": "gpt-4o-mini", "choices": [], "usage": usage}}
def provider(request):
    return httpx2.Response(200, json=answer)
def app(environ, start_response):
    start_response("200 OK", [("content-type", "application/json")])
    return [httpx2.Response(200, json=answer).content]
if {adapter!r} == "BudgetWSGIMiddleware":
    transport = httpx2.WSGITransport(app=BudgetWSGIMiddleware(app, engine=engine))
else:
    transport = BudgetSyncTransport(httpx2.MockTransport(provider), engine=engine)
url = "https://api.openai.com/v1/chat/completions"
with httpx2.Client(transport=transport) as client:
    for _ in range(7):
        assert client.post(url, json={{"model": "gpt-4o-mini"}}).status_code == 200
if {raced!r}:
    import weakref
    from budget_middleware.engine import portal
    class Raced(weakref.WeakSet):
        raced = False
        def __iter__(self):
            if not Raced.raced:
                Raced.raced = True
                raise RuntimeError("Set changed size during iteration")
            return super().__iter__()
    portal.started_in_background = Raced(portal.started_in_background)
"""
    written = _records_written_by(script, tmp_path / "exit.db")
    print(f"{adapter} on an engine of the app's{' (raced)' * raced}: {written} of 7 usage "
          "records written at exit")  # fmt: skip
    assert written == 7


def test_every_step_of_the_engine_s_background_loop_holds_the_lock(make_settings: Settings) -> None:
    """What makes in-thread admission atomic: no task step on the loop (the flusher's, a key
    read's, a reload's) runs while a WSGI thread holds `loop_lock`, nor the other way round."""
    import anyio.to_thread

    from budget_middleware.engine.engine import get_engine
    from budget_middleware.engine.portal import is_background, loop_lock

    engine = get_engine(make_settings())
    on_loop(engine, engine.ensure_started)

    async def probe() -> list[bool]:
        held = [loop_lock._is_owned()]  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        held.append(loop_lock._is_owned())  # type: ignore[attr-defined]
        await anyio.to_thread.run_sync(lambda: None)
        held.append(loop_lock._is_owned())  # type: ignore[attr-defined]
        return held

    assert is_background(engine.loop)
    assert on_loop(engine, probe) == [True, True, True]
    assert not loop_lock._is_owned()  # type: ignore[attr-defined]


@pytest.mark.parametrize("holding", [False, True], ids=["free", "holding the loop lock"])
def test_a_reset_from_a_wsgi_thread_is_made_on_the_loop_s_side_of_every_charge(
    make_settings: Settings, holding: bool
) -> None:
    """A reset from a thread of a WSGI app: made where requests settle (the background loop,
    or at once by a thread that holds its lock: waiting for the loop there stalled, then gave
    up with the live counter reset and the store not), at the moment the store gets."""
    from budget_middleware.engine.engine import get_engine
    from budget_middleware.engine.portal import loop_lock

    engine = get_engine(make_settings())
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    budget_id = key.budgets[0].id
    usage = {"prompt_tokens": 10, "completion_tokens": 5}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps({"choices": [], "usage": usage}).encode()]

    client = Client(BudgetWSGIMiddleware(app, make_settings()))
    answer = client.post("/v1/chat/completions", json=chat(), headers=bearer(key.value or ""))
    assert answer.status_code == 200
    done: list[Any] = []

    def reset() -> None:
        if holding:
            with loop_lock:
                done.append(engine.manager.reset_budget(budget_id))
        else:
            done.append(engine.manager.reset_budget(budget_id))

    thread = threading.Thread(target=reset)
    thread.start()
    thread.join(60)
    counter = engine.registry.counter("budget", budget_id)
    assert counter is not None and done, "the reset never returned"
    stored = done[0].last_reset.timestamp()
    print(
        f"{'holding' if holding else 'free'}: live window from {counter.start}, "
        f"stored {stored}; live spend {counter.value}"
    )
    assert (counter.start, counter.value) == (stored, 0)


def test_the_loop_lock_excludes_threads_that_wait_for_it_by_giving_the_gil_away() -> None:
    """`loop_lock` as the WSGI threads take it: a thread that finds it held gives the GIL away
    until it is free (no convoy of threads asleep on it), and sleeps on it only after that;
    either way no two threads are ever inside at once, and a holder may take it again."""
    from budget_middleware.engine import portal

    lock = portal.LoopLock()
    inside = [0]
    overlaps = [0]
    entries = [0]

    def work() -> None:
        for n in range(400):
            with lock:
                inside[0] += 1
                if inside[0] != 1:
                    overlaps[0] += 1
                if n % 50 == 0:
                    time.sleep(0.002)  # longer than a waiter's yields: it sleeps on the lock
                else:
                    time.sleep(0)  # the GIL goes to a waiter, which must not get in
                with lock:  # reentrant
                    entries[0] += 1
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"8 threads x 400 entries: {entries[0]} counted, {overlaps[0]} overlaps")
    assert entries[0] == 8 * 400
    assert overlaps[0] == 0
    assert not lock._is_owned()


def _error_app(kind: str) -> Any:
    """PEP 3333's error pattern: `start_response("200 OK")`, the backend fails, then
    `start_response("500 ...", exc_info)`: before any body (a list app; a generator app, all of
    which runs inside the server's first `next()`), or after part of it (`began`)."""

    def listed(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        try:
            raise RuntimeError("the model backend failed")
        except RuntimeError:
            start_response("500 Internal Server Error", [("content-type", "text/plain")],
                           sys.exc_info())  # fmt: skip
            return [b"internal error"]

    def generated(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "application/json")])
        if kind == "began":
            yield b'{"id": "c", "choices": ['
        try:
            raise RuntimeError("the model backend failed")
        except RuntimeError:
            start_response("500 Internal Server Error", [("content-type", "text/plain")],
                           sys.exc_info())  # fmt: skip
            yield b"internal error"

    return listed if kind == "list" else generated


@pytest.mark.parametrize("kind", ["list", "generator", "began"])
def test_a_new_status_before_any_body_is_the_answer_measured(
    make_settings: Settings, kind: str
) -> None:
    """The client gets the 500 without usage, which costs nothing (SPEC §7), not a 200 charged
    an estimate: a generator app's new status (given inside the first `next()`) was passed to
    the server and not measured. Once the body has begun, the server re-raises: the answer
    measured stays the 200 it is sending, its prompt estimated."""
    middleware = BudgetWSGIMiddleware(_error_app(kind), make_settings())
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10.0}])
    body = json.dumps(chat()).encode()
    environ = posted(body, key.value)
    sent: list[str] = []
    headers_sent = [False]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if exc_info is not None and headers_sent[0]:  # as a server does (PEP 3333)
            raise exc_info[1].with_traceback(exc_info[2])
        sent.append(status)
        return lambda data: None

    answer = middleware(environ, start_response)
    chunks: list[bytes] = []
    try:
        for chunk in answer:
            if chunk:
                headers_sent[0] = True
                chunks.append(chunk)
    except RuntimeError:
        chunks.append(b"<the server gave up>")
    answer.close()  # type: ignore[attr-defined]
    rows = records(engine)
    print(f"{kind}: statuses given {sent}; sent {chunks}; record {rows}")
    measured = [(r["status"], r["cost_nanos"] > 0, r["estimated"]) for r in rows]
    if kind == "began":
        assert sent == ["200 OK"] and chunks[-1] == b"<the server gave up>"
        assert measured == [(200, True, True)]  # the prompt, estimated: the provider was called
    else:
        assert sent[-1].startswith("500") and chunks == [b"internal error"]
        assert measured == [(500, False, False)]


@pytest.mark.parametrize("how", ["chunk", "write"])
def test_a_new_status_after_bytes_held_back_is_charged_as_the_stream_cut(
    make_settings: Settings, how: str
) -> None:
    """A relayed stream (no usage asked: the middleware holds an event until its end) whose
    provider fails within its first event, and the app then gives a new status,
    `start_response("502 ...", exc_info)`. A server that sends headers at the first non-empty
    chunk (PEP 3333, waitress) takes it: the 502 was measured in place of the stream, $0 where
    the same app raising instead is charged 6,000 nano-USD (its prompt's estimate, as under
    ASGI). The provider's answer had begun: charged as the stream cut, the client given the
    502 with our headers."""
    delta = {"choices": [{"delta": {"content": "hello " * 200}}]}
    event = b"data: " + json.dumps({"id": "c", "model": "gpt-4o-mini", **delta}).encode()

    def relayed(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "text/event-stream")])
        if how == "write":
            write(event)
        else:
            yield event
        try:
            raise ConnectionError("the provider reset the stream")
        except ConnectionError:
            if environ.get("x.restart"):
                start_response("502 Bad Gateway", [("content-type", "application/json")],
                               sys.exc_info())  # fmt: skip
                yield b'{"error": {"message": "the provider failed"}}'
            else:
                raise

    middleware = BudgetWSGIMiddleware(relayed, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    body = json.dumps(chat(stream=True, max_tokens=1000)).encode()
    charged = {}
    given: list[tuple[str, dict[str, str]]] = []
    sent: list[bytes] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if exc_info is not None and sent:  # as a server does (PEP 3333)
            raise exc_info[1].with_traceback(exc_info[2])
        given.append((status, dict(headers)))
        return lambda data: sent.append(data) if data else None

    for restart in (False, True):
        given.clear()
        sent.clear()
        environ = posted(body, key.value or "", **({"x.restart": True} if restart else {}))
        answer: Any = middleware(environ, start_response)
        try:
            sent.extend(chunk for chunk in answer if chunk)
        except ConnectionError:
            sent.append(b"<the server gave up>")
        answer.close()
        row = records(engine)[-1]
        charged[restart] = (row["status"], row["outcome"], row["estimated"], row["cost_nanos"])
        told = "restarted as a 502" if restart else "raised"
        statuses = [status for status, _ in given]
        print(f"{how}, {told}: statuses given {statuses}, sent {sent}; charged {charged[restart]}")
    assert given[-1][0].startswith("502") and "x-budget-limit" in given[-1][1]
    assert sent == [b'{"error": {"message": "the provider failed"}}']
    assert charged[False] == (200, "upstream_error", 1, 6_000)
    assert charged[True] == charged[False]


# A forking script's start: a WSGI app answering a chat completion, and `call(key)`, one request
# through `middleware` (the script's), giving its status and the seconds it took.
_FORK_PRELUDE = r"""
import gc, io, json, os, signal, sys, time
from budget_middleware import BudgetEngine, BudgetSettings
from budget_middleware.wsgi import BudgetWSGIMiddleware

ANSWER = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 26, "completion_tokens": 20, "total_tokens": 46}}).encode()

def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("content-type", "application/json")])
    return [ANSWER]

def call(key):
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 64}).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "SCRIPT_NAME": "",
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "HTTP_AUTHORIZATION": f"Bearer {key}"}
    statuses = []
    began = time.perf_counter()
    answer = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(answer)
    getattr(answer, "close", lambda: None)()
    return statuses[0], round(time.perf_counter() - began, 3)
"""

FORKED = (
    _FORK_PRELUDE
    + r"""
from sqlalchemy import text
from budget_middleware.engine.portal import on_loop

middleware = BudgetWSGIMiddleware(app, BudgetSettings(database_url=sys.argv[1],
                                                      flush_interval_seconds=3600))
engine = middleware.engine
on_loop(engine, engine.ensure_started)  # the master starts the engine (gunicorn --preload)
key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}]).value
call(key); call(key)  # two charges pending in the master when it forks
pid = os.fork()
if pid == 0:
    for _ in range(3):
        call(key)
    sys.exit(0)  # a worker's normal exit: its own three charges written at exit
_, status = os.waitpid(pid, 0)
on_loop(engine, engine.flush)  # the master's own two
with engine.store.engine.connect() as conn:
    records, cost = conn.execute(
        text("SELECT count(*), sum(cost_nanos) FROM bm_usage_records")).one()
spent = engine.manager.list_budgets()[0].spent
print(json.dumps({"child_exit": status, "records": records, "cost": cost, "spent": spent}))
"""
)


def test_a_worker_forked_after_the_engine_started_serves_and_charges_only_its_own(
    tmp_path: Path,
) -> None:
    """gunicorn `--preload`: the master started the engine and holds unwritten charges when it
    forks. The worker starts afresh (no hang on the parent's loop), writes its own charges at
    exit, and never the parent's: 2 + 3 records, not 2 + 5."""
    done = subprocess.run(
        [sys.executable, "-c", FORKED, f"sqlite:///{tmp_path}/fork.db"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print(done.stdout, done.stderr[-2000:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["child_exit"] == 0 and figures["records"] == 5
    assert figures["cost"] > 0 and figures["spent"] == pytest.approx(figures["cost"] / 1e9)


FORKED_ON_REDIS = (
    _FORK_PRELUDE
    + r"""
settings = BudgetSettings(database_url=sys.argv[1], redis_url=sys.argv[2],
                          flush_interval_seconds=3600, redis_timeout_seconds=2)
own = BudgetEngine(settings) if sys.argv[4] == "own" else None  # an app's, given as engine=
middleware = BudgetWSGIMiddleware(app, settings, engine=own)
engine = middleware.engine
engine.counters.prefix = sys.argv[3]
key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}]).value
call(key)  # the master starts the engine on Redis (gunicorn --preload's warm-up)
pid = os.fork()
if pid == 0:  # a worker: serves a request on an engine of its own, collects its garbage, exits
    signal.alarm(20)  # (a worker that hangs is killed: its exit status says so)
    call(key)
    gc.collect()  # what the worker dropped of its parent's, collected (as it would be, later)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
after = [call(key) for _ in range(3)]  # the master, on its loop and its Redis connections
print(json.dumps({"child_exit": status, "after": after}))
"""
)


@pytest.mark.parametrize("engine", ["get_engine", "own"])
def test_a_worker_forked_from_a_master_on_redis_leaves_the_master_s_loop_serving(
    tmp_path: Path, engine: str
) -> None:
    """gunicorn `--preload` on Redis: the master started the engine, then forks a worker, which
    serves a request and collects what it dropped of the master's (its Redis client). Collected
    there, the master's connections' stream writers closed their transports, which unregistered
    their sockets from the epoll instance both processes share: the master never heard Redis's
    replies again (its next request a 503 after the 2 s timeout, "Redis unreachable:
    TimeoutError"). An engine the app made itself (`engine=`) was never started afresh in the
    worker at all: its first request hung for ever. Both serve (the seconds each took printed)."""
    need_redis()
    prefix = unique_prefix()
    try:
        done = subprocess.run(
            [sys.executable, "-c", FORKED_ON_REDIS, f"sqlite:///{tmp_path}/fork.db", REDIS_URL,
             prefix, engine],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(done.stdout, done.stderr[-2000:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["child_exit"] == 0
    assert [status for status, _ in figures["after"]] == ["200 OK"] * 3  # (503s before)
    assert "Redis unreachable" not in done.stderr


def test_calls_out_from_a_streamed_answer_are_charged_to_its_caller(
    make_settings: Settings,
) -> None:
    """SPEC §13 under WSGI: a call the app makes through `BudgetSyncTransport` is charged to
    the inbound caller, from the view and from the generator of a streamed answer alike."""
    from budget_middleware import BudgetSyncTransport

    settings = make_settings(flush_interval_seconds=3600)
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
    usage = {"prompt_tokens": 26, "completion_tokens": 20, "total_tokens": 46}
    completion = json.dumps(
        {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [choice],
         "usage": usage}
    ).encode()  # fmt: skip

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=completion, headers={"content-type": "application/json"})

    provider = httpx.Client(
        transport=BudgetSyncTransport(httpx.MockTransport(upstream), settings),
        base_url="https://api.openai.com",
    )
    app = Flask(__name__)

    @app.get("/plain")
    def plain() -> str:
        provider.post("/v1/chat/completions", json=chat())
        return "ok"

    @app.get("/streamed")
    def streamed() -> Response:
        def chunks() -> Iterator[bytes]:
            provider.post("/v1/chat/completions", json=chat())
            yield b"ok"

        return Response(chunks())

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings)  # type: ignore[method-assign]
    engine = engine_of(app)
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    client = app.test_client()
    for path in ("/plain", "/streamed"):
        assert client.get(path, headers=bearer(key.value or "")).status_code == 200
    provider.close()
    rows = records(engine)
    print(f"outbound calls charged to: {[r['virtual_key_id'] for r in rows]} (key {key.id})")
    assert [r["virtual_key_id"] for r in rows] == [key.id, key.id]


def test_a_file_answer_reaches_the_server_as_its_file_wrapper_in_an_app_that_calls_out(
    make_settings: Settings, tmp_path: Path
) -> None:
    """Once the app imports the transports, the caller is noted for every request: every
    answer but a list was wrapped to note it while iterated, a file too (Flask's `send_file`,
    Django's `FileResponse` hand the server its `wsgi.file_wrapper`). gunicorn sends a file by
    `sendfile()` only when the answer is its `FileWrapper`: a 300 MB download took 254 → 363 ms.
    Nothing of the app runs while a file is read: it goes to the server as it is."""
    from gunicorn.http.wsgi import FileWrapper

    import budget_middleware.outbound.transport  # noqa: F401  (an app that calls out)

    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 100_000)
    app = Flask(__name__)

    @app.get("/download")
    def download() -> Response:
        return send_file(data)

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/download", "SERVER_NAME": "t",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
               "wsgi.file_wrapper": FileWrapper}  # fmt: skip
    statuses: list[str] = []
    answer = app.wsgi_app(environ, lambda status, headers, *_: statuses.append(status))
    try:
        body = b"".join(answer)
    finally:
        answer.close()  # type: ignore[attr-defined]
    print(f"{statuses[0]}: the server got a {type(answer).__name__} of {len(body)} bytes")
    assert statuses == ["200 OK"] and len(body) == 100_000
    assert isinstance(answer, FileWrapper)  # gunicorn's test for sending it by sendfile()


def test_an_answer_dropped_without_close_frees_its_slot(make_settings: Settings) -> None:
    """A server that drops a streamed answer without calling `close()`: the answer is settled
    (a disconnect) when it is collected, and the key's one concurrency slot is free again."""
    import gc
    import time

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "text/event-stream")])
        for _ in range(5):
            yield b'data: {"choices":[{"delta":{"content":"w"}}]}\n\n'

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(
        name="k", rate_limit={"max_concurrent_requests": 1}, budgets=[{"max_limit": 10}]
    )
    client = Client(middleware)
    headers = bearer(key.value or "")
    first = client.post("/v1/chat/completions", json=chat(stream=True), headers=headers,
                        buffered=False)  # fmt: skip
    next(iter(first.response))  # one chunk, then dropped: no close()
    busy = client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert busy.status_code == 429  # its slot is held while the answer lives
    first.response = None  # type: ignore[assignment]
    del first
    gc.collect()
    deadline = time.monotonic() + 5
    while engine.registry.concurrency and any(
        slots.in_flight for slots in engine.registry.concurrency.values()
    ):
        assert time.monotonic() < deadline, "the dropped answer was never settled"
        time.sleep(0.01)
    again = client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    again.get_data()
    again.close()
    rows = records(engine)
    print(f"while held: {busy.status_code}; after collection: {again.status_code}; "
          f"outcomes {[r['outcome'] for r in rows]}")  # fmt: skip
    assert again.status_code == 200
    assert sorted(r["outcome"] for r in rows) == ["client_disconnected", "completed"]


@pytest.mark.parametrize("lock", ["free", "held"])
def test_a_dropped_answer_s_app_generator_is_closed_where_it_was_dropped(
    make_settings: Settings, lock: str
) -> None:
    """A proxy app relays a provider stream (`BudgetSyncTransport`) from a generator; the
    server drops the answer after one chunk, without `close()`. The settlement handed to the
    engine's loop held the answer, so the generator was closed there, later: the provider
    stream's settlement could not wait for the loop from the loop (the call never charged, its
    slot held for ever). Dropped by a thread holding `loop_lock` (a collector running inside an
    admission), its settlement waits for nothing either."""
    from budget_middleware import BudgetSyncTransport
    from budget_middleware.engine.portal import loop_lock

    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}

    class Events(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for _ in range(20):
                delta = {**chunk, "choices": [{"delta": {"content": "word "}}]}
                yield b"data: " + json.dumps(delta).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Events(), headers={"content-type": "text/event-stream"})

    settings = make_settings(flush_interval_seconds=3600)
    transport = BudgetSyncTransport(httpx.MockTransport(upstream), settings)
    provider = httpx.Client(transport=transport, base_url="https://api.openai.com")
    closed_in: list[str] = []

    def relay() -> Iterator[bytes]:
        try:
            with provider.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                yield from r.iter_raw()
        finally:
            closed_in.append(threading.current_thread().name)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "text/event-stream")])
        return relay()

    middleware = BudgetWSGIMiddleware(app, settings)
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 10}], rate_limit={"max_concurrent_requests": 2}
    )
    body = json.dumps(chat(stream=True)).encode()
    environ = posted(body, key.value)
    answer = middleware(environ, lambda status, headers, exc_info=None: lambda data: None)
    next(iter(answer))  # one chunk sent, then dropped: no close()
    if lock == "held":
        with loop_lock:
            del answer
    else:
        del answer
    deadline = time.monotonic() + 5
    while any(slots.in_flight for slots in engine.registry.concurrency.values()):
        assert time.monotonic() < deadline, "a dropped call was never settled"
        time.sleep(0.01)
    rows = records(engine)
    print(f"lock {lock}: the app's generator closed in {closed_in}; "
          f"records {[(r['direction'], r['outcome']) for r in rows]}")  # fmt: skip
    assert closed_in == [threading.current_thread().name]
    assert sorted(r["direction"] for r in rows) == ["inbound", "outbound"]


@pytest.mark.parametrize("kind", ["generator", "function", "empty chunk", "empty write"])
def test_an_app_failing_before_its_first_chunk_costs_nothing(
    make_settings: Settings, kind: str
) -> None:
    """The app raises after `start_response("200 OK")`, before any body (at its iterable's
    first `next()`, or in the call itself: a header the server refuses, say; or after an empty
    chunk or an empty `write()`, which send nothing, PEP 3333): nothing was sent, the server
    answers 500, and an error without usage costs nothing (SPEC §7), recorded as the 500 it
    was (the function was charged an estimate, as a 200; the empty chunk recorded a 200)."""

    def failing(environ: dict[str, Any], start_response: Any) -> None:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "application/json")])
        if kind == "empty write":
            write(b"")
        raise RuntimeError("the model backend failed")

    def generated(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "application/json")])
        if kind == "empty chunk":
            yield b""  # nothing sent: the server can still answer 500
        raise RuntimeError("the model backend failed")
        yield b""  # a generator

    app = failing if kind in ("function", "empty write") else generated

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    with pytest.raises(RuntimeError, match="backend failed"):  # werkzeug reads the first chunk
        Client(middleware).post("/v1/chat/completions", json=chat(), buffered=True,
                                headers=bearer(key.value or ""))  # fmt: skip
    rows = records(engine)
    print(f"failed before its first chunk: {rows}")
    assert [(r["outcome"], r["status"], r["cost_nanos"]) for r in rows] == [
        ("upstream_error", 500, 0)]  # fmt: skip


@pytest.mark.parametrize("how", ["chunk", "write"])
def test_a_stream_cut_within_its_first_event_is_charged_whether_or_not_usage_was_asked(
    make_settings: Settings, how: str
) -> None:
    """An app relays a provider's stream as its bytes come and the provider cuts it 40 bytes
    into its first event (SPEC §7: a stream cut upstream is charged an estimate). When the
    client asked for the usage chunk, those bytes went to the server: charged its input's
    estimate, 8,100 nano-USD, as under ASGI. When it did not, the middleware (which asked for
    it, to cut it out) holds an event's start until its end: nothing had gone, and the call was
    recorded as a 500 that cost $0. Bytes the app gave are its answer begun, held or not:
    5,850 (its body, without `stream_options`, is 15 tokens shorter)."""
    delta = {"choices": [{"delta": {"content": "hello " * 10}}]}
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini", **delta}
    event = b"data: " + json.dumps(chunk).encode()

    def relayed(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "text/event-stream")])
        if how == "write":
            write(event[:40])
        else:
            yield event[:40]
        raise ConnectionError("the provider reset the stream")

    middleware = BudgetWSGIMiddleware(relayed, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    charged = {}
    for asked in (True, False):
        body = chat(stream=True, **({"stream_options": {"include_usage": True}} if asked else {}))
        with pytest.raises(ConnectionError):
            Client(middleware).post("/v1/chat/completions", json=body, buffered=True,
                                    headers=bearer(key.value or ""))  # fmt: skip
        row = records(engine)[-1]
        charged[asked] = (row["status"], row["outcome"], row["estimated"], row["cost_nanos"])
    print(
        f"cut 40 bytes into its first event ({how}): usage asked {charged[True]}, "
        f"not asked {charged[False]}"
    )
    for status, outcome, estimated, cost in charged.values():  # (the body asking for usage
        assert (status, outcome, estimated) == (200, "upstream_error", True)  # is longer: its
        assert cost > 0  # input estimate is 15 tokens more)


@pytest.mark.parametrize("kind", ["function", "generator"])
def test_an_app_the_server_stops_mid_call_is_charged_as_under_asgi(
    make_settings: Settings, kind: str
) -> None:
    """gunicorn's default (`sync`) worker stops a request that outlives `--timeout` (30 s: a
    long LLM call) by raising SystemExit in it (its SIGABRT handler; Ctrl+C's SIGINT does
    likewise): the call was made, the provider bills it. It was recorded as the app's own
    failure, a 500 costing $0, and each such call was free; under ASGI a request the server
    cuts before its answer is charged its most output (as its reservation counted it). So it
    is under WSGI: a disconnect, charged that most."""

    def calling(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        raise SystemExit(1)  # raised in the provider call by the worker's signal handler

    def generated(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()  # a stream relayed: the call is made at the first next()
        raise SystemExit(1)
        yield b""  # a generator

    app = calling if kind == "function" else generated
    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(
        name="k", budgets=[{"max_limit": 10}], rate_limit={"max_concurrent_requests": 1}
    )
    environ = posted(json.dumps(chat(max_tokens=1000)).encode(), key.value or "")
    answer: Any = None
    with pytest.raises(SystemExit):
        answer = middleware(environ, lambda status, headers, exc_info=None: None)
        next(iter(answer))
    if answer is not None:
        answer.close()  # as the server does on its way out (`finally:`)
    rows = records(engine)
    print(f"{kind}: stopped by the server mid-call: {rows}")
    assert [(r["outcome"], r["estimated"], r["output_tokens"]) for r in rows] == [
        ("client_disconnected", 1, 1000)]  # fmt: skip
    assert rows[0]["cost_nanos"] > 0
    assert not any(slots.in_flight for slots in engine.registry.concurrency.values())


def test_a_body_shorter_than_its_content_length_is_not_admitted(make_settings: Settings) -> None:
    """A client gone mid-body: the app is not called, nothing is counted (ASGI's disconnect)."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].read())
        start_response("200 OK", [("content-type", "application/json")])
        return [b"{}"]

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(
        name="k", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
    )
    body = json.dumps(chat()).encode()
    environ = posted(body, key.value, **{"wsgi.input": io.BytesIO(body[:20])})
    statuses: list[str] = []
    answer = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(answer)
    full = Client(middleware).post("/v1/chat/completions", json=chat(),
                                   headers=bearer(key.value or ""))  # fmt: skip
    full.get_data()
    full.close()
    print(f"short body: {statuses}, app called {len(seen)} time(s); then {full.status_code}")
    assert statuses[0].startswith("400") and full.status_code == 200  # its one request is left
    assert seen == [body] and records(engine)[0]["status"] == 200


def test_a_content_length_past_int_s_digits_is_a_413_not_a_500(make_settings: Settings) -> None:
    """werkzeug's server (`flask run`) and wsgiref's (Django's `runserver`) put the
    Content-Length header in the environ as sent. One of 5,000 digits (past the 4,300 that
    `int()` reads) raised ValueError in the middleware: the server's 500, with a traceback. It
    is a length over any BUDGET_MAX_BODY_BYTES: the 413 a client is due, its body unread."""
    from werkzeug.serving import make_server

    called: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        called.append(environ["wsgi.input"].read())
        start_response("200 OK", [("content-type", "application/json")])
        return [COMPLETION]

    server = make_server("127.0.0.1", 0, BudgetWSGIMiddleware(app, make_settings()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\nContent-Length: " + b"9" * 5000 + b"\r\n"
                b"Connection: close\r\n\r\n" + json.dumps(chat()).encode()
            )
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
    finally:
        server.shutdown()
        thread.join(10)
    status = reply.split(b"\r\n", 1)[0].decode()
    print(f"a Content-Length of 5,000 digits: {status}")
    assert status.split()[1] == "413" and b"request_too_large" in reply
    assert called == []


def _serve(kind: str, app: Any) -> tuple[int, Callable[[], None]]:
    """`app` under a real server in a thread: werkzeug's (`flask run`), or wsgiref's (Django's
    `runserver` is one); its port, and how to stop it."""
    if kind == "werkzeug":
        from werkzeug.serving import make_server

        server: Any = make_server("127.0.0.1", 0, app, threaded=True)
    else:
        from wsgiref.simple_server import WSGIRequestHandler
        from wsgiref.simple_server import make_server as wsgiref_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        server = wsgiref_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(10)

    return server.server_port, stop


def _sent(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """A request sent raw on its own connection: its status and the answer's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + b"Connection: close\r\n\r\n" + body)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    header, _, rest = reply.partition(b"\r\n\r\n")
    return int(header.split()[1]), rest


@pytest.mark.parametrize("server", ["werkzeug", "wsgiref"])
def test_a_chunked_body_is_metered_as_the_app_reads_it(
    make_settings: Settings, server: str
) -> None:
    """A body sent `Transfer-Encoding: chunked` (no Content-Length). werkzeug's server decodes
    it (`wsgi.input_terminated`): the middleware and the app read the same gpt-4o request, and
    it is charged at gpt-4o's price. wsgiref's (and Django's `runserver`, built on it) does not:
    the input is the raw socket with no length, so the app reads no body, as it would without
    the middleware (Flask's and Django's requests read none), and the middleware meters that
    empty body: no model, nothing served past a budget that the chunked body could dodge."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        seen.append(body)
        if not body:  # what a provider answers a request with no body
            start_response("400 Bad Request", [("content-type", "application/json")])
            return [b'{"error": {"message": "no body"}}']
        model = json.loads(body)["model"]
        answer = {"model": model, "choices": [{"message": {"content": "hi"}}],
                  "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}  # fmt: skip
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(answer).encode()]

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    body = json.dumps(chat(model="gpt-4o")).encode()
    port, stop = _serve(server, middleware)
    try:
        status, _ = _sent(
            port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + (key.value or "").encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        )
    finally:
        stop()
    (record,) = records(engine)
    print(
        f"{server}, a chunked gpt-4o request: {status}; the app read {len(seen[0])} of "
        f"{len(body)} bytes; metered as {record['provider']}/{record['model']}, "
        f"{record['cost_nanos']} nano-USD"
    )
    if server == "werkzeug":
        assert status == 200 and seen == [body]
        assert record["model"] == "gpt-4o" and record["cost_nanos"] == 12_500_000  # $2.50 + $10
    else:
        assert status == 400 and seen == [b""]
        assert record["model"] == "unknown" and record["cost_nanos"] == 0


@pytest.mark.parametrize("kind", ["json", "stream"])
def test_an_answer_given_as_the_server_s_file_wrapper_is_measured_and_sent_whole(
    make_settings: Settings, tmp_path: Path, kind: str
) -> None:
    """An app that answers with a file through the server's `wsgi.file_wrapper` (an answer
    recorded to disk, replayed): the server gets the middleware's answer, which reads the file
    through the wrapper and measures it (never the file's `sendfile()`, which the middleware
    could not read), and the client gets every byte. Here under wsgiref's server (Django's
    `runserver`); the same under gunicorn, waitress and uWSGI (a fault hunt's, through those
    servers in subprocesses)."""
    words = " ".join(f"w{i}" for i in range(20_000))
    usage = {"prompt_tokens": 1000, "completion_tokens": 20_000}
    path = tmp_path / "answer"
    if kind == "json":
        answer = {"model": "gpt-4o-mini", "choices": [{"message": {"content": words}}]}
        path.write_text(json.dumps({**answer, "usage": usage}))
    else:
        event = {"model": "gpt-4o-mini", "choices": [{"delta": {"content": words}}]}
        last = json.dumps({"choices": [], "usage": usage})
        path.write_text(f"data: {json.dumps(event)}\n\ndata: {last}\n\ndata: [DONE]\n\n")
    data = path.read_bytes()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.input"].read()
        kind_of = "text/event-stream" if kind == "stream" else "application/json"
        start_response("200 OK", [("content-type", kind_of), ("content-length", str(len(data)))])
        return environ["wsgi.file_wrapper"](path.open("rb"), 8192)

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    asked = {"stream": True, "stream_options": {"include_usage": True}} if kind == "stream" else {}
    body = json.dumps(chat(**asked)).encode()
    port, stop = _serve("wsgiref", middleware)
    try:
        status, got = _sent(
            port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + (key.value or "").encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n",
            body,
        )
    finally:
        stop()
    (record,) = records(engine)
    print(
        f"wsgiref, a {kind} answer of {len(data)} bytes as a file: {status}, {len(got)} bytes "
        f"sent, charged {record['cost_nanos']} nano-USD ({record['outcome']})"
    )
    assert status == 200 and got == data
    assert record["cost_nanos"] == 12_150_000  # 1,000 in at $0.15, 20,000 out at $0.60 a Mtok
    assert record["outcome"] == "completed" and not record["estimated"]


class InParts(Sent):
    """An input that reads at most 7 bytes a call (a raw socket's, unbuffered: PEP 3333 lets
    `read(n)` return fewer than `n` before the end)."""

    def read(self, size: int = -1) -> bytes:
        return super().read(7 if size < 0 else min(size, 7))


def test_a_body_an_input_reads_in_parts_is_read_whole(make_settings: Settings) -> None:
    """The body was read with one `read(length)`: an input giving it in parts was answered 400
    `incomplete_body` though the client sent it all (nothing served). It is read to its
    length; a body that does end short is still a 400."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].read())
        start_response("200 OK", [("content-type", "application/json")])
        return [b"{}"]

    middleware = BudgetWSGIMiddleware(app, make_settings(flush_interval_seconds=3600))
    engine = middleware.engine
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k")
    body = json.dumps(chat()).encode()
    statuses: list[str] = []
    for sent in (InParts(body), InParts(body[:50])):
        environ = posted(body, key.value, **{"wsgi.input": sent})
        answer = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
        b"".join(answer)
    print(f"read in parts, whole then short: {statuses}; the app got {[len(b) for b in seen]}")
    assert [s[:3] for s in statuses] == ["200", "400"] and seen == [body]
    assert len(records(engine)) == 1
    # The WSGI admin API read its body the same way: a key's JSON cut at 7 bytes, a 422.
    admin = create_admin_wsgi_app(make_settings())
    created = json.dumps({"name": "in-parts"}).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/virtual-keys", "SERVER_NAME": "t",
               "SERVER_PORT": "80", "wsgi.input": InParts(created),
               "CONTENT_LENGTH": str(len(created)), "CONTENT_TYPE": "application/json",
               "HTTP_AUTHORIZATION": "Bearer admin-secret"}  # fmt: skip
    answered: list[str] = []
    b"".join(admin(environ, lambda status, headers, *_: answered.append(status)))
    print(f"the admin API, the body read in parts: {answered}")
    assert answered[0][:3] == "201"


@pytest.mark.parametrize("counters", ["in process", "redis"])
def test_a_request_with_an_unknown_or_missing_key_is_answered_before_its_body_is_read(
    make_settings: Settings, counters: str
) -> None:
    """A client with no valid key could make a server thread read (and hold) a body of up to
    BUDGET_MAX_BODY_BYTES before the middleware answered 401: the key is checked first, the
    body left unread; a known key's request is read once and served, and so is an unknown
    key's in shadow mode. In process (admitted in the thread) and on Redis (on the loop)."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].read())
        start_response("200 OK", [("content-type", "application/json")])
        return [COMPLETION]

    prefix = unique_prefix()
    redis = {}
    if counters == "redis":
        need_redis()
        redis = {"redis_url": REDIS_URL}
    enforced = BudgetWSGIMiddleware(app, make_settings(require_virtual_key=True, **redis))
    shadow = BudgetWSGIMiddleware(app, engine=get_engine(make_settings(mode="shadow", **redis)))
    if counters == "redis":
        for middleware in (enforced, shadow):
            middleware.engine.counters.prefix = prefix  # type: ignore[attr-defined]
    key = enforced.engine.manager.create_virtual_key(name="alice")
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * 100_000}])).encode()
    found: dict[str, tuple[str, int, int]] = {}
    try:
        for name, middleware, authorization in (
            ("unknown", enforced, "Bearer sk-bm-not-a-key"),
            ("missing", enforced, None),
            ("known", enforced, f"Bearer {key.value}"),
            ("unknown, shadow mode", shadow, "Bearer sk-bm-not-a-key"),
        ):
            sent = Sent(body)
            environ = posted(body, "", **{"wsgi.input": sent})
            del environ["HTTP_AUTHORIZATION"]
            if authorization is not None:
                environ["HTTP_AUTHORIZATION"] = authorization
            statuses: list[str] = []
            b"".join(middleware(environ, lambda status, headers, *_, i=statuses: i.append(status)))
            found[name] = (statuses[0][:3], sent.reads, sent.read_bytes)
    finally:
        if counters == "redis":
            delete_prefix(REDIS_URL, prefix)
    print(f"{counters}: status, reads and bytes read of {len(body)}: {found}")
    assert found == {
        "unknown": ("401", 0, 0),
        "missing": ("401", 0, 0),
        "known": ("200", 1, len(body)),
        "unknown, shadow mode": ("200", 1, len(body)),
    }
    assert seen == [body, body]  # the apps got the body read once


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_key_the_store_cannot_vouch_for_is_answered_before_its_body_is_read(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch, fail_open: bool
) -> None:
    """The store gone while a key is not cached: fail closed, a 503 with the body unread; fail
    open, a key this process has seen valid is served (its body read once), one it has never
    seen is a 503 with its body unread."""
    from budget_middleware.exceptions import ServiceUnavailable

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "application/json")])
        return [COMPLETION]

    middleware = BudgetWSGIMiddleware(app, make_settings(fail_open=fail_open))
    engine = middleware.engine
    seen = engine.manager.create_virtual_key(name="seen").value or ""
    never = engine.manager.create_virtual_key(name="never").value or ""
    body = json.dumps(chat()).encode()

    def call(key: str) -> tuple[str, int]:
        sent = Sent(body)
        statuses: list[str] = []
        environ = posted(body, key, **{"wsgi.input": sent})
        b"".join(middleware(environ, lambda status, headers, *_, i=statuses: i.append(status)))
        return statuses[0][:3], sent.read_bytes

    assert call(seen) == ("200", len(body))  # the key seen valid (and cached)
    on_loop(engine, engine.invalidate)  # no longer cached: the next request asks the store

    async def gone(value: str) -> None:
        raise ServiceUnavailable("the store cannot be reached")

    monkeypatch.setattr(engine, "lookup_key", gone)
    found = {"seen": call(seen), "never seen": call(never)}
    print(f"store gone, fail_open={fail_open}: status and bytes read of {len(body)}: {found}")
    assert found == {
        "seen": ("200", len(body)) if fail_open else ("503", 0),
        "never seen": ("503", 0),
    }


@pytest.mark.parametrize("method", ["post", "Post"])
def test_a_post_in_lower_case_is_metered_as_flask_serves_it(
    make_settings: Settings, method: str
) -> None:
    """werkzeug's routing and Django upper-case the method, so `post` reaches the POST view
    (werkzeug's and Django's development servers pass it on): it passed unmetered, past every
    limit (a 1-an-hour key: 200, 429, then 200 200 200, the view run each time)."""
    app = flask_host(make_settings())
    engine = engine_of(app)
    key = engine.manager.create_virtual_key(
        name="k", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
    )
    client = Client(app)
    statuses = [
        client.open(
            "/v1/chat/completions", method=m, json=chat(), headers=bearer(key.value)
        ).status_code
        for m in ("POST", method, method)
    ]
    rows = records(engine)
    print(f"POST then {method} twice: {statuses}; usage records {len(rows)}")
    assert statuses == [200, 429, 429] and len(rows) == 1


def test_a_second_status_the_server_refuses_leaves_the_answer_measured(
    make_settings: Settings,
) -> None:
    """An app that calls `start_response` again without `exc_info` after its body began: the
    server refuses it (PEP 3333: an AssertionError), and the client got the 200 stream. It was
    measured as a 500 of $0: the new status had replaced what was read."""
    events = [
        b"data: " + json.dumps({"choices": [{"delta": {"content": f"word{i} "}}]}).encode()
        for i in range(20)
    ]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "text/event-stream")])
        for line in events:
            yield line + b"\n\n"
        start_response("500 Internal Server Error", [("content-type", "text/plain")])
        yield b"oops"

    wrapped = BudgetWSGIMiddleware(app, make_settings())
    engine = wrapped.engine
    key = engine.manager.create_virtual_key(name="k")
    started: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if started and exc_info is None:
            raise AssertionError("headers already set")  # as gunicorn and waitress do
        started.append(status)
        return lambda data: None

    body = json.dumps(chat(stream=True)).encode()
    environ = posted(body, key.value)
    answer = wrapped(environ, start_response)
    sent = []
    with pytest.raises(AssertionError):
        for chunk in answer:
            sent.append(chunk)
    answer.close()  # type: ignore[attr-defined]
    rows = records(engine)
    print(f"{len(sent)} chunks sent under {started}; recorded {rows}")
    assert len(sent) == 20 and len(rows) == 1
    assert (rows[0]["status"], rows[0]["estimated"]) == (200, 1) and rows[0]["cost_nanos"] > 0


def test_an_app_answering_no_iterable_fails_as_a_500_of_nothing(make_settings: Settings) -> None:
    """An app that returns None after `start_response("200 OK")`: the server answers 500. It
    was charged as a 200 (the prompt, estimated), and the answer's `close()` raised too."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.input"].read()
        start_response("200 OK", [("content-type", "application/json")])
        return None

    wrapped = BudgetWSGIMiddleware(app, make_settings())
    engine = wrapped.engine
    key = engine.manager.create_virtual_key(name="k")
    body = json.dumps(chat()).encode()
    environ = posted(body, key.value)
    answer = wrapped(environ, lambda status, headers, exc_info=None: None)
    with pytest.raises(TypeError):
        next(iter(answer))
    answer.close()  # type: ignore[attr-defined]
    rows = records(engine)
    print("recorded", rows)
    assert [(r["status"], r["cost_nanos"]) for r in rows] == [(500, 0)]


@pytest.mark.parametrize("how", ["write", "generator"])
def test_a_client_gone_under_write_is_a_disconnect(make_settings: Settings, how: str) -> None:
    """A client gone while the app sends with PEP 3333's `write()`: the server's `write` raises
    (waitress's `ClientDisconnected`, gunicorn's `BrokenPipeError`) through the app. It was
    recorded as an `upstream_error`; a generator's answer given up the same way is a
    `client_disconnected`, as ASGI's is. Both are now, estimated from what was streamed."""
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events = [
        b"data: " + json.dumps({**base, "choices": [{"delta": {"content": f"w{i} "}}]}).encode()
        for i in range(20)
    ]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "text/event-stream")])
        if how == "generator":
            return iter([event + b"\n\n" for event in events])
        for event in events:
            write(event + b"\n\n")
        return iter([])

    wrapped = BudgetWSGIMiddleware(app, make_settings())
    engine = wrapped.engine
    key = engine.manager.create_virtual_key(name="k", rate_limit={"max_concurrent_requests": 1})
    sent: list[bytes] = []

    def send(data: bytes) -> None:  # the server's: the client is gone after 3 events
        if len(sent) == 3:
            raise ConnectionResetError("client gone")
        sent.append(data)

    environ = posted(json.dumps(chat(stream=True)).encode(), key.value or "")
    answer: Any = None
    with pytest.raises(ConnectionResetError):
        answer = wrapped(environ, lambda status, headers, exc_info=None: send)
        for chunk in answer:
            send(chunk)
    if answer is not None:
        answer.close()  # as the server does with what it was given
    rows = records(engine)
    print(f"{how}: {len(sent)} events sent; recorded {rows}")
    assert len(sent) == 3
    assert [(r["status"], r["outcome"], r["estimated"]) for r in rows] == [
        (200, "client_disconnected", 1)]  # fmt: skip
    assert not any(slots.in_flight for slots in engine.registry.concurrency.values())


def test_a_client_gone_under_write_that_the_app_stops_for_is_a_disconnect(
    make_settings: Settings,
) -> None:
    """An app relaying with PEP 3333's `write()` that stops when the server says its client is
    gone (`except OSError: break`) and returns normally: the answer then ends, but not where its
    stream does. It was recorded as `completed`; it is a `client_disconnected`, as when the
    error goes through the app (the test above), and as under ASGI."""
    base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events = [
        b"data: " + json.dumps({**base, "choices": [{"delta": {"content": f"w{i} "}}]}).encode()
        for i in range(20)
    ]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("content-type", "text/event-stream")])
        for event in events:
            try:
                write(event + b"\n\n")
            except OSError:
                break  # the client is gone: stop relaying
        return []

    wrapped = BudgetWSGIMiddleware(app, make_settings())
    engine = wrapped.engine
    key = engine.manager.create_virtual_key(name="k", rate_limit={"max_concurrent_requests": 1})
    sent: list[bytes] = []

    def send(data: bytes) -> None:  # the server's: the client is gone after 3 events
        if len(sent) == 3:
            raise ConnectionResetError("client gone")
        sent.append(data)

    environ = posted(json.dumps(chat(stream=True)).encode(), key.value or "")
    answer: Any = wrapped(environ, lambda status, headers, exc_info=None: send)
    for chunk in answer:
        send(chunk)
    answer.close()
    rows = records(engine)
    print(f"{len(sent)} events sent; recorded {rows}")
    assert len(sent) == 3
    assert [(r["status"], r["outcome"], r["estimated"]) for r in rows] == [
        (200, "client_disconnected", 1)]  # fmt: skip
    assert not any(slots.in_flight for slots in engine.registry.concurrency.values())


@pytest.mark.parametrize("when", ["while admitted", "once admitted"])
def test_a_request_whose_thread_stops_waiting_for_its_admission_gives_its_slot_back(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch, when: str, sigint_raises: None
) -> None:
    """On Redis the engine's loop admits while the server's thread waits. A thread that stops
    waiting (a signal-based request timeout, Ctrl+C under `flask run --without-threads`) never
    calls the app: an admission that went through all the same is settled as a disconnect, at
    no cost, so its slot and reservation go back (as `BudgetSyncTransport` does). They were
    held for the process's life (its heartbeat kept them in Redis): every later request of a
    key of one slot was refused 429."""
    import _thread
    import signal

    need_redis()
    prefix = unique_prefix()
    called: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        called.append(1)
        start_response("200 OK", [("content-type", "application/json")])
        return [COMPLETION]

    middleware = BudgetWSGIMiddleware(
        app, make_settings(redis_url=REDIS_URL, flush_interval_seconds=3600, reserve=True)
    )
    engine = middleware.engine
    engine.counters.prefix = prefix  # type: ignore[attr-defined]
    admit = engine.admit
    admitted = threading.Event()

    async def interrupted(*args: Any) -> Any:  # the loop's admission, under way
        if when == "while admitted":  # a real signal: it wakes the thread from its wait
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt in the thread waiting
            await asyncio.sleep(0.2)  # gone before the admission is handed over
        ticket = await admit(*args)
        if when == "once admitted":  # the thread is told as the admission is handed over
            _thread.interrupt_main()
        admitted.set()
        return ticket

    statuses: list[int] = []
    try:
        on_loop(engine, engine.ensure_started)
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1}], rate_limit={"max_concurrent_requests": 1}
        )
        client = Client(middleware)
        headers = bearer(key.value or "")
        statuses.append(client.post("/v1/chat/completions", json=chat(), headers=headers,
                                    buffered=True).status_code)  # fmt: skip
        monkeypatch.setattr(engine, "admit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            client.post("/v1/chat/completions", json=chat(), headers=headers, buffered=True)
        monkeypatch.undo()
        assert admitted.wait(5)
        time.sleep(0.2)  # the loop's next steps: the admission let go, or not
        for _ in range(2):
            statuses.append(client.post("/v1/chat/completions", json=chat(), headers=headers,
                                        buffered=True).status_code)  # fmt: skip
        rows = records(engine)
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(f"thread stopped waiting {when}: app called {len(called)} times; then {statuses[1:]}; "
          f"records {[(r['outcome'], r['status'], r['cost_nanos']) for r in rows]}")  # fmt: skip
    assert statuses == [200, 200, 200] and len(called) == 3
    assert sorted((r["outcome"], r["cost_nanos"]) for r in rows)[0] == ("client_disconnected", 0)


def test_a_call_out_under_a_test_client_s_header_beyond_latin_1_is_charged_to_its_caller(
    make_settings: Settings,
) -> None:
    """Flask's and Django's test clients put a header's text in the environ as given, beyond
    latin-1 too (`x-budget-tags: 产品`): the middleware reads it inbound as the tag it names.
    A call the app then made out through `BudgetSyncTransport` failed (the caller's headers
    were encoded to latin-1 for it: UnicodeEncodeError, a 500); it is charged to the caller."""
    from budget_middleware import BudgetSyncTransport

    settings = make_settings(flush_interval_seconds=3600)

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=COMPLETION, headers={"content-type": "application/json"})

    provider = httpx.Client(
        transport=BudgetSyncTransport(httpx.MockTransport(upstream), settings),
        base_url="https://api.openai.com",
    )
    app = Flask(__name__)

    @app.get("/ask")
    def ask() -> str:
        provider.post("/v1/chat/completions", json=chat())
        return "ok"

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings)  # type: ignore[method-assign]
    engine = engine_of(app)
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    client = app.test_client()
    statuses = [
        client.get("/ask", headers={**bearer(key.value or ""), "x-budget-tags": tag}).status_code
        for tag in ("café", "产品")
    ]
    provider.close()
    rows = records(engine)
    print(f"calls out under a tag beyond latin-1: {statuses}, charged to "
          f"{[r['virtual_key_id'] for r in rows]} (key {key.id})")  # fmt: skip
    assert statuses == [200, 200]
    assert [(r["virtual_key_id"], r["direction"]) for r in rows] == [(key.id, "outbound")] * 2


def test_a_key_header_sent_twice_counts_by_its_first_value_as_under_asgi(
    make_settings: Settings,
) -> None:
    """A header sent twice reaches a WSGI app as one value, joined with commas (gunicorn
    `a,b`, waitress and werkzeug `a, b`: PEP 3333 has one value a name). The ASGI middleware
    reads such a header by its first value (SPEC §15: the same checks and codes); the WSGI one
    read the joined text as the key, and refused a valid key sent twice 401 (a client's default
    header and its own, a proxy adding the key it was given). The first counts now, and a key
    chosen with a comma in it is still itself."""
    app = flask_host(make_settings(flush_interval_seconds=3600))
    engine = engine_of(app)
    on_loop(engine, engine.ensure_started)
    manager = engine.manager
    first = manager.create_virtual_key(name="first", budgets=[{"max_limit": 10}])
    second = manager.create_virtual_key(name="second", budgets=[{"max_limit": 10}])
    comma = manager.create_virtual_key(name="comma", value="sk-bm-with,comma")
    client = Client(app)
    cases = {
        "the same key twice": [("authorization", f"Bearer {first.value}")] * 2,
        "two keys": [("authorization", f"Bearer {first.value}"),
                     ("authorization", f"Bearer {second.value}")],
        "x-api-key twice": [("x-api-key", first.value or ""), ("x-api-key", second.value or "")],
        "a key with a comma": [("authorization", "Bearer sk-bm-with,comma")],
        "an unknown key first": [("authorization", "Bearer sk-bm-nobody"),
                                 ("authorization", f"Bearer {first.value}")],
    }  # fmt: skip
    statuses = {}
    for name, headers in cases.items():
        answer = client.post("/v1/chat/completions", json=chat(), headers=headers)
        answer.get_data()
        statuses[name] = answer.status_code
    rows = records(engine)
    print(f"a key header sent twice: {statuses}")
    assert statuses == {
        "the same key twice": 200,
        "two keys": 200,
        "x-api-key twice": 200,
        "a key with a comma": 200,
        "an unknown key first": 401,  # as under ASGI: the first value counts
    }
    assert [r["virtual_key_id"] for r in rows] == [first.id, first.id, first.id, comma.id]


def test_the_azure_openai_sdk_s_api_key_header_carries_a_virtual_key_under_wsgi(
    make_settings: Settings,
) -> None:
    """Azure OpenAI's SDK sends its key as `api-key`, which the ASGI middleware reads (SPEC §15:
    the same checks and codes). The WSGI one read only `x-api-key` and `x-goog-api-key`: a key
    with a $0 budget there was served (200, the key's limits skipped) and an unknown one too."""
    import openai

    app = flask_host(make_settings())
    engine = engine_of(app)
    on_loop(engine, engine.ensure_started)
    spent = engine.manager.create_virtual_key(name="spent", budgets=[{"max_limit": 0}])
    statuses: dict[str, int] = {}
    for name, value in (("a key with a $0 budget", spent.value or ""),
                        ("an unknown key", "sk-bm-nobody")):  # fmt: skip
        sdk = openai.AzureOpenAI(
            azure_endpoint="http://test",
            api_version="2024-10-21",
            api_key=value,
            max_retries=0,
            http_client=httpx.Client(transport=httpx.WSGITransport(app=app)),
        )
        try:
            sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            statuses[name] = 200
        except openai.APIStatusError as exc:
            statuses[name] = exc.status_code
    print("Azure OpenAI SDK under WSGI, the key in api-key:", statuses)
    assert statuses == {"a key with a $0 budget": 402, "an unknown key": 401}
    assert records(engine) == []  # neither was served


def test_a_flask_view_finds_who_is_calling_from_its_request_as_a_django_view_does(
    make_settings: Settings,
) -> None:
    """`budget_state(request)` finds the caller of a Django request (under either handler); a
    Flask view passing its `request` the same way got None, as if the request were not
    metered (only `request.environ` worked). A werkzeug request is read through its environ."""
    app = Flask(__name__)

    @app.post("/v1/who/completions")
    def who() -> dict[str, Any]:
        state = budget_state(request)
        return {"key": None if state is None else state.virtual_key_id, "usage": {}}

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, make_settings())  # type: ignore[method-assign]
    engine = engine_of(app)
    on_loop(engine, engine.ensure_started)
    key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
    answer = app.test_client().post("/v1/who/completions", json=chat(),
                                    headers=bearer(key.value or ""))  # fmt: skip
    print(f"budget_state(request) in a Flask view: {answer.json}")
    assert answer.status_code == 200 and answer.json["key"] == key.id


def test_greenlet_workers_are_refused_with_what_to_use_instead(
    make_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under gunicorn `-k gevent` (threading patched into greenlets), every metered request was
    a 503 "the budget store cannot be reached" and every admin call a 500 about an event loop:
    the sync adapters now say what is wrong, and what to use, at their first call."""
    import types

    from budget_middleware.engine import portal
    from budget_middleware.exceptions import ConfigurationError

    monkey = types.ModuleType("gevent.monkey")
    monkey.is_module_patched = lambda name: name == "threading"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gevent.monkey", monkey)
    monkeypatch.setattr(portal, "_background", None)
    app = flask_host(make_settings())
    with pytest.raises(ConfigurationError, match="gthread") as raised:
        app.test_client().post("/v1/chat/completions", json=chat(), headers=bearer("sk-bm-x"))
    print("refused with:", raised.value)
    admin = create_admin_wsgi_app(make_settings())
    with pytest.raises(ConfigurationError, match="gevent or eventlet"):
        Client(admin).get("/health", headers=ADMIN)
    monkeypatch.setattr(monkey, "is_module_patched", lambda name: False)
    assert app.test_client().get("/hello").text == "hello"  # gevent imported, not patched: served
    answer = app.test_client().post("/v1/chat/completions", json=chat(), headers=bearer("sk-bm-x"))
    assert answer.status_code == 401  # the engine started: an unknown key, not a store failure


def test_a_request_through_the_middleware_twice_is_counted_and_charged_once(
    make_settings: Settings,
) -> None:
    """Wrapped twice (`app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app)` in the app's module
    and again where it is served): a key limited to 2 requests an hour was refused its second,
    each call charged by both. The inner one passes on what its engine already metered."""
    settings = make_settings()
    app = flask_host(settings)
    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings=settings)  # type: ignore[method-assign]
    engine = engine_of(app)
    key = engine.manager.create_virtual_key(
        name="alice", rate_limit={"request_max_limit": 2, "request_reset_duration": "1h"}
    ).value
    client = Client(app)
    statuses = [
        client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code
        for _ in range(2)
    ]
    rows = records(engine)
    print("statuses", statuses, "usage records", len(rows), "for 2 requests")
    assert statuses == [200, 200]
    assert len(rows) == 2


async def test_a_wsgi_app_an_asgi_app_mounts_is_metered_once_by_the_outer_middleware(
    make_settings: Settings,
) -> None:
    """A FastAPI/Starlette app with `BudgetMiddleware` mounting a Flask app through Starlette's
    `WSGIMiddleware` (FastAPI's documented way), the Flask app metered on its own too, one
    engine: the environ is built afresh, without the scope's mark, so each request was counted
    and charged twice (a key allowed 3 requests an hour refused its second). The inner
    middleware passes on what the outer one meters (`metering`, a context variable)."""
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning
    from starlette.routing import Mount

    with warnings.catch_warnings():  # Starlette's, deprecated for a2wsgi's (which copies the
        warnings.simplefilter("ignore", StarletteDeprecationWarning)  # context as it does)
        from starlette.middleware.wsgi import WSGIMiddleware

    settings = make_settings(flush_interval_seconds=3600)
    flask_app = flask_host(settings)
    app = BudgetMiddleware(
        Starlette(routes=[Mount("/legacy", WSGIMiddleware(flask_app))]), settings
    )
    engine = app.engine
    assert engine is engine_of(flask_app)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"request_max_limit": 3, "request_reset_duration": "1h"}
        )
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            statuses = [
                (
                    await client.post(
                        "/legacy/v1/chat/completions", json=chat(), headers=bearer(key.value or "")
                    )
                ).status_code
                for _ in range(4)
            ]
        await engine.flush()
        with engine.store.engine.connect() as conn:
            costs = [c for (c,) in conn.execute(text("SELECT cost_nanos FROM bm_usage_records"))]
    print(f"4 requests through both middlewares: {statuses}; records {costs}")
    assert statuses == [200, 200, 200, 429]
    assert costs == [PRICE_NANOS] * 3


def test_tag_header_lines_are_one_list_under_asgi_as_under_wsgi(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A gateway's `x-budget-tags` line and the client's: a WSGI server joins them (PEP 3333),
    so both lines' tags count; the ASGI middleware read the first line alone, and a tag budget
    named on the second never applied there (200 where WSGI answered 402)."""
    tiny = [{"max_limit": 0.000001}]  # spent by one call
    lines = [("x-budget-tags", "product:chat"), ("x-budget-tags", "team:capped")]
    flask_app = flask_host(make_settings(flush_interval_seconds=3600))
    manager = engine_of(flask_app).manager
    manager.put_tag("team:capped", budgets=tiny)
    key = manager.create_virtual_key(name="alice").value or ""
    client = Client(flask_app)
    wsgi = [
        client.post(
            "/v1/chat/completions",
            json=chat(),
            headers=[*bearer(key).items(), *lines],
            buffered=True,  # read whole: settled before the next
        )
        for _ in range(2)
    ]

    async def upstream(request: Request) -> StarletteResponse:
        await request.body()
        return StarletteResponse(COMPLETION, media_type="application/json")

    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/asgi.db", admin_key="admin")
    routes = [Route("/v1/chat/completions", upstream, methods=["POST"])]
    asgi_app = BudgetMiddleware(Starlette(routes=routes), settings=settings)

    async def through_asgi() -> list[int]:
        async with running(asgi_app):
            asgi_manager = get_engine(settings).manager
            asgi_manager.put_tag("team:capped", budgets=tiny)
            value = asgi_manager.create_virtual_key(name="alice").value or ""
            headers = [*bearer(value).items(), *lines]
            transport = httpx.ASGITransport(asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return [
                    (await c.post("/v1/chat/completions", json=chat(), headers=headers)).status_code
                    for _ in range(2)
                ]

    asgi = asyncio.run(through_asgi())
    statuses = [answer.status_code for answer in wsgi]
    print(f"two tag lines, the second's budget spent by one call: WSGI {statuses}, ASGI {asgi}")
    assert statuses == asgi == [200, 402]


def test_a_head_request_to_the_wsgi_admin_api_gets_headers_alone(make_settings: Settings) -> None:
    """HEAD answers headers only, the body's length told, as uvicorn sends the ASGI admin
    API's. The WSGI app gave the JSON body as well, which waitress sent after the headers."""
    admin = create_admin_wsgi_app(make_settings())
    client = Client(admin)
    got = client.get("/health")
    head = client.head("/health")
    print(f"GET {got.status_code} {len(got.data)} bytes; HEAD {head.status_code} {len(head.data)}")
    assert (head.status_code, head.data) == (200, b"")
    assert head.headers["content-length"] == str(len(got.data)) != "0"


def _window_in_redis(client: redis.Redis, budget_id: str) -> int:
    """Redis's value of the budget's window key (0: none)."""
    keys = list(client.scan_iter(match=f"bm:w:budget:{budget_id}:*"))
    return sum(int(client.get(k) or 0) for k in keys)


@pytest.mark.parametrize("how", ["stalled", "gone", "quiet"])
def test_a_settlement_redis_took_after_an_empty_restart_is_not_added_again(
    make_settings: Settings, how: str
) -> None:
    """Two instances (two gunicorn workers, say) on one Redis, which restarts empty while
    streams of the first end: their settlements go unanswered (`stalled`: SIGSTOP, then killed)
    or are owed (`gone`: the second, during the back-off), or are taken by the emptied Redis
    before the first has called it at all (`quiet`). The second instance seeds the window key
    from the store (plus what it has not written). The first then adds those settlements to
    that key (`settled_once.lua`, `reconcile.lua`, `settle.lua`) before its heartbeat finds its
    mark gone, which owed again every charge it had not written, those included: each stream
    was counted twice in Redis. Under gunicorn (2 workers x 8 threads, Redis killed and
    restarted empty mid-load) Redis held 200 requests' price for 196 or 198 admitted: the
    budget refused early."""
    with private_redis() as server:
        common: dict[str, Any] = {
            "redis_url": server.url,
            "redis_timeout_seconds": 0.3,
            "flush_interval_seconds": 3600,  # nothing written: Redis is the only live count
        }
        # Distinct settings: two engines, as two worker processes have. The first beats
        # every 10 s, the second every 0.5 s (its admission waits out its fence, 1 s): the
        # second seeds the key before the first's heartbeat finds Redis emptied.
        first = flask_host(make_settings(slot_ttl_seconds=30, **common))
        second = flask_host(make_settings(slot_ttl_seconds=1.5, **common))
        a, b = engine_of(first), engine_of(second)
        assert a is not b
        key = a.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1}])
        budget_id = key.budgets[0].id
        client = redis.Redis(port=server.port)

        def ask(app: Any) -> int:
            answer = app.test_client().post(
                "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
            )
            return int(answer.status_code)

        assert ask(first) == 200 and ask(second) == 200  # both know the key, both marked
        # Streams on the first, their last chunks read while Redis is stalled (the settlement
        # goes unanswered) or gone (the first's goes unanswered, the next is owed: back-off).
        streams = []
        for _ in range(1 if how == "stalled" else 2):
            answer = first.test_client().post(
                "/v1/chat/completions",
                json=chat(stream=True),
                headers={**bearer(key.value), "x-words": "5"},
            )
            chunks = iter(answer.response)  # the middleware's iterable, under way
            got = next(chunks) + next(chunks)
            assert got.startswith(b"data: ")
            streams.append((answer, chunks, got))
        assert server.process is not None
        if how == "quiet":  # gone and back while the first calls nothing
            server.kill(keep_data=False)
            server.start()
            assert ask(second) == 200  # seeds the window key
        elif how == "stalled":
            server.process.send_signal(signal.SIGSTOP)
        else:
            server.kill(keep_data=False)
        for answer, chunks, got in streams:
            rest = got + b"".join(chunks)  # the last chunk settles
            answer.close()
            assert b"[DONE]" in rest
        if how != "quiet":
            server.kill(keep_data=False)  # (stalled, then gone): back empty
            server.start()
            time.sleep(0.5)  # the first's back-off over
            assert ask(second) == 200  # seeds the window key (the store holds nothing yet)
        time.sleep(10.5)  # the first's heartbeat round: debts paid, then the beat
        assert ask(first) == 200
        time.sleep(1)
        in_redis = _window_in_redis(client, budget_id)
        for engine in (a, b):
            on_loop(engine, engine.flush)
        with a.store.engine.connect() as conn:
            costs = [
                c
                for (c,) in conn.execute(
                    text("SELECT cost_nanos FROM bm_usage_records WHERE virtual_key_id = :k"),
                    {"k": key.id},
                )
            ]
        client.close()
    print(
        f"{how}: {len(costs)} requests admitted, costing {sum(costs)} nano-USD in all; "
        f"Redis's window holds {in_redis} (over by {in_redis - sum(costs)})"
    )
    assert len(costs) == (5 if how == "stalled" else 6)
    assert in_redis == sum(costs)


def test_requests_admitted_while_the_outage_s_debts_are_paid_wait_for_them(
    make_settings: Settings,
) -> None:
    """A Flask app on Redis, fail-open, whose Redis dies as it starts: the budget of 4 requests
    is spent in process (4 admitted, then 402), and Redis comes back empty. The first request
    after pays the outage's debts (the 4 requests' price), its payment held a moment there;
    8 threads ask meanwhile. The debts are in transit, so a window seeded then leaves them out
    (their payment adds them): the threads that did not wait for the payment were admitted on
    an empty window (a threaded server under load, Redis killed as it started: 135 admitted on a
    budget of 120). Each waits for the payment under way: all refused, Redis = the store."""
    with private_redis() as server:
        settings = make_settings(  # (a heartbeat every 10 s: it would pay them too)
            redis_url=server.url,
            redis_timeout_seconds=2,  # (how long an admission waits for a payment, at most)
            fail_open=True,
            flush_interval_seconds=3600,
        )
        app = flask_host(settings)
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 4 * PRICE_NANOS / 1e9}]
        )
        budget_id = key.budgets[0].id

        def ask() -> int:
            answer = app.test_client().post(
                "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
            )
            return int(answer.status_code)

        server.kill(keep_data=False)  # gone before the engine ever reached it
        in_outage = [ask() for _ in range(6)]
        server.start()
        time.sleep(2.5)  # past the back-off
        counters: Any = engine.counters
        reconcile = counters._reconcile
        held = threading.Event()

        async def held_there(*args: Any, **kwargs: Any) -> Any:
            if not held.is_set():
                held.set()
                await asyncio.sleep(0.5)  # the payment's answer, slow on a loaded Redis
            return await reconcile(*args, **kwargs)

        counters._reconcile = held_there
        after: list[int] = []
        first = threading.Thread(target=lambda: after.append(ask()))
        first.start()
        assert held.wait(5)
        with ThreadPoolExecutor(8) as pool:
            after += list(pool.map(lambda _: ask(), range(8)))
        first.join(10)
        client = redis.Redis(port=server.port)
        in_redis = _window_in_redis(client, budget_id)
        client.close()
        rows = [r for r in records(engine) if r["virtual_key_id"] == key.id]
    spent = sum(r["cost_nanos"] for r in rows)
    admitted = in_outage.count(200) + after.count(200)
    print(
        f"in the outage {in_outage}; after Redis came back empty, while the debts were paid: "
        f"{after}; admitted {admitted} on a budget of 4 requests, {len(rows)} records, spent "
        f"${spent / 1e9:.7f}, Redis's window ${in_redis / 1e9:.7f}"
    )
    assert in_outage == [200] * 4 + [402] * 2
    assert after == [402] * 9
    assert len(rows) == admitted == 4
    assert in_redis == spent == 4 * PRICE_NANOS


def _across_a_rollback(
    server: Any,
    ask: Callable[[int], int],
    heartbeat_first: bool = False,
    asked_while_down: bool = False,
) -> list[int]:
    """40 requests, a snapshot (`SAVE`), 40 more, heartbeats after it, Redis killed (SIGKILL:
    what was charged since is in no file) and started from the snapshot (40 requests' price,
    the marks of then), then 100 asked by 8 threads (after the heartbeats alone found the
    older mark, with `heartbeat_first`), and heartbeats again (debts paid, holds written
    again). With `asked_while_down`, requests are asked while Redis is away (2.5 s): the
    instance backs off (to 2 s), and is still backing off as the 100 are asked. The status of
    each request."""
    before = [ask(i) for i in range(40)]
    client = redis.Redis(port=server.port)
    client.save()
    client.close()
    since = [ask(i) for i in range(40)]
    time.sleep(1.2)
    server.stop()
    if asked_while_down:
        down_until = time.monotonic() + 2.5
        while time.monotonic() < down_until:
            ask(0)
            time.sleep(0.3)
    server.start()
    if heartbeat_first:
        time.sleep(1.2)
    retried: list[int] = []

    def answered(i: int) -> int:
        # Asked again while answered 503, for 10 s at most: a call that failed while Redis
        # was down (a heartbeat in the gap between kill and start, wider on a loaded machine)
        # begins a back-off, during which a fail-closed instance refuses without trying (until
        # it ends, or a heartbeat is answered), and 100 such answers take less than its 0.25 s
        # (all 100 refused once in CI: no admission seeded the window the rollback dropped,
        # Redis's 0 for 80 requests' price). Each is answered once Redis is: by the limits.
        deadline = time.monotonic() + 10
        while (status := ask(i)) == 503 and time.monotonic() < deadline:
            retried.append(i)
            time.sleep(0.05)
        return status

    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(answered, range(100)))
    time.sleep(1.2)
    print(f"after Redis came back: {len(retried)} answers 503 (backing off, asked again)")
    assert before + since == [200] * 80
    return before + since + after


def _kept_across_a_rollback(
    what: str, codes: list[int], rows: list[dict[str, Any]], in_redis: int, budget: int
) -> None:
    spent = sum(r["cost_nanos"] for r in rows)
    admitted = codes.count(200)
    print(
        f"{what}: 80 admitted around a snapshot, Redis killed and back from it: then "
        f"{codes[80:].count(200)} more admitted ({sorted(set(codes[80:]))}); {admitted} "
        f"admitted on a budget of {budget}, {len(rows)} records, spent {spent} nano-USD, "
        f"Redis's window {in_redis}"
    )
    assert 503 not in codes[80:]  # every request answered once Redis was back
    assert admitted <= budget
    assert len(rows) == admitted
    assert in_redis == spent == admitted * PRICE_NANOS


@pytest.mark.parametrize(
    ("fail_open", "found_by", "flush"),
    [
        (False, "admission", 0.5),
        (True, "heartbeat", 0.5),
        (False, "admission", 3600),
        (False, "admission after a back-off", 0.5),
    ],
)
def test_a_redis_back_from_an_older_snapshot_lifts_no_limit(
    make_settings: Settings, fail_open: bool, found_by: str, flush: float
) -> None:
    """A threaded Flask app on a Redis that saves snapshots: 40 requests, a snapshot (`SAVE`),
    40 more (a heartbeat beats after the snapshot), then Redis is killed (no `SHUTDOWN`: the
    charges since the snapshot are in no file) and starts from that snapshot. Its window key
    lacked the last 40 requests and the instance's mark was back too, so nothing told a loss:
    8 threads were admitted up to the limit again (docs/deployment.md measured 136 and 138 on a
    budget of 120). The mark holds the instance's beat now: found older than the last beat
    Redis answered, Redis rolled back, and it is made an empty restart (every key of the
    prefix dropped: windows seeded from the store), found by the first admission or, with none
    before it, by the heartbeat. Admitted at most 120 (was 158); Redis = the store."""
    budget = 120
    with private_redis() as server:
        settings = make_settings(
            redis_url=server.url,
            fail_open=fail_open,
            # A heartbeat every half second; the store written as often, or never (the seeds
            # add what this instance has not written)
            flush_interval_seconds=flush,
            slot_ttl_seconds=1.5,
        )
        app = flask_host(settings)
        engine = engine_of(app)
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": budget * PRICE_NANOS / 1e9}]
        )
        budget_id = key.budgets[0].id

        def ask(_: int) -> int:
            answer = app.test_client().post(
                "/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True
            )
            return int(answer.status_code)

        codes = _across_a_rollback(
            server,
            ask,
            heartbeat_first=found_by == "heartbeat",
            asked_while_down=found_by.endswith("back-off"),
        )
        rows = [r for r in records(engine) if r["virtual_key_id"] == key.id]
        client = redis.Redis(port=server.port)
        in_redis = _window_in_redis(client, budget_id)
        client.close()
    what = f"fail_open={fail_open}, found by the {found_by}, flushed every {flush} s"
    _kept_across_a_rollback(what, codes, rows, in_redis, budget)


def test_two_instances_on_a_redis_back_from_an_older_snapshot_keep_the_limit(
    make_settings: Settings,
) -> None:
    """Two instances (two workers) on one Redis, nothing written to the store (the seeds add
    what each has not written): 20 requests on each, a snapshot, 20 more on each, Redis killed
    and back from the snapshot, then 100 asked over both by 8 threads. The first call that
    finds its mark's beat older makes it an empty restart; the other instance finds its mark
    gone (its holds and charges owed again, as after any empty restart). Admitted at most 120
    (was 157 on one instance); Redis = the store."""
    budget = 120
    with private_redis() as server:
        common: dict[str, Any] = {
            "redis_url": server.url,
            "flush_interval_seconds": 3600,
            "slot_ttl_seconds": 1.5,  # a heartbeat every half second
        }
        # Distinct settings (a timeout apart): two engines, as two worker processes have.
        apps = [
            flask_host(make_settings(redis_timeout_seconds=timeout, **common))
            for timeout in (1.0, 1.1)
        ]
        a, b = (engine_of(app) for app in apps)
        assert a is not b
        key = a.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": budget * PRICE_NANOS / 1e9}]
        )
        budget_id = key.budgets[0].id

        def ask(i: int) -> int:
            answer = (
                apps[i % 2]
                .test_client()
                .post("/v1/chat/completions", json=chat(), headers=bearer(key.value), buffered=True)
            )
            return int(answer.status_code)

        codes = _across_a_rollback(server, ask)
        for engine in (a, b):
            on_loop(engine, engine.flush)
        rows = [r for r in records(a) if r["virtual_key_id"] == key.id]
        client = redis.Redis(port=server.port)
        in_redis = _window_in_redis(client, budget_id)
        client.close()
    _kept_across_a_rollback("two instances", codes, rows, in_redis, budget)
