"""Differential of the catalog's prices (SPEC §7): what a call is charged, against what
genai-prices' own `calc_price` says the same usage costs, rounded half up to nano-dollars.

Random but seeded answers of random models that the bundled catalog lists for OpenAI, Anthropic
and Google (Gemini through its OpenAI-compatible endpoint): OpenAI chat completions (the usage in
a chunk of its own, on the last choice chunk as Gemini sends it, or on every chunk, cumulative),
the Responses API and embeddings, Anthropic messages (`message_start` + `message_delta`, whose
usage may repeat the input's), each streamed or not; with and without cache reads, cache writes
(OpenAI's `cache_write_tokens`, Anthropic's with its 5-minute/1-hour split), input and output
audio, reasoning, web searches, the service tier an answer says it was served at (OpenAI's and
Gemini's `service_tier`, Anthropic's `speed`), and inputs at and around the long-context
thresholds the catalog has (100k, 128k, 200k, 272k). Inbound through BudgetMiddleware, outbound
through BudgetTransport under the real OpenAI and Anthropic SDKs.

Two differences are the package's documented choices (README, "What an answer cost"), compared
with the price the README states: Claude Sonnet 4 above 200k input tokens (its long-context
tier, which the catalog lacks: twice the input and cache prices, 1.5 times the output's), and
the audio of gpt-4o(-mini)-audio-preview (the catalog's text prices only: its family's audio
prices, $40/$80 and $10/$20 per Mtok).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import anthropic
import httpx
import httpx2
import openai
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from genai_prices import Usage, calc_price
from genai_prices import types as gp
from genai_prices.data import providers as CATALOG
from sqlmodel import select

from budget_middleware import BudgetMiddleware, BudgetSettings, BudgetTransport, get_engine
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.tables import UsageRecordRow
from support import engine_of, running

Settings = Callable[..., BudgetSettings]
SEED = 7
INBOUND_CASES = 300
OUTBOUND_CASES = 150
THRESHOLDS = [100_000, 128_000, 200_000, 272_000]
# The request's provider, as a client names it (Gemini's OpenAI-compatible endpoint: `gemini`)
NAMED = {"openai": "openai", "anthropic": "anthropic", "google": "gemini"}
HOSTS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com/v1beta/openai",
}
FAMILY_AUDIO = {"gpt-4o-audio-preview": (40, 80), "gpt-4o-mini-audio-preview": (10, 20)}


def _listed(provider: str) -> list[gp.ModelInfo]:
    """The models of `provider` priced by the token that calc_price finds by their own id."""
    owner = next(p for p in CATALOG if p.id == provider)
    found = []
    for info in owner.models:
        prices = info.prices if isinstance(info.prices, gp.ModelPrice) else info.prices[-1].prices
        if prices.input_mtok is None and prices.output_mtok is None:
            continue
        try:
            calc_price(Usage(input_tokens=1, output_tokens=1), info.id, provider_id=provider)
        except LookupError:  # `ft:gpt-4o`: matched only as `ft:gpt-4o-2024-…`
            continue
        found.append(info)
    return found


MODELS = {provider: _listed(provider) for provider in NAMED}


def _tiered(info: gp.ModelInfo) -> bool:
    prices = info.prices if isinstance(info.prices, gp.ModelPrice) else info.prices[-1].prices
    return any(isinstance(v, gp.TieredPrices) for v in vars(prices).values())


def _tiers(info: gp.ModelInfo, key: str) -> list[str]:
    return sorted({v.when[key] for v in info.price_variants or () if key in v.when})


def nanos(usd: Decimal) -> int:
    return int((usd * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def sse(events: list[tuple[str | None, Any]]) -> bytes:
    return b"".join(
        (f"event: {name}\n" if name else "").encode()
        + b"data: "
        + (data if isinstance(data, str) else json.dumps(data)).encode()
        + b"\n\n"
        for name, data in events
    )


@dataclass
class Case:
    provider: str  # the catalog's
    model: str
    path: str  # /chat/completions, /responses, /embeddings, /messages
    request: dict[str, Any]
    body: bytes
    stream: bool
    usage: dict[str, int]  # genai-prices' Usage
    context: dict[str, str] | None  # genai-prices' price_context

    def describe(self) -> str:
        where = f"{self.provider}/{self.model} {self.path}"
        return f"{where} stream={self.stream} {self.usage} {self.context}"

    def expected(self) -> int:
        """What genai-prices charges, or the README's price where the package differs."""
        found = calc_price(
            Usage(**self.usage), self.model, provider_id=self.provider, price_context=self.context
        )
        total = found.total_price
        if self.model == "claude-sonnet-4-0" and self.usage["input_tokens"] > 200_000:
            total += found.input_price + found.output_price / 2
        if self.model in FAMILY_AUDIO:
            heard, spoken = FAMILY_AUDIO[self.model]
            text = found.model_price
            assert isinstance(text.input_mtok, Decimal) and isinstance(text.output_mtok, Decimal)
            total += (
                self.usage.get("input_audio_tokens", 0) * (heard - text.input_mtok)
                + self.usage.get("output_audio_tokens", 0) * (spoken - text.output_mtok)
            ) / 10**6
        return nanos(total)


def _anthropic(rng: random.Random, info: gp.ModelInfo, inp: int, out: int, read: int) -> Case:
    write = rng.choice([0, 0, 1024, 3000])
    hour = rng.choice([0, write // 2, write])
    searches = rng.choice([0, 0, 2])
    fast = "fast" in _tiers(info, "speed") and rng.random() < 0.5
    usage: dict[str, Any] = {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write,
    }
    if write and rng.random() < 0.8:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": write - hour,
            "ephemeral_1h_input_tokens": hour,
        }
    else:
        hour = 0
    if searches:
        usage["server_tool_use"] = {"web_search_requests": searches}
    if fast:
        usage["speed"] = "fast"
    request: dict[str, Any] = {
        "model": info.id,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if fast:
        request["speed"] = "fast"
    stream = rng.random() < 0.5
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": info.id}
    if stream:
        request["stream"] = True
        started = {**usage, "output_tokens": min(1, out)}
        # the last count is cumulative; Anthropic's newer ones repeat the input's too
        ended = dict(usage) if rng.random() < 0.5 else {"output_tokens": out}
        body = sse(
            [
                (
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {**message, "content": [], "usage": started},
                    },
                ),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": "Hello"},
                    },
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": ended},
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        )
    else:
        text = [{"type": "text", "text": "Hello"}]
        body = json.dumps({**message, "content": text, "usage": usage}).encode()
    counts = {
        "input_tokens": inp + read + write,
        "cache_read_tokens": read,
        "cache_write_tokens": write,
        "cache_write_1h_tokens": hour,
        "web_searches": searches,
        "output_tokens": out,
    }
    context = {"speed": "fast"} if fast else None
    return Case("anthropic", info.id, "/messages", request, body, stream, counts, context)


def _openai(
    rng: random.Random, provider: str, info: gp.ModelInfo, inp: int, out: int, read: int
) -> Case:
    kinds = ["chat", "chat", "responses", "embeddings"] if provider == "openai" else ["chat"]
    kind = rng.choice(kinds)
    stream = kind != "embeddings" and rng.random() < 0.5
    heard = rng.choice([0, 0, min(500, inp - read)])
    web = files = 0
    spoken = rng.choice([0, 0, out // 2])
    reasoning = rng.choice([0, out // 3])
    write = rng.choice([0, 0, 0, max(0, min(2048, inp - read - heard))])
    tier = rng.choice([None, None, "default", *_tiers(info, "service_tier")])
    if kind == "embeddings":
        out = read = heard = spoken = reasoning = write = 0
        tier = None
    if kind == "responses":
        heard = spoken = 0
    served = {"service_tier": tier} if tier else {}
    model = info.id
    if kind == "chat":
        usage = {
            "prompt_tokens": inp,
            "completion_tokens": out,
            "total_tokens": inp + out,
            "prompt_tokens_details": {"cached_tokens": read, "audio_tokens": heard},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": spoken},
        }
        if write:
            usage["prompt_tokens_details"]["cache_write_tokens"] = write
        request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            request["stream"] = True
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": model,
                **served,
                "choices": [{"index": 0, "delta": {"content": "Hello"}}],
            }
            where = rng.choice(["apart", "on_last", "every"])
            if where == "apart":  # OpenAI's: a chunk of its own
                events = [chunk, {**chunk, "choices": [], "usage": usage}]
            elif where == "on_last":  # Gemini's: on the last choice chunk
                events = [chunk, {**chunk, "usage": usage}]
            else:  # on every chunk, cumulative (vLLM's continuous usage)
                first = {**usage, "completion_tokens": min(1, out)}
                first["total_tokens"] = inp + first["completion_tokens"]
                first["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
                events = [{**chunk, "usage": first}, {**chunk, "choices": [], "usage": usage}]
            body = sse([(None, e) for e in events] + [(None, "[DONE]")])
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
            body = json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                    **served,
                }
            ).encode()
    elif kind == "responses":
        details: dict[str, int] = {"cached_tokens": read}
        if write:
            details["cache_write_tokens"] = write
        usage = {
            "input_tokens": inp,
            "input_tokens_details": details,
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out,
        }
        request = {"model": model, "input": "hi"}
        text = [{"type": "output_text", "text": "Hello", "annotations": []}]
        # Its web and file searches (not drawn: the cases after it stay the same)
        web, files = inp % 3, out % 4
        searched = {"type": "web_search_call", "status": "completed", "action": {"type": "search"}}
        looked = {"type": "file_search_call", "status": "completed", "queries": ["q"]}
        output = [searched] * web + [looked] * files
        output.append(
            {
                "type": "message",
                "id": "m",
                "role": "assistant",
                "status": "completed",
                "content": text,
            }
        )
        if web or files:
            request["tools"] = [{"type": "web_search"}, {"type": "file_search"}]
        response = {
            "id": "r",
            "object": "response",
            "created_at": 0,
            "model": model,
            "status": "completed",
            **served,
            "output": output,
            "usage": usage,
        }
        if stream:
            request["stream"] = True
            body = sse(
                [
                    (
                        "response.output_text.delta",
                        {"type": "response.output_text.delta", "delta": "Hello"},
                    ),
                    ("response.completed", {"type": "response.completed", "response": response}),
                ]
            )
        else:
            body = json.dumps(response).encode()
    else:
        request = {"model": model, "input": "hi"}
        body = json.dumps(
            {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                "usage": {"prompt_tokens": inp, "total_tokens": inp},
            }
        ).encode()
    counts = {
        "input_tokens": inp,
        "cache_read_tokens": read,
        "cache_write_tokens": write,
        "input_audio_tokens": heard,
        "output_audio_tokens": spoken,
        "output_tokens": out,
    }
    if web or files:
        counts |= {"web_searches": web, "storage_searches": files}
    if heard and read:
        counts["cache_audio_read_tokens"] = 0  # the package: audio is the uncached input's
    context = {"service_tier": tier} if tier else None
    path = "/" + {"chat": "chat/completions"}.get(kind, kind)
    return Case(provider, model, path, request, body, stream, counts, context)


def cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        provider = rng.choice(["openai", "openai", "anthropic", "google"])
        info = rng.choice(MODELS[provider])
        if _tiered(info) and rng.random() < 0.5:
            start = rng.choice(THRESHOLDS)
            inp = rng.choice([start, start + 1, rng.randint(90_000, 400_000)])
        else:
            inp = rng.choice([1, 7, 123, 4567, 50_000, 199_999])
        out = rng.choice([1, 33, 999, 12_345])
        read = rng.choice([0, 0, inp // 3, inp // 2])
        if provider == "anthropic":
            made.append(_anthropic(rng, info, inp - read, out, read))
        else:
            made.append(_openai(rng, provider, info, inp, out, read))
    return made


def report(where: str, checked: list[tuple[Case, UsageRecordRow]]) -> None:
    wrong = [
        f"{case.describe()}: charged {row.cost_nanos} ({row.cost_source}), "
        f"genai-prices {case.expected()}"
        for case, row in checked
        if (row.cost_nanos, row.cost_source, row.estimated) != (case.expected(), "catalog", False)
    ]
    print(
        f"{where}: {len(checked) - len(wrong)} of {len(checked)} cases charged what "
        f"genai-prices says, to the nano-dollar"
    )
    assert not wrong, "\n".join(wrong[:10])


async def records(engine: BudgetEngine) -> list[UsageRecordRow]:
    await engine.flush()
    with engine.store.session() as s:
        return list(s.exec(select(UsageRecordRow).order_by(UsageRecordRow.id)))  # type: ignore[arg-type]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


def provider_app(current: dict[str, Case]) -> FastAPI:
    """A host app's route, or a provider: the current case's answer, as it was written."""
    app = FastAPI()

    @app.post("/{path:path}")
    async def answer(request: Request) -> Response:
        await request.body()
        case = current["case"]
        if case.stream:
            return StreamingResponse(_chunks(case.body), media_type="text/event-stream")
        return Response(case.body, media_type="application/json")

    return app


async def test_inbound_charges_match_genai_prices(make_settings: Settings) -> None:
    current: dict[str, Case] = {}
    app = provider_app(current)
    app.add_middleware(BudgetMiddleware, settings=make_settings())
    made = cases(INBOUND_CASES, SEED)
    async with running(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for case in made:
                current["case"] = case
                headers = {"x-budget-provider": NAMED[case.provider]}
                answered = await http.post("/v1" + case.path, json=case.request, headers=headers)
                assert answered.status_code == 200, case.describe()
        rows = await records(engine_of(app))
    assert len(rows) == len(made)
    report("inbound", list(zip(made, rows, strict=True)))


async def _call(sdks: dict[str, Any], case: Case) -> None:
    """The case's call as an app makes it with the provider's SDK."""
    request = dict(case.request)
    stream = request.pop("stream", False)
    if case.path == "/messages":
        extra = {"extra_body": {"speed": request.pop("speed")}} if "speed" in request else {}
        messages = sdks["anthropic"].messages
        if stream:
            async with messages.stream(**request, **extra) as events:
                async for _ in events.text_stream:
                    pass
        else:
            await messages.create(**request, **extra)
        return
    sdk = sdks[case.provider]
    if case.path == "/embeddings":
        await sdk.embeddings.create(**request)
        return
    chat = case.path == "/chat/completions"
    create = sdk.chat.completions.create if chat else sdk.responses.create
    if stream:
        async for _ in await create(**request, stream=True):
            pass
    else:
        await create(**request)


async def test_outbound_charges_match_genai_prices(make_settings: Settings) -> None:
    current: dict[str, Case] = {}
    engine = get_engine(make_settings(flush_interval_seconds=3600))
    await engine.ensure_started()
    transport = BudgetTransport(httpx2.ASGITransport(provider_app(current)), engine=engine)
    http = httpx2.AsyncClient(transport=transport)
    sdks: dict[str, Any] = {
        "openai": openai.AsyncOpenAI(api_key="sk-x", base_url=HOSTS["openai"], http_client=http),
        "google": openai.AsyncOpenAI(api_key="sk-x", base_url=HOSTS["google"], http_client=http),
        "anthropic": anthropic.AsyncAnthropic(
            api_key="sk-x", base_url=HOSTS["anthropic"], http_client=http
        ),
    }
    made = cases(OUTBOUND_CASES, SEED + 1)
    try:
        for case in made:
            current["case"] = case
            await _call(sdks, case)
        rows = await records(engine)
    finally:
        await engine.shutdown()
    assert len(rows) == len(made)
    report("outbound", list(zip(made, rows, strict=True)))


# (the model as a client names it, the endpoint, the catalog's provider and model)
SPELLINGS = [
    ("openai/gpt-4o", "/chat/completions", "openai", "gpt-4o"),
    ("OpenAI/GPT-4o", "/chat/completions", "openai", "gpt-4o"),
    ("gpt-4o-2024-08-06", "/chat/completions", "openai", "gpt-4o-2024-08-06"),
    ("gpt-4o-mini-2024-07-18", "/chat/completions", "openai", "gpt-4o-mini-2024-07-18"),
    (
        "ft:gpt-4o-2024-08-06:acme::abc123",
        "/chat/completions",
        "openai",
        "ft:gpt-4o-2024-08-06:acme::abc123",
    ),
    ("claude-3-5-sonnet-latest", "/messages", "anthropic", "claude-3-5-sonnet-latest"),
    ("anthropic/claude-sonnet-4-5", "/messages", "anthropic", "claude-sonnet-4-5"),
    ("claude-sonnet-4-5-20250929", "/messages", "anthropic", "claude-sonnet-4-5-20250929"),
    ("gemini/gemini-2.5-pro", "/chat/completions", "google", "gemini-2.5-pro"),
    ("google/gemini-2.5-flash", "/chat/completions", "google", "gemini-2.5-flash"),
    ("my-house-model", "/chat/completions", None, None),
]


async def test_every_spelling_of_a_model_streamed_or_not_costs_what_genai_prices_says(
    make_settings: Settings,
) -> None:
    """A provider prefix, a date suffix, an alias, letter case: the catalog's price; the same
    call streamed and not: the same charge; a model nobody prices: 0, marked unpriced."""
    inp, read, out = 12_345, 4_000, 678
    current: dict[str, Case] = {}
    app = provider_app(current)
    app.add_middleware(BudgetMiddleware, settings=make_settings())
    made = []
    for name, path, provider, _ in SPELLINGS:
        for stream in (False, True):
            if path == "/messages":
                usage = {
                    "input_tokens": inp - read,
                    "cache_read_input_tokens": read,
                    "output_tokens": out,
                }
                events = [
                    (
                        "message_start",
                        {
                            "type": "message_start",
                            "message": {"usage": {**usage, "output_tokens": 1}},
                        },
                    ),
                    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": out}}),
                ]
                whole = {"type": "message", "content": [], "usage": usage}
            else:
                usage = {
                    "prompt_tokens": inp,
                    "completion_tokens": out,
                    "total_tokens": inp + out,
                    "prompt_tokens_details": {"cached_tokens": read},
                }
                events = [(None, {"choices": [], "usage": usage}), (None, "[DONE]")]
                whole = {"object": "chat.completion", "choices": [], "usage": usage}
            body = sse(events) if stream else json.dumps(whole).encode()
            request = {"model": name, "max_tokens": 10, "messages": [], "stream": stream}
            made.append(Case(provider or "", name, path, request, body, stream, {}, None))
    async with running(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as h:
            for case in made:
                current["case"] = case
                assert (await h.post("/v1" + case.path, json=case.request)).status_code == 200
        rows = await records(engine_of(app))
    charged: dict[str, list[int]] = {}
    for case, row in zip(made, rows, strict=True):
        charged.setdefault(case.model, []).append(row.cost_nanos)
    wanted = {}
    for name, _, provider, listed in SPELLINGS:
        if listed is None:
            wanted[name] = [0, 0]
        else:
            usage = Usage(input_tokens=inp, cache_read_tokens=read, output_tokens=out)
            found = calc_price(usage, listed, provider_id=provider).total_price
            wanted[name] = [nanos(found)] * 2
    print("charged, not streamed and streamed:", charged)
    assert charged == wanted
    assert [r.cost_source for r in rows[-2:]] == ["unpriced", "unpriced"]
