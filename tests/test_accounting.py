"""Money is never lost: exact totals under concurrency, hard caps, windows, restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from sqlmodel import col, func, select

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import BudgetRow, UsageRecordRow
from support import chat, client, engine_of, host_app, running, until

Settings = Callable[..., BudgetSettings]
NANO = 1_000_000_000


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    """gpt-4o at $1 per million output tokens and free input: 1,000 output tokens cost $0.001."""
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 0, "output_per_mtok": 1}}})
    )
    return path


def store_totals(engine: Any, budget_id: str) -> tuple[int, int, int]:
    """(budget usage, sum of usage records, number of records) as the store holds them."""
    with engine.store.session() as s:
        usage = s.exec(
            select(BudgetRow.current_usage_nanos).where(col(BudgetRow.id) == budget_id)
        ).one()
        total, count = s.exec(
            select(func.coalesce(func.sum(UsageRecordRow.cost_nanos), 0), func.count())
        ).one()
    return int(usage), int(total), int(count)


async def test_500_concurrent_requests_are_charged_exactly_in_memory_and_in_the_store(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        m = engine.manager
        acme = m.create_customer(name="acme", budgets=[{"max_limit": 1000, "reset_duration": "1d"}])
        team = m.create_team(name="research", customer_id=acme.id)
        keys = [m.create_virtual_key(name=f"k{i}", team_id=team.id) for i in range(5)]
        await engine.invalidate()
        async with client(app) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json=chat(max_tokens=1 + i % 97),  # known, varied costs
                        headers={"authorization": f"Bearer {keys[i % 5].value}"},
                    )
                    for i in range(500)
                )
            )
        assert all(a.status_code == 200 for a in answers)
        expected = sum((1 + i % 97) * 1000 for i in range(500))  # nanos: $1/Mtok = 1000 n/token
        counter = engine.registry.windows["budget"][acme.budgets[0].id]
        assert counter.value == expected
        assert counter.reserved == 0
    # lifespan shutdown flushed everything
    assert store_totals(engine, acme.budgets[0].id) == (expected, expected, 500)


async def test_with_reservation_a_budget_of_n_requests_admits_at_most_n(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    n = 20
    async with running(app):
        m = engine.manager
        # each request: max_tokens 1000 -> $0.001; the prompt is free, so the estimate is exact
        team = m.create_team(
            name="research", budgets=[{"max_limit": 0.001 * n, "reset_duration": "1d"}]
        )
        key = m.create_virtual_key(name="alice", team_id=team.id)
        await engine.invalidate()
        async with client(app) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json=chat(max_tokens=1000),
                        headers={"authorization": f"Bearer {key.value}", "x-mock-delay-ms": "1"},
                    )
                    for _ in range(300)
                )
            )
        admitted = [a for a in answers if a.status_code == 200]
        codes = {a.json()["error"]["code"] for a in answers if a.status_code != 200}
        assert len(admitted) == n
        assert codes <= {"budget_reserved", "budget_exceeded"}
        counter = engine.registry.windows["budget"][team.budgets[0].id]
        assert counter.value == n * 1000 * 1000
        assert counter.reserved == 0
    assert store_totals(engine, team.budgets[0].id)[0] == n * 1_000_000


async def test_budget_reserved_is_a_retryable_429(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 0.0015, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        async with client(app) as http:
            before = engine.stats.admitted
            slow, held = await asyncio.gather(
                http.post(
                    "/v1/chat/completions",
                    json=chat(max_tokens=1000, stream=True),
                    headers={
                        "authorization": f"Bearer {key.value}",
                        "x-mock-delay-ms": "100",  # in flight about 0.6 s once admitted
                        "x-mock-output-tokens": "5",  # reserved for 1,000, streams 5
                    },
                ),
                _once_admitted(
                    engine,
                    before,
                    http.post(
                        "/v1/chat/completions",
                        json=chat(max_tokens=1000),
                        headers={"authorization": f"Bearer {key.value}"},
                    ),
                ),
            )
    assert slow.status_code == 200
    assert held.status_code == 429
    assert held.json()["error"]["code"] == "budget_reserved"
    assert held.headers["retry-after"] == "1"
    assert "x-should-retry" not in held.headers
    assert "reserved" in held.json()["error"]["message"]


async def _once_admitted(engine: BudgetEngine, before: int, awaitable: Any) -> Any:
    """`awaitable`, sent once the engine has admitted more than `before` requests: the request
    sent before it holds its reservation (a fixed 20 ms let it go first on a loaded machine)."""
    assert await until(lambda: engine.stats.admitted > before)
    return await awaitable


async def test_two_second_budget_and_request_limit_reset(
    make_settings: Settings, pricing_file: Path
) -> None:
    """Windows of 2 s, on the engine's clock, which stands still while the test asks: in real
    time, a machine that stalled about 2 s between two asks (under load) put them in two
    windows, and the second was admitted (reproduced with a 2.1 s pause between them)."""
    from budget_middleware.engine.engine import BudgetEngine

    now = [time.time()]
    engine = BudgetEngine(make_settings(pricing_file=pricing_file), clock=lambda: now[0])
    app = host_app(None)
    app.add_middleware(BudgetMiddleware, engine=engine)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice",
            budgets=[{"max_limit": 0.0001, "reset_duration": "2s"}],
            rate_limit={"request_max_limit": 2, "request_reset_duration": "2s"},
        )
        other = engine.manager.create_virtual_key(
            name="bob", rate_limit={"request_max_limit": 1, "request_reset_duration": "2s"}
        )
        await engine.invalidate()
        now[0] = time.time()  # not before the windows start (the store began them)

        async def ask(value: str | None) -> str:
            answer = await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens=200),
                headers={"authorization": f"Bearer {value}"},
            )
            return "ok" if answer.status_code == 200 else answer.json()["error"]["code"]

        assert await ask(key.value) == "ok"  # $0.0002 > $0.0001: spent
        assert await ask(key.value) == "budget_exceeded"
        assert await ask(other.value) == "ok"
        assert await ask(other.value) == "request_limit_exceeded"
        now[0] += 2.05
        assert await ask(key.value) == "ok"
        assert await ask(other.value) == "ok"


async def test_a_restart_keeps_every_charge(make_settings: Settings, pricing_file: Path) -> None:
    settings = make_settings(pricing_file=pricing_file, flush_interval_seconds=60)
    app = host_app(settings)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 0.005, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        for _ in range(3):
            answer = await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens=1000),
                headers={"authorization": f"Bearer {key.value}"},
            )
            assert answer.status_code == 200
        assert engine.pending_records == 3  # nothing written yet: the flush interval is long
    # a new app (and engine) on the same store, as after a process restart
    from budget_middleware.engine.engine import _engines

    _engines.clear()
    again = host_app(settings)
    engine_two = engine_of(again)
    assert engine_two is not engine
    async with running(again), client(again) as http:
        for expected in ("ok", "ok", "budget_exceeded"):
            answer = await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens=1000),
                headers={"authorization": f"Bearer {key.value}"},
            )
            got = "ok" if answer.status_code == 200 else answer.json()["error"]["code"]
            assert got == expected
    assert store_totals(engine_two, key.budgets[0].id) == (5_000_000, 5_000_000, 5)


async def test_a_failed_flush_keeps_its_charges_and_writes_them_later(
    make_settings: Settings, pricing_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file, flush_interval_seconds=60))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        for _ in range(4):
            await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens=1000),
                headers={"authorization": f"Bearer {key.value}"},
            )
        real = engine.store.apply_flush

        def broken(*args: Any) -> None:
            from budget_middleware.exceptions import ServiceUnavailable

            raise ServiceUnavailable("store write failed: OperationalError")

        monkeypatch.setattr(engine.store, "apply_flush", broken)
        monkeypatch.setattr(engine.store, "writable", lambda: False)  # an outage: no writes at all
        assert await engine.flush() is False
        assert await engine.flush() is False
        assert engine.stats.flush_failures == 2
        assert engine.pending_records == 4
        monkeypatch.setattr(engine.store, "apply_flush", real)
        monkeypatch.undo()
        assert await engine.flush() is True
        assert store_totals(engine, key.budgets[0].id) == (4_000_000, 4_000_000, 4)


async def test_a_batch_that_committed_but_reported_failure_is_not_written_twice(
    make_settings: Settings, pricing_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file, flush_interval_seconds=60))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        for _ in range(3):
            await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens=1000),
                headers={"authorization": f"Bearer {key.value}"},
            )
        real = engine.store.apply_flush

        def commits_then_fails(*args: Any) -> None:
            real(*args)
            raise ConnectionResetError("connection lost after COMMIT")

        monkeypatch.setattr(engine.store, "apply_flush", commits_then_fails)
        # The store answers again at once: the flusher finds its batch's mark and is done.
        assert await engine.flush() is True
        assert engine.stats.flush_failures == 1
        monkeypatch.setattr(engine.store, "apply_flush", real)
        assert await engine.flush() is True
        assert store_totals(engine, key.budgets[0].id) == (3_000_000, 3_000_000, 3)


@pytest.mark.parametrize("choices", ["n", "best_of"])
async def test_a_request_for_several_choices_reserves_them_all(
    make_settings: Settings, pricing_file: Path, choices: str
) -> None:
    """`n` choices (a completion's `best_of`) of up to `max_tokens` each: the provider bills
    every one of them, so the worst case is all of them. Reserving one choice's let 50
    concurrent requests spend 5 times a budget of one request."""
    provider = FastAPI()

    @provider.post("/v1/chat/completions")
    async def answer(request: Request) -> dict[str, Any]:
        body = await request.json()
        await asyncio.sleep(0.01)  # in flight together
        count = body[choices]
        return {
            "model": "gpt-4o",
            "choices": [{"index": i, "message": {"content": "ok"}} for i in range(count)],
            "usage": {"prompt_tokens": 0, "completion_tokens": body["max_tokens"] * count},
        }

    app = BudgetMiddleware(provider, settings=make_settings(pricing_file=pricing_file))
    engine = app.engine
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="tiny",
            budgets=[{"max_limit": 0.005}],  # one request of 5 x 1,000 tokens
        )
        await engine.invalidate()
        async with client(app) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json=chat(max_tokens=1000, **{choices: 5}),
                        headers={"authorization": f"Bearer {key.value}"},
                    )
                    for _ in range(50)
                )
            )
        counter = engine.registry.windows["budget"][key.budgets[0].id]
        codes = [a.status_code for a in answers]
        print(f"{choices}=5: {codes.count(200)} of 50 admitted, spent {counter.value} of 5000000")
        assert codes.count(200) == 1 and counter.value == 5_000_000 and counter.reserved == 0
