"""What every part of the benchmark shares: a configured store, host apps, raw ASGI calls, stats.

The apps are called directly with prepared `receive`/`send` callables (no HTTP, no httpx), so the
figures are the app's and the middleware's own time. Starlette writes into the scope, so every
call gets a fresh shallow copy of a prepared one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# From a fresh clone the package need not be installed: import it (and the examples) from here.
for _path in (ROOT / "examples", ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from mock_upstream import mock_router  # type: ignore[import-not-found]  # noqa: E402

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine  # noqa: E402
from budget_middleware.engine.engine import BudgetEngine  # noqa: E402

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

MODEL = "gpt-4o-mini"
UNLIMITED_RATE = {
    "request_max_limit": 10**9,
    "request_reset_duration": "1m",
    "token_max_limit": 10**12,
    "token_reset_duration": "1d",
}
BIG_BUDGET = [{"max_limit": 1_000_000, "reset_duration": "1d"}]


def chat_body(*, stream: bool = False, include_usage: bool = True, **extra: Any) -> bytes:
    """A small, typical chat completion request."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a haiku about budgets."},
        ],
        "max_tokens": 64,
        **extra,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


# A fixed, realistic chat completion (what OpenAI answers), for the trivial route.
FIXED_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Counting every coin,\nthe ledger hums through the night,\n"
                    "budgets keep their word.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 26,
            "completion_tokens": 20,
            "total_tokens": 46,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }
).encode()


def mock_host(settings: BudgetSettings | None) -> FastAPI:
    """The example app's shape: FastAPI, a plain route, the mock upstream; the middleware when
    `settings` is given."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(mock_router("/v1"))
    if settings is not None:
        app.add_middleware(BudgetMiddleware, settings=settings)
    return app


def _large_completion(size: int = 100_000) -> bytes:
    """The fixed completion with a ~100 KB answer: its usage sits after the long content."""
    document = json.loads(FIXED_COMPLETION)
    document["choices"][0]["message"]["content"] = "lorem ipsum " * (size // 12)
    return json.dumps(document).encode()


LARGE_COMPLETION = _large_completion()


def trivial_host(
    settings: BudgetSettings | None, completion: bytes | str = FIXED_COMPLETION
) -> FastAPI:
    """A FastAPI app whose completion route reads the body and answers a fixed completion."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        await request.body()
        return Response(completion, media_type="application/json")

    if settings is not None:
        app.add_middleware(BudgetMiddleware, settings=settings)
    return app


# -- a configured store ---------------------------------------------------------------------


@dataclass
class World:
    """An engine with a customer, a team and a key, each with budgets and rate limits."""

    settings: BudgetSettings
    engine: BudgetEngine
    key: str
    team_id: str
    customer_id: str


def bench_settings(directory: Path, **overrides: Any) -> BudgetSettings:
    # A long cache TTL: the in-process figures are those of a cached key (the TTL's store read,
    # once per key every 5 s by default, is not on the path measured here).
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{directory / 'bench.db'}",
        "cache_ttl_seconds": 3600,
        "flush_interval_seconds": 3600,  # flushed between rounds by the benchmark, untimed
        **overrides,
    }
    return BudgetSettings(**values)


async def make_world(settings: BudgetSettings, name: str = "bench") -> World:
    engine = get_engine(settings)
    await engine.ensure_started()
    manager = engine.manager
    customer = manager.create_customer(name=f"{name}-customer", budgets=BIG_BUDGET)
    team = manager.create_team(
        name=f"{name}-team", customer_id=customer.id, budgets=BIG_BUDGET, rate_limit=UNLIMITED_RATE
    )
    key = manager.create_virtual_key(
        name=f"{name}-key", team_id=team.id, budgets=BIG_BUDGET, rate_limit=UNLIMITED_RATE
    )
    await engine.invalidate()
    assert key.value is not None  # shown once, at creation
    return World(settings, engine, key.value, team.id, customer.id)


# -- raw ASGI calls -------------------------------------------------------------------------


def http_scope(
    path: str, method: str = "POST", headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    """What uvicorn passes for a request (ASGI spec 2.3, as uvicorn 0.3x says)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), *headers],
        "state": {},
    }


def json_headers(body: bytes, key: str | None) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode()))
    return headers


class Receiver:
    """The request body once; after it, the client stays connected (a wait that never ends)."""

    __slots__ = ("body", "sent")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = False

    async def __call__(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.get_running_loop().create_future()  # cancelled when the response ends
        raise AssertionError("unreachable")


async def discard(message: Message) -> None:
    return None


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


async def call(app: ASGIApp, scope: dict[str, Any], body: bytes) -> Answer:
    """One call, keeping the answer (to check a scenario before timing it)."""
    answer = Answer()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    await asyncio.wait_for(app({**scope, "state": {}}, Receiver(body), send), 10)
    return answer


async def time_calls(app: ASGIApp, scope: dict[str, Any], body: bytes, n: int) -> list[float]:
    """µs per call, n calls."""
    perf = time.perf_counter_ns
    out: list[float] = []
    append = out.append
    for _ in range(n):
        fresh = {**scope, "state": {}}
        receive = Receiver(body)
        start = perf()
        await app(fresh, receive, discard)
        append((perf() - start) / 1000)
    return out


@dataclass
class Timing:
    median: float
    p99: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        ordered = sorted(samples)
        return cls(
            median=statistics.median(ordered),
            p99=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            mean=statistics.fmean(ordered),
            n=len(ordered),
        )

    def as_dict(self) -> dict[str, float]:
        return {"median_us": self.median, "p99_us": self.p99, "mean_us": self.mean, "n": self.n}


async def compare(
    variants: Mapping[str, tuple[ASGIApp, dict[str, Any], bytes]],
    iterations: int,
    rounds: int,
    between: Callable[[], Awaitable[object]] | None = None,
    warmup: int = 300,
) -> dict[str, Timing]:
    """Time each variant in interleaved rounds (so drift hits all alike), after a warm-up.

    The GC stays enabled (as in a server); a collection runs before each round, and `between`
    (the engine's flush, as its background flusher would do) runs untimed between rounds.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for app, scope, body in variants.values():
        await time_calls(app, scope, body, warmup)
    per_round = max(iterations // rounds, 1)
    for _ in range(rounds):
        for name, (app, scope, body) in variants.items():
            if between is not None:
                await between()
            gc.collect()
            samples[name] += await time_calls(app, scope, body, per_round)
    return {name: Timing.of(values) for name, values in samples.items()}


def rss_mb() -> float:
    """This process's resident set size (Linux)."""
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gc_state() -> str:
    thresholds = ",".join(str(t) for t in gc.get_threshold())
    return f"GC {'enabled' if gc.isenabled() else 'disabled'} (thresholds {thresholds})"
