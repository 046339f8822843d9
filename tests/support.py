"""Helpers for tests that drive a real host app through ASGI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from mock_upstream import mock_router

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.database import Store
from budget_middleware.store.tables import BudgetRow


def host_app(settings: BudgetSettings | None, *, prefix: str = "/v1") -> FastAPI:
    """An existing FastAPI app: a plain route, one that shows the budget state, the mock upstream;
    with the middleware unless `settings` is None."""
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"body": (await request.body()).decode()}

    @app.post(prefix + "/state/completions")
    async def state(request: Request) -> dict[str, Any]:
        budget = request.state.budget
        return {
            "virtual_key_id": budget.virtual_key_id,
            "team_id": budget.team_id,
            "customer_id": budget.customer_id,
            "provider": budget.provider,
            "model": budget.model,
            "tags": list(budget.tags),
        }

    app.include_router(mock_router(prefix))
    if settings is not None:
        app.add_middleware(BudgetMiddleware, settings=settings)
    return app


def engine_of(app: Any) -> BudgetEngine:
    """The engine behind an app's BudgetMiddleware (the stack is built on first use)."""
    from budget_middleware.engine.engine import get_engine

    return get_engine(next(m.kwargs["settings"] for m in app.user_middleware))


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Run the app's lifespan: startup before, shutdown (which flushes) after."""
    receive_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            receive_queue.get,
            sent.put,
        )
    )
    await receive_queue.put({"type": "lifespan.startup"})
    message = await sent.get()
    if message["type"] != "lifespan.startup.complete":
        await asyncio.gather(task, return_exceptions=True)  # it raises after startup.failed
        raise RuntimeError(message.get("message", "startup failed"))
    try:
        yield
    finally:
        await receive_queue.put({"type": "lifespan.shutdown"})
        await sent.get()
        await task


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


def chat(model: str = "openai/gpt-4o", max_tokens: int = 10, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        **extra,
    }


def budget_row(store: Store, usage: int, last_reset: datetime) -> str:
    """A daily budget of $1,000 in the store, with this usage since `last_reset`; its id."""
    with store.session() as s:
        row = BudgetRow(
            owner_type="tag",
            owner_id="chat",
            max_limit_nanos=10**12,
            reset_duration="1d",
            current_usage_nanos=usage,
            last_reset=last_reset,
        )
        s.add(row)
        s.commit()
        return row.id


class Clock:
    """Real time plus an offset a test moves forward (windows roll without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def serve_lifespan(receive: Any, send: Any) -> None:
    """A raw ASGI app's lifespan: started, then shut down when the server asks."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
