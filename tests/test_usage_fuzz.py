"""Differential fuzz of the usage read (SPEC §7, §13): what a random but valid provider answer
charges, against a reference computed here, apart from the package, to the nano-dollar.

Answers of OpenAI chat (JSON, SSE with the usage-only chunk), the Responses API (JSON, SSE
ending in `response.completed` or `response.incomplete`) and Anthropic Messages (JSON, SSE with
`message_start` and `message_delta`: cache reads and writes, the 5-minute/1-hour split, web
searches), each serialised as a server may: random chunking (one byte to whole), LF, CRLF or CR
(sometimes mixed), `data:` with or without its space, comments, `id:` and `retry:` fields, JSON
over several `data:` lines, a BOM, no blank line at the end, gzip (also multi-member and
spelled oddly), zlib and raw deflate. The pricing file's rates are odd and all different, so a
token counted as the wrong kind (a cache read as input, a 1-hour write as a 5-minute one, audio
as text) changes the charge. The reference is integer femto-dollars a token from the rates'
decimal text, rounded half up to nano-dollars once; the middleware's record (cost, input,
output and cached tokens, not estimated) must equal it exactly, inbound (BudgetMiddleware on a
FastAPI app) and outbound (BudgetTransport on an httpx MockTransport), and `StreamMeter`'s
usage, priced, on the decoded stream, with the usage chunk it drops removed byte for byte.

Seeded: the same cases each run. A mismatch names the smallest failing case.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlmodel import select

from budget_middleware import BudgetMiddleware, BudgetSettings, BudgetTransport, get_engine
from budget_middleware.core.pricing import ModelPrice, cost_nanos
from budget_middleware.core.sse import StreamMeter
from budget_middleware.store.tables import UsageRecordRow
from support import engine_of, running

Settings = Callable[..., BudgetSettings]
SHAPES = ["chat", "responses", "anthropic"]
SEED = 12
INBOUND_CASES = 150  # a shape: each case is a request through the middleware and a flush
OUTBOUND_CASES = 150
METER_CASES = 1000  # a shape: no I/O

# USD per million tokens (web searches: a thousand). Odd and all different.
RATES = {
    "input_per_mtok": "1.1",
    "output_per_mtok": "7.3",
    "cached_input_per_mtok": "0.37",
    "cache_write_per_mtok": "2.9",
    "cache_write_1h_per_mtok": "5.3",
    "input_audio_per_mtok": "41.3",
    "output_audio_per_mtok": "83.1",
    "web_search_per_k": "10",
}
# Femto-dollars a token ($1 a million tokens = 10**9 femto-dollars a token); a search's.
FEMTO = {name: int(Decimal(rate) * 10**9) for name, rate in RATES.items()}
FEMTO["web_search"] = int(Decimal(RATES["web_search_per_k"]) * 10**12)
OPENAI_MODEL = "gpt-fuzz-1"
ANTHROPIC_MODEL = "claude-fuzz-1"
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "anthropic": "/v1/messages"}
HOSTS = {
    "chat": "https://api.openai.com",
    "responses": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
}
WORDS = ["Hello", " world", "!", " 你好", " émoji 🎉", "\n", ' a\\"q"', " data: x", "\r\n", " :x"]


def nanos(femto: int) -> int:
    """Femto-dollars to whole nano-dollars, rounded half up."""
    return (femto + 500_000) // 1_000_000


@pytest.fixture
def fuzz_prices(tmp_path: Path) -> Path:
    path = tmp_path / "fuzz_prices.json"
    price = {name: float(rate) for name, rate in RATES.items()}
    models = [
        OPENAI_MODEL,
        ANTHROPIC_MODEL,
        f"openai/{OPENAI_MODEL}",
        f"anthropic/{ANTHROPIC_MODEL}",
    ]
    path.write_text(json.dumps({"models": dict.fromkeys(models, price)}))
    return path


# -- answers --------------------------------------------------------------------------------------

Event = tuple[str | None, str]  # (event name, data)
Expected = tuple[int, int, int, int]  # (cost nanos, input, output, cached tokens)


@dataclass
class Answer:
    shape: str
    events: list[Event]  # the stream's events
    body: dict[str, Any]  # the same answer as JSON
    expected: Expected
    usage_event: int | None = None  # OpenAI chat's usage-only chunk (the meter may drop it)


def _texts(r: random.Random) -> list[str]:
    return [r.choice(WORDS) for _ in range(r.randint(0, 6))]


def chat_answer(r: random.Random) -> Answer:
    prompt, output = r.randint(0, 5000), r.randint(0, 3000)
    cached = r.randint(0, prompt) if r.random() < 0.5 else 0
    reasoning = r.randint(0, output)
    audio_in = audio_out = 0
    if r.random() < 0.3:
        cached, reasoning = 0, 0
        audio_in, audio_out = r.randint(0, prompt), r.randint(0, output)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": audio_in},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": audio_out,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    base: dict[str, Any] = {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": OPENAI_MODEL,
        "system_fingerprint": "fp_x",
    }
    if r.random() < 0.5:
        base["service_tier"] = "default"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], "usage": None}

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    chunks += [chunk({"content": text}) for text in _texts(r)]
    chunks += [chunk({}, "stop"), {**base, "choices": [], "usage": usage}]
    events: list[Event] = [(None, json.dumps(c)) for c in chunks] + [(None, "[DONE]")]
    message = {"role": "assistant", "content": "Hi", "refusal": None, "annotations": []}
    body = {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    cost = nanos(
        (prompt - cached - audio_in) * FEMTO["input_per_mtok"]
        + cached * FEMTO["cached_input_per_mtok"]
        + audio_in * FEMTO["input_audio_per_mtok"]
        + (output - audio_out) * FEMTO["output_per_mtok"]
        + audio_out * FEMTO["output_audio_per_mtok"]
    )
    return Answer("chat", events, body, (cost, prompt, output, cached), len(events) - 2)


def responses_answer(r: random.Random) -> Answer:
    prompt, output = r.randint(0, 5000), r.randint(0, 3000)
    cached = r.randint(0, prompt) if r.random() < 0.5 else 0
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": r.randint(0, output)},
        "total_tokens": prompt + output,
    }
    response: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "status": "in_progress",
        "model": OPENAI_MODEL,
        "output": [],
        "usage": None,
    }
    events: list[Event] = []

    def add(kind: str, **fields: Any) -> None:
        events.append((kind, json.dumps({"type": kind, "sequence_number": len(events), **fields})))

    add("response.created", response=response)
    add("response.in_progress", response=response)
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    add("response.content_part.added", **where, part={"type": "output_text", "text": ""})
    text = ""
    for delta in _texts(r):
        text += delta
        add("response.output_text.delta", **where, delta=delta, logprobs=[])
    add("response.output_text.done", **where, text=text, logprobs=[])
    content = [{"type": "output_text", "annotations": [], "text": text}]
    item = {"id": "msg_1", "type": "message", "status": "completed", "content": content}
    add("response.output_item.done", output_index=0, item=item)
    status = r.choice(["completed", "completed", "incomplete"])
    done = {**response, "status": status, "output": [item], "usage": usage}
    if status == "incomplete":
        done["incomplete_details"] = {"reason": "max_output_tokens"}
    add("response." + status, response=done)
    if r.random() < 0.2:  # the event names are optional: `type` says it too
        events = [(None, data) for _, data in events]
    cost = nanos(
        (prompt - cached) * FEMTO["input_per_mtok"]
        + cached * FEMTO["cached_input_per_mtok"]
        + output * FEMTO["output_per_mtok"]
    )
    return Answer("responses", events, done, (cost, prompt, output, cached))


def anthropic_answer(r: random.Random) -> Answer:
    fresh, output = r.randint(0, 5000), r.randint(1, 3000)
    read = r.randint(0, 5000) if r.random() < 0.5 else 0
    write = r.randint(0, 5000) if r.random() < 0.5 else 0
    hour = r.randint(0, write) if r.random() < 0.5 else 0
    searches = r.choice([0, 0, 1, 3])
    start_usage = {
        "input_tokens": fresh,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write - hour,
            "ephemeral_1h_input_tokens": hour,
        },
        "output_tokens": r.randint(1, min(output, 5)),
        "service_tier": "standard",
    }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    block = {"type": "text", "text": ""}
    raw: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": block},
    ]
    if r.random() < 0.5:
        raw.append({"type": "ping"})
    for text in _texts(r):
        delta = {"type": "text_delta", "text": text}
        raw.append({"type": "content_block_delta", "index": 0, "delta": delta})
    raw.append({"type": "content_block_stop", "index": 0})
    tools = {"server_tool_use": {"web_search_requests": searches}} if searches else {}
    final: dict[str, Any] = {"output_tokens": output, **tools}
    if r.random() < 0.5:  # the newer API repeats the input and cache counts
        final.update(
            input_tokens=fresh, cache_creation_input_tokens=write, cache_read_input_tokens=read
        )
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    raw += [{"type": "message_delta", "delta": stop, "usage": final}, {"type": "message_stop"}]
    named = r.random() < 0.85
    events: list[Event] = [(e["type"] if named else None, json.dumps(e)) for e in raw]
    body = {
        **message,
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {**start_usage, "output_tokens": output, **tools},
    }
    cost = nanos(
        fresh * FEMTO["input_per_mtok"]
        + read * FEMTO["cached_input_per_mtok"]
        + (write - hour) * FEMTO["cache_write_per_mtok"]
        + hour * FEMTO["cache_write_1h_per_mtok"]
        + output * FEMTO["output_per_mtok"]
        + searches * FEMTO["web_search"]
    )
    return Answer("anthropic", events, body, (cost, fresh + read + write, output, read))


ANSWERS = {"chat": chat_answer, "responses": responses_answer, "anthropic": anthropic_answer}


# -- the wire -------------------------------------------------------------------------------------


@dataclass
class Wire:
    """An answer as it goes over the wire, and how it was made so (for the failure message)."""

    raw: bytes  # decoded
    parts: list[tuple[bytes, bool]]  # raw in pieces: (bytes, is the usage-only chunk's event)
    eol: str
    space: bool
    bom: bool
    encoding: str | None = None  # as in `content-encoding`
    how: str = "identity"  # gzip, multi-member gzip, zlib or raw deflate
    chunks: list[bytes] = field(default_factory=list)
    chunking: str = ""


def sse(answer: Answer, r: random.Random) -> Wire:
    mixed = r.random() < 0.2
    eol = r.choice(["\n", "\r\n", "\r"])
    space = r.random() < 0.7
    parts: list[tuple[str, bool]] = []
    if r.random() < 0.2:
        parts.append((": stream start" + eol + eol, False))
    for i, (name, data) in enumerate(answer.events):
        if mixed:
            eol = r.choice(["\n", "\r\n", "\r"])
        lines = []
        if r.random() < 0.1:
            lines.append(": keep-alive")
        if r.random() < 0.15:
            lines.append(f"id: {i}")
        if r.random() < 0.1:
            lines.append("retry: 3000")
        if name is not None:
            lines.append(("event: " if space else "event:") + name)
        multiline = data.startswith("{") and r.random() < 0.2
        for line in json.dumps(json.loads(data), indent=1).split("\n") if multiline else [data]:
            if r.random() < 0.03:
                lines.append(": inner comment")
            lines.append(("data: " if space else "data:") + line)
        parts.append((eol.join(lines) + eol + eol, i == answer.usage_event))
        if r.random() < 0.08:
            parts.append((": keep-alive" + eol + eol, False))
    last, usage = parts[-1]
    if r.random() < 0.15:  # no blank line after the last event
        parts[-1] = (last[: -len(eol)] if r.random() < 0.5 else last[: -2 * len(eol)], usage)
    bom = r.random() < 0.1
    pieces = [(text.encode(), usage) for text, usage in parts]
    if bom:
        pieces[0] = (b"\xef\xbb\xbf" + pieces[0][0], pieces[0][1])
    raw = b"".join(piece for piece, _ in pieces)
    return Wire(raw, pieces, "mixed" if mixed else repr(eol), space, bom)


def encode(wire: Wire, r: random.Random) -> bytes:
    """The body on the wire; sets `wire.encoding` and `wire.how`."""
    how = r.choice([None, None, None, "gzip", "gzip", "multi-member gzip", "zlib", "raw deflate"])
    body = wire.raw
    if how is None:
        return body
    wire.how = how
    if how == "zlib":
        wire.encoding = "deflate"
        return zlib.compress(body)
    if how == "raw deflate":
        wire.encoding = "deflate"
        packer = zlib.compressobj(wbits=-15)
        return packer.compress(body) + packer.flush()
    wire.encoding = r.choice(["gzip", "gzip", "GZIP", "x-gzip", "gzip, identity"])
    if how == "multi-member gzip":
        cut = r.randint(0, len(body))
        return gzip.compress(body[:cut]) + gzip.compress(body[cut:])
    return gzip.compress(body)


def chunked(wire: Wire, data: bytes, r: random.Random) -> None:
    """Cut `data` into the chunks a server sends: whole, a byte each, or random sizes."""
    mode = r.random()
    if mode < 0.15:
        wire.chunks, wire.chunking = [data], "whole"
        return
    if mode < 0.3:
        wire.chunks, wire.chunking = [data[i : i + 1] for i in range(len(data))], "1 byte each"
        return
    largest = r.choice([3, 17, 64, 300, 2000])
    i = 0
    while i < len(data):
        size = r.randint(1, largest)
        wire.chunks.append(data[i : i + size])
        i += size
    wire.chunking = f"random 1..{largest} bytes"


@dataclass
class Case:
    number: int
    answer: Answer
    stream: bool
    wire: Wire
    ask_usage: bool  # a chat stream that asks for `stream_options.include_usage` itself

    def request(self) -> dict[str, Any]:
        shape = self.answer.shape
        model = ANTHROPIC_MODEL if shape == "anthropic" else OPENAI_MODEL
        if shape == "responses":
            body: dict[str, Any] = {"model": model, "input": "hello", "max_output_tokens": 4000}
        else:
            messages = [{"role": "user", "content": "hello"}]
            body = {"model": model, "messages": messages, "max_tokens": 4000}
        if self.stream:
            body["stream"] = True
            if shape == "chat" and self.ask_usage:
                body["stream_options"] = {"include_usage": True}
        return body

    @property
    def content_type(self) -> str:
        return "text/event-stream" if self.stream else "application/json"

    def describe(self) -> str:
        w = self.wire
        kind = (
            f"SSE eol={w.eol} space={w.space} bom={w.bom}" if self.stream else "JSON"
        ) + f", asks usage={self.ask_usage}" * (self.answer.shape == "chat" and self.stream)
        return (
            f"case #{self.number}: {self.answer.shape} {kind}; {len(w.raw)} bytes as {w.how}"
            f" (content-encoding {w.encoding}), in {len(w.chunks)} chunks ({w.chunking});"
            f"\n  body: {w.raw[:400]!r}"
        )


def make_case(shape: str, number: int, r: random.Random, *, encoded: bool = True) -> Case:
    answer = ANSWERS[shape](r)
    stream = r.random() < 0.75
    if stream:
        wire = sse(answer, r)
    else:
        raw = json.dumps(answer.body, indent=r.choice([None, 2])).encode()
        wire = Wire(raw, [(raw, False)], "", False, False)
    chunked(wire, encode(wire, r) if encoded else wire.raw, r)
    return Case(number, answer, stream, wire, r.random() < 0.5)


def cases(shape: str, count: int, seed: int) -> list[Case]:
    r = random.Random(f"{seed}/{shape}")
    return [make_case(shape, n, r) for n in range(count)]


# -- the comparison -------------------------------------------------------------------------------

Charged = tuple[int, int, int, int] | str


def report(where: str, shape: str, checked: list[tuple[Case, Charged]]) -> None:
    """Print the counts; fail naming the smallest mismatching case."""
    bad = [(case, got) for case, got in checked if got != case.answer.expected]
    print(f"{where} {shape}: {len(checked)} cases, {len(bad)} mismatches")
    if bad:
        case, got = min(bad, key=lambda b: (len(b[0].wire.raw), len(b[0].wire.chunks)))
        pytest.fail(
            f"{where}: {len(bad)} of {len(checked)} {shape} answers charged differently; the"
            f" smallest is {case.describe()}\n  expected (cost nanos, input, output, cached)"
            f" {case.answer.expected}, charged {got}",
            pytrace=False,
        )


async def new_records(engine: Any, after: int) -> list[UsageRecordRow]:
    await engine.flush()
    with engine.store.session() as s:
        query = select(UsageRecordRow).where(UsageRecordRow.id > after)  # type: ignore[arg-type]
        return list(s.exec(query.order_by(UsageRecordRow.id)))  # type: ignore[arg-type]


def charged(rows: list[UsageRecordRow]) -> Charged:
    if len(rows) != 1:
        return f"{len(rows)} records"
    row = rows[0]
    if row.estimated:
        return f"an estimate of {row.cost_nanos} ({row.note})"
    return (row.cost_nanos, row.input_tokens, row.output_tokens, row.cached_tokens)


async def _body(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for piece in chunks:
        yield piece


@pytest.mark.parametrize("shape", SHAPES)
async def test_inbound_charges_match_the_reference(
    shape: str, make_settings: Settings, fuzz_prices: Path
) -> None:
    """Answers from the host app's route, through BudgetMiddleware, as a client reads them."""
    current: dict[str, Case] = {}
    app = FastAPI()

    @app.post(PATHS[shape])
    async def answer(request: Request) -> StreamingResponse:
        await request.body()
        case = current["case"]
        headers = {"content-encoding": case.wire.encoding} if case.wire.encoding else {}
        body = _body(case.wire.chunks)
        return StreamingResponse(body, media_type=case.content_type, headers=headers)

    app.add_middleware(BudgetMiddleware, settings=make_settings(pricing_file=fuzz_prices))
    checked: list[tuple[Case, Charged]] = []
    async with running(app):
        engine, last = engine_of(app), 0
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for case in cases(shape, INBOUND_CASES, SEED):
                current["case"] = case
                answered = await http.post(
                    PATHS[shape], json=case.request(), headers={"accept-encoding": "gzip, deflate"}
                )
                assert answered.status_code == 200, case.describe()
                rows = await new_records(engine, last)
                last = rows[-1].id if rows else last
                checked.append((case, charged(rows)))
    report("inbound", shape, checked)


@pytest.mark.parametrize("shape", SHAPES)
async def test_outbound_charges_match_the_reference(
    shape: str, make_settings: Settings, fuzz_prices: Path
) -> None:
    """Answers from a provider, through BudgetTransport, as the app's SDK reads them (raw)."""
    engine = get_engine(make_settings(pricing_file=fuzz_prices, flush_interval_seconds=3600))
    await engine.ensure_started()
    current: dict[str, Case] = {}

    class Chunks(httpx.AsyncByteStream):
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for piece in self.chunks:
                yield piece

    def provider(request: httpx.Request) -> httpx.Response:
        case = current["case"]
        headers = {"content-type": case.content_type}
        if case.wire.encoding:
            headers["content-encoding"] = case.wire.encoding
        return httpx.Response(200, headers=headers, stream=Chunks(case.wire.chunks))

    checked: list[tuple[Case, Charged]] = []
    last = 0
    transport = BudgetTransport(httpx.MockTransport(provider), engine=engine)
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            for case in cases(shape, OUTBOUND_CASES, SEED + 1):
                current["case"] = case
                url = HOSTS[shape] + PATHS[shape]
                async with http.stream("POST", url, json=case.request()) as answered:
                    async for _ in answered.aiter_raw():
                        pass
                rows = await new_records(engine, last)
                last = rows[-1].id if rows else last
                checked.append((case, charged(rows)))
    finally:
        await engine.shutdown()
    report("outbound", shape, checked)


@pytest.mark.parametrize("shape", SHAPES)
def test_stream_meter_reads_the_reference_usage(shape: str) -> None:
    """`StreamMeter` on the decoded stream: its usage, priced, is the reference; it completes;
    and it forwards every byte as it came but the usage-only chunk it was told to drop."""
    price = ModelPrice(**{name: float(rate) for name, rate in RATES.items()})
    r = random.Random(f"{SEED}/meter/{shape}")
    checked: list[tuple[Case, Charged]] = []
    for number in range(METER_CASES):
        answer = ANSWERS[shape](r)
        wire = sse(answer, r)
        if r.random() < 0.5:  # an event a chunk, sometimes two
            for i, (piece, _) in enumerate(wire.parts):
                if i and r.random() < 0.2:
                    wire.chunks[-1] += piece
                else:
                    wire.chunks.append(piece)
            wire.chunking = "an event a chunk"
        else:
            chunked(wire, wire.raw, r)
        drop = answer.usage_event is not None and r.random() < 0.5
        case = Case(number, answer, True, wire, not drop)
        meter = StreamMeter(drop_usage_chunk=drop)
        forwarded = b"".join([*(meter.feed(piece) for piece in wire.chunks), meter.finish()])
        kept = b"".join(piece for piece, usage in wire.parts if not (drop and usage))
        usage = meter.usage
        got: Charged
        if usage is None:
            got = "no usage read"
        elif not meter.completed:
            got = "not completed"
        elif forwarded != kept:
            got = f"forwarded {forwarded[:300]!r}"
        else:
            got = (cost_nanos(price, usage), usage.input_tokens, usage.output_tokens)
            got += (usage.cached_tokens,)
        checked.append((case, got))
    report("meter", shape, checked)
