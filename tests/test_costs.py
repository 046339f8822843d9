"""What a response cost (SPEC §7), and what bad input costs: header, usage.cost, file, catalog."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Form, Request, Response
from genai_prices import Usage, calc_price, extract_usage
from sqlmodel import select
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine
from budget_middleware.core.pricing import estimate_nanos, for_service_tier
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import UsageRecordRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "openai/gpt-4o": {"input_per_mtok": 0, "output_per_mtok": 2},
                    "house-model": {"input_per_mtok": 1, "output_per_mtok": 1},
                }
            }
        )
    )
    return path


async def records(engine: Any) -> list[UsageRecordRow]:
    await engine.flush()
    with engine.store.session() as s:
        return list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]


async def test_each_price_source_decides_in_its_turn(
    make_settings: Settings, pricing_file: Path
) -> None:
    app = host_app(make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        header = await http.post(
            "/v1/chat/completions",
            json=chat(max_tokens=100),
            headers={"x-mock-header-cost": "0.25", "x-mock-cost": "0.5"},
        )
        body_cost = await http.post(
            "/v1/chat/completions", json=chat(max_tokens=100), headers={"x-mock-cost": "0.5"}
        )
        from_file = await http.post("/v1/chat/completions", json=chat(max_tokens=100))
        catalog = await http.post(
            "/v1/chat/completions", json=chat("openai/gpt-4o-mini", max_tokens=100)
        )
        rows = await records(engine)
    assert "x-budget-cost" not in header.headers  # the host's signal never reaches the client
    assert [(r.cost_source, r.cost_nanos) for r in rows[:3]] == [
        ("header", 250_000_000),
        ("usage", 500_000_000),
        ("pricing_file", 100 * 2_000),  # 100 output tokens at $2/Mtok
    ]
    usage = catalog.json()["usage"]
    want = calc_price(
        Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]),
        model_ref="gpt-4o-mini",
        provider_id="openai",
    ).total_price
    assert rows[3].cost_source == "catalog"
    assert abs(rows[3].cost_nanos - int(want * 10**9)) <= 1
    assert from_file.status_code == body_cost.status_code == 200


async def test_cached_tokens_are_priced_at_the_cached_rate(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(max_tokens=10),
            headers={"x-mock-cached-tokens": "1000"},
        )
        rows = await records(engine)
    usage = answer.json()["usage"]
    want = calc_price(
        Usage(
            input_tokens=usage["prompt_tokens"],
            cache_read_tokens=1000,
            output_tokens=usage["completion_tokens"],
        ),
        model_ref="gpt-4o",
        provider_id="openai",
    ).total_price
    assert rows[0].cached_tokens == 1000
    assert abs(rows[0].cost_nanos - int(want * 10**9)) <= 1


async def test_a_model_without_a_price_costs_zero_and_is_counted(make_settings: Settings) -> None:
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        for _ in range(2):
            answer = await http.post("/v1/chat/completions", json=chat("acme/secret-model"))
            assert answer.status_code == 200
        rows = await records(engine)
    assert [(r.cost_source, r.cost_nanos) for r in rows] == [("unpriced", 0), ("unpriced", 0)]
    assert engine.stats.unpriced_requests == 2
    assert ("acme", "secret-model") in engine.prices.unpriced


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "gpt-4o", "messages": [', "application/json"),  # malformed JSON
        (b"model=gpt-4o&prompt=hi", "application/x-www-form-urlencoded"),  # not JSON
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "application/json"),  # no model
        (b"[1, 2, 3]", "application/json"),  # JSON, not an object
    ],
)
async def test_bad_request_bodies_reach_the_app_and_cost_what_its_answer_says(
    make_settings: Settings, content: bytes, content_type: str
) -> None:
    settings = make_settings()
    bare = host_app(None)
    app = host_app(settings)
    engine = engine_of(app)
    async with running(app), client(app) as http, client(bare) as plain:
        got = await http.post(
            "/v1/chat/completions", content=content, headers={"content-type": content_type}
        )
        want = await plain.post(
            "/v1/chat/completions", content=content, headers={"content-type": content_type}
        )
        rows = await records(engine)
    assert (got.status_code, got.json()) == (want.status_code, want.json())
    assert got.status_code == 400
    # (URL-encoded fields are read as a route of `Form(...)` fields reads them: its model)
    named = "gpt-4o" if content_type.endswith("urlencoded") else "unknown"
    assert [(r.status, r.cost_nanos, r.model) for r in rows] == [(400, 0, named)]


def failing_app(settings: BudgetSettings) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def explode() -> None:
        raise RuntimeError("upstream blew up")

    app.add_middleware(BudgetMiddleware, settings=settings)
    return app


async def test_errors_of_the_app_stay_the_apps_and_cost_nothing(make_settings: Settings) -> None:
    app = host_app(make_settings())
    bare = host_app(None)
    engine = engine_of(app)
    async with running(app), client(app) as http, client(bare) as plain:
        upstream_503 = await http.post(
            "/v1/chat/completions", json=chat(), headers={"x-mock-status": "503"}
        )
        want = await plain.post(
            "/v1/chat/completions", json=chat(), headers={"x-mock-status": "503"}
        )
        rows = await records(engine)
    assert (upstream_503.status_code, upstream_503.json()) == (503, want.json())
    assert [(r.status, r.cost_nanos, r.outcome) for r in rows] == [(503, 0, "completed")]


async def test_a_redirect_is_charged_nothing_only_the_answer_it_leads_to(
    make_settings: Settings,
) -> None:
    # FastAPI answers `/v1/chat/completions/` with its own 307 to the path without the slash:
    # no model ran, so the redirect costs nothing; the request it leads to is charged.
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post("/v1/chat/completions/", json=chat(), follow_redirects=True)
        rows = await records(engine)
    seen = [(r.status, r.cost_nanos, r.estimated) for r in rows]
    print("records (status, nano-dollars, estimated):", seen)
    assert answer.status_code == 200
    assert [r.status_code for r in answer.history] == [307]
    assert seen[0] == (307, 0, False)
    assert seen[1][0] == 200 and seen[1][1] > 0


async def test_an_app_that_raises_gets_its_own_500_and_is_charged_nothing(
    make_settings: Settings,
) -> None:
    crashing = failing_app(make_settings())
    engine = engine_of(crashing)
    transport = httpx.ASGITransport(crashing, raise_app_exceptions=False)
    async with (
        running(crashing),
        httpx.AsyncClient(transport=transport, base_url="http://t") as http,
    ):
        answer = await http.post("/v1/chat/completions", json=chat())
        rows = await records(engine)
    assert answer.status_code == 500  # Starlette's own error page, not ours
    assert answer.text == "Internal Server Error"
    assert [(r.status, r.cost_nanos, r.outcome) for r in rows] == [(0, 0, "upstream_error")]


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": 107},
        {"prompt_tokens": "ten", "completion_tokens": "7.5"},  # ("10" is a count: 10)
    ],
    ids=["null-counts", "text-counts"],
)
async def test_a_2xx_answer_whose_counts_cannot_be_read_is_charged_an_estimate(
    make_settings: Settings, pricing_file: Path, usage: dict[str, Any]
) -> None:
    """Counts that are null or text are no usage at all: the answer is charged an estimate of
    its prompt and of the text it answered, and marked so (it was charged a silent $0 as if it
    had used no token)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completion() -> dict[str, Any]:
        return {"choices": [{"message": {"content": "fine"}}], "usage": usage}

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    async with running(wrapped), client(wrapped) as http:
        answer = await http.post("/v1/chat/completions", json=chat("house-model"))
        rows = await records(wrapped.engine)
    row = rows[0]
    print("charged:", row.input_tokens, row.output_tokens, row.cost_nanos, row.estimated, row.note)
    assert answer.status_code == 200
    assert row.estimated and row.note == "no usage in the response"
    assert (row.output_tokens, row.cost_nanos) == (1, (row.input_tokens + 1) * 1_000)  # "fine"


async def test_a_compressed_request_body_is_read_and_charged(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A client that gzips its request (`content-encoding: gzip`, for a host that takes it):
    the middleware reads the model from a decoded copy and the app gets the body as sent;
    one rewritten for a route goes as plain JSON, without the encoding. It was metered as
    provider and model "unknown", unpriced: charged $0 and no model limit applied. A body
    over BUDGET_MAX_BODY_BYTES once decoded is a 413."""
    import gzip

    seen: list[tuple[str | None, str]] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completion(request: Request) -> dict[str, Any]:
        raw = await request.body()
        encoding = request.headers.get("content-encoding")
        body = json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
        seen.append((encoding, body["model"]))
        usage = {"prompt_tokens": 0, "completion_tokens": 1000}
        return {"model": body["model"], "choices": [], "usage": usage}

    settings = make_settings(pricing_file=pricing_file, max_body_bytes=4096)
    wrapped = BudgetMiddleware(app, settings=settings)
    engine = wrapped.engine
    async with running(wrapped), client(wrapped) as http:
        engine.manager.create_route(name="best", targets=["openai/gpt-4o"], strategy="ordered")
        sent = [
            await http.post(
                "/v1/chat/completions",
                content=gzip.compress(json.dumps(chat(model)).encode()),
                headers={"content-encoding": "gzip", "content-type": "application/json"},
            )
            for model in ("openai/gpt-4o", "best")
        ]
        huge = chat(messages=[{"role": "user", "content": "x" * 10_000}])
        too_large = await http.post(
            "/v1/chat/completions",
            content=gzip.compress(json.dumps(huge).encode()),
            headers={"content-encoding": "gzip"},
        )
        rows = await records(engine)
    print("the app saw:", seen, "; charged:", [(r.provider, r.model, r.cost_nanos) for r in rows])
    assert [a.status_code for a in sent] == [200, 200] and too_large.status_code == 413
    assert seen == [("gzip", "openai/gpt-4o"), (None, "openai/gpt-4o")]
    assert [(r.provider, r.model, r.cost_nanos) for r in rows] == [
        ("openai", "gpt-4o", 2_000_000)
    ] * 2


def _compressing_app(settings: BudgetSettings, seen: list[str | None]) -> FastAPI:
    """A completion answered in the best coding the request accepts, as a compressing
    middleware inside ours would: br (which the middleware cannot read; the bytes stand for
    it), else gzip, else plain JSON. It keeps the `accept-encoding` it was sent."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completion(request: Request) -> Response:
        asked = await request.json()
        accepted = request.headers.get("accept-encoding")
        seen.append(accepted)
        document = {
            "id": "c",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": asked["max_tokens"] // 2},
        }
        body = json.dumps(document).encode()
        offered = [c.split(";")[0].strip() for c in (accepted or "").split(",")]
        if "br" in offered:
            return Response(b"\x1b\x8f\x00 not decodable here", headers={"content-encoding": "br"})
        if "gzip" in offered:
            return Response(gzip.compress(body), headers={"content-encoding": "gzip"})
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health(request: Request) -> dict[str, str | None]:
        return {"accept": request.headers.get("accept-encoding")}

    app.add_middleware(BudgetMiddleware, settings=settings)
    return app


@pytest.mark.parametrize(
    ("accepted", "app_gets"),
    [
        ("br, gzip;q=0.8, zstd", "gzip;q=0.8"),
        ("gzip, deflate, br", "gzip, deflate"),
        ("br", "identity"),
        ("*", "identity"),
        ("gzip, deflate", "gzip, deflate"),
    ],
)
async def test_a_metered_request_asks_the_app_only_for_codings_whose_usage_can_be_read(
    make_settings: Settings, pricing_file: Path, accepted: str, app_gets: str
) -> None:
    """A client that accepts br or zstd (a browser, httpx with brotli installed) would get an
    answer whose usage cannot be read: the app is asked for the codings that can be, and the
    charge is exact. A request that is not metered keeps its header as sent."""
    seen: list[str | None] = []
    app = _compressing_app(make_settings(pricing_file=pricing_file), seen)
    engine = engine_of(app)
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/chat/completions",
            json=chat("house-model", max_tokens=100),
            headers={"accept-encoding": accepted},
        )
        health = await http.get("/health", headers={"accept-encoding": accepted})
        rows = await records(engine)
    print(f"client accepted {accepted!r}; the app was asked {seen}; charged", rows[0].cost_nanos)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 50
    assert seen == [app_gets] and health.json() == {"accept": accepted}
    assert (rows[0].input_tokens, rows[0].output_tokens, rows[0].estimated) == (20, 50, False)
    assert rows[0].cost_nanos == (20 + 50) * 1000  # house-model: $1 per million tokens each


async def test_an_answer_in_a_coding_that_cannot_be_read_is_charged_its_most_output(
    make_settings: Settings, pricing_file: Path
) -> None:
    """An app that answers br although it was not asked to (or a gzip body that is corrupt):
    nothing of the answer can be read, so it is charged the most it could have cost, as its
    reservation counted it (its output limit), estimated and said so; never its prompt alone."""
    app = FastAPI()
    answers = iter(
        [
            Response(b"\x1b\x8f\x00 brotli bytes", headers={"content-encoding": "br"}),
            Response(
                gzip.compress(b'{"usage": {}}')[:-6] + b"bad!!!",
                headers={"content-encoding": "gzip"},
            ),
        ]
    )

    @app.post("/v1/chat/completions")
    async def completion() -> Response:
        return next(answers)

    app.add_middleware(BudgetMiddleware, settings=make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        for max_tokens in (300, 700):
            body = chat("house-model", max_tokens=max_tokens)
            async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                async for _ in answer.aiter_raw():  # as sent: the client cannot decode it either
                    pass
        rows = await records(engine)
    print("charged", [(r.input_tokens, r.output_tokens, r.cost_nanos, r.note) for r in rows])
    assert [(r.output_tokens, r.estimated) for r in rows] == [(300, True), (700, True)]
    assert [r.cost_nanos for r in rows] == [(r.input_tokens + r.output_tokens) * 1000 for r in rows]
    assert rows[0].note == "content-encoding br not readable: charged its most output"
    assert rows[1].note is not None and rows[1].note.endswith(": charged its most output")


@pytest.mark.parametrize("kind", ["json", "stream"])
async def test_an_answer_declared_gzip_but_corrupt_charges_the_key_its_most_output(
    make_settings: Settings, pricing_file: Path, kind: str
) -> None:
    """A 200 whose body says `content-encoding: gzip` but is no gzip, JSON or a stream: its
    usage cannot be read, so the key's budget is charged the most the request could have cost
    (its reservation: `max_tokens` of output), the record estimated and saying why (SPEC §6
    reservation, §7); the outbound transport does the same (tests/test_outbound.py)."""
    app = FastAPI()
    kinds = {"json": "application/json", "stream": "text/event-stream"}

    @app.post("/v1/chat/completions")
    async def completion() -> Response:
        body = gzip.compress(b'data: {"usage": {"prompt_tokens": 1}}\n\n' * 20)
        return Response(
            body[:-12] + b"not gzip at all",
            headers={"content-encoding": "gzip", "content-type": kinds[kind]},
        )

    app.add_middleware(BudgetMiddleware, settings=make_settings(pricing_file=pricing_file))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="k", budgets=[{"max_limit": 10}])
        body = chat("house-model", max_tokens=400, stream=kind == "stream")
        headers = {"x-budget-key": key.value}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            async for _ in r.aiter_raw():
                pass
        rows = await records(engine)
        spent = engine.manager.list_budgets()[0].spent
    print(kind, [(r.input_tokens, r.output_tokens, r.cost_nanos, r.note) for r in rows], spent)
    assert r.status_code == 200 and len(rows) == 1
    row = rows[0]
    assert (row.output_tokens, row.estimated) == (400, True) and row.input_tokens > 0
    assert row.cost_nanos == (row.input_tokens + 400) * 1000  # house-model: $1 / $1 per Mtok
    assert row.note is not None and row.note.startswith("corrupt gzip body")
    assert row.note.endswith(": charged its most output")
    assert spent == pytest.approx(row.cost_nanos / 1e9)


@pytest.mark.parametrize(
    ("answer", "chars"),
    [
        ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400}}]}, 400),
        ({"choices": [{"index": 0, "text": "y" * 120, "finish_reason": "stop"}]}, 120),
        (
            {
                "id": "msg_1",
                "type": "message",
                "content": [
                    {"type": "text", "text": "z" * 200},
                    {"type": "tool_use", "id": "toolu_1", "input": {"city": "w" * 40}},
                ],
            },
            200 + len('{"city":"') + 40 + len('"}'),  # the input: the JSON the model wrote
        ),
        (
            {
                "output": [
                    {"type": "message", "content": [{"type": "output_text", "text": "v" * 80}]},
                    {"type": "function_call", "call_id": "c1", "arguments": "u" * 20},
                ]
            },
            100,
        ),
        (
            {
                "choices": [
                    {
                        "message": {
                            "content": None,
                            "tool_calls": [{"id": "call_1", "function": {"arguments": "t" * 60}}],
                        }
                    }
                ]
            },
            60,
        ),
    ],
    ids=["chat", "completion", "anthropic", "responses", "tool-call"],
)
async def test_a_json_answer_without_usage_is_charged_the_text_it_answered(
    make_settings: Settings, pricing_file: Path, answer: dict[str, Any], chars: int
) -> None:
    """An upstream that reports no usage (some OpenAI-compatible servers): the answer's
    generated text is estimated at 4 characters a token, as a stream's is, beside the prompt
    (the output was free: 400 characters answered, 0 tokens charged)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completion() -> dict[str, Any]:
        return answer

    wrapped = BudgetMiddleware(app, settings=make_settings(pricing_file=pricing_file))
    async with running(wrapped), client(wrapped) as http:
        await http.post("/v1/chat/completions", json=chat("house-model", max_tokens=1000))
        rows = await records(wrapped.engine)
    row = rows[0]
    print(f"{chars} characters answered: charged", row.output_tokens, "output tokens", row.note)
    assert (row.output_tokens, row.estimated) == ((chars + 3) // 4, True)
    assert row.cost_nanos == (row.input_tokens + row.output_tokens) * 1_000


async def charged_for(
    make_settings: Settings,
    path: str,
    model: str,
    answer: dict[str, Any] | list[dict[str, Any]],
    done: bool = True,
    **asked: Any,
) -> UsageRecordRow:
    """The usage record of one request (its body's other fields `asked`) whose app answers
    `answer`: a JSON body, or (a list) the events of a `text/event-stream` (named by their `type`
    when they have one, as Anthropic's and the Responses API's are; OpenAI chat chunks unnamed,
    then `[DONE]`, unless not `done`)."""
    app = FastAPI()
    streamed = isinstance(answer, list)

    @app.post(path)
    async def answer_it() -> Response:
        if not isinstance(answer, list):
            return Response(json.dumps(answer), media_type="application/json")
        events = [
            (f"event: {e['type']}\n" if "type" in e else "") + f"data: {json.dumps(e)}\n\n"
            for e in answer
        ]
        if done and not any("type" in e for e in answer):  # (not `done`: cut before it)
            events.append("data: [DONE]\n\n")
        return Response("".join(events), media_type="text/event-stream")

    wrapped = BudgetMiddleware(app, settings=make_settings())
    async with running(wrapped), client(wrapped) as http:
        sent = await http.post(path, json=chat(model, stream=streamed, **asked))
        assert sent.status_code == 200
        rows = await records(wrapped.engine)
    return rows[-1]  # this request's: the store may hold an earlier one's of the same test


def nanos(usage: Usage, model: str, provider: str) -> int:
    """genai-prices' own price of this usage, in nano-dollars."""
    return int(calc_price(usage, model, provider_id=provider).total_price * 10**9)


def anthropic_answer(
    usage: dict[str, Any], stream: bool, model: str = "claude-sonnet-4-20250514"
) -> dict[str, Any] | list[dict[str, Any]]:
    """An Anthropic message reporting `usage`; streamed: `message_start` with the input counts
    and 1 output token, then a `message_delta` that repeats them all, cumulative, as Anthropic
    does."""
    if not stream:
        content = [{"type": "text", "text": "hi"}]
        return {"type": "message", "model": model, "content": content, "usage": usage}
    start = {k: v for k, v in usage.items() if k != "server_tool_use"} | {"output_tokens": 1}
    return [
        {"type": "message_start", "message": {"model": model, "usage": start}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
        {"type": "message_stop"},
    ]


# An Anthropic usage with cache writes of both TTLs: 1,000 for 5 minutes, 2,000 for an hour.
CACHE_WRITES: dict[str, Any] = {
    "input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "cache_creation_input_tokens": 3000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 500,
}


def chat_answer(
    usage: dict[str, Any], stream: bool, model: str
) -> dict[str, Any] | list[dict[str, Any]]:
    """A chat completion answering with `usage`: JSON, or its chunks (`stream`), the usage in the
    last, usage-only one."""
    if not stream:
        return {"model": model, "choices": [], "usage": usage}
    return [
        {"model": model, "choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {"model": model, "choices": [], "usage": usage},
    ]


def cache_writes_price(model: str) -> int:
    """What genai-prices charges `CACHE_WRITES` on `model`, in nano-dollars."""
    usage = Usage(
        input_tokens=5100,
        cache_read_tokens=2000,
        cache_write_tokens=3000,
        cache_write_5m_tokens=1000,
        cache_write_1h_tokens=2000,
        output_tokens=500,
    )
    return nanos(usage, model, "anthropic")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_cache_writes_are_priced_at_their_own_ttl(
    make_settings: Settings, stream: bool
) -> None:
    """A 1-hour cache write costs 2x the input price, a 5-minute one 1.25x: Anthropic says which
    is which in `cache_creation`, and each is charged at its own price."""
    usage, model = CACHE_WRITES, "claude-sonnet-4-20250514"
    row = await charged_for(make_settings, "/v1/messages", model, anthropic_answer(usage, stream))
    want = cache_writes_price(model)
    print("1h cache writes: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (5100, 2000, 500)
    assert row.cost_nanos == want


async def test_a_gateway_s_zeroed_cache_creation_in_message_delta_lowers_no_1h_write(
    make_settings: Settings,
) -> None:
    """A gateway's `message_delta` repeating the counts with `cache_creation` zeroed replaced
    message_start's whole object: its 2,000 one-hour writes were charged as 5-minute ones (a
    review's). Nested counts, like the top-level ones, are never lowered."""
    usage, model = CACHE_WRITES, "claude-sonnet-4-20250514"
    events = anthropic_answer(usage, True)
    assert isinstance(events, list)
    zeroed = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
    events[2] = {**events[2], "usage": {**usage, "cache_creation": zeroed}}
    row = await charged_for(make_settings, "/v1/messages", model, events)
    want = cache_writes_price(model)
    print("zeroed nested counts in message_delta: charged", row.cost_nanos, "of", want)
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_audio_tokens_are_priced_at_the_audio_rates(
    make_settings: Settings, stream: bool
) -> None:
    """gpt-audio's audio costs $32/$64 per Mtok in and out, its text $2.50/$10: the audio counts
    in `prompt_tokens_details` and `completion_tokens_details` are charged at their own prices."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 600},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 400},
        "total_tokens": 1500,
    }
    message = {"index": 0, "message": {"role": "assistant", "content": None}}
    if stream:
        answer: dict[str, Any] | list[dict[str, Any]] = [
            {"model": "gpt-audio", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {"model": "gpt-audio", "choices": [], "usage": usage},
        ]
    else:
        answer = {"model": "gpt-audio", "choices": [message], "usage": usage}
    row = await charged_for(make_settings, "/v1/chat/completions", "openai/gpt-audio", answer)
    want = nanos(
        Usage(
            input_tokens=1000, input_audio_tokens=600, output_tokens=500, output_audio_tokens=400
        ),
        "gpt-audio",
        "openai",
    )
    print("audio tokens: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert (row.input_tokens, row.output_tokens) == (1000, 500)
    assert row.cost_nanos == want


@pytest.mark.parametrize(("said", "modalities"), [(400, True), (401, True), (400, False)])
async def test_a_spoken_answer_without_usage_is_estimated_its_transcript_at_the_audio_price(
    make_settings: Settings, said: int, modalities: bool
) -> None:
    """gpt-audio answering 400 characters of text and a transcript of `said` characters, with
    no usage: estimated a token per 4 characters (rounded up) of both, the transcript's at the
    audio output price ($64/Mtok, the text's $10) when audio was asked for (`modalities`), all
    at the text price when not. The transcript's share was no test's (a mutation run's
    survivors: its rounding, and a token of audio charged to an answer that asked for none)."""
    message = {
        "role": "assistant",
        "content": "y" * 400,
        "audio": {"id": "a1", "data": "", "expires_at": 0, "transcript": "x" * said},
    }
    answer = {"model": "gpt-audio", "choices": [{"index": 0, "message": message}]}
    asked = {"modalities": ["text", "audio"]} if modalities else {}
    row = await charged_for(
        make_settings, "/v1/chat/completions", "openai/gpt-audio", answer, **asked
    )
    output = (400 + said + 3) // 4
    spoken = (said + 3) // 4 if modalities else 0
    want = nanos(
        Usage(input_tokens=row.input_tokens, output_tokens=output, output_audio_tokens=spoken),
        "gpt-audio",
        "openai",
    )
    print(f"transcript {said}: {row.output_tokens} out, charged {row.cost_nanos}, want {want}")
    assert (row.output_tokens, row.estimated) == (output, True)
    assert row.cost_nanos == want


@pytest.mark.parametrize(
    ("provider", "model", "want"),
    [
        ("openai", "gpt-4o-audio-preview", 58_000_000),
        ("openai", "gpt-4o-mini-audio-preview-2024-12-17", 14_120_000),
        ("azure", "gpt-4o-audio-preview", 58_000_000),  # priced as OpenAI's by the catalog
    ],
)
async def test_audio_of_an_audio_model_without_audio_prices_is_not_charged_as_text(
    make_settings: Settings, provider: str, model: str, want: int
) -> None:
    """The catalog gives gpt-4o-audio-preview and gpt-4o-mini-audio-preview their text prices
    only ($2.50/$10, $0.15/$0.60): their audio was charged as text, 16 and 67 times too little
    in, 8 and 33 times out. They are charged the audio prices of their family (gpt-4o's $40/$80,
    gpt-4o-mini's $10/$20 per Mtok, as OpenAI bills them)."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 600},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 400},
    }
    answer = {"model": model, "choices": [{"index": 0, "message": {}}], "usage": usage}
    row = await charged_for(make_settings, "/v1/chat/completions", f"{provider}/{model}", answer)
    print(f"{provider}/{model}, 600 audio in, 400 out: {row.cost_nanos} n$, OpenAI's {want}")
    assert row.cost_nanos == want
    text = {**answer, "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    row = await charged_for(make_settings, "/v1/chat/completions", f"{provider}/{model}", text)
    assert row.cost_nanos == nanos(Usage(input_tokens=1000, output_tokens=500), model, "openai")


# An Images API answer (`/v1/images/generations`): 1,323 image tokens of the 1,373 input, 4,160
# of the 4,260 output.
IMAGES_USAGE: dict[str, Any] = {
    "input_tokens": 1373,
    "input_tokens_details": {"text_tokens": 50, "image_tokens": 1323},
    "output_tokens": 4260,
    "output_tokens_details": {"text_tokens": 100, "image_tokens": 4160},
    "total_tokens": 5633,
}
IMAGES_PATHS = ("/chat/completions", "/images/generations")


@pytest.mark.parametrize("model", ["gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini"])
async def test_images_api_image_tokens_are_priced_at_the_image_rates(
    make_settings: Settings, model: str
) -> None:
    """gpt-image-1.5 costs $8 per Mtok of image input and $32 of image output, its text $5 and
    $10 (gpt-image-1: $10 and $5 in): the Images API says which tokens are images
    (`input_tokens_details`, `output_tokens_details`), each charged at its own price, as
    genai-prices prices the same answer. All were charged as text: gpt-image-1.5's 49,465,000
    nano-USD where it bills 144,954,000 (0.34 of it), gpt-image-1's 0.96."""
    answer = {"created": 1, "data": [{"b64_json": ""}], "usage": IMAGES_USAGE}
    row = await charged_for(
        lambda **kw: make_settings(inference_paths=IMAGES_PATHS, **kw),
        "/v1/images/generations",
        f"openai/{model}",
        answer,
    )
    found = extract_usage(
        {"model": model, "usage": IMAGES_USAGE}, provider_id="openai", api_flavor="images"
    )
    want = int(found.calc_price().total_price * 10**9)
    print(f"{model}, images API: charged {row.cost_nanos} nano-USD, genai-prices says {want}")
    assert (row.input_tokens, row.output_tokens) == (1373, 4260)
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("model", ["gemini-2.5-flash-image", "gemini-3-pro-image-preview"])
async def test_a_gateway_s_image_output_tokens_are_priced_at_the_image_rate(
    make_settings: Settings, stream: bool, model: str
) -> None:
    """Gemini 2.5 Flash Image costs $30 per Mtok of image output, its text $2.50 (3 Pro Image:
    $120 and $12): a gateway's chat rendering of its answer (LiteLLM's) counts the image apart,
    `completion_tokens_details.image_tokens`. The 1,290 image tokens of an image were charged
    as text: 3,505,000 nano-USD where Google bills 38,980,000 (11 times too little)."""
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 1390,
        "total_tokens": 1490,
        "prompt_tokens_details": {"text_tokens": 100, "image_tokens": 0},
        "completion_tokens_details": {"text_tokens": 100, "image_tokens": 1290},
    }
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"gemini/{model}", answer)
    want = nanos(
        Usage(input_tokens=100, output_tokens=1390, output_image_tokens=1290), model, "google"
    )
    print(f"{model}, 1,290 image tokens out: charged {row.cost_nanos}, genai-prices says {want}")
    assert (row.input_tokens, row.output_tokens) == (100, 1390)
    assert row.cost_nanos == want


async def test_image_output_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings,
) -> None:
    """Gemini 2.5 Flash Image draws unasked, at $30 per Mtok of image output (its text $2.50):
    a request is reserved at the image price, so 60 at once on a $1 budget spend no more than
    the budget and one request. Reserved at the text price (1,400 tokens: $0.0035 where an
    image answer costs $0.039), all 60 were admitted and $2.34 spent."""
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 1390,
        "total_tokens": 1490,
        "completion_tokens_details": {"text_tokens": 100, "image_tokens": 1290},
    }
    model = "gemini-2.5-flash-image"

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse(chat_answer(usage, False, model))

    path, body = "/v1/chat/completions", chat(f"gemini/{model}", max_tokens=1400)
    each = nanos(
        Usage(input_tokens=100, output_tokens=1390, output_image_tokens=1290), model, "google"
    )
    async with budget_of_a_dollar(make_settings, path, provider) as (engine, http, key):
        served, spent = await served_and_spent(engine, http, key, path, body)
    print(f"{model}, 60 at once on $1, ${each / 1e9:.6f} each: {served} served, ${spent:.6f}")
    assert served >= 1
    assert spent <= 1 + each / 1e9 + 1e-9


# Answers of one image each, drawn by a request that asks for no output limit: (provider, model,
# path, usage). Gemini 2.5 Flash Image bills 1,290 tokens an image; 3 Pro Image 2,000 at 4K; the
# Images API's gpt-image-1.5 4,160 a 1024x1024 image at high quality. Each with 100 of text.
ONE_IMAGE_UNLIMITED = [
    (
        "gemini",
        "gemini-2.5-flash-image",
        "/v1/chat/completions",
        {
            "prompt_tokens": 10,
            "completion_tokens": 1390,
            "total_tokens": 1400,
            "completion_tokens_details": {"text_tokens": 100, "image_tokens": 1290},
        },
    ),
    (
        "gemini",
        "gemini-3-pro-image-preview",
        "/v1/chat/completions",
        {
            "prompt_tokens": 10,
            "completion_tokens": 2100,
            "total_tokens": 2110,
            "completion_tokens_details": {"text_tokens": 100, "image_tokens": 2000},
        },
    ),
    (
        "openai",
        "gpt-image-1.5",
        "/v1/images/generations",
        {
            "input_tokens": 10,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
            "output_tokens": 4260,
            "output_tokens_details": {"text_tokens": 100, "image_tokens": 4160},
            "total_tokens": 4270,
        },
    ),
]


@pytest.mark.parametrize(
    ("provider_id", "model", "path", "usage"),
    ONE_IMAGE_UNLIMITED,
    ids=["gemini-2.5-flash-image", "gemini-3-pro-image-preview", "gpt-image-1.5"],
)
async def test_images_drawn_without_an_output_limit_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings, provider_id: str, model: str, path: str, usage: dict[str, Any]
) -> None:
    """A model that draws (its image output dearer than its text) asked for no output limit
    (no `max_tokens`; the Images API has none) is reserved at least one image's tokens at the
    image price, not `BUDGET_DEFAULT_MAX_OUTPUT_TOKENS` (1,024) of them: one image is billed
    more (1,290 tokens of Gemini 2.5 Flash Image, 2,000 of 3 Pro Image at 4K, 4,160 of
    gpt-image-1.5 at high quality), so 60 at once on a $1 budget each spent past what they
    held. They spend no more than the budget and one request (at 1,024: $1.25, 32 served;
    $1.93, 8; $4.03, 30)."""
    images = path.endswith("/generations")

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        if images:
            return JSONResponse({"created": 1, "data": [{"b64_json": ""}], "usage": usage})
        return JSONResponse(chat_answer(usage, False, model))

    if images:
        body: dict[str, Any] = {"model": f"{provider_id}/{model}", "prompt": "a cat"}
        found = extract_usage(
            {"model": model, "usage": usage}, provider_id="openai", api_flavor="images"
        )
        each = int(found.calc_price().total_price * 10**9)
    else:
        body = {
            "model": f"{provider_id}/{model}",
            "messages": [{"role": "user", "content": "a cat"}],
        }
        details = usage["completion_tokens_details"]
        drawn = Usage(
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            output_image_tokens=details["image_tokens"],
        )
        each = nanos(drawn, model, "google")
    settings = lambda **kw: make_settings(inference_paths=IMAGES_PATHS, **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        served, spent = await served_and_spent(engine, http, key, path, body)
    print(
        f"{model}, 60 at once on $1, no output limit, ${each / 1e9:.6f} each: "
        f"{served} served, ${spent:.6f}"
    )
    assert served >= 1
    assert spent <= 1 + each / 1e9 + 1e-9


async def test_images_edited_by_reference_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings,
) -> None:
    """gpt-image-1.5's edits (the Images API, `/v1/images/edits` as JSON) may name their input
    images by reference (`images: [{"image_url": ...}]`, or a `file_id`), billed at $8 per
    Mtok of image input (its text $5): 16 of 4,741 tokens each here ($0.61), which the body's
    estimate does not hold. Such a request reserves as one sending media by reference does
    (SPEC §6): the most one request is charged until one is measured, then what each took, at
    the image input price. 60 at once on a $1 budget, then 60 on $5 once measured, spend no
    more than the budget and one request. The images were not seen (the body holds no
    `"type"`): 60 at once spent $2.96 of $1 (4 served) and $17.76 of $5 (24); seen and
    measured, but priced as text input, $5.92 of $5 (8); now $0.74 (1) and $3.70 (5)."""
    usage = {
        "input_tokens": 75_866,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 75_856},
        "output_tokens": 4160,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
        "total_tokens": 80_026,
    }
    model = "gpt-image-1.5"

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse({"created": 1, "data": [{"b64_json": ""}], "usage": usage})

    path = "/v1/images/edits"
    refs = [{"image_url": f"https://example.com/{n}.png"} for n in range(16)]
    body = {"model": f"openai/{model}", "prompt": "a cat", "images": refs}
    found = extract_usage(
        {"model": model, "usage": usage}, provider_id="openai", api_flavor="images"
    )
    each = int(found.calc_price().total_price * 10**9)
    settings = lambda **kw: make_settings(inference_paths=("/images/edits",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        five = engine.manager.create_virtual_key(
            name="bob", budgets=[{"max_limit": 5, "reset_duration": "1d"}]
        )
        spent = []
        for payer, limit in ((key, 1), (five, 5)):  # not measured yet, then measured
            served, paid = await served_and_spent(engine, http, payer, path, body)
            spent.append(paid)
            print(f"{model} edits, 16 images by URL, 60 at once on ${limit}, ", end="")
            print(f"${each / 1e9:.6f} each: {served} served, ${spent[-1]:.6f}")
            assert served >= 1
    assert spent[0] <= 1 + each / 1e9 + 1e-9
    assert spent[1] <= 5 + each / 1e9 + 1e-9


# Images API requests of models without an image output price of their own (all their output
# is images): (model, path, what the body asks beside its prompt, image tokens each image bills
# at that size and quality). gpt-image-1: 6,240 a 1024x1536 image at high quality; -mini, asked
# no size nor quality (`auto`): up to 6,240 too; gpt-image-2: 7,024 a 1024x1024 one at high.
IMAGES_ASKED = [
    (
        "gpt-image-1",
        "/v1/images/generations",
        {"size": "1024x1536", "quality": "high", "n": 2},
        6240,
    ),
    ("gpt-image-1-mini", "/v1/images/generations", {}, 6240),
    (
        "gpt-image-2",
        "/v1/images/generations",
        {"size": "1024x1024", "quality": "high", "n": 3},
        7024,
    ),
    ("gpt-image-1", "/v1/images/edits", {"quality": "auto", "n": 2}, 6240),
]


@pytest.mark.parametrize(
    ("model", "path", "asked", "each_image"),
    IMAGES_ASKED,
    ids=["gpt-image-1-high-portrait-n2", "gpt-image-1-mini-auto", "gpt-image-2-high-n3", "edits"],
)
async def test_images_api_requests_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings, model: str, path: str, asked: dict[str, Any], each_image: int
) -> None:
    """gpt-image-1, -1-mini and -2 have no image output price apart from their output's ($40,
    $8 and $30 per Mtok), so they do not `draw`: an Images API request (which has no output
    limit) was reserved `BUDGET_DEFAULT_MAX_OUTPUT_TOKENS` (1,024) output tokens, where each of
    its `n` images bills up to 6,240 (gpt-image-1 at high quality, 1024x1536) or 7,024
    (gpt-image-2 at high quality, 1024x1024). An Images API request is an image answer whatever
    its model's prices say: it reserves `n` times the most one image of its size and quality
    bills. 60 at once on a $1 budget spend no more than the budget."""
    n = asked.get("n", 1)
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
        "output_tokens": each_image * n,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": each_image * n},
        "total_tokens": 10 + each_image * n,
    }

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        data = [{"b64_json": ""}] * n
        return JSONResponse({"created": 1, "data": data, "usage": usage})

    body = {"model": f"openai/{model}", "prompt": "a cat", **asked}
    found = extract_usage(
        {"model": model, "usage": usage}, provider_id="openai", api_flavor="images"
    )
    each = int(found.calc_price().total_price * 10**9)
    paths = ("/images/generations", "/images/edits")
    settings = lambda **kw: make_settings(inference_paths=paths, **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        admitted, spent = await served_and_spent(engine, http, key, path, body)
    print(
        f"{model} {path} {asked}, 60 at once on $1, ${each / 1e9:.6f} each: "
        f"{admitted} admitted, ${spent:.6f} spent"
    )
    assert admitted >= 1
    assert spent <= 1 + 1e-9


# (deployment in the path, the body's `model` or none, the model metered)
AZURE_PATHS_SERVED = [
    ("gpt-4o", None, "gpt-4o"),  # Azure's REST API needs no `model`: it was `unknown`, $0
    ("gpt-4o", "gpt-4o-mini", "gpt-4o"),  # the deployment is served, whatever the body says
    ("prod-chat", "gpt-4o", "gpt-4o"),  # a deployment no price names: the body's model
    ("prod-chat", None, "prod-chat"),  # nothing priced: the deployment, unpriced (0)
]


@pytest.mark.parametrize(
    ("deployment", "body_model", "metered"),
    AZURE_PATHS_SERVED,
    ids=["no-model", "body-names-another", "deployment-unpriced", "nothing-priced"],
)
async def test_an_app_serving_azure_s_paths_is_charged_the_deployment_it_serves(
    make_settings: Settings, deployment: str, body_model: str | None, metered: str
) -> None:
    """An app that serves Azure OpenAI's paths (`/openai/deployments/<name>/chat/completions`)
    behind the middleware is metered as the outbound transport meters a call to Azure: the
    model is the deployment its path names (Azure serves it, and its REST API needs no
    `model` in the body), unless no price names it and the body names a model one does. The
    body's model alone was read: a body without one was `unknown`, charged 0 (1,000 in, 100
    out of gpt-4o: $0.0035), and one naming gpt-4o-mini charged $0.00021."""

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        message = {"role": "assistant", "content": "Four."}
        return JSONResponse({"id": "a", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1000, "completion_tokens": 100,
                                       "total_tokens": 1100}})  # fmt: skip

    route = "/openai/deployments/{deployment}/chat/completions"
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "2+2?"}]}
    if body_model is not None:
        body["model"] = body_model
    async with budget_of_a_dollar(make_settings, route, provider) as (engine, http, key):
        answer = await http.post(
            f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
            json=body,
            headers={"authorization": f"Bearer {key.value}"},
        )
        rows = await records(engine)
    charged = [(r.provider, r.model, r.cost_nanos) for r in rows]
    print(f"deployment {deployment}, body model {body_model}: {answer.status_code}, "
          f"charged {charged}")  # fmt: skip
    usage = Usage(input_tokens=1000, output_tokens=100)
    priced = nanos(usage, metered, "openai") if metered != "prod-chat" else 0
    assert answer.status_code == 200
    assert charged == [("openai", metered, priced)]


async def test_images_edited_as_a_form_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings,
) -> None:
    """OpenAI's SDKs send the Images API's edits as `multipart/form-data` (`images.edit`): its
    `model`, `prompt`, `n`, `size` and `quality` are form fields beside the image, which were
    not read. The model was `unknown`, unpriced: gpt-image-1's 2 high 1024x1536 images
    ($0.4993) were charged 0, one request in flight at a time, as many as were sent. Now it is
    metered as the JSON edit it says: 60 at once on a $1 budget spend no more than it."""
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
        "output_tokens": 2 * 6240,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 2 * 6240},
        "total_tokens": 10 + 2 * 6240,
    }

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse({"created": 1, "data": [{"b64_json": ""}] * 2, "usage": usage})

    path = "/v1/images/edits"
    fields = {"model": "gpt-image-1", "prompt": "a cat", "n": "2", "size": "1024x1536",
              "quality": "high"}  # fmt: skip
    image = {"image": ("cat.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png")}
    settings = lambda **kw: make_settings(inference_paths=("/images/edits",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        answers = await asyncio.gather(
            *[http.post(path, data=fields, files=image, headers=auth) for _ in range(60)]
        )
        rows = await records(engine)
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    served = [a.status_code for a in answers].count(200)
    charged = {(r.provider, r.model, r.cost_nanos) for r in rows}
    print(f"gpt-image-1 edits as a form, 60 at once on $1: {served} served, ${spent:.6f} spent, "
          f"charged {charged}")  # fmt: skip
    assert served >= 1 and spent <= 1 + 1e-9
    assert charged == {("openai", "gpt-image-1", 499_250_000)}


def a_png(width: int, height: int, size: int) -> bytes:
    """A PNG of `width` x `height` pixels, `size` bytes of (incompressible) pixel data: a
    photo's size on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes((8, 2, 0, 0, 0))
    pixels = random.Random(size).randbytes(size)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def an_mp3(size: int) -> bytes:
    """An MP3 of `size` bytes as it starts (an ID3 tag): 5 MB is ~5 minutes at 128 kbps."""
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + random.Random(size).randbytes(size - 10)


async def test_an_image_edited_as_a_form_is_reserved_by_its_pixels_not_its_bytes(
    make_settings: Settings,
) -> None:
    """A form's file was counted as text, a third of its bytes a token: a real 1 MB PNG of
    1024x1024 sent to gpt-image-1's edits reserved ~333,000 input tokens ($1.83 with its
    image), where OpenAI bills it a few thousand; on a $1 budget a second edit was refused
    while one was in flight (60 at once: 1 served). It is now reserved by its pixels (at
    least the most one image gpt-image-1 draws, at its input image price): 60 at once on $1
    serve as many as it holds, and spend no more than it."""
    usage = {"input_tokens": 4170,
             "input_tokens_details": {"text_tokens": 10, "image_tokens": 4160},
             "output_tokens": 4160,
             "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
             "total_tokens": 8330}  # fmt: skip
    reserved: list[float] = []
    holder: dict[str, Any] = {}

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        live = holder["engine"].manager.list_budgets(from_memory=True)
        reserved.append(next(b.reserved for b in live if b.id == holder["budget"]))
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse({"created": 1, "data": [{"b64_json": ""}], "usage": usage})

    path = "/v1/images/edits"
    fields = {"model": "gpt-image-1", "prompt": "a cat", "size": "1024x1024", "quality": "high"}
    image = {"image": ("cat.png", a_png(1024, 1024, 1_000_000), "image/png")}
    settings = lambda **kw: make_settings(inference_paths=("/images/edits",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        holder.update(engine=engine, budget=key.budgets[0].id)
        auth = {"authorization": f"Bearer {key.value}"}
        first = await http.post(path, data=fields, files=image, headers=auth)
        alone = reserved[0]
        other = engine.manager.create_virtual_key(
            name="bob", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        holder["budget"] = other.budgets[0].id
        auth = {"authorization": f"Bearer {other.value}"}
        answers = await asyncio.gather(
            *[http.post(path, data=fields, files=image, headers=auth) for _ in range(60)]
        )
        rows = await records(engine)
        spent = engine.manager.get_budget(other.budgets[0].id).current_usage
    served = [a.status_code for a in answers].count(200)
    charged = {r.cost_nanos for r in rows}
    print(f"gpt-image-1 edit of a 1 MB 1024x1024 PNG: reserved {round(alone * 1e9)} nano-USD, "
          f"charged {charged}; 60 at once on $1: {served} served, ${spent:.6f} spent")  # fmt: skip
    assert first.status_code == 200
    assert charged == {10 * 5000 + 4160 * 10_000 + 4160 * 40_000}  # $5, $10 and $40 per Mtok
    assert alone < 0.25  # its bound: (6,240 image tokens + its fields) in, 4,160 out
    assert served >= 4 and spent <= 1 + 1e-9


async def test_audio_transcribed_from_a_form_is_reserved_by_its_length_and_charged_as_audio(
    make_settings: Settings,
) -> None:
    """The Audio API's transcriptions (`multipart/form-data`: `model` beside a `file`) are
    metered by their model since forms are read. Its file was counted as text: a 5 MB MP3
    to gpt-4o-transcribe reserved 1,666,758 input tokens ($4.18), where its 5 minutes bill a
    few thousand audio tokens; on a $2 budget a second one was refused while one was in
    flight. And the answer's audio (`usage.input_token_details.audio_tokens`) was charged
    at the text price ($2.50 per Mtok, not audio's $6): 18,650,000 nano-USD for 40,525,000.
    A file of audio is now reserved by the most it may last (`core.media.form_file`), at the
    audio price, and charged so; 60 at once on $2 still spend no more than it."""
    usage = {"type": "tokens", "input_tokens": 6260, "output_tokens": 300, "total_tokens": 6560,
             "input_token_details": {"text_tokens": 10, "audio_tokens": 6250}}  # fmt: skip
    reserved: list[float] = []
    holder: dict[str, Any] = {}

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        live = holder["engine"].manager.list_budgets(from_memory=True)
        reserved.append(next(b.reserved for b in live if b.id == holder["budget"]))
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse({"text": "Hello.", "usage": usage})

    path = "/v1/audio/transcriptions"
    fields = {"model": "gpt-4o-transcribe"}
    audio = {"file": ("talk.mp3", an_mp3(5_000_000), "audio/mpeg")}
    settings = lambda **kw: make_settings(inference_paths=("/audio/transcriptions",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        holder.update(engine=engine, budget=key.budgets[0].id)
        first = await http.post(path, data=fields, files=audio,
                                headers={"authorization": f"Bearer {key.value}"})  # fmt: skip
        alone = reserved[0]
        other = engine.manager.create_virtual_key(
            name="bob", budgets=[{"max_limit": 2, "reset_duration": "1d"}]
        )
        holder["budget"] = other.budgets[0].id
        auth = {"authorization": f"Bearer {other.value}"}
        answers = await asyncio.gather(
            *[http.post(path, data=fields, files=audio, headers=auth) for _ in range(60)]
        )
        rows = await records(engine)
        spent = engine.manager.get_budget(other.budgets[0].id).current_usage
    served = [a.status_code for a in answers].count(200)
    charged = {(r.model, r.cost_nanos) for r in rows}
    print(f"gpt-4o-transcribe of a 5 MB MP3: reserved {round(alone * 1e9)} nano-USD, charged "
          f"{charged}; 60 at once on $2: {served} served, ${spent:.6f} spent")  # fmt: skip
    assert first.status_code == 200
    # 10 text tokens at $2.50 per Mtok, 6,250 audio at $6, 300 out at $10
    assert charged == {("gpt-4o-transcribe", 10 * 2500 + 6250 * 6000 + 300 * 10_000)}
    assert alone < 1  # 1,500 s at 64 tokens a second, at the audio price; 1,024 out
    assert served >= 2 and spent <= 2 + 1e-9


@pytest.mark.parametrize("kind", ["json", "stream"])
async def test_an_unreadable_answer_of_an_image_model_is_charged_its_most_output_as_images(
    make_settings: Settings, kind: str
) -> None:
    """Gemini 2.5 Flash Image draws unasked ($30 per Mtok of image output, its text $2.50), so
    its requests are reserved at the image price. An answer nothing of which can be read (a
    corrupt gzip body) is charged the most it could have cost, as its reservation counted it:
    1,400 `max_tokens` were charged as text, $0.0035 of the $0.042 reserved (12 times too
    little), the rest of the reservation released."""
    model = "gemini-2.5-flash-image"

    async def provider(request: Request) -> Response:
        await request.body()
        body = gzip.compress(b'data: {"usage": {"prompt_tokens": 1}}\n\n' * 20)
        return Response(
            body[:-12] + b"not gzip at all",
            headers={
                "content-encoding": "gzip",
                "content-type": "text/event-stream" if kind == "stream" else "application/json",
            },
        )

    path = "/v1/chat/completions"
    body = chat(f"gemini/{model}", max_tokens=1400, stream=kind == "stream")
    async with budget_of_a_dollar(make_settings, path, provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        async with http.stream("POST", path, json=body, headers=auth) as answer:
            async for _ in answer.aiter_raw():
                pass
        rows = await records(engine)
    row = rows[-1]
    price = engine.prices.price("gemini", model)
    reserved = estimate_nanos(price, row.input_tokens, 1400)
    print(f"{model}, {kind} unread: charged {row.cost_nanos} nano-USD, reserved {reserved}")
    assert row.note is not None and row.note.endswith(": charged its most output")
    assert (row.output_tokens, row.estimated) == (1400, True)
    assert row.cost_nanos == reserved == row.input_tokens * 300 + 1400 * 30_000


async def test_an_unreadable_images_api_answer_is_charged_its_images_most_tokens(
    make_settings: Settings,
) -> None:
    """An Images API answer nothing of which can be read (a corrupt gzip body) is charged the
    most it could have cost, as its reservation counted it: gpt-image-1's 2 images at high
    quality, 1024x1536, 12,480 output tokens at $40 per Mtok (charged 2,048 before, the default
    output limit of each image: 6 times too little)."""
    model = "gpt-image-1"

    async def provider(request: Request) -> Response:
        await request.body()
        body = gzip.compress(b'{"created": 1, "data": [], "usage": {"input_tokens": 1}}')
        return Response(
            body[:-12] + b"not gzip at all",
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )

    path = "/v1/images/generations"
    body = {"model": f"openai/{model}", "prompt": "a cat", "size": "1024x1536", "quality": "high"}
    settings = lambda **kw: make_settings(inference_paths=IMAGES_PATHS, **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        async with http.stream("POST", path, json={**body, "n": 2}, headers=auth) as answer:
            async for _ in answer.aiter_raw():
                pass
        rows = await records(engine)
    row = rows[-1]
    print(f"{model}, 2 images unread: charged {row.output_tokens} output tokens, {row.note}")
    assert row.note is not None and row.note.endswith(": charged its most output")
    assert (row.output_tokens, row.estimated) == (12_480, True)
    assert row.cost_nanos == row.input_tokens * 5_000 + 12_480 * 40_000


@pytest.mark.parametrize("given", ["b64_json", "url"])
async def test_an_images_api_answer_without_usage_is_charged_its_images_most_tokens(
    make_settings: Settings, given: str
) -> None:
    """An Images API answer that reads but reports no usage (a gateway's) holds images, which
    its bytes do not count, whatever its model's prices say (gpt-image-1 prices no image output
    apart: no model that `draws`): it is charged the most it could have cost, as its
    reservation counted it, 2 images at high quality, 1024x1536: 12,480 output tokens at $40
    per Mtok (charged its prompt alone before, 0 output tokens)."""
    model = "gpt-image-1"

    async def provider(request: Request) -> Response:
        await request.body()
        image = "iVBORw0KGgo" * 100 if given == "b64_json" else "https://example.invalid/b.png"
        return JSONResponse({"created": 1, "data": [{given: image}, {given: image}]})

    path = "/v1/images/generations"
    body = {"model": f"openai/{model}", "prompt": "a cat", "size": "1024x1536", "quality": "high"}
    settings = lambda **kw: make_settings(inference_paths=IMAGES_PATHS, **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        answer = await http.post(path, json={**body, "n": 2}, headers=auth)
        assert answer.status_code == 200
        rows = await records(engine)
    row = rows[-1]
    print(f"{model}, 2 images as {given}, no usage: charged {row.output_tokens} output tokens")
    assert row.note is not None and row.note.endswith(": charged its most output")
    assert (row.output_tokens, row.estimated) == (12_480, True)
    assert row.cost_nanos == row.input_tokens * 5_000 + 12_480 * 40_000


# An image as a gateway answers it (LiteLLM's and OpenRouter's `images`; the Images API's
# `b64_json`): 400,000 characters of base64, no text.
DRAWN = "A" * 400_000


@pytest.mark.parametrize("kind", ["json", "stream", "cut", "images"])
async def test_an_answer_of_a_model_that_draws_without_usage_is_charged_its_most_output_as_images(
    make_settings: Settings, kind: str
) -> None:
    """Gemini 2.5 Flash Image draws unasked ($30 per Mtok of image output, its text $2.50;
    gpt-image-1.5 $32 and $10), and an image's tokens cannot be counted from its bytes. An
    answer without usage (a gateway's JSON, a stream ended or cut before its usage, the Images
    API's) is charged the most it could have cost, as its reservation counted it: never less
    than the bill of an image within its output limit (1,290 image tokens and 100 of text here).
    The JSON answer's base64 was charged as text (250,035,400 nano-USD, 6 times the bill), a
    stream's image nothing (its text only: 20,400), the Images API's answer its prompt alone
    (200,000 of the 32,968,000 reserved). The Images API has no output limit: it is reserved
    and charged one image's most tokens (6,240), as a model that draws asked for none is."""
    images = kind == "images"
    model = "gpt-image-1.5" if images else "gemini-2.5-flash-image"
    provider = "openai" if images else "gemini"
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{DRAWN}"}}
    answer: dict[str, Any] | list[dict[str, Any]]
    if images:
        answer = {"created": 1, "data": [{"b64_json": DRAWN}]}
    elif kind == "json":
        message = {"role": "assistant", "content": "Here it is.", "images": [image]}
        answer = {"model": model, "choices": [{"index": 0, "message": message}]}
    else:
        answer = [
            {"model": model, "choices": [{"index": 0, "delta": {"content": "Here it is."}}]},
            {"model": model, "choices": [{"index": 0, "delta": {"images": [image]}}]},
        ]
        if kind == "stream":
            answer[-1]["choices"][0]["finish_reason"] = "stop"
    asked = {"max_tokens": None if images else 1400}  # (the Images API has no output limit)
    row = await charged_for(
        lambda **kw: make_settings(inference_paths=IMAGES_PATHS, **kw),
        "/v1/images/generations" if images else "/v1/chat/completions",
        f"{provider}/{model}",
        answer,
        done=kind != "cut",
        **asked,
    )
    # its `max_tokens`, or (none) one image's tokens; nano-USD a token in, and out as images
    most, inp, out = (6240, 5_000, 32_000) if images else (1400, 300, 30_000)
    reserved = row.input_tokens * inp + most * out
    print(f"{model}, {kind} without usage: charged {row.cost_nanos}, reserved {reserved}")
    assert (row.output_tokens, row.estimated) == (most, True)
    assert row.cost_nanos == reserved
    if not images:
        tokens = Usage(input_tokens=row.input_tokens, output_tokens=1390, output_image_tokens=1290)
        bill = nanos(tokens, model, "google")
        print(f"  an image's bill (1,290 image tokens, 100 of text): {bill}")
        assert row.cost_nanos >= bill


async def test_a_gateway_s_responses_audio_tokens_are_priced_at_the_audio_rates(
    make_settings: Settings,
) -> None:
    """gpt-audio's audio costs $32/$64 per Mtok in and out, its text $2.50/$10. A gateway's
    Responses rendering of its answer (LiteLLM's) counts the audio in `input_tokens_details` and
    `output_tokens_details`, as it counts images there: the audio was charged as text,
    7,500,000 nano-USD where genai-prices prices the same tokens at 46,800,000."""
    usage = {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 0, "audio_tokens": 600},
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 400},
        "total_tokens": 1500,
    }
    answer = {"object": "response", "model": "gpt-audio", "output": [], "usage": usage}
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-audio", answer)
    want = nanos(
        Usage(
            input_tokens=1000, input_audio_tokens=600, output_tokens=500, output_audio_tokens=400
        ),
        "gpt-audio",
        "openai",
    )
    print("Responses audio tokens: charged", row.cost_nanos, "nano-USD, genai-prices says", want)
    assert (row.input_tokens, row.output_tokens) == (1000, 500)
    assert row.cost_nanos == want


async def test_a_pricing_file_prices_image_tokens_apart(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A pricing file's entry may price images apart (`input_image_per_mtok`,
    `output_image_per_mtok`: an entry with them was refused, `unknown field`, and the middleware
    did not start); without them an image costs what text does."""
    path = tmp_path / "prices.json"
    entry = {"input_per_mtok": 5, "output_per_mtok": 10}
    images = {**entry, "input_image_per_mtok": 8, "output_image_per_mtok": 32}
    models = {"openai/house-image": images, "openai/house-text": entry}
    path.write_text(json.dumps({"models": models}))
    charged = {}
    for model in models:
        answer = {"created": 1, "data": [], "usage": IMAGES_USAGE}
        row = await charged_for(
            lambda **kw: make_settings(pricing_file=path, inference_paths=IMAGES_PATHS, **kw),
            "/v1/images/generations",
            model,
            answer,
        )
        assert row.cost_source == "pricing_file"
        charged[model] = row.cost_nanos
    print("priced by a pricing file, images apart and not:", charged)
    # 50 x $5 + 1,323 x $8 + 100 x $10 + 4,160 x $32 per Mtok; all as text: 1,373 x $5 + 4,260 x $10
    assert charged == {"openai/house-image": 144_954_000, "openai/house-text": 49_465_000}


async def test_a_litellm_deployment_s_image_token_prices_are_charged(
    make_settings: Settings, tmp_path: Path
) -> None:
    """LiteLLM's custom prices of images (`input_cost_per_image_token`,
    `output_cost_per_image_token`, USD a token, as its own price list has them for gpt-image-1.5
    and Gemini's image models) were not honoured, only named in the start-up warning: the images
    cost what text does, 49,465,000 nano-USD where the deployment's prices say 144,954,000."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: house-image\n"
        "    litellm_params: {model: openai/house-image, input_cost_per_token: 0.000005,\n"
        "                     output_cost_per_token: 0.00001,\n"
        "                     input_cost_per_image_token: 0.000008,\n"
        "                     output_cost_per_image_token: 0.000032}\n"
    )
    answer = {"created": 1, "data": [], "usage": IMAGES_USAGE}
    row = await charged_for(
        lambda **kw: make_settings(config_file=path, inference_paths=IMAGES_PATHS, **kw),
        "/v1/images/generations",
        "house-image",
        answer,
    )
    print("a LiteLLM deployment's image prices: charged", row.cost_nanos, "nano-USD")
    assert (row.cost_source, row.cost_nanos) == ("config_file", 144_954_000)


@pytest.mark.parametrize(
    ("path", "usage"),
    [
        (
            "/v1/chat/completions",
            {
                "prompt_tokens": 12,
                "completion_tokens": 300,
                "total_tokens": 312,
                "search_context_size": "low",
                "cost": {
                    "input_tokens_cost": 0.000012,
                    "output_tokens_cost": 0.0003,
                    "request_cost": 0.005,
                    "total_cost": 0.005312,
                },
            },
        ),
        (
            "/v1/responses",
            {
                "input_tokens": 12,
                "output_tokens": 300,
                "total_tokens": 312,
                "cost": {
                    "currency": "USD",
                    "input_cost": 0.000012,
                    "output_cost": 0.0003,
                    "tool_calls_cost": 0.005,
                    "total_cost": 0.005312,
                },
            },
        ),
    ],
    ids=["chat", "responses"],
)
async def test_a_cost_reported_as_an_object_is_the_charge(
    make_settings: Settings, path: str, usage: dict[str, Any]
) -> None:
    """Perplexity reports what a request cost as an object (`usage.cost.total_cost`, USD), its
    request or search fee included, which its token prices leave out: $0.005312 is the charge."""
    answer = {"model": "sonar", "usage": usage}
    row = await charged_for(make_settings, path, "perplexity/sonar", answer)
    print("Perplexity's total_cost $0.005312: charged", row.cost_nanos, "nano-dollars")
    assert (row.cost_source, row.cost_nanos) == ("usage", 5_312_000)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("byok", "cost", "want"), [(True, 0.00095, 19_950_000), (False, 0.019, 19_000_000)]
)
async def test_an_openrouter_byok_answer_is_charged_the_upstream_provider_s_cost_too(
    make_settings: Settings, stream: bool, byok: bool, cost: float, want: int
) -> None:
    """With the caller's own provider key (BYOK) OpenRouter's `usage.cost` is only its fee (5 %);
    the provider bills the inference itself, `cost_details.upstream_inference_cost`: both are
    spent, $0.00095 + $0.019. Without BYOK the upstream cost is within `cost` (equal to it)."""
    usage = {
        "prompt_tokens": 194,
        "completion_tokens": 2,
        "total_tokens": 196,
        "cost": cost,
        "is_byok": byok,
        "cost_details": {"upstream_inference_cost": 0.019},
    }
    model = "anthropic/claude-sonnet-4"
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"openrouter/{model}", answer)
    print(f"is_byok={byok}, cost ${cost}, upstream $0.019: charged", row.cost_nanos, "nano-dollars")
    assert (row.cost_source, row.cost_nanos) == ("usage", want)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_xai_s_reported_cost_is_the_charge(make_settings: Settings, stream: bool) -> None:
    """xAI reports what a request was billed in `usage.cost_in_usd_ticks` (1e-10 USD), its
    server-side tools included, which token prices leave out: Grok 4's 10,000 tokens in
    (4,000 cached) and 2,000 out ($0.051) with two web searches ($0.01) cost $0.061."""
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "total_tokens": 12_000,
        "prompt_tokens_details": {"text_tokens": 10_000, "cached_tokens": 4_000},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "server_side_tool_usage_details": {"web_search_calls": 2},
        "cost_in_usd_ticks": 610_000_000,
    }
    model = "grok-4-0709"
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"xai/{model}", answer)
    print("cost_in_usd_ticks 610,000,000 ($0.061): charged", row.cost_nanos, "nano-dollars")
    assert (row.cost_source, row.cost_nanos) == ("usage", 61_000_000)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_reasoning_tokens_left_out_of_completion_tokens_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """xAI's chat completions count a reasoning model's reasoning apart from `completion_tokens`
    (`total_tokens` is prompt + completion + reasoning), and bill it as output: Grok 4's 2,000
    answer and 6,000 reasoning tokens cost 8,000 output tokens' price, as genai-prices says."""
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "total_tokens": 18_000,
        "prompt_tokens_details": {"text_tokens": 10_000, "cached_tokens": 4_000},
        "completion_tokens_details": {"reasoning_tokens": 6_000, "audio_tokens": 0},
    }
    model = "grok-4-0709"
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"xai/{model}", answer)
    want = nanos(
        Usage(input_tokens=10_000, cache_read_tokens=4_000, output_tokens=8_000), model, "x-ai"
    )
    print(
        "6,000 reasoning tokens apart: charged",
        row.cost_nanos,
        "nano-dollars, genai-prices says",
        want,
    )
    assert row.output_tokens == 8_000
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_model_s_fee_a_request_is_charged_with_its_tokens(
    make_settings: Settings, stream: bool
) -> None:
    """Perplexity's Sonar models cost $12 a thousand requests beside their tokens (the
    catalog's `requests_kcount`): an answer that does not report its cost is charged both, as
    genai-prices prices it. The fee was left out: 300,000 nano-dollars of 12,300,000 (41
    times less)."""
    usage = {"prompt_tokens": 100, "completion_tokens": 200}
    row = await charged_for(
        make_settings,
        "/v1/chat/completions",
        "perplexity/sonar",
        chat_answer(usage, stream, "sonar"),
    )
    want = nanos(Usage(input_tokens=100, output_tokens=200), "sonar", "perplexity")
    print("sonar, 100 in and 200 out: charged", row.cost_nanos, "genai-prices", want)
    assert (row.cost_source, row.cost_nanos) == ("catalog", want)
    assert want == 300 * 1_000 + 12_000_000  # $1 a million tokens, and the fee


DEEP_RESEARCH_USAGE = {  # a Sonar Deep Research answer's usage, as Perplexity counts it
    "prompt_tokens": 19,
    "completion_tokens": 7_163,
    "total_tokens": 7_182,
    "citation_tokens": 21_218,
    "num_search_queries": 24,
    "reasoning_tokens": 84_726,
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_perplexity_s_reasoning_citations_and_searches_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """Sonar Deep Research bills its reasoning ($3/Mtok), citation tokens ($2/Mtok) and search
    queries ($5 a thousand) beside its prompt and completion (the catalog's
    `output_reasoning_mtok`, `output_citation_mtok`, `web_searches_kcount`); its usage counts them
    apart (`reasoning_tokens`, `citation_tokens`, `num_search_queries`; `total_tokens` is prompt +
    completion). An answer that does not report its cost was charged its completion alone:
    $0.057342 of the $0.473956 genai-prices says (8 times less)."""
    usage = DEEP_RESEARCH_USAGE
    model = "sonar-deep-research"
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"perplexity/{model}", answer)
    found = extract_usage({"model": model, "usage": usage}, provider_id="perplexity")
    want = int(found.calc_price().total_price * 10**9)
    print(model, "without its cost: charged", row.cost_nanos, "nano-dollars, genai-prices", want)
    assert want == 473_956_000
    assert (row.cost_source, row.cost_nanos, row.output_tokens) == ("catalog", want, 113_107)


async def test_a_pricing_file_prices_reasoning_and_citations_apart(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A pricing file's entry for Sonar Deep Research, at the prices Perplexity lists ($2 and $8
    per Mtok, reasoning $3 and citations $2, searches $5 a thousand), was refused (`unknown
    field`: the middleware did not start), and without those two fields its reasoning and
    citations were charged at the output's $8: 1,024,894,000 nano-USD where Perplexity bills
    473,956,000. They are fields of an entry now (`output_reasoning_per_mtok`,
    `output_citation_per_mtok`), charged as the catalog's."""
    path = tmp_path / "prices.json"
    entry = {
        "input_per_mtok": 2,
        "output_per_mtok": 8,
        "output_reasoning_per_mtok": 3,
        "output_citation_per_mtok": 2,
        "web_search_per_k": 5,
    }
    path.write_text(json.dumps({"models": {"perplexity/sonar-deep-research": entry}}))
    usage = DEEP_RESEARCH_USAGE
    model = "sonar-deep-research"
    row = await charged_for(
        lambda **kw: make_settings(pricing_file=path, **kw),
        "/v1/chat/completions",
        f"perplexity/{model}",
        chat_answer(usage, False, model),
    )
    print("priced by a pricing file: charged", row.cost_nanos, "nano-dollars")
    assert (row.cost_source, row.cost_nanos) == ("pricing_file", 473_956_000)


@asynccontextmanager
async def budget_of_a_dollar(
    make_settings: Settings, path: str, provider: Callable[..., Any], counters: str = "memory"
) -> AsyncIterator[tuple[BudgetEngine, httpx.AsyncClient, Any]]:
    """`provider` served at `path` behind the middleware (its counters in memory, or in Redis
    under a prefix of this test's, deleted after), started, with a client, and a key with a $1
    daily budget."""
    prefix = unique_prefix()
    if counters == "redis":
        need_redis()
        settings = make_settings(redis_url=REDIS_URL)
    else:
        settings = make_settings()
    app = BudgetMiddleware(
        Starlette(routes=[Route(path, provider, methods=["POST"])]), settings=settings
    )
    engine = get_engine(settings)
    if counters == "redis":
        use_prefix(engine, prefix)
    try:
        async with running(app), client(app) as http:
            key = engine.manager.create_virtual_key(
                name="alice", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
            )
            yield engine, http, key
    finally:
        if counters == "redis":
            delete_prefix(REDIS_URL, prefix)


async def at_once(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], auth: dict[str, str], count: int = 60
) -> list[httpx.Response]:
    """`count` of the same request sent together."""
    return await asyncio.gather(*[http.post(path, json=body, headers=auth) for _ in range(count)])


async def served_and_spent(
    engine: BudgetEngine, http: httpx.AsyncClient, payer: Any, path: str, body: dict[str, Any]
) -> tuple[int, float]:
    """60 of the same request by `payer` sent together (`at_once`), then flushed: how many were
    served, and what the payer's budget has spent, in dollars."""
    answers = await at_once(http, path, body, {"authorization": f"Bearer {payer.value}"})
    await engine.flush()
    spent = engine.manager.get_budget(payer.budgets[0].id).current_usage
    return [a.status_code for a in answers].count(200), spent


@pytest.mark.parametrize("reported", [True, False], ids=["cost", "no-cost"])
async def test_perplexity_s_output_apart_is_reserved_as_a_fee(
    make_settings: Settings, reported: bool
) -> None:
    """Sonar Deep Research's reasoning and citation tokens and its searches are beyond any
    `max_tokens` (a request's reservation: its body and 600 output tokens, $0.0048), so
    what an answer was charged for them ($0.06 of its $0.064038) is reserved by the next
    requests to the model as a reported fee is (SPEC §6): 60 at once on $1 spend no more than
    the budget and one request. Charged by its tokens (no `usage.cost`), they were not."""
    usage: dict[str, Any] = {
        "prompt_tokens": 19,
        "completion_tokens": 500,
        "total_tokens": 519,
        "citation_tokens": 5_000,
        "num_search_queries": 4,
        "reasoning_tokens": 10_000,
    }
    each = 64_038_000  # nano-dollars: $2, $8, $3, $2 per Mtok and $5 a thousand searches
    if reported:
        usage["cost"] = {"total_cost": each / 1e9}

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        return JSONResponse({"model": "sonar-deep-research", "choices": [], "usage": usage})

    body = chat("perplexity/sonar-deep-research", max_tokens=600)
    path = "/v1/chat/completions"
    async with budget_of_a_dollar(make_settings, path, provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        first = await http.post(path, json=body, headers=auth)  # it tells
        served, spent = await served_and_spent(engine, http, key, path, body)
        charged = (await records(engine))[0].cost_nanos
    print(f"cost reported: {reported}; one charged {charged} n$; 1 then 60 at once on $1: ")
    print(f"  {served} served, ${spent:.6f} spent")
    assert first.status_code == 200 and charged == each
    assert spent <= 1 + each / 1e9 + 1e-9
    assert served > 1


async def test_a_huge_answer_with_its_usage_first_is_charged_its_usage(
    make_settings: Settings,
) -> None:
    """Of a JSON answer over 2 MiB the last MiB is kept (usage sits at the end), and its first
    64 KiB: an app that writes its usage first (`{"usage": ..., "choices": [...]}`) is
    charged that usage. Every byte was charged as output instead, estimated: 7,500,402,500
    nano-dollars for 3,500,000 (2,143 times the cost)."""
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100}
    text = "word " * 600_000  # 3 MB
    answer = {"usage": usage, "choices": [{"message": {"role": "assistant", "content": text}}]}
    row = await charged_for(make_settings, "/v1/chat/completions", "openai/gpt-4o", answer)
    want = nanos(Usage(input_tokens=1_000, output_tokens=100), "gpt-4o", "openai")
    print("3 MB, its usage first: charged", row.cost_nanos, "genai-prices", want)
    assert (row.cost_nanos, row.estimated) == (want, False)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_thoughts_counted_in_the_total_alone_are_charged_as_output(
    make_settings: Settings, stream: bool
) -> None:
    """Gemini's own OpenAI-compatible endpoint counts a thinking model's thoughts in
    `total_tokens` alone, with no `completion_tokens_details` (streamed, every chunk carries the
    usage so far): Google bills `total - prompt` as output, so 3 answer and 1,093 thought tokens
    cost 1,096 output tokens' price (they cost 3 before: 270 times less)."""
    model = "gemini-2.5-flash"
    last = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 1_105}
    answer: dict[str, Any] | list[dict[str, Any]] = chat_answer(last, stream, model)
    if isinstance(answer, list):  # the usage so far on every chunk, as Gemini streams it
        so_far = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 1_103}
        answer[0]["usage"] = so_far
    row = await charged_for(make_settings, "/v1/chat/completions", f"gemini/{model}", answer)
    want = nanos(Usage(input_tokens=9, output_tokens=1_096), model, "google")
    print("1,093 thought tokens in the total alone: charged", row.cost_nanos, "genai-prices", want)
    assert row.output_tokens == 1_096
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_answer_with_nan_or_infinity_is_read_as_python_reads_it(
    make_settings: Settings, stream: bool
) -> None:
    """`json.dumps` writes NaN and -Infinity by default (a host app's answer may hold a -inf
    logprob), and Python's parser, httpx's `.json()` and the SDKs read them. The usage of such an
    answer is the one charged: before, JSON was charged the request's most output (11 times
    the cost: 40,095,000 nano-dollars for 3,500,000) and a stream an estimate (34 times less)."""
    model = "gpt-4o"
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100}
    answer = chat_answer(usage, stream, model)
    if isinstance(answer, list):
        answer[-1]["metrics"] = {"tpot": math.nan}
    else:
        answer["logprobs"] = [{"token": "hi", "logprob": -math.inf}]
    row = await charged_for(
        make_settings, "/v1/chat/completions", f"openai/{model}", answer, max_tokens=4_000
    )
    want = nanos(Usage(input_tokens=1_000, output_tokens=100), model, "openai")
    print("an answer holding NaN/-Infinity: charged", row.cost_nanos, "genai-prices", want)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (1_000, 100, False)
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_reasoning_tokens_left_out_of_a_responses_output_count_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """A gateway answering the Responses API for Gemini counts its thoughts apart from
    `output_tokens` (`total_tokens` is input + output + reasoning), as Gemini does: Google bills
    them as output, so 198 answer and 405 thought tokens cost 603 output tokens' price."""
    usage = {
        "input_tokens": 1_000,
        "output_tokens": 198,
        "total_tokens": 1_603,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 405},
    }
    model = "gemini-2.5-flash"
    response = {"model": model, "output": [], "usage": usage}
    answer: dict[str, Any] | list[dict[str, Any]] = (
        [{"type": "response.completed", "response": response}] if stream else response
    )
    row = await charged_for(make_settings, "/v1/responses", f"gemini/{model}", answer)
    want = nanos(Usage(input_tokens=1_000, output_tokens=603), model, "google")
    print(
        "405 thought tokens apart: charged", row.cost_nanos, "nano-dollars, genai-prices says", want
    )
    assert row.output_tokens == 603
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_openai_cache_writes_are_priced_at_the_cache_write_rate(
    make_settings: Settings, stream: bool, api: str
) -> None:
    """From GPT-5.6 on OpenAI bills the prompt tokens it writes to the cache at 1.25 times the
    input price, and reports them in `cache_write_tokens` beside `cached_tokens`: GPT-5.6 Sol's
    100,000 tokens in, 40,000 read from the cache and 50,000 written, as genai-prices says."""
    model = "gpt-5.6-sol"
    if api == "chat":
        path, usage = (
            "/v1/chat/completions",
            {
                "prompt_tokens": 100_000,
                "completion_tokens": 2_000,
                "total_tokens": 102_000,
                "prompt_tokens_details": {"cached_tokens": 40_000, "cache_write_tokens": 50_000},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        )
        answer = chat_answer(usage, stream, model)
    else:
        path, usage = (
            "/v1/responses",
            {
                "input_tokens": 100_000,
                "output_tokens": 2_000,
                "total_tokens": 102_000,
                "input_tokens_details": {"cached_tokens": 40_000, "cache_write_tokens": 50_000},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        )
        response = {"model": model, "output": [], "usage": usage}
        answer = [{"type": "response.completed", "response": response}] if stream else response
    row = await charged_for(make_settings, path, f"openai/{model}", answer)
    want = nanos(
        Usage(
            input_tokens=100_000,
            cache_read_tokens=40_000,
            cache_write_tokens=50_000,
            output_tokens=2_000,
        ),
        model,
        "openai",
    )
    print("50,000 cache writes: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.cost_nanos == want


# A gateway's chat usage of a Claude answer whose `prompt_tokens` leaves cache tokens out, and
# what Anthropic billed: (usage, input, cache reads, cache writes, output).
_GATEWAY_CACHE: dict[str, tuple[dict[str, Any], int, int, int, int]] = {
    # the cache reads in the total alone (prompt 80 + completion 173 + reads 297 = 550)
    "reads-in-the-total": (
        {
            "prompt_tokens": 80,
            "completion_tokens": 173,
            "total_tokens": 550,
            "cache_read_input_tokens": 297,
        },
        377,
        297,
        0,
        173,
    ),
    # LiteLLM's of mid-2025: `prompt_tokens` the input and the reads, the writes apart
    "writes-apart": (
        {
            "prompt_tokens": 12,
            "completion_tokens": 50,
            "total_tokens": 62,
            "prompt_tokens_details": {"cached_tokens": 10},
            "cache_read_input_tokens": 10,
            "cache_creation_input_tokens": 5_000,
        },
        5_012,
        10,
        5_000,
        50,
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("shape", list(_GATEWAY_CACHE))
async def test_cache_tokens_a_gateway_s_prompt_count_leaves_out_are_charged(
    make_settings: Settings, stream: bool, shape: str
) -> None:
    """A gateway's chat usage beside Anthropic's cache fields whose `prompt_tokens` leaves cache
    tokens out (its total counts them beyond the prompt, or the writes cannot fit in it beside
    the reads): they were read as subsets of the prompt, cut to fit it (297 reads charged as 80
    of the prompt's own tokens; 5,000 writes as 2), though Anthropic bills every one."""
    usage, inp, read, write, out = _GATEWAY_CACHE[shape]
    model = "claude-sonnet-4-20250514"
    answer = chat_answer(usage, stream, model)
    row = await charged_for(make_settings, "/v1/chat/completions", f"anthropic/{model}", answer)
    billed = Usage(
        input_tokens=inp, cache_read_tokens=read, cache_write_tokens=write, output_tokens=out
    )
    want = nanos(billed, model, "anthropic")
    print(f"{shape}: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (inp, read, out)
    assert row.cost_nanos == want


@pytest.mark.parametrize("asked", [True, False], ids=["asked", "app's choice"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_fast_mode_is_charged_its_prices(
    make_settings: Settings, stream: bool, asked: bool
) -> None:
    """Claude Opus 5 asked for `speed: "fast"` costs $10/$50 per Mtok, not $5/$25; its answer
    says `usage.speed: "fast"`: 10,000 tokens in and 2,000 out cost $0.20, not $0.10. The
    answer says it too when the app behind the middleware chose fast mode itself, and the
    client's request did not ask for it."""
    model = "claude-opus-5"
    usage = {"input_tokens": 10_000, "output_tokens": 2_000, "speed": "fast"}
    answer = anthropic_answer(usage, stream, model)
    speed = {"speed": "fast"} if asked else {}
    row = await charged_for(make_settings, "/v1/messages", model, answer, **speed)
    want = int(
        calc_price(
            Usage(input_tokens=10_000, output_tokens=2_000),
            model,
            provider_id="anthropic",
            price_context={"speed": "fast"},
        ).total_price
        * 10**9
    )
    print("fast mode: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("cached", [0, 150_000], ids=["uncached", "cache-read"])
async def test_long_context_requests_are_charged_their_tier(
    make_settings: Settings, stream: bool, cached: int
) -> None:
    """Above 200k input tokens (cache reads count in) Claude Sonnet 4.5 costs $6/$22.50 per Mtok,
    not $3/$15: every token of such a request, as genai-prices' tiers say."""
    model = "claude-sonnet-4-5"
    usage = {"input_tokens": 250_000 - cached, "cache_read_input_tokens": cached}
    usage["output_tokens"] = 500
    row = await charged_for(
        make_settings, "/v1/messages", model, anthropic_answer(usage, stream, model)
    )
    want = nanos(
        Usage(input_tokens=250_000, cache_read_tokens=cached, output_tokens=500), model, "anthropic"
    )
    print("250k input tokens: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.cost_nanos == want


async def test_a_tool_loop_s_turns_are_each_priced_at_their_own_tier(
    make_settings: Settings,
) -> None:
    """Two turns of a tool loop streamed as one answer (two Anthropic messages), 150k input
    tokens each: each turn is a request of its own below the 200k tier, so both pay $3/$15 per
    Mtok. Their summed 300k paid the long-context tier on every token (a review's: $1.8225 for
    $0.915)."""
    model = "claude-sonnet-4-5"
    usage = {"input_tokens": 150_000, "output_tokens": 500}
    turn = anthropic_answer(usage, True, model)
    assert isinstance(turn, list)
    row = await charged_for(make_settings, "/v1/messages", model, turn + turn)
    want = 2 * nanos(Usage(input_tokens=150_000, output_tokens=500), model, "anthropic")
    print("two 150k turns: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.input_tokens == 300_000
    assert row.cost_nanos == want


@pytest.mark.parametrize("order", ["growing", "shrinking"])
async def test_a_tool_loop_s_turns_either_side_of_a_tier_are_each_charged_their_own(
    make_settings: Settings, order: str
) -> None:
    """A tool loop's context grows past the 200k tier: a turn of 190k input tokens, then one of
    210k, streamed as one answer (two Anthropic messages). Anthropic bills each as the request
    it is: the first at $3/$15 per Mtok, the second at $6/$22.50. Both paid the larger turn's
    tier ($2.4225 for $1.84875, either way round)."""
    model = "claude-sonnet-4-5"
    sizes = [190_000, 210_000] if order == "growing" else [210_000, 190_000]
    events: list[dict[str, Any]] = []
    for size in sizes:
        turn = anthropic_answer({"input_tokens": size, "output_tokens": 500}, True, model)
        assert isinstance(turn, list)
        events += turn
    row = await charged_for(make_settings, "/v1/messages", model, events)
    want = sum(
        nanos(Usage(input_tokens=size, output_tokens=500), model, "anthropic") for size in sizes
    )
    print("190k and 210k turns: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.input_tokens == 400_000
    assert row.cost_nanos == want == 1_848_750_000


async def test_a_tool_loop_s_turn_cut_short_is_estimated_at_its_own_tier(
    make_settings: Settings,
) -> None:
    """The second turn of such a loop (210k input tokens) is cut after 4,000 characters, before
    its usage: estimated at 1,000 output tokens, at its own tier; the first (190k, whole) still
    at $3/$15 per Mtok: $1.86. Grown to the estimate, both paid the tier ($2.43375)."""
    model = "claude-sonnet-4-5"
    first = anthropic_answer({"input_tokens": 190_000, "output_tokens": 500}, True, model)
    second = anthropic_answer({"input_tokens": 210_000, "output_tokens": 1}, True, model)
    assert isinstance(first, list) and isinstance(second, list)
    second[1]["delta"]["text"] = "x" * 4000  # 1,000 tokens, and the stream ends
    row = await charged_for(make_settings, "/v1/messages", model, first + second[:2])
    want = nanos(Usage(input_tokens=190_000, output_tokens=500), model, "anthropic") + nanos(
        Usage(input_tokens=210_000, output_tokens=1000), model, "anthropic"
    )
    print("a turn cut short: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.estimated and row.output_tokens == 1500
    assert row.cost_nanos == want == 1_860_000_000


async def test_a_tool_loop_s_next_completion_cut_before_its_usage_pays_at_least_the_tier_before(
    make_settings: Settings,
) -> None:
    """A tool loop streamed as OpenAI chat completions: one of 210k input tokens with its usage,
    then the next (another `id`) cut after 4,000 characters, before any usage of its own. That
    next completion's prompt holds the first's 210k tokens and more, so it pays the long-context
    tier ($6/$22.50 per Mtok on Claude Sonnet 4.5) too; it was priced at the tier of the
    request body's size alone ($3/$15), though the turn before it was over 200k."""
    model = "claude-sonnet-4-5"
    usage = {"prompt_tokens": 210_000, "completion_tokens": 500, "total_tokens": 210_500}

    def delta(ident: str, text: str) -> dict[str, Any]:
        return {"id": ident, "model": model, "choices": [{"index": 0, "delta": {"content": text}}]}

    events = [
        delta("a", "hi"),
        {"id": "a", "model": model, "choices": [], "usage": usage},
        delta("b", "x" * 4000),  # 1,000 tokens, and the stream ends
    ]
    row = await charged_for(make_settings, "/v1/chat/completions", model, events)
    guessed = row.input_tokens - 210_000  # the next completion's prompt, guessed from the body
    want = nanos(Usage(input_tokens=210_000, output_tokens=500), model, "anthropic") + (
        guessed * 6_000 + 1_000 * 22_500  # nano-dollars a token at $6 and $22.50 per Mtok
    )
    print("a completion after a 210k one, cut: charged", row.cost_nanos, "nano-dollars; want", want)
    assert row.estimated and row.output_tokens == 1_500 and 0 < guessed < 200
    assert row.cost_nanos == want


@pytest.mark.parametrize("prompt", [200_000, 200_001])
async def test_gemini_is_charged_its_long_context_tier_above_200k_tokens(
    make_settings: Settings, prompt: int
) -> None:
    answer = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": 1000}}
    row = await charged_for(make_settings, "/v1/chat/completions", "gemini/gemini-2.5-pro", answer)
    want = nanos(Usage(input_tokens=prompt, output_tokens=1000), "gemini-2.5-pro", "google")
    print(prompt, "prompt tokens: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.cost_nanos == want


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_web_searches_are_charged(make_settings: Settings, stream: bool) -> None:
    """Anthropic bills $10 per thousand web searches besides the tokens; the count is in
    `usage.server_tool_use.web_search_requests` (streamed: in the last `message_delta`)."""
    usage = {
        "input_tokens": 100,
        "output_tokens": 500,
        "server_tool_use": {"web_search_requests": 3},
    }
    model = "claude-sonnet-4-20250514"
    row = await charged_for(make_settings, "/v1/messages", model, anthropic_answer(usage, stream))
    want = nanos(Usage(input_tokens=100, output_tokens=500, web_searches=3), model, "anthropic")
    print("3 web searches: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert row.cost_nanos == want


# A Responses API answer's web searches (OpenAI's `web_search` tool): a `web_search_call` output
# item each, its action a search; opening a page it found and finding in one are no search.
def _searched(query: str) -> dict[str, Any]:
    return {
        "type": "web_search_call",
        "status": "completed",
        "action": {"type": "search", "query": query},
    }


SEARCHED_OUTPUT: list[dict[str, Any]] = [
    _searched("budget middleware"),
    {"type": "reasoning", "summary": []},
    _searched("asgi"),
    {"type": "web_search_call", "status": "completed", "action": {"type": "open_page"}},
    _searched("llm prices"),
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_openai_responses_web_searches_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """OpenAI bills its Responses API's web search tool $10 a thousand searches besides the
    tokens (the catalog's gpt-5 `web_searches_kcount`); an answer says each search as a
    `web_search_call` output item (its usage does not count them), streamed in
    `response.completed`'s response. 3 searches on 1,000 input and 500 output tokens: $0.03
    more than the tokens' $0.00625, charged the tokens alone before."""
    model = "gpt-5"
    usage = {
        "input_tokens": 1_000,
        "output_tokens": 500,
        "total_tokens": 1_500,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    response = {"object": "response", "model": model, "output": SEARCHED_OUTPUT, "usage": usage}
    answer: dict[str, Any] | list[dict[str, Any]] = (
        [{"type": "response.completed", "response": response}] if stream else response
    )
    row = await charged_for(
        make_settings, "/v1/responses", f"openai/{model}", answer, tools=[{"type": "web_search"}]
    )
    want = nanos(Usage(input_tokens=1_000, output_tokens=500, web_searches=3), model, "openai")
    tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), model, "openai")
    print("3 web searches: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert want == tokens + 30_000_000  # $10 a thousand: 3 cost $0.03
    assert row.cost_nanos == want


# A Responses API answer's file searches (OpenAI's `file_search` tool): a `file_search_call`
# output item each, however many queries it ran.
def _file_searched(*queries: str) -> dict[str, Any]:
    return {"type": "file_search_call", "status": "completed", "queries": list(queries)}


FILE_SEARCHED_OUTPUT: list[dict[str, Any]] = [
    _file_searched("refund policy"),
    {"type": "reasoning", "summary": []},
    _file_searched("refund window", "refund fees"),
    _searched("asgi"),
    _file_searched("contact"),
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
]

RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 1_000,
    "output_tokens": 500,
    "total_tokens": 1_500,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_openai_responses_file_searches_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """OpenAI bills its Responses API's file search tool $2.50 a thousand tool calls besides the
    tokens (the catalog's gpt-5 `storage_searches_kcount`); an answer says each call as a
    `file_search_call` output item (one call, whatever its queries), which its usage does not
    count. 3 file searches and a web search on 1,000 input and 500 output tokens: the tokens'
    $0.00625, $0.0075 and $0.01; the file searches were charged nothing before."""
    model = "gpt-5"
    response = {
        "object": "response",
        "model": model,
        "output": FILE_SEARCHED_OUTPUT,
        "usage": RESPONSES_USAGE,
    }
    answer: dict[str, Any] | list[dict[str, Any]] = (
        [{"type": "response.completed", "response": response}] if stream else response
    )
    tools = [{"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "web_search"}]
    row = await charged_for(make_settings, "/v1/responses", f"openai/{model}", answer, tools=tools)
    tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), model, "openai")
    want = tokens + 3 * 2_500_000 + 10_000_000  # $2.50 and $10 a thousand, in nano-dollars
    catalog = nanos(
        Usage(input_tokens=1_000, output_tokens=500, storage_searches=3, web_searches=1),
        model,
        "openai",
    )
    print("3 file searches, 1 web search: charged", row.cost_nanos, "nano-dollars; want", want)
    assert want == catalog == 23_750_000
    assert row.cost_nanos == want


async def test_a_pricing_file_s_file_search_price_is_charged(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A pricing file's entry prices file searches too (`file_search_per_k`, USD a thousand
    calls): 3 at $4 a thousand on 1,000 input tokens at $1/Mtok and 500 output at $2/Mtok,
    $0.002 + $0.012."""
    path = tmp_path / "prices.json"
    entry = {"input_per_mtok": 1, "output_per_mtok": 2, "file_search_per_k": 4}
    path.write_text(json.dumps({"models": {"openai/house-model": entry}}))
    response = {
        "object": "response",
        "model": "house-model",
        "output": FILE_SEARCHED_OUTPUT,
        "usage": RESPONSES_USAGE,
    }
    row = await charged_for(
        lambda **kw: make_settings(pricing_file=path, **kw),
        "/v1/responses",
        "openai/house-model",
        response,
        tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}],
    )
    want = 1_000 * 1_000 + 500 * 2_000 + 3 * 4_000_000  # nano-dollars
    print("3 file searches at $4 a thousand: charged", row.cost_nanos, "nano-dollars; want", want)
    assert row.cost_nanos == want == 14_000_000


async def test_searches_of_a_stored_prompt_s_tools_are_charged(make_settings: Settings) -> None:
    """A Responses API request may name its tools only through a stored prompt (`prompt: {id}`,
    no `tools`): its JSON answer's searches are billed all the same, as its stream's are. Two
    web searches and three file searches on gpt-5: $0.0275 beside the tokens' $0.00625."""
    model = "gpt-5"
    output = [*FILE_SEARCHED_OUTPUT, _searched("budget middleware")]
    response = {"object": "response", "model": model, "output": output, "usage": RESPONSES_USAGE}
    row = await charged_for(
        make_settings,
        "/v1/responses",
        f"openai/{model}",
        response,
        prompt={"id": "pmpt_abc123", "version": "2"},
    )
    tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), model, "openai")
    want = tokens + 3 * 2_500_000 + 2 * 10_000_000
    print("a stored prompt's searches: charged", row.cost_nanos, "nano-dollars; want", want)
    assert row.cost_nanos == want == 33_750_000


# A Responses API answer's images drawn by OpenAI's image generation tool: an
# `image_generation_call` output item each, its `result` the image in base64 (no text), its
# `quality` and `size` what it was drawn at. OpenAI bills each at its image model's prices
# (gpt-image-1's, the tool's default: a medium 1024x1024 image is 1,056 image output tokens at
# $40 per Mtok, $0.04224), beside the tokens of the model that called it, which its usage
# counts alone.
_IMAGE_TOOL = [{"type": "image_generation", "quality": "medium", "size": "1024x1024"}]
_DRAWN: dict[str, Any] = {
    "id": "ig_1",
    "type": "image_generation_call",
    "status": "completed",
    "background": "opaque",
    "output_format": "png",
    "quality": "medium",
    "size": "1024x1024",
    "revised_prompt": "A gray tabby cat hugging an otter with an orange scarf",
    "result": "iVBORw0KGgo" + "A" * 400_000,  # a 300 KB image's base64
}
_SAID: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "Here is your cat.", "annotations": []}],
}
_IMAGE_TOKENS = 1_056  # gpt-image-1's medium 1024x1024 image


def _image_answer(stream: bool, usage: dict[str, Any] | None) -> Any:
    """A Responses answer of gpt-4.1 with a drawn image and a line of text, its `usage` or none:
    JSON, or its events (the image in `response.output_item.done`, the text as deltas)."""
    response: dict[str, Any] = {"object": "response", "model": "gpt-4.1", "output": [_DRAWN, _SAID]}
    if usage is not None:
        response["usage"] = usage
    if not stream:
        return response
    return [
        {"type": "response.created", "response": {"model": "gpt-4.1", "output": []}},
        {"type": "response.output_item.done", "output_index": 0, "item": _DRAWN},
        {"type": "response.output_text.delta", "output_index": 1, "delta": "Here is your cat."},
        {"type": "response.output_item.done", "output_index": 1, "item": _SAID},
        {"type": "response.completed", "response": response},
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_openai_responses_images_drawn_by_the_image_tool_are_charged(
    make_settings: Settings, stream: bool
) -> None:
    """gpt-4.1 calls the image generation tool once (medium, 1024x1024) on 1,000 input and 500
    output tokens: the tokens' $0.006 by genai-prices, and the image's $0.04224 at gpt-image-1's
    prices, which the usage leaves out: it was charged the tokens alone."""
    row = await charged_for(
        make_settings,
        "/v1/responses",
        "openai/gpt-4.1",
        _image_answer(stream, RESPONSES_USAGE),
        tools=_IMAGE_TOOL,
    )
    tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    image = nanos(Usage(output_tokens=_IMAGE_TOKENS), "gpt-image-1", "openai")
    want = tokens + image
    print("an image tool's image: charged", row.cost_nanos, "nano-dollars; want", want)
    assert image == 42_240_000 and want == 48_240_000
    assert row.cost_nanos == want
    assert row.output_tokens == 500 + _IMAGE_TOKENS and not row.estimated


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_answer_without_usage_is_charged_its_text_and_its_drawn_images(
    make_settings: Settings, stream: bool
) -> None:
    """The same answer without its usage (a gateway that strips it): estimated from its text,
    the image's base64 no text, and the image at gpt-image-1's prices. Its 400,000 characters of
    base64 were charged as text as JSON (100,027 output tokens, $0.800342), and the image nothing
    when streamed (5 output tokens, $0.000164); now $0.042558 and $0.042404."""
    row = await charged_for(
        make_settings,
        "/v1/responses",
        "openai/gpt-4.1",
        _image_answer(stream, None),
        tools=_IMAGE_TOOL,
    )
    print(
        "an image tool's image, no usage: charged", row.cost_nanos, "nano-dollars for",
        row.output_tokens, "output tokens, of which", _IMAGE_TOKENS, "the image's",
    )  # fmt: skip
    text = row.output_tokens - _IMAGE_TOKENS  # the estimate of its text (as JSON, its revised
    assert row.estimated and 0 < text < 40  # prompt too)
    tokens = nanos(Usage(input_tokens=row.input_tokens, output_tokens=text), "gpt-4.1", "openai")
    image = nanos(Usage(output_tokens=_IMAGE_TOKENS), "gpt-image-1", "openai")
    print("want", tokens + image, "nano-dollars:", tokens, "for its text and", image, "its image")
    assert row.cost_nanos == tokens + image


@pytest.mark.parametrize("reported", [True, False], ids=["usage", "no-usage"])
async def test_an_image_over_2_mib_is_charged_as_a_small_one_is(
    make_settings: Settings, reported: bool
) -> None:
    """A PNG the image tool drew is 1.5 to 3 MB, its base64 2 to 4 MB: past the 2 MiB of a JSON
    answer kept whole (of a larger one the last MiB alone, where the image's item is no JSON).
    Its base64 (3 MB here) is left out of what is kept, so the answer is read whole: with usage,
    the image was not counted (the tokens' $0.006 alone); without, every byte was charged as
    text (750,000 output tokens, $6)."""
    drawn = {**_DRAWN, "result": "iVBORw0KGgo" + "A" * 3_000_000}
    answer = _image_answer(False, RESPONSES_USAGE if reported else None)
    answer["output"] = [drawn, _SAID]
    row = await charged_for(
        make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=_IMAGE_TOOL
    )
    print(
        "a 3 MB image's answer: charged", row.cost_nanos, "nano-dollars for",
        row.output_tokens, "output tokens, of which", _IMAGE_TOKENS, "the image's",
    )  # fmt: skip
    image = nanos(Usage(output_tokens=_IMAGE_TOKENS), "gpt-image-1", "openai")
    if reported:
        tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
        assert row.cost_nanos == tokens + image == 48_240_000
    else:
        text = row.output_tokens - _IMAGE_TOKENS
        assert row.estimated and 0 < text < 40
        text_cost = nanos(
            Usage(input_tokens=row.input_tokens, output_tokens=text), "gpt-4.1", "openai"
        )
        assert row.cost_nanos == text_cost + image


# The tool's image model, when it names one (gpt-image-1 else), and what OpenAI bills a medium
# 1024x1024 image of it: its image output tokens at its image output price per Mtok.
_TOOL_MODELS = {
    "gpt-image-1-mini": (1_056, 8),
    "gpt-image-1.5": (1_056, 32),
    "gpt-image-2": (1_756, 30),
}


@pytest.mark.parametrize("model", list(_TOOL_MODELS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_image_tool_s_images_are_priced_as_its_model_draws_them(
    make_settings: Settings, stream: bool, model: str
) -> None:
    """A request naming the tool's image model (`"model": "gpt-image-1-mini"`) is billed that
    model's image tokens at its image output price: every tool image was charged as gpt-image-1
    (1,056 tokens at $40 per Mtok, $0.04224), 5 times mini's $0.008448, where gpt-image-2's
    1,756 at $30 are $0.05268."""
    tokens, usd_per_mtok = _TOOL_MODELS[model]
    drawn = {**_DRAWN, "result": "iVBORw0KGgo"}
    answer = _image_answer(stream, RESPONSES_USAGE)
    if stream:
        answer[1]["item"] = drawn
        answer[-1]["response"]["output"] = [drawn, _SAID]
    else:
        answer["output"] = [drawn, _SAID]
    tool = [{**_IMAGE_TOOL[0], "model": model}]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=tool)
    text = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    image = tokens * usd_per_mtok * 1_000
    print(f"{model}'s tool image: charged {row.cost_nanos - text} nano-USD; billed {image}")
    assert row.cost_nanos == text + image
    assert row.output_tokens == 500 + tokens


async def test_partial_images_the_image_tool_streams_are_charged(make_settings: Settings) -> None:
    """A streamed answer's partial images (the tool's `partial_images`, each a
    `response.image_generation_call.partial_image` event) are billed 100 image output tokens
    each beside the image: 2 of them were not charged ($0.008 at gpt-image-1's $40 per Mtok)."""
    partial = {
        "type": "response.image_generation_call.partial_image",
        "output_index": 0,
        "item_id": "ig_1",
        "partial_image_b64": "iVBORw0KGgo",
    }
    answer = _image_answer(True, RESPONSES_USAGE)
    answer[1:1] = [{**partial, "partial_image_index": i} for i in range(2)]
    tool = [{**_IMAGE_TOOL[0], "partial_images": 2}]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=tool)
    text = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    image = (_IMAGE_TOKENS + 200) * 40 * 1_000
    print(
        f"an image and 2 partial images: charged {row.cost_nanos - text} nano-USD; billed {image}"
    )
    assert row.cost_nanos == text + image


_PARTIAL: dict[str, Any] = {
    "type": "response.image_generation_call.partial_image",
    "output_index": 0,
    "item_id": "ig_1",
    "partial_image_b64": "iVBORw0KGgo",
}


def _with_partials(ident: str, partials: int) -> list[dict[str, Any]]:
    """One response `ident` of a stream: an image and `partials` partial images before it."""
    answer = _image_answer(True, RESPONSES_USAGE)
    answer[0]["response"]["id"] = answer[-1]["response"]["id"] = ident
    answer[1:1] = [{**_PARTIAL, "partial_image_index": i} for i in range(partials)]
    return answer


async def test_each_response_of_a_stream_is_charged_its_own_partial_images(
    make_settings: Settings,
) -> None:
    """A stream of two responses (an app's tool loop streamed as one answer), each an image and
    2 partial images: each response's usage counted every partial image streamed so far, the
    second's 4, charged 200 image tokens (at gpt-image-1's $40 per Mtok: $0.008) more than
    billed."""
    answer = _with_partials("resp_1", 2) + _with_partials("resp_2", 2)
    tool = [{**_IMAGE_TOOL[0], "partial_images": 2}]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=tool)
    text = 2 * nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    image = 2 * (_IMAGE_TOKENS + 200) * 40 * 1_000
    print(f"2 responses, each an image and 2 partials: charged {row.cost_nanos - text} nano-USD;")
    print(f"  billed {image}")
    assert row.cost_nanos == text + image
    assert row.output_tokens == 2 * (500 + _IMAGE_TOKENS + 200)


async def test_an_image_tool_model_without_a_price_is_warned_of_as_charged(
    make_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The image generation tool naming a model without a price (`gpt-image-9`): its images are
    charged at gpt-image-1's $40 per Mtok (counted as gpt-image-2's, the most: 1,756 tokens a
    medium 1024x1024 one), but the warning said "its requests cost 0"."""
    tool = [{**_IMAGE_TOOL[0], "model": "gpt-image-9"}]
    with caplog.at_level("WARNING", logger="budget_middleware"):
        row = await charged_for(
            make_settings, "/v1/responses", "openai/gpt-4.1", _image_answer(False, RESPONSES_USAGE),
            tools=tool,
        )  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "gpt-image-9" in r.getMessage()]
    text = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    print(f"charged {row.cost_nanos - text} nano-USD for its image; warned: {said}")
    assert row.cost_nanos - text == 1_756 * 40 * 1_000
    assert said and not any("cost 0" in s for s in said)
    assert any("$40" in s for s in said)


# What the image model consumed, as OpenAI reports it beside a Responses answer's usage: the
# prompt it was sent (text and images) and its output, exact (2 partial images' 200 included).
_TOOL_USAGE = {
    "image_gen": {
        "input_tokens": 120,
        "input_tokens_details": {"image_tokens": 80, "text_tokens": 40},
        "output_tokens": 1_256,
        "output_tokens_details": {"image_tokens": 1_256, "text_tokens": 0},
        "total_tokens": 1_376,
    },
    "web_search": {"num_requests": 0},
}
# The tool's model: its text input, image input and image output prices per Mtok.
_TOOL_PRICES = {"gpt-image-1": (5, 10, 40), "gpt-image-1-mini": (2, 2.5, 8)}


@pytest.mark.parametrize("model", list(_TOOL_PRICES))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_image_model_s_usage_an_answer_reports_is_charged_at_its_prices(
    make_settings: Settings, stream: bool, model: str
) -> None:
    """A Responses answer reports what the image generation tool's model consumed (its top-level
    `tool_usage.image_gen`): 40 text and 80 image input tokens (the prompt it was sent, an
    image to edit) and 1,256 output tokens. They are charged at that model's prices, as billed:
    its images were charged by the table (1,056 tokens, the partial images not streamed here)
    and its input nowhere ($0.00100 at gpt-image-1's $5 and $10)."""
    text_in, image_in, image_out = _TOOL_PRICES[model]
    drawn = {**_DRAWN, "result": "iVBORw0KGgo"}
    answer = _image_answer(stream, RESPONSES_USAGE)
    response = answer[-1]["response"] if stream else answer
    response["output"] = [drawn, _SAID]
    response["tool_usage"] = _TOOL_USAGE
    tool = [{**_IMAGE_TOOL[0], "model": model}]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=tool)
    text = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    billed = round((40 * text_in + 80 * image_in + 1_256 * image_out) * 1_000)
    print(f"{model}, tool_usage reported: charged {row.cost_nanos - text} nano-USD beside the")
    print(f"  text; billed {billed}; record {row.input_tokens} in, {row.output_tokens} out")
    assert row.cost_nanos - text == billed
    assert (row.input_tokens, row.output_tokens) == (1_000 + 120, 500 + 1_256)


# An image generation call that failed (OpenAI's `"status": "failed"`, no `result`): no image
# was drawn.
_FAILED: dict[str, Any] = {
    "id": "ig_2",
    "type": "image_generation_call",
    "status": "failed",
    "result": None,
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_image_generation_call_that_failed_is_charged_no_image(
    make_settings: Settings, stream: bool
) -> None:
    """gpt-4.1 calls the image generation tool, and the call fails (`"status": "failed"`,
    `"result": null`, no size or quality said): it drew nothing. It was charged the most one
    image of gpt-image-1 bills (6,240 tokens, $0.2496) beside the $0.006 of its tokens."""
    answer = _image_answer(stream, RESPONSES_USAGE)
    if stream:
        answer[1]["item"] = _FAILED
        answer[-1]["response"]["output"] = [_FAILED, _SAID]
    else:
        answer["output"] = [_FAILED, _SAID]
    row = await charged_for(
        make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=_IMAGE_TOOL
    )
    tokens = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    print(f"a failed image call: charged {row.cost_nanos} nano-USD; its tokens' {tokens}")
    assert row.cost_nanos == tokens
    assert row.output_tokens == 500


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_image_model_s_input_alone_is_charged_at_its_prices(
    make_settings: Settings, stream: bool
) -> None:
    """An answer whose image model read its prompt and drew nothing (its call failed:
    `tool_usage.image_gen` reports 40 text and 80 image input tokens, 0 output) is charged that
    input at gpt-image-1's $5 and $10 per Mtok ($0.001), as one that drew is: it was charged at
    the calling model's input price (gpt-4.1's $2: $0.00024)."""
    answer = _image_answer(stream, RESPONSES_USAGE)
    response = answer[-1]["response"] if stream else answer
    if stream:
        answer[1]["item"] = _FAILED
    response["output"] = [_FAILED, _SAID]
    response["tool_usage"] = {
        "image_gen": {
            "input_tokens": 120,
            "input_tokens_details": {"image_tokens": 80, "text_tokens": 40},
            "output_tokens": 0,
            "total_tokens": 120,
        }
    }
    row = await charged_for(
        make_settings, "/v1/responses", "openai/gpt-4.1", answer, tools=_IMAGE_TOOL
    )
    text = nanos(Usage(input_tokens=1_000, output_tokens=500), "gpt-4.1", "openai")
    billed = (40 * 5 + 80 * 10) * 1_000
    print(f"the image model's input alone: charged {row.cost_nanos - text} nano-USD beside the")
    print(f"  text; billed {billed}")
    assert row.cost_nanos - text == billed
    assert (row.input_tokens, row.output_tokens) == (1_000 + 120, 500)


# A Responses answer as JSON may be written: in UTF-16 or UTF-32 (RFC 7159 JSON, which Python's
# `json` reads), or with its names `\u`-escaped (`"web_search_cal\u006c"`), as some writers do.
_ESCAPED = {  # the item types, escaped
    '"web_search_call"': '"\\u0077eb_search_cal\\u006c"',
    '"file_search_call"': '"file_search_cal\\u006c"',
}


@pytest.mark.parametrize("written", ["utf-16", "utf-32", "utf-16-le", "escaped"])
async def test_a_responses_answer_s_usage_and_searches_are_read_however_its_json_is_written(
    make_settings: Settings, written: str
) -> None:
    """The same answer (3 web searches, 1 file search on gpt-5 with 1,000 input and 500 output
    tokens: $0.03875) written another way is billed the same. In UTF-16 or UTF-32 its usage was
    not read at all (an estimate from its text was charged); with its item types escaped, its
    searches were not counted (the tokens' $0.00625 alone)."""
    model = "gpt-5"
    output = [*SEARCHED_OUTPUT, _file_searched("refund policy")]
    response = {"object": "response", "model": model, "output": output, "usage": RESPONSES_USAGE}
    text = json.dumps(response)
    if written == "escaped":
        for name, escaped in _ESCAPED.items():
            text = text.replace(name, escaped)
        body = text.encode()
    else:
        body = text.encode(written)
    app = FastAPI()

    @app.post("/v1/responses")
    async def answer_it() -> Response:
        return Response(body, media_type="application/json")

    tools = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    wrapped = BudgetMiddleware(app, settings=make_settings())
    async with running(wrapped), client(wrapped) as http:
        sent = await http.post("/v1/responses", json=chat(f"openai/{model}", tools=tools))
        assert sent.status_code == 200 and sent.content == body
        row = (await records(wrapped.engine))[-1]
    want = nanos(
        Usage(input_tokens=1_000, output_tokens=500, web_searches=3, storage_searches=1),
        model,
        "openai",
    )
    print(f"{written}: charged", row.cost_nanos, "nano-dollars, genai-prices says", want)
    assert want == 38_750_000
    assert (row.cost_nanos, row.estimated) == (want, False)


@pytest.mark.parametrize("hour", [5, 7, 12, 23])
async def test_a_model_priced_by_the_time_of_day_is_charged_the_price_of_its_hour(
    make_settings: Settings, hour: int
) -> None:
    """DeepSeek V4 Flash costs $0.30 / $1.20 per Mtok from 01:00 to 04:00 and 06:00 to 10:00
    UTC, and $0.15 / $0.60 at every other hour: a request is charged the prices of the hour it
    was made at, as genai-prices says (every hour's peak price was charged, twice the price)."""
    model = "deepseek-v4-flash"
    made = datetime.now(UTC).replace(hour=hour, minute=30, second=0, microsecond=0)
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "total_tokens": 12_000,
        "prompt_tokens_details": {"cached_tokens": 4_000},
    }
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def answer() -> dict[str, Any]:
        return {"model": model, "choices": [], "usage": usage}

    engine = BudgetEngine(make_settings(), clock=made.timestamp)
    wrapped = BudgetMiddleware(app, engine=engine)
    async with running(wrapped), client(wrapped) as http:
        sent = await http.post("/v1/chat/completions", json=chat(f"deepseek/{model}"))
        assert sent.status_code == 200
        rows = await records(engine)
    want = calc_price(
        Usage(input_tokens=10_000, cache_read_tokens=4_000, output_tokens=2_000),
        model,
        provider_id="deepseek",
        genai_request_timestamp=made,
    ).total_price
    print(f"{hour:02}:30 UTC: charged", rows[0].cost_nanos, "nano-dollars, genai-prices", want)
    assert rows[0].cost_nanos == int(want * 10**9)


# -- service tiers: OpenAI's priority and flex, priced apart ------------------------------------

TIER_USAGE = {"prompt_tokens": 10_000, "completion_tokens": 2_000, "total_tokens": 12_000}


def tier_price(tier: str | None, model: str = "gpt-5") -> int:
    """What genai-prices charges `TIER_USAGE` on `model` served at `tier`, in nano-dollars."""
    usage = Usage(input_tokens=10_000, output_tokens=2_000)
    context = None if tier is None else {"service_tier": tier}
    calc = calc_price(usage, model, provider_id="openai", price_context=context)
    return int(calc.total_price * 10**9)


def tier_answer(shape: str, tier: str | None) -> dict[str, Any] | list[dict[str, Any]]:
    """An answer reporting `TIER_USAGE` served at `tier` (None: it does not say), as OpenAI
    sends it: a chat completion has its `service_tier` after the usage, in each chunk of a
    stream; the Responses API before the usage, in `response.completed` when streamed."""
    said = {} if tier is None else {"service_tier": tier}
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
    if shape == "chat-json":
        return {"model": "gpt-5", "choices": [choice], "usage": TIER_USAGE, **said}
    if shape == "chat-sse":
        delta = {"index": 0, "delta": {"content": "hi"}}
        return [
            {"model": "gpt-5", "choices": [delta], "usage": None, **said},
            {"model": "gpt-5", "choices": [], "usage": TIER_USAGE, **said},
        ]
    usage = {
        "input_tokens": 10_000,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2_000,
        "total_tokens": 12_000,
    }
    text = [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]
    response = {"object": "response", "model": "gpt-5", "output": text, **said}
    response |= {"store": True, "tools": [], "usage": usage, "user": None}
    if shape == "responses-json":
        return response
    return [{"type": "response.completed", "response": response}]


SHAPES = ["chat-json", "chat-sse", "responses-json", "responses-sse"]


def _path(shape: str) -> str:
    return "/v1/chat/completions" if shape.startswith("chat") else "/v1/responses"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tier", ["priority", "flex"])
async def test_a_request_served_at_a_service_tier_is_charged_that_tier_s_prices(
    make_settings: Settings, shape: str, tier: str
) -> None:
    """gpt-5 served at `priority` costs twice its standard prices, at `flex` half: the tier the
    answer says it was served at is charged, in every shape OpenAI answers in, whatever the
    request asked for ("auto": the project's own tier)."""
    row = await charged_for(
        make_settings, _path(shape), "openai/gpt-5", tier_answer(shape, tier), service_tier="auto"
    )
    want, standard = tier_price(tier), tier_price(None)
    print(f"{shape} served at {tier}: charged {row.cost_nanos} n$, genai-prices {want}")
    print(f"  (the standard prices: {standard} n$)")
    assert want != standard
    assert row.cost_nanos == want


@pytest.mark.parametrize("shape", ["chat-json", "responses-sse"])
async def test_a_service_tier_asked_for_and_not_answered_is_charged_and_an_answer_s_wins(
    make_settings: Settings, shape: str
) -> None:
    """An answer that does not say its tier is charged the tier the request asked for; one that
    does is charged its own (OpenAI serves a `priority` request at `default` when it has no
    room). "auto" and "default" pay the standard prices."""
    charged = {}
    for asked, said in [("priority", None), ("priority", "default"), ("auto", None)]:
        answer = tier_answer(shape, said)
        row = await charged_for(
            make_settings, _path(shape), "openai/gpt-5", answer, service_tier=asked
        )
        charged[(asked, said)] = row.cost_nanos
    print(f"{shape}: charged by (asked, answered) tier {charged}")
    assert charged[("priority", None)] == tier_price("priority")
    assert charged[("priority", "default")] == tier_price(None)
    assert charged[("auto", None)] == tier_price(None)


@pytest.mark.parametrize("asked", ["priority", "flex", "auto"])
async def test_a_reservation_is_made_at_the_service_tier_asked_for(
    make_settings: Settings, asked: str
) -> None:
    """In flight, a request holds its worst case at the prices of the tier it asks for: a
    `priority` request to gpt-5 twice what a standard one holds (else its budget could be
    overrun by every priority request in flight); "auto" the standard prices, and so does
    `flex`: an answer that does not say it was served at flex is charged the standard ones."""
    app = FastAPI()
    arrived, release = asyncio.Event(), asyncio.Event()

    @app.post("/v1/chat/completions")
    async def answer_it() -> Response:
        arrived.set()
        await release.wait()
        return Response(json.dumps(tier_answer("chat-json", None)), media_type="application/json")

    wrapped = BudgetMiddleware(app, settings=make_settings())
    engine = wrapped.engine
    async with running(wrapped), client(wrapped) as http:
        key = engine.manager.create_virtual_key(
            name="tiers", budgets=[{"max_limit": 100, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        body = chat("openai/gpt-5", max_tokens=1000, service_tier=asked)
        auth = {"authorization": f"Bearer {key.value}"}
        sent = asyncio.ensure_future(http.post("/v1/chat/completions", json=body, headers=auth))
        await arrived.wait()
        counter = engine.registry.counter("budget", key.budgets[0].id)
        assert counter is not None
        held = counter.reserved
        release.set()
        assert (await sent).status_code == 200
    prompt = len(orjson.dumps(body)) // 3 + 1  # the body's estimate of its input
    price = engine.prices.price("openai", "gpt-5")
    assert price is not None
    want = {
        tier: estimate_nanos(for_service_tier(price, tier), prompt, 1000)
        for tier in ("priority", "flex", "auto")
    }
    print(f"asked {asked}: {held} n$ held in flight; at each tier's prices {want}")
    assert want["priority"] > want["auto"] > want["flex"]
    assert held == want["auto" if asked == "flex" else asked]


@pytest.mark.parametrize("shape", ["chat-json", "responses-sse"])
async def test_a_cheaper_tier_asked_for_is_charged_only_when_the_answer_says_it_was_served(
    make_settings: Settings, shape: str
) -> None:
    """A request asking for `flex` whose answer does not say its tier pays the standard prices:
    OpenAI answers a flex request at flex (and says so) or refuses it, so a silent answer comes
    through an app that may not have passed the field on, and the provider billed it standard
    (before: charged flex, half). An answer saying `flex` is charged flex."""
    charged = {}
    for said in (None, "flex"):
        answer = tier_answer(shape, said)
        row = await charged_for(
            make_settings, _path(shape), "openai/gpt-5", answer, service_tier="flex"
        )
        charged[said] = row.cost_nanos
    print(f"{shape}: asked flex, charged by answered tier {charged}")
    print(f"  (standard {tier_price(None)} n$, flex {tier_price('flex')} n$)")
    assert charged[None] == tier_price(None)
    assert charged["flex"] == tier_price("flex")


async def test_a_tier_named_inside_an_echoed_tool_schema_is_not_the_answer_s(
    make_settings: Settings,
) -> None:
    """The Responses API echoes the request's tools, after its own `service_tier` and before
    the usage: a client's schema holding `"service_tier": "flex"` is not where the answer was
    served (before: a priority answer charged flex, a quarter of what OpenAI bills)."""
    answer = tier_answer("responses-json", "priority")
    assert isinstance(answer, dict)
    schema = {"type": "object", "properties": {}, "service_tier": "flex"}
    answer["tools"] = [{"type": "function", "name": "pick", "parameters": schema}]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-5", answer)
    print(f"served at priority, a tool's schema says flex: charged {row.cost_nanos} n$")
    print(f"  (priority {tier_price('priority')} n$, flex {tier_price('flex')} n$)")
    assert row.cost_nanos == tier_price("priority")


async def test_a_tier_found_past_many_echoed_schemas_that_name_one(
    make_settings: Settings,
) -> None:
    """The search for the answer's `service_tier` before the usage tries a few keys from the
    end, as the usage's does, and then reads the whole answer, as the usage's does: a client's
    tool schemas (echoed after the tier, before the usage) naming `service_tier` at least as
    many times left it unread (before: served at priority, asking nothing, charged the standard
    prices, half of what OpenAI bills)."""
    answer = tier_answer("responses-json", "priority")
    assert isinstance(answer, dict)
    schema = {"type": "object", "properties": {"service_tier": {"type": "string"}}}
    answer["tools"] = [
        {"type": "function", "name": f"pick{i}", "parameters": schema} for i in range(4)
    ]
    row = await charged_for(make_settings, "/v1/responses", "openai/gpt-5", answer)
    print(f"served at priority, 4 tool schemas name service_tier: charged {row.cost_nanos} n$")
    print(f"  (priority {tier_price('priority')} n$, standard {tier_price(None)} n$)")
    assert row.cost_nanos == tier_price("priority")


async def test_a_request_asking_for_cache_writes_reserves_its_input_at_their_price(
    make_settings: Callable[..., BudgetSettings],
) -> None:
    """An Anthropic request with `cache_control` (1 hour) may be billed its whole prompt as
    cache writes, at twice the input price (claude-sonnet-4-5: $6/Mtok, not $3): reserving it
    at the input price, 40 at once with a 50k-token prompt each spent $1.20 on a $1 budget.
    Reserved at the writes' price, none overshoots."""

    app = FastAPI()

    @app.post("/v1/messages")
    async def anthropic(request: Request) -> dict[str, Any]:
        body = await request.json()
        written = len(body["system"][0]["text"]) // 4  # English: ~4 characters a token
        await asyncio.sleep(0.02)  # in flight together
        usage = {
            "input_tokens": 10,
            "cache_creation_input_tokens": written,
            "cache_creation": {"ephemeral_1h_input_tokens": written},
            "output_tokens": 10,
        }
        return {"type": "message", "content": [], "usage": usage}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    cached = {"type": "ephemeral", "ttl": "1h"}
    body = {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "word " * 40_000, "cache_control": cached}],
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
    }
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1.0}])
        auth = {"authorization": f"Bearer {key.value}"}
        answers = await asyncio.gather(
            *[http.post("/v1/messages", json=body, headers=auth) for _ in range(40)]
        )
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    codes = [a.status_code for a in answers]
    print(f"40 cache-writing requests at once: {codes.count(200)} admitted, ${spent:.4f} of $1")
    assert codes.count(200) >= 2
    assert spent <= 1.0 + 1e-9


@pytest.mark.parametrize(("budget", "second"), [(0.45, 429), (0.65, 200)])
async def test_a_request_asking_for_5_minute_cache_writes_reserves_its_input_at_their_price(
    make_settings: Callable[..., BudgetSettings], budget: float, second: int
) -> None:
    """`cache_control` without a `ttl` (5 minutes): the prompt (some 66,700 tokens) may all be
    cache writes at claude-sonnet-4-5's $3.75/Mtok, so a request reserves about $0.25, neither
    the input's $3 ($0.20) nor the 1-hour writes' $6 ($0.40). A second request made while the
    first is in flight (by the app itself: no timing) finds room for both on a $0.65 budget,
    and none on a $0.45 one (429 `budget_reserved`). Only the 1-hour price was tested (a
    mutation run's survivors: 5-minute writes reserved at the input's price or the hour's)."""
    app = FastAPI()
    inner: list[int] = []

    @app.post("/v1/messages")
    async def anthropic(request: Request) -> dict[str, Any]:
        if request.headers.get("x-inner") is None:  # the first: a second while it is in flight
            headers = {**request.headers, "x-inner": "1"}
            headers.pop("content-length", None)
            again = await http.post("/v1/messages", content=await request.body(), headers=headers)
            inner.append(again.status_code)
        usage = {"input_tokens": 10, "output_tokens": 10}
        return {"type": "message", "content": [], "usage": usage}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    cached = {"type": "ephemeral"}
    body = {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "word " * 40_000, "cache_control": cached}],
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
    }
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": budget}])
        first = await http.post(
            "/v1/messages", json=body, headers={"authorization": f"Bearer {key.value}"}
        )
    print(f"${budget} budget: first {first.status_code}, the second in flight with it {inner}")
    assert first.status_code == 200 and inner == [second]


# Claude Sonnet 4 and 4.5 with the 1M-token context window (Anthropic, Bedrock, Vertex): a
# request of more than 200k input tokens, cache reads and writes included, pays twice the
# input, cache read and cache write prices and 1.5 times the output price on all its tokens.
# (model as sent, base $/Mtok input, output, cache read, cache write)
LONG_CONTEXT_SONNETS = [
    ("anthropic/claude-sonnet-4-20250514", 3.0, 15.0, 0.3, 3.75),
    ("anthropic/claude-sonnet-4-0", 3.0, 15.0, 0.3, 3.75),
    ("vertex/claude-sonnet-4@20250514", 3.0, 15.0, 0.3, 3.75),
    ("bedrock/us.anthropic.claude-sonnet-4-20250514-v1:0", 3.0, 15.0, 0.3, 3.75),
    ("bedrock/global.anthropic.claude-sonnet-4-20250514-v1:0", 3.0, 15.0, 0.3, 3.75),
    ("bedrock/global.anthropic.claude-sonnet-4-5-20250929-v1:0", 3.0, 15.0, 0.3, 3.75),
    ("bedrock/eu.anthropic.claude-sonnet-4-5-20250929-v1:0", 3.3, 16.5, 0.33, 4.125),
    ("anthropic/claude-sonnet-4-5-20250929", 3.0, 15.0, 0.3, 3.75),
]


@pytest.mark.parametrize("model", LONG_CONTEXT_SONNETS, ids=[m[0] for m in LONG_CONTEXT_SONNETS])
async def test_a_sonnet_4_request_above_200k_input_tokens_pays_the_long_context_prices(
    make_settings: Settings, model: tuple[str, float, float, float, float]
) -> None:
    name, inp, out, read, write = model
    usages = [  # Anthropic's: input_tokens leaves out the cache reads and writes
        {"input_tokens": 200_000, "output_tokens": 1_000},  # at the threshold: base prices
        {"input_tokens": 300_000, "output_tokens": 1_000},
        {
            "input_tokens": 1_000,
            "cache_read_input_tokens": 190_000,
            "cache_creation_input_tokens": 20_000,
            "output_tokens": 2_000,
        },
    ]
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> dict[str, Any]:
        turn = int(request.headers["x-turn"])
        return {"type": "message", "content": [], "usage": usages[turn]}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        for turn in range(len(usages)):
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            answer = await http.post(
                "/v1/messages", json={**body, "max_tokens": 10}, headers={"x-turn": str(turn)}
            )
            assert answer.status_code == 200
        rows = await records(engine)

    def nanos(usd: float) -> int:
        return round(usd * 1e9)

    want = [
        nanos((200_000 * inp + 1_000 * out) / 1e6),
        nanos((300_000 * inp * 2 + 1_000 * out * 1.5) / 1e6),
        nanos((1_000 * inp + 190_000 * read + 20_000 * write) * 2 / 1e6 + 2_000 * out * 1.5 / 1e6),
    ]
    charged = [r.cost_nanos for r in rows]
    print(f"{name}: expected {want} nano-dollars, charged {charged}")
    assert charged == want


# Claude on Vertex AI, which the catalog lists without a 1-hour cache write price: Anthropic's
# rule, on Vertex as on its own API, is twice the input price for a write kept 1 hour.
# (model as sent, $/Mtok input, output, 5-minute write)
ONE_HOUR_WRITERS = [
    ("vertex/claude-opus-4-1@20250805", 15.0, 75.0, 18.75),
    ("vertex/claude-sonnet-4@20250514", 3.0, 15.0, 3.75),
    ("vertex/claude-3-7-sonnet@20250219", 3.0, 15.0, 3.75),
    ("anthropic/claude-opus-4-1-20250805", 15.0, 75.0, 18.75),  # the catalog has it: $30
]


@pytest.mark.parametrize("model", ONE_HOUR_WRITERS, ids=[m[0] for m in ONE_HOUR_WRITERS])
async def test_a_claude_cache_write_kept_1_hour_costs_twice_the_input_price_wherever_served(
    make_settings: Settings, model: tuple[str, float, float, float]
) -> None:
    name, inp, out, write = model
    usage = {
        "input_tokens": 100,
        "cache_creation_input_tokens": 30_000,
        "cache_creation": {
            "ephemeral_5m_input_tokens": 10_000,
            "ephemeral_1h_input_tokens": 20_000,
        },
        "output_tokens": 500,
    }
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages() -> dict[str, Any]:
        return {"type": "message", "content": [], "usage": usage}

    app.add_middleware(BudgetMiddleware, settings=make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
        assert (await http.post("/v1/messages", json=body)).status_code == 200
        rows = await records(engine)
    want = round((100 * inp + 10_000 * write + 20_000 * inp * 2 + 500 * out) * 1e3)
    print(f"{name}: expected {want} nano-dollars, charged {rows[0].cost_nanos}")
    assert rows[0].cost_nanos == want


async def test_a_catalog_price_that_starts_while_the_app_runs_is_charged_from_that_day(
    make_settings: Settings,
) -> None:
    """The catalog dates price changes (gemini-3.8-flash: $0.75/$3.75 per Mtok, $1.50/$7.50
    from 2027-01-01). A process that first priced the model before that day charges the new
    prices from that day on, as the provider bills them, not the old ones until a restart."""
    from budget_middleware.engine.engine import BudgetEngine

    eve = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    now = [eve]
    engine = BudgetEngine(make_settings(), clock=lambda: now[0])
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions() -> dict[str, Any]:
        usage = {"prompt_tokens": 100_000, "completion_tokens": 10_000, "total_tokens": 110_000}
        return {"object": "chat.completion", "choices": [], "usage": usage}

    app.add_middleware(BudgetMiddleware, engine=engine)
    async with running(app), client(app) as http:
        body = chat("gemini/gemini-3.8-flash")
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        now[0] = eve + 120  # 2027-01-01 00:01 UTC
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        rows = await records(engine)
    charged = [r.cost_nanos for r in rows]
    want = [
        round((100_000 * 0.75 + 10_000 * 3.75) * 1e3),
        round((100_000 * 1.5 + 10_000 * 7.5) * 1e3),
    ]
    print(f"gemini-3.8-flash before and after 2027-01-01: expected {want}, charged {charged}")
    assert charged == want


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_server_side_searches_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings, counters: str
) -> None:
    """Claude with Anthropic's server-side web search tool: each search costs $0.01 and its
    results are input tokens the request body never held (Anthropic bills them: 20,000 here).
    The reservation counts only the body and `max_tokens` ($0.0156), so 60 such requests at
    once on a $1 budget were all admitted and spent $5.58. SPEC §6: only one
    request's own overrun may pass the limit (here one request costs $0.093)."""
    usage = {
        "input_tokens": 20_000,
        "output_tokens": 200,
        "server_tool_use": {"web_search_requests": 3},
    }

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        answer = {"type": "message", "role": "assistant", "content": [], "usage": usage}
        return JSONResponse(answer)

    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "What happened in the news today?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
    }
    path = "/v1/messages"
    async with budget_of_a_dollar(make_settings, path, provider, counters) as (engine, http, key):
        auth = {"x-api-key": key.value or ""}
        unknown = await at_once(http, path, body, auth)  # none has ended: its cost not known yet
        learned = await at_once(http, path, body, auth)  # each reserves the most one cost
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    # One request: 20,000 input tokens at $3/Mtok, 200 output at $15/Mtok, 3 searches at $0.01
    each = 20_000 * 3e-6 + 200 * 15e-6 + 3 * 0.01
    first = [a.status_code for a in unknown].count(200)
    second = [a.status_code for a in learned].count(200)
    print(f"{counters}: 60 at once on $1, twice: {first} then {second} admitted, ", end="")
    print(f"spent ${spent:.4f}")
    print(f"  (${each:.4f} a request)")
    assert spent <= 1 + each + 1e-9
    assert second > 1  # once one is measured, they run side by side
    held = next(a for a in unknown if a.status_code != 200)
    print("  held:", held.status_code, held.json()["error"]["message"])
    assert held.json()["error"]["code"] == "budget_reserved" and "retry-after" in held.headers


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_stored_prompts_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings, counters: str
) -> None:
    """A Responses API request naming a stored prompt (`prompt: {"id": ...}`, no `tools`) may
    run the prompt's web searches ($0.01 each on gpt-5) on its instructions and their results,
    input tokens its body never held (20,000 here). It reserved as a request without tools, its
    body and `max_output_tokens` ($0.01 on gpt-5), so 60 at once on a $1 budget were all admitted
    and spent $3.60. SPEC §6: only one request's own overrun may pass the limit (here one request
    costs $0.06)."""

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        await asyncio.sleep(0.05)  # in flight together
        answer = {
            "object": "response",
            "model": "gpt-5",
            "output": [_searched("news"), _searched("weather"), _searched("sports")],
            "usage": {**RESPONSES_USAGE, "input_tokens": 20_000, "total_tokens": 20_500},
        }
        return JSONResponse(answer)

    body = {
        "model": "gpt-5",
        "prompt": {"id": "pmpt_news", "version": "3"},
        "input": "What happened today?",
        "max_output_tokens": 1_000,
    }
    path = "/v1/responses"
    async with budget_of_a_dollar(make_settings, path, provider, counters) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        unknown = await at_once(http, path, body, auth)  # none has ended: its cost not known yet
        learned = await at_once(http, path, body, auth)  # each reserves the most one cost
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    # One request: 20,000 input tokens at $1.25/Mtok, 500 output at $10/Mtok, 3 searches at $0.01
    each = 20_000 * 1.25e-6 + 500 * 10e-6 + 3 * 0.01
    first = [a.status_code for a in unknown].count(200)
    second = [a.status_code for a in learned].count(200)
    print(f"{counters}: 60 stored prompts at once on $1, twice: {first} then {second} admitted, ")
    print(f"  spent ${spent:.4f} (${each:.4f} a request)")
    assert spent <= 1 + each + 1e-9
    assert second > 1  # once one is measured, they run side by side
    held = next(a for a in unknown if a.status_code != 200)
    assert held.json()["error"]["code"] == "budget_reserved" and "retry-after" in held.headers


async def test_a_model_the_catalog_lists_free_is_priced_at_zero_not_unpriced(
    make_settings: Settings,
) -> None:
    """genai-prices lists free models with an empty price (`Gemma 3 (free)` on the Gemini API,
    OpenRouter's `Llama 3.3 70B Instruct (free)`), which it charges $0. They were taken as
    having no price: BUDGET_UNPRICED_MODELS=refuse refused them 403 `model_not_priced`."""
    app = host_app(make_settings(unpriced_models="refuse"))
    engine = engine_of(app)
    models = ("gemini/gemma-3-27b-it", "openrouter/meta-llama/llama-3.3-70b-instruct:free")
    async with running(app), client(app) as http:
        answers = [await http.post("/v1/chat/completions", json=chat(m)) for m in models]
        await engine.flush()
    got = [(a.status_code, a.json().get("error", {}).get("code")) for a in answers]
    print("refuse mode, free catalog models:", got)
    assert got == [(200, None), (200, None)]
    assert engine.stats.unpriced_requests == 0
    assert engine.manager.usage(group_by="model").total.cost == 0


async def test_a_price_for_another_provider_s_deployment_does_not_move_a_bare_model_there(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A bare model name takes its provider from the catalog (SPEC §4): `gpt-4o` is OpenAI's.
    A pricing file that prices Azure's `gpt-4o` (a negotiated rate) overrides that price, for
    requests to Azure; it does not make every bare `gpt-4o` Azure's. It did: the file's
    provider was guessed first, so a key that may use only openai was refused
    `provider_not_allowed` (for provider `azure`), and openai's provider budget no longer saw
    those requests (they counted on azure's, at the Azure price)."""
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"models": {"azure/gpt-4o": {"input_per_mtok": 2, "output_per_mtok": 8}}})
    )
    app = host_app(make_settings(pricing_file=path))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="openai-only", provider_configs=[{"provider": "openai"}]
        )
        answer = await http.post(
            "/v1/chat/completions",
            json=chat("gpt-4o", max_tokens=100),
            headers={"x-budget-key": key.value or ""},
        )
        azure = await http.post(
            "/v1/chat/completions",
            json=chat("azure/gpt-4o", max_tokens=100),
            headers={"x-budget-key": key.value or ""},
        )
        rows = await records(engine)
    print(
        f"bare gpt-4o: {answer.status_code}, "
        f"charged as {[(r.provider, r.cost_source, r.cost_nanos) for r in rows]}"
    )
    assert answer.status_code == 200
    assert azure.status_code == 403  # the key may not use azure: the file's price is azure's
    usage = answer.json()["usage"]
    want = calc_price(
        Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]),
        model_ref="gpt-4o",
        provider_id="openai",
    ).total_price
    assert [(r.provider, r.cost_source) for r in rows] == [("openai", "catalog")]
    assert abs(rows[0].cost_nanos - int(want * 10**9)) <= 1


@pytest.mark.parametrize("costed", ["first", "second"])
async def test_a_tool_loop_s_turn_without_a_reported_cost_is_charged_its_tokens(
    make_settings: Settings, costed: str
) -> None:
    """Two turns of a tool loop streamed as one answer (two chat completions, each with its
    usage chunk), only one reporting what it cost (`usage.cost`, $0.01): that one is charged its
    cost, the other its tokens' price. The reported cost won for both: the other turn's 2,000
    input and 1,000 output tokens went uncharged."""
    model = "anthropic/claude-sonnet-4"
    paid = {"prompt_tokens": 1000, "completion_tokens": 500, "cost": 0.01}
    bare = {"prompt_tokens": 2000, "completion_tokens": 1000}
    turns = [paid, bare] if costed == "first" else [bare, paid]
    answer = []
    for n, usage in enumerate(turns):
        chunk = {"id": f"chatcmpl-{n}", "model": model}
        answer += [
            chunk | {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
            chunk | {"choices": [], "usage": usage},
        ]
    row = await charged_for(make_settings, "/v1/chat/completions", f"openrouter/{model}", answer)
    want = 10_000_000 + nanos(Usage(input_tokens=2000, output_tokens=1000), model, "openrouter")
    print(f"$0.01 reported + 2,000/1,000 tokens: charged {row.cost_nanos} n$, expected {want}")
    assert row.input_tokens == 3000
    assert row.cost_nanos == want


@pytest.mark.parametrize("end", ["done", "cut"])
async def test_a_turn_cut_short_after_one_that_reported_its_cost_keeps_that_cost(
    make_settings: Settings, end: str
) -> None:
    """Two turns of a tool loop streamed as one answer: the first reports what it cost
    (`usage.cost`, $0.01: a search fee beside 100 input and 50 output tokens, as Perplexity's
    models report it through OpenRouter), the second streams 4,000 characters and no usage (its
    `[DONE]` without it, or cut). The first is charged its cost and the second an estimate of its
    prompt and text. The estimate priced both turns by their tokens: the first's fee was dropped
    ($0.0163 where $0.0250 is due)."""
    model = "anthropic/claude-sonnet-4"
    head = {"id": "chatcmpl-0", "model": model}
    answer = [
        head | {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
        head
        | {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 50, "cost": 0.01}},
    ]
    text = {
        "id": "chatcmpl-1",
        "model": model,
        "choices": [{"index": 0, "delta": {"content": "y" * 400}}],
    }
    answer += [text] * 10
    if end == "cut":  # the app's stream ends there: no `[DONE]`
        answer.append({"type": "cut"})
    row = await charged_for(make_settings, "/v1/chat/completions", f"openrouter/{model}", answer)
    prompt = row.input_tokens - 100  # the second's: the request's estimate
    second = nanos(Usage(input_tokens=prompt, output_tokens=1000), model, "openrouter")
    print(
        f"$0.01 reported, then {prompt} in / 1,000 out estimated: charged {row.cost_nanos} n$,"
        f" expected {10_000_000 + second}"
    )
    assert 0 < prompt < 100 and row.output_tokens == 1050 and row.estimated
    assert abs(row.cost_nanos - (10_000_000 + second)) <= 1


@pytest.mark.parametrize(
    ("model", "maker"),
    [
        ("ft:o4-mini-2025-04-16:acme::B2x9", "openai"),
        ("ft:gpt-4.1-mini-2025-04-14:acme:support:C3y0", "openai"),
        ("ft:open-mistral-7b:587a6b29:20240514:7e773925", "mistral"),
    ],
)
async def test_a_bare_fine_tune_is_its_base_model_s_provider_s(
    make_settings: Settings, model: str, maker: str
) -> None:
    """A fine-tune is named `ft:<base>:<org>:…` (OpenAI's and Mistral's naming), and the catalog
    lists few of them: a bare one's provider (SPEC §4, "from the pricing catalog") is its base
    model's. It was Azure's for `ft:o4-mini…` (the catalog matched Azure's o4-mini by the
    name's middle) and `unknown` for the others, so a key that may use only its maker was
    refused `provider_not_allowed`, and the maker's provider budget never saw the requests."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="maker-only", provider_configs=[{"provider": maker}]
        )
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(model, max_tokens=10),
            headers={"x-budget-key": key.value or ""},
        )
        rows = await records(engine)
    print(f"{model}: {answer.status_code}, recorded as {[r.provider for r in rows]}")
    assert answer.status_code == 200, answer.text
    assert [(r.provider, r.model) for r in rows] == [(maker, model)]


async def test_a_fine_tune_the_pricing_file_names_under_a_provider_is_that_provider_s(
    make_settings: Settings, tmp_path: Path
) -> None:
    """A pricing file that prices a bare fine-tune under a provider (`acmecloud/ft:…`, where
    the operator serves it) says where it goes: that provider, as for any model the catalog
    does not list, not its base model's maker. It went to `openai` (its base's), and a key
    that may use only `acmecloud` was refused 403 `provider_not_allowed`."""
    model = "ft:gpt-4.1-mini-2025-04-14:acme:support:C3y0"
    pricing = tmp_path / "fine_tunes.json"
    prices = {"input_per_mtok": 1, "output_per_mtok": 2}
    pricing.write_text(json.dumps({"models": {f"acmecloud/{model}": prices}}))
    app = host_app(make_settings(pricing_file=pricing))
    engine = engine_of(app)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="acmecloud-only", provider_configs=[{"provider": "acmecloud"}]
        )
        answer = await http.post(
            "/v1/chat/completions",
            json=chat(model, max_tokens=10),
            headers={"x-budget-key": key.value or ""},
        )
        rows = await records(engine)
    print(f"{answer.status_code}; recorded {[(r.provider, r.cost_nanos) for r in rows]}")
    assert answer.status_code == 200, answer.text
    assert [(r.provider, r.model) for r in rows] == [("acmecloud", model)]
    assert rows[0].cost_nanos > 0


@pytest.mark.parametrize(
    ("model", "drawings", "most_calls"),
    [(None, 1, None), ("gpt-image-2", 1, None), (None, 3, 3), (None, 3, None)],
    ids=["gpt-image-1", "gpt-image-2", "3-calls", "3-unbounded"],
)
async def test_image_tool_requests_in_flight_together_cannot_spend_past_the_budget(
    make_settings: Settings, model: str | None, drawings: int, most_calls: int | None
) -> None:
    """A Responses request offering the image generation tool reserves the most a request with
    such tools to its model has been charged (`saw_tools`): one answered in text alone taught
    ~$0.006, where each image the tool draws bills up to $0.2496 (gpt-image-1, high quality,
    1024x1536, 6,240 tokens at $40 per Mtok). It reserves one image at the most its tool asks
    besides: 60 at once on $1 (after one answered in text) spend no more than the budget. Of
    the tool's own model when it names one: gpt-image-2's high 1024x1024 image is 7,024 tokens
    at $30 ($0.21072), reserved as gpt-image-1's 4,160 at $40 ($0.1664) it spent $1.08. An
    answer may call the tool several times: a request bounding its calls (`max_tool_calls`: 3)
    reserves that many images; reserving one, 3 served 3 images each and spent $2.27. One
    that does not bound them reserves at least what an answer that drew has cost, the most
    one request is charged before one has: reserving one image, 3 served 3 images each and
    spent $2.27 too."""
    size = "1024x1536" if model is None else "1024x1024"
    tool: list[dict[str, Any]] = [{"type": "image_generation", "quality": "high", "size": size}]
    if model is not None:
        tool[0]["model"] = model
    drawn = {**_DRAWN, "quality": "high", "size": size, "result": "iVBORw0KGgo"}
    calls = 0

    async def provider(request: Request) -> JSONResponse:
        nonlocal calls
        await request.body()
        calls += 1
        await asyncio.sleep(0.05)  # in flight together
        output = [_SAID] if calls == 1 else [*[drawn] * drawings, _SAID]  # the first: none
        answer = {"object": "response", "model": "gpt-4.1", "output": output}
        return JSONResponse({**answer, "usage": RESPONSES_USAGE})

    body: dict[str, Any] = {"model": "openai/gpt-4.1", "input": "a cat", "tools": tool}
    if most_calls is not None:
        body["max_tool_calls"] = most_calls
    settings = lambda **kw: make_settings(inference_paths=("/v1/responses",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, "/v1/responses", provider) as (engine, http, key):
        auth = {"authorization": f"Bearer {key.value}"}
        first = await http.post("/v1/responses", json=body, headers=auth)
        admitted, spent = await served_and_spent(engine, http, key, "/v1/responses", body)
    print(f"image tool {model}, {drawings} each, 60 at once on $1: {admitted}, ${spent:.6f}")
    assert first.status_code == 200 and admitted >= 1
    assert spent <= 1 + 1e-9


async def test_a_form_whose_head_repeats_its_disposition_on_one_line_is_read_at_once(
    make_settings: Settings,
) -> None:
    """A form's part's `Content-Disposition` name was sought from every `content-disposition:`
    on a line, each search running to the line's end: a 200 KB body of them on one line held
    the event loop ~14 s before it was answered (0.5 MB: 88 s), every other request waiting.
    It is sought from a line's start only: read in milliseconds."""

    async def provider(request: Request) -> JSONResponse:
        await request.body()
        usage = {"input_tokens": 10, "output_tokens": 10, "total_tokens": 20}
        return JSONResponse({"created": 1, "data": [{"b64_json": ""}], "usage": usage})

    path = "/v1/images/edits"
    body = b"--b\r\n" + b"content-disposition:" * 10_000 + b"\r\n\r\nx\r\n--b--\r\n"
    settings = lambda **kw: make_settings(inference_paths=("/images/edits",), **kw)  # noqa: E731
    async with budget_of_a_dollar(settings, path, provider) as (_engine, http, key):
        headers = {"authorization": f"Bearer {key.value}",
                   "content-type": "multipart/form-data; boundary=b"}  # fmt: skip
        started = time.perf_counter()
        answer = await http.post(path, content=body, headers=headers)
        took = time.perf_counter() - started
    print(f"a {len(body):,}-byte form of one repeated disposition line: answered "
          f"{answer.status_code} in {took:.3f} s")  # fmt: skip
    assert answer.status_code == 200
    assert took < 1.0


def _part(head: bytes, value: bytes) -> bytes:
    return head + b"\r\n\r\n" + value


_NAMED = b'Content-Disposition: form-data; name="%s"'
# Forms whose fields a reader of its own read otherwise than Starlette's (python-multipart,
# FastAPI's `Form(...)`): the app draws with gpt-image-1, the middleware read gpt-image-1-mini
# (or no model at all: `unknown`, unpriced, $0).
_CRAFTED_FORMS: dict[str, tuple[bytes, bytes]] = {
    # a line `--<boundary>X` within a field is its text, no delimiter
    "boundary-and-more": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1")
        + b"\r\n--B\r\n" + _part(_NAMED % b"prompt", b"a cat")
        + b"\r\n--BX\r\n" + _part(_NAMED % b"model", b"gpt-image-1-mini") + b"\r\n--B--\r\n"),
    # what follows the closing delimiter is an epilogue, unread
    "after-the-end": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1")
        + b"\r\n--B--\r\n--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1-mini")
        + b"\r\n--B--\r\n"),
    # `x-name="model"` is not the part's name
    "x-name": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1") + b"\r\n--B\r\n"
        + _part(b'Content-Disposition: form-data; x-name="model"; name="note"',
                b"gpt-image-1-mini") + b"\r\n--B--\r\n"),
    # a part's last Content-Disposition names it
    "two-dispositions": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1-mini")
        + b"\r\n--B\r\n" + _part((_NAMED % b"model") + b"\r\n" + (_NAMED % b"note"), b"x")
        + b"\r\n--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1") + b"\r\n--B\r\n"
        + _part((_NAMED % b"note") + b"\r\n" + (_NAMED % b"model"), b"gpt-image-1")
        + b"\r\n--B\r\n" + _part((_NAMED % b"model") + b"\r\n" + (_NAMED % b"note"),
                                 b"gpt-image-1-mini") + b"\r\n--B--\r\n"),
    # a name unquoted
    "unquoted": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1-mini")
        + b"\r\n--B\r\n" + _part(b"Content-Disposition: form-data; name=model", b"gpt-image-1")
        + b"\r\n--B--\r\n"),
    # `filename*=` (RFC 2231's, which RFC 7578 forbids) makes no file
    "filename-star": (b"B", b"--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1-mini")
        + b"\r\n--B\r\n" + _part((_NAMED % b"model") + b"; filename*=utf-8''a.png",
                                 b"gpt-image-1") + b"\r\n--B--\r\n"),
    # a leading blank line, and a boundary past RFC 2046's 70 characters
    "leading-line": (b"B", b"\r\n--B\r\n" + _part(_NAMED % b"model", b"gpt-image-1")
        + b"\r\n--B--\r\n"),
    "long-boundary": (b"B" * 80, b"--" + b"B" * 80 + b"\r\n"
        + _part(_NAMED % b"model", b"gpt-image-1") + b"\r\n--" + b"B" * 80 + b"--\r\n"),
    # no multipart form: `application/x-www-form-urlencoded`
    "url-encoded": (b"", b"model=gpt-image-1&prompt=a+cat"),
}  # fmt: skip


@pytest.mark.parametrize("crafted", list(_CRAFTED_FORMS))
async def test_a_form_is_metered_as_the_model_fastapi_reads_from_it(
    make_settings: Settings, crafted: str
) -> None:
    """A FastAPI app serving the Images API's edits (`model: str = Form()`) reads its form with
    python-multipart; the middleware read its own way, so a client could send a form that it
    read as gpt-image-1-mini (or as no model: `unknown`, unpriced) while the app drew with
    gpt-image-1: a high 1024x1536 image, 6,240 tokens, charged $0.04992 (or $0) of the $0.2496
    billed. Read as python-multipart reads it: the model served is the model charged."""
    app = FastAPI()
    served: list[str] = []

    @app.post("/v1/images/edits")
    async def edit(model: str = Form(), prompt: str = Form("")) -> dict[str, Any]:
        served.append(model)
        usage = {"input_tokens": 0, "output_tokens": 6_240, "total_tokens": 6_240,
                 "output_tokens_details": {"image_tokens": 6_240, "text_tokens": 0}}  # fmt: skip
        return {"created": 1, "data": [{"b64_json": ""}], "usage": usage}

    boundary, body = _CRAFTED_FORMS[crafted]
    kind = f"multipart/form-data; boundary={boundary.decode()}"
    if not boundary:  # no multipart form: URL-encoded, which `Form(...)` reads too
        kind = "application/x-www-form-urlencoded"
    settings = make_settings(inference_paths=("/images/edits",))
    wrapped = BudgetMiddleware(app, settings=settings)
    engine = get_engine(settings)
    async with running(wrapped), client(wrapped) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        answer = await http.post(
            "/v1/images/edits",
            content=body,
            headers={"authorization": f"Bearer {key.value}", "content-type": kind},
        )  # fmt: skip
        rows = await records(engine)
    charged = [(r.model, r.cost_nanos / 1e9) for r in rows]
    print(f"{crafted}: {answer.status_code}, the app drew with {served}; charged {charged}")
    assert answer.status_code == 200, answer.text
    assert served == ["gpt-image-1"]
    assert charged == [("gpt-image-1", 0.2496)]
