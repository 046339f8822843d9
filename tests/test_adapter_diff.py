"""The three adapters side by side (SPEC §13, §15): the same store contents and the same requests,
driven through the ASGI `BudgetMiddleware` (a raw ASGI host app, `httpx.ASGITransport`), the
`BudgetWSGIMiddleware` (a raw WSGI host app, werkzeug's test client), and the OpenAI and
Anthropic SDKs (on one `httpx2` client) through `BudgetTransport` and `BudgetSyncTransport` to a
fake provider, answer alike request by request (status, `error.code`, the refusing scope, the
message, `error.targets`, `Retry-After`, the limit, route and shadow headers) and end with the
same spend per scope and the same usage records.

Seeded random sequences on a frozen clock (the store's time too), with `test_backend_diff.py`'s
store contents: a key under a team under a customer, budgets (soft, $0, never resetting) and
rate limits (requests, tokens, concurrency) on random scopes, provider, model, key-scoped model
and tag limits, the key's provider configs (with allowed and blocked models, or a provider left
out), a route, `BUDGET_RESERVE` on and off, enforce and shadow mode, a key required or not,
unpriced models allowed or refused, in process or (every third sequence) in Redis; requests to
random models and the route (OpenAI's chat completions, or Anthropic's messages for a Claude
model), with tags in `x-budget-tags`, body `metadata.tags` or `charge_to(tags=...)`, with the
key (in `Authorization`, `x-budget-key`, `x-api-key`; outbound: `charge_to` by value or id), an
unknown key or none, answered with usage, `x-budget-cost`, a gzip-coded body, a provider error
(4xx, 5xx), a stream with or without usage, or a stream cut (ended early, or failing); some
streams held open after their first chunk while others come (their slots and reservations
held), then read on or closed unread; between them the clock moves on, budgets are reset, limits
change terms (a key deactivated), and the flusher runs.

What legitimately differs, and is not compared:
- an admitted outbound call's answer is the provider's: §8's limit headers are added to the
  answers of the inbound adapters only (SPEC §13; the route's and shadow mode's headers are
  added by all); a refusal is the same answer everywhere, headers and body;
- `virtual_key_required`'s message, which tells an outbound caller to use `charge_to`;
- a failing stream: the SDK raises, the WSGI test client raises, the ASGI client gets what was
  sent; compared is the status and that it was cut;
- the usage record's `direction` (`outbound` for the transports);
- a stream closed with its headers alone: an inbound one is charged its most output (README:
  "which got its headers alone"), an outbound one what it streamed (CHANGELOG: a stream closed
  before its first token); so a held stream is held after its first chunk, which werkzeug's
  client reads with the answer's start, and which the SDK is made to read.

`ADAPTER_SEQUENCES`, `ADAPTER_FIRST`, `ADAPTER_LENGTH` and `ADAPTER_STORE` (`memory`, `redis`)
run more of them (a hunt); `run_sequence`'s `keep` narrows a difference down."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import gzip
import inspect
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from werkzeug.test import Client

from budget_middleware import (
    BudgetMiddleware,
    BudgetSettings,
    BudgetSyncTransport,
    BudgetTransport,
    charge_to,
)
from budget_middleware.core import durations
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.engine.portal import on_loop
from budget_middleware.store import tables
from budget_middleware.wsgi import BudgetWSGIMiddleware
from conftest import REDIS_UP, REDIS_URL
from service_support import delete_prefix, unique_prefix, use_prefix
from support import FrozenClock, running, serve_lifespan
from test_backend_diff import (
    COMPARED_HEADERS,
    PRICES,
    T0,
    Answer,
    Ids,
    Step,
    StoreTime,
    budget_ids,
    budgets,
    contents,
    populate,
    rate_limit,
    records,
    request,
    spend,
)

UNKNOWN = "sk-bm-differential-unknown-key-9"
GATEWAY = "https://gateway.internal"  # a host of no provider: the provider from SPEC §4's rules
LIMIT_HEADERS = COMPARED_HEADERS[5:]  # x-ratelimit-*, x-budget-limit, x-budget-remaining
REFUSALS = {
    "invalid_virtual_key",
    "virtual_key_required",
    "virtual_key_inactive",
    "virtual_key_expired",
    "provider_not_allowed",
    "model_not_allowed",
    "request_limit_exceeded",
    "token_limit_exceeded",
    "concurrency_limit_exceeded",
    "budget_exceeded",
    "budget_reserved",
    "model_not_priced",
}


# -- what the host apps and the provider answer ---------------------------------------------------


def usage_of(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt,
        "completion_tokens": answer.completion,
        "total_tokens": answer.prompt + answer.completion,
    }


def status_of(answer: Answer) -> int:
    return 400 if answer.kind == "error4xx" else 500 if answer.kind.startswith("error") else 200


def headers_of(answer: Answer) -> list[tuple[str, str]]:
    if answer.kind.startswith("stream"):
        return [("content-type", "text/event-stream")]
    out = [("content-type", "application/json")]
    if answer.kind.startswith("cost"):
        out.append(("x-budget-cost", answer.cost))
    if answer.kind.endswith("_gzip"):
        out.append(("content-encoding", "gzip"))
    return out


@dataclass
class Reply(Answer):
    api: str = "openai"  # or "anthropic": Anthropic's messages API (`/v1/messages`)


def anthropic_of(answer: Answer) -> bool:
    return isinstance(answer, Reply) and answer.api == "anthropic"


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}).encode() + b"\n\n"


def anthropic_events(answer: Answer) -> list[bytes]:
    usage = {"input_tokens": answer.prompt, "output_tokens": 1}
    message = {"id": "m1", "type": "message", "role": "assistant", "model": "m", "content": []}
    out = [sse("message_start", {"message": {**message, "usage": usage}})]
    out.append(
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    )
    for n in range(3):
        delta = {"type": "text_delta", "text": f"word{n} " * 5}
        out.append(sse("content_block_delta", {"index": 0, "delta": delta}))
    if answer.kind == "stream":
        out.append(sse("content_block_stop", {"index": 0}))
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        out.append(
            sse("message_delta", {"delta": delta, "usage": {"output_tokens": answer.completion}})
        )
        out.append(sse("message_stop", {}))
    return out


def json_body(answer: Answer) -> bytes:
    if answer.kind.startswith("error"):
        body: dict[str, Any] = {"error": {"message": "upstream failed", "type": "server_error"}}
    elif anthropic_of(answer):
        body = {"id": "m1", "type": "message", "role": "assistant", "model": "m", "content": []}
        body.update(stop_reason="end_turn", stop_sequence=None)
        body["usage"] = {"input_tokens": answer.prompt, "output_tokens": answer.completion}
    else:
        body = {"id": "c1", "object": "chat.completion", "model": "m", "created": 1}
        body.update(choices=[], usage=usage_of(answer))
    out = json.dumps(body).encode()
    return gzip.compress(out) if answer.kind.endswith("_gzip") else out


def events(answer: Answer) -> list[bytes]:
    """A stream's chunks; `stream_raise` fails after them, `stream_cut` ends without usage."""
    if anthropic_of(answer):
        return anthropic_events(answer)
    out = []
    for n in range(3):
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "m",
            "created": 1,
            "choices": [{"index": 0, "delta": {"content": f"word{n} " * 5}}],
        }
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if answer.kind == "stream":
        final = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "created": 1}
        final.update(choices=[], usage=usage_of(answer))
        out.append(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
    return out


@dataclass
class InboundHost:
    """The ASGI host app: each request answered as the test says; a held one (a stream) waits
    after its first chunk, as werkzeug's test client reads a WSGI app's first chunk with its
    start, and as the SDK is made to read its first event."""

    answers: dict[str, Answer]
    entered: dict[str, asyncio.Event] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        rid = dict(scope["headers"])[b"x-test-id"].decode()
        answer = self.answers[rid]
        headers = [(k.encode(), v.encode()) for k, v in headers_of(answer)]
        await send({"type": "http.response.start", "status": status_of(answer), "headers": headers})
        if not answer.kind.startswith("stream"):
            await send({"type": "http.response.body", "body": json_body(answer)})
            return
        for n, chunk in enumerate(events(answer)):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if n == 0 and answer.hold:
                self.entered.setdefault(rid, asyncio.Event()).set()
                await self.gates.setdefault(rid, asyncio.Event()).wait()
        if answer.kind == "stream_raise":
            raise RuntimeError("upstream cut")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def wsgi_host(answers: dict[str, Answer]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.input"].read()
        answer = answers[environ["HTTP_X_TEST_ID"]]
        status = status_of(answer)
        start_response(f"{status} X", headers_of(answer))
        if not answer.kind.startswith("stream"):
            return [json_body(answer)]

        def stream() -> Iterator[bytes]:
            yield from events(answer)
            if answer.kind == "stream_raise":
                raise RuntimeError("upstream cut")

        return stream()

    return app


class Chunks(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    def __iter__(self) -> Iterator[bytes]:
        yield from events(self.answer)
        if self.answer.kind == "stream_raise":
            raise httpx2.ReadError("upstream cut")

    async def __aiter__(self) -> Any:
        for chunk in self:
            yield chunk


def provider(answers: dict[str, Answer]) -> Callable[[httpx2.Request], httpx2.Response]:
    def handle(request: httpx2.Request) -> httpx2.Response:
        answer = answers[request.headers["x-test-id"]]
        headers = headers_of(answer)
        if answer.kind.startswith("stream"):
            return httpx2.Response(200, headers=headers, stream=Chunks(answer))
        return httpx2.Response(status_of(answer), headers=headers, content=json_body(answer))

    return handle


# -- what is compared of an answer ----------------------------------------------------------------


def seen(status: int, headers: Any, body: bytes | None, cut: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status}
    if cut:
        out["cut"] = True
    if status >= 400 and body is not None:
        if body[:2] == b"\x1f\x8b":  # a coded body werkzeug's client leaves coded
            body = gzip.decompress(body)
        try:
            error = json.loads(body).get("error")
        except ValueError:
            error = None
        if isinstance(error, dict):
            out["code"] = error.get("code")
            scope = error.get("scope") or {}
            out["scope"] = (scope.get("type"), scope.get("name"))
            out["message"] = error.get("message")
            out["targets"] = error.get("targets")
    for name in COMPARED_HEADERS:
        if name in headers:
            out[name] = headers[name]
    return out


# -- the sides ------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    engine: BudgetEngine
    names: dict[str, str]
    answers: dict[str, Answer]
    send: Callable[[Step], Sent] = field(default=lambda step: {})
    pending: dict[str, Callable[[bool], dict[str, Any]]] = field(default_factory=dict)
    run: Callable[[Any], Any] = field(default=lambda work: None)  # runs a coroutine function

    def budget_ids(self) -> list[str]:
        return budget_ids(self.engine, self.names)

    def apply(self, step: Step) -> None:
        Ids.making = self.name
        try:
            manager = self.engine.manager
            if step.op == "reset":
                ids = self.budget_ids()
                if ids:
                    manager.reset_budget(ids[step.pick % len(ids)])
                return
            id_ = next(id_ for id_, name in self.names.items() if name == step.owner)
            update = {
                "customer": manager.update_customer,
                "team": manager.update_team,
                "key": manager.update_virtual_key,
            }[step.owner]
            update(id_, **step.change)
        finally:
            Ids.making = None


def raw(step: Step) -> bytes:
    """The body as both inbound clients send it (the same bytes: the prompt is estimated from
    its size), as httpx's `json=` writes it."""
    return json.dumps(step.body, separators=(",", ":"), ensure_ascii=False).encode()


def json_headers(step: Step) -> dict[str, str]:
    return {**inbound_headers(step), "content-type": "application/json"}


def path_of(step: Step) -> str:
    assert step.answer is not None
    return "/v1/messages" if anthropic_of(step.answer) else "/v1/chat/completions"


def inbound_headers(step: Step) -> dict[str, str]:
    """The request's headers, its key in the header `step.owner` names (a send's way)."""
    headers = dict(step.headers)
    if step.owner in ("x-budget-key", "x-api-key") and "authorization" in headers:
        headers[step.owner] = headers.pop("authorization")[7:]
    return headers


def payer(step: Step, key_id: str) -> Any:
    """Who pays an outbound call: the key's value, or its id (`step.owner == "by-id"`), with
    the tags in `charge_to` rather than the header (`"tags-in-payer"`)."""
    auth = step.headers.get("authorization")
    if not auth:
        return contextlib.nullcontext()
    tags = step.headers.get("x-budget-tags", "").split(",") if step.owner == "tags-in-payer" else []
    if step.owner == "by-id" and auth[7:] != UNKNOWN:
        return charge_to(virtual_key_id=key_id, tags=[t for t in tags if t])
    return charge_to(virtual_key=auth[7:], tags=[t for t in tags if t])


def created(sdks: Any, step: Step) -> Any:
    """The call through the SDK of its API (`sdks`: OpenAI's and Anthropic's clients)."""
    assert step.answer is not None
    if anthropic_of(step.answer):
        arguments = sdk_arguments(step)
        arguments.pop("stream_options", None)
        arguments.setdefault("max_tokens", 1024)
        return sdks[1].messages.with_raw_response.create(**arguments)
    return sdks[0].chat.completions.with_raw_response.create(**sdk_arguments(step))


def sdk_arguments(step: Step) -> dict[str, Any]:
    body = dict(step.body)
    out = {k: body.pop(k) for k in ("model", "messages", "max_tokens", "stream", "stream_options")
           if k in body}  # fmt: skip
    if body:
        out["extra_body"] = body
    out["extra_headers"] = {k: v for k, v in step.headers.items() if k != "authorization"}
    if step.owner == "tags-in-payer" and "authorization" in step.headers:
        out["extra_headers"].pop("x-budget-tags", None)
    return out


# The answer seen, or (held) how to end it and see it: read to its end, or (`drop`) closed unread.
Sent = dict[str, Any] | Callable[[bool], Any]
DROPPED = {"dropped": True}


def sync_sdk_call(sdks: Any, key_id: str, step: Step) -> Sent:
    with payer(step, key_id):
        try:
            raw = created(sdks, step)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            return seen(exc.status_code, exc.response.headers, exc.response.content, False)
        parsed: Any = raw.parse()
        if step.op == "hold" and step.body.get("stream"):
            next(iter(parsed))  # its first event read, as the inbound clients read it

    def finish(drop: bool = False) -> dict[str, Any]:
        if drop:
            parsed.close()
            return DROPPED
        cut = False
        try:
            if step.body.get("stream"):
                for _ in parsed:
                    pass
        except (httpx2.HTTPError, openai.APIError, anthropic.APIError):
            cut = True
        return seen(raw.status_code, raw.headers, None, cut)

    return finish if step.op == "hold" else finish()


async def async_sdk_call(sdks: Any, key_id: str, step: Step) -> Sent:
    with payer(step, key_id):
        try:
            raw = await created(sdks, step)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            return seen(exc.status_code, exc.response.headers, exc.response.content, False)
        parsed: Any = raw.parse()
        if inspect.isawaitable(parsed):  # Anthropic's async raw response
            parsed = await parsed
        if step.op == "hold" and step.body.get("stream"):
            await parsed.__aiter__().__anext__()  # its first event read (see `InboundHost`)

    async def finish(drop: bool = False) -> dict[str, Any]:
        if drop:
            await parsed.close()
            return DROPPED
        cut = False
        try:
            if step.body.get("stream"):
                async for _ in parsed:
                    pass
        except (httpx2.HTTPError, openai.APIError, anthropic.APIError):
            cut = True
        return seen(raw.status_code, raw.headers, None, cut)

    return finish if step.op == "hold" else await finish()


def settings_for(tmp_path: Path, seed: int, name: str, made: dict[str, Any], reserve: bool) -> Any:
    extra = {"redis_url": REDIS_URL, "redis_timeout_seconds": 10} if made["redis"] else {}
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": PRICES}))
    return BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/{seed}-{name}.db",
        pricing_file=prices,
        flush_interval_seconds=3600,
        cache_ttl_seconds=86400,
        slot_ttl_seconds=3600,
        reserve=reserve,
        exceeded_status=made["exceeded_status"],
        mode=made["mode"],
        require_virtual_key=made["require_virtual_key"],
        unpriced_models=made["unpriced_models"],
        **extra,
    )


ADAPTERS = ("asgi", "wsgi", "outbound", "outbound-sync")


@contextlib.contextmanager
def sides(
    tmp_path: Path, seed: int, made: dict[str, Any], reserve: bool, clock: FrozenClock
) -> Iterator[list[Side]]:
    begun = datetime.fromtimestamp(clock.now, UTC)
    loop = asyncio.new_event_loop()  # the async sides' (run a step at a time, then stopped)
    stack = AsyncExitStack()
    out: list[Side] = []
    try:
        for name in ADAPTERS:
            engine = BudgetEngine(settings_for(tmp_path, seed, name, made, reserve), clock=clock)
            if made["redis"]:  # each side its own counters
                prefix = unique_prefix()
                use_prefix(engine, prefix)
                stack.callback(delete_prefix, REDIS_URL, prefix)
            Ids.making = name
            Ids.made.pop(name, None)
            try:
                names = populate(engine, made, begun)
            finally:
                Ids.making = None
            side = Side(name, engine, names, {})
            key_id = next(id_ for id_, owner in names.items() if owner == "key")
            if name == "asgi":
                app = BudgetMiddleware(InboundHost(answers=side.answers), engine=engine)
                loop.run_until_complete(stack.enter_async_context(running(app)))
                transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # type: ignore[arg-type]
                http = httpx.AsyncClient(transport=transport, base_url="http://test")

                host = InboundHost(answers=side.answers)
                app = BudgetMiddleware(host, engine=engine)
                loop.run_until_complete(stack.enter_async_context(running(app)))
                transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # type: ignore[arg-type]
                http = httpx.AsyncClient(transport=transport, base_url="http://test")
                side.send = functools.partial(asgi_send, loop, host, http)
                side.run = lambda work: loop.run_until_complete(work())
                stack.push_async_callback(http.aclose)
            elif name == "wsgi":
                client = Client(BudgetWSGIMiddleware(wsgi_host(side.answers), engine=engine))

                side.send = functools.partial(wsgi_post, client)
                side.run = lambda work, engine=engine: on_loop(engine, work)
            elif name == "outbound":
                transport2 = BudgetTransport(httpx2.MockTransport(provider(side.answers)),
                                             engine=engine)  # fmt: skip
                client2 = httpx2.AsyncClient(transport=transport2)
                sdks = (
                    openai.AsyncOpenAI(api_key="sk-provider", base_url=f"{GATEWAY}/v1",
                                       max_retries=0, http_client=client2),
                    anthropic.AsyncAnthropic(api_key="sk-provider", base_url=GATEWAY,
                                             max_retries=0, http_client=client2),
                )  # fmt: skip
                side.send = functools.partial(outbound_send, loop, sdks, key_id)
                side.run = lambda work: loop.run_until_complete(work())
                stack.push_async_callback(client2.aclose)
            else:
                sync = BudgetSyncTransport(httpx2.MockTransport(provider(side.answers)),
                                           engine=engine)  # fmt: skip
                client3 = httpx2.Client(transport=sync)
                sync_sdks = (
                    openai.OpenAI(api_key="sk-provider", base_url=f"{GATEWAY}/v1",
                                  max_retries=0, http_client=client3),
                    anthropic.Anthropic(api_key="sk-provider", base_url=GATEWAY,
                                        max_retries=0, http_client=client3),
                )  # fmt: skip
                side.send = functools.partial(sync_sdk_call, sync_sdks, key_id)
                side.run = lambda work, engine=engine: on_loop(engine, work)
                stack.callback(client3.close)
            out.append(side)
        yield out
    finally:
        for side in out:
            side.run(side.engine.shutdown)
        loop.run_until_complete(stack.aclose())
        loop.close()
        for side in out:
            side.engine.store.dispose()


async def asgi_post(http: httpx.AsyncClient, step: Step) -> dict[str, Any]:
    answer = await http.post(path_of(step), content=raw(step), headers=json_headers(step))
    assert step.answer is not None
    cut = step.answer.kind == "stream_raise" and answer.status_code == 200
    return seen(answer.status_code, answer.headers, answer.content, cut)


def asgi_send(
    loop: asyncio.AbstractEventLoop, host: InboundHost, http: httpx.AsyncClient, step: Step
) -> Sent:
    async def start() -> Sent:
        task = asyncio.create_task(asgi_post(http, step))
        if step.op != "hold":
            return await task
        entered = host.entered.setdefault(step.rid, asyncio.Event())
        waiting = asyncio.create_task(entered.wait())
        await asyncio.wait({task, waiting}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            return task.result()
        assert entered.is_set(), f"{step.rid} neither answered nor in"

        def release(drop: bool) -> dict[str, Any]:
            if drop:  # the client gone: its server cancels the app
                task.cancel()
                loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
                return DROPPED
            host.gates.setdefault(step.rid, asyncio.Event()).set()
            return loop.run_until_complete(asyncio.wait_for(task, 20))

        return release

    return loop.run_until_complete(start())


def wsgi_post(client: Client, step: Step) -> Sent:
    answer = client.post(
        path_of(step),
        data=raw(step),
        headers=inbound_headers(step),
        content_type="application/json",
        buffered=False,
    )

    def finish(drop: bool = False) -> dict[str, Any]:
        if drop:
            answer.close()
            return DROPPED
        cut = False
        try:
            body: bytes | None = answer.get_data()
        except RuntimeError:
            body, cut = None, True
        finally:
            answer.close()
        return seen(answer.status_code, answer.headers, body, cut)

    return finish if step.op == "hold" and answer.status_code < 400 else finish()


def outbound_send(loop: asyncio.AbstractEventLoop, sdks: Any, key_id: str, step: Step) -> Sent:
    out = loop.run_until_complete(async_sdk_call(sdks, key_id, step))
    if callable(out):
        return lambda drop: loop.run_until_complete(out(drop))
    return out


def sequence(rng: random.Random, length: int) -> list[Step]:
    steps: list[Step] = []
    held: list[str] = []
    for n in range(length):
        roll = rng.random()
        if held and (roll < 0.15 or len(held) >= 3):
            rid = held.pop(rng.randrange(len(held)))
            steps.append(Step("release", rid, seconds=1.0 if rng.random() < 0.25 else 0.0))
        elif roll < 0.04:
            steps.append(Step("reset", pick=rng.randrange(1000)))
        elif roll < 0.08:
            owner = rng.choice(["customer", "team", "key"])
            if rng.random() < 0.5:
                change: dict[str, Any] = {"budgets": budgets(rng, 1)}
            else:
                change = {"rate_limit": rate_limit(rng, 1)}
            steps.append(Step("terms", owner=owner, change=change))
        elif roll < 0.11:
            steps.append(Step("flush"))
        elif roll < 0.17:
            seconds = rng.choice([0.25, 1, 5, 20, 29.75, 30, 31, 45, 60, 61])
            steps.append(Step("advance", seconds=seconds))
        else:
            # A stream held open (its headers sent, its body waiting): its slot and
            # reservation held until it is released.
            hold = "after" if rng.random() < 0.25 else ""
            step = request(rng, f"r{n}", hold)
            assert step.answer is not None
            if hold and not step.answer.kind.startswith("stream"):
                step.op, step.answer.hold = "send", ""
            elif hold:
                held.append(step.rid)
            if rng.random() < 0.08:
                step.answer.kind = "error4xx"
                step.body.pop("stream", None)
                step.body.pop("stream_options", None)
            if "authorization" in step.headers and rng.random() < 0.05:
                step.headers["authorization"] = f"Bearer {UNKNOWN}"
            steps.append(step)
    steps += [Step("release", rid) for rid in held]
    return steps


def refusals_and_counts(engine: BudgetEngine) -> tuple[Any, ...]:
    stats = engine.stats
    counts = (stats.admitted, dict(stats.refused), dict(stats.shadow_refusals))
    counts += (stats.input_tokens, stats.output_tokens, stats.unpriced_requests)
    return list(engine.hooks.recent_refusals), counts


@dataclass
class Tally:
    sequences: int = 0
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    anthropic: int = 0  # requests to Anthropic's messages API
    held: int = 0  # streams held open while others came (`dropped` among them: closed unread)
    differences: list[str] = field(default_factory=list)


def compared(name: str, reference: dict[str, Any], other: dict[str, Any]) -> tuple[Any, Any]:
    """What of two answers is compared: an outbound call's answer that is the provider's has
    no limit headers of ours (SPEC §13)."""
    if name.startswith("outbound") and reference.get("code") not in REFUSALS:
        reference = {k: v for k, v in reference.items() if k not in LIMIT_HEADERS}
    if name.startswith("outbound") and reference.get("code") == "virtual_key_required":
        # Its message says how to give a key to an outbound call (`charge_to`).
        reference, other = dict(reference), dict(other)
        assert "charge_to" in other.pop("message", "")
        reference.pop("message")
    return reference, other


def run_sequence(tmp_path: Path, seed: int, length: int, tally: Tally, keep: Any = None) -> None:
    """One seed's sequence on every side (`keep`: which of its steps to run, to narrow a
    difference down)."""
    rng = random.Random(seed)
    made = contents(rng)
    made["mode"] = random.Random(-seed).choice(["enforce", "enforce", "enforce", "shadow"])
    reserve = rng.random() < 0.6
    steps = sequence(rng, length)
    more = random.Random(f"more {seed}")  # what `test_backend_diff` does not vary
    made["require_virtual_key"] = more.random() < 0.15
    # Every third sequence counts in Redis (`ADAPTER_STORE`: `memory` or `redis` for all).
    store = os.environ.get("ADAPTER_STORE") or ("redis" if seed % 3 == 2 and REDIS_UP else "memory")
    made["redis"] = store == "redis"
    made["unpriced_models"] = more.choice(["allow", "allow", "refuse"])
    openai_config, anthropic_config = made["provider_configs"]
    if more.random() < 0.3:
        openai_config["allowed_models"] = more.sample(["gpt-4o", "gpt-4o-mini", "gpt-4o*"], 1)
    if more.random() < 0.3:
        openai_config["blocked_models"] = more.sample(["gpt-4o", "gpt-4o-mini"], 1)
    if more.random() < 0.2:
        anthropic_config["blocked_models"] = ["claude-3-haiku"]
    if more.random() < 0.15:
        made["provider_configs"] = [openai_config]  # anthropic not the key's
    for step in steps:
        if step.op in ("send", "hold") and more.random() < 0.05:
            step.body["model"] = more.choice(["openai/gpt-unpriced", "claude-3-haiku"])
        if step.answer is not None and "claude" in step.body["model"] and more.random() < 0.5:
            step.answer = Reply(**vars(step.answer), api="anthropic")  # `/v1/messages`
            step.body.pop("stream_options", None)
            step.body.setdefault("max_tokens", 1024)  # Anthropic's API needs it
        if step.op in ("send", "hold"):  # how the key and tags are given
            step.owner = more.choice(
                ["", "", "x-budget-key", "x-api-key", "by-id", "tags-in-payer"]
            )
        if (
            step.answer is not None
            and step.answer.kind in ("json", "cost", "error")
            and more.random() < 0.2
        ):
            step.answer.kind += "_gzip"  # its body gzip-coded
        if step.op == "terms" and step.owner == "key" and more.random() < 0.3:
            step.change = {"is_active": more.random() < 0.5}
    if keep is not None:
        steps = [step for n, step in enumerate(steps) if keep(n, step)]
        steps += [Step("release", step.rid) for step in steps if step.op == "hold"]
    clock = StoreTime.clock = FrozenClock()
    clock.now = T0
    where = f"seed {seed} (reserve {reserve}, {made['mode']}, {store})"
    started: dict[str, Step] = {}
    with sides(tmp_path, seed, made, reserve, clock) as every:
        for step in steps:
            clock.advance(0.001)
            if step.op == "advance":
                clock.advance(step.seconds)
                continue
            if step.op == "flush":
                for side in every:
                    side.run(side.engine.flush)
                    side.run(side.engine.sweep)
                continue
            if step.op in ("reset", "terms"):
                for side in every:
                    side.apply(step)
                continue
            results: dict[str, dict[str, Any]] = {}
            if step.op == "release":
                if step.rid not in every[0].pending:  # refused when it came, on every side
                    continue
                for side in every:
                    # `seconds`: the client went away (the answer closed unread)
                    results[side.name] = side.pending.pop(step.rid)(bool(step.seconds))
                step = started[step.rid]
            else:
                assert step.answer is not None
                started[step.rid] = step
                for side in every:
                    side.answers[step.rid] = step.answer
                    sent = side.send(step)
                    if callable(sent):
                        side.pending[step.rid] = sent
                    else:
                        results[side.name] = sent
                if len(results) not in (0, len(every)):
                    tally.differences.append(
                        f"{where} {step.rid}: answered by {sorted(results)} only: {results}"
                    )
                    for side in every:
                        if step.rid in side.pending:
                            results[side.name] = side.pending.pop(step.rid)(False)
                if not results:
                    continue
            tally.requests += 1
            tally.anthropic += anthropic_of(step.answer)
            tally.held += step.op == "hold"
            reference = results["asgi"]
            code = str(reference.get("code", reference.get("status", "dropped")))
            tally.codes[code] = tally.codes.get(code, 0) + 1
            for name, answer in results.items():
                a, b = compared(name, reference, answer)
                if a != b:
                    tally.differences.append(
                        f"{where} {step.rid} {step.body.get('model')} "
                        f"max_tokens={step.body.get('max_tokens')} {step.headers} "
                        f"{step.answer}: asgi {a} / {name} {b}"
                    )
        for side in every:
            side.run(side.engine.flush)
        tally.sequences += 1
        figures = {
            side.name: (spend(side.engine, side.names, clock.now), records(side.engine, side.names))
            for side in every
        }
        # The refusals told (`GET /refusals`, `on_refusal`) and the metrics' counts.
        told = {side.name: refusals_and_counts(side.engine) for side in every}
    for name, refused in told.items():
        if refused != told["asgi"]:
            tally.differences.append(f"{where} refusals: asgi {told['asgi']} / {name} {refused}")
    for name, (spent, kept) in figures.items():
        if spent != figures["asgi"][0]:
            diff = {
                k: (v, spent.get(k)) for k, v in figures["asgi"][0].items() if spent.get(k) != v
            }
            tally.differences.append(f"{where} spend: asgi / {name} {diff}")
        if kept != figures["asgi"][1]:
            tally.differences.append(
                f"{where} records: only asgi {sorted(set(figures['asgi'][1]) - set(kept))} / "
                f"only {name} {sorted(set(kept) - set(figures['asgi'][1]))}"
            )


@pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning")
def test_the_three_adapters_meter_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "datetime", StoreTime)
    monkeypatch.setattr(durations, "datetime", StoreTime)
    monkeypatch.setattr(tables, "uuid", Ids)
    tally = Tally()
    began = time.monotonic()
    first = int(os.environ.get("ADAPTER_FIRST", "0"))
    for seed in range(first, first + int(os.environ.get("ADAPTER_SEQUENCES", "20"))):
        run_sequence(tmp_path, seed, int(os.environ.get("ADAPTER_LENGTH", "30")), tally)
        gc.collect()
    print(
        f"{tally.sequences} sequences, {tally.requests} requests compared on 4 adapters in "
        f"{time.monotonic() - began:.1f} s ({tally.anthropic} to Anthropic's API, {tally.held} "
        f"held); {len(tally.differences)} differences; "
        f"answers: {tally.codes}"
    )
    for line in tally.differences:
        print(line)
    # Compared, and of several kinds: served and refused (a run that compared nothing passed)
    assert tally.requests >= 10 * tally.sequences > 0
    assert len(tally.codes) >= 3, tally.codes
    assert not tally.differences
