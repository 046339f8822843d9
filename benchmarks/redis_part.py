"""Part 4: what shared counters in Redis add to the hot path, and how many commands they send.

Runs when `budget_middleware.store.redis_counters` exists and Redis answers at 127.0.0.1:6379 (its
database 14, so other databases are not touched).
"""

from __future__ import annotations

import importlib.util
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    ASGIApp,
    World,
    bench_settings,
    call,
    chat_body,
    compare,
    http_scope,
    json_headers,
    make_world,
    trivial_host,
)

from budget_middleware.core.admission import Ticket

REDIS_URL = "redis://127.0.0.1:6379/14"


def unavailable() -> str | None:
    """Why the Redis part cannot run, or None."""
    if importlib.util.find_spec("budget_middleware.store.redis_counters") is None:
        return "budget_middleware.store.redis_counters is not there yet"
    if importlib.util.find_spec("redis") is None:
        return "the redis client is not installed (pip install 'budget-middleware[redis]')"
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return "127.0.0.1:6379 is not a Redis server"
    except OSError:
        return "no Redis server at 127.0.0.1:6379"
    return None


class RoundTrips:
    """Counts what the client sends to Redis: one `send_packed_command` per round trip (a
    pipeline or a script call is one)."""

    def __init__(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.cls = AbstractConnection
        self.original = AbstractConnection.send_packed_command
        self.count = 0

    def __enter__(self) -> RoundTrips:
        original = self.original

        async def counted(connection: Any, *args: Any, **kwargs: Any) -> None:
            self.count += 1
            await original(connection, *args, **kwargs)

        self.cls.send_packed_command = counted  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.send_packed_command = self.original  # type: ignore[method-assign]


async def _direct(world: World, n: int) -> dict[str, float]:
    """µs of `engine.admit` and of `engine.settle` alone, for the hot key's scopes."""
    engine = world.engine
    config = await engine.lookup_key(world.key)
    scopes = engine.limits_for(config, "openai", "gpt-4o-mini", ())
    admit = settle = 0.0
    for _ in range(n):
        start = time.perf_counter()
        ticket = await engine.admit(scopes, 1000)
        middle = time.perf_counter()
        assert isinstance(ticket, Ticket), ticket
        await engine.settle(ticket, 900, 40)
        settle += time.perf_counter() - middle
        admit += middle - start
    return {"admit_us": admit / n * 1e6, "settle_us": settle / n * 1e6}


async def run(iterations: int, rounds: int) -> dict[str, Any]:
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    body = chat_body()
    with tempfile.TemporaryDirectory(prefix="bm-redis-") as directory:
        for sub in ("m", "r"):
            (Path(directory) / sub).mkdir()
        memory = await make_world(bench_settings(Path(directory) / "m"), "memory")
        shared = await make_world(
            bench_settings(Path(directory) / "r", redis_url=REDIS_URL), "redis"
        )
        apps: dict[str, tuple[ASGIApp, dict[str, Any], bytes]] = {}
        for name, world in (("memory", memory), ("redis", shared)):
            scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
            app = trivial_host(world.settings)
            answer = await call(app, scope, body)
            if answer.status != 200:
                raise RuntimeError(f"{name}: the hot path answered {answer.status}")
            apps[name] = (app, scope, body)

        async def flush() -> None:
            await memory.engine.flush()
            await shared.engine.flush()

        found = await compare(apps, iterations, rounds, between=flush)
        n = 500
        hot, scope, body = apps["redis"]
        with RoundTrips() as trips:
            for _ in range(n):
                await call(hot, scope, body)
        direct = {
            "memory": await _direct(memory, 2000),
            "redis": await _direct(shared, 2000),
        }
        for world in (memory, shared):
            await world.engine.shutdown()
            world.engine.store.dispose()
    return {
        "memory_p50_us": found["memory"].median,
        "redis_p50_us": found["redis"].median,
        "redis_p99_us": found["redis"].p99,
        "added_by_redis_p50_us": found["redis"].median - found["memory"].median,
        "round_trips_per_request": trips.count / n,
        "admit_us": direct["redis"]["admit_us"],
        "settle_us": direct["redis"]["settle_us"],
        "memory_admit_us": direct["memory"]["admit_us"],
        "memory_settle_us": direct["memory"]["settle_us"],
        "target": "one round trip to admit, one to settle",
    }
