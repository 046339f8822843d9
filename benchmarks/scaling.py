"""Part 3: the hot path against the size of the store and the number of applicable scopes;
memory per 10,000 cached keys; the flusher's cost.

Keys are bulk-inserted with SQLAlchemy Core (each with its own budget and rate limit, under the
benchmark team); caching 10,000 of them reads their rows in three queries and builds their
configurations exactly as a first request of each would (`ScopeBuilder.key`, the limits resolved
for the request's target, `KeyCache.put`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
from harness import (
    BIG_BUDGET,
    MODEL,
    UNLIMITED_RATE,
    World,
    bench_settings,
    chat_body,
    compare,
    http_scope,
    json_headers,
    make_world,
    time_calls,
    trivial_host,
)
from sqlalchemy import insert
from sqlmodel import Session, col, select

from budget_middleware.engine.engine import BudgetEngine, hash_key
from budget_middleware.store.database import KeyRecord, OwnerLimits
from budget_middleware.store.tables import BudgetRow, RateLimitRow, VirtualKeyRow

PREFIX = "sk-bm-bulk"


def bulk_value(i: int) -> str:
    return f"{PREFIX}{i:08d}"


def bulk_insert(engine: BudgetEngine, team_id: str, start: int, stop: int) -> None:
    """Keys start..stop-1, each with a budget and a rate limit, in batches."""
    now = datetime.now(UTC)
    stamp = {"source": "manual", "config_hash": None, "created_at": now, "updated_at": now}
    with engine.store.engine.begin() as conn:
        for low in range(start, stop, 5000):
            keys: list[dict[str, Any]] = []
            budgets: list[dict[str, Any]] = []
            rates: list[dict[str, Any]] = []
            for i in range(low, min(low + 5000, stop)):
                key_id = uuid.uuid4().hex
                value = bulk_value(i)
                keys.append(
                    {
                        "id": key_id,
                        "name": f"bulk-{i}",
                        "key_hash": hashlib.sha256(value.encode()).hexdigest(),
                        "key_display": f"{value[:6]}...{value[-4:]}",
                        "team_id": team_id,
                        "customer_id": None,
                        "is_active": True,
                        "expires_at": None,
                        "tags": [],
                        "calendar_aligned": False,
                        **stamp,
                    }
                )
                budgets.append(
                    {
                        "id": uuid.uuid4().hex,
                        "owner_type": "virtual_key",
                        "owner_id": key_id,
                        "max_limit_nanos": 10**15,
                        "reset_duration": "1d",
                        "calendar_aligned": False,
                        "current_usage_nanos": 0,
                        "last_reset": now,
                        **stamp,
                    }
                )
                rates.append(
                    {
                        "id": uuid.uuid4().hex,
                        "owner_type": "virtual_key",
                        "owner_id": key_id,
                        "request_current_usage": 0,
                        "request_last_reset": now,
                        "token_current_usage": 0,
                        "token_last_reset": now,
                        "max_concurrent_requests": None,
                        **UNLIMITED_RATE,
                        **stamp,
                    }
                )
            conn.execute(insert(VirtualKeyRow), keys)
            conn.execute(insert(BudgetRow), budgets)
            conn.execute(insert(RateLimitRow), rates)


def _read_bulk(engine: BudgetEngine, world: World, offset: int, count: int) -> list[KeyRecord]:
    base = engine.store.load_key(hash_key(world.key))
    assert base is not None
    shared = {owner: limits for owner, limits in base.limits.items() if owner[0] != "virtual_key"}
    with Session(engine.store.engine) as s:
        keys = list(
            s.exec(
                select(VirtualKeyRow)
                .where(col(VirtualKeyRow.name).like("bulk-%"))
                .order_by(col(VirtualKeyRow.id))
                .offset(offset)
                .limit(count)
            )
        )
        ids = [k.id for k in keys]
        limits: dict[str, OwnerLimits] = {i: OwnerLimits() for i in ids}
        for low in range(0, len(ids), 500):
            chunk = ids[low : low + 500]
            for budget in s.exec(select(BudgetRow).where(col(BudgetRow.owner_id).in_(chunk))):
                limits[budget.owner_id].budgets.append(budget)
            for rate in s.exec(select(RateLimitRow).where(col(RateLimitRow.owner_id).in_(chunk))):
                limits[rate.owner_id].rate_limit = rate
    return [
        KeyRecord(
            k, base.team, base.customer, [], [], {**shared, ("virtual_key", k.id): limits[k.id]}
        )
        for k in keys
    ]


async def cache_bulk(engine: BudgetEngine, world: World, count: int) -> int:
    """Cache `count` bulk keys, 100 at a time: a server reads keys one by one, so its memory
    holds the configurations, not thousands of rows at once. Each is resolved for the hot-path
    target, as the key's first request would, so its memory counts what a used key holds.

    100 at a time leaves what one by one through `engine.lookup_key` leaves (1,418 against
    1,405 bytes of RSS a key, measured) in a twentieth of the time; 500 at a time left the
    ORM rows of each batch between the keys' objects (2,030 bytes a key)."""
    done = 0
    while done < count:
        records = await anyio.to_thread.run_sync(
            _read_bulk, engine, world, done, min(100, count - done)
        )
        if not records:
            break
        for record in records:
            config = engine.builder.key(record)
            # as its first request would: the limits of the benchmark's target, resolved
            config.resolve(engine.globals, "openai", MODEL, ())
            engine.keys.put(bytes.fromhex(record.key.key_hash), config)
        done += len(records)
    return done


async def _hot_path(
    world: World, iterations: int, rounds: int, headers: Sequence[tuple[bytes, bytes]] = (),
    key: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    body = chat_body()
    scope = http_scope(
        "/v1/chat/completions", "POST", [*json_headers(body, key or world.key), *headers]
    )
    bare, metered = trivial_host(None), trivial_host(world.settings)
    found = await compare(
        {"bare": (bare, scope, body), "middleware": (metered, scope, body)},
        iterations,
        rounds,
        between=world.engine.flush,
    )
    return {
        "middleware_p50_us": found["middleware"].median,
        "middleware_p99_us": found["middleware"].p99,
        "added_p50_us": found["middleware"].median - found["bare"].median,
    }


async def run(iterations: int, rounds: int, steady: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bm-scale-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings, "scale")
        engine = world.engine
        out["scopes"] = await _scopes(world, iterations, rounds)
        out["keys"] = await _keys(world, iterations, rounds)
        out["memory"] = _memory(world, steady)
        out["flush_dirty_counters"] = await _flush_counters(world, 10_000)
        out["flush_usage_records"] = await _flush_records(world, 10_000)
        await engine.shutdown()
        engine.store.dispose()
    return out


async def _scopes(world: World, iterations: int, rounds: int) -> list[dict[str, Any]]:
    """1 scope (a key alone), 10 and 50 (key, team, customer and tags with budgets)."""
    engine = world.engine
    manager = engine.manager
    solo = manager.create_virtual_key(
        name="scale-solo", budgets=BIG_BUDGET, rate_limit=UNLIMITED_RATE
    )
    for i in range(47):
        manager.put_tag(f"bench-tag-{i}", budgets=BIG_BUDGET)
    await engine.invalidate()
    cases = [
        (1, solo.value, ()),
        (10, world.key, tuple(f"bench-tag-{i}" for i in range(7))),
        (50, world.key, tuple(f"bench-tag-{i}" for i in range(47))),
    ]
    rows = []
    for count, key, tags in cases:
        headers = [(b"x-budget-tags", ",".join(tags).encode())] if tags else []
        rows.append({"scopes": count, **await _hot_path(world, iterations, rounds, headers, key)})
    return rows


async def _keys(world: World, iterations: int, rounds: int) -> list[dict[str, Any]]:
    """10, 10,000 (all cached) and 100,000 keys in the store."""
    engine = world.engine
    rows: list[dict[str, Any]] = []
    inserted = 0
    for total, cache in ((10, False), (10_000, True), (100_000, False)):
        started = time.perf_counter()
        await anyio.to_thread.run_sync(bulk_insert, engine, world.team_id, inserted, total - 1)
        inserted = total - 1  # and the benchmark key
        row: dict[str, Any] = {"keys_in_store": total, "insert_s": time.perf_counter() - started}
        if cache:
            started = time.perf_counter()
            await cache_bulk(engine, world, total - 1)
            row["cache_fill_s"] = time.perf_counter() - started
        row["cached_keys"] = len(engine.keys)
        row.update(await _hot_path(world, iterations, rounds))
        rows.append(row)
    for row in rows:
        row["vs_10_keys"] = row["middleware_p50_us"] / rows[0]["middleware_p50_us"]
    return rows


def _memory(world: World, steady: float) -> dict[str, Any]:
    """RSS of fresh processes: the bare host, and the host with the middleware, 10,000 cached
    keys and the 100,000 keys of the store (and, with `steady`, that many seconds later)."""
    probe = [sys.executable, str(Path(__file__).with_name("memory_probe.py"))]
    args = [world.settings.database_url, world.key, "9999"]

    def measure(*extra: str) -> dict[str, Any]:
        done = subprocess.run([*probe, *args, *extra], capture_output=True, text=True, check=True)
        found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return found

    bare = measure("--bare")
    metered = measure("--after", str(steady)) if steady > 0 else measure()
    found = {
        "bare_rss_mb": bare["rss_mb"],
        "middleware_rss_mb": metered["rss_mb"],
        "added_mb": metered["rss_mb"] - bare["rss_mb"],
        "cached_keys": metered["cached_keys"],
        "per_10k_cached_keys_mb": (metered["rss_mb"] - metered["rss_before_cache_mb"])
        * 10_000
        / max(metered["bulk_cached"], 1),
    }
    if steady > 0:
        found["middleware_rss_steady_mb"] = metered["rss_after_mb"]
        found["steady_seconds"] = steady
        found["steady_samples"] = metered["rss_samples"]  # (seconds, RSS MB) every 15 s
    return found


async def _flush_counters(world: World, count: int) -> dict[str, Any]:
    """Flush `count` dirty budget counters (one charge on each of `count` cached keys)."""
    engine = world.engine
    await engine.flush()
    dirty = 0
    for config in engine.keys.values():
        for scope in config.hierarchy:
            if scope.type == "virtual_key" and dirty < count:
                for counter in scope.budgets:
                    counter.add(1000, engine.registry.ledger)
                    dirty += 1
    started = time.perf_counter()
    await engine.flush()
    return {"counters": dirty, "ms": (time.perf_counter() - started) * 1e3}


async def _flush_records(world: World, count: int) -> dict[str, Any]:
    """Flush `count` usage records made by real requests."""
    engine = world.engine
    await engine.flush()
    body = chat_body()
    scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
    app = trivial_host(world.settings)
    await time_calls(app, scope, body, count)
    records = len(engine.records)
    started = time.perf_counter()
    await engine.flush()
    elapsed = time.perf_counter() - started
    return {"records": records, "ms": elapsed * 1e3, "us_per_record": elapsed * 1e6 / records}
