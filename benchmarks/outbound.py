"""Part "outbound": the CPU `BudgetTransport` adds to a provider call, beside a bare client.

The same `httpx2.AsyncClient` calls a fixed completion through `httpx2.MockTransport` (no socket,
so httpx's own share is as small as it gets and the transport's share as large), with and
without `BudgetTransport` around it; CPU time (`time.process_time`) per call, interleaved rounds.
The issue's yardstick is httpx's own CPU per real call (~0.8-0.9 ms with sockets).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
from harness import FIXED_COMPLETION, bench_settings, chat_body, make_world

from budget_middleware import BudgetTransport, charge_to


def _provider(request: httpx2.Request) -> httpx2.Response:
    # Unread, as a real transport's answer is (`content=` would give one read already).
    return httpx2.Response(
        200,
        stream=httpx2.ByteStream(FIXED_COMPLETION),
        headers={"content-type": "application/json", "content-length": str(len(FIXED_COMPLETION))},
    )


async def _cpu_per_call(client: httpx2.AsyncClient, body: bytes, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        answer = await client.post("https://api.openai.com/v1/chat/completions", content=body)
        answer.read()
    return (time.process_time() - started) / n * 1e6


async def run(n: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        engine = world.engine
        body = chat_body()
        bare = httpx2.AsyncClient(transport=httpx2.MockTransport(_provider))
        metered = httpx2.AsyncClient(
            transport=BudgetTransport(httpx2.MockTransport(_provider), engine=engine)
        )
        samples: dict[str, list[float]] = {"bare": [], "metered": []}
        with charge_to(virtual_key=world.key):
            for client in (bare, metered):
                await _cpu_per_call(client, body, 300)  # warm-up
            for _ in range(rounds):
                for name, client in (("bare", bare), ("metered", metered)):
                    samples[name].append(await _cpu_per_call(client, body, n // rounds))
                await engine.flush()
        await bare.aclose()
        await metered.aclose()
        await engine.shutdown()
        engine.store.dispose()
    bare_us = min(samples["bare"])
    metered_us = min(samples["metered"])
    return {
        "bare_cpu_us": bare_us,
        "metered_cpu_us": metered_us,
        "added_us": metered_us - bare_us,
        "ratio": metered_us / bare_us,
        "added_vs_real_httpx_call_pct": (metered_us - bare_us) / 850 * 100,
    }
