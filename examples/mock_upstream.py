"""An offline mock of the OpenAI and Anthropic inference APIs, for the examples and the tests.

``create_mock_app()`` is a FastAPI app; ``mock_router()`` gives the same routes to mount in an
app of your own. Under ``prefix`` (default ``/v1``), all ``POST``:

* ``/chat/completions``: OpenAI chat completion, JSON or (``"stream": true``) SSE chunks; the
  usage-only chunk (``"choices": []``) comes only with ``stream_options.include_usage``.
* ``/completions``: legacy text completion (``choices[0].text``), JSON or SSE.
* ``/embeddings``: ``data[].embedding`` (``encoding_format`` ``float`` or ``base64``;
  ``dimensions``, default 8), ``usage{prompt_tokens, total_tokens}``.
* ``/responses``: OpenAI Responses API, JSON or the ``response.created`` ... ``response.completed``
  event sequence.
* ``/messages``: Anthropic Messages, JSON or the ``message_start`` ... ``message_stop`` event
  sequence; its errors have Anthropic's shape, the others OpenAI's.

Usage is deterministic. Input tokens are ``prompt_tokens(body)``: ceil(len(JSON) / 4), at least 1,
of the prompt fields present (``system``, ``instructions``, ``messages``, ``prompt``, ``input``).
Output tokens are ``max_completion_tokens``, ``max_output_tokens`` or ``max_tokens`` when given,
else 16, and the text has exactly that many words (one token per word; a stream sends one word per
delta). The model always stops naturally (``stop``, ``end_turn``, ``completed``).

Test knobs, as request headers:

* ``x-mock-output-tokens: N``: output N tokens (words), whatever the request asked.
* ``x-mock-cached-tokens: N``: report N cache-read input tokens (OpenAI ``cached_tokens``, the
  prompt then counts at least N tokens; Anthropic ``cache_read_input_tokens``, besides
  ``input_tokens``).
* ``x-mock-cache-creation-tokens: N``: Anthropic ``cache_creation_input_tokens``.
* ``x-mock-cost: 0.0123``: put ``usage.cost`` (USD) in the body, as OpenRouter does.
* ``x-mock-header-cost: 0.5``: answer with the header ``x-budget-cost: 0.5``.
* ``x-mock-delay-ms: N``: sleep N ms between stream events.
* ``x-mock-fail-after: N``: streams only, raise ``MockUpstreamCut`` after N events (a cut).
* ``x-mock-status: 500``: answer that status (400-599) with an error body and no usage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

__all__ = ["DEFAULT_OUTPUT_TOKENS", "MockUpstreamCut", "add_mock_routes", "create_mock_app",
           "estimate_tokens", "mock_router", "mock_words", "prompt_tokens"]  # fmt: skip

JSON = dict[str, Any]
Flavor = Literal["openai", "anthropic"]

DEFAULT_OUTPUT_TOKENS = 16
PROMPT_FIELDS = ("system", "instructions", "messages", "prompt", "input")
_VOCAB = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
          "budgets", "keep", "every", "token", "honest", "today")  # fmt: skip
_FINGERPRINT = "fp_mock0000"
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 529: "overloaded_error"}  # fmt: skip


class MockUpstreamCut(RuntimeError):
    """Raised inside a stream by ``x-mock-fail-after``: the upstream went away mid-stream."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def estimate_tokens(value: Any) -> int:
    """ceil(len(compact JSON of ``value``) / 4), at least 1."""
    return max(1, math.ceil(len(_dumps(value)) / 4))


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The input tokens the mock reports for a request body (before ``x-mock-cached-tokens``)."""
    size = sum(len(_dumps(body[name])) for name in PROMPT_FIELDS if name in body)
    return max(1, math.ceil(size / 4))


def mock_words(count: int) -> list[str]:
    """The words of a generated text of ``count`` tokens."""
    return [_VOCAB[i % len(_VOCAB)] for i in range(count)]


@dataclass(frozen=True)
class _Knobs:
    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    cost: float | None = None
    header_cost: str | None = None
    delay: float = 0.0
    fail_after: int | None = None
    status: int | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> _Knobs:
        def num(name: str, kind: type[float], low: float = 0, high: float = 1e12) -> Any:
            raw = headers.get(name)
            if raw is None:
                return None
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not low <= value <= high or math.isnan(value):
                raise ValueError(f"Invalid header {name}: {raw!r}")
            return value

        header_cost = num("x-mock-header-cost", float)
        return cls(
            output_tokens=num("x-mock-output-tokens", int),
            cached_tokens=num("x-mock-cached-tokens", int) or 0,
            cache_creation_tokens=num("x-mock-cache-creation-tokens", int) or 0,
            cost=num("x-mock-cost", float),
            header_cost=None if header_cost is None else headers["x-mock-header-cost"].strip(),
            delay=(num("x-mock-delay-ms", float) or 0.0) / 1000,
            fail_after=num("x-mock-fail-after", int),
            status=num("x-mock-status", int, 400, 599),
        )


@dataclass
class _Call:
    body: JSON
    knobs: _Knobs
    model: str
    input_tokens: int
    words: list[str]
    created: int = field(default_factory=lambda: int(time.time()))
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    @classmethod
    def make(cls, body: JSON, knobs: _Knobs) -> _Call:
        count = knobs.output_tokens
        for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
            value = body.get(name)
            if count is None and isinstance(value, int) and not isinstance(value, bool):
                count = max(value, 0)
        count = DEFAULT_OUTPUT_TOKENS if count is None else count
        return cls(body, knobs, body["model"], prompt_tokens(body), mock_words(count))

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def output_tokens(self) -> int:
        return len(self.words)

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def deltas(self) -> Iterator[str]:
        return (word if i == 0 else " " + word for i, word in enumerate(self.words))

    def with_cost(self, usage: JSON) -> JSON:
        return usage if self.knobs.cost is None else {**usage, "cost": self.knobs.cost}

    def openai_usage(self) -> JSON:
        prompt = max(self.input_tokens, self.knobs.cached_tokens)
        return self.with_cost({
            "prompt_tokens": prompt, "completion_tokens": self.output_tokens,
            "total_tokens": prompt + self.output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.knobs.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        })  # fmt: skip

    def responses_usage(self) -> JSON:
        prompt = max(self.input_tokens, self.knobs.cached_tokens)
        return self.with_cost({
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.knobs.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + self.output_tokens,
        })  # fmt: skip

    def anthropic_usage(self, output_tokens: int) -> JSON:
        return {"input_tokens": self.input_tokens,
                "cache_creation_input_tokens": self.knobs.cache_creation_tokens,
                "cache_read_input_tokens": self.knobs.cached_tokens,
                "output_tokens": output_tokens, "service_tier": "standard"}  # fmt: skip


def _error(flavor: Flavor, status: int, message: str) -> JSONResponse:
    if flavor == "anthropic":
        default = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_ERRORS.get(status, default)
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status)
    code = "rate_limit_exceeded" if status == 429 else None
    kind = "server_error" if status >= 500 else "requests" if code else "invalid_request_error"
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": error}, status)


def _stream(call: _Call, events: Iterator[tuple[str | None, Any]]) -> StreamingResponse:
    """One SSE event per body chunk: ``event: name`` when named, ``[DONE]`` sent as is."""
    knobs = call.knobs

    async def body() -> AsyncIterator[bytes]:
        for index, (name, data) in enumerate(events):
            if knobs.fail_after is not None and index >= knobs.fail_after:
                raise MockUpstreamCut(f"mock upstream cut after {index} events")
            if index and knobs.delay:
                await anyio.sleep(knobs.delay)
            payload = data if isinstance(data, str) else _dumps(data)
            yield (f"event: {name}\n" if name else "").encode() + f"data: {payload}\n\n".encode()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})  # fmt: skip


# OpenAI chat and legacy completions


def _chat(call: _Call) -> Response:
    base = {"id": f"chatcmpl-{call.uid}", "object": "chat.completion", "created": call.created,
            "model": call.model, "system_fingerprint": _FINGERPRINT}  # fmt: skip
    if not call.stream:
        message: JSON = {"role": "assistant", "content": call.text, "refusal": None,
                         "annotations": []}  # fmt: skip
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return JSONResponse({**base, "choices": [choice], "usage": call.openai_usage(),
                             "service_tier": "default"})  # fmt: skip
    base["object"] = "chat.completion.chunk"
    return _stream(call, _openai_chunks(call, base, lambda text: {"content": text}))


def _completions(call: _Call) -> Response:
    base = {"id": f"cmpl-{call.uid}", "object": "text_completion", "created": call.created,
            "model": call.model, "system_fingerprint": _FINGERPRINT}  # fmt: skip
    if not call.stream:
        choice = {"text": call.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        return JSONResponse({**base, "choices": [choice], "usage": call.openai_usage()})
    return _stream(call, _openai_chunks(call, base, None))


def _openai_chunks(
    call: _Call, base: JSON, delta: Callable[[str], JSON] | None
) -> Iterator[tuple[str | None, Any]]:
    """Chat chunks (``delta`` builds a choice delta) or legacy completion chunks (``text``)."""
    extra: JSON = {"usage": None} if call.include_usage else {}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> JSON:
        if delta is None:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        elif first:
            choice = {"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                      "logprobs": None, "finish_reason": None}  # fmt: skip
        else:
            body = {} if text is None else delta(text)
            choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {**base, "service_tier": "default", "choices": [choice], **extra}

    if delta is not None:
        yield None, chunk(None, None, first=True)
    for text in call.deltas():
        yield None, chunk(text, None)
    yield None, chunk(None, "stop")
    if call.include_usage:
        yield None, {**base, "service_tier": "default", "choices": [], "usage": call.openai_usage()}
    yield None, "[DONE]"


# OpenAI embeddings


def _embeddings(call: _Call) -> Response:
    raw = call.body["input"]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return _error("openai", 400, "'input' must be a non-empty string or array.")
    dims = call.body.get("dimensions", 8)
    if not isinstance(dims, int) or not 1 <= dims <= 4096:
        return _error("openai", 400, "'dimensions' must be an integer between 1 and 4096.")
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(raw):
        digest = hashlib.shake_256(_dumps(item).encode()).digest(2 * dims)
        vector = [round(int.from_bytes(digest[2 * j : 2 * j + 2], "little") / 32767.5 - 1, 6)
                  for j in range(dims)]  # fmt: skip
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = call.with_cost({"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens})
    return JSONResponse({"object": "list", "data": data, "model": call.model, "usage": usage})


# OpenAI Responses API


def _responses(call: _Call) -> Response:
    msg_id = f"msg_{call.uid}"
    part = {"type": "output_text", "text": call.text, "annotations": [], "logprobs": []}
    item = {"id": msg_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}  # fmt: skip

    def response(status: str, output: list[JSON], usage: JSON | None) -> JSON:
        body = call.body
        return {"id": f"resp_{call.uid}", "object": "response", "created_at": call.created,
                "status": status, "background": False, "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens":
                body.get("max_output_tokens"), "model": call.model, "output": output,
                "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": True,
                "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage,
                "user": None, "metadata": body.get("metadata") or {}}  # fmt: skip

    if not call.stream:
        return JSONResponse(response("completed", [item], call.responses_usage()))

    def events() -> Iterator[tuple[str | None, Any]]:
        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        empty_part = {**part, "text": ""}
        sequence: list[tuple[str, JSON]] = [
            ("response.created", {"response": response("in_progress", [], None)}),
            ("response.in_progress", {"response": response("in_progress", [], None)}),
            ("response.output_item.added", {"output_index": 0, "item": {
                **item, "status": "in_progress", "content": []}}),
            ("response.content_part.added", {**where, "part": empty_part}),
        ]  # fmt: skip
        sequence += [("response.output_text.delta", {**where, "delta": text, "logprobs": []})
                     for text in call.deltas()]  # fmt: skip
        sequence += [
            ("response.output_text.done", {**where, "text": call.text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": response("completed", [item],
                                                         call.responses_usage())}),
        ]  # fmt: skip
        for number, (name, data) in enumerate(sequence):
            yield name, {"type": name, "sequence_number": number, **data}

    return _stream(call, events())


# Anthropic Messages


def _messages(call: _Call) -> Response:
    message = {"id": f"msg_{call.uid}", "type": "message", "role": "assistant", "model": call.model,
               "content": [{"type": "text", "text": call.text}], "stop_reason": "end_turn",
               "stop_sequence": None}  # fmt: skip
    if not call.stream:
        usage = call.with_cost(call.anthropic_usage(call.output_tokens))
        return JSONResponse({**message, "usage": usage})

    def events() -> Iterator[tuple[str | None, Any]]:
        start = {**message, "content": [], "stop_reason": None, "usage": call.anthropic_usage(1)}
        yield "message_start", {"type": "message_start", "message": start}
        yield "content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}  # fmt: skip
        yield "ping", {"type": "ping"}
        for text in call.deltas():
            delta = {"type": "text_delta", "text": text}
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        usage = call.with_cost({"output_tokens": call.output_tokens})
        yield "message_delta", {"type": "message_delta", "delta": stop, "usage": usage}
        yield "message_stop", {"type": "message_stop"}

    return _stream(call, events())


# Routing

_ROUTES: dict[str, tuple[Callable[[_Call], Response], str | None]] = {
    "/chat/completions": (_chat, "messages"),
    "/completions": (_completions, "prompt"),
    "/embeddings": (_embeddings, "input"),
    "/responses": (_responses, None),
    "/messages": (_messages, "messages"),
}


def _endpoint(
    build: Callable[[_Call], Response], required: str | None, flavor: Flavor
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            knobs = _Knobs.from_headers(request.headers)
        except ValueError as exc:
            return _error(flavor, 400, str(exc))
        try:
            body = await request.json()
        except ValueError:
            return _error(flavor, 400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            response: Response = _error(flavor, 400, "The request body must be a JSON object.")
        elif not isinstance(body.get("model"), str) or not body["model"]:
            response = _error(flavor, 400, "You must provide a model parameter.")
        elif required is not None and required not in body:
            response = _error(flavor, 400, f"Missing required parameter: '{required}'.")
        elif knobs.status is not None:
            response = _error(flavor, knobs.status, f"Mock upstream error {knobs.status}.")
        else:
            response = build(_Call.make(body, knobs))
        request_id = "req_" + uuid.uuid4().hex
        response.headers["request-id" if flavor == "anthropic" else "x-request-id"] = request_id
        if knobs.header_cost is not None:
            response.headers["x-budget-cost"] = knobs.header_cost
        return response

    return endpoint


def mock_router(prefix: str = "/v1") -> APIRouter:
    """The mock's routes under ``prefix`` (``""`` for none)."""
    router = APIRouter(prefix=prefix.rstrip("/"))
    for path, (build, required) in _ROUTES.items():
        flavor: Flavor = "anthropic" if path == "/messages" else "openai"
        name = "mock_" + path.strip("/").replace("/", "_")
        router.add_api_route(path, _endpoint(build, required, flavor), methods=["POST"], name=name)
    return router


def add_mock_routes(app: FastAPI | APIRouter, prefix: str = "/v1") -> None:
    """Add the mock's routes to an existing FastAPI app or router."""
    app.include_router(mock_router(prefix))


def create_mock_app(prefix: str = "/v1") -> FastAPI:
    """A FastAPI app answering like the OpenAI and Anthropic APIs under ``prefix``."""
    app = FastAPI(title="Mock LLM upstream")
    add_mock_routes(app, prefix)
    return app


if __name__ == "__main__":  # pragma: no cover
    import uvicorn

    uvicorn.run(create_mock_app(), host="127.0.0.1", port=8001)
