"""The floor: what the essential work of a metered request costs, beside what the middleware costs.

    .venv/bin/python benchmarks/floor.py [--iterations N] [--rounds R]

`Essential` is not a product (no streams, no refusals, no routes, no errors handled, one provider):
it is a middleware that does only what every metered JSON request must, with the package's own
core for the rules (admission and settlement over the hot path's seven counters, the limit
headers, the usage read from the answer, its cost, the usage record), and nothing else. Timed
in the same run as the bare app and `BudgetMiddleware`, in front of a raw ASGI app (the
middleware's own time) and of the in-process part's FastAPI trivial route (the benchmark's
scenario), so the added µs of each can be set against the calibration's bare Starlette. What
`BudgetMiddleware` adds beyond `Essential` is its glue (every adapter's way in and out, the
cases `Essential` leaves out); what `Essential` adds is the floor of this core in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from hashlib import sha256
from pathlib import Path
from time import perf_counter
from typing import Any

import orjson
from harness import (
    FIXED_COMPLETION,
    ASGIApp,
    BudgetMiddleware,
    Message,
    Receive,
    Send,
    bench_settings,
    call,
    chat_body,
    compare,
    http_scope,
    json_headers,
    make_world,
    trivial_host,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budget_middleware.core import admission
from budget_middleware.core.pricing import cost_nanos, estimate_nanos
from budget_middleware.core.records import UsageRecord
from budget_middleware.core.scopes import KeyConfig
from budget_middleware.core.usage import usage_from_json
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.headers import add_limit_headers

_SUFFIXES = ("/chat/completions", "/completions", "/messages")


async def raw_app(scope: Any, receive: Receive, send: Send) -> None:
    """The least an ASGI app can do: read the body, answer the fixed completion."""
    await receive()
    headers = [
        (b"content-length", b"%d" % len(FIXED_COMPLETION)),
        (b"content-type", b"application/json"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FIXED_COMPLETION})


class Essential:
    """A metered JSON request's essential work, and nothing else (see the module's text)."""

    def __init__(self, app: ASGIApp, engine: BudgetEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(_SUFFIXES):
            await self.app(scope, receive, send)
            return
        engine = self.engine
        ledger = engine.counters.ledger  # type: ignore[attr-defined]
        started = perf_counter()
        headers = dict(scope["headers"])
        key = engine.keys.get(sha256(headers[b"authorization"][7:]).digest())
        assert isinstance(key, KeyConfig)  # cached by the middleware's first call
        first = await receive()
        body = first["body"]
        request = orjson.loads(body)
        model = request["model"]
        limits = key.resolve(engine.globals, "openai", model, ())
        price = engine.prices.price("openai", model)
        assert price is not None
        estimate = estimate_nanos(price, len(body) // 3 + 1, request.get("max_tokens") or 4096)
        now = engine.clock()
        ticket = admission.admit(limits, estimate, True, now, ledger)
        assert type(ticket) is admission.Ticket and ticket.tightest is not None
        replayed = False
        status = 0
        parts: list[bytes] = []

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return first

        async def forward(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                added = list(message["headers"])
                add_limit_headers(added, ticket.tightest, now)  # type: ignore[union-attr, arg-type]
                message = {**message, "headers": added}
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    await send(message)
                    usage = usage_from_json(b"".join(parts))
                    assert usage is not None
                    cost = cost_nanos(price, usage)
                    engine.records.append(
                        UsageRecord(
                            "",
                            now,
                            key.id,
                            key.team_id,
                            key.customer_id,
                            "openai",
                            model,
                            (),
                            usage.input_tokens,
                            usage.output_tokens,
                            usage.cached_tokens,
                            cost,
                            price.source,
                            status,
                            False,
                            "completed",
                            False,
                            None,
                            (perf_counter() - started) * 1000,
                        )
                    )
                    tokens = usage.input_tokens + usage.output_tokens
                    admission.settle(ticket, cost, tokens, engine.clock(), ledger)  # type: ignore[arg-type]
                    return
            await send(message)

        await self.app(scope, replay, forward)


def bare_starlette() -> Starlette:
    async def chat(request: Request) -> Response:
        await request.body()
        return Response(FIXED_COMPLETION, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def main(iterations: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-floor-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        engine = world.engine
        body = chat_body()
        scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
        essential_fastapi = trivial_host(None)
        essential_fastapi.add_middleware(Essential, engine=engine)
        apps: dict[str, ASGIApp] = {
            "bare Starlette (calibration)": bare_starlette(),
            "raw ASGI app": raw_app,
            "raw + Essential": Essential(raw_app, engine),
            "raw + BudgetMiddleware": BudgetMiddleware(raw_app, settings=settings),
            "FastAPI trivial route": trivial_host(None),
            "FastAPI + Essential": essential_fastapi,
            "FastAPI + BudgetMiddleware": trivial_host(settings),
        }
        await call(apps["raw + BudgetMiddleware"], scope, body)  # the key cached
        for name, app in apps.items():
            answer = await call(app, scope, body)
            assert answer.status == 200, (name, answer.status)
        variants = {name: (app, scope, body) for name, app in apps.items()}
        timings = await compare(variants, iterations, rounds, between=engine.flush)
        calibration = timings["bare Starlette (calibration)"].median
        print(f"bare Starlette: {calibration:.1f} µs (the issue's reference machine: ~8 µs)\n")
        print("| app | µs p50 | added µs | added, x bare Starlette | at the reference's 8 µs |")
        print("|---|---:|---:|---:|---:|")
        for host in ("raw ASGI app", "FastAPI trivial route"):
            base = timings[host].median
            print(f"| {host} | {base:.1f} | | | |")
            prefix = "raw" if host.startswith("raw") else "FastAPI"
            for variant in ("Essential", "BudgetMiddleware"):
                median = timings[f"{prefix} + {variant}"].median
                added = median - base
                ratio = added / calibration
                print(
                    f"| {prefix} + {variant} | {median:.1f} | {added:.1f} | {ratio:.2f}x "
                    f"| {ratio * 8:.1f} µs |"
                )
        print("\nThe issue's target: ≤ 20 µs added at the reference (2.5x bare Starlette).")
        await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=10)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.iterations, arguments.rounds))
