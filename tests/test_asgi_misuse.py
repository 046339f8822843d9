"""Apps and servers that bend ASGI, and paths a proxy reads otherwise (SPEC §4, §7, §8): a
second response start, a body as a memoryview, headers as a generator, a start the server
refuses, a request the server cancels, a path ending in `%3F` or `%23`. Each is charged what
was served, and the client gets the answer the app meant."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlmodel import select
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.store.tables import UsageRecordRow
from support import BodyThenGone, chat, engine_of, post_scope, running

Settings = Callable[..., BudgetSettings]
Message = dict[str, Any]


def _stream_start() -> dict[str, Any]:
    """An SSE answer's `http.response.start` at 200."""
    return {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/event-stream")],
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(text: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


async def _records(engine: Any) -> list[UsageRecordRow]:
    await engine.flush()
    with engine.store.session() as s:
        return list(s.exec(select(UsageRecordRow)).all())


class UvicornLikeSend:
    """A server's `send` that, as uvicorn does, refuses a second `http.response.start` (the first
    one's status and headers have gone to the client) and keeps what the client got."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if self.status is not None:
                raise RuntimeError(
                    "Unexpected ASGI message 'http.response.start' sent, after "
                    "response already started."
                )
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


async def test_a_second_response_start_does_not_erase_the_stream_already_served(
    make_settings: Settings,
) -> None:
    """SPEC §7: 'A stream that ends without usage (client disconnect, upstream cut) is charged an
    estimate from what was streamed'; 'Responses with status >= 400 and no usage cost nothing'
    is about the answer's status, and the client got 200. An app that (wrongly) sends a second
    `http.response.start` after streaming (an error handler that does not check whether the
    answer started) made the exchange re-read the start: status 500, a fresh stream meter, and
    the 50 chunks of text the client received were charged $0."""

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send(_stream_start())
        for _ in range(50):
            await send(
                {
                    "type": "http.response.body",
                    "body": _sse(_chunk("hello world " * 10)),
                    "more_body": True,
                }
            )
        # an error handler that answers again
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"Internal Server Error"})

    app = BudgetMiddleware(inner, settings=make_settings())
    engine = app.engine
    body = json.dumps(chat(stream=True, max_tokens=4000)).encode()
    server_send = UvicornLikeSend()
    async with running(app):
        with pytest.raises(RuntimeError):
            await app(post_scope("/v1/chat/completions"), BodyThenGone(body), server_send)
        records = await _records(engine)
    assert server_send.status == 200
    served_chars = 50 * len("hello world " * 10)
    (record,) = records
    print(
        f"client got status {server_send.status} and {served_chars} chars of text; "
        f"recorded status {record.status}, output {record.output_tokens} tokens, "
        f"cost {record.cost_nanos} nano-USD, note {record.note!r}"
    )
    assert record.status == 200
    assert record.output_tokens >= served_chars // 4
    assert record.cost_nanos > 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions?",  # sent as /v1/chat/completions%3F
        "/v1/chat/completions#",  # sent as /v1/chat/completions%23
        "/v1/chat/completions?x=1",  # sent as /v1/chat/completions%3Fx=1
    ],
)
async def test_a_path_whose_encoded_query_mark_a_proxy_cuts_off_is_metered(
    make_settings: Settings, path: str
) -> None:
    """SPEC §4: 'A POST whose path (after the mount's root_path) ends with one of:
    /chat/completions, ...'. A catch-all proxy (the one of test_adversary's
    `test_a_path_a_proxy_forwards_to_an_inference_path_is_metered`, but forwarding its decoded
    path parameter, `f"{UPSTREAM}/{rest}"`, the common pattern) receives
    `/v1/chat/completions%3F`: the ASGI path is `/v1/chat/completions?`, which ends with no
    suffix, so it passes unmetered; but httpx, given that URL, reads `?` (or `#`) as the
    query's (fragment's) start and sends `/v1/chat/completions` to the provider, which serves
    and bills it: spend with no charge, past every limit. (`is_inference_path` already meters
    the dot-segment and trailing-slash spellings a proxy normalizes; this one is normalized
    the same way.)"""
    served: list[int] = []
    provider = FastAPI()

    @provider.post("/v1/chat/completions")
    async def serve(request: Request) -> dict[str, Any]:
        served.append(1000)
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "x" * 4000}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1000, "total_tokens": 1010},
        }  # fmt: skip

    forward = httpx.AsyncClient(transport=httpx.ASGITransport(provider))
    app = FastAPI()

    @app.post("/{rest:path}")
    async def proxy(rest: str, request: Request) -> Any:
        sent = await forward.post(
            f"https://api.openai.com/{rest}",  # the usual catch-all proxy: its path parameter
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        return Response(sent.content, status_code=sent.status_code,
                        media_type=sent.headers.get("content-type"))  # fmt: skip

    settings = make_settings()
    app.add_middleware(BudgetMiddleware, settings=settings)
    from budget_middleware.engine.engine import get_engine

    engine = get_engine(settings)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        body = json.dumps(chat("openai/gpt-4o", max_tokens=1000)).encode()
        sent: dict[str, Any] = {}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]

        scope = post_scope(path, [(b"authorization", b"Bearer " + key.value.encode())])
        scope["raw_path"] = path.replace("?", "%3F").replace("#", "%23").encode()
        await app(scope, BodyThenGone(body), send)
        records = await _records(engine)
    print(
        f"{path!r}: status {sent.get('status')}, provider served {sum(served)} output "
        f"tokens, usage records {len(records)}, charged "
        f"{sum(r.cost_nanos for r in records)} nano-USD"
    )
    assert served, "the provider was not reached"
    assert len(records) == 1 and records[0].output_tokens == 1000
    assert records[0].cost_nanos > 0


async def test_a_stream_sent_as_memoryviews_is_passed_on_and_charged_its_usage(
    make_settings: Settings,
) -> None:
    """SPEC §7: 'Streams (text/event-stream) are passed through chunk by chunk ... Usage is read
    from the final OpenAI chunk'. The request side reads a body 'whatever bytes-like type it
    comes as' (test_asgi); an answer's chunks as memoryviews (an app relaying a buffer without a
    copy; uvicorn writes them as they are) made the exchange raise AttributeError ('memoryview'
    object has no attribute 'lstrip') into the app on its first chunk: the answer broke and the
    3,000 output tokens reported were not charged (only the prompt estimate)."""

    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 3000,
                                      "total_tokens": 4000}}  # fmt: skip

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send(_stream_start())
        for part in (_sse(_chunk("hi there")), _sse(usage), b"data: [DONE]\n\n"):
            await send(
                {
                    "type": "http.response.body",
                    "body": memoryview(part),
                    "more_body": not part.startswith(b"data: [DONE]"),
                }
            )

    app = BudgetMiddleware(inner, settings=make_settings())
    engine = app.engine
    body = json.dumps(chat(stream=True, stream_options={"include_usage": True})).encode()
    got: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            got.append(bytes(message.get("body", b"")))

    async with running(app):
        error = None
        try:
            await app(post_scope("/v1/chat/completions"), BodyThenGone(body), send)
        except Exception as exc:
            error = exc
        records = await _records(engine)
    (record,) = records
    print(
        f"error {error!r}; client got {sum(map(len, got))} bytes; charged "
        f"{record.cost_nanos} nano-USD for {record.output_tokens} output tokens (reported 3000)"
    )
    assert error is None
    assert b"hi there" in b"".join(got)
    assert record.output_tokens == 3000


async def test_response_headers_given_as_an_iterable_reach_the_client(
    make_settings: Settings,
) -> None:
    """ASGI: `http.response.start`'s headers are an 'Iterable[[byte string, byte string]]', and
    uvicorn reads any iterable (`list(message.get("headers", []))`). SPEC §2: the middleware
    is a transparent pure ASGI layer ('Non-inference requests pass through untouched'; a metered
    answer only gains §8's headers). Headers given as a generator were consumed by the
    exchange's own reading (`read_start`) and the client got none of the app's: no
    content-type, no x-request-id."""

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        body = json.dumps({"id": "x", "object": "chat.completion", "choices": [],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 20,
                                     "total_tokens": 30}}).encode()  # fmt: skip
        pairs = [(b"content-type", b"application/json"), (b"x-request-id", b"req_1")]
        await send(
            {"type": "http.response.start", "status": 200, "headers": (pair for pair in pairs)}
        )
        await send({"type": "http.response.body", "body": body})

    app = BudgetMiddleware(inner, settings=make_settings())
    got: dict[str, Any] = {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            got["headers"] = dict(list(message.get("headers", [])))

    async with running(app):
        body = json.dumps(chat()).encode()
        await app(post_scope("/v1/chat/completions"), BodyThenGone(body), send)
    print(f"client got headers {got['headers']}")
    assert got["headers"].get(b"content-type") == b"application/json"
    assert got["headers"].get(b"x-request-id") == b"req_1"


class GoneServer:
    """An ASGI 2.4 server's side of one request whose client leaves while the app works: the
    body, then `http.disconnect`; once gone, `send` raises an OSError, as ASGI 2.4 says a
    server does on a closed connection (uvicorn's `ClientDisconnected` is one)."""

    def __init__(self, body: bytes) -> None:
        self.receive = BodyThenGone(body)
        self.started = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.receive.gone.is_set():
            raise OSError("client disconnected")
        self.started = True


@pytest.mark.parametrize("answer", ["none", "json"])
async def test_a_client_gone_before_the_answer_is_charged_alike_whether_the_app_tries_to_answer(
    make_settings: Settings, answer: str
) -> None:
    """README ('What an answer cost'): 'A request whose client went away before the app
    answered, and which the app then ended without an answer ..., is charged the most it could
    have cost, as its reservation counted it: the call was made, and its answer is never
    seen.' SPEC: every admitted request is charged, whatever a client sends. The app below made
    its provider call (4,000 output tokens asked, 4,000 served) while its client left. With
    `answer="none"` it sees the disconnect and gives up (Django's way): charged its most output.
    With `answer="json"` it answers: on an ASGI 2.4 server its `http.response.start` raises
    OSError, so no answer is ever seen either; but that was charged the prompt's estimate alone
    (0 output tokens): the failed start counted as 'the answer started, and it was empty'."""
    served = {"done": False}
    usage = {"prompt_tokens": 20, "completion_tokens": 4000, "total_tokens": 4020}

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the body
        server.receive.gone.set()  # the client leaves while the provider works
        served["done"] = True  # the provider answered: 4,000 output tokens billed
        if answer == "none":
            assert (await receive())["type"] == "http.disconnect"
            return  # no answer: the client is gone
        body = json.dumps({"id": "x", "object": "chat.completion", "model": "gpt-4o",
                           "choices": [{"index": 0, "finish_reason": "length",
                                        "message": {"role": "assistant",
                                                    "content": "x" * 16000}}],
                           "usage": usage}).encode()  # fmt: skip
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    app = BudgetMiddleware(inner, settings=make_settings())
    engine = app.engine
    body = json.dumps(chat("openai/gpt-4o", max_tokens=4000)).encode()
    server = GoneServer(body)
    scope = post_scope("/v1/chat/completions")
    scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
    async with running(app):
        with contextlib.suppress(OSError):
            await app(scope, server.receive, server.send)
        records = await _records(engine)
    (record,) = records
    print(
        f"app {answer!r}: provider served 4000 output tokens; recorded output "
        f"{record.output_tokens}, cost {record.cost_nanos} nano-USD, outcome "
        f"{record.outcome}, note {record.note!r}"
    )
    assert served["done"]
    assert record.outcome == "client_disconnected"
    assert record.output_tokens >= 4000


async def test_a_request_cancelled_while_its_provider_call_is_in_flight_is_not_free(
    make_settings: Settings,
) -> None:
    """The server cancels the request's task while the app awaits its provider (uvicorn's
    `--timeout-graceful-shutdown` at a deploy, a server that kills the app of a gone client):
    the provider call was made and (for OpenAI, which finishes a generation whose client left)
    is billed. README: a request 'which the app then ended without an answer ... is charged the
    most it could have cost, as its reservation counted it: the call was made'; SPEC: every
    admitted request is charged. It was recorded `client_disconnected` at $0 (not estimated),
    its reservation of the most output released: the same cut a client's leave costs the most
    output for costs nothing when the server makes it."""
    in_flight = asyncio.Event()

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        in_flight.set()
        await asyncio.Event().wait()  # the provider call, never answered before the cancel

    app = BudgetMiddleware(inner, settings=make_settings())
    engine = app.engine
    body = json.dumps(chat("openai/gpt-4o", max_tokens=4000)).encode()

    async def send(message: dict[str, Any]) -> None:
        pass

    async with running(app):
        task = asyncio.create_task(
            app(post_scope("/v1/chat/completions"), BodyThenGone(body), send)
        )
        await in_flight.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        records = await _records(engine)
    (record,) = records
    print(
        f"cancelled with the provider call in flight (4000 output tokens asked): recorded "
        f"output {record.output_tokens}, cost {record.cost_nanos} nano-USD, estimated "
        f"{record.estimated}, outcome {record.outcome}, note {record.note!r}; "
        f"the server's task cancelled: {task.cancelled()}"
    )
    assert record.cost_nanos > 0 and record.estimated
    # The cancel reaches the server once settled: swallowed, the server's task would end as
    # if the app had answered (its graceful shutdown, its cancel scope, left waiting).
    assert task.cancelled()


async def test_a_stream_cut_under_a_naive_error_middleware_is_charged_what_it_streamed(
    make_settings: Settings,
) -> None:
    """The realistic shape of the second-start fault: a host app's hand-written catch-all error
    middleware (inside BudgetMiddleware) answers 500 when the endpoint raises, without checking
    whether the answer started; the endpoint's stream is cut by its upstream after 50 chunks.
    The server (uvicorn) refuses the second start: the client got 200 and the 50 chunks. SPEC
    §7: 'A stream that ends without usage (client disconnect, upstream cut) is charged an
    estimate from what was streamed'. It was charged $0, recorded with status 500."""
    from starlette.responses import JSONResponse, StreamingResponse

    class CatchAll:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await self.app(scope, receive, send)
            except Exception:
                await JSONResponse({"error": "internal"}, status_code=500)(scope, receive, send)

    async def tokens() -> Any:
        for _ in range(50):
            yield _sse(_chunk("hello world " * 10))
        raise RuntimeError("upstream connection reset")

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(tokens(), media_type="text/event-stream")

    settings = make_settings()
    app.add_middleware(CatchAll)
    app.add_middleware(BudgetMiddleware, settings=settings)
    from budget_middleware.engine.engine import get_engine

    engine = get_engine(settings)
    server_send = UvicornLikeSend()
    body = json.dumps(chat(stream=True, max_tokens=4000)).encode()
    async with running(app):
        with contextlib.suppress(RuntimeError):
            await app(post_scope("/v1/chat/completions"), BodyThenGone(body), server_send)
        records = await _records(engine)
    (record,) = records
    print(
        f"client got {server_send.status} and {server_send.body.count(b'hello world ')} "
        f"'hello world' of text; recorded status {record.status}, output "
        f"{record.output_tokens} tokens, cost {record.cost_nanos} nano-USD"
    )
    assert server_send.status == 200
    assert record.status == 200 and record.cost_nanos > 0
    assert record.output_tokens >= 50 * len("hello world " * 10) // 4


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/chat/completions?",
        "/v1/chat/completions#",
        "/v1/chat/completions/",
        "/v1/chat/completions/.",
    ],
)
async def test_a_stream_at_an_encoded_query_mark_asks_for_its_usage_as_any_stream(
    make_settings: Settings, path: str
) -> None:
    """The path up to the `?` is the one the target and the stream's usage are read from: a
    stream sent to `/v1/chat/completions%3F` reaches the app asking for its usage
    (`stream_options.include_usage`), as one sent to `/v1/chat/completions` does, so that it is
    charged what the provider counts, not an estimate. So for `%23`, a trailing slash and a dot
    segment, which a URL library drops too (`plain_path`)."""
    seen: list[Any] = []
    app = FastAPI()

    @app.post("/{rest:path}")
    async def catch_all(rest: str, request: Request) -> dict[str, Any]:
        seen.append(json.loads(await request.body()))
        return {}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    async with running(app):
        scope = post_scope(path, [])
        scope["raw_path"] = path.replace("?", "%3F").replace("#", "%23").encode()
        body = json.dumps(chat("openai/gpt-4o", stream=True)).encode()

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(scope, BodyThenGone(body), send)
    print(f"{path!r}: the app got stream_options {seen[0].get('stream_options')}")
    assert seen[0]["stream_options"] == {"include_usage": True}


async def _left_after_the_headers(
    settings: BudgetSettings, spec: str = "2.3", http_middleware: bool = False
) -> tuple[str, int, int]:
    """A FastAPI app streaming after 1 s of the provider's work (4,000 output tokens asked),
    `@app.middleware("http")` inside ours or not, whose client leaves 0.2 s after the headers
    on an ASGI `spec` server (2.4: `send` raises OSError once it is gone, and nobody listens
    for the disconnect): the record's outcome, output tokens and cost."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def slow(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            await asyncio.sleep(1)  # the provider works: nothing streams yet
            yield b"data: " + json.dumps(_chunk("")).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    if http_middleware:

        @app.middleware("http")
        async def passing(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            return await call_next(request)

    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(app)
    receive = BodyThenGone(json.dumps(chat("openai/gpt-4o", max_tokens=4000, stream=True)).encode())

    async def send(message: Message) -> None:
        if spec == "2.4" and receive.gone.is_set():
            raise OSError("client disconnected")  # ASGI 2.4: send on a closed connection
        if message["type"] == "http.response.start":  # the client leaves 0.2 s after them
            asyncio.get_running_loop().call_later(0.2, receive.gone.set)

    scope = post_scope("/v1/chat/completions")
    scope["asgi"] = {"version": "3.0", "spec_version": spec}
    async with running(app):
        before = {row.id for row in await _records(engine)}  # (the test's other requests')
        with contextlib.suppress(ClientDisconnect):  # Starlette's, from the OSError
            await asyncio.wait_for(app(scope, receive, send), 5)
        rows = [row for row in await _records(engine) if row.id not in before]
    assert len(rows) == 1, rows  # this request's, once
    return rows[0].outcome, rows[0].output_tokens, rows[0].cost_nanos


async def test_a_client_gone_after_the_headers_is_charged_alike_under_an_http_middleware(
    make_settings: Settings,
) -> None:
    """README/SPEC: a client that left before any answer (its headers alone are none) is
    charged the most its call could cost: the provider call was made. A FastAPI app with an
    `@app.middleware("http")` (a `BaseHTTPMiddleware`) added before `BudgetMiddleware`, so
    inside it: the stream's headers go, the provider works 1 s, the client leaves at 0.2 s.
    Starlette's BaseHTTPMiddleware ends the cut stream with an empty last chunk, which settled
    it as `completed`, its prompt alone (102,500 nano-USD, 0 output tokens); without the
    http middleware the same leave is `client_disconnected`, 4,000 output tokens
    (40,102,500 nano-USD)."""
    charged = {
        stack: await _left_after_the_headers(make_settings(), http_middleware=stack == "http")
        for stack in ("plain", "http")
    }
    print(f"client gone after the headers: {charged}")
    assert charged["http"] == charged["plain"]
    assert charged["plain"][:2] == ("client_disconnected", 4000)


async def test_a_client_gone_after_the_headers_is_charged_alike_on_an_asgi_2_4_server(
    make_settings: Settings,
) -> None:
    """The same leave on either kind of server: the stream's headers go, the provider works
    1 s (4,000 output tokens asked), the client leaves at 0.2 s. On an ASGI 2.3 server
    (uvicorn) Starlette sees the disconnect and stops: charged its most output, 4,000 tokens.
    On an ASGI 2.4 server nobody listens; the first chunk's `send` raises OSError, as ASGI 2.4
    says: that chunk never reached the client, yet it counted as 'a byte of the answer was
    sent', and the request was charged its prompt alone (102,500 for 40,102,500 nano-USD)."""
    charged = {
        spec: await _left_after_the_headers(make_settings(), spec) for spec in ("2.3", "2.4")
    }
    print(f"client gone after the headers: {charged}")
    assert charged["2.4"] == charged["2.3"]
    assert charged["2.3"][:2] == ("client_disconnected", 4000)


async def test_a_client_gone_while_it_sends_its_body_is_neither_served_nor_charged(
    make_settings: Settings,
) -> None:
    """A client that leaves halfway through sending its body (`http.disconnect` after a first
    `more_body` chunk): no call can be made of half a request, so the app is not called, nothing
    is answered and nothing is charged (no usage record, no slot held)."""
    called: list[bytes] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        called.append((await receive()).get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = BudgetMiddleware(inner, settings=make_settings())
    engine = app.engine
    body = json.dumps(chat()).encode()
    messages: list[Message] = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async with running(app):
        await app(post_scope("/v1/chat/completions"), receive, send)
        records = await _records(engine)
    print(f"app called with {called}, {len(sent)} messages sent, {len(records)} usage records")
    assert (called, sent, records) == ([], [], [])
