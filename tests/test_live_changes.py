"""A write through the Python management API applies to the very next request in this process."""

from __future__ import annotations

from collections.abc import Callable

from budget_middleware import BudgetSettings
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]


async def test_writes_apply_to_the_next_request_without_waiting_for_the_cache(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings(cache_ttl_seconds=3600))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        key = m.create_virtual_key(name="alice")
        auth = {"authorization": f"Bearer {key.value}"}

        async def status() -> int:
            answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
            return answer.status_code

        assert await status() == 200  # the key is cached now
        m.update_virtual_key(key.id, is_active=False)
        assert await status() == 403
        m.update_virtual_key(key.id, is_active=True)
        assert await status() == 200
        m.put_provider("openai", budgets=[{"max_limit": 0}])
        assert await status() == 402
        m.delete_provider("openai")
        assert await status() == 200


async def test_a_budget_reset_through_the_python_api_frees_the_live_counter(
    make_settings: Settings,
) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        key = m.create_virtual_key(name="alice", budgets=[{"max_limit": 0.000001}])
        auth = {"authorization": f"Bearer {key.value}"}
        first = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        spent = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        m.reset_budget(key.budgets[0].id)
        again = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert (first.status_code, spent.status_code, again.status_code) == (200, 402, 200)
