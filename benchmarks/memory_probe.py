"""RSS of a fresh host process, with or without the middleware (run by scaling.py as a child).

    python benchmarks/memory_probe.py DATABASE_URL KEY CACHED [--bare]

Prints one JSON line: the process's RSS after startup and 200 hot-path requests, and, with the
middleware, after caching CACHED keys of the store (the benchmark's bulk keys).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys

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


async def main(url: str, key: str, cached: int, bare: bool) -> dict[str, float]:
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

    settings = bench_settings(Path("."), database_url=url)
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
    return {"rss_mb": rss_mb(), "rss_before_cache_mb": started, "cached_keys": len(engine.keys),
            "bulk_cached": count}  # fmt: skip


if __name__ == "__main__":
    url, key, cached = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(asyncio.run(main(url, key, cached, "--bare" in sys.argv))))
