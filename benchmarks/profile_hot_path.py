"""Where the hot path's time goes: the profile behind benchmarks/README.md's analysis.

    .venv/bin/python benchmarks/profile_hot_path.py [--requests N]

For the in-process hot-path scenario (a metered JSON request, cached key, team and customer with
budgets and rate limits, the trivial route), it prints:

1. Python bytecodes executed per request, by function, for the bare app and with the middleware
   (a deterministic measure of the work: it does not depend on a noisy machine), and
2. cProfile's functions of the middleware by their own time over N requests.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from harness import (
    ASGIApp,
    bench_settings,
    call,
    chat_body,
    http_scope,
    json_headers,
    make_world,
    time_calls,
    trivial_host,
)

OURS = "budget_middleware"


def _where(frame: FrameType) -> str:
    code = frame.f_code
    name = code.co_filename
    for marker in ("site-packages/", "src/"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return f"{name}:{code.co_name}"


async def bytecodes(app: ASGIApp, scope: dict[str, Any], body: bytes, n: int) -> Counter[str]:
    """Bytecodes executed per request, by function, over n requests."""
    counts: Counter[str] = Counter()

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[_where(frame)] += 1
        return trace

    sys.settrace(trace)
    try:
        for _ in range(n):
            await time_calls(app, scope, body, 1)
    finally:
        sys.settrace(None)
    return Counter({name: round(count / n) for name, count in counts.items()})


async def main(requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-profile-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        body = chat_body()
        scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
        bare, metered = trivial_host(None), trivial_host(settings)
        for app in (bare, metered):
            for _ in range(200):  # warm: caches filled, the key loaded
                await call(app, scope, body)
        await world.engine.flush()

        base = await bytecodes(bare, scope, body, 20)
        with_mw = await bytecodes(metered, scope, body, 20)
        ours = {k: v for k, v in with_mw.items() if OURS in k}
        print("## Python bytecodes per request\n")
        print(f"- bare app: {sum(base.values()):,}")
        print(f"- with the middleware: {sum(with_mw.values()):,}")
        print(f"- in budget_middleware's own functions: {sum(ours.values()):,}\n")
        print("| bytecodes | function |\n|---:|---|")
        for name, count in sorted(ours.items(), key=lambda item: -item[1]):
            if count >= 10:
                print(f"| {count} | `{name}` |")

        profiler = cProfile.Profile()
        profiler.enable()
        await time_calls(metered, scope, body, requests)
        profiler.disable()
        await world.engine.flush()
        stats = pstats.Stats(profiler)
        rows = [
            (tottime, calls, f"{file.split(OURS + '/', 1)[-1]}:{function}")
            for (file, _line, function), (_, calls, tottime, _, _) in stats.stats.items()  # type: ignore[attr-defined]
            if OURS in file
        ]
        print(f"\n## cProfile, {requests:,} requests: the middleware's functions by own time\n")
        print("| own time µs/request | calls/request | function |\n|---:|---:|---|")
        for tottime, calls, name in sorted(rows, reverse=True)[:25]:
            print(f"| {tottime / requests * 1e6:.2f} | {calls / requests:g} | `{name}` |")
        await world.engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().requests))
