"""Helpers for tests that drive a real host app through ASGI, and for tests that make threads
meet where only `loop_lock` keeps them apart (`Meeting`)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI, Request
from mock_upstream import mock_router

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.database import Store
from budget_middleware.store.tables import BudgetRow

T = TypeVar("T")


async def until(check: Callable[[], T], seconds: float = 10.0) -> T:
    """Wait for what a test waits for, not a fixed time: `check()` every 20 ms until it is true,
    for at most `seconds`; its last value (false after them: the test's assertion then says
    what never came). A loaded machine (CI's two slow cores) runs the flusher, the engine's
    loop, a delivery or Redis's answer late, and a fixed sleep fell short there."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


def until_sync(check: Callable[[], T], seconds: float = 10.0) -> T:
    """`until` for a test outside any event loop (a thread, a sync client)."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


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


def post_scope(
    path: str, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any
) -> dict[str, Any]:
    """A raw ASGI scope of a JSON `POST` to `path`, as a server passes it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        **extra,
    }


class BodyThenGone:
    """An ASGI client's `receive`: the request's body in one message, then nothing until the
    client leaves (`gone.set()`), which it says with `http.disconnect`."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.delivered = False
        self.gone = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


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


class FrozenClock:
    """Time that stands still but where a test moves it: for windows shorter than a stall of a
    loaded machine, which real time would end between two steps of the test. It starts at the
    real time; `to_real_time` sets it there again (after the store began a window, by its own
    clock, so that the engine is not before the window's start)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def to_real_time(self) -> None:
        self.now = max(self.now, time.time())


async def serve_lifespan(receive: Any, send: Any) -> None:
    """A raw ASGI app's lifespan: started, then shut down when the server asks."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


# -- threads made to meet where only `loop_lock` keeps them apart ---------------------------------

# A call asking for at most 1,000 output tokens of gpt-4o and answered 1,000 (its input free):
# reserved and charged the same $0.001, so a budget of N calls admits N whatever the order.
CALL_NANOS = 1_000_000
CALL_OUTPUT = 1000


def call_priced(tmp_path: Path) -> Path:
    """A pricing file: gpt-4o's input free and its output $1 a million tokens (`CALL_NANOS`)."""
    path = tmp_path / "call_prices.json"
    path.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 0, "output_per_mtok": 1}}})
    )
    return path


class Meeting:
    """A point of the code where threads are made to meet, as if the first were preempted there:
    the first to get there waits (up to `timeout` seconds) until `others` more have got there
    too. Only a lock around that point keeps them apart: the first then waits alone, holding
    it, and goes on after the timeout (`met` False)."""

    def __init__(self, others: int, timeout: float = 1.5) -> None:
        self.others = others
        self.timeout = timeout
        self.arrived = 0
        self.met: bool | None = None  # whether the others came while the first waited
        self.waited = 0.0  # how long the first waited
        self._count = threading.Lock()
        self._all_here = threading.Event()

    def arrive(self) -> None:
        with self._count:
            self.arrived += 1
            first = self.arrived == 1
            if self.arrived == 1 + self.others:
                self._all_here.set()
        if first:
            started = time.perf_counter()
            self.met = self._all_here.wait(self.timeout)
            self.waited = time.perf_counter() - started


def meet_between_check_and_reservation(monkeypatch: pytest.MonkeyPatch, meeting: Meeting) -> None:
    """Each admission in process arrives at `meeting` once every limit has passed, before it
    counts the request or reserves its estimate (`admission.admit_anyway`): two admissions
    there at once would both have passed on what neither had reserved yet."""
    from budget_middleware.core import admission

    counted = admission.admit_anyway

    def reserving(*args: Any) -> Any:
        meeting.arrive()
        return counted(*args)

    monkeypatch.setattr(admission, "admit_anyway", reserving)


def meet_inside_a_budget_s_charge(monkeypatch: pytest.MonkeyPatch, meeting: Meeting) -> None:
    """Each settlement in process arrives at `meeting` once it has read its budget's spend, before
    it writes that spend plus its cost back (`counter.value += cost` in `windows.charge`): two
    settlements there at once would write the same sum, and one cost would be lost."""
    from budget_middleware.core import admission
    from budget_middleware.core.windows import WindowCounter

    slot = WindowCounter.__dict__["value"]  # the slot's descriptor, which the property wraps
    settling = threading.local()
    settle = admission.settle

    def settled(*args: Any) -> Any:
        settling.budget = True  # the next budget spend this thread reads is its charge's
        try:
            return settle(*args)
        finally:
            settling.budget = False

    def read(counter: WindowCounter) -> int:
        value: int = slot.__get__(counter, type(counter))
        if getattr(settling, "budget", False) and counter.kind == "budget":
            settling.budget = False
            meeting.arrive()  # read, not yet written back
        return value

    monkeypatch.setattr(admission, "settle", settled)
    monkeypatch.setattr(WindowCounter, "value", property(read, slot.__set__))


def set_up_django_example(monkeypatch: Any, tmp_path: Path) -> None:
    """The example Django project (examples/django_app) set up on this test's store, with the
    admin key `admin-secret`: its modules imported anew, so that its admin URLs and middleware
    are on this test's engine."""
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/django.db")
    monkeypatch.setenv("BUDGET_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    monkeypatch.syspath_prepend(
        str(Path(__file__).resolve().parents[1] / "examples" / "django_app")
    )
    for name in [m for m in sys.modules if m.startswith("llmsite")]:
        monkeypatch.delitem(sys.modules, name)
    import django
    from django.urls import clear_url_caches

    django.setup()
    clear_url_caches()
