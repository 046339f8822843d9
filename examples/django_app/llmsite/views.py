"""A fake of OpenAI's chat completions (JSON, or SSE with `"stream": true`), with usage."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from budget_middleware.wsgi import budget_state

WORDS = (
    "budgets",
    "keep",
    "every",
    "token",
    "honest",
    "while",
    "the",
    "ledger",
    "counts",
    "quietly",
)


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _usage(body: dict[str, Any]) -> tuple[int, int]:
    prompt = max(1, math.ceil(len(json.dumps(body.get("messages", []))) / 4))
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return prompt, limit if isinstance(limit, int) and limit > 0 else 16


@csrf_exempt
def chat_completions(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    caller = budget_state(request)  # who is calling, as the middleware resolved it (WSGI or ASGI)
    prompt, output = _usage(body)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": body.get("model", "gpt-4o-mini"),
    }
    if body.get("stream"):
        events: Iterator[bytes] | AsyncIterator[bytes] = _events(base, body, prompt, output)
        if hasattr(request, "scope"):  # Django's ASGI handler reads a sync iterator whole first
            events = _async(events)
        return StreamingHttpResponse(events, content_type="text/event-stream")
    text = " ".join(WORDS[i % len(WORDS)] for i in range(output))
    return JsonResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": output,
                "total_tokens": prompt + output,
            },
            "x_caller": caller.virtual_key_id if caller is not None else None,
        }
    )


def _events(
    base: dict[str, Any], body: dict[str, Any], prompt: int, output: int
) -> Iterator[bytes]:
    chunk = {**base, "object": "chat.completion.chunk"}
    for i in range(output):
        delta = {"content": ("" if i == 0 else " ") + WORDS[i % len(WORDS)]}
        event = {**chunk, "choices": [{"index": 0, "delta": delta}]}
        yield f"data: {json.dumps(event)}\n\n".encode()
    done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield f"data: {json.dumps(done)}\n\n".encode()
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _async(events: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The events as an async iterator: Django's ASGI handler sends each as it comes."""
    for event in events:
        yield event
