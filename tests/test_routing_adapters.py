"""Routing (SPEC §12) and shadow mode (SPEC §14) answered alike by the three adapters: ASGI's
`BudgetMiddleware`, WSGI's `BudgetWSGIMiddleware` (SPEC §15) and the outbound `BudgetTransport`
(SPEC §13), for one configuration: the body the upstream gets, the status, `x-budget-route`,
`x-budget-shadow-refusal`, `error.targets`, and what is charged to which provider and model."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from budget_middleware import (
    BudgetMiddleware,
    BudgetSettings,
    BudgetSyncTransport,
    BudgetTransport,
    charge_to,
    get_engine,
)
from budget_middleware.engine.portal import shut_down_engines
from budget_middleware.outbound.transport import on_loop
from budget_middleware.wsgi import BudgetWSGIMiddleware
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat

SPENT = [{"max_limit": 0}]
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "model": model,
            "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        }
    ).encode()


def events(body: dict[str, Any]) -> list[bytes]:
    base = {"id": "c", "object": "chat.completion.chunk", "model": body["model"]}
    chunks = [b"data: " + json.dumps({**base, "choices": [{"delta": {"content": "hi"}}]}).encode()]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(b"data: " + json.dumps({**base, "choices": [], "usage": USAGE}).encode())
    return [c + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def answered(body: dict[str, Any]) -> tuple[bytes, str]:
    if body.get("stream"):
        return b"".join(events(body)), "text/event-stream"
    return completion(body["model"]), "application/json"


Outcome = tuple[int, str | None, str | None, str | None, str | None, Any, list[str]]


def outcome(answer: Any, text: str, sent: list[str]) -> Outcome:
    refusal: Any = None
    if answer.status_code >= 400:
        error = json.loads(text)["error"]
        refusal = (error["code"], [(t["target"], t["code"]) for t in error.get("targets", [])])
    elif "usage" not in text and "data:" in text:
        refusal = "no usage"  # the usage chunk asked for is cut out: fine
    return (
        answer.status_code,
        answer.headers.get("x-budget-route"),
        answer.headers.get("x-budget-shadow-refusal"),
        answer.headers.get("retry-after"),
        answer.headers.get("x-should-retry"),
        refusal,
        list(sent),
    )


def counted_down(result: Outcome, took: float) -> Outcome:
    """The outcome with an hour's `retry-after` read as the hour. It counts down from the rate
    window's start, which `configure` wrote (`request_reset_duration: 1h`): an adapter that
    took over a second from there to its refusal (a loaded machine: a fresh-clone CI run, two
    cores, the suite beside) answered 3599 where the others answered 3600, and the case failed
    on nothing the adapters did differently. Any value the `took` seconds allow is the hour."""
    retry = result[3]
    if retry is not None and HOUR - math.ceil(took) <= int(retry) <= HOUR:
        return (*result[:3], str(HOUR), *result[4:])  # type: ignore[return-value]
    return result


HOUR = 3600
KEY = "sk-bm-differential-test-key-0001"


def configure(settings: BudgetSettings, spend: tuple[str, ...], strategy: str) -> str | None:
    """The configuration; the key requests send (None: no key)."""
    m = get_engine(settings).manager
    key: str | None = None
    for item in spend:
        if item.endswith(":rpm"):
            rate = {"request_max_limit": 1, "request_reset_duration": "1h"}
            m.put_provider(item[:-4], rate_limit=rate)
        elif item.endswith(":concurrency"):
            m.put_provider(item.split(":")[0], rate_limit={"max_concurrent_requests": 1})
        elif item == "unknown-key":
            key = KEY
        elif item.startswith("key-blocks:"):
            blocked = item.split(":", 1)[1]
            created = m.create_virtual_key(
                name="alice",
                provider_configs=[
                    {"provider": blocked, "allowed_models": [], "blocked_models": ["*"]}
                ],
            )
            key = created.value
        elif item == "key-azure-only":
            configs = [
                {"provider": "openai", "allowed_models": [], "blocked_models": ["*"]},
                {"provider": "azure"},
            ]
            key = m.create_virtual_key(name="carol", provider_configs=configs).value
        elif item.startswith("key-spent"):
            key = m.create_virtual_key(name="bob", budgets=SPENT).value
        else:
            m.put_provider(item, budgets=SPENT)
    targets = ["openai/gpt-4o-mini", "azure/gpt-4o-mini"]
    m.create_route(name="smart", targets=targets, strategy=strategy)
    return key


def charged(settings: BudgetSettings) -> list[dict[str, Any]]:
    engine = get_engine(settings)
    on_loop(engine, engine.flush)
    return rows_of(engine)


def rows_of(engine: Any) -> list[dict[str, Any]]:
    with engine.store.engine.connect() as conn:
        query = "SELECT provider, model, cost_nanos, streamed, would_refuse FROM bm_usage_records"
        return [dict(r._mapping) for r in conn.execute(text(query + " ORDER BY id"))]


def via_asgi(
    settings: BudgetSettings, bodies: list[dict[str, Any]], headers: dict[str, str]
) -> tuple[list[Outcome], list[dict[str, Any]]]:
    sent: list[str] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        sent.append(body["model"])
        content, kind = answered(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind.encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": content})

    async def lifespan_aware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await upstream(scope, receive, send)

    app = BudgetMiddleware(lifespan_aware, settings=settings)

    async def run() -> tuple[list[Outcome], list[dict[str, Any]]]:
        results = []
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for body in bodies:
                before = len(sent)
                answer = await http.post("/v1/chat/completions", json=body, headers=headers)
                results.append(outcome(answer, answer.text, sent[before:]))
        engine = get_engine(settings)
        await engine.flush()
        rows = rows_of(engine)
        await engine.shutdown()  # on this loop, which ends here: its Redis connections closed
        return results, rows

    return asyncio.run(run())


def via_wsgi(
    settings: BudgetSettings, bodies: list[dict[str, Any]], headers: dict[str, str]
) -> list[Outcome]:
    from flask import Flask, Response, request

    sent: list[str] = []
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def serve() -> Response:
        body = request.get_json(force=True)
        sent.append(body["model"])
        content, kind = answered(body)
        if body.get("stream"):
            return Response(iter(events(body)), content_type=kind)
        return Response(content, content_type=kind)

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, settings)  # type: ignore[method-assign]
    client = app.test_client()
    results = []
    for body in bodies:
        before = len(sent)
        answer = client.post("/v1/chat/completions", json=body, buffered=True, headers=headers)
        results.append(outcome(answer, answer.get_data(as_text=True), sent[before:]))
    return results, charged(settings)


def via_transport(
    settings: BudgetSettings, bodies: list[dict[str, Any]], headers: dict[str, str]
) -> list[Outcome]:
    import httpx2

    sent: list[str] = []

    def provider(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        sent.append(body["model"])
        content, kind = answered(body)
        return httpx2.Response(200, content=content, headers={"content-type": kind})

    async def run() -> list[Outcome]:
        results = []
        transport = BudgetTransport(httpx2.MockTransport(provider), settings)
        async with httpx2.AsyncClient(transport=transport) as http:
            for body in bodies:
                before = len(sent)
                url = "https://gateway.internal/v1/chat/completions"
                if headers:
                    with charge_to(virtual_key=headers["authorization"][7:]):
                        answer = await http.post(url, json=body)
                else:
                    answer = await http.post(url, json=body)
                results.append(outcome(answer, answer.text, sent[before:]))
        return results

    return asyncio.run(run()), charged(settings)


def via_sync_transport(
    settings: BudgetSettings, bodies: list[dict[str, Any]], headers: dict[str, str]
) -> tuple[list[Outcome], list[dict[str, Any]]]:
    import httpx2

    sent: list[str] = []

    def provider(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        sent.append(body["model"])
        content, kind = answered(body)
        return httpx2.Response(200, content=content, headers={"content-type": kind})

    results = []
    with httpx2.Client(
        transport=BudgetSyncTransport(httpx2.MockTransport(provider), settings)
    ) as http:
        for body in bodies:
            before = len(sent)
            url = "https://gateway.internal/v1/chat/completions"
            if headers:
                with charge_to(virtual_key=headers["authorization"][7:]):
                    answer = http.post(url, json=body)
            else:
                answer = http.post(url, json=body)
            results.append(outcome(answer, answer.text, sent[before:]))
    return results, charged(settings)


ADAPTERS: dict[str, Callable[..., tuple[list[Outcome], list[dict[str, Any]]]]] = {
    "asgi": via_asgi,
    "wsgi": via_wsgi,
    "outbound": via_transport,
    "outbound-sync": via_sync_transport,
}


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("strategy", ["ordered", "most_remaining"])
@pytest.mark.parametrize(
    ("mode", "spend"),
    [
        ("enforce", ()),
        ("enforce", ("openai",)),
        ("enforce", ("openai", "azure")),
        ("shadow", ("openai",)),
        ("shadow", ("openai", "azure")),
        ("enforce", ("openai:rpm", "azure:rpm")),
        ("shadow", ("openai:rpm", "azure:rpm")),
        ("enforce", ("openai:rpm", "azure")),
        ("enforce", ("openai:concurrency", "azure:concurrency")),
        ("shadow", ("openai:concurrency", "azure")),
        ("enforce", ("key-blocks:openai",)),
        ("shadow", ("key-blocks:openai",)),
        ("shadow", ("key-blocks:openai", "azure")),
        ("enforce", ("key-blocks:openai", "azure")),
        ("enforce", ("key-azure-only",)),
        ("shadow", ("key-azure-only",)),
        ("shadow", ("key-azure-only", "azure")),
        ("enforce", ("key-azure-only", "azure")),
        ("shadow", ("unknown-key",)),
        ("shadow", ("unknown-key", "openai")),
        ("enforce", ("key-spent",)),
        ("shadow", ("key-spent",)),
    ],
)
def test_the_three_adapters_route_alike(
    tmp_path: Path, mode: str, spend: tuple[str, ...], strategy: str, store: str
) -> None:
    bodies = [
        chat("smart"),
        chat("smart", stream=True),
        chat("smart", stream=True, stream_options={"include_usage": True}),
    ]
    seen: dict[str, tuple[list[Outcome], list[tuple[Any, ...]], dict[str, int]]] = {}
    prefixes: dict[str, str] = {}
    try:
        for name, adapter in ADAPTERS.items():
            extra: dict[str, Any] = {}
            if store == "redis":
                need_redis()
                extra["redis_url"] = REDIS_URL
                # A loaded machine (the suite on 2 CPUs) can wait on Redis past the 2 s default:
                # one WSGI leg answered 503 so in a CI run (conftest's `make_settings` sets 10)
                extra["redis_timeout_seconds"] = 10
            settings = BudgetSettings(
                database_url=f"sqlite:///{tmp_path}/{name}.db",
                admin_key="admin-secret",
                flush_interval_seconds=3600,
                mode=mode,
                **extra,
            )
            if store == "redis":
                use_prefix(get_engine(settings), prefixes.setdefault(name, unique_prefix()))
            began = time.time()  # before the rate windows `configure` starts
            key = configure(settings, spend, strategy)
            headers = {"authorization": f"Bearer {key}"} if key else {}
            results, rows = adapter(settings, bodies, headers)
            took = time.time() - began
            print(name, f"{took:.3f} s;", "retry-after", [r[3] for r in results])
            results = [counted_down(r, took) for r in results]
            charges = [
                (r["provider"], r["model"], r["cost_nanos"], r["streamed"], r["would_refuse"])
                for r in rows
            ]
            shadowed = dict(get_engine(settings).stats.shadow_refusals)  # the metric's counts
            seen[name] = (results, charges, shadowed)
    finally:
        shut_down_engines()
        for prefix in prefixes.values():
            delete_prefix(REDIS_URL, prefix)
    for name, figures in seen.items():
        print(name, *figures)
    assert seen["wsgi"] == seen["asgi"]
    assert seen["outbound"] == seen["asgi"]
    assert seen["outbound-sync"] == seen["asgi"]


def test_an_adapter_a_second_slower_answers_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hour's `retry-after` of a rate-limited target, through a WSGI app that took a second
    more than the others to its refusal (as a loaded CI machine once made it: 3599 against
    3600, `[enforce-spend7-most_remaining-memory]` failed): the same answer."""

    def slow_wsgi(*args: Any) -> tuple[list[Outcome], list[dict[str, Any]]]:
        time.sleep(1.1)
        return via_wsgi(*args)

    monkeypatch.setitem(ADAPTERS, "wsgi", slow_wsgi)
    test_the_three_adapters_route_alike(
        tmp_path, "enforce", ("openai:rpm", "azure"), "most_remaining", "memory"
    )
