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

`Least` does the same work as `Essential` with none of the package's code: the least plain Python
that does it, written as one function over counters flattened into three tuples (a key's request
windows, token windows and budgets), its price and its header texts prepared once. It is what
Python itself costs for the work, without this core's objects and calls; what `Essential` adds
beyond it is the price of the core's structure (its functions, tickets, ledger and records).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from hashlib import sha256
from math import ceil
from pathlib import Path
from time import perf_counter, time
from typing import Any

import orjson
from harness import (
    FIXED_COMPLETION,
    ROOT,
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
from http_load import HERE, SERVERS, _summary, measured, world_env
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


class _Window:
    """A counter of `Least`: a window's end, limit, value and what requests in flight hold."""

    __slots__ = ("end", "length", "limit", "limit_text", "reserved", "value")

    def __init__(self, limit: int, length: float) -> None:
        self.limit, self.limit_text, self.length = limit, b"%d" % limit, length
        self.value = self.reserved = 0
        self.end = (time() // length + 1) * length

    def roll(self, now: float) -> None:
        self.value = 0
        self.end = (now // self.length + 1) * self.length


class _Flat:
    """A key as `Least` keeps it: its owners' ids and its seven counters, flattened by kind."""

    __slots__ = ("budgets", "customer", "id", "requests", "team", "tokens")

    def __init__(self) -> None:
        self.id, self.team, self.customer = "key", "team", "customer"
        self.requests = (_Window(10**9, 60), _Window(10**9, 60))  # the team's and the key's
        self.tokens = (_Window(10**12, 86_400), _Window(10**12, 86_400))
        self.budgets = tuple(_Window(10**15, 86_400) for _ in range(3))  # customer, team, key
        for budget in self.budgets:  # in dollars, as SPEC §8 shows a budget (nano-dollars here)
            budget.limit_text = b"%d.%06d" % divmod(budget.limit // 1000, 1_000_000)


_PRICES = {"gpt-4o-mini": (150, 600)}  # nano-dollars a token: input, output
_LIMIT_NAMES = (
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-reset-requests",
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-tokens",
    b"x-budget-limit",
    b"x-budget-remaining",
)


class Least:
    """`Essential`'s work in the least plain Python, none of the package's code (see the module's
    text): what Python itself costs for it."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.keys = {sha256(key.encode()).digest(): _Flat()}
        self.records: list[tuple[Any, ...]] = []

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(_SUFFIXES):
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        key = self.keys[sha256(dict(scope["headers"])[b"authorization"][7:]).digest()]
        first = await receive()
        body = first["body"]
        request = orjson.loads(body)
        model = request["model"]
        per_input, per_output = _PRICES[model]
        estimate = (len(body) // 3 + 1) * per_input + (
            request.get("max_tokens") or 4096
        ) * per_output
        now = time()
        tight: list[Any] = []
        for kind in (key.requests, key.tokens):
            least = None
            least_left = 0
            for counter in kind:
                if now >= counter.end:
                    counter.roll(now)
                left = counter.limit - counter.value
                assert left > 0  # (a refusal's answer is not this script's)
                if least is None or left < least_left:
                    least, least_left = counter, left
            tight += (least, least_left)
        budget = None
        budget_left = 0
        for counter in key.budgets:
            if now >= counter.end:
                counter.roll(now)
            left = counter.limit - counter.value
            assert left > 0 and estimate + counter.reserved <= left
            if budget is None or left < budget_left:
                budget, budget_left = counter, left
        for counter in key.requests:
            counter.value += 1
        for counter in key.budgets:
            counter.reserved += estimate
        requests, requests_left, tokens, tokens_left = tight
        replayed = False
        status = 0
        parts: list[bytes] = []
        records = self.records

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
                n = _LIMIT_NAMES
                added = [
                    (n[0], requests.limit_text),
                    (n[1], b"%d" % (requests_left - 1)),
                    (n[2], b"%ds" % ceil(requests.end - now)),
                    (n[3], tokens.limit_text),
                    (n[4], b"%d" % tokens_left),
                    (n[5], b"%ds" % ceil(tokens.end - now)),
                    (n[6], budget.limit_text),  # type: ignore[union-attr]
                    (n[7], b"%d.%06d" % divmod(budget_left // 1000, 1_000_000)),
                ]
                await send({**message, "headers": [*message["headers"], *added]})
                return
            chunk = message.get("body", b"")
            if message.get("more_body"):
                parts.append(chunk)
                await send(message)
                return
            await send(message)
            usage = orjson.loads(b"".join(parts) + chunk if parts else chunk)["usage"]
            input_tokens, output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            cost = input_tokens * per_input + output_tokens * per_output
            duration = (perf_counter() - started) * 1000
            records.append(
                (
                    now,
                    key.id,
                    key.team,
                    key.customer,
                    "openai",
                    model,
                    input_tokens,
                    output_tokens,
                    cost,
                    status,
                    duration,
                )
            )
            for counter in key.budgets:
                counter.reserved -= estimate
                counter.value += cost
            tokens_used = input_tokens + output_tokens
            for counter in key.tokens:
                counter.value += tokens_used

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
        least_fastapi = trivial_host(None)
        least_fastapi.add_middleware(Least, key=world.key)
        apps: dict[str, ASGIApp] = {
            "bare Starlette (calibration)": bare_starlette(),
            "raw ASGI app": raw_app,
            "raw + Least": Least(raw_app, world.key),
            "raw + Essential": Essential(raw_app, engine),
            "raw + BudgetMiddleware": BudgetMiddleware(raw_app, settings=settings),
            "FastAPI trivial route": trivial_host(None),
            "FastAPI + Least": least_fastapi,
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
            for variant in ("Least", "Essential", "BudgetMiddleware"):
                median = timings[f"{prefix} + {variant}"].median
                added = median - base
                ratio = added / calibration
                print(
                    f"| {prefix} + {variant} | {median:.1f} | {added:.1f} | {ratio:.2f}x "
                    f"| {ratio * 8:.1f} µs |"
                )
        print("\nThe issue's target: ≤ 20 µs added at the reference (2.5x bare Starlette).")
        await engine.shutdown()


async def over_http(repeats: int, duration: float) -> None:
    """The example app under uvicorn (one worker), bare, with `Least` in front of it
    (`floor_app.py`) and with `BudgetMiddleware`, driven as part 2 drives it, runs alternated."""
    with tempfile.TemporaryDirectory(prefix="bm-floor-http-") as directory:
        key, env = await world_env(directory)
        env["BENCH_KEY"] = key
        variants: dict[str, tuple[bool, str, Path]] = {
            "bare": (False, "app:app", ROOT / "examples"),
            "Least": (False, "floor_app:app", HERE),
            "BudgetMiddleware": (True, "app:app", ROOT / "examples"),
        }
        print("| server | app | req/s | of bare | loop thread µs a request |")
        print("|---|---|---:|---:|---:|")
        for server in SERVERS:
            found: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for _ in range(repeats):
                for name, (middleware, app, app_dir) in variants.items():
                    run = measured(server, middleware, env, key, 32, duration, app, app_dir)
                    assert run["non_2xx"] == 0, (name, run)
                    found[name].append(run)
            bare = _summary(found["bare"])["rps"]
            for name, runs in found.items():
                summary = _summary(runs)
                print(
                    f"| {server} | {name} | {summary['rps']:,.0f} | {summary['rps'] / bare:.0%} "
                    f"| {summary['loop_cpu_us']:.1f} |"
                )
        print("\nIssue 12's target over HTTP: ≥ 85 % of the bare app's requests a second.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--http", action="store_true", help="over HTTP under uvicorn instead (needs wrk or loadgen)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="--http: runs of each app")
    parser.add_argument("--duration", type=float, default=8, help="--http: seconds a run")
    arguments = parser.parse_args()
    if arguments.http:
        asyncio.run(over_http(arguments.repeats, arguments.duration))
    else:
        asyncio.run(main(arguments.iterations, arguments.rounds))
