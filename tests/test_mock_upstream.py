"""The offline mock upstream (examples/mock_upstream.py): shapes, deterministic usage, knobs, and
fidelity to the real OpenAI and Anthropic SDKs, which are pointed at it in-process."""

from __future__ import annotations

import base64
import itertools
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from fastapi import FastAPI
from mock_upstream import (
    DEFAULT_OUTPUT_TOKENS,
    MockUpstreamCut,
    add_mock_routes,
    create_mock_app,
    estimate_tokens,
    mock_router,
    mock_words,
    prompt_tokens,
)
from openai.types.chat import ChatCompletionMessageParam

from support import post_scope

PROMPT = "Say hello to the budget middleware."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
CLAUDE_MESSAGES: list[MessageParam] = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def app() -> FastAPI:
    return create_mock_app()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        yield c


@pytest.fixture(params=["httpx2", "httpx"])
async def oai(app: FastAPI, request: pytest.FixtureRequest) -> AsyncIterator[openai.AsyncOpenAI]:
    # openai 3.x is built on httpx2 and still accepts a legacy httpx client: both are tried.
    http: Any = (
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app))
        if request.param == "httpx2"
        else httpx.AsyncClient(transport=httpx.ASGITransport(app))
    )
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="x", http_client=http, max_retries=0
    ) as sdk:
        yield sdk


@pytest.fixture
async def claude(app: FastAPI) -> AsyncIterator[anthropic.AsyncAnthropic]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app))
    async with anthropic.AsyncAnthropic(
        base_url="http://test", api_key="x", http_client=http, max_retries=0
    ) as sdk:
        yield sdk


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event in a body."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **extra}


# The deterministic rule


def test_token_rule() -> None:
    # '[{"role":"user","content":"hi"}]' is 32 characters.
    assert prompt_tokens({"messages": [{"role": "user", "content": "hi"}]}) == 8
    assert estimate_tokens([{"role": "user", "content": "hi"}]) == 8
    assert prompt_tokens({"model": "m"}) == 1
    assert prompt_tokens({"system": "abc", "messages": []}) == 2  # '"abc"[]' is 7 characters
    assert mock_words(3) == ["the", "quick", "brown"]
    assert len(mock_words(40)) == 40


# Raw HTTP: shapes


async def test_chat_json_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"].startswith("req_")
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "the quick brown fox jumps"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    p = prompt_tokens({"messages": MESSAGES})
    assert usage["prompt_tokens"] == p
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == p + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "cost" not in usage


async def test_output_tokens_sources(client: httpx.AsyncClient) -> None:
    async def completion_tokens(headers: dict[str, str] | None = None, **extra: Any) -> int:
        r = await client.post("/v1/chat/completions", json=chat_body(**extra), headers=headers)
        body = r.json()
        assert (
            len(body["choices"][0]["message"]["content"].split())
            == body["usage"]["completion_tokens"]
        )
        return int(body["usage"]["completion_tokens"])

    assert await completion_tokens() == DEFAULT_OUTPUT_TOKENS == 16
    assert await completion_tokens(max_tokens=7) == 7
    assert await completion_tokens(max_completion_tokens=9, max_tokens=7) == 9
    assert await completion_tokens({"x-mock-output-tokens": "3"}, max_tokens=7) == 3
    assert await completion_tokens({"x-mock-output-tokens": "0"}) == 0


async def test_chat_stream_without_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse(r.text)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 1 + 3 + 1
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert deltas == ["the", " quick", " brown"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True})
    r = await client.post("/v1/chat/completions", json=body)
    events = sse(r.text)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 1 + 4 + 1 + 1
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last["choices"] == []
    p = prompt_tokens({"messages": MESSAGES})
    assert last["usage"]["prompt_tokens"] == p
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == p + 4


async def test_legacy_completions(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", "max_tokens": 6}
    r = await client.post("/v1/completions", json=body)
    data = r.json()
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert len(data["choices"][0]["text"].split()) == 6
    assert data["usage"]["prompt_tokens"] == estimate_tokens("Once upon a time") == 5
    assert data["usage"]["completion_tokens"] == 6
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    events = sse((await client.post("/v1/completions", json=body)).text)
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]).split() == mock_words(6)
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_embeddings(client: httpx.AsyncClient) -> None:
    body: dict[str, Any] = {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}
    data = (await client.post("/v1/embeddings", json=body)).json()
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1]
    vectors = [d["embedding"] for d in data["data"]]
    assert all(
        len(v) == 8 and all(isinstance(x, float) and -1 <= x <= 1 for x in v) for v in vectors
    )
    assert vectors[0] != vectors[1]
    assert data["usage"] == {"prompt_tokens": 4, "total_tokens": 4}  # '["alpha","beta"]'
    again = (await client.post("/v1/embeddings", json=body)).json()
    assert again["data"] == data["data"]

    body = {"model": "e", "input": "alpha", "encoding_format": "base64", "dimensions": 3}
    packed = (await client.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
    decoded = struct.unpack("<3f", base64.b64decode(packed))
    assert decoded == pytest.approx(vectors[0][:3], abs=1e-6)


async def test_responses_json(client: httpx.AsyncClient) -> None:
    body = {
        "model": "gpt-4.1",
        "input": "Hello",
        "instructions": "Be brief",
        "max_output_tokens": 4,
    }
    data = (await client.post("/v1/responses", json=body)).json()
    assert data["object"] == "response"
    assert data["id"].startswith("resp_")
    assert data["status"] == "completed"
    assert data["model"] == "gpt-4.1"
    message = data["output"][0]
    assert message["type"] == "message"
    assert message["content"][0]["type"] == "output_text"
    assert message["content"][0]["text"] == "the quick brown fox"
    p = prompt_tokens({"instructions": "Be brief", "input": "Hello"})
    assert p == 5  # '"Be brief""Hello"' is 17 characters
    assert data["usage"] == {
        "input_tokens": p,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + 4,
    }


async def test_responses_stream_sequence(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-4.1", "input": "Hello", "max_output_tokens": 2, "stream": True}
    events = sse((await client.post("/v1/responses", json=body)).text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    assert [p["sequence_number"] for p in payloads] == list(range(len(names)))
    assert payloads[0]["response"]["usage"] is None
    assert payloads[-1]["response"]["usage"]["output_tokens"] == 2


async def test_messages_json_shape(client: httpx.AsyncClient) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": MESSAGES}
    r = await client.post("/v1/messages", json=body)
    assert r.headers["request-id"].startswith("req_")
    data = r.json()
    assert data["type"] == "message"
    assert data["role"] == "assistant"
    assert data["model"] == "claude-haiku-4-5"
    assert data["content"] == [{"type": "text", "text": "the quick brown"}]
    assert data["stop_reason"] == "end_turn"
    assert data["usage"] == {
        "input_tokens": prompt_tokens({"messages": MESSAGES}),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 3,
        "service_tier": "standard",
    }


async def test_messages_stream_sequence(client: httpx.AsyncClient) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": MESSAGES, "stream": True}
    headers = {"x-mock-cached-tokens": "100", "x-mock-cache-creation-tokens": "7"}
    events = sse((await client.post("/v1/messages", json=body, headers=headers)).text)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    start = payloads[0]["message"]["usage"]
    assert start["input_tokens"] == prompt_tokens({"messages": MESSAGES})
    assert start["cache_read_input_tokens"] == 100
    assert start["cache_creation_input_tokens"] == 7
    assert start["output_tokens"] == 1
    assert payloads[-2]["usage"] == {"output_tokens": 3}
    assert "".join(p["delta"]["text"] for p in payloads[3:6]) == "the quick brown"


# Errors


async def test_errors_have_the_providers_shapes(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}

    r = await client.post("/v1/messages", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"

    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert "model" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 400
    r = await client.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"x-mock-output-tokens": "lots"}
    )
    assert r.status_code == 400
    assert "x-mock-output-tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_status_knob(client: httpx.AsyncClient, stream: bool) -> None:
    headers = {"x-mock-status": "500"}
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=headers)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error"
    assert "usage" not in r.json()

    headers = {"x-mock-status": "429"}
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=headers)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"

    body = {"model": "claude", "max_tokens": 2, "messages": MESSAGES, "stream": stream}
    for status, kind in [(500, "api_error"), (529, "overloaded_error"), (429, "rate_limit_error")]:
        r = await client.post("/v1/messages", json=body, headers={"x-mock-status": str(status)})
        assert r.status_code == status
        assert r.json() == {
            "type": "error",
            "error": {"type": kind, "message": r.json()["error"]["message"]},
        }

    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"x-mock-status": "200"}
    )
    assert r.status_code == 400


# Knobs


async def test_cost_and_cache_knobs(client: httpx.AsyncClient) -> None:
    headers = {"x-mock-cost": "0.0123", "x-mock-cached-tokens": "2", "x-mock-header-cost": "0.5"}
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers=headers)
    assert r.headers["x-budget-cost"] == "0.5"
    usage = r.json()["usage"]
    assert usage["cost"] == 0.0123
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2
    assert usage["prompt_tokens"] == prompt_tokens({"messages": MESSAGES})

    # The cached tokens are part of the prompt: it counts at least as many.
    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"x-mock-cached-tokens": "1000"}
    )
    assert r.json()["usage"]["prompt_tokens"] == 1000

    stream = chat_body(stream=True, stream_options={"include_usage": True})
    r = await client.post("/v1/chat/completions", json=stream, headers=headers)
    assert r.headers["x-budget-cost"] == "0.5"
    assert json.loads(sse(r.text)[-2][1])["usage"]["cost"] == 0.0123

    body = {"model": "gpt-4.1", "input": "Hi", "stream": True}
    r = await client.post("/v1/responses", json=body, headers=headers)
    completed = json.loads(sse(r.text)[-1][1])["response"]["usage"]
    assert completed["cost"] == 0.0123
    assert completed["input_tokens_details"]["cached_tokens"] == 2

    body = {"model": "claude", "max_tokens": 2, "messages": MESSAGES}
    data = (await client.post("/v1/messages", json=body, headers=headers)).json()
    assert data["usage"]["cost"] == 0.0123
    assert data["usage"]["cache_read_input_tokens"] == 2
    assert data["usage"]["input_tokens"] == prompt_tokens(body)

    r = await client.post("/v1/embeddings", json={"model": "e", "input": "x"}, headers=headers)
    assert r.headers["x-budget-cost"] == "0.5"
    assert r.json()["usage"]["cost"] == 0.0123


async def test_fail_after_cuts_the_stream(app: FastAPI) -> None:
    body = chat_body(max_tokens=10, stream=True)
    headers = {"x-mock-fail-after": "3"}
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as lenient:
        r = await lenient.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    events = sse(r.text)
    assert len(events) == 3
    assert "[DONE]" not in r.text

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as strict:
        with pytest.raises(MockUpstreamCut):
            await strict.post("/v1/chat/completions", json=body, headers=headers)
        # More events allowed than the stream has: it completes.
        r = await strict.post(
            "/v1/chat/completions", json=body, headers={"x-mock-fail-after": "100"}
        )
        assert sse(r.text)[-1][1] == "[DONE]"


async def asgi_post(
    app: FastAPI,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    disconnect_after: int | None = None,
) -> list[tuple[float, bytes]]:
    """POST through the bare ASGI interface: (arrival time, bytes) of each response body message.

    httpx's ASGITransport buffers the whole body, so only this shows chunks arriving one by one."""
    raw = json.dumps(body).encode()
    scope = post_scope(
        path,
        [(k.encode(), v.encode()) for k, v in headers.items()],
        asgi={"version": "3.0", "spec_version": "2.3"},
    )
    request_sent = False
    disconnected = anyio.Event()
    chunks: list[tuple[float, bytes]] = []

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append((time.monotonic(), message["body"]))
            if disconnect_after is not None and len(chunks) >= disconnect_after:
                disconnected.set()

    await app(scope, receive, send)
    return chunks


async def test_stream_sends_one_event_per_chunk_with_delay(app: FastAPI) -> None:
    headers = {"x-mock-delay-ms": "40"}
    body = {"model": "claude", "max_tokens": 3, "messages": MESSAGES, "stream": True}
    chunks = await asgi_post(app, "/v1/messages", body, headers)
    assert len(chunks) == 9  # start, block start, ping, 3 deltas, block stop, delta, stop
    assert all(len(sse(data.decode())) == 1 for _, data in chunks)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(chunks)]
    assert min(gaps) >= 0.03


async def test_client_disconnect_stops_the_stream(app: FastAPI) -> None:
    headers = {"x-mock-delay-ms": "20"}
    body = chat_body(max_tokens=50, stream=True)
    chunks = await asgi_post(app, "/v1/chat/completions", body, headers, disconnect_after=3)
    assert 3 <= len(chunks) < 10


# Mounting and prefixes


async def test_mount_and_prefixes() -> None:
    outer = FastAPI()
    outer.mount("/openai", create_mock_app())
    inner = FastAPI()
    add_mock_routes(inner, prefix="/api/v2")
    outer.mount("/custom", inner)
    bare = FastAPI()
    bare.include_router(mock_router(prefix=""))
    outer.mount("/bare", bare)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(outer), base_url="http://t") as c:
        for path in (
            "/openai/v1/chat/completions",
            "/custom/api/v2/chat/completions",
            "/bare/chat/completions",
        ):
            r = await c.post(path, json=chat_body(max_tokens=2))
            assert r.status_code == 200, path
            assert r.json()["usage"]["completion_tokens"] == 2
        assert (await c.post("/openai/chat/completions", json=chat_body())).status_code == 404
        assert (await c.get("/openai/v1/chat/completions")).status_code == 405


# The real SDKs, in-process


async def test_openai_sdk_chat(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=6,
        extra_headers={"x-mock-cached-tokens": "3"},
    )
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == " ".join(mock_words(6))
    assert completion.usage is not None
    p = prompt_tokens({"messages": MESSAGES})
    assert completion.usage.prompt_tokens == p
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == p + 6
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3


async def test_openai_sdk_chat_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_completion_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == mock_words(5)
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens({"messages": MESSAGES})
    assert usage.completion_tokens == 5


async def test_openai_sdk_chat_stream_helper(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=4,
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == " ".join(mock_words(4))
    assert final.usage is not None
    assert final.usage.completion_tokens == 4


async def test_openai_sdk_responses(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="gpt-4.1", input="Hello", max_output_tokens=3)
    assert response.output_text == " ".join(mock_words(3))
    assert response.usage is not None
    assert response.usage.input_tokens == prompt_tokens({"input": "Hello"})
    assert response.usage.output_tokens == 3

    events = await oai.responses.create(
        model="gpt-4.1", input="Hello", max_output_tokens=4, stream=True
    )
    completed = None
    deltas = []
    async for event in events:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert "".join(deltas).split() == mock_words(4)
    assert completed is not None
    assert completed.usage is not None
    assert completed.usage.input_tokens == prompt_tokens({"input": "Hello"})
    assert completed.usage.output_tokens == 4
    assert completed.usage.total_tokens == completed.usage.input_tokens + 4

    async with oai.responses.stream(
        model="gpt-4.1", input="Hello", instructions="Be brief", max_output_tokens=2
    ) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "the quick"
    assert final.usage is not None
    assert final.usage.input_tokens == prompt_tokens({"instructions": "Be brief", "input": "Hello"})


async def test_openai_sdk_embeddings(oai: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    default = await oai.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input=["a", "b", "c"], encoding_format="float"
    )
    assert len(default.data) == 3
    assert all(len(d.embedding) == 8 for d in default.data)
    for packed, plain in zip(default.data, floats.data, strict=True):
        assert packed.embedding == pytest.approx(plain.embedding, abs=1e-6)
    assert default.usage.prompt_tokens == estimate_tokens(["a", "b", "c"])
    assert default.usage.total_tokens == default.usage.prompt_tokens


async def test_openai_sdk_errors_and_mount() -> None:
    outer = FastAPI()
    outer.mount("/openai", create_mock_app())
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(outer))
    async with openai.AsyncOpenAI(
        base_url="http://test/openai/v1", api_key="x", http_client=http, max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=2,
        )
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 2
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"x-mock-status": "500"},
            )
        assert caught.value.status_code == 500
        with pytest.raises(openai.RateLimitError):
            await sdk.responses.create(
                model="gpt-4.1", input="Hi", extra_headers={"x-mock-status": "429"}
            )


async def test_anthropic_sdk_messages(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=6,
        system="You are terse.",
        messages=CLAUDE_MESSAGES,
        extra_headers={"x-mock-cached-tokens": "40", "x-mock-cache-creation-tokens": "5"},
    )
    assert message.model == "claude-haiku-4-5"
    assert message.content[0].type == "text"
    assert message.content[0].text == " ".join(mock_words(6))
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == prompt_tokens(
        {"system": "You are terse.", "messages": MESSAGES}
    )
    assert message.usage.output_tokens == 6
    assert message.usage.cache_read_input_tokens == 40
    assert message.usage.cache_creation_input_tokens == 5


async def test_anthropic_sdk_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=7,
        messages=CLAUDE_MESSAGES,
        extra_headers={"x-mock-cached-tokens": "12"},
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts).split() == mock_words(7)
    assert final.usage.input_tokens == prompt_tokens({"messages": MESSAGES})
    assert final.usage.output_tokens == 7
    assert final.usage.cache_read_input_tokens == 12
    assert final.stop_reason == "end_turn"

    raw = await claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=2,
        messages=CLAUDE_MESSAGES,
        stream=True,
    )
    types = [event.type async for event in raw]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]


async def test_anthropic_sdk_errors(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        await claude.messages.create(
            model="claude",
            max_tokens=2,
            messages=CLAUDE_MESSAGES,
            extra_headers={"x-mock-status": "529"},
        )
    assert caught.value.status_code == 529
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(
            model="",
            max_tokens=2,
            messages=CLAUDE_MESSAGES,
        )
