"""RSS of a fresh host process, with or without the middleware (run by scaling.py as a child).

    python benchmarks/memory_probe.py DATABASE_URL KEY CACHED [--bare] [--after SECONDS]

Prints one JSON line: the process's RSS after startup and 200 hot-path requests, and, with the
middleware, after caching CACHED keys of the store (the benchmark's bulk keys). With `--after`,
also after SECONDS more of serving (ten requests a second, the flusher writing every second),
when the engine's background work that waits past start-up (the alerts' sweep, a minute in)
has run too: the steady state, sampled every 15 s.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from typing import Any

from harness import (
    World,
    bench_settings,
    call,
    chat_body,
    http_scope,
    json_headers,
    rss_mb,
    trivial_host,
)


async def main(url: str, key: str, cached: int, bare: bool, after: float) -> dict[str, Any]:
    from pathlib import Path

    body = chat_body()
    scope = http_scope("/v1/chat/completions", "POST", json_headers(body, key))
    if bare:
        app = trivial_host(None)
        for _ in range(200):
            await call(app, scope, body)
        gc.collect()
        return {"rss_mb": rss_mb()}
    from scaling import cache_bulk

    from budget_middleware import get_engine

    # Serving on (`--after`): the flusher writes every second, as by default, not once an hour
    # (the benchmark's setting, which would hold every record of the wait in memory).
    steady = {"flush_interval_seconds": 1.0} if after > 0 else {}
    settings = bench_settings(Path("."), database_url=url, **steady)
    engine = get_engine(settings)
    await engine.ensure_started()
    app = trivial_host(settings)
    for _ in range(200):
        await call(app, scope, body)
    await engine.flush()
    gc.collect()
    started = rss_mb()
    world = World(settings, engine, key, "", "")
    count = await cache_bulk(engine, world, cached)
    for _ in range(200):
        await call(app, scope, body)
    await engine.flush()
    gc.collect()
    found: dict[str, Any] = {
        "rss_mb": rss_mb(),
        "rss_before_cache_mb": started,
        "cached_keys": len(engine.keys),
        "bulk_cached": count,
    }
    if after > 0:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        samples: list[tuple[float, float]] = []
        while loop.time() < begun + after:
            await call(app, scope, body)
            await asyncio.sleep(0.1)
            if loop.time() >= begun + 15 * (len(samples) + 1):
                samples.append((round(loop.time() - begun), rss_mb()))
        await engine.flush()
        gc.collect()
        found["rss_after_mb"] = rss_mb()
        found["rss_samples"] = samples
        found["after_seconds"] = after
    return found


if __name__ == "__main__":
    url, key, cached = sys.argv[1], sys.argv[2], int(sys.argv[3])
    after = float(sys.argv[sys.argv.index("--after") + 1]) if "--after" in sys.argv else 0.0
    print(json.dumps(asyncio.run(main(url, key, cached, "--bare" in sys.argv, after))))
