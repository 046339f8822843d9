"""What an app or an upstream can answer, and a client send, that must still be charged in full
and released once: a fault hunt's cases (2026-12-01), each charged less (or a slot held for
ever) before its fix. The app here answers exactly the status, headers and chunks a test gives.

Prices: gpt-4o at $1 a million input tokens and $10 a million output tokens (the pricing file).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from werkzeug.test import Client

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.engine.portal import on_loop, shut_down_engines
from budget_middleware.store.tables import UsageRecordRow
from budget_middleware.wsgi import BudgetWSGIMiddleware
from support import BodyThenGone, post_scope, running, serve_lifespan

Settings = Callable[..., BudgetSettings]
Header = tuple[bytes, bytes]
SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]
IN_NANOS, OUT_NANOS = 1_000, 10_000  # a token, at the file's prices
STREAM_REQUEST = {
    "model": "openai/gpt-4o",
    "stream": True,
    "max_tokens": 100,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "hi"}],
}


def cost(input_tokens: int, output_tokens: int) -> int:
    return input_tokens * IN_NANOS + output_tokens * OUT_NANOS


@pytest.fixture
def settings(make_settings: Settings, tmp_path: Path) -> BudgetSettings:
    path = tmp_path / "prices.json"
    prices = {"input_per_mtok": 1, "output_per_mtok": 10}
    path.write_text(json.dumps({"models": {"openai/gpt-4o": prices}}))
    return make_settings(pricing_file=path)


def answering(status: int, headers: list[Header], chunks: list[bytes]) -> Any:
    """A raw ASGI app that answers these chunks, whatever it is asked."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for n, chunk in enumerate(chunks):
            more = n < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        if not chunks:
            await send({"type": "http.response.body", "body": b""})

    return app


def rows_of(engine: BudgetEngine) -> list[UsageRecordRow]:
    with engine.store.session() as s:
        return list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]


async def charged(
    settings: BudgetSettings,
    headers: list[Header],
    chunks: list[bytes],
    request: dict[str, Any] | None = None,
) -> UsageRecordRow:
    """The one usage record of a request answered with these chunks."""
    app = BudgetMiddleware(answering(200, headers, chunks), settings=settings)
    body = request or {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    async with running(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200
        await app.engine.flush()
        rows = rows_of(app.engine)
    assert len(rows) == 1, rows
    row = rows[0]
    print(f"charged {row.cost_nanos} ({row.input_tokens} in, {row.output_tokens} out): {row.note}")
    return row


def event(data: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def chunk(text: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}}]
    return event({"object": "chat.completion.chunk", "choices": choices, "usage": usage})


# -- a client's request: its slot and reservation are released however it ends ---------------


def _nested_stream_request(depth: int = 300) -> bytes:
    """Valid JSON that orjson reads (up to 1,024 levels) but writes back only up to 254 levels,
    and the stdlib up to about 990."""
    nested = "[" * depth + "]" * depth
    return (
        '{"model": "openai/gpt-4o", "stream": true, "max_tokens": 10, '
        '"messages": [{"role": "user", "content": "hi"}], "metadata": {"x": ' + nested + "}}"
    ).encode()


async def test_a_request_whose_body_cannot_be_rewritten_gives_back_its_slot(
    settings: BudgetSettings,
) -> None:
    """A stream asked for its usage is rewritten; a body nested deeper than orjson writes is
    written by the stdlib instead, and one that nothing can write (1,000 deep) failed after
    admission, a 500 (its slot and reservation were held for ever: every later request of the
    key got 429 until a restart). It now goes as the client wrote it, not asked for its usage:
    every request ends, and its concurrency slot and reservation with it."""
    app = BudgetMiddleware(answering(200, SSE, [b"data: [DONE]\n\n"]), settings=settings)
    engine = app.engine
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 10}], rate_limit={"max_concurrent_requests": 1}
        )
        auth = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        statuses = []
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for depth in (300, 1000, 0):
                body = _nested_stream_request(depth)
                answer = await http.post("/v1/chat/completions", content=body, headers=auth)
                statuses.append(answer.status_code)
        budget = next(iter(engine.registry.windows["budget"].values()))
        slots = next(iter(engine.registry.concurrency.values()))
    print("answered", statuses, "; held after:", budget.reserved, slots.in_flight)
    assert statuses == [200, 200, 200]
    assert (budget.reserved, slots.in_flight) == (0, 0)


async def test_a_stream_too_deep_to_rewrite_is_passed_on_as_its_upstream_sent_it(
    settings: BudgetSettings,
) -> None:
    """A stream nested deeper than anything writes back (1,000 levels) goes as the client wrote
    it, not asked for its usage: the usage chunk an upstream sends all the same is none the
    middleware caused, and reaches the client with the answer's `content-length` (SPEC §7:
    only the chunk it caused is removed). A mutation run's survivor: counted as asked for, that
    chunk was taken out and the length dropped."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    chunks = [chunk("hello"), chunk(None, usage), b"data: [DONE]\n\n"]
    length = (b"content-length", b"%d" % sum(map(len, chunks)))
    app = BudgetMiddleware(answering(200, [*SSE, length], chunks), settings=settings)
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://t"
        ) as http:
            answer = await http.post(
                "/v1/chat/completions",
                content=_nested_stream_request(1000),
                headers={"content-type": "application/json"},
            )
        await app.engine.flush()
        rows = rows_of(app.engine)
    print(answer.status_code, answer.headers.get("content-length"), len(answer.content), "bytes")
    assert answer.status_code == 200 and answer.content == b"".join(chunks)
    assert answer.headers["content-length"] == length[1].decode()
    assert [(r.input_tokens, r.output_tokens, r.estimated) for r in rows] == [(10, 5, False)]


def test_a_wsgi_request_whose_body_cannot_be_rewritten_gives_back_its_slot(
    settings: BudgetSettings,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/event-stream")])
        return [b"data: [DONE]\n\n"]

    wrapped = BudgetWSGIMiddleware(app, settings)
    engine = wrapped.engine
    try:
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 10}], rate_limit={"max_concurrent_requests": 1}
        )
        auth = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}
        http = Client(wrapped)
        # Nested deeper than anything writes it back: it was a RecursionError (the server's
        # 500) after admission; it goes as written, not asked for its usage.
        deep = _nested_stream_request(1000)
        first = http.post("/v1/chat/completions", data=deep, headers=auth, buffered=True)
        body = _nested_stream_request(300)
        after = http.post("/v1/chat/completions", data=body, headers=auth, buffered=True)
        budget = next(iter(engine.registry.windows["budget"].values()))
        slots = next(iter(engine.registry.concurrency.values()))
        print("answered", first.status_code, "; then", after.status_code)
        assert first.status_code == 200 and after.status_code == 200
        assert (budget.reserved, slots.in_flight) == (0, 0)
    finally:
        shut_down_engines()


# -- streams -------------------------------------------------------------------------------


async def test_a_stream_answered_without_a_content_type_is_read_as_a_stream(
    settings: BudgetSettings,
) -> None:
    """Starlette's `StreamingResponse(gen())` sends no content-type; the SDKs read the stream
    all the same (they go by `stream: true`). It was read as JSON: the prompt alone."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    chunks = [chunk("hello " * 10) for _ in range(10)] + [chunk(None, usage), b"data: [DONE]\n\n"]
    row = await charged(settings, [], chunks, STREAM_REQUEST)
    assert (row.cost_nanos, row.streamed) == (cost(10, 5000), True)


async def test_text_streamed_after_the_last_usage_counts_too(settings: BudgetSettings) -> None:
    """A usage reported early (1 token so far), then 40,000 characters and `[DONE]`: the stream
    was charged its 1 token. The text after it counts, estimated."""
    chunks = [chunk("a", {"prompt_tokens": 10, "completion_tokens": 1})]
    chunks += [chunk("word " * 200) for _ in range(40)] + [b"data: [DONE]\n\n"]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.output_tokens, row.estimated) == ((40_001 + 3) // 4, True)
    assert row.cost_nanos == cost(10, row.output_tokens)


async def test_an_anthropic_count_is_never_lowered_by_a_later_event(
    settings: BudgetSettings,
) -> None:
    """message_delta counts are cumulative: a gateway's `input_tokens: 0` there erased the
    20,000 input tokens of message_start (a null count beside it is no count)."""
    start = {"id": "m", "type": "message", "role": "assistant", "content": []}
    start["usage"] = {"input_tokens": 20_000, "output_tokens": 1}
    delta = {"type": "text_delta", "text": "hi"}
    chunks = [
        event({"type": "message_start", "message": start}, "message_start"),
        event({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"),
        event(
            {
                "type": "message_delta",
                "usage": {"cache_read_input_tokens": None, "input_tokens": 0, "output_tokens": 50},
            },
            "message_delta",
        ),
        event({"type": "message_stop"}, "message_stop"),
    ]
    request = {**STREAM_REQUEST, "stream_options": None}
    row = await charged(settings, SSE, chunks, request)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (20_000, 50, False)


@pytest.mark.parametrize("usage", ["asked by the client", "asked by the middleware"])
async def test_a_stream_cut_after_an_event_over_16_mib_is_charged_its_most_output(
    settings: BudgetSettings, usage: str
) -> None:
    """An "event" over 16 MiB is not held but skipped unread; the stream cut after it, with
    no usage read since, is charged the most its request allows (its prompt alone before)."""
    chunks = [b": " + b"p" * (1 << 20) for _ in range(17)] + [b"\n\n", chunk("hi")]
    request = STREAM_REQUEST if usage == "asked by the client" else {**STREAM_REQUEST}
    if usage == "asked by the middleware":
        del request["stream_options"]
    row = await charged(settings, SSE, chunks, request)
    assert (row.output_tokens, row.estimated) == (100, True)  # its max_tokens
    assert row.note == "an event over 16 MiB was not read: charged its most output"


@pytest.mark.parametrize("written", ["utf-16", "utf-16-le", "utf-32"])
async def test_a_wide_stream_is_read_again_after_an_event_over_16_mib(
    settings: BudgetSettings, written: str
) -> None:
    """A stream in UTF-16 or UTF-32 that skips an event over 16 MiB unread: its end was looked
    for in the stream's bytes, where a LF byte never stands alone on a line, so the usage after
    it (10 in, 5,000 out: 50,010,000 nano-USD) was never read, and the stream was charged its
    most output, 100,042,000. Its end is looked for in its text: the usage after it is read."""
    text = (
        chunk("x" * 40).decode()
        + ": "
        + "p" * (17 << 20)
        + "\n\n"
        + chunk(None, {"prompt_tokens": 10, "completion_tokens": 5000}).decode()
        + "data: [DONE]\n\n"
    )
    coded = text.encode(written)
    chunks = [coded[i : i + (1 << 20) + 1] for i in range(0, len(coded), (1 << 20) + 1)]
    request = {**STREAM_REQUEST, "max_tokens": 10_000, "stream_options": None}
    row = await charged(settings, SSE, chunks, request)
    print(f"{written}: charged {row.cost_nanos} nano-USD, the usage says {cost(10, 5000)}")
    assert (row.cost_nanos, row.estimated, row.note) == (cost(10, 5000), False, None)


# -- JSON answers --------------------------------------------------------------------------


async def test_a_usage_key_written_with_an_escape_is_read(settings: BudgetSettings) -> None:
    """`"\\u0075sage"` is `usage` to every JSON reader, the client's included."""
    body = (
        b'{"choices": [{"message": {"role": "assistant", "content": "42"}}],'
        b' "\\u0075sage": {"prompt_tokens": 10, "completion_tokens": 50000}}'
    )
    assert json.loads(body)["usage"]["completion_tokens"] == 50_000
    row = await charged(settings, JSON, [body])
    assert (row.cost_nanos, row.estimated) == (cost(10, 50_000), False)


async def test_a_huge_answer_without_usage_is_charged_every_byte_it_answered(
    settings: BudgetSettings,
) -> None:
    """Of an answer over 2 MiB only the last MiB is kept (its usage sits at the end); with no
    usage, the estimate counted the text of that tail, which is no JSON on its own: 0."""
    text = "z" * (3 * 1024 * 1024)
    body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    row = await charged(settings, JSON, chunks)
    assert row.estimated and row.output_tokens == (len(body) + 3) // 4


@pytest.mark.parametrize("written", ["utf-16", "utf-16-be", "utf-32", "utf-32-le"])
@pytest.mark.parametrize("where", ["last", "first"], ids=["usage-last", "usage-first"])
async def test_a_huge_answer_in_utf_16_or_utf_32_is_charged_what_it_reports(
    settings: BudgetSettings, written: str, where: str
) -> None:
    """JSON over 2 MiB in UTF-16 or UTF-32 (which the SDKs' `json.loads` reads): its kept tail
    and head were searched for the usage's bytes as UTF-8 writes them, found nothing, and the
    answer was charged an estimate of every byte, 2 or 4 a character: 15,729,198,000 to
    31,458,358,000 nano-USD where its usage says 50,010,000. It is kept as the UTF-8 of its
    text: its usage is read, first or last, as a UTF-8 answer's is."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    answer = {"choices": [{"message": {"content": "x" * (3 << 20)}}]}
    answer = {**answer, "usage": usage} if where == "last" else {"usage": usage, **answer}
    coded = json.dumps(answer).encode(written)
    chunks = [coded[i : i + 65537] for i in range(0, len(coded), 65537)]  # (cut in characters)
    row = await charged(settings, JSON, chunks, {**STREAM_REQUEST, "stream": False})
    print(f"{written}, usage {where}: charged {row.cost_nanos} of {cost(10, 5000)} nano-USD")
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


@pytest.mark.parametrize("written", ["utf-16", "utf-32-be"])
async def test_a_huge_answer_in_utf_16_or_utf_32_without_usage_counts_its_text(
    settings: BudgetSettings, written: str
) -> None:
    """Without usage, a huge answer is estimated from its size: of a UTF-16 or UTF-32 one, in
    bytes, 2 or 4 a character (1,572,886 and 3,145,771 output tokens where its UTF-8 is 786,443
    tokens). Counted as the UTF-8 of its text, it is estimated as that is."""
    body = json.dumps({"choices": [{"message": {"content": "z" * (3 << 20)}}]})
    coded = body.encode(written)
    chunks = [coded[i : i + 65536] for i in range(0, len(coded), 65536)]
    row = await charged(settings, JSON, chunks, {**STREAM_REQUEST, "stream": False})
    print(f"{written}: {row.output_tokens} output tokens, its UTF-8 {(len(body) + 3) // 4}")
    mark = 3 if written == "utf-16" else 0  # its byte-order mark, as UTF-8 writes it
    assert row.estimated and row.output_tokens == (len(body) + mark + 3) // 4


async def test_a_tool_input_without_usage_counts_as_the_json_the_model_wrote(
    settings: BudgetSettings,
) -> None:
    """Inside a tool's input, keys named like ids and kinds are the model's text too."""
    tool_input = {"name": "n" * 2000, "status": "s" * 1000, "values": list(range(1000, 1200))}
    block = {"type": "tool_use", "id": "tu_1", "name": "create_user", "input": tool_input}
    body = json.dumps({"id": "msg_1", "type": "message", "content": [block]}).encode()
    row = await charged(settings, JSON, [body])
    written = len(json.dumps(tool_input, separators=(",", ":")))
    assert (row.output_tokens, row.estimated) == ((written + 3) // 4, True)


@pytest.mark.parametrize("told", ["-1", "-0.5", "nan", "1e400", "0x10", "free"])
async def test_a_cost_header_that_is_no_amount_leaves_the_cost_to_the_usage(
    settings: BudgetSettings, told: str
) -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    headers = [*JSON, (b"x-budget-cost", told.encode())]
    row = await charged(settings, headers, [body.encode()])
    assert (row.cost_nanos, row.cost_source) == (cost(10, 5), "pricing_file")


async def test_a_gzip_answer_in_two_members_is_read_whole(settings: BudgetSettings) -> None:
    """A streaming compressor that flushes by member writes several; the usage was in the
    second, which the meter dropped without a word: the prompt alone was charged."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
    members = gzip.compress(body[:30]) + gzip.compress(body[30:])
    row = await charged(settings, [*JSON, (b"content-encoding", b"gzip")], [members])
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


async def test_two_anthropic_messages_in_one_stream_are_both_charged(
    settings: BudgetSettings,
) -> None:
    """An app that streams a tool loop's two turns as two Anthropic messages in one answer: the
    second `message_start` cleared the first's usage (10,000 input and 500 output tokens)."""

    def message(n: int) -> list[bytes]:
        start = {"id": f"m{n}", "type": "message", "role": "assistant", "content": []}
        start["usage"] = {"input_tokens": 10_000, "output_tokens": 1}
        text = {"type": "text_delta", "text": "hi"}
        return [
            event({"type": "message_start", "message": start}, "message_start"),
            event({"type": "content_block_delta", "index": 0, "delta": text}),
            event({"type": "message_delta", "usage": {"output_tokens": 500}}, "message_delta"),
            event({"type": "message_stop"}, "message_stop"),
        ]

    request = {**STREAM_REQUEST, "max_tokens": 1000, "stream_options": None}
    row = await charged(settings, SSE, message(1) + message(2), request)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (20_000, 1000, False)
    assert row.cost_nanos == 2 * cost(10_000, 500)


def _completion(n: int, shape: str) -> list[bytes]:
    """One turn of a tool loop, streamed as OpenAI does: 10,000 input and 500 output tokens."""
    if shape == "chat":
        head = {"id": f"c{n}", "object": "chat.completion.chunk"}
        counts = {"prompt_tokens": 10_000, "completion_tokens": 500}
        return [
            event({**head, "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}),
            event({**head, "choices": [], "usage": counts}),
        ]
    response = {"id": f"r{n}", "object": "response", "model": "gpt-4o", "usage": None}
    usage = {"input_tokens": 10_000, "output_tokens": 500, "total_tokens": 10_500}
    return [
        event({"type": "response.created", "response": response}, "response.created"),
        event({"type": "response.output_text.delta", "delta": "hi"}, "response.output_text.delta"),
        event(
            {"type": "response.completed", "response": {**response, "usage": usage}},
            "response.completed",
        ),
    ]


@pytest.mark.parametrize("shape", ["chat", "responses"])
async def test_two_openai_completions_in_one_stream_are_both_charged(
    settings: BudgetSettings, shape: str
) -> None:
    """An app that streams a tool loop's two turns as two OpenAI completions (or responses) in
    one answer, each its own `id` and usage: the second's usage replaced the first's (10,000
    input and 500 output tokens charged of 20,000 and 1,000), as two Anthropic messages' did."""
    chunks = _completion(1, shape) + _completion(2, shape)
    if shape == "chat":
        chunks.append(b"data: [DONE]\n\n")
    row = await charged(settings, SSE, chunks, {**STREAM_REQUEST, "max_tokens": 1000})
    print(f"{shape}: charged {row.input_tokens} in, {row.output_tokens} out, {row.cost_nanos}")
    assert (row.input_tokens, row.output_tokens, row.estimated) == (20_000, 1000, False)
    assert row.cost_nanos == 2 * cost(10_000, 500)


async def test_usage_on_every_chunk_of_one_completion_counts_once(
    settings: BudgetSettings,
) -> None:
    """vLLM's usage on every chunk (one `id`) counts all so far: the last one is the charge,
    not their sum."""
    head = {"id": "c1", "object": "chat.completion.chunk"}
    chunks = [
        event({**head, "choices": [{"index": 0, "delta": {"content": "hi"}}],
               "usage": {"prompt_tokens": 10_000, "completion_tokens": n}})
        for n in (1, 2, 3)
    ]  # fmt: skip
    last = {"prompt_tokens": 10_000, "completion_tokens": 3}
    chunks += [event({**head, "choices": [], "usage": last}), b"data: [DONE]\n\n"]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (10_000, 3, False)


# -- found by the review of the fixes above -------------------------------------------------


@pytest.mark.parametrize("headers", [[], JSON], ids=["untyped", "json"])
async def test_an_untyped_answer_that_is_json_is_read_as_json(
    settings: BudgetSettings, headers: list[Header]
) -> None:
    """An app that answers JSON without a content-type (Starlette's `Response(body)`) to a
    request that said `stream: true`: read as a stream (the rule for untyped streams above),
    it was charged its prompt alone. Its first byte says JSON. So it does labelled JSON, which
    a stream asked for is read as a stream until its first bytes (a relayed stream may be so
    labelled): not looked at, it was charged its prompt alone (a mutation run's survivor)."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    body = json.dumps({"choices": [{"message": {"content": "x" * 20000}}], "usage": usage})
    row = await charged(settings, headers, [b"\n" + body.encode()], STREAM_REQUEST)
    print(f"{headers}: charged {row.cost_nanos / 1e9:.6f} USD, estimated={row.estimated}")
    assert (row.cost_nanos, row.streamed, row.estimated) == (cost(10, 5000), False, False)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_json_answer_labelled_an_event_stream_is_read_as_json(
    settings: BudgetSettings, stream: bool
) -> None:
    """An app that labels a whole JSON answer `text/event-stream` (a proxy's blanket header):
    read as a stream that holds no event, it was charged its prompt alone, $0.000048 for
    $0.05001. An event stream cannot begin with `{`: its first byte says JSON."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    body = json.dumps({"choices": [{"message": {"content": "x" * 20000}}], "usage": usage})
    request = {**STREAM_REQUEST, "stream": stream, "max_tokens": 10_000}
    row = await charged(settings, SSE, [b" ", body.encode()[:50], body.encode()[50:]], request)
    print(f"charged {row.cost_nanos / 1e9:.6f} USD, streamed={row.streamed}")
    assert (row.cost_nanos, row.streamed, row.estimated) == (cost(10, 5000), False, False)


@pytest.mark.parametrize("labelled", ["untyped", "json", "event-stream"])
@pytest.mark.parametrize("written", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("first", [1, 3, 20], ids=lambda n: f"first-chunk-{n}-bytes")
async def test_a_json_answer_to_a_stream_request_is_read_however_its_json_is_written(
    settings: BudgetSettings, written: str, labelled: str, first: int
) -> None:
    """The JSON answer to a request that asked for a stream (an app that does not stream,
    untyped, labelled JSON or labelled a stream), written with a byte-order mark or in UTF-16
    or UTF-32 (RFC 7159 JSON, which the SDKs' `json.loads` reads): its first byte is no `{`,
    so it was read as a stream that holds no event and charged its prompt alone (48,000
    nano-USD of $0.05001), where the same answer not asked to stream had its usage read.
    Its first character says JSON: read as JSON. A first chunk too short to hold that
    character (1 byte; 3: a mark alone, or UTF-32's first character cut) said a stream, and
    was charged the same 48,000: its first 4 bytes are waited for."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    body = json.dumps({"choices": [{"message": {"content": "x" * 20000}}], "usage": usage})
    headers = {"untyped": [], "json": JSON, "event-stream": SSE}[labelled]
    coded = body.encode(written)
    request = {**STREAM_REQUEST, "max_tokens": 10_000}
    row = await charged(settings, headers, [coded[:first], coded[first:]], request)
    print(f"{written}, {labelled}: charged {row.cost_nanos} nano-USD, estimated={row.estimated}")
    assert (row.cost_nanos, row.streamed, row.estimated) == (cost(10, 5000), False, False)


@pytest.mark.parametrize("shape", ["anthropic", "usage on every chunk"])
async def test_a_stream_given_up_on_after_its_first_usage_is_charged_its_most_output(
    settings: BudgetSettings, shape: str
) -> None:
    """Anthropic reports usage in `message_start`, vLLM on every chunk: a stream cut after an
    event over 16 MiB, no usage read since, was charged from its usage so far (1 output
    token), not its most output."""
    big = [b": " + b"p" * (1 << 20) for _ in range(17)] + [b"\n\n"]
    if shape == "anthropic":
        start = {"id": "m", "type": "message", "role": "assistant", "content": []}
        start["usage"] = {"input_tokens": 10, "output_tokens": 1}
        chunks = [event({"type": "message_start", "message": start}, "message_start"), *big]
        request = {**STREAM_REQUEST, "stream_options": None}
    else:
        chunks = [chunk("a", {"prompt_tokens": 10, "completion_tokens": 1}), *big]
        request = STREAM_REQUEST
    row = await charged(settings, SSE, chunks, request)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (10, 100, True)  # max_tokens


async def test_a_second_anthropic_message_cut_short_is_charged_its_streamed_text(
    settings: BudgetSettings,
) -> None:
    """The first turn complete (2,000 output tokens), the second cut after 4,000 characters:
    the first's `message_stop` left the stream complete, and the second's text was lost in
    the first's count (2,001 charged, not estimated)."""

    def start(n: int) -> bytes:
        message = {"id": f"m{n}", "type": "message", "role": "assistant", "content": []}
        message["usage"] = {"input_tokens": 10, "output_tokens": 1}
        return event({"type": "message_start", "message": message}, "message_start")

    def text(value: str) -> bytes:
        delta = {"type": "text_delta", "text": value}
        return event({"type": "content_block_delta", "index": 0, "delta": delta})

    chunks = [
        start(1),
        text("x" * 400),
        event({"type": "message_delta", "usage": {"output_tokens": 2000}}, "message_delta"),
        event({"type": "message_stop"}, "message_stop"),
        start(2),
        *[text("y" * 400) for _ in range(10)],
    ]
    request = {**STREAM_REQUEST, "max_tokens": 5000, "stream_options": None}
    row = await charged(settings, SSE, chunks, request)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (20, 2000 + 1000, True)


@pytest.mark.parametrize(
    ("shape", "end"),
    [("chat", "cut"), ("chat", "done"), ("responses", "cut")],
    ids=["chat-cut", "chat-done-without-its-usage", "responses-cut"],
)
async def test_a_second_openai_completion_cut_short_is_charged_its_prompt_and_text(
    settings: BudgetSettings, shape: str, end: str
) -> None:
    """A tool loop's first turn streamed whole (10,000 in, 500 out, its usage), the second
    (another `id`) cut after 4,000 characters, or ended by `[DONE]` without its usage: the
    first's usage left the stream complete, and the second was charged as more text of the
    first (10,000 in, 1,001 out: its prompt lost, and the first's 500 output tokens replaced
    by the characters of both), not as the Anthropic message after another is."""
    if shape == "chat":
        head = {"id": "c2", "object": "chat.completion.chunk", "usage": None}
        text = {"index": 0, "delta": {"content": "y" * 400}}
        second = [event({**head, "choices": [text]}) for _ in range(10)]
    else:
        response = {"id": "r2", "object": "response", "model": "gpt-4o", "usage": None}
        second = [event({"type": "response.created", "response": response}, "response.created")]
        delta = {"type": "response.output_text.delta", "delta": "y" * 400}
        second += [event(delta, "response.output_text.delta") for _ in range(10)]
    if end == "done":
        second.append(b"data: [DONE]\n\n")
    request = {**STREAM_REQUEST, "max_tokens": 5000}
    row = await charged(settings, SSE, _completion(1, shape) + second, request)
    prompt = row.input_tokens - 10_000  # the second's: the request's estimate
    assert 0 < prompt < 100
    assert (row.output_tokens, row.estimated) == (500 + 1000, True)
    assert row.cost_nanos == cost(10_000 + prompt, 1500)


async def test_a_post_in_lower_case_is_metered(settings: BudgetSettings) -> None:
    """h11 passes the method on as sent, and Django's ASGI handler upper-cases it: `post`
    reached the app's POST view unmetered, past every limit."""
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    app = BudgetMiddleware(answering(200, JSON, [body.encode()]), settings=settings)
    request = json.dumps({"model": "openai/gpt-4o", "messages": []}).encode()
    statuses: list[int] = []
    async with running(app):
        key = app.engine.manager.create_virtual_key(
            name="k", rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"}
        )
        for method in ("POST", "post", "Post"):
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": request, "more_body": False}

            async def send(message: dict[str, Any], into: list[Any] = sent) -> None:
                into.append(message)

            scope = {
                "type": "http",
                "method": method,
                "path": "/v1/chat/completions",
                "headers": [(b"authorization", f"Bearer {key.value}".encode())],
            }
            await app(scope, receive, send)
            statuses.append(sent[0]["status"])
        await app.engine.flush()
        rows = rows_of(app.engine)
    print("POST, post, Post:", statuses, "; usage records", len(rows))
    assert statuses == [200, 429, 429] and len(rows) == 1


# -- a second hunt (2026-12-02) -------------------------------------------------------------


def wsgi_charged(
    settings: BudgetSettings,
    headers: list[Header],
    body: bytes | list[bytes],
    request: dict[str, Any] | None = None,
) -> UsageRecordRow:
    """`charged`, through the WSGI middleware: an app that answers this body (or chunks)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [(n.decode(), v.decode()) for n, v in headers])
        return [body] if type(body) is bytes else body

    wrapped = BudgetWSGIMiddleware(app, settings)
    try:
        request = request or {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
        answer = Client(wrapped).post("/v1/chat/completions", json=request, buffered=True)
        assert answer.status_code == 200
        on_loop(wrapped.engine, wrapped.engine.flush)
        rows = rows_of(wrapped.engine)
    finally:
        shut_down_engines()
    assert len(rows) == 1, rows
    row = rows[0]
    print(f"charged {row.cost_nanos} ({row.input_tokens} in, {row.output_tokens} out): {row.note}")
    return row


_ANSWER = json.dumps(
    {
        "choices": [{"index": 0, "message": {"content": "hello"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5000},
    }
).encode()
_CUT = _ANSWER[:-60]  # what h11 hands on of it under a `content-length` 60 bytes short
_CUT_NOTE = "a JSON body cut short or corrupt: charged its most output"


async def test_a_json_answer_cut_short_is_charged_its_most_output(
    settings: BudgetSettings,
) -> None:
    """A provider's `content-length` shorter than its body: the client's HTTP library (h11)
    hands on the body cut to it, without its usage, and an app that passes it on answers that.
    It was charged its prompt alone (0 output tokens, "no usage in the response"); JSON that
    does not parse cannot be read, and is charged its most output, as a bad coding is."""
    row = await charged(settings, JSON, [_CUT])
    assert (row.output_tokens, row.estimated, row.note) == (100, True, _CUT_NOTE)  # max_tokens


def test_a_wsgi_json_answer_cut_short_is_charged_its_most_output(
    settings: BudgetSettings,
) -> None:
    row = wsgi_charged(settings, JSON, _CUT)
    assert (row.output_tokens, row.estimated, row.note) == (100, True, _CUT_NOTE)


_LONGER = [*JSON, (b"content-length", str(len(_CUT)).encode())]  # the body is 60 bytes longer
# The answer in one chunk (across its length), and in two, the first ending at its length.
_CHUNKED = {"in one chunk": [_ANSWER], "cut at its length": [_CUT, _ANSWER[len(_CUT) :]]}


@pytest.mark.parametrize("chunks", sorted(_CHUNKED))
async def test_an_answer_longer_than_its_content_length_is_charged_what_it_reports(
    settings: BudgetSettings, chunks: str
) -> None:
    """An app's `content-length` shorter than the body it writes: the server cuts it (werkzeug,
    wsgiref, gunicorn) or drops the connection (uvicorn), after the middleware read it all.
    The usage it reports is charged (as before the hunt), however the app chunks it."""
    row = await charged(settings, _LONGER, _CHUNKED[chunks])
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


@pytest.mark.parametrize("chunks", sorted(_CHUNKED))
def test_a_wsgi_answer_longer_than_its_content_length_is_charged_what_it_reports(
    settings: BudgetSettings, chunks: str
) -> None:
    """The WSGI middleware settles an answer at the chunk that completes its `content-length`
    (its client may call again before the server asks for the next one). A chunk that ended
    there with the JSON cut short settled it so, charged its most output (1,021,000 nano-USD),
    where a chunk across the length was read on (50,010,000 reported): JSON cut short at its
    length is read on to the app's end, whole JSON settled there as before."""
    row = wsgi_charged(settings, _LONGER, _CHUNKED[chunks])
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


# A buggy app's answer: the whole JSON under its `content-length`, and bytes past it (gunicorn and
# waitress send the length and drop the rest, werkzeug and wsgiref send it all; uvicorn refuses
# the message that crosses it, raising in the app's `send`).
_PAST = [*JSON, (b"content-length", str(len(_ANSWER)).encode())]
_OVER = _ANSWER + b'{"error": "trailing"}'
_AT = len(_ANSWER)
_PAST_CHUNKED = {
    "in one chunk": [_OVER],
    "split at its length": [_OVER[:_AT], _OVER[_AT:]],
    "split before its length": [_OVER[: _AT - 10], _OVER[_AT - 10 :]],
    "split after its length": [_OVER[: _AT + 5], _OVER[_AT + 5 :]],
    "byte by byte": [_OVER[i : i + 1] for i in range(len(_OVER))],
}


@pytest.mark.parametrize("chunks", list(_PAST_CHUNKED))
async def test_an_answer_with_bytes_past_its_content_length_is_charged_what_it_reports(
    settings: BudgetSettings, chunks: str
) -> None:
    """An app that writes its whole JSON answer, as its `content-length` says, and bytes after
    it: the answer is what its length holds, and charged what it reports there, however the
    app chunks it. The bytes past it were read as part of the JSON, which then did not parse:
    charged its most output (1,019,000 nano-USD, 100 tokens, however chunked) where it reports
    50,010,000 nano-USD (5,000 tokens). The client gets what the app sent (here all of it:
    httpx's `ASGITransport` holds to no length; a server's own rule, below)."""
    row = await charged(settings, _PAST, _PAST_CHUNKED[chunks])
    print(f"{chunks}: charged {row.cost_nanos} nano-USD, {row.output_tokens} out")
    assert (row.cost_nanos, row.output_tokens, row.estimated) == (cost(10, 5000), 5000, False)


@pytest.mark.parametrize("chunks", list(_PAST_CHUNKED))
def test_a_wsgi_answer_with_bytes_past_its_content_length_is_charged_what_it_reports(
    settings: BudgetSettings, chunks: str
) -> None:
    """The same through the WSGI middleware, which settles the answer at its length: a chunk
    across the length is judged by its part up to it (whole there: settled; cut short there:
    read on, `test_a_wsgi_answer_longer_than_its_content_length_is_charged_what_it_reports`).
    What goes to the server is all the app wrote: the server's to cut at the length."""
    row = wsgi_charged(settings, _PAST, _PAST_CHUNKED[chunks])
    print(f"{chunks}: charged {row.cost_nanos} nano-USD, {row.output_tokens} out")
    assert (row.cost_nanos, row.output_tokens, row.estimated) == (cost(10, 5000), 5000, False)


# Lengths that bound nothing: the answer is read to its end (here its JSON and the bytes after
# it, which do not parse: its most output, 100 tokens) as before. Not a number; two that differ
# (h11 refuses them, httptools takes the first, gunicorn and waitress the last); one beside
# `transfer-encoding: chunked` (uvicorn sends all of it, chunked).
_UNBOUNDED = {
    "not a number": [(b"content-length", b"1l9")],
    "negative": [(b"content-length", b"-%d" % _AT)],
    "two that differ": [(b"content-length", b"%d" % _AT), (b"content-length", b"%d" % (_AT + 5))],
    "beside transfer-encoding": [
        (b"content-length", b"%d" % _AT),
        (b"transfer-encoding", b"chunked"),
    ],
}


@pytest.mark.parametrize(
    ("adapter", "length"),
    [*(("asgi", length) for length in _UNBOUNDED), ("wsgi", "not a number"), ("wsgi", "negative")],
)
async def test_a_content_length_that_bounds_nothing_leaves_the_answer_read_whole(
    settings: BudgetSettings, adapter: str, length: str
) -> None:
    """A length that is no count of bytes bounds nothing, under either adapter (under WSGI the
    last of two lengths counts, and a length beside `transfer-encoding`, as gunicorn reads
    them: `test_a_wsgi_answer_with_bytes_past_its_content_length_is_charged_what_it_reports`)."""
    headers = [*JSON, *_UNBOUNDED[length]]
    if adapter == "asgi":
        row = await charged(settings, headers, [_OVER])
    else:
        row = await asyncio.to_thread(wsgi_charged, settings, headers, [_OVER])
    print(f"{adapter}, {length}: {row.output_tokens} output tokens, estimated {row.estimated}")
    assert (row.output_tokens, row.estimated) == (100, True)


@pytest.mark.parametrize("chunks", ["its body", "an empty chunk, then its body"])
@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
async def test_an_answer_that_says_0_bytes_and_writes_its_json_is_charged_what_it_reports(
    settings: BudgetSettings, adapter: str, chunks: str
) -> None:
    """`content-length: 0` and a JSON body all the same (servers send none of it): nothing up
    to the length says what it cost, so the body is read on. Under WSGI an empty chunk first
    completed the length, settled there as an answer of no usage (21,000 nano-USD, its prompt
    estimated) where its JSON alone was read on (50,010,000 reported)."""
    body = [_ANSWER] if chunks == "its body" else [b"", _ANSWER]
    headers = [*JSON, (b"content-length", b"0")]
    if adapter == "asgi":
        row = await charged(settings, headers, body)
    else:
        row = await asyncio.to_thread(wsgi_charged, settings, headers, body)
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


class _LengthBound:
    """A server's `send` that holds to the answer's Content-Length as uvicorn does (either of
    its HTTP implementations): a body message that would go past it is refused, raising in the
    app (the client has what came before, and a connection dropped)."""

    def __init__(self) -> None:
        self.left: int | None = None
        self.body = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            for name, value in message["headers"]:
                if name.lower() == b"content-length":
                    self.left = int(value)
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self.left is not None:
                if len(body) > self.left:
                    raise RuntimeError("Response content longer than Content-Length")
                self.left -= len(body)
            self.body += body


@pytest.mark.parametrize("chunks", list(_PAST_CHUNKED))
async def test_bytes_past_the_content_length_a_server_refuses_change_nothing_of_the_charge(
    settings: BudgetSettings, chunks: str
) -> None:
    """Under a server that refuses the message crossing the length (uvicorn: "Response content
    longer than Content-Length", raised in the app's `send`): the app fails, its answer is
    settled once, and charged what the answer reports up to its length (50,010,000 nano-USD;
    1,019,000, its most output, before), whatever the client got of it. Its outcome is what
    the client got: the whole answer (split at the length, byte by byte: the message refused
    came after it) is `completed`, as under WSGI, where it was an `upstream_error`; part of it
    (nothing, in one chunk) is the app's failure."""
    app = BudgetMiddleware(answering(200, _PAST, _PAST_CHUNKED[chunks]), settings=settings)
    request = json.dumps({"model": "openai/gpt-4o", "messages": [], "max_tokens": 100})
    server = _LengthBound()
    async with running(app):
        with pytest.raises(RuntimeError, match="longer than Content-Length"):
            await app(post_scope("/v1/chat/completions"), BodyThenGone(request.encode()), server)
        await app.engine.flush()
        rows = rows_of(app.engine)
    charged = [(r.cost_nanos, r.output_tokens, r.estimated, r.outcome) for r in rows]
    print(f"{chunks}: the client got {len(server.body)} of {_AT} bytes; records {charged}")
    assert _ANSWER.startswith(server.body)
    outcome = "completed" if server.body == _ANSWER else "upstream_error"
    assert charged == [(cost(10, 5000), 5000, False, outcome)]


# A huge answer (over 2 MiB: the exchange keeps its first 64 KiB and its tail), its usage last,
# with bytes past its length.
_HUGE = json.dumps(
    {
        "choices": [{"index": 0, "message": {"content": "word " * 700_000}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5000},
    }
).encode()
_HUGE_OVER = _HUGE + b'{"error": "trailing"}'
_HUGE_PAST = [*JSON, (b"content-length", b"%d" % len(_HUGE))]
_HUGE_CHUNKED = {
    "in one chunk": [_HUGE_OVER],
    "split at its length": [_HUGE, _HUGE_OVER[len(_HUGE) :]],
    "64 KiB at a time": [_HUGE_OVER[i : i + 65536] for i in range(0, len(_HUGE_OVER), 65536)],
}


@pytest.mark.parametrize("chunks", list(_HUGE_CHUNKED))
@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
async def test_a_huge_answer_with_bytes_past_its_content_length_is_charged_what_it_reports(
    settings: BudgetSettings, adapter: str, chunks: str
) -> None:
    """The same as a huge answer (3.5 MB): under ASGI its kept tail, with the bytes past its
    length, did not parse, and was never cut at the length: charged every byte as output, an
    estimate of 875,034 tokens (8,750,359,000 nano-USD) where it reports 5,000 (50,010,000),
    however chunked. The tail is cut where the length falls in it. (WSGI judged it at its
    length already.)"""
    if adapter == "asgi":
        row = await charged(settings, _HUGE_PAST, _HUGE_CHUNKED[chunks])
    else:
        row = await asyncio.to_thread(wsgi_charged, settings, _HUGE_PAST, _HUGE_CHUNKED[chunks])
    print(f"{adapter}, {chunks}: charged {row.cost_nanos} nano-USD, {row.output_tokens} out")
    assert (row.cost_nanos, row.output_tokens, row.estimated) == (cost(10, 5000), 5000, False)


# A stream that says its Content-Length (an app's own), ended within it (10 in, 50 out), and
# events past it: another completion's text and usage (9,000 out).
_STREAMED = chunk("hi") + chunk(None, {"prompt_tokens": 10, "completion_tokens": 50})
_STREAMED += b"data: [DONE]\n\n"
_STREAM_PAST = chunk("x" * 4000) + chunk(None, {"prompt_tokens": 10, "completion_tokens": 9000})
_STREAM_OVER = _STREAMED + _STREAM_PAST + b"data: [DONE]\n\n"
_SAT = len(_STREAMED)
_STREAM_LENGTH = [*SSE, (b"content-length", b"%d" % _SAT)]
_STREAM_CHUNKED = {
    "in one chunk": [_STREAM_OVER],
    "split at its length": [_STREAMED, _STREAM_OVER[_SAT:]],
    "split before its length": [_STREAM_OVER[: _SAT - 10], _STREAM_OVER[_SAT - 10 :]],
    "split after its length": [_STREAM_OVER[: _SAT + 5], _STREAM_OVER[_SAT + 5 :]],
    "byte by byte": [_STREAM_OVER[i : i + 1] for i in range(len(_STREAM_OVER))],
}


@pytest.mark.parametrize("chunks", list(_STREAM_CHUNKED))
@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
async def test_a_stream_with_events_past_its_content_length_is_charged_what_it_holds(
    settings: BudgetSettings, adapter: str, chunks: str
) -> None:
    """A stream that ends within its `content-length`, and events past it: no server sends
    them (gunicorn and waitress cut the answer at its length, uvicorn refuses the message that
    crosses it), and the WSGI middleware judged the stream at its length, charged what it
    reports there (510,000 nano-USD). Under ASGI they were read and charged, however chunked:
    90,010,000 (the usage past the length). Read to its length there too now."""
    if adapter == "asgi":
        row = await charged(settings, _STREAM_LENGTH, _STREAM_CHUNKED[chunks], STREAM_REQUEST)
    else:
        row = await asyncio.to_thread(
            wsgi_charged, settings, _STREAM_LENGTH, _STREAM_CHUNKED[chunks], STREAM_REQUEST
        )
    print(f"{adapter}, {chunks}: charged {row.cost_nanos} nano-USD, {row.output_tokens} out")
    assert (row.cost_nanos, row.output_tokens, row.estimated) == (cost(10, 50), 50, False)


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
async def test_a_stream_cut_short_at_its_content_length_is_read_on(
    settings: BudgetSettings, adapter: str
) -> None:
    """A stream whose `content-length` ends before its usage (an app that says too few
    bytes): not ended there, it is read on to its end under either adapter, and charged the
    usage past the length (510,000 nano-USD), not an estimate of what streamed before it."""
    headers = [*SSE, (b"content-length", b"%d" % len(chunk("hi")))]
    if adapter == "asgi":
        row = await charged(settings, headers, [_STREAMED], STREAM_REQUEST)
    else:
        row = await asyncio.to_thread(wsgi_charged, settings, headers, [_STREAMED], STREAM_REQUEST)
    print(f"{adapter}: charged {row.cost_nanos} nano-USD, {row.output_tokens} out")
    assert (row.cost_nanos, row.output_tokens, row.estimated) == (cost(10, 50), 50, False)


# What uvicorn serves (the test below), named by the request's tag: the app answers these
# headers and chunks.
_UVICORN_APP = """
import pickle
from budget_middleware import BudgetMiddleware

with open(__file__[: -len("host.py")] + "answers.pickle", "rb") as file:
    ANSWERS = pickle.load(file)


async def host(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    headers, chunks = ANSWERS[dict(scope["headers"])[b"x-budget-tags"].decode()]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for n, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": n < len(chunks) - 1})


app = BudgetMiddleware(host)
"""
# tag: (headers, chunks, the request, what the client gets, the charge, the outcome)
_UVICORN_ANSWERS: dict[str, tuple[list[Header], list[bytes], Any, bytes | None, int, str]] = {
    "json-in-one-chunk": (_PAST, [_OVER], None, None, cost(10, 5000), "upstream_error"),
    "json-split-before": (
        _PAST, _PAST_CHUNKED["split before its length"], None, None, cost(10, 5000),
        "upstream_error",
    ),
    "json-split-at": (
        _PAST, _PAST_CHUNKED["split at its length"], None, _ANSWER, cost(10, 5000), "completed"
    ),
    "huge-split-at": (
        _HUGE_PAST, _HUGE_CHUNKED["split at its length"], None, _HUGE, cost(10, 5000),
        "completed",
    ),
    "stream-split-at": (
        _STREAM_LENGTH, _STREAM_CHUNKED["split at its length"], STREAM_REQUEST, _STREAMED,
        cost(10, 50), "completed",
    ),
    "stream-in-one-chunk": (
        _STREAM_LENGTH, [_STREAM_OVER], STREAM_REQUEST, None, cost(10, 50), "upstream_error"
    ),
}  # fmt: skip


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_under_uvicorn_an_answer_is_charged_and_recorded_at_its_content_length(
    tmp_path: Path, http: str
) -> None:
    """Under uvicorn (either HTTP implementation, in a process of its own), which refuses the
    message that would go past an answer's `content-length` and raises in the app: each answer
    is charged what it reports up to its length (JSON, a huge JSON answer, a stream), and its
    outcome says whether the client got it whole. Before: all six `upstream_error`, though the
    client of each answer split at its length got all of it; the huge one charged 8,750,359,000
    nano-USD (50,010,000 reported), the stream 90,010,000 (510,000)."""
    import os
    import pickle
    import signal
    import sqlite3
    import subprocess
    import sys

    from service_support import free_port, wait_for_port

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "host.py").write_text(_UVICORN_APP)
    answers = {tag: (a[0], a[1]) for tag, a in _UVICORN_ANSWERS.items()}
    (tmp_path / "answers.pickle").write_bytes(pickle.dumps(answers))
    prices = tmp_path / "prices.json"
    price = {"input_per_mtok": 1, "output_per_mtok": 10}
    prices.write_text(json.dumps({"models": {"openai/gpt-4o": price}}))
    db = tmp_path / "s.db"
    env = {**os.environ, "BUDGET_DATABASE_URL": f"sqlite:///{db}",
           "BUDGET_PRICING_FILE": str(prices), "PYTHONPATH": str(root / "src")}  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "host:app", "--app-dir", str(tmp_path),
         "--port", str(port), "--http", http, "--log-level", "critical"],
        env=env,
    )  # fmt: skip
    got: dict[str, bytes | None] = {}
    try:
        wait_for_port(port, 30)
        for tag, (_, _, request, _, _, _) in _UVICORN_ANSWERS.items():
            body = request or {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            try:  # (a connection of its own: uvicorn closes one whose app failed)
                got[tag] = httpx.post(url, json=body, headers={"x-budget-tags": tag}).content
            except (httpx.RemoteProtocolError, httpx.ReadError):  # dropped before its length
                got[tag] = None
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT tags, cost_nanos, outcome FROM bm_usage_records ORDER BY id"
        ).fetchall()
    records = {json.loads(tags)[0]: (charge, outcome) for tags, charge, outcome in rows}
    for tag, charge_and_outcome in records.items():
        whole = "its whole answer" if got[tag] is not None else "a connection dropped short"
        print(f"{http}, {tag}: the client got {whole}; charged, outcome {charge_and_outcome}")
    assert len(rows) == len(_UVICORN_ANSWERS)
    for tag, (_, _, _, whole_answer, charge, outcome) in _UVICORN_ANSWERS.items():
        assert (got[tag], records[tag]) == (whole_answer, (charge, outcome)), tag


_BIG_EVENT = [b": " + b"p" * (1 << 20) for _ in range(17)] + [b"\n\n"]  # over 16 MiB


@pytest.mark.parametrize("shape", ["openai, usage asked by the middleware", "anthropic"])
async def test_the_usage_after_an_event_over_16_mib_is_read_and_ours_dropped(
    settings: BudgetSettings, shape: str
) -> None:
    """The meter stopped reading a stream at an event over 16 MiB: the usage-only chunk it had
    asked for reached the client after it (which naive clients read as `choices[0]`), and the
    usage reported after it was never read (charged its max_tokens, 100 of 5,000 output tokens
    reported). The event is skipped unread now, not held, and the stream read again after it."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    if shape == "anthropic":
        start = {"id": "m", "type": "message", "role": "assistant", "content": []}
        start["usage"] = {"input_tokens": 10, "output_tokens": 1}
        late = event({"type": "message_delta", "usage": {"output_tokens": 5000}}, "message_delta")
        chunks = [event({"type": "message_start", "message": start}, "message_start")]
        chunks += [*_BIG_EVENT, late, event({"type": "message_stop"}, "message_stop")]
        request = {**STREAM_REQUEST, "stream_options": None}
    else:
        chunks = [chunk("hi"), *_BIG_EVENT, chunk(None, usage), b"data: [DONE]\n\n"]
        request = {**STREAM_REQUEST}
        del request["stream_options"]
    app = BudgetMiddleware(answering(200, SSE, chunks), settings=settings)
    async with running(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.post("/v1/chat/completions", json=request)
        await app.engine.flush()
        rows = rows_of(app.engine)
    data = [line[6:] for line in answer.content.split(b"\n") if line.startswith(b"data: {")]
    empty = sum(1 for d in data if json.loads(d).get("choices") == [])
    row = rows[0]
    print(f"chunks with no choice {empty}; charged {row.input_tokens} in, {row.output_tokens} out")
    assert len(answer.content) > 16 << 20  # the event passed on, as it came
    assert (row.input_tokens, row.output_tokens, row.estimated) == (10, 5000, False)
    assert empty == 0


# -- a usage that reports nothing was made -------------------------------------------------

_NOTHING = {
    "openai": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "anthropic": {"input_tokens": 0, "output_tokens": 0},
}


def _answer(shape: str, text: str, usage: dict[str, Any]) -> bytes:
    if shape == "anthropic":
        return json.dumps({"type": "message", "content": [{"type": "text", "text": text}],
                           "usage": usage}).encode()  # fmt: skip
    message = {"role": "assistant", "content": text}
    return json.dumps({"choices": [{"index": 0, "message": message}], "usage": usage}).encode()


@pytest.mark.parametrize("shape", sorted(_NOTHING))
async def test_a_usage_of_0_tokens_beside_an_answer_is_charged_what_the_answer_shows(
    settings: BudgetSettings, shape: str
) -> None:
    """An upstream (a broken gateway, a proxy that zeroes what it does not know) reports 0
    tokens in and 0 out beside 2,000 characters it generated: it was charged $0, so a budget
    never moved however much it served. No prompt is 0 tokens: such a usage reports nothing,
    and the answer is estimated as one without usage is (SPEC §7), and says so."""
    text = "word " * 400
    request = {"model": "openai/gpt-4o", "max_tokens": 1000,
               "messages": [{"role": "user", "content": "say a word " * 40}]}  # fmt: skip
    row = await charged(settings, JSON, [_answer(shape, text, _NOTHING[shape])], request)
    assert (row.output_tokens, row.estimated) == (500, True)
    assert row.input_tokens > 0 and row.cost_nanos == cost(row.input_tokens, 500)
    assert row.note is not None and "0 tokens" in row.note


async def test_a_stream_whose_usage_reports_0_tokens_is_charged_its_text(
    settings: BudgetSettings,
) -> None:
    """The same in a stream's last chunk, after 2,000 characters: $0 before."""
    chunks = [chunk("word " * 40) for _ in range(10)]
    chunks += [chunk(None, _NOTHING["openai"]), b"data: [DONE]\n\n"]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.output_tokens, row.estimated) == (500, True)
    assert row.input_tokens > 0 and row.cost_nanos == cost(row.input_tokens, 500)


async def test_a_stream_that_reports_0_tokens_first_is_charged_its_prompt_with_its_text(
    settings: BudgetSettings,
) -> None:
    """A server that opens its stream with a usage of 0 (its counts so far) and never reports
    again: the text after it was counted, its prompt was 0 tokens."""
    chunks = [chunk("a", _NOTHING["openai"])] + [chunk("word " * 40) for _ in range(10)]
    chunks.append(b"data: [DONE]\n\n")
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert row.estimated and row.output_tokens == (2_001 + 3) // 4
    assert row.input_tokens > 0 and row.cost_nanos == cost(row.input_tokens, row.output_tokens)


async def test_a_usage_of_0_tokens_with_a_cost_is_that_cost(settings: BudgetSettings) -> None:
    """A gateway that says what the answer cost (`usage.cost`, a free model's $0) is believed:
    the rule above is for counts that say nothing, not for a price the gateway states."""
    usage = {**_NOTHING["openai"], "cost": 0.0}
    row = await charged(settings, JSON, [_answer("openai", "word " * 400, usage)])
    assert (row.cost_nanos, row.estimated, row.output_tokens) == (0, False, 0)


async def test_a_usage_of_0_tokens_from_the_app_s_own_cache_is_free_when_it_says_so(
    settings: BudgetSettings,
) -> None:
    """An app that answers from its own cache and zeroes the usage states the cost with
    `x-budget-cost: 0` (README): that is believed, where the bare zeroes are estimated."""
    body = _answer("openai", "word " * 400, _NOTHING["openai"])
    row = await charged(settings, [*JSON, (b"x-budget-cost", b"0")], [body])
    assert (row.cost_nanos, row.cost_source, row.estimated) == (0, "header", False)


async def test_text_after_the_usage_that_it_already_counts_leaves_the_usage_as_reported(
    settings: BudgetSettings,
) -> None:
    """Text streamed after the last usage that the usage's count already covers (8 characters
    in all, 2 tokens at 4 a token, 2 reported) leaves the usage as the provider reported it:
    measured, not an estimate (only text beyond the count is estimated)."""
    chunks = [chunk("abcd", {"prompt_tokens": 10, "completion_tokens": 2}), chunk("efgh")]
    chunks.append(b"data: [DONE]\n\n")
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.output_tokens, row.estimated, row.cost_nanos) == (2, False, cost(10, 2))


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"error": {"message": "overloaded", "type": "overloaded_error"}}, 0),
        ({"error": {"message": "partial"}, "choices": [{"message": {"content": "x" * 400}}]}, 100),
    ],
    ids=["error-only", "error-beside-output"],
)
async def test_an_error_answered_with_status_200_and_no_output_costs_nothing(
    settings: BudgetSettings, answer: dict[str, Any], expected: int
) -> None:
    """A JSON `error` object answered with status 200 and no usage: an error and nothing else
    costs nothing, as an error status does (SPEC §7); one beside output is charged that output
    (400 characters, 100 tokens)."""
    row = await charged(settings, JSON, [json.dumps(answer).encode()])
    charge = cost(row.input_tokens, row.output_tokens) if expected else 0
    assert (row.output_tokens, row.cost_nanos) == (expected, charge)


@pytest.mark.parametrize(
    ("status", "answer", "note"),
    [
        (200, {"error": {"message": "overloaded"}}, "an error answered with status 200, no output"),
        (300, {"message": "choose one"}, None),
        (404, {"error": {"message": "no such model"}}, None),
    ],
)
async def test_an_answer_that_costs_nothing_for_its_status_or_its_error_says_which(
    settings: BudgetSettings, status: int, answer: dict[str, Any], note: str | None
) -> None:
    """Without usage, a redirect (from 300 on) or an error status costs nothing, as its status
    says (SPEC §7); an error answered with status 200 costs nothing too, and its record says
    why, since its status does not. The note and the 300 boundary were no test's (a mutation
    run's survivors: a 300 charged an estimate, the note on every such answer or none)."""
    app = BudgetMiddleware(
        answering(status, JSON, [json.dumps(answer).encode()]), settings=settings
    )
    body = {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://t"
        ) as http:
            got = await http.post("/v1/chat/completions", json=body)
        await app.engine.flush()
        rows = rows_of(app.engine)
    print(status, [(r.status, r.cost_nanos, r.cost_source, r.note) for r in rows])
    assert got.status_code == status and got.json() == answer
    assert [(r.status, r.cost_nanos, r.cost_source, r.note) for r in rows] == [
        (status, 0, "none", note)
    ]


async def test_a_plain_text_answer_to_a_request_for_no_stream_is_no_stream(
    settings: BudgetSettings,
) -> None:
    """An answer labelled `text/plain` to a request that asked for no stream is what it says:
    its record is not `streamed` (SPEC §7: streamed or not). A mutation run's survivor: read as
    a stream until its first bytes, as a stream asked for is, it was recorded streamed."""
    row = await charged(settings, [(b"content-type", b"text/plain")], [b"plain words"])
    assert (row.streamed, row.estimated) == (False, True)


async def test_an_answer_without_usage_or_output_is_charged_no_output(
    settings: BudgetSettings,
) -> None:
    """A JSON answer that says nothing, no usage and no output (`{"choices": []}`): estimated,
    its prompt and 0 output tokens, noted as without usage. A mutation run's survivor: charged
    its most output (`max_tokens`, 100) as an answer that could not be read is."""
    row = await charged(settings, JSON, [b'{"choices": []}'])
    assert (row.output_tokens, row.estimated, row.note) == (0, True, "no usage in the response")
    assert row.cost_nanos == cost(row.input_tokens, 0)


async def test_an_answer_without_usage_is_charged_a_prompt_of_a_third_of_its_body(
    settings: BudgetSettings,
) -> None:
    """README ('a budget'): the prompt's estimate is a third of its body's bytes (rounded up
    past it: 600 bytes, 201 tokens), what an answer without usage is charged as its input."""
    request: dict[str, Any] = {"model": "openai/gpt-4o", "max_tokens": 100, "messages": []}
    request["messages"] = [{"role": "user", "content": ""}]
    padding = 600 - len(json.dumps(request, separators=(",", ":")))
    request["messages"][0]["content"] = "x" * padding
    assert len(json.dumps(request, separators=(",", ":"))) == 600  # as httpx writes it
    answer = {"choices": [{"message": {"content": "y" * 40}}]}
    row = await charged(settings, JSON, [json.dumps(answer).encode()], request)
    assert (row.input_tokens, row.output_tokens) == (201, 10)
    assert (row.cost_nanos, row.estimated) == (cost(201, 10), True)


async def test_a_stream_whose_later_chunk_begins_like_json_is_still_read_as_a_stream(
    settings: BudgetSettings,
) -> None:
    """Only an answer's first bytes say whether a stream is JSON after all: a later chunk that
    begins with `{` (an app or proxy that writes `data: ` apart from the event's JSON) is the
    stream going on. A mutation run's survivor: looked at on every chunk, such a stream was read
    as JSON from there on, its usage lost, an estimate charged."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    last = json.dumps({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    chunks = [chunk("hi"), b"data: ", last.encode() + b"\n\n", b"data: [DONE]\n\n"]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.cost_nanos, row.estimated, row.streamed) == (cost(10, 5), False, True)


async def test_a_json_answer_of_exactly_two_mib_is_read_whole(settings: BudgetSettings) -> None:
    """A JSON answer is kept whole up to 2 MiB (`_JSON_KEPT`), its tail and head only beyond:
    one of exactly 2 MiB, its usage neither in its first 64 KiB nor in its last MiB, is charged
    that usage. A mutation run's survivor: cut at 2 MiB too, it was charged an estimate."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    answer = {"id": "i" * 100_000, "usage": usage, "choices": [{"message": {"content": ""}}]}
    short = 2 * 1024 * 1024 - len(json.dumps(answer).encode())
    answer["choices"][0]["message"]["content"] = "z" * short
    body = json.dumps(answer).encode()
    assert len(body) == 2 * 1024 * 1024
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    row = await charged(settings, JSON, chunks)
    assert (row.cost_nanos, row.estimated) == (cost(10, 5), False)


async def test_a_stream_served_for_a_truthy_flag_is_charged_the_usage_it_streamed(
    settings: BudgetSettings,
) -> None:
    """A request whose `stream` is `"no"` is no stream to the middleware, but an app that streams
    whenever the flag is truthy answers one (as `text/plain`): read as an event stream after
    all, its usage chunk is what it is charged. A mutation run's survivor: read so, it was
    charged an estimate of its text and prompt instead of the usage it reported."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    request = {"model": "openai/gpt-4o", "stream": "no", "max_tokens": 100, "messages": []}
    chunks = [chunk("hi"), chunk(None, usage), b"data: [DONE]\n\n"]
    row = await charged(settings, [(b"content-type", b"text/plain")], chunks, request)
    assert (row.cost_nanos, row.estimated, row.streamed) == (cost(10, 5), False, True)


@pytest.mark.parametrize("before", ["", "some words"], ids=["error-only", "after-output"])
async def test_a_stream_that_ends_in_an_error_costs_nothing_only_before_any_output(
    settings: BudgetSettings, before: str
) -> None:
    """An error event with no output before it (an OpenAI-style gateway's `data: {"error":
    ...}`, status 200) costs nothing, noted so; after output, with no usage, that output is
    charged, estimated. Both upstream errors. A mutation run's survivors: the streamed error
    alone was charged its prompt, or the output before one went free."""
    error = event({"error": {"message": "overloaded", "type": "overloaded_error"}})
    chunks = [chunk(before), error] if before else [error]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.outcome, row.streamed) == ("upstream_error", True)
    if before:
        assert row.output_tokens == (len(before) + 3) // 4 and row.estimated
        assert row.cost_nanos == cost(row.input_tokens, row.output_tokens) > 0
    else:
        assert (row.cost_nanos, row.cost_source) == (0, "none")
        assert row.note == "an error answered with status 200, no output"


async def test_a_stream_cut_after_the_cost_it_reported_is_charged_that_cost_alone(
    settings: BudgetSettings,
) -> None:
    """A stream that reported its cost (`usage.cost`, as OpenRouter's do) with all its tokens on
    a chunk with output, then broke off before its end: charged that cost, nothing priced
    beside it (its counts did not grow). A mutation run's survivors: a token in or out beyond
    the reported ones was priced on top (1,000 or 10,000 nano-dollars)."""
    usage = {"prompt_tokens": 10, "completion_tokens": 50, "cost": 0.01}
    choices = [{"index": 0, "delta": {"content": "hi"}}]  # usage on a chunk with output: no end
    last = event({"object": "chat.completion.chunk", "choices": choices, "usage": usage})
    row = await charged(settings, SSE, [chunk("hi"), last], STREAM_REQUEST)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (10, 50, True)
    assert (row.cost_nanos, row.cost_source) == (10_000_000, "usage")


@pytest.mark.parametrize(
    ("model", "asked"),
    [
        ("openai/gpt-4o", {"max_tokens": 100, "n": 2}),
        ("openai/gpt-4o", {}),
        ("openai/gpt-4o", {"budget": True}),
        ("openai/no-such-model-here", {"max_tokens": 100}),
    ],
    ids=["two-choices", "no-max-tokens", "reserved", "unpriced"],
)
async def test_a_charge_that_cannot_be_worked_out_is_charged_its_estimate(
    settings: BudgetSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    model: str,
    asked: dict[str, Any],
) -> None:
    """Should working out a charge fail (a bug, whatever the answer held), the reservation is
    charged, or without one (no budget) its prompt and most output, each choice's (none
    without `max_tokens`); an unpriced model's, nothing: its prompt alone recorded, estimated,
    the failure logged and noted. A mutation run's survivors: no test ran this but an image
    request's, which a reservation of any figure passed."""
    from budget_middleware.engine.exchange import Exchange

    def broken(self: Exchange, outcome: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Exchange, "_work_out", broken)
    app = BudgetMiddleware(answering(200, JSON, [b'{"choices": []}']), settings=settings)
    engine = app.engine
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    body |= {k: v for k, v in asked.items() if k != "budget"}
    async with running(app):
        headers = {}
        if asked.get("budget"):
            key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
            headers["authorization"] = f"Bearer {key.value}"
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.post("/v1/chat/completions", json=body, headers=headers)
        await engine.flush()
        (row,) = rows_of(engine)
    print(f"charge failed: {row.cost_nanos} charged ({row.input_tokens} in), {row.note}")
    assert answer.status_code == 200
    assert (row.output_tokens, row.cached_tokens, row.estimated) == (0, 0, True)
    assert (row.cost_source, row.note) == ("estimate", "charge failed: RuntimeError")
    assert "could not work out a charge" in caplog.text
    prompt = row.input_tokens
    assert prompt > 0
    if model.endswith("no-such-model-here"):
        assert row.cost_nanos == 0
    elif asked.get("budget"):  # the reservation: its prompt and the model's most output
        assert row.cost_nanos > cost(prompt, 0)
    else:
        assert row.cost_nanos == cost(prompt, asked.get("max_tokens", 0) * asked.get("n", 1))


async def test_a_disconnect_heard_once_the_answer_has_ended_is_no_client_leaving(
    settings: BudgetSettings,
) -> None:
    """Starlette's `StreamingResponse` listens for `http.disconnect` while it streams, and a
    server answers it once the answer has gone (uvicorn's `receive`, whatever the client does):
    heard as the last chunk goes, before it is settled (a server whose `send` yields), it is
    no client leaving; the answer completed. A mutation run's survivors: recorded as
    `client_disconnected`."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    body = json.dumps({"choices": [], "usage": usage}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()  # the request's body
        listener = asyncio.create_task(receive())  # `listen_for_disconnect`
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": body})
        await listener

    middleware = BudgetMiddleware(app, settings=settings)
    ended = asyncio.Event()
    request = json.dumps({"model": "openai/gpt-4o", "messages": [], "max_tokens": 100})
    incoming = [{"type": "http.request", "body": request.encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await ended.wait()  # as uvicorn's: a disconnect once the answer has gone
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            ended.set()
            for _ in range(3):  # a server's send that yields (hypercorn's, a paused write)
                await asyncio.sleep(0)

    async with running(middleware):
        await middleware(post_scope("/v1/chat/completions"), receive, send)
        await middleware.engine.flush()
        (row,) = rows_of(middleware.engine)
    print(f"a disconnect after the answer: {row.outcome}, charged {row.cost_nanos}")
    assert (row.outcome, row.cost_nanos) == ("completed", cost(10, 5))


async def test_a_start_the_server_refused_is_no_answer_the_next_start_is(
    settings: BudgetSettings,
) -> None:
    """A start the server refuses (`OSError`) was never seen: the start the app sends next (an
    error handler's 503) is the answer's, read and recorded. A mutation run's survivors: taken
    for a second start, passed on unread, the refused one's status 200 was recorded."""
    request = json.dumps({"model": "openai/gpt-4o", "messages": [], "max_tokens": 100})
    incoming = [{"type": "http.request", "body": request.encode(), "more_body": False}]
    starts: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
        except OSError:
            await send({"type": "http.response.start", "status": 503, "headers": JSON})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "busy"}}'})

    async def receive() -> dict[str, Any]:
        return incoming.pop()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            starts.append(message["status"])
            if len(starts) == 1:
                raise ConnectionResetError("refused")

    middleware = BudgetMiddleware(app, settings=settings)
    async with running(middleware):
        await middleware(post_scope("/v1/chat/completions"), receive, send)
        await middleware.engine.flush()
        (row,) = rows_of(middleware.engine)
    print(f"starts {starts}: recorded status {row.status}, charged {row.cost_nanos}")
    assert starts == [200, 503]
    assert (row.status, row.cost_nanos) == (503, 0)


async def test_a_gzip_stream_sent_in_one_chunk_is_read_across_its_slices(
    settings: BudgetSettings,
) -> None:
    """A compressed answer is decoded 4 KiB at a time; a stream sent whole in its last chunk is
    one stream across those slices, its end told after the last. A mutation run's survivor:
    each slice read as the stream's end, the events across them were lost, the usage too."""
    import random

    noise = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz "
    texts = ["".join(noise.choice(letters) for _ in range(400)) for _ in range(40)]
    usage = {"prompt_tokens": 10, "completion_tokens": 5000}
    plain = b"".join(chunk(t) for t in texts) + chunk(None, usage) + b"data: [DONE]\n\n"
    packed = gzip.compress(plain)
    assert len(packed) > 2 * 4096
    row = await charged(settings, [*SSE, (b"content-encoding", b"gzip")], [packed], STREAM_REQUEST)
    assert (row.cost_nanos, row.estimated) == (cost(10, 5000), False)


# -- mutation survivors of engine/exchange.py (2026-12-07): the bounds the record keeps ---------


async def test_a_usage_of_exactly_2_31_minus_1_tokens_is_counted_as_it_is(
    settings: BudgetSettings,
) -> None:
    """The store's token columns are 32-bit: a count over 2**31 - 1 is cut to it, and noted.
    A count of exactly 2**31 - 1 fits: counted as it is, with no note. Mutation survivors: at
    `>=` in place of `>` (output, cached) such an answer was noted as cut."""
    most = 2**31 - 1
    usage = {
        "prompt_tokens": most,
        "completion_tokens": most,
        "prompt_tokens_details": {"cached_tokens": most},
    }
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
    row = await charged(settings, JSON, [body])
    counts = (row.input_tokens, row.output_tokens, row.cached_tokens)
    print("counted", counts)
    assert counts == (most, most, most)
    assert (row.note, row.estimated) == (None, False)


async def test_a_cost_of_exactly_a_million_dollars_is_charged_as_it_is(
    settings: BudgetSettings,
) -> None:
    """One request is charged at most $1,000,000 (10**15 nano-USD), a cost over it cut to it and
    noted. A reported cost of exactly $1,000,000 is charged as it is, with no note. A mutation
    survivor: at `>=` in place of `>`, it was noted as cut."""
    body = b'{"choices": [{"message": {"content": "hi"}}]}'
    row = await charged(settings, [*JSON, (b"x-budget-cost", b"1000000")], [body])
    assert (row.cost_nanos, row.cost_source, row.note) == (10**15, "header", None)


async def test_a_cost_over_a_million_dollars_by_its_tokens_is_cut_to_it(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A cost worked out from the tokens (not only a reported one, which `charge_nanos` caps)
    is cut to $1,000,000 too, and noted: 2,000 output tokens at $1,000 each are $2,000,000."""
    path = tmp_path / "prices.json"
    prices = {"input_per_mtok": 1, "output_per_mtok": 1_000_000_000}
    path.write_text(json.dumps({"models": {"openai/gpt-4o": prices}}))
    usage = {"prompt_tokens": 10, "completion_tokens": 2000}
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
    row = await charged(make_settings(pricing_file=path), JSON, [body])
    assert row.cost_nanos == 10**15
    assert row.note == "cost over $1,000,000, charged $1,000,000"


async def test_a_record_s_duration_is_the_time_from_admission_to_settlement(
    settings: BudgetSettings,
) -> None:
    """`duration_ms` is the milliseconds from admission to settlement: at least the time the app
    took to answer, at most the time around the whole call. Mutation survivors: the duration
    divided by 1000 in place of multiplied, or the start added in place of taken away."""
    import time

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        body = b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
        await send({"type": "http.response.body", "body": body})

    middleware = BudgetMiddleware(app, settings=settings)
    body = {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    async with running(middleware):
        transport = httpx.ASGITransport(middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            before = time.perf_counter()
            answer = await http.post("/v1/chat/completions", json=body)
            around_ms = (time.perf_counter() - before) * 1000
        assert answer.status_code == 200
        await middleware.engine.flush()
        (row,) = rows_of(middleware.engine)
    print(f"duration {row.duration_ms:.1f} ms, {around_ms:.1f} ms around the call")
    assert 40 <= row.duration_ms <= around_ms  # (a loop may wake a millisecond early)


async def test_a_request_settled_through_redis_counts_its_input_and_output_tokens(
    make_settings: Settings, tmp_path: Path
) -> None:
    """Admitted by Redis, a request's tokens go on its key's token window at settlement: its
    input and its output, 10 + 5. A mutation survivor: the output taken away (10 - 5), the
    window counted 5 tokens and the key's tokens-per-hour limit lifted by twice its output."""
    from conftest import REDIS_URL, need_redis
    from service_support import delete_prefix, unique_prefix, use_prefix

    need_redis()
    path = tmp_path / "prices.json"
    prices = {"input_per_mtok": 1, "output_per_mtok": 10}
    path.write_text(json.dumps({"models": {"openai/gpt-4o": prices}}))
    settings = make_settings(pricing_file=path, redis_url=REDIS_URL)
    body = b'{"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}'
    app = BudgetMiddleware(answering(200, JSON, [body]), settings=settings)
    prefix = unique_prefix()
    use_prefix(app.engine, prefix)
    try:
        async with running(app):
            key = app.engine.manager.create_virtual_key(
                name="k", rate_limit={"token_max_limit": 1000, "token_reset_duration": "1h"}
            )
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                answer = await http.post(
                    "/v1/chat/completions",
                    json={"model": "openai/gpt-4o", "messages": [], "max_tokens": 100},
                    headers={"authorization": f"Bearer {key.value}"},
                )
            assert answer.status_code == 200
            window = next(iter(app.engine.registry.windows["token"].values()))
            counted = window.value
            await app.engine.flush()
            (row,) = rows_of(app.engine)
    finally:
        delete_prefix(REDIS_URL, prefix)
    print(
        f"tokens counted on the key's window: {counted} (record {row.input_tokens} in, "
        f"{row.output_tokens} out, {row.cost_nanos} nano-USD)"
    )
    assert (row.input_tokens, row.output_tokens, row.cost_nanos) == (10, 5, cost(10, 5))
    assert counted == 15


async def _reserved_as_answered(
    settings: BudgetSettings, steps: list[tuple[dict[str, Any], Any, bytes]]
) -> tuple[list[int], list[tuple[int, bool]]]:
    """Each step's request (`steps`: its JSON, the answer's headers and body) sent in turn with
    one key of a $10 budget: what the budget had reserved as each was answered, and each
    one's charge (nano-USD, estimated)."""
    reserved: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()
        budget = next(iter(middleware.engine.registry.windows["budget"].values()))
        reserved.append(budget.reserved)
        _, headers, body = steps[len(reserved) - 1]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    middleware = BudgetMiddleware(app, settings=settings)
    async with running(middleware):
        key = middleware.engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
        transport = httpx.ASGITransport(middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for request, _, _ in steps:
                answer = await http.post(
                    "/v1/chat/completions",
                    json=request,
                    headers={"authorization": f"Bearer {key.value}"},
                )
                assert answer.status_code == 200
        await middleware.engine.flush()
        rows = rows_of(middleware.engine)
    charges = [(row.cost_nanos, row.estimated) for row in rows]
    print("reserved as each was answered:", reserved, "; charged:", charges)
    return reserved, charges


async def test_a_fee_is_learnt_from_a_measured_answer_and_forgotten_only_by_one(
    settings: BudgetSettings,
) -> None:
    """An answer that reports a cost over its tokens' price (a fee) teaches the next requests to
    its model to reserve it beside their tokens; a measured answer without one forgets it, an
    estimated one (no usage: nothing measured) does not. The fee here is 1 nano-USD: the third
    request reserves 1 more than the first and the fourth, the second too. Mutation survivors:
    the fee of 1 not learnt (`> 1`), an estimated answer forgetting it, a measured one not."""
    usage = b'"usage": {"prompt_tokens": 10, "completion_tokens": 5}'
    answers = [
        (  # measured, reported 60,001: 1 over its tokens' 60,000
            [*JSON, (b"x-budget-cost", b"0.000060001")],
            b'{"choices": [{"message": {"content": "hi"}}], ' + usage + b"}",
        ),
        (JSON, b'{"choices": [{"message": {"content": "hi"}}]}'),  # estimated: no usage
        (JSON, b'{"choices": [], ' + usage + b"}"),  # measured, no fee: forgets it
        (JSON, b'{"choices": [], ' + usage + b"}"),
    ]
    plain = {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    reserved, charges = await _reserved_as_answered(
        settings, [(plain, headers, body) for headers, body in answers]
    )
    assert charges[0] == (60_001, False) and charges[2:] == [(cost(10, 5), False)] * 2
    first = reserved[0]
    assert reserved == [first, first + 1, first + 1, first]


async def test_what_a_request_with_server_tools_reserves_is_learnt_from_measured_ones(
    settings: BudgetSettings,
) -> None:
    """A request with tools its provider runs (web search) reserves at least the most such a
    request to its model has been charged, learnt from measured answers only: not from one
    without tools, nor one without usage (an estimate). Before any is measured it reserves the
    most one request is charged. Mutation survivors: learnt from every answer, from estimated
    ones, from none, or from errors only."""
    usage = b'"usage": {"prompt_tokens": 10, "completion_tokens": %d}'
    plain = {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    tools = {**plain, "tools": [{"type": "web_search_preview"}]}
    steps = [  # (request, answer)
        (plain, b'{"choices": [], ' + usage % 1000 + b"}"),  # no tools: teaches nothing
        (tools, b'{"choices": [{"message": {"content": "hi"}}]}'),  # estimated: nothing
        (tools, b'{"choices": [], ' + usage % 500 + b"}"),  # measured: 5,010,000
        (tools, b'{"choices": [], ' + usage % 5 + b"}"),
    ]
    reserved, charges = await _reserved_as_answered(
        settings, [(request, JSON, body) for request, body in steps]
    )
    assert charges[2] == (cost(10, 500), False)
    assert reserved[1] == reserved[2] > cost(10, 1000)  # nothing learnt yet: the most
    assert reserved[3] == cost(10, 500)  # the measured one's charge


async def test_what_a_medium_sent_by_reference_takes_is_learnt_from_measured_answers(
    settings: BudgetSettings,
) -> None:
    """A request sending an image by URL reserves, for it, what one has been measured to take
    for its model: learnt from an answer that reports its input, not from one without usage
    (estimated: its input is our own guess). Before any is measured, it reserves the most one
    request is charged. Mutation survivors: learnt from estimated answers, or never."""
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    request = {
        "model": "openai/gpt-4o",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": [image]}],
    }
    answers = [
        b'{"choices": [{"message": {"content": "a cat"}}]}',  # estimated: teaches nothing
        b'{"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 5}}',
        b'{"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 5}}',
    ]
    reserved, charges = await _reserved_as_answered(
        settings, [(request, JSON, body) for body in answers]
    )
    assert charges[1:] == [(cost(1000, 5), False)] * 2
    assert reserved[0] == reserved[1] == 10**15  # nothing measured yet: the most
    # the image measured at (at most) 1,000 input tokens, its 100 output tokens beside them
    assert 1000 * IN_NANOS + 100 * OUT_NANOS <= reserved[2] < 10**10


async def test_text_streamed_past_a_usage_that_reported_its_cost_is_charged_beside_it(
    settings: BudgetSettings,
) -> None:
    """A stream whose usage reports its cost (OpenRouter's `usage.cost`), then streams on: the
    text (402 characters in all, 101 tokens where 5 were reported) is charged at its tokens'
    price beside the reported cost, which is kept. A mutation survivor: the reported cost
    alone was charged, the 96 tokens past it free."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "cost": 0.001}
    chunks = [chunk("hi"), chunk(None, usage), chunk("x" * 400), b"data: [DONE]\n\n"]
    row = await charged(settings, SSE, chunks, STREAM_REQUEST)
    assert (row.input_tokens, row.output_tokens) == (10, 101)
    assert (row.cost_nanos, row.estimated) == (1_000_000 + cost(0, 96), True)


async def test_a_request_whose_client_left_before_any_answer_is_charged_its_most_output(
    settings: BudgetSettings,
) -> None:
    """The client leaves before the app answers, and the app then ends with no answer (Django's
    ASGI handler cancels the view): the call was made, its answer never seen, so it is charged
    the most it could have cost (its prompt and its 100 `max_tokens`), noted so. A mutation
    survivor: no test reached the note, and without it such a request was charged its prompt
    alone ("no usage in the response")."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await receive()  # the body
        message = await receive()  # the client leaves
        assert message["type"] == "http.disconnect"

    request = {"model": "openai/gpt-4o", "messages": [], "max_tokens": 100}
    receive = BodyThenGone(json.dumps(request).encode())
    receive.gone.set()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = BudgetMiddleware(app, settings=settings)
    async with running(middleware):
        await middleware(post_scope("/v1/chat/completions"), receive, send)
        await middleware.engine.flush()
        (row,) = rows_of(middleware.engine)
    print(f"charged {row.cost_nanos} ({row.input_tokens} in, {row.output_tokens} out): {row.note}")
    assert sent == []
    assert (row.outcome, row.output_tokens, row.estimated) == ("client_disconnected", 100, True)
    assert row.cost_nanos == cost(row.input_tokens, 100)
    assert row.note == "the client left before the app answered: charged its most output"
