"""BUDGET_REDIS_TIMEOUT_SECONDS: the socket (and connect) timeout of every Redis call; a call past
it counts as Redis being unreachable (503, or admitted under BUDGET_FAIL_OPEN)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest

from budget_middleware import BudgetSettings
from budget_middleware.core.admission import Ticket
from budget_middleware.store.redis_counters import RedisCounters
from service_support import private_redis
from support import chat, client, engine_of, host_app, running

pytestmark = pytest.mark.services

Settings = Callable[..., BudgetSettings]


async def test_the_redis_client_uses_the_configured_timeout(make_settings: Settings) -> None:
    with private_redis() as server:
        app = host_app(make_settings(redis_url=server.url, redis_timeout_seconds=0.25))
        engine = engine_of(app)
        async with running(app):
            counters = engine.counters
            assert isinstance(counters, RedisCounters) and counters.client is not None
            kwargs = counters.client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == 0.25
            assert kwargs["socket_connect_timeout"] == 0.25


@pytest.mark.parametrize(("fail_open", "status"), [(False, 503), (True, 200)])
async def test_a_stalled_redis_counts_as_unreachable_after_the_timeout(
    make_settings: Settings, fail_open: bool, status: int
) -> None:
    with private_redis() as server:
        app = host_app(
            make_settings(redis_url=server.url, redis_timeout_seconds=0.2, fail_open=fail_open)
        )
        engine = engine_of(app)
        async with running(app), client(app) as http:
            key = engine.manager.create_virtual_key(
                name="alice", rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"}
            )
            await engine.invalidate()
            headers = {"x-budget-key": key.value or ""}
            first = await http.post("/v1/chat/completions", json=chat(), headers=headers)
            assert first.status_code == 200
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)  # it accepts connections, answers nothing
            try:
                stalled = await http.post("/v1/chat/completions", json=chat(), headers=headers)
            finally:
                server.process.send_signal(signal.SIGCONT)
        assert stalled.status_code == status
        if status == 503:
            assert stalled.json()["error"]["code"] == "service_unavailable"


async def test_a_request_settled_while_redis_stalls_frees_its_slot_once_redis_answers(
    make_settings: Settings,
) -> None:
    """SPEC §6: a concurrency slot counts until the response ends, however it ends. A request
    that ended while Redis answered nothing kept its slot (and reservation) there until they
    expired (`BUDGET_SLOT_TTL_SECONDS`): a key allowed one request at a time was refused
    `concurrency_limit_exceeded` with nothing in flight. They are released when Redis
    answers again."""
    with private_redis() as server:
        settings = make_settings(
            redis_url=server.url, redis_timeout_seconds=0.2, flush_interval_seconds=0.05
        )
        app = host_app(settings)
        engine = engine_of(app)
        async with running(app):
            key = engine.manager.create_virtual_key(
                name="alice",
                budgets=[{"max_limit": 10}],
                rate_limit={"max_concurrent_requests": 1},
            )
            await engine.invalidate()
            config = await engine.lookup_key(key.value or "")
            limits = engine.limits_for(config, "openai", "gpt-4o", ())
            counters = engine.counters
            assert isinstance(counters, RedisCounters) and counters.client is not None
            ticket = await counters.admit(limits, 1000)
            assert isinstance(ticket, Ticket)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                await counters.settle(ticket, 500, 10)  # ends while Redis answers nothing
            finally:
                server.process.send_signal(signal.SIGCONT)
            for _ in range(100):  # the heartbeat's round pays what is owed
                await asyncio.sleep(0.05)
                if not counters._owed and not counters._releases:
                    break
            held = await counters.client.keys(f"{counters.prefix}c:*")
            slots = sum([await counters.client.zcard(k) for k in held])
            again = await counters.admit(limits, 1000)
            outcome = getattr(again, "code", "admitted")
            print(f"after the stall: {slots} slots held; the next request: {outcome}")
            assert slots == 0 and isinstance(again, Ticket)
            await counters.settle(again, 0, 0)
            budget = engine.registry.counter("budget", key.budgets[0].id)
            assert budget is not None and budget.value == 500 and budget.reserved == 0


async def test_settlements_at_once_after_a_stall_each_release_their_own(
    make_settings: Settings,
) -> None:
    """Right after Redis comes back, settlements (and the heartbeat) release what was held at
    once: each releases what it took, none fails on another's (an `IndexError` escaped a
    settlement, its own slot stayed held and its charge never reached Redis)."""
    with private_redis() as server:
        settings = make_settings(
            redis_url=server.url, redis_timeout_seconds=0.2, flush_interval_seconds=60
        )
        app = host_app(settings)
        engine = engine_of(app)
        async with running(app):
            key = engine.manager.create_virtual_key(
                name="alice",
                budgets=[{"max_limit": 10}],
                rate_limit={"max_concurrent_requests": 10},
            )
            await engine.invalidate()
            config = await engine.lookup_key(key.value or "")
            limits = engine.limits_for(config, "openai", "gpt-4o", ())
            counters = engine.counters
            assert isinstance(counters, RedisCounters) and counters.client is not None
            tickets = [await counters.admit(limits, 1000) for _ in range(3)]
            assert all(isinstance(t, Ticket) for t in tickets)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                await counters.settle(tickets[0], 500, 10)  # its release waits for Redis
            finally:
                server.process.send_signal(signal.SIGCONT)
            counters._state.retry_at = 0.0  # its back-off over, as after its delay
            results = await asyncio.gather(
                counters.settle(tickets[1], 100, 1),  # type: ignore[arg-type]
                counters.settle(tickets[2], 100, 1),  # type: ignore[arg-type]
                return_exceptions=True,
            )
            held = await counters.client.keys(f"{counters.prefix}c:*")
            slots = sum([await counters.client.zcard(k) for k in held])
            window = await counters.client.keys(f"{counters.prefix}w:budget:*")
            spent = int(await counters.client.get(window[0]))
            print(f"settled at once: {results}; slots held {slots}; Redis holds {spent}")
            assert results == [None, None] and slots == 0 and not counters._releases
            assert spent == 700  # the stalled 500 owed and paid, and both 100s
