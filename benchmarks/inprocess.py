"""Part 1: µs per request, the bare host app against the same app with the middleware."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    FIXED_COMPLETION,
    LARGE_COMPLETION,
    MODEL,
    ASGIApp,
    Message,
    Receive,
    Send,
    Timing,
    World,
    bench_settings,
    call,
    chat_body,
    compare,
    http_scope,
    json_headers,
    make_world,
    mock_host,
    trivial_host,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Scenario:
    name: str
    host: str  # "mock" (the example's mock upstream), "trivial" (a fixed completion) or "large"
    #            (the same with a ~100 KB answer)
    method: str
    path: str
    body: bytes
    key: str | None  # "world": the benchmark key; another string: that key
    expect: int  # the status the middleware's variant must answer
    target: str  # the target, printed beside the figure


def scenarios() -> list[Scenario]:
    chat = chat_body()
    return [
        Scenario("non-metered GET", "mock", "GET", "/health", b"", None, 200, "< 1 µs added"),
        Scenario(
            "metered JSON, trivial route",
            "trivial",
            "POST",
            "/v1/chat/completions",
            chat,
            "world",
            200,
            "≤ 20 µs added at p50 (issue 12)",
        ),
        Scenario(
            "metered JSON, 100 KB answer",
            "large",
            "POST",
            "/v1/chat/completions",
            chat,
            "world",
            200,
            "reading usage flat in the body's size",
        ),
        Scenario(
            "metered JSON, mock upstream",
            "mock",
            "POST",
            "/v1/chat/completions",
            chat,
            "world",
            200,
            "≤ 20 µs added at p50 (issue 12)",
        ),
        Scenario(
            "streamed (client asks usage)",
            "mock",
            "POST",
            "/v1/chat/completions",
            chat_body(stream=True),
            "world",
            200,
            "-",
        ),
        Scenario(
            "streamed (usage injected)",
            "mock",
            "POST",
            "/v1/chat/completions",
            chat_body(stream=True, include_usage=False),
            "world",
            200,
            "-",
        ),
        Scenario(
            "unknown key (401)",
            "mock",
            "POST",
            "/v1/chat/completions",
            chat,
            "sk-bm-not-a-key-of-ours",
            401,
            "-",
        ),
    ]


async def run(iterations: int, rounds: int, stream_iterations: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        engine = world.engine
        apps: dict[tuple[str, bool], ASGIApp] = {
            ("mock", False): mock_host(None),
            ("mock", True): mock_host(settings),
            ("trivial", False): trivial_host(None),
            ("trivial", True): trivial_host(settings),
            ("large", False): trivial_host(None, LARGE_COMPLETION),
            ("large", True): trivial_host(settings, LARGE_COMPLETION),
        }
        rows: list[dict[str, Any]] = []
        for s in scenarios():
            key = world.key if s.key == "world" else s.key
            headers = json_headers(s.body, key) if s.method == "POST" else []
            scope = http_scope(s.path, s.method, headers)
            bare, metered = apps[(s.host, False)], apps[(s.host, True)]
            answer = await call(metered, scope, s.body)
            if answer.status != s.expect:
                raise RuntimeError(f"{s.name}: expected {s.expect}, got {answer.status}")
            if s.key == "world" and b"x-budget-remaining" not in answer.headers:
                raise RuntimeError(f"{s.name}: the middleware did not meter the request")
            found = await compare(
                {"bare": (bare, scope, s.body), "middleware": (metered, scope, s.body)},
                stream_iterations if "stream" in s.name else iterations,
                rounds,
                between=engine.flush,
            )
            rows.append(_row(s, found["bare"], found["middleware"]))
        rows += await _routes(world, apps, iterations, rounds)
        await engine.shutdown()
        engine.store.dispose()
    return rows


async def _routes(
    world: World, apps: dict[tuple[str, bool], ASGIApp], iterations: int, rounds: int
) -> list[dict[str, Any]]:
    """Routes (SPEC §12): the trivial scenario again once a route exists (for another model),
    then a request naming a route whose first target's provider budget is spent."""
    engine = world.engine
    manager = engine.manager
    manager.put_provider("azure", budgets=[{"max_limit": 0}])
    manager.create_route(name="other-route", targets=["openai/gpt-4o"])
    manager.create_route(name="fast", targets=[f"azure/{MODEL}", f"openai/{MODEL}"])
    await engine.invalidate()
    rows = []
    bare, metered = apps[("trivial", False)], apps[("trivial", True)]
    chat = chat_body()
    routed = chat_body(model="fast")
    for name, body, target in (
        ("metered JSON, trivial route, routes exist", chat, "same as without routes"),
        ("metered via a route, 2nd target admitted", routed, "one admission more"),
    ):
        scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
        answer = await call(metered, scope, body)
        expected = b"openai/" + MODEL.encode() if body is routed else None
        if answer.status != 200 or answer.headers.get(b"x-budget-route") != expected:
            raise RuntimeError(f"{name}: {answer.status} {answer.headers}")
        found = await compare(
            {"bare": (bare, scope, chat), "middleware": (metered, scope, body)},
            iterations,
            rounds,
            between=engine.flush,
        )
        s = Scenario(name, "trivial", "POST", "/v1/chat/completions", body, "world", 200, target)
        rows.append(_row(s, found["bare"], found["middleware"]))
    return rows


def _row(s: Scenario, bare: Timing, metered: Timing) -> dict[str, Any]:
    return {
        "scenario": s.name,
        "host": s.host,
        "bare": bare.as_dict(),
        "middleware": metered.as_dict(),
        "added_p50_us": metered.median - bare.median,
        "added_p99_us": metered.p99 - bare.p99,
        "ratio_p50": metered.median / bare.median,
        "target": s.target,
    }


# -- calibration: the reference figures, measured on this machine ----------------------


class _Noop:
    """A pure ASGI middleware that does nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _ParseBoth:
    """A pure ASGI middleware that parses the request and the response JSON (the floor)."""

    def __init__(self, app: ASGIApp, loads: Callable[[bytes], Any]) -> None:
        self.app = app
        self.loads = loads

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        message = await receive()
        self.loads(message["body"])
        parts: list[bytes] = []

        async def replay() -> Message:
            return message

        async def watch(sent: Message) -> None:
            if sent["type"] == "http.response.body":
                parts.append(sent.get("body", b""))
            await send(sent)

        await self.app(scope, replay, watch)
        self.loads(b"".join(parts))


async def calibration(iterations: int, rounds: int) -> list[dict[str, Any]]:
    """A bare Starlette app and three reference middlewares around it (the issue's figures
    were measured the same way on the reference machine: compare them to scale the targets)."""

    async def chat(request: Request) -> Response:
        await request.body()
        return Response(FIXED_COMPLETION, media_type="application/json")

    starlette = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    variants: dict[str, ASGIApp] = {"bare Starlette": starlette}
    variants["no-op middleware"] = _Noop(starlette)
    variants["parse JSON (json)"] = _ParseBoth(starlette, json.loads)
    try:
        import orjson

        variants["parse JSON (orjson)"] = _ParseBoth(starlette, orjson.loads)
    except ImportError:
        pass
    body = chat_body()
    scope = http_scope("/v1/chat/completions", "POST", json_headers(body, None))
    prepared = {name: (app, scope, body) for name, app in variants.items()}
    found = await compare(prepared, iterations, rounds)
    bare = found["bare Starlette"].median
    reference = {
        "bare Starlette": "~8 µs",
        "no-op middleware": "< 1 µs added",
        "parse JSON (json)": "~10 µs added",
        "parse JSON (orjson)": "~5 µs added",
    }
    return [
        {
            "variant": name,
            "median_us": timing.median,
            "added_us": timing.median - bare if name != "bare Starlette" else 0.0,
            "reference": reference[name],
        }
        for name, timing in found.items()
    ]
