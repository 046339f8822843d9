"""What the adapters add to the shared core: Python bytecodes per call, by function.

    .venv/bin/python benchmarks/profile_adapters.py [--calls N] [--lines]

For one metered outbound call (an `httpx2.AsyncClient` posting a chat completion through
`BudgetTransport` around `httpx2.MockTransport`, paid by `charge_to` a cached key, as part 5 of
`run.py` calls) and one metered WSGI request (the Flask app of part 6 around
`BudgetWSGIMiddleware`, a raw WSGI call: bare, then with callers noted as once a
`BudgetSyncTransport` exists), it prints the bytecodes executed per call in budget_middleware's
functions: in all, in the adapter's own module (`outbound/`, `wsgi/`), and by function (by
line with `--lines`). A
deterministic measure of the work, where the noisy machine's µs are not.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2
from harness import bench_settings, chat_body, make_world
from outbound import _provider
from profile_hot_path import OURS, _where
from wsgi import _environ, _one, _world, flask_app

from budget_middleware import get_engine
from budget_middleware.engine.portal import on_loop


class Tracer:
    """Bytecodes executed, by function, in the calling thread while `on` is set."""

    def __init__(self, lines: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False
        self.lines = lines  # by line, not by function

    def trace(self, frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode" and self.on:
            where = _where(frame)
            self.counts[f"{where}:{frame.f_lineno}" if self.lines else where] += 1
        return self.trace

    def per_call(self, n: int) -> Counter[str]:
        per = Counter({name: round(count / n) for name, count in self.counts.items()})
        self.counts.clear()
        return per


def report(title: str, bare: Counter[str], counts: Counter[str], own: str) -> None:
    ours = {k: v for k, v in counts.items() if OURS in k}
    adapter = {k: v for k, v in ours.items() if f"{OURS}/{own}/" in k}
    print(f"## {title}: Python bytecodes per call\n")
    print(f"- bare (no adapter): {sum(bare.values()):,}")
    print(f"- with the adapter, in all (the client or app included): {sum(counts.values()):,}")
    print(f"- added, in all: {sum(counts.values()) - sum(bare.values()):,}")
    print(f"- in budget_middleware's functions: {sum(ours.values()):,}")
    print(f"- in the adapter's own (`{own}/`): {sum(adapter.values()):,}\n")
    print("| bytecodes | function |\n|---:|---|")
    for name, count in sorted(ours.items(), key=lambda item: -item[1]):
        if count >= 5:
            print(f"| {count} | `{name}` |")
    # What the adapter makes the client or the app do beyond a bare call (a header read, a
    # response built): by function, the difference.
    others = {k: counts[k] - bare.get(k, 0) for k in counts if OURS not in k}
    print("\n| bytecodes added | function outside budget_middleware |\n|---:|---|")
    for name, count in sorted(others.items(), key=lambda item: -item[1]):
        if count >= 5:
            print(f"| {count} | `{name}` |")
    print()


async def outbound_call(calls: int, lines: bool) -> tuple[Counter[str], Counter[str]]:
    """Bare, then metered."""
    from budget_middleware import BudgetTransport, charge_to

    with tempfile.TemporaryDirectory(prefix="bm-profile-") as directory:
        world = await make_world(bench_settings(Path(directory)))
        body = chat_body()
        bare = httpx2.AsyncClient(transport=httpx2.MockTransport(_provider))
        metered = httpx2.AsyncClient(
            transport=BudgetTransport(httpx2.MockTransport(_provider), engine=world.engine)
        )
        url = "https://api.openai.com/v1/chat/completions"
        tracer = Tracer(lines)
        found = []
        with charge_to(virtual_key=world.key):
            for client in (bare, metered):
                for _ in range(200):  # warm: caches filled, the key loaded
                    (await client.post(url, content=body)).read()
                await world.engine.flush()
                sys.settrace(tracer.trace)
                try:
                    for _ in range(calls):
                        tracer.on = True
                        answer = await client.post(url, content=body)
                        answer.read()
                        tracer.on = False
                finally:
                    sys.settrace(None)
                found.append(tracer.per_call(calls))
                await client.aclose()
        await world.engine.shutdown()
        world.engine.store.dispose()
    return found[0], found[1]


def wsgi_request(calls: int, noted: bool, lines: bool) -> tuple[Counter[str], Counter[str]]:
    """Bare, then metered. Called from a thread that runs no event loop (the engine runs in
    the background loop)."""
    from budget_middleware.outbound.payer import noting

    with tempfile.TemporaryDirectory(prefix="bm-profile-") as directory:
        engine = get_engine(bench_settings(Path(directory)))
        key = _world(engine)
        body = chat_body()
        environ = _environ("POST", "/v1/chat/completions", body, key)
        tracer = Tracer(lines)
        found = []
        noting.active = noted
        try:
            for with_middleware in (None, engine):
                app: Callable[..., Any] = flask_app(with_middleware).wsgi_app
                for _ in range(200):  # warm
                    _one(app, environ, body)
                on_loop(engine, engine.flush)
                sys.settrace(tracer.trace)
                try:
                    for _ in range(calls):
                        fresh = {**environ, "wsgi.input": io.BytesIO(body)}
                        tracer.on = True
                        result = app(fresh, lambda status, headers, exc_info=None: None)
                        for _chunk in result:
                            pass
                        result.close()
                        tracer.on = False
                finally:
                    sys.settrace(None)
                found.append(tracer.per_call(calls))
        finally:
            noting.active = False
        on_loop(engine, engine.shutdown)
        engine.store.dispose()
    return found[0], found[1]


def main(calls: int, lines: bool) -> None:
    report("Outbound: one metered call", *asyncio.run(outbound_call(calls, lines)), "outbound")
    report("WSGI: one metered request", *wsgi_request(calls, False, lines), "wsgi")
    report("WSGI: one metered request, callers noted", *wsgi_request(calls, True, lines), "wsgi")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--lines", action="store_true", help="by line, not by function")
    args = parser.parse_args()
    main(args.calls, args.lines)
