"""Behaviours that small injected bugs used to get past the suite (issue 11, item 10): each test
fails when one of them is put back (flipped comparisons, dropped statements).

Windows that end while a request is in flight, charges that reach the store flush after flush,
limits changed by another instance, budgets at their edges, streams cut anywhere and usages
that a later empty one must not erase, what a body or an upstream reports, month windows
whatever the anchor's zone, and prices (the provider named, the date, the time of day)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import select

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.core import admission
from budget_middleware.core.admission import Refusal, Ticket
from budget_middleware.core.durations import Duration, window_bounds
from budget_middleware.core.identity import Credentials, TargetResolver
from budget_middleware.core.pricing import at_time, cost_nanos
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.sse import SSEDecoder, StreamMeter
from budget_middleware.core.usage import TokenUsage, usage_from_json, usage_from_mapping
from budget_middleware.core.windows import CounterRegistry
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.engine.prices import PriceBook
from budget_middleware.exceptions import PricingFileError
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.tables import UsageRecordRow
from support import chat, client, engine_of, host_app, running

Settings = Callable[..., BudgetSettings]


def bearer(value: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


class Clock:
    """The engine's clock, which the host app moves forward while it answers."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def completion(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def slow_host(engine: BudgetEngine, clock: Clock, window: float) -> FastAPI:
    """A host app whose answer to a request with `"user": "slow"` comes one whole `window` after
    its admission: the window it was admitted in has ended by then, whatever its phase. Every
    answer reports 100 + 500 tokens and costs $0.60 (`x-budget-cost`)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def answer(request: Request) -> JSONResponse:
        if (await request.json()).get("user") == "slow":
            clock.now += window
        return JSONResponse(completion(100, 500), headers={"x-budget-cost": "0.6"})

    app.add_middleware(BudgetMiddleware, engine=engine)
    return app


USD = 1_000_000_000  # nano-dollars
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()


def budget(registry: CounterRegistry, owner: str, limit: float, used: float = 0) -> Scope:
    """A scope with one budget of `limit` USD an hour, `used` of it spent, its window from T0."""
    counter = registry.window(
        "budget",
        f"b-{owner}",
        limit=int(limit * USD),
        duration=Duration.parse("1h"),
        calendar_aligned=False,
        last_reset=datetime.fromtimestamp(T0, UTC),
        usage=int(used * USD),
        now=T0,
    )
    return Scope("team" if owner == "team" else "customer", owner, owner, budgets=(counter,))


def admit(
    scopes: tuple[Scope, ...], estimate: float, now: float, registry: CounterRegistry
) -> Ticket | Refusal:
    """Admission with reservations, `estimate` in USD."""
    limits = LimitSet(scopes)
    return admission.admit(limits, int(estimate * USD), True, now, registry.ledger)


# -- admission at the edges of a budget ----------------------------------------------------------


def test_a_budget_exhausted_in_one_window_admits_at_the_instant_that_window_ends() -> None:
    registry = CounterRegistry()
    team = budget(registry, "team", 1, used=1)
    assert isinstance(admit((team,), 0, T0 + 3599.5, registry), Refusal)
    assert isinstance(admit((team,), 0, T0 + 3600, registry), Ticket)  # the end starts the next


def test_a_request_whose_reservation_fills_the_budget_exactly_is_admitted() -> None:
    """Reservations in flight and this request's estimate may add up to the limit, not past it."""
    registry = CounterRegistry()
    team = budget(registry, "team", 1)
    assert isinstance(admit((team,), 0.4, T0, registry), Ticket)
    assert isinstance(admit((team,), 0.6, T0, registry), Ticket)  # $0.40 + $0.60 = $1
    refused = admit((team,), 0.000_000_001, T0, registry)
    assert isinstance(refused, Refusal) and refused.code == "budget_reserved"


def test_budget_reserved_names_the_budget_whose_reservations_leave_no_room() -> None:
    """A budget with nothing in flight admits any estimate while it is not exhausted: the
    refusal names the budget that holds reservations, not one the estimate merely exceeds."""
    registry = CounterRegistry()
    team = budget(registry, "team", 1)
    customer = budget(registry, "customer", 10)
    assert isinstance(admit((customer,), 9, T0, registry), Ticket)  # in flight on the customer
    refused = admit((team, customer), 2, T0, registry)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.scope, refused.reserved) == ("budget_reserved", customer, 9 * USD)


# -- a window that ends while a request is in flight ---------------------------------------------


async def test_a_cost_measured_after_its_budget_window_ended_counts_against_the_new_window(
    make_settings: Settings,
) -> None:
    """Settlement rolls an ended budget window before charging: the cost of a request admitted
    in one window and answered in the next belongs to the next."""
    clock = Clock()
    engine = BudgetEngine(make_settings(reserve=False), clock=clock)
    app = slow_host(engine, clock, 3600)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": 1, "reset_duration": "1h"}]
        )
        clock.now = time.time()  # not before the budget's window starts
        auth = bearer(key.value)
        across = await http.post("/v1/chat/completions", json=chat(user="slow"), headers=auth)
        second = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        third = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert (across.status_code, second.status_code) == (200, 200)
    assert float(second.headers["x-budget-remaining"]) == pytest.approx(0.4)  # $1 - $0.60
    assert third.status_code == 402  # $1.20 spent in this window
    assert third.json()["error"]["code"] == "budget_exceeded"


async def test_tokens_measured_after_their_window_ended_count_against_the_new_window(
    make_settings: Settings,
) -> None:
    """Settlement rolls an ended token window before counting: the tokens of a request answered
    after its window ended count in the window they were measured in."""
    clock = Clock()
    engine = BudgetEngine(make_settings(), clock=clock)
    app = slow_host(engine, clock, 3600)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", rate_limit={"token_max_limit": 1000, "token_reset_duration": "1h"}
        )
        clock.now = time.time()
        auth = bearer(key.value)
        across = await http.post("/v1/chat/completions", json=chat(user="slow"), headers=auth)
        second = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        third = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert (across.status_code, second.status_code) == (200, 200)
    assert second.headers["x-ratelimit-remaining-tokens"] == "400"  # 1000 - 600
    assert third.status_code == 429  # 1200 tokens in this window
    assert third.json()["error"]["code"] == "token_limit_exceeded"


# -- every charge reaches the store --------------------------------------------------------------


async def test_requests_tokens_and_spend_reach_the_store_flush_after_flush(
    make_settings: Settings,
) -> None:
    """A counter charged again after a flush is written by the next flush: requests counted at
    admission, tokens and cost at settlement."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app), client(app) as http:
        m = engine.manager
        key = m.create_virtual_key(
            name="alice",
            rate_limit={
                "request_max_limit": 100,
                "request_reset_duration": "1h",
                "token_max_limit": 1_000_000,
                "token_reset_duration": "1h",
            },
            budgets=[{"max_limit": 100, "reset_duration": "1d"}],
        )
        await engine.invalidate()
        for _ in range(3):
            answer = await http.post(
                "/v1/chat/completions", json=chat(max_tokens=5), headers=bearer(key.value)
            )
            assert answer.status_code == 200
            await engine.flush()  # each request's charges are written before the next one
        (rate,) = m.list_rate_limits()
        (budget,) = m.list_budgets()
        total = m.usage(group_by="virtual_key").total
    assert total.requests == 3 and total.output_tokens > 0 and total.cost > 0
    assert rate.request_current_usage == 3
    assert rate.token_current_usage == total.input_tokens + total.output_tokens
    assert budget.current_usage == pytest.approx(total.cost, abs=1e-9)


# -- configuration changed by another instance ---------------------------------------------------


def _provider_budget(m: BudgetManager) -> None:
    m.put_provider("openai", budgets=[{"max_limit": 0}])


def _model_budget(m: BudgetManager) -> None:
    m.create_model_config(model_name="*", budgets=[{"max_limit": 0}])


def _tag_budget(m: BudgetManager) -> None:
    m.put_tag("chat", budgets=[{"max_limit": 0}])


@pytest.mark.parametrize(
    "add_budget", [_provider_budget, _model_budget, _tag_budget], ids=["provider", "model", "tag"]
)
async def test_a_global_budget_added_elsewhere_applies_to_a_cached_key_once_globals_reload(
    make_settings: Settings, add_budget: Callable[[BudgetManager], None]
) -> None:
    """A key stays cached for the TTL, but the limits it resolved (per provider, model and tags)
    are resolved again when the provider, model config and tag limits are reloaded."""
    settings = make_settings(cache_ttl_seconds=3600)
    app = host_app(settings)
    engine = engine_of(app)
    other = BudgetEngine(settings)  # another instance on the same store
    headers = {"x-budget-tags": "chat"}
    models = ["openai/gpt-4o", "openai/gpt-4o-mini"]
    try:
        async with running(app), client(app) as http:
            key = engine.manager.create_virtual_key(name="alice")
            await engine.invalidate()
            headers.update(bearer(key.value))

            async def statuses() -> list[int]:
                answers = [
                    await http.post("/v1/chat/completions", json=chat(model), headers=headers)
                    for model in (*models, *models)  # each target twice: resolved, then cached
                ]
                return [answer.status_code for answer in answers]

            assert await statuses() == [200] * 4
            add_budget(other.manager)
            assert await statuses() == [200] * 4  # the key and the globals are still trusted
            await engine.reload_globals()  # what the flusher does every cache TTL
            assert await statuses() == [402] * 4
    finally:
        other.store.dispose()


# -- a stream's usage is never erased by a later empty one ---------------------------------------


def _chunk(choices: list[Any], usage: Any) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _stream(later_usage: Any) -> list[bytes]:
    """A chat stream whose usage chunk is followed by a chunk with an empty or null usage."""
    return [
        _chunk([{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}], None),
        _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], None),
        _chunk([], USAGE),
        _chunk([{"index": 0, "delta": {}}], later_usage),
        b"data: [DONE]\n\n",
    ]


@pytest.mark.parametrize("later_usage", [{}, None, {"total_tokens": 0}])
@pytest.mark.parametrize("whole", [False, True], ids=["event-a-chunk", "one-chunk"])
@pytest.mark.parametrize("drop", [False, True])
def test_a_later_chunk_with_an_empty_usage_keeps_the_usage_already_read(
    later_usage: Any, whole: bool, drop: bool
) -> None:
    chunks = _stream(later_usage)
    meter = StreamMeter(drop_usage_chunk=drop)
    for chunk in [b"".join(chunks)] if whole else chunks:
        meter.feed(chunk)
    meter.finish()
    assert meter.usage == TokenUsage(7, 3, 0, 0)
    assert meter.completed


async def test_a_stream_whose_usage_is_followed_by_an_empty_one_is_charged_that_usage(
    make_settings: Settings,
) -> None:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in _stream({}):
                yield chunk

        return StreamingResponse(chunks(), media_type="text/event-stream")

    settings = make_settings()
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = engine_of(app)
    body = chat(stream=True, stream_options={"include_usage": True})
    async with running(app), client(app) as http:
        answer = await http.post("/v1/chat/completions", json=body)
        await engine.flush()
    assert answer.content == b"".join(_stream({}))  # asked for by the client: passed as it is
    with engine.store.session() as s:
        rows = list(s.exec(select(UsageRecordRow)))
    assert [(r.input_tokens, r.output_tokens, r.estimated) for r in rows] == [(7, 3, False)]


@pytest.mark.parametrize("drop", [False, True])
def test_a_stream_is_read_again_after_an_event_too_large_to_hold(
    drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit of an event's size the meter stops holding it: it passes on unread, and
    the stream is read again after its blank line (the usage chunk we asked for dropped)."""
    monkeypatch.setattr("budget_middleware.core.sse._MAX_PENDING", 100)
    garbage = b"x" * 150
    rest = b"\n\n" + b"".join(_stream(None))
    meter = StreamMeter(drop_usage_chunk=drop)
    out = meter.feed(garbage[:120]) + meter.feed(garbage[120:] + rest) + meter.finish()
    kept = [c for c in _stream(None) if b'"choices":[]' not in c] if drop else _stream(None)
    assert out == garbage + b"\n\n" + b"".join(kept)
    assert meter.usage is not None and meter.completed and meter.gave_up
    assert not meter.gap_unread()  # a usage read after it


def test_a_chunk_with_a_type_of_its_own_is_still_read_as_a_chat_chunk() -> None:
    """Only the Anthropic and Responses event types are read by type; an OpenAI-compatible
    chunk that carries some other `type` is a chat chunk."""
    body = {"type": "chat.completion.chunk", "choices": [], "usage": USAGE, "model": "m-1"}
    meter = StreamMeter()
    meter.feed(b"data: " + json.dumps(body).encode() + b"\n\n")
    assert meter.usage == TokenUsage(7, 3, 0, 0)
    assert meter.model == "m-1"


# -- usage: what an upstream reports is taken as it says -----------------------------------------


def test_a_reported_cost_of_zero_is_a_cost_not_a_missing_one() -> None:
    """`usage.cost: 0` (a free model) is the cost: the price list is not asked."""
    assert usage_from_mapping({"prompt_tokens": 5, "completion_tokens": 2, "cost": 0}) == (
        TokenUsage(5, 2, cost=0.0)
    )
    assert usage_from_mapping({"cost": 0.0}) == TokenUsage(cost=0.0)


@pytest.mark.parametrize(
    "negative",
    [
        {"prompt_tokens": -3},
        {"completion_tokens": -3},
        {"prompt_tokens_details": {"cached_tokens": -3}},
        {"cache_read_input_tokens": -3},
        {"cache_creation_input_tokens": -3},
    ],
)
def test_a_negative_count_in_any_field_counts_as_zero(negative: dict[str, Any]) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 2, **negative}
    expected = TokenUsage(
        0 if "prompt_tokens" in negative else 10, 0 if "completion_tokens" in negative else 2
    )
    assert usage_from_mapping(usage) == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [({"input_tokens": 12}, TokenUsage(12, 0)), ({"output_tokens": 4}, TokenUsage(0, 4))],
)
def test_a_usage_that_reports_only_input_or_only_output_tokens_counts_them(
    usage: dict[str, Any], expected: TokenUsage
) -> None:
    assert usage_from_mapping(usage) == expected


@pytest.mark.parametrize("pad", range(4))
def test_a_usage_key_inside_an_escaped_string_is_never_the_usage(pad: int) -> None:
    """`"usage"` that ends a key or a string after an escaped quote (`"q\\"usage"`) is text,
    wherever it falls in the body (`pad` moves it by a byte at a time)."""
    real = {"prompt_tokens": 1, "completion_tokens": 2}
    decoy = {"prompt_tokens": 777, "completion_tokens": 777}
    with_usage = {"id": "x" * pad, "usage": real, 'q"usage': decoy}
    without = {"id": "x" * pad, 'q"usage': decoy}
    assert usage_from_json(json.dumps(with_usage).encode()) == TokenUsage(1, 2)
    assert usage_from_json(json.dumps(without).encode()) is None


# -- chunk boundaries anywhere, exhaustively -----------------------------------------------------


def _decode(stream: bytes, cuts: tuple[int, ...]) -> tuple[list[str], bytes]:
    """The data of every dispatched event, and every byte handed back, with the stream cut at
    `cuts`."""
    decoder = SSEDecoder()
    points = [0, *cuts, len(stream)]
    events = []
    for start, end in itertools.pairwise(points):
        events += decoder.feed(stream[start:end])
    events += decoder.flush()
    return [e.data for e in events if e.complete], b"".join(e.raw for e in events)


@pytest.mark.parametrize("eols", ["\n", "\r", "\r\n", "\n|\r|\r\n", "\r\n|\n|\r", "\n|\n|\n|\r"])
def test_every_cut_of_a_stream_with_extra_blank_lines_decodes_as_the_whole_stream(
    eols: str,
) -> None:
    """Cut once or twice anywhere, even between the two line ends that close an event or
    before a blank line that opens a chunk, a stream yields the same events and bytes (line
    ends taken in turn from `eols`)."""
    lines = ["data: a", "", "", "data: b", ": c", "data: c", "", "", "", "data: d", ""]
    ends = itertools.cycle(eols.split("|"))
    stream = "".join(line + next(ends) for line in lines).encode()
    assert _decode(stream, ()) == (["a", "b\nc", "d"], stream)
    for first in range(1, len(stream)):
        assert _decode(stream, (first,)) == (["a", "b\nc", "d"], stream), first
        for second in range(first, len(stream)):
            assert _decode(stream, (first, second)) == (["a", "b\nc", "d"], stream), (first, second)


def _meter(stream: bytes, cuts: tuple[int, ...]) -> tuple[bytes, TokenUsage | None]:
    meter = StreamMeter(drop_usage_chunk=True)
    points = [0, *cuts, len(stream)]
    out = b"".join(meter.feed(stream[a:b]) for a, b in itertools.pairwise(points))
    return out + meter.finish(), meter.usage


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
def test_every_cut_of_a_stream_forwards_all_but_the_usage_chunk_byte_for_byte(eol: str) -> None:
    """The usage chunk the middleware asked for is removed, whatever the chunk boundaries (even
    between its CR and LF); every other byte, blank lines after it included, goes on."""
    text = 'data: {"choices":[{"delta":{"content":"hi"}}]}'
    usage = 'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    before = f"{text}{eol}{eol}".encode()
    dropped = f"{usage}{eol}{eol}".encode()
    after = f"{eol}: ping{eol}{eol}data: [DONE]{eol}{eol}".encode()
    stream = before + dropped + after
    expected = (before + after, TokenUsage(4, 1))
    assert _meter(stream, ()) == expected
    for first in range(1, len(stream)):
        assert _meter(stream, (first,)) == expected, first
        for second in range(first + 1, len(stream)):
            assert _meter(stream, (first, second)) == expected, (first, second)


# -- what a request body says about itself -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({"max_completion_tokens": 7, "max_tokens": 100, "max_output_tokens": 50}, 100),
        ({"max_tokens": 100, "max_output_tokens": 50}, 100),
        ({"max_output_tokens": 50}, 50),
        ({"max_tokens": 0}, 0),  # a limit of no output is a limit
        ({"max_completion_tokens": -1, "max_tokens": 9}, 9),  # a negative one is no limit
        ({"max_tokens": None, "max_output_tokens": 3}, 3),
        ({"max_tokens": True}, None),  # JSON true is not a count
        ({"max_tokens": 5.0}, 5),  # as FastAPI's pydantic model reads it
        ({"max_tokens": "5"}, 5),
        ({"max_tokens": "five"}, None),
        ({}, None),
    ],
)
def test_the_output_limit_that_prices_a_reservation_is_the_largest_valid_field(
    fields: dict[str, Any], limit: int | None
) -> None:
    """Of `max_completion_tokens`, `max_tokens` and `max_output_tokens`, the largest that is a
    count (a non-negative number, or a string of one) bounds the output the reservation is
    priced for: upstreams differ in which one they obey."""
    resolve = TargetResolver(lambda model: None)
    target = resolve({"model": "gpt-4o", **fields}, "/v1/chat/completions", Credentials(), ())
    assert target.max_output_tokens == limit


@pytest.mark.parametrize(
    ("metadata", "tags"),
    [
        ("research", []),
        ({"tags": "a,b"}, []),
        ({"tags": {"a": 1}}, []),
        ({"tags": [" a ", 3, None, "", "  ", "b"]}, ["a", "b"]),
    ],
)
async def test_body_tags_that_are_not_a_list_of_strings_are_ignored_not_split_or_fatal(
    make_settings: Settings, metadata: Any, tags: list[str]
) -> None:
    app = host_app(make_settings())
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/state/completions",
            json={"model": "gpt-4o", "metadata": metadata},
            headers={"x-budget-tags": "env:prod"},
        )
    assert answer.status_code == 200
    assert answer.json()["tags"] == sorted(["env:prod", *tags])


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        # 20 + 20 distinct tags: the first 32 in order are kept
        (
            ",".join(f"h{n:02}" for n in range(20)),
            [f"b{n:02}" for n in range(20)],
            [f"b{n:02}" for n in range(20)] + [f"h{n:02}" for n in range(12)],
        ),
        # past 256 comma-separated parts the header is not read: no tag is made of the rest
        (",".join(["dup"] * 256 + ["x", "y"]), [], ["dup"]),
        ("", [f"t{n:02}" for n in range(50)], [f"t{n:02}" for n in range(32)]),
    ],
)
async def test_a_request_carries_at_most_32_tags_and_none_it_did_not_send(
    make_settings: Settings, header: str, body: list[str], expected: list[str]
) -> None:
    app = host_app(make_settings())
    async with running(app), client(app) as http:
        answer = await http.post(
            "/v1/state/completions",
            json={"model": "gpt-4o", "metadata": {"tags": body}},
            headers={"x-budget-tags": header},
        )
    assert answer.json()["tags"] == expected


@pytest.mark.parametrize(
    "sent",
    [
        {"lines": [",".join(["a"] * 256), "capped"]},  # a gateway's line after the client's
        {"lines": [",".join(f"t{n}" for n in range(300)) + ",capped"]},  # appended to it
        {"lines": [], "body": ["x"] * 256 + ["capped"]},
    ],
    ids=["second-line", "appended", "body"],
)
async def test_a_tag_with_limits_is_met_however_many_tags_are_sent_before_it(
    make_settings: Settings, sent: dict[str, Any]
) -> None:
    """A tag with a $0 budget (a gateway's line after the client's, say: SPEC §5, every tag of
    the request that has limits applies) sent after 256 others: it was not read, and the
    request was served against none of its limits."""
    app = host_app(make_settings())
    engine = engine_of(app)
    async with running(app):
        engine.manager.put_tag("capped", budgets=[{"max_limit": 0, "reset_duration": "1d"}])
        await engine.invalidate()
        headers = [("x-budget-tags", line) for line in sent["lines"]]
        body = chat(metadata={"tags": sent["body"]}) if "body" in sent else chat()
        async with client(app) as http:
            answer = await http.post("/v1/chat/completions", json=body, headers=headers)
    print(f"tag 'capped' ($0 budget) after 256 others: {answer.status_code}")
    assert answer.status_code == 402
    assert answer.json()["error"]["scope"]["name"] == "capped"


async def test_fresh_provider_headers_and_paths_from_clients_do_not_stay_in_memory() -> None:
    """Where a (model, `x-budget-provider`, path) leads is remembered, 4,096 of them: the model
    was bounded, the header and the path were not, so a client sending fresh long ones (8 KB
    each here; servers take 16 KB and more) made each request keep 16 KB: 18 MB after 1,000,
    130 MB at 4,096, per middleware."""
    import asyncio
    import gc
    import tracemalloc

    from support import serve_lifespan

    answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o",
                         "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                  "total_tokens": 2}}).encode()  # fmt: skip

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": answer})

    body = json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": 5}).encode()

    async def post(app: Any, i: int, size: int) -> int:
        path = "/" + "x" * size + f"{i}/v1/chat/completions"
        headers = [(b"content-type", b"application/json"),
                   (b"x-budget-provider", f"{i:08d}".encode() + b"p" * size)]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "root_path": "", "query_string": b"", "headers": headers, "state": {}}  # fmt: skip
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        return statuses[0]

    settings = BudgetSettings(database_url="sqlite://", flush_interval_seconds=0.05)
    app = BudgetMiddleware(upstream, settings=settings)
    async with running(app):
        for i in range(20):
            await post(app, i, 10)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            statuses = {await post(app, i, 8000) for i in range(1000)}
            await app.engine.flush()
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    print(f"1,000 requests with 8 KB provider headers and paths: {kept / 1e6:.1f} MB kept")
    assert statuses == {200} and kept < 5e6


# -- month windows whatever the anchor's time zone -----------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "start", "end"),
    [
        # 23:30 on Jan 31 in UTC-5 is 04:30 on Feb 1 in UTC: the windows are counted in UTC
        (
            datetime(2024, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
            datetime(2024, 3, 1, 4, 30, tzinfo=UTC),
            datetime(2024, 4, 1, 4, 30, tzinfo=UTC),
        ),
        # a naive anchor is UTC: Jan 31, Feb 29, then the clamped day: Mar 29
        (
            datetime(2024, 1, 31, 12),
            datetime(2024, 2, 29, 12, tzinfo=UTC),
            datetime(2024, 3, 29, 12, tzinfo=UTC),
        ),
    ],
)
def test_a_rolling_month_window_ends_where_the_next_starts_whatever_the_anchor_zone(
    anchor: datetime, start: datetime, end: datetime
) -> None:
    now = datetime(2024, 3, 15, tzinfo=UTC)
    month = Duration.parse("1M")
    bounds = window_bounds(month, anchor=anchor, now=now, calendar_aligned=False)
    assert bounds == (start, end)
    assert bounds[1].tzinfo is UTC
    assert window_bounds(month, anchor=anchor, now=end, calendar_aligned=False)[0] == end


# -- prices ----------------------------------------------------------------------------------------


MILLION_EACH = TokenUsage(1_000_000, 1_000_000)


def catalog_nanos(provider: str | None, model: str, at: datetime | None = None) -> Decimal:
    """What genai-prices charges for a million input and a million output tokens."""
    usage = genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    calc = genai_prices.calc_price(usage, model, provider_id=provider, genai_request_timestamp=at)
    return calc.total_price * 10**9


def charged(provider: str, model: str) -> int:
    price = PriceBook().price(provider, model)
    assert price is not None
    return cost_nanos(price, MILLION_EACH)


def test_a_model_sold_by_a_named_provider_costs_that_providers_price() -> None:
    """`groq/<model>` is charged Groq's price for it, not the price any other provider lists."""
    model = "deepseek-r1-distill-llama-70b"
    assert catalog_nanos("groq", model) != catalog_nanos(None, model)  # worth a test
    assert charged("groq", model) == catalog_nanos("groq", model)


def test_a_price_changed_on_a_date_is_charged_at_the_price_in_force_now() -> None:
    assert catalog_nanos("openai", "o3") != catalog_nanos("openai", "o3", datetime(2024, 1, 1))
    assert charged("openai", "o3") == catalog_nanos("openai", "o3")


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-v4-flash"])
def test_a_time_of_day_price_is_charged_at_the_hour_the_request_is_made(model: str) -> None:
    """DeepSeek Chat's off-peak discount and V4 Flash's peak hours: each half hour of a day
    (and the minute each window starts and ends at) costs what genai-prices says then."""
    day = datetime(2026, 11, 20, tzinfo=UTC)
    price = PriceBook().price("deepseek", model)
    assert price is not None
    moments = [day + timedelta(minutes=m) for m in range(0, 24 * 60, 30)]
    moments += [day + timedelta(hours=h, minutes=m) for h in (0, 1, 4, 6, 10, 16) for m in (29, 59)]
    by_time = [catalog_nanos("deepseek", model, at) for at in moments]
    assert min(by_time) < max(by_time)  # priced apart by the hour
    assert [cost_nanos(at_time(price, at.timestamp()), MILLION_EACH) for at in moments] == by_time


@pytest.mark.parametrize("key", ["/gpt-4o", "openai/", " / "])
def test_a_pricing_file_key_that_is_no_model_name_is_refused(tmp_path: Path, key: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {key: {"input_per_mtok": 1, "output_per_mtok": 2}}}))
    with pytest.raises(PricingFileError, match="is not a model name"):
        PriceBook(path)


def test_an_unknown_field_of_a_price_names_the_fields_a_price_may_have(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"m": {"input_per_mtok": 1, "output": 2}}}))
    with pytest.raises(PricingFileError) as info:
        PriceBook(path)
    assert "models.m.output: unknown field (allowed: input_per_mtok, output_per_mtok," in str(
        info.value
    )
    path.write_text(json.dumps({"models": {}, "currency": "EUR"}))
    with pytest.raises(PricingFileError, match=r"currency: unknown field \(allowed: models\)"):
        PriceBook(path)


def test_empty_tags_first_never_glue_the_rest_into_one_tag() -> None:
    from budget_middleware.core.identity import header_reader

    read = header_reader("x-budget-key", "sk-bm-")
    sent = ",," + ",".join(f"t{i}" for i in range(257))
    tags = read([(b"x-budget-tags", sent.encode())]).tags
    print(f"{len(tags)} tags read of 257 sent after two empty entries")
    # at most 256 read (a request keeps 32 of them), none the client did not send
    assert tags == tuple(f"t{i}" for i in range(256))


def test_an_infinite_reported_cost_is_no_cost_not_the_cap() -> None:
    import math

    import pytest

    from budget_middleware.core.money import MAX_CHARGE_NANOS, charge_nanos

    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            charge_nanos(bad)
    assert charge_nanos(1e300) == MAX_CHARGE_NANOS  # a finite absurd cost is capped
