"""An example Flask app with budget-middleware: an offline fake of OpenAI's chat completions
(JSON or streamed), the middleware in front of it, and the admin API mounted beside it.

    pip install "budget-middleware[flask]"
    BUDGET_ADMIN_KEY=admin-secret flask --app examples/flask_app run            # development
    BUDGET_ADMIN_KEY=admin-secret gunicorn -k gthread --threads 8 \\
        --chdir examples "flask_app:create_app()"                                 # production

Then create a key with a budget and spend it (the second request is refused, 402):

    curl -s localhost:5000/budget-admin/virtual-keys -H 'authorization: Bearer admin-secret' \\
        -d '{"name": "alice", "budgets": [{"max_limit": 0.00001, "reset_duration": "1d"}]}'
    curl -s localhost:5000/v1/chat/completions -H 'authorization: Bearer sk-bm-…' \\
        -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'

Set BUDGET_NO_MIDDLEWARE=1 to serve the same app without the middleware (a baseline).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from budget_middleware import BudgetSettings
from budget_middleware.wsgi import BudgetWSGIMiddleware, budget_state, create_admin_wsgi_app

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


def prompt_tokens(body: dict[str, Any]) -> int:
    """Deterministic usage: a token per 4 characters of the messages' JSON, at least 1."""
    return max(1, math.ceil(len(json.dumps(body.get("messages", []))) / 4))


def output_tokens(body: dict[str, Any]) -> int:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(limit) if isinstance(limit, int) and limit > 0 else 16


def fake_completion(body: dict[str, Any]) -> dict[str, Any]:
    """What OpenAI answers to a chat completion, with `usage`."""
    inp, out = prompt_tokens(body), output_tokens(body)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(out))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "gpt-4o-mini"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
    }


def fake_stream(body: dict[str, Any], delay: float = 0.0) -> Iterator[bytes]:
    """OpenAI's SSE chunks, one word a chunk; the usage chunk when `stream_options` asks."""
    inp, out = prompt_tokens(body), output_tokens(body)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": body.get("model", "gpt-4o-mini")}  # fmt: skip
    for i in range(out):
        delta = {"content": ("" if i == 0 else " ") + WORDS[i % len(WORDS)]}
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        if delay:
            time.sleep(delay)
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield b"data: " + json.dumps(last).encode() + b"\n\n"
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
        yield b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def create_app(settings: BudgetSettings | None = None) -> Flask:
    """The app; `settings` default to the BUDGET_* environment variables."""
    app = Flask(__name__)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        body = request.get_json(force=True, silent=True) or {}
        if body.get("stream"):
            delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
            return Response(fake_stream(body, delay), content_type="text/event-stream")
        return Response(json.dumps(fake_completion(body)), content_type="application/json")

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        """Not metered, so no budget state here: see `caller()` for where the app finds it."""
        return {"metered": budget_state(request.environ) is not None}

    @app.post("/v1/caller/completions")
    def caller() -> dict[str, Any]:
        """A metered route that shows who is calling, as the middleware resolved it."""
        state = budget_state(request.environ)
        assert state is not None
        return {**state._asdict(), "tags": list(state.tags), "usage": {"prompt_tokens": 1}}

    if os.environ.get("BUDGET_NO_MIDDLEWARE") != "1":
        app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings)  # type: ignore[method-assign]
        app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, {"/budget-admin": create_admin_wsgi_app(settings)}
        )
    return app


if __name__ == "__main__":
    create_app().run(port=5000, threaded=True)
