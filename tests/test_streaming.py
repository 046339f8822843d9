"""Streams through the middleware (SPEC §7): never buffered, metered exactly, cuts settled."""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlmodel import select
from starlette.middleware.gzip import GZipMiddleware

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.store.tables import UsageRecordRow
from support import BodyThenGone, chat, client, engine_of, host_app, post_scope, running

Settings = Callable[..., BudgetSettings]
Message = dict[str, Any]


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    prices = {"input_per_mtok": 1, "output_per_mtok": 2}
    path.write_text(json.dumps({"models": {"openai/gpt-4o": prices, "claude-haiku-4-5": prices}}))
    return path


def cost_of(input_tokens: int, output_tokens: int) -> int:
    """Nano-dollars at the fixture's prices ($1 and $2 per million tokens)."""
    return input_tokens * 1000 + output_tokens * 2000


async def records(engine: Any) -> list[UsageRecordRow]:
    await engine.flush()
    with engine.store.session() as s:
        return list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]


def _event(choices: list[Any], usage: Any = None) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


CHUNKS = [
    _event([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
    _event([{"index": 0, "delta": {"content": "Hello"}}]),
    _event([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
]
USAGE_CHUNK = _event([], {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
DONE = b"data: [DONE]\n\n"


class ScriptedUpstream:
    """A raw ASGI app that streams fixed chunks, one per send, and can wait between them."""

    def __init__(
        self,
        content_length: bool = False,
        content_type: bytes = b"text/event-stream",
        lax: bool = False,
    ) -> None:
        self.gate: asyncio.Event | None = None
        self.lax = lax  # reads `include_usage` as pydantic's lax bool does: "true" is True
        self.seen_body: dict[str, Any] = {}
        self.content_length = content_length  # sent with the stream (a server that knows it)
        self.content_type = content_type

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        message = await receive()
        self.seen_body = json.loads(message["body"])
        asked = self.seen_body.get("stream_options", {}).get("include_usage")
        asked = asked in (True, "true", 1) if self.lax else asked is True
        chunks = [*CHUNKS, USAGE_CHUNK, DONE] if asked else [*CHUNKS, DONE]
        headers = [(b"content-type", self.content_type)]
        if self.content_length:
            headers.append((b"content-length", b"%d" % sum(map(len, chunks))))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if index == 0 and self.gate is not None:
                await self.gate.wait()  # the second chunk waits for the client to see the first
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def call(
    app: Any,
    body: dict[str, Any],
    on_body: Callable[[bytes], None] | None = None,
    started: list[Message] | None = None,
) -> bytes:
    sent: list[bytes] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and started is not None:
            started.append(message)
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if on_body is not None:
                on_body(message.get("body", b""))

    await asyncio.wait_for(app(post_scope("/v1/chat/completions"), receive, send), 5)
    return b"".join(sent)


async def test_the_first_chunk_reaches_the_client_before_the_app_sends_the_second(
    make_settings: Settings,
) -> None:
    upstream = ScriptedUpstream()
    upstream.gate = asyncio.Event()
    app = BudgetMiddleware(upstream, settings=make_settings())
    gate = upstream.gate

    def on_body(chunk: bytes) -> None:
        if chunk:
            gate.set()

    async with running(app):
        out = await call(app, chat(stream=True), on_body)
    assert out == b"".join([*CHUNKS, DONE])


async def test_a_stream_that_asked_for_usage_passes_byte_for_byte(make_settings: Settings) -> None:
    upstream = ScriptedUpstream()
    app = BudgetMiddleware(upstream, settings=make_settings())
    body = chat(stream=True, stream_options={"include_usage": True})
    async with running(app):
        through = await call(app, body)
        direct = await call(upstream, body)
    assert through == direct == b"".join([*CHUNKS, USAGE_CHUNK, DONE])


async def test_a_usage_chunk_asked_for_as_a_lax_reader_reads_the_flag_is_the_client_s(
    make_settings: Settings, pricing_file: Path
) -> None:
    """`"include_usage": "true"` is asked for by a host app that reads it as pydantic's lax
    bool (a FastAPI request model) and streams the usage chunk: the client asked for that
    chunk. It was rewritten to `true` as if the middleware had added it, and the chunk removed
    on the way back: the client lost the usage it asked for."""
    upstream = ScriptedUpstream(lax=True)
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    seen = []
    async with running(app):
        for flag in ("true", 1):
            body = chat(stream=True, stream_options={"include_usage": flag})
            through = await call(app, body)
            seen.append(upstream.seen_body["stream_options"])
            direct = await call(upstream, body)
            assert through == direct == b"".join([*CHUNKS, USAGE_CHUNK, DONE])
        rows = await records(app.engine)
    print(f"sent upstream: {seen}; charged: {[(r.input_tokens, r.output_tokens) for r in rows]}")
    assert seen == [{"include_usage": "true"}, {"include_usage": 1}]  # as the client wrote it
    assert [(r.input_tokens, r.output_tokens, r.cost_nanos) for r in rows] == [
        (7, 3, cost_of(7, 3))
    ] * 2


async def test_the_usage_chunk_we_asked_for_is_removed_and_still_charged(
    make_settings: Settings, pricing_file: Path
) -> None:
    upstream = ScriptedUpstream()
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    async with running(app):
        out = await call(app, chat(stream=True))
        rows = await records(app.engine)
    assert upstream.seen_body["stream_options"] == {"include_usage": True}
    assert out == b"".join([*CHUNKS, DONE])
    assert [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows] == [
        (7, 3, cost_of(7, 3), False)
    ]


@pytest.mark.parametrize(
    "content_type",
    [b"Text/Event-Stream", b" text/event-stream; charset=utf-8", b"TEXT/EVENT-STREAM"],
)
async def test_a_stream_s_media_type_is_read_in_any_case(
    make_settings: Settings, pricing_file: Path, content_type: bytes
) -> None:
    """A media type is case-insensitive (RFC 9110 8.3.1): written `Text/Event-Stream`, the
    answer was read as JSON, charged an estimate without output, and the usage chunk we asked
    for reached a client that had not asked for it."""
    upstream = ScriptedUpstream(content_type=content_type)
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    async with running(app):
        out = await call(app, chat(stream=True))
        rows = await records(app.engine)
    print(content_type, [(r.output_tokens, r.cost_nanos, r.estimated) for r in rows])
    assert out == b"".join([*CHUNKS, DONE])  # the usage chunk we caused is not passed on
    assert [
        (r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated, r.streamed) for r in rows
    ] == [(7, 3, cost_of(7, 3), False, True)]


@pytest.mark.parametrize(
    ("written", "content_type"),
    [
        ("utf-16", b"text/event-stream"),  # its byte-order mark alone says so
        ("utf-16-le", b"text/event-stream; charset=utf-16le"),
        ("utf-16-be", b"text/event-stream; charset=utf-16be"),
        ("utf-32", b"text/event-stream; charset=utf-32"),
        ("utf-32-be", b"text/event-stream; charset=utf-32be"),
    ],
)
@pytest.mark.parametrize("asked", [True, False], ids=["usage-asked", "usage-not-asked"])
@pytest.mark.parametrize("first", [1, 3, 33], ids=lambda n: f"first-chunk-{n}-bytes")
async def test_a_stream_written_in_utf_16_or_utf_32_is_charged_its_usage(
    make_settings: Settings,
    pricing_file: Path,
    written: str,
    content_type: bytes,
    asked: bool,
    first: int,
) -> None:
    """An event stream written in UTF-16 or UTF-32 (a charset parameter, a byte-order mark),
    which a client that decodes by its charset (httpx's `aiter_lines`) reads: its lines
    were split at the LF byte and read as UTF-8, no event was read, and it was charged an
    estimate of its prompt alone, no output (51,000 nano-USD, 38,000 when its usage was asked
    for in the client's stead; of 50,010,000: 10 in, 5,000 out at $1/$10). Its first bytes say
    how it is written: read so, passed on as it came (the usage chunk asked for in its stead
    too: it could only be taken out re-encoded). A first chunk shorter than 4 bytes (1 byte;
    3 of UTF-16 without a mark; 1 to 3 of UTF-32) said UTF-8, and was charged the same 51,000
    and 38,000 nano-USD: the stream's first 4 bytes are waited for."""
    path = pricing_file.parent / "dear.json"
    path.write_text(json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 1,
                                                             "output_per_mtok": 10}}}))  # fmt: skip
    usage = {"prompt_tokens": 10, "completion_tokens": 5000, "total_tokens": 5010}
    events = [
        _event([{"index": 0, "delta": {"content": "x" * 4000}}]),
        _event([], usage),
        DONE,
    ]
    stream = b"".join(events).decode().encode(written)
    chunks = [stream[:first], stream[first:]]  # (a chunk cut inside a character)

    async def upstream(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while True:
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
                message = await receive()
        await receive()
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=path))
    body = chat(stream=True, max_tokens=10_000)
    if asked:
        body["stream_options"] = {"include_usage": True}
    async with running(app):
        async with client(app) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            received = b"".join([part async for part in r.aiter_raw()])
        rows = await records(app.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(f"{written}, {content_type.decode()}: charged {charged}")
    assert received == stream
    assert charged == [(10, 5000, 10 * 1000 + 5000 * 10_000, False)]


@pytest.mark.parametrize(
    "content_type",
    [b"text/plain; charset=utf-8", b"text/html; charset=utf-8", b"application/octet-stream"],
)
async def test_a_stream_labelled_as_another_type_is_still_read_as_the_stream_it_is(
    make_settings: Settings, pricing_file: Path, content_type: bytes
) -> None:
    """A stream asked for and relayed under another media type (Starlette's
    `StreamingResponse(gen(), media_type="text/plain")`, Flask's `Response(gen())` and Django's
    `StreamingHttpResponse` say `text/html` unless told): the SDKs read it as the stream it is
    (they look at no content-type), and so must we. It was read as JSON and charged an
    estimate of its prompt alone, 40,000 and 54,000 nano-dollars with 0 output, where 7 in and
    3 out at $1/$2 cost 13,000; and the usage chunk we asked for reached a client that had not
    asked for it."""
    upstream = ScriptedUpstream(content_type=content_type)
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    async with running(app):
        out = await call(app, chat(stream=True))
        asked = await call(app, chat(stream=True, stream_options={"include_usage": True}))
        rows = await records(app.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(content_type, "expected", cost_of(7, 3), "charged", charged)
    assert out == b"".join([*CHUNKS, DONE])  # the usage chunk we caused is not passed on
    assert asked == b"".join([*CHUNKS, USAGE_CHUNK, DONE])  # byte for byte
    assert charged == [(7, 3, cost_of(7, 3), False)] * 2
    assert all(r.streamed for r in rows)


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"Application/JSON; charset=utf-8", b"application/vnd.relay+json"],
)
async def test_a_stream_labelled_json_is_charged_the_usage_it_streams(
    make_settings: Settings, pricing_file: Path, content_type: bytes
) -> None:
    """A stream relayed as `application/json` (`StreamingResponse(gen(),
    media_type="application/json")`), which the SDKs read as the stream it is: it was read as
    JSON, charged an estimate of its prompt and no output (54,000 nano-dollars where 7 in, 3 out
    cost 13,000). Its usage is read now, and it passes byte for byte; an answer labelled JSON
    keeps its headers, so a usage chunk the middleware asked for is not taken out of it. JSON
    with parameters, in any case, or a `+json` type is JSON too (a mutation run's survivor: read
    as untyped, its usage chunk and `content-length` were taken out)."""
    upstream = ScriptedUpstream(content_type=content_type, content_length=True)
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    started: list[Message] = []
    async with running(app):
        asked = await call(
            app, chat(stream=True, stream_options={"include_usage": True}), started=started
        )
        injected = await call(app, chat(stream=True))
        rows = await records(app.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(content_type, "expected", cost_of(7, 3), "charged", charged)
    assert asked == b"".join([*CHUNKS, USAGE_CHUNK, DONE])
    assert dict(started[0]["headers"])[b"content-length"] == b"%d" % len(asked)
    assert injected == asked  # headers kept: the usage chunk stays, as its length says
    assert charged == [(7, 3, cost_of(7, 3), False)] * 2


class HugeStream:
    """A raw ASGI app that relays a stream of some 3 MB of text, its usage chunk last, under the
    media type it is given, whatever the request asked."""

    PIECE = _event([{"index": 0, "delta": {"content": "x" * 1000}}])
    COUNT = 3000  # more than the 2 MiB of a JSON answer kept whole

    def __init__(self, content_type: bytes) -> None:
        self.content_type = content_type

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await ScriptedUpstream()(scope, receive, send)
            return
        await receive()
        headers = [(b"content-type", self.content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(self.COUNT):
            await send({"type": "http.response.body", "body": self.PIECE, "more_body": True})
        for chunk in (USAGE_CHUNK, DONE):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.parametrize(
    ("stream", "content_type"), [(True, b"application/json"), (False, b"text/event-stream")]
)
async def test_a_huge_stream_is_read_as_a_stream_whatever_its_label_or_request_say(
    make_settings: Settings, pricing_file: Path, stream: bool, content_type: bytes
) -> None:
    """A stream of 3 MB with its usage last: relayed as `application/json` to a stream request,
    or as `text/event-stream` to a request that asked for none. Read as the stream it is, its
    usage (7 in, 3 out) is charged. Read as JSON (a mutation run's survivors: the type's check,
    the JSON-labelled stream's branch), only its last 2 MiB are kept, the usage is not found and
    the answer was charged an estimate of its bytes (some 750,000 output tokens)."""
    app = BudgetMiddleware(
        HugeStream(content_type), settings=make_settings(pricing_file=pricing_file)
    )
    async with running(app), client(app) as http:
        answer = await http.post("/v1/chat/completions", json=chat(stream=stream))
        rows = await records(app.engine)
    charged = [
        (r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated, r.streamed) for r in rows
    ]
    print(content_type, f"stream={stream}", len(answer.content), "bytes; charged", charged)
    assert answer.content == HugeStream.PIECE * HugeStream.COUNT + USAGE_CHUNK + DONE
    assert charged == [(7, 3, cost_of(7, 3), False, True)]


async def test_a_stream_that_loses_its_usage_chunk_keeps_no_stale_content_length(
    make_settings: Settings, pricing_file: Path
) -> None:
    """An app that sends its stream's `content-length`: the usage chunk we asked for is removed
    on the way, so that length would be longer than the body (a server then cuts the answer, or
    the client waits for bytes that never come). The answer goes without it; one asked for by
    the client keeps it, byte for byte."""
    upstream = ScriptedUpstream(content_length=True)
    app = BudgetMiddleware(upstream, settings=make_settings(pricing_file=pricing_file))
    async with running(app):
        started: list[Message] = []
        out = await call(app, chat(stream=True), started=started)
        asked: list[Message] = []
        kept = await call(
            app, chat(stream=True, stream_options={"include_usage": True}), started=asked
        )
        rows = await records(app.engine)
    lengths = [dict(m["headers"]).get(b"content-length") for m in (*started, *asked)]
    print("content-length sent: injected", lengths[0], "asked by the client", lengths[1])
    assert out == b"".join([*CHUNKS, DONE])
    assert lengths[0] is None
    assert lengths[1] == b"%d" % len(kept)
    assert [(r.input_tokens, r.output_tokens, r.estimated) for r in rows] == [(7, 3, False)] * 2


async def test_openai_sdk_streams_through_the_middleware_and_is_charged_its_usage(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        sdk = openai.AsyncOpenAI(
            base_url="http://test/v1",
            api_key="host-credential",
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app)),
            max_retries=0,
        )
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True
        )
        chunks = [chunk async for chunk in stream]
        asked = await sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        asked_chunks = [chunk async for chunk in asked]
        rows = await records(engine)
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk: naive clients stay safe
    assert "".join(c.choices[0].delta.content or "" for c in chunks).count(" ") == 11
    usage = asked_chunks[-1].usage
    assert usage is not None and asked_chunks[-1].choices == []
    assert [(r.output_tokens, r.streamed, r.outcome) for r in rows] == [
        (12, True, "completed"),
        (5, True, "completed"),
    ]
    assert rows[1].cost_nanos == cost_of(usage.prompt_tokens, usage.completion_tokens)


async def test_anthropic_sdk_streams_through_the_middleware_and_is_charged_its_usage(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        sdk = anthropic.AsyncAnthropic(
            base_url="http://test",
            api_key="host-credential",
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app)),
            max_retries=0,
        )
        async with sdk.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=9,
            messages=[{"role": "user", "content": "hello"}],
        ) as stream:
            final = await stream.get_final_message()
        rows = await records(engine)
    assert [(r.provider, r.model, r.input_tokens, r.output_tokens) for r in rows] == [
        ("anthropic", "claude-haiku-4-5", final.usage.input_tokens, 9)
    ]
    assert rows[0].cost_nanos == cost_of(final.usage.input_tokens, final.usage.output_tokens)


async def test_a_client_that_disconnects_mid_stream_is_charged_an_estimate_once(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="alice",
            rate_limit={"max_concurrent_requests": 1},
            budgets=[{"max_limit": 1, "reset_duration": "1d"}],
        )
        await engine.invalidate()
        body = json.dumps(chat(max_tokens=200, stream=True)).encode()
        bodies: list[bytes] = []
        receive = BodyThenGone(body)

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                bodies.append(message.get("body", b""))
                if len(bodies) == 5:
                    receive.gone.set()  # the client leaves after five chunks

        headers = [
            (b"authorization", f"Bearer {key.value}".encode()),
            (b"x-mock-delay-ms", b"5"),
        ]
        await asyncio.wait_for(app(post_scope("/v1/chat/completions", headers), receive, send), 5)
        rows = await records(engine)
        budget = engine.registry.windows["budget"][key.budgets[0].id]
        slots = engine.registry.concurrency[key.rate_limit.id]  # type: ignore[union-attr]
        assert (slots.in_flight, budget.reserved) == (0, 0)
        assert len(bodies) < 50  # the stream stopped
        assert len(rows) == 1
        row = rows[0]
        assert (row.outcome, row.estimated, row.streamed) == ("client_disconnected", True, True)
        assert 0 < row.output_tokens < 200
        assert row.cost_nanos > 0 and budget.value == row.cost_nanos
        async with client(app) as http:  # the slot is free again
            again = await http.post(
                "/v1/chat/completions",
                json=chat(),
                headers={"authorization": f"Bearer {key.value}"},
            )
        assert again.status_code == 200


async def test_an_upstream_cut_is_charged_an_estimate_and_marked(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with running(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        await http.post(
            "/v1/chat/completions",
            json=chat(max_tokens=100, stream=True),
            headers={"x-mock-fail-after": "10"},
        )
        rows = await records(engine)
    assert [(r.outcome, r.estimated) for r in rows] == [("upstream_error", True)]
    assert 0 < rows[0].output_tokens < 100 and rows[0].cost_nanos > 0


async def test_200_concurrent_streams_are_charged_exactly_and_leave_nothing_behind(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        team = engine.manager.create_team(
            name="research",
            budgets=[{"max_limit": 100, "reset_duration": "1d"}],
            rate_limit={"max_concurrent_requests": 1000},
        )
        key = engine.manager.create_virtual_key(name="alice", team_id=team.id)
        await engine.invalidate()
        async with client(app) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json=chat(max_tokens=1 + i % 13, stream=True),
                        headers={"authorization": f"Bearer {key.value}"},
                    )
                    for i in range(200)
                )
            )
        assert all(a.status_code == 200 and "[DONE]" in a.text for a in answers)
        rows = await records(engine)
        budget = engine.registry.windows["budget"][team.budgets[0].id]
        slots = engine.registry.concurrency[team.rate_limit.id]  # type: ignore[union-attr]
        assert len(rows) == 200 and not any(r.estimated for r in rows)
        assert budget.value == sum(cost_of(r.input_tokens, r.output_tokens) for r in rows)
        assert sorted(r.output_tokens for r in rows) == sorted(1 + i % 13 for i in range(200))
        assert (budget.reserved, slots.in_flight) == (0, 0)


async def test_a_gzip_encoded_answer_is_still_measured(
    make_settings: Settings, pricing_file: Path
) -> None:
    settings = make_settings(pricing_file=pricing_file)
    app = FastAPI()
    from mock_upstream import mock_router

    app.include_router(mock_router("/v1"))
    app.add_middleware(GZipMiddleware, minimum_size=10)  # inside ours
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/chat/completions", json=chat(max_tokens=50), headers={"accept-encoding": "gzip"}
        )
        rows = await records(engine)
    assert answer.headers["content-encoding"] == "gzip"
    usage = answer.json()["usage"]  # httpx decoded it; the middleware had to as well
    assert (rows[0].output_tokens, rows[0].estimated) == (50, False)
    assert rows[0].cost_nanos == cost_of(usage["prompt_tokens"], 50)


async def test_an_anthropic_stream_cut_after_message_start_is_charged_its_streamed_output(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with running(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        await http.post(
            "/v1/messages",
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 200,
                "stream": True,
                "messages": [{"role": "user", "content": "hello"}],
            },
            headers={"x-mock-fail-after": "40"},
        )
        rows = await records(engine)
    assert [(r.outcome, r.estimated) for r in rows] == [("upstream_error", True)]
    # message_start said output_tokens=1; ~35 words were streamed before the cut
    assert 5 < rows[0].output_tokens < 200
    assert rows[0].input_tokens > 0


async def test_a_cancelled_request_task_still_settles_once_and_frees_its_slot(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="alice",
            rate_limit={"max_concurrent_requests": 1},
            budgets=[{"max_limit": 1, "reset_duration": "1d"}],
        )
        await engine.invalidate()
        body = json.dumps(chat(max_tokens=500, stream=True)).encode()
        first_chunk = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays; the server cancels the task
            raise AssertionError

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()

        headers = [(b"authorization", f"Bearer {key.value}".encode()), (b"x-mock-delay-ms", b"5")]
        task = asyncio.create_task(app(post_scope("/v1/chat/completions", headers), receive, send))
        await first_chunk.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rows = await records(engine)
        budget = engine.registry.windows["budget"][key.budgets[0].id]
        slots = engine.registry.concurrency[key.rate_limit.id]  # type: ignore[union-attr]
    assert [(r.outcome, r.estimated) for r in rows] == [("client_disconnected", True)]
    assert (slots.in_flight, budget.reserved) == (0, 0)
    assert budget.value == rows[0].cost_nanos > 0


async def test_a_stream_asked_for_its_usage_reaches_the_app_with_its_corrected_length(
    make_settings: Settings, pricing_file: Path
) -> None:
    """README: a stream that does not ask for usage "is sent with
    `stream_options.include_usage` (and a corrected `content-length`)". The app gets the
    rewritten body with a `content-length` of that body, not none: an app that reads the length
    (a WSGI app mounted inside reads `CONTENT_LENGTH` bytes; a proxy forwards the header) must
    find the whole body."""
    app = FastAPI()
    seen: list[tuple[str | None, int, bool]] = []

    @app.post("/v1/chat/completions")
    async def completion(request: Request) -> Response:
        body = await request.body()
        asked = json.loads(body).get("stream_options", {}).get("include_usage") is True
        seen.append((request.headers.get("content-length"), len(body), asked))
        return Response(b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    app.add_middleware(BudgetMiddleware, settings=make_settings(pricing_file=pricing_file))
    async with running(app), client(app) as http:
        sent = json.dumps(chat(stream=True)).encode()
        answer = await http.post(
            "/v1/chat/completions", content=sent, headers={"content-type": "application/json"}
        )
    print(f"sent {len(sent)} bytes; the app got (content-length, bytes, include_usage) {seen}")
    assert answer.status_code == 200
    [(length, size, asked)] = seen
    assert asked and size > len(sent)
    assert length == str(size)


async def test_a_stream_asked_for_its_usage_is_asked_of_the_app_in_clear(
    make_settings: Settings, pricing_file: Path
) -> None:
    """An app that compresses its event streams when the client accepts it (Starlette's
    GZipMiddleware does not; others do): the usage-only chunk our `include_usage` causes could
    not be cut out of compressed bytes, so the app is asked for the stream in clear, and the
    client gets the stream it asked for (every chunk with choices)."""
    app = FastAPI()
    seen: list[str | None] = []

    @app.post("/v1/chat/completions")
    async def completion(request: Request) -> Response:
        asked = await request.json()
        seen.append(request.headers.get("accept-encoding"))
        base = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o"}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}]
        if (asked.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": 3}
            events.append({**base, "choices": [], "usage": usage})
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        body += b"data: [DONE]\n\n"
        headers = {"content-type": "text/event-stream"}
        if "gzip" in (seen[-1] or ""):
            body, headers["content-encoding"] = gzip.compress(body), "gzip"
        return Response(body, headers=headers)

    app.add_middleware(BudgetMiddleware, settings=make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(stream=True),
            headers={"accept-encoding": "gzip, deflate"},
        )
        rows = await records(engine)
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line[6:7] == "{"]
    print("the app was asked", seen, "; the client got", events, "; charged", rows[0].cost_nanos)
    assert seen == ["identity"] and all(e["choices"] for e in events) and len(events) == 1
    assert (rows[0].output_tokens, rows[0].estimated) == (3, False)
    assert rows[0].cost_nanos == cost_of(7, 3)


async def test_a_stream_that_ends_after_its_usage_chunk_without_done_is_charged_that_usage(
    make_settings: Settings,
) -> None:
    """An app that streams an SDK's chunks back (`chunk.model_dump_json()`) often leaves out
    OpenAI's `[DONE]`; its usage-only chunk (`choices: []`), which OpenAI sends last, still ends
    the answer. It was read as a cut stream: the usage's own cost ($0.05, OpenRouter's) dropped,
    the model unpriced, $0 charged and the record marked estimated."""
    app = FastAPI()
    usage = {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300, "cost": 0.05}

    @app.post("/v1/chat/completions")
    async def answer() -> Response:
        chunks = [
            _event([{"index": 0, "delta": {"content": "Hello"}}]),
            _event([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            _event([], usage),
        ]
        return Response(b"".join(chunks), media_type="text/event-stream")

    wrapped = BudgetMiddleware(app, settings=make_settings())
    body = chat("openrouter/acme/new-model", stream=True, stream_options={"include_usage": True})
    async with running(wrapped), client(wrapped) as http:
        sent = await http.post("/v1/chat/completions", json=body)
        rows = await records(wrapped.engine)
    assert sent.status_code == 200
    row = rows[0]
    print("no [DONE]: charged", row.cost_nanos, "nano-dollars,", row.cost_source, row.estimated)
    assert (row.cost_nanos, row.cost_source, row.estimated) == (50_000_000, "usage", False)
    assert (row.input_tokens, row.output_tokens) == (1000, 300)


def _mistral_upstream(seen: list[dict[str, Any]]) -> Callable[[httpx2.Request], httpx2.Response]:
    """Mistral's API: `stream_options` refused (422, `extra_forbidden`); a stream's usage comes
    unasked in its last chunk, the one that ends its choice (1,000 in, 100 out)."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        seen.append(body)
        if "stream_options" in body:
            detail = {"type": "extra_forbidden", "loc": ["body", "stream_options"]}
            return httpx2.Response(422, json={"message": {"detail": [detail]}})
        chunk = {"id": "m", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": "Four."}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
             "usage": usage},
        ]  # fmt: skip
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, text=text)

    return answer


@pytest.mark.parametrize("gateway", ["forwards_as_received", "drops_stream_options"])
async def test_a_gateway_to_mistral_drops_the_stream_options_the_middleware_asked_for(
    make_settings: Settings, gateway: str
) -> None:
    """The middleware cannot tell where an app sends a call, so it asks every OpenAI-style stream
    for its usage (SPEC §7), Mistral's models too; a gateway that forwards the body as received
    to Mistral's API, which refuses the field, fails (422). README's recipe: the gateway drops
    `stream_options` for Mistral; Mistral reports the usage unasked on the chunk that ends the
    choice, which reaches the client whole, and the stream is charged it exactly."""
    from fastapi.responses import StreamingResponse

    seen: list[dict[str, Any]] = []
    upstream = httpx2.AsyncClient(transport=httpx2.MockTransport(_mistral_upstream(seen)))
    host = FastAPI()

    @host.post("/v1/chat/completions")
    async def forward(request: Request) -> Response:
        body = await request.json()
        if gateway == "drops_stream_options":
            body.pop("stream_options", None)
        answer = await upstream.post("https://api.mistral.ai/v1/chat/completions", json=body)
        return StreamingResponse(
            iter([answer.content]), answer.status_code, media_type=answer.headers["content-type"]
        )

    host.add_middleware(BudgetMiddleware, settings=make_settings())
    sdk = openai.AsyncOpenAI(
        api_key="mistral-secret",
        base_url="http://gateway/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(host)),
    )
    status, deltas, finished = 200, [], []
    async with running(host):
        try:
            stream = await sdk.chat.completions.create(
                model="mistral-large-latest",
                messages=[{"role": "user", "content": "2+2?"}],
                stream=True,
            )
            async for c in stream:
                deltas.append(c.choices[0].delta.content)
                finished.append(c.choices[0].finish_reason)
        except openai.APIStatusError as exc:
            status = exc.status_code
        rows = await records(engine_of(host))
    charged = [(r.provider, r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated)
               for r in rows]  # fmt: skip
    print(f"{gateway}: answered {status}, chunks {deltas} {finished}, charged {charged}")
    assert ("stream_options" in seen[0]) is (gateway == "forwards_as_received")
    if gateway == "forwards_as_received":
        assert (status, charged) == (422, [("mistral", 0, 0, 0, False)])
    else:
        assert (status, deltas, finished) == (200, ["Four.", None], [None, "stop"])
        assert charged == [("mistral", 1000, 100, 2_600_000, False)]


def _groq_stream(asked: bool) -> list[bytes]:
    """A stream as Groq's API sends it: the usage (13 in, 8 out) in `x_groq.usage` on the chunk
    that ends the choice, asked or not; asked (`stream_options.include_usage`), in a usage-only
    chunk as well."""
    base = {"id": "chatcmpl-g1", "object": "chat.completion.chunk", "model": "llama-3.3-70b"}
    usage = {"queue_time": 0.02, "prompt_tokens": 13, "prompt_time": 0.001,
             "completion_tokens": 8, "completion_time": 0.03, "total_tokens": 21,
             "total_time": 0.031}  # fmt: skip
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
             "x_groq": {"id": "req_1"}}  # fmt: skip
    text = {**base, "choices": [{"index": 0, "delta": {"content": "Hello there!"}}]}
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "req_1", "usage": usage}}  # fmt: skip
    events = [first, text, last]
    if asked:
        events.append({**base, "choices": [], "usage": usage, "x_groq": {"id": "req_1"}})
    return [b"data: %s\n\n" % json.dumps(e).encode() for e in events] + [DONE]


@pytest.mark.parametrize("gateway", ["forwards_stream_options", "drops_stream_options"])
async def test_a_groq_stream_is_charged_the_usage_in_its_x_groq(
    make_settings: Settings, gateway: str
) -> None:
    """Groq reports a stream's usage in `x_groq.usage` on its last chunk, asked or not. A
    gateway that calls Groq with a body of its own (a Groq SDK call that leaves out the
    `stream_options` the middleware added) relays a stream whose only usage is that one: it
    was not read, and the stream was charged an estimate (45 in, 3 out: 28,920 nano-dollars
    where 13 in, 8 out cost 13,990 at llama-3.3-70b's $0.59/$0.79). Read now; asked for as well,
    the usage-only chunk repeats it under the same `id` and it counts once."""
    upstream = ScriptedUpstream()

    async def groq(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await upstream(scope, receive, send)
            return
        body = json.loads((await receive())["body"])
        asked = gateway == "forwards_stream_options" and "stream_options" in body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for chunk in _groq_stream(asked):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = BudgetMiddleware(groq, settings=make_settings())
    async with running(app):
        out = await call(app, chat("groq/llama-3.3-70b-versatile", stream=True))
        rows = await records(app.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    expected = 13 * 590 + 8 * 790  # llama-3.3-70b-versatile on Groq: $0.59 / $0.79 per MTok
    print(f"{gateway}: expected (13, 8, {expected}, False), charged {charged}")
    assert out == b"".join(_groq_stream(False))  # the usage chunk we caused is not passed on
    assert charged == [(13, 8, expected, False)]


_ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


@pytest.mark.parametrize("content_type", [None, b"text/event-stream", b"text/plain"])
@pytest.mark.parametrize("asked", [True, False])
async def test_a_compressed_json_answer_to_a_stream_request_is_read_as_json(
    make_settings: Settings, pricing_file: Path, content_type: bytes | None, asked: bool
) -> None:
    """A stream asked for and answered with JSON all the same (a server that does not stream
    that model), gzip-encoded, untyped or labelled as a stream or text: its first bytes were
    looked at compressed, so it was read as a stream that never came, and charged an estimate
    of the prompt, no output: 40,000 or 54,000 nano-dollars where 7 in, 3 out cost 13,000.
    Its decoded first bytes say JSON now; one the middleware asked for its usage (which asked
    for it uncompressed) goes on decoded, as such a stream does."""
    body = json.dumps(_ANSWER).encode()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await ScriptedUpstream()(scope, receive, send)
            return
        await receive()
        headers = [(b"content-encoding", b"gzip")]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        packed = gzip.compress(body)
        for part in (packed[:5], packed[5:]):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    asks = {"stream_options": {"include_usage": True}} if asked else {}
    started: list[Message] = []
    async with running(wrapped):
        out = await call(wrapped, chat(stream=True, **asks), started=started)
        rows = await records(wrapped.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(content_type, "asked" if asked else "injected", "expected", cost_of(7, 3), charged)
    coding = dict(started[0]["headers"]).get(b"content-encoding")
    assert (gzip.decompress(out) if coding == b"gzip" else out) == body
    assert coding == (b"gzip" if asked else None)
    assert charged == [(7, 3, cost_of(7, 3), False)]


async def test_a_gzip_answer_over_64_mib_decoded_is_charged_its_usage(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A gzip-encoded answer whose decoded body passes 64 MiB (a large batch of embeddings,
    base64 as the OpenAI SDK asks for them) was cut off unread at 64 MiB, its usage at the end
    never seen, and charged its worst case: $30.03 where 7 input tokens cost 7,000 nano-dollars.
    An identity answer of the same size was charged right (its tail is kept, not all of it)."""
    body = (
        b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"'
        + b"A" * (65 << 20)
        + b'"}],"model":"gpt-4o","usage":{"prompt_tokens":7,"total_tokens":7}}'
    )
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    packed = packer.compress(body) + packer.flush()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await ScriptedUpstream()(scope, receive, send)
            return
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for start in range(0, len(packed), 1 << 16):
            part = packed[start : start + (1 << 16)]
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    async with running(wrapped):
        out = await call(wrapped, chat())
        rows = await records(wrapped.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print("expected", cost_of(7, 0), "charged", charged)
    assert out == packed
    assert charged == [(7, 0, cost_of(7, 0), False)]


async def test_a_small_compressed_chunk_of_a_huge_answer_is_read_in_bounded_memory(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A gzip answer sent in one message (an app's `Response(content=...)`) that inflates to
    128 MiB: it was decoded whole at once, the 128 MiB held beside the kept tail. It is decoded
    a slice of the chunk at a time now, each measured as it comes, and still charged its usage."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"object":"list","data":[{"embedding":"')]
    parts += [packer.compress(b"A" * (1 << 20)) for _ in range(128)]
    parts.append(packer.compress(b'"}],"usage":{"prompt_tokens":7,"total_tokens":7}}'))
    packed = b"".join([*parts, packer.flush()])

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await ScriptedUpstream()(scope, receive, send)
            return
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": packed, "more_body": False})

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    async with running(wrapped):
        tracemalloc.start()
        try:
            out = await call(wrapped, chat())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows = await records(wrapped.engine)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print(f"peak {peak / 2**20:.1f} MiB for {len(packed)} bytes inflating to 128 MiB;", charged)
    assert out == packed
    assert charged == [(7, 0, cost_of(7, 0), False)]
    assert peak < 32 << 20


@pytest.mark.parametrize(("asked", "gzipped"), [(True, False), (False, False), (True, True)])
async def test_a_stream_whose_last_event_has_no_blank_line_after_it_is_charged_its_usage(
    make_settings: Settings, pricing_file: Path, asked: bool, gzipped: bool
) -> None:
    """An app that joins its events with blank lines, none after the last (and no `[DONE]`):
    the usage chunk the upstream sent last, and billed, was not read, the stream charged an
    estimate (44,000 or 58,000 nano-dollars where 7 in, 3 out cost 13,000), and the usage chunk
    the middleware caused reached the client. Read when whole, and dropped when ours."""

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await ScriptedUpstream()(scope, receive, send)
            return
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        body = b"".join([*CHUNKS, USAGE_CHUNK])[:-2]
        if gzipped:  # measured as it goes by, passed on compressed (the review: 58,000)
            headers.append((b"content-encoding", b"gzip"))
            body = gzip.compress(body)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    asks = {"stream_options": {"include_usage": True}} if asked else {}
    async with running(wrapped):
        out = await call(wrapped, chat(stream=True, **asks))
        rows = await records(wrapped.engine)
    if gzipped:
        out = gzip.decompress(out)
    charged = [(r.input_tokens, r.output_tokens, r.cost_nanos, r.estimated) for r in rows]
    print("asked" if asked else "injected", "gzip" if gzipped else "plain", "expected",
          cost_of(7, 3), "charged", charged)  # fmt: skip
    assert out == (b"".join([*CHUNKS, USAGE_CHUNK])[:-2] if asked else b"".join(CHUNKS))
    assert charged == [(7, 3, cost_of(7, 3), False)]


async def test_a_client_gone_as_the_last_chunk_is_sent_is_recorded_as_a_disconnect(
    make_settings: Settings, pricing_file: Path
) -> None:
    """The server fails the answer's last chunk (`OSError`: the client left as it went): the
    whole answer was read and is charged its usage, but the record said `upstream_error`, the
    app's fault, for the client's leaving."""
    settings = make_settings(pricing_file=pricing_file)
    wrapped = BudgetMiddleware(ScriptedUpstream(), settings=settings)

    async def receive() -> Message:
        return {"type": "http.request", "body": json.dumps(chat(stream=True)).encode()}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            raise ConnectionResetError("the client left")

    async with running(wrapped):
        with pytest.raises(ConnectionResetError):
            await wrapped(post_scope("/v1/chat/completions"), receive, send)
        rows = await records(wrapped.engine)
    recorded = [(r.outcome, r.cost_nanos, r.estimated) for r in rows]
    print("recorded", recorded)
    assert recorded == [("client_disconnected", cost_of(7, 3), False)]
