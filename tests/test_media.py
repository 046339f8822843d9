"""Media sent by reference (SPEC §6): an image or a file named by URL or id takes input tokens its
body does not hold, so the reservation's estimate (a third of the body's bytes) cannot bound it.
Such a request reserves, for each reference, the most input one has been measured to take for its
model here; before any has been measured, all one request can be charged, as an unpriced model's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from budget_middleware import (
    BudgetMiddleware,
    BudgetSettings,
    BudgetTransport,
    charge_to,
    get_engine,
)
from budget_middleware.core.media import (
    MARK,
    asked_image_tokens,
    audio_seconds,
    drawn_image_tokens,
    image_size,
    image_tokens,
    may_reference,
    media_references,
)
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import client, running

Settings = Callable[..., BudgetSettings]
NANO = 1_000_000_000
IMAGE_TOKENS = 1_500  # what the fake provider bills an image it fetched, as a real one would
LIMIT = 0.05
URL = "https://example.com/cat.png"


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    """gpt-4o at its list prices: $2.50 per million input tokens, $10 per million output."""
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10}}})
    )
    return path


def image_chat(images: int = 1, text: str = "what is in this picture?") -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": URL}} for _ in range(images)]
    return {
        "model": "openai/gpt-4o",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 10,
    }


async def provider(request: Request) -> JSONResponse:
    """Bills each image URL 1,500 input tokens (it fetched them), the text a few."""
    body = await request.json()
    parts = body["messages"][0]["content"]
    images = sum(1 for part in parts if part.get("type") == "image_url")
    await asyncio.sleep(0.01)  # in flight together
    usage = {"prompt_tokens": 20 + IMAGE_TOKENS * images, "completion_tokens": 10}
    return JSONResponse({"choices": [{"message": {"content": "a cat"}}], "usage": usage})


def one_request_nanos(images: int = 1) -> int:
    """What one such request costs: its input at $2.50/Mtok, 10 output tokens at $10/Mtok."""
    return (20 + IMAGE_TOKENS * images) * 2_500 + 10 * 10_000  # nano-dollars a token


def overrun_at_most_one(what: str, answers: list[httpx.Response], spent: int) -> list[int]:
    """Print what a burst measured and check it: refused as limits refuse, and spend past the
    $0.05 limit by one request's own overrun at most. The burst's status codes."""
    codes = [a.status_code for a in answers]
    one = one_request_nanos()
    print(
        f"{what} at once: {codes.count(200)} admitted; spent ${spent / NANO:.6f} of "
        f"${LIMIT:.2f} (one request ${one / NANO:.6f}, overrun "
        f"${max(0, spent - LIMIT * NANO) / NANO:.6f})"
    )
    assert set(codes) <= {200, 429, 402}
    assert spent <= LIMIT * NANO + one
    return codes


def provider_app(settings: BudgetSettings) -> BudgetMiddleware:
    return BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])]),
        settings=settings,
    )


@pytest.mark.parametrize("counters", ["memory", "redis"])
async def test_concurrent_image_requests_overrun_a_budget_by_at_most_one_request(
    make_settings: Settings, pricing_file: Path, counters: str
) -> None:
    """200 requests at once, each with one image URL, on a $0.05 budget: each is billed 1,500
    input tokens its ~60-token estimate did not count. Spend may pass the limit by one request's
    own overrun, never by what concurrency adds (reserving the estimate alone let all 200 in)."""
    prefix = unique_prefix()
    if counters == "redis":
        need_redis()
        settings = make_settings(pricing_file=pricing_file, redis_url=REDIS_URL)
    else:
        settings = make_settings(pricing_file=pricing_file)
    app = provider_app(settings)
    engine = get_engine(settings)
    if counters == "redis":
        use_prefix(engine, prefix)
    try:
        async with running(app), client(app) as http:
            key = engine.manager.create_virtual_key(
                name="alice", budgets=[{"max_limit": LIMIT, "reset_duration": "1d"}]
            )
            auth = {"authorization": f"Bearer {key.value}"}

            async def burst() -> list[httpx.Response]:
                return await asyncio.gather(
                    *[
                        http.post("/v1/chat/completions", json=image_chat(), headers=auth)
                        for _ in range(200)
                    ]
                )

            answers = await burst()
            more = await burst()
            await engine.flush()
            spent = round(engine.manager.get_budget(key.budgets[0].id).current_usage * NANO)
    finally:
        if counters == "redis":
            delete_prefix(REDIS_URL, prefix)
    codes = overrun_at_most_one(f"{counters}: 2 x 200 image requests", answers + more, spent)
    assert codes.count(200) >= int(LIMIT * NANO) // one_request_nanos()  # and the budget is used


@pytest.mark.parametrize("first", ["a long prompt with its image", "keys spelt with escapes"])
async def test_no_body_lets_image_requests_overrun_together(
    make_settings: Settings, pricing_file: Path, first: str
) -> None:
    """Two ways past the reservation (a review's): an image request with a long prompt measured
    first taught 0 tokens an image (its measured input minus its body's generous estimate), and
    200 short image requests then went in together; and a body spelling `"type"` with escapes
    (`"\\u0074ype"`) skipped the look for media. Each overran a $0.05 budget ~10 times."""
    settings = make_settings(pricing_file=pricing_file)
    app = provider_app(settings)
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": LIMIT, "reset_duration": "1d"}]
        )
        auth = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}
        if first == "a long prompt with its image":
            long = await http.post(
                "/v1/chat/completions", json=image_chat(text="words " * 5_000), headers=auth
            )
            assert long.status_code == 200
            body = json.dumps(image_chat()).encode()
        else:
            body = json.dumps(image_chat()).replace('"type"', '"\\u0074ype"').encode()
            assert MARK not in body and media_references(json.loads(body)) == 1
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", content=body, headers=auth) for _ in range(200)]
        )
        await engine.flush()
        spent = round(engine.manager.get_budget(key.budgets[0].id).current_usage * NANO)
    overrun_at_most_one(f"{first}, then 200 image requests", answers, spent)


async def test_an_image_request_waits_for_its_model_s_first_measured_answer(
    make_settings: Settings, pricing_file: Path
) -> None:
    """Before any answer of gpt-4o has measured an image, an image request reserves all one
    request can be charged: it waits (429 `budget_reserved`, saying why) while another is in
    flight, and runs alone otherwise. An answer without usage measures nothing. Once one has
    been measured, each image reserves what it took, and image requests run side by side up to
    the budget's room."""
    app = provider_app(make_settings(pricing_file=pricing_file))
    engine = app.engine
    text = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(
            name="alice", budgets=[{"max_limit": LIMIT, "reset_duration": "1d"}]
        )
        auth = {"authorization": f"Bearer {key.value}"}

        async def post(body: dict[str, Any]) -> httpx.Response:
            return await http.post("/v1/chat/completions", json=body, headers=auth)

        text_body = {**text, "max_tokens": 10}
        text_body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]

        async def once_text_is_in_flight(body: dict[str, Any]) -> httpx.Response:
            # Sent when the text request holds its reservation (a fixed 2 ms delay let the
            # image go first on a loaded machine, and the text waited for it instead).
            for _ in range(20_000):
                reserved = engine.registry.counter("budget", key.budgets[0].id)
                if reserved is not None and reserved.reserved > 0:
                    break
                await asyncio.sleep(0.0005)
            return await post(body)

        slow_text, held = await asyncio.gather(
            post(text_body), once_text_is_in_flight(image_chat())
        )
        unmeasured = await post({**image_chat(), "model": "openai/gpt-4o", "stream": False})
        assert engine.gate.media_tokens.get(("openai", "gpt-4o")) is not None  # measured
        learned = engine.gate.media_tokens[("openai", "gpt-4o")]
        answers = await asyncio.gather(*[post(image_chat()) for _ in range(50)])
        counter = engine.registry.counter("budget", key.budgets[0].id)
    assert counter is not None
    codes = [a.status_code for a in answers]
    print(
        f"image while text in flight: {held.status_code}; learned {learned} tokens an image; "
        f"then 50 at once: {codes.count(200)} admitted, spent ${counter.value / NANO:.6f} "
        f"of ${LIMIT}"
    )
    assert slow_text.status_code == 200 and unmeasured.status_code == 200
    error = held.json()["error"]
    assert held.status_code == 429 and error["code"] == "budget_reserved"
    assert "media sent by reference" in error["message"] and "retry-after" in held.headers
    # All 1,520 measured count as the image's, its text's too: an upper bound, never 0.
    assert learned == IMAGE_TOKENS + 20
    one = one_request_nanos()
    room = int(LIMIT * NANO) - one_request_nanos(0) - one
    assert codes.count(200) >= room // one - 1  # side by side up to the room
    assert counter.value <= LIMIT * NANO + one and counter.reserved == 0


async def test_an_answer_without_usage_measures_no_image(
    make_settings: Settings, pricing_file: Path
) -> None:
    """An error without usage (or any answer whose input is only estimated) tells nothing of
    what an image takes: the next image requests still reserve all one can be charged."""
    calls = 0

    async def failing_first(request: Request) -> JSONResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return await provider(request)

    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", failing_first, methods=["POST"])]),
        settings=make_settings(pricing_file=pricing_file),
    )
    engine = app.engine
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        auth = {"authorization": f"Bearer {key.value}"}
        failed = await http.post("/v1/chat/completions", json=image_chat(), headers=auth)
        assert ("openai", "gpt-4o") not in engine.gate.media_tokens
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=image_chat(), headers=auth) for _ in range(20)]
        )
    codes = [a.status_code for a in answers]
    assert failed.status_code == 503
    assert codes.count(200) == 1 and codes.count(429) == 19  # the first runs alone


async def test_a_charge_that_cannot_be_worked_out_is_no_image_request_s_reservation(
    make_settings: Settings, pricing_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should working out a charge fail (a bug), the reservation's estimate is charged: an
    unmeasured image request's reservation is all one request can be charged, which is no
    estimate (a review's: $1,000,000 charged for one image request), so its body's is."""
    from budget_middleware.engine.exchange import Exchange

    def broken(self: Exchange, outcome: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Exchange, "_work_out", broken)
    app = provider_app(make_settings(pricing_file=pricing_file))
    engine = app.engine
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        auth = {"authorization": f"Bearer {key.value}"}
        answer = await http.post("/v1/chat/completions", json=image_chat(), headers=auth)
        counter = engine.registry.counter("budget", key.budgets[0].id)
    assert counter is not None
    print(f"charge failed: ${counter.value / NANO:.6f} charged")
    assert answer.status_code == 200
    # the body's estimate (its image unknown): its text's prompt and its 10 output tokens
    assert 10 * 10_000 < counter.value < one_request_nanos()


async def test_inline_images_and_text_reserve_their_estimate_alone(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A `data:` URL's bytes are in the body (its estimate counts them): no reference, so such
    requests run side by side from the first, as text ones do."""
    app = provider_app(make_settings(pricing_file=pricing_file))
    engine = app.engine
    inline = image_chat()
    inline["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,iVBORw0K"
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        auth = {"authorization": f"Bearer {key.value}"}
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=inline, headers=auth) for _ in range(5)]
        )
    assert [a.status_code for a in answers] == [200] * 5
    assert engine.gate.media_tokens == {}


async def test_the_outbound_transport_reserves_for_images_too(
    make_settings: Settings, pricing_file: Path
) -> None:
    """SPEC §13: the transport's calls go through the same gate."""
    engine = get_engine(make_settings(pricing_file=pricing_file))
    await engine.ensure_started()
    try:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        upstream = Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])])
        transport = BudgetTransport(httpx.ASGITransport(upstream), engine=engine)
        async with httpx.AsyncClient(transport=transport, base_url="https://api.openai.com") as sdk:
            body = {**image_chat(), "model": "gpt-4o"}
            with charge_to(virtual_key=key.value):
                first = await asyncio.gather(
                    *[sdk.post("/v1/chat/completions", json=body) for _ in range(20)]
                )
                then = await asyncio.gather(
                    *[sdk.post("/v1/chat/completions", json=body) for _ in range(200)]
                )
        counter = engine.registry.counter("budget", key.budgets[0].id)
        assert counter is not None
        codes = [a.status_code for a in first + then]
        print(f"outbound: {codes.count(200)} admitted, spent ${counter.value / NANO:.6f}")
        assert [a.status_code for a in first].count(200) == 1  # unmeasured: alone
        assert engine.gate.media_tokens.get(("openai", "gpt-4o"), 0) > 1_300
        assert counter.value <= LIMIT * NANO + one_request_nanos()
        assert codes.count(200) >= 10
    finally:
        await engine.shutdown()


def _chat(*parts: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": list(parts)}]}


HTTPS = "https://example.com/report.pdf"
DATA = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(
    ("body", "references"),
    [
        # OpenAI chat
        (_chat({"type": "image_url", "image_url": {"url": URL}}), 1),
        (_chat({"type": "image_url", "image_url": {"url": URL, "detail": "low"}}), 1),
        (_chat({"type": "image_url", "image_url": URL}), 1),  # the URL itself
        (_chat({"type": "image_url", "image_url": {"url": DATA}}), 0),  # inline
        (_chat({"type": "image_url", "image_url": {"url": "DATA:image/png;base64,AA"}}), 0),
        (_chat({"type": "file", "file": {"file_id": "file-abc"}}), 1),
        (_chat({"type": "file", "file": {"file_data": DATA, "filename": "a.pdf"}}), 1),  # pages
        (_chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}), 0),
        (_chat({"type": "text", "text": "an image_url with a file_id"}), 0),
        # The Responses API: in a message's content, or an item of `input` itself
        (
            {
                "model": "gpt-4o-mini",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "compare"},
                            {"type": "input_image", "image_url": URL},
                            {"type": "input_image", "file_id": "file-1"},
                            {"type": "input_image", "image_url": DATA},
                            {"type": "input_file", "file_id": "file-2"},
                            {"type": "input_file", "file_url": HTTPS},
                            {"type": "input_file", "file_data": DATA, "filename": "x.pdf"},
                        ],
                    }
                ],
            },
            5,
        ),
        ({"model": "gpt-4o", "input": [{"type": "input_image", "image_url": URL}]}, 1),
        ({"model": "gpt-4o", "input": "a string input"}, 0),
        (
            {
                "model": "gpt-4o",
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c1",
                        "output": [{"type": "input_image", "image_url": URL}],
                    }
                ],
            },
            1,
        ),
        # Anthropic messages, a tool result's content too
        (_chat({"type": "image", "source": {"type": "url", "url": URL}}), 1),
        (_chat({"type": "image", "source": {"type": "file", "file_id": "file_01"}}), 1),
        (_chat({"type": "image", "source": {"type": "base64", "data": "AA"}}), 0),
        (_chat({"type": "document", "source": {"type": "url", "url": HTTPS}}), 1),
        (_chat({"type": "document", "source": {"type": "file", "file_id": "file_02"}}), 1),
        (_chat({"type": "document", "source": {"type": "text", "data": "plain"}}), 0),
        (_chat({"type": "document", "source": {"type": "base64", "data": "JVBERi0"}}), 1),
        (
            _chat(
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": {"type": "url", "url": URL}}],
                }
            ),
            1,
        ),
        # The Images API's edits as JSON (gpt-image-1.5): by URL or file id; inline, not
        (
            {
                "model": "gpt-image-1.5",
                "prompt": "a hat on the cat",
                "images": [
                    {"image_url": URL},
                    {"file_id": "file-1"},
                    {"image_url": "data:image/png;base64,AA"},
                ],
            },
            2,
        ),
        # Several messages, several references
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]},
                    {"role": "assistant", "content": "a cat"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]},
                ]
            },
            2,
        ),
    ],
)
def test_media_references_counts_each_medium_sent_by_reference(
    body: dict[str, Any], references: int
) -> None:
    assert media_references(body) == references
    # and the bytes of every body that names one hold what the gate looks for first
    for raw in (json.dumps(body).encode(), json.dumps(body, separators=(",", ":")).encode()):
        assert references == 0 or may_reference(raw)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        42,
        {},
        {"messages": None},
        {"messages": "hello"},
        {"messages": [None, 1, "x", []]},
        {"messages": [{"content": None}, {"content": [None, 3, "x"]}]},
        {"messages": [{"content": [{"type": "image_url"}]}]},  # no URL
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
        {"messages": [{"content": [{"type": "image_url", "image_url": ["x"]}]}]},
        {"messages": [{"content": [{"type": "file", "file": "file-1"}]}]},
        {"messages": [{"content": [{"type": "image", "source": "https://x"}]}]},
        {"messages": [{"content": [{"type": "image", "source": {"type": "url"}}]}]},
        {"messages": [{"content": [{"type": ["image_url"], "image_url": URL}]}]},
        {"input": [{"content": {"type": "input_image", "image_url": URL}}]},  # not a list
        {"images": ["iVBORw0KGgo"]},  # Ollama's `/api/generate`: base64, inline
        {"images": [{"image_url": ""}, {"file_id": 7}, None]},
        {"images": {"image_url": URL}},  # not a list
    ],
)
def test_media_references_reads_whatever_comes_without_failing(body: Any) -> None:
    assert media_references(body) == 0


def test_media_references_stops_at_the_depth_the_apis_use() -> None:
    deep: dict[str, Any] = {"type": "image_url", "image_url": URL}
    for _ in range(5):
        deep = {"type": "tool_result", "content": [deep]}
    assert media_references({"messages": [deep]}) == 0
    nested = {"messages": [{"content": [{"type": "tool_result", "content": [deep["content"]]}]}]}
    assert media_references(nested) == 0  # a list in a list: not a part


def test_media_references_counts_to_a_tool_result_s_content_and_no_deeper() -> None:
    """Messages, their content, a tool result's content: three levels, each counted; a fourth
    is not; and what is no part (a string, a number) is passed over, not an end of the list."""
    image = {"type": "image_url", "image_url": {"url": URL}}
    result = {"type": "tool_result", "content": ["text", 3, image]}
    three = {"messages": [{"role": "user", "content": ["x", result, image]}]}
    assert media_references(three) == 2
    four = {"messages": [{"content": [{"type": "tool_result", "content": [result]}]}]}
    assert media_references(four) == 0
    parts = [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, image]
    assert media_references({"messages": [{"content": parts}]}) == 1


def test_only_a_body_that_may_name_media_is_walked() -> None:
    """`may_reference` looks at the bytes first: a text-only chat is never walked; one that
    holds `"type"`, a `\\u` escape (`"\\u0074ype"`) or NUL bytes (UTF-16) is."""
    text_only = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert not may_reference(text_only.encode())
    assert may_reference(b'{"type": "image_url"}')
    assert may_reference(b'{"\\u0074ype": "image_url"}')
    assert may_reference('{"type": "image_url"}'.encode("utf-16"))


# Inline images: billed by their pixels, not their bytes. The reservation reads each one's size
# from its header (PNG, JPEG, GIF, WebP) and holds the most its provider bills that size.


def png(width: int, height: int, size: int = 0) -> bytes:
    """A PNG's signature and IHDR for `width` x `height`, padded to `size` bytes (a photo's)."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    head = (
        b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    )
    return head + os.urandom(max(0, size - len(head)))


def jpeg(width: int, height: int, exif: int = 70_000) -> bytes:
    """A JPEG with `exif` bytes of APPn segments (EXIF, ICC) before its frame header."""
    out = b"\xff\xd8"
    left = exif
    while left > 0:
        n = min(left, 65_000)
        out += b"\xff\xe1" + (n + 2).to_bytes(2, "big") + os.urandom(n)
        left -= n
    sof = b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x00" * 9
    return out + b"\xff\xc0" + (len(sof) + 2).to_bytes(2, "big") + sof + os.urandom(5_000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_image_size_reads_the_header_of_each_format() -> None:
    vp8 = b"RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00\x00\x00\x00\x9d\x01\x2a"
    vp8 += (1500).to_bytes(2, "little") + (900).to_bytes(2, "little")
    bits = (640 - 1) | ((480 - 1) << 14)
    vp8l = b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f" + bits.to_bytes(4, "little")
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00"
    vp8x += (3999).to_bytes(3, "little") + (2999).to_bytes(3, "little")
    gif = b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little") + b"\x00" * 30
    cases = {
        "png": (png(1024, 768, 1_000), (1024, 768)),
        "jpeg": (jpeg(4032, 3024), (4032, 3024)),
        "gif": (gif, (300, 200)),
        "webp vp8": (vp8 + b"\x00" * 10, (1500, 900)),
        "webp vp8l": (vp8l + b"\x00" * 10, (640, 480)),
        "webp vp8x": (vp8x + b"\x00" * 10, (4000, 3000)),
    }
    for name, (data, size) in cases.items():
        assert image_size(b64(data)) == size, name
    # base64 in lines: a header in its first line is read; a JPEG's frame header, sought
    # beyond the first line, is not (what was read there is not where it was sought)
    assert image_size(base64.encodebytes(png(1024, 768, 1_000)).decode()) == (1024, 768)
    wrapped = base64.encodebytes(jpeg(4032, 3024)).decode()
    for unread in ["", "not base64!", b64(b"BM" + b"\x00" * 40), wrapped]:
        assert image_size(unread) is None
    assert image_size(b64(jpeg(10, 10, exif=0)[:8])) is None  # cut before its frame header


def test_image_tokens_bound_what_each_provider_bills() -> None:
    """The documented counts: gpt-4o's 1024x1024 is 765, 2048x4096 is 1,105; Claude's
    1000x1000 ~1,334; Gemini 2's 258 a tile. The bound is never below them."""
    assert 765 <= image_tokens("openai/gpt-4o", 1024, 1024) <= 1_000
    assert 1_105 <= image_tokens("gpt-4o", 2048, 4096) <= 1_300
    assert 1_334 <= image_tokens("claude-sonnet-4-5", 1000, 1000) <= 1_500
    assert image_tokens("gemini-2.0-flash", 1024, 1024) >= 1_032
    # another OpenAI model: tiles or patches (gpt-4.1-nano's patches x 2.46 here)
    assert 1024 * 2.46 <= image_tokens("gpt-5.4", 1024, 1024) <= 2_700
    assert image_tokens("gpt-4o-mini", 1024, 1024) >= 2833 + 4 * 5667
    # a name that tells no family (an Azure deployment's): the largest of all, 4o-mini's here
    assert image_tokens("prod-vision", 1024, 1024) >= 2833 + 4 * 5667


ONE_MB_IMAGE = "data:image/png;base64," + b64(png(1024, 1024, 1_000_000))
BILLED = {"gpt-4o": 765, "claude-sonnet-4-5": 1_399}  # 1024x1024, as each provider bills it


def inline_request(shape: str) -> tuple[str, dict[str, Any]]:
    data = ONE_MB_IMAGE.split(",", 1)[1]
    anthropic_image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": data}}  # fmt: skip
    text = {"type": "text", "text": "what is in this picture?"}
    if shape == "chat":
        part = {"type": "image_url", "image_url": {"url": ONE_MB_IMAGE}}
        body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": [text, part]}]}
        return "/v1/chat/completions", {**body, "max_tokens": 10}
    if shape == "responses":
        inner = [{"type": "input_text", "text": "what?"},
                 {"type": "input_image", "image_url": ONE_MB_IMAGE}]  # fmt: skip
        body = {"model": "openai/gpt-4o", "input": [{"role": "user", "content": inner}]}
        return "/v1/responses", {**body, "max_output_tokens": 10}
    if shape == "anthropic":
        content = [text, anthropic_image]
    else:  # an image a tool returned
        result = {"type": "tool_result", "tool_use_id": "t1", "content": [anthropic_image]}
        content = [result]
    body = {
        "model": "anthropic/claude-sonnet-4-5",
        "messages": [{"role": "user", "content": content}],
    }
    return "/v1/messages", {**body, "max_tokens": 10}


async def billing_provider(request: Request) -> JSONResponse:
    """Bills each image what its provider does for 1024x1024, the text 20 tokens."""
    body = await request.json()
    raw = json.dumps(body)
    images = raw.count("iVBORw0KGgo")  # the PNG signature in base64
    model = str(body["model"]).split("/")[-1]
    await asyncio.sleep(0.02)  # in flight together
    tokens = 20 + BILLED[model] * images
    if request.url.path == "/v1/chat/completions":
        usage: dict[str, Any] = {"prompt_tokens": tokens, "completion_tokens": 10}
        return JSONResponse({"choices": [{"message": {"content": "a cat"}}], "usage": usage})
    if request.url.path == "/v1/responses":
        usage = {"input_tokens": tokens, "output_tokens": 10, "total_tokens": tokens + 10}
        return JSONResponse({"object": "response", "status": "completed", "usage": usage})
    usage = {"input_tokens": tokens, "output_tokens": 10}
    return JSONResponse({"type": "message", "content": [], "usage": usage})


@pytest.mark.parametrize("shape", ["chat", "responses", "anthropic", "tool_result"])
async def test_inline_images_reserve_what_their_pixels_cost_not_their_bytes(
    make_settings: Settings, tmp_path: Path, shape: str
) -> None:
    """A 1 MB PNG of 1024x1024 is billed 765 tokens by gpt-4o (1,399 by Claude) but was
    reserved ~444k by its bytes ($1.11 on gpt-4o): on a $0.05 budget, one such request at a
    time, the rest 429 `budget_reserved`. Reserving what its pixels can be billed, 10 at once
    are all admitted, and a burst past the limit spends no more than it (overshoot 0)."""
    prices = {
        "openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10},
        "anthropic/claude-sonnet-4-5": {"input_per_mtok": 3, "output_per_mtok": 15},
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": prices}))
    routes = [Route(p, billing_provider, methods=["POST"])
              for p in ("/v1/chat/completions", "/v1/responses", "/v1/messages")]  # fmt: skip
    app = BudgetMiddleware(Starlette(routes=routes), settings=make_settings(pricing_file=path))
    engine = app.engine
    url, body = inline_request(shape)
    content = json.dumps(body).encode()
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        headers = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}

        async def burst(n: int) -> list[int]:
            answers = await asyncio.gather(
                *[http.post(url, content=content, headers=headers) for _ in range(n)]
            )
            return [a.status_code for a in answers]

        first = await burst(10)
        await engine.flush()
        after_first = engine.manager.get_budget(key.budgets[0].id).current_usage
        more = await burst(60)
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    print(
        f"{shape}: 10 at once, {first.count(200)} admitted ({first.count(429)} x 429), "
        f"${after_first:.6f} spent; then 60: {more.count(200)} admitted, ${spent:.6f} of "
        f"${LIMIT} (overshoot ${max(0.0, spent - LIMIT):.6f})"
    )
    assert first == [200] * 10
    assert set(more) <= {200, 429, 402}
    assert spent <= LIMIT + 1e-9  # every reservation holds at least its bill
    assert spent > LIMIT * 0.9  # and the budget is used


async def test_a_small_image_of_many_pixels_reserves_its_pixels(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A 2048x2048 PNG of 200 bytes (a flat colour compresses to little) is billed 765 tokens
    on gpt-4o; by its bytes it was reserved ~150 in all: 60 at once overshot a $0.05 budget.
    Reserving its pixels' bound, none does."""
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", billing_provider, methods=["POST"])]),
        settings=make_settings(pricing_file=pricing_file),
    )
    engine = app.engine
    small = "data:image/png;base64," + b64(png(2048, 2048, 200))
    part = {"type": "image_url", "image_url": {"url": small}}
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": [part]}],
            "max_tokens": 10}  # fmt: skip
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        auth = {"authorization": f"Bearer {key.value}"}
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=body, headers=auth) for _ in range(60)]
        )
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    codes = [a.status_code for a in answers]
    print(f"60 at once: {codes.count(200)} admitted, ${spent:.6f} of ${LIMIT}")
    assert spent <= LIMIT + 1e-9


async def audio_provider(request: Request) -> JSONResponse:
    """gpt-audio answering in speech: all 1,000 of its output tokens are audio ($64/Mtok)."""
    body = await request.json()
    await asyncio.sleep(0.02)  # in flight together
    spoken = body["max_completion_tokens"]
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": spoken,
        "completion_tokens_details": {"audio_tokens": spoken},
    }
    return JSONResponse({"choices": [{"message": {"content": None}}], "usage": usage})


async def twenty_spoken_answers(
    make_settings: Settings, model: str, limit: float
) -> tuple[list[int], float]:
    """20 chats at once asking `model` for 1,000 spoken output tokens, on a key with a `limit`
    budget: their statuses and what the budget spent."""
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", audio_provider, methods=["POST"])]),
        settings=make_settings(),
    )
    engine = app.engine
    body = {
        "model": model,
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_completion_tokens": 1_000,
    }
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": limit}])
        auth = {"authorization": f"Bearer {key.value}"}
        answers = await asyncio.gather(
            *[http.post("/v1/chat/completions", json=body, headers=auth) for _ in range(20)]
        )
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    return [a.status_code for a in answers], spent


async def test_a_spoken_answer_reserves_its_output_at_the_audio_price(
    make_settings: Settings,
) -> None:
    """A chat asking `modalities: ["text", "audio"]` of gpt-audio is billed its output audio at
    $64/Mtok, 6.4 times its text output's $10: reserving 1,000 output tokens at the text price
    ($0.01) let 20 at once spend $1.28 on a $0.20 budget. At the audio price, none overshoots."""
    codes, spent = await twenty_spoken_answers(make_settings, "gpt-audio", limit := 0.20)
    print(f"20 spoken answers at once: {codes.count(200)} admitted, ${spent:.6f} of ${limit}")
    assert set(codes) <= {200, 429}
    assert codes.count(200) >= 3  # one costs ~$0.064
    assert spent <= limit + 1e-9


async def test_a_spoken_answer_of_an_audio_model_without_audio_prices_reserves_audio(
    make_settings: Settings,
) -> None:
    """gpt-4o-audio-preview has only text prices in the catalog ($10/Mtok out); OpenAI bills its
    output audio $80/Mtok. Reserving 1,000 spoken tokens at $0.01 let 20 at once spend $1.60 on
    a $0.20 budget; at its family's audio price ($0.08 each), none overshoots."""
    codes, spent = await twenty_spoken_answers(make_settings, "gpt-4o-audio-preview", limit := 0.20)
    each = (20 * 2.5 + 1_000 * 80) / 1e6  # 20 text tokens in, 1,000 audio out: $0.08005
    print(f"20 spoken gpt-4o-audio-preview answers: {codes.count(200)} admitted, ${spent:.6f}")
    assert set(codes) <= {200, 429}
    assert codes.count(200) >= 2
    assert spent == pytest.approx(codes.count(200) * each)
    assert spent <= limit + 1e-9


PDF = "JVBERi0" + "A" * 8_000  # "%PDF-" and ~6 KB: a compact 10-page text PDF
PAGES_BILLED = 30_000  # its 10 pages, each's text and image, as Claude or OpenAI bill them


def inline_document(shape: str) -> tuple[str, dict[str, Any]]:
    if shape == "anthropic":
        doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                               "data": PDF}}  # fmt: skip
        body = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 10,
                "messages": [{"role": "user", "content": [doc]}]}  # fmt: skip
        return "/v1/messages", body
    data = "data:application/pdf;base64," + PDF
    if shape == "chat":
        part = {"type": "file", "file": {"filename": "a.pdf", "file_data": data}}
        body = {"model": "openai/gpt-4o", "max_tokens": 10,
                "messages": [{"role": "user", "content": [part]}]}  # fmt: skip
        return "/v1/chat/completions", body
    part = {"type": "input_file", "filename": "a.pdf", "file_data": data}
    body = {"model": "openai/gpt-4o", "max_output_tokens": 10,
            "input": [{"role": "user", "content": [part]}]}  # fmt: skip
    return "/v1/responses", body


async def pdf_provider(request: Request) -> JSONResponse:
    """Bills each inline PDF its pages, 30,000 tokens, the text 20."""
    raw = (await request.body()).decode()
    await asyncio.sleep(0.02)  # in flight together
    tokens = 20 + PAGES_BILLED * raw.count("JVBERi0")
    if request.url.path == "/v1/chat/completions":
        usage: dict[str, Any] = {"prompt_tokens": tokens, "completion_tokens": 10}
        return JSONResponse({"choices": [{"message": {"content": "ok"}}], "usage": usage})
    if request.url.path == "/v1/responses":
        usage = {"input_tokens": tokens, "output_tokens": 10, "total_tokens": tokens + 10}
        return JSONResponse({"object": "response", "status": "completed", "usage": usage})
    usage = {"input_tokens": tokens, "output_tokens": 10}
    return JSONResponse({"type": "message", "content": [], "usage": usage})


@pytest.mark.parametrize("shape", ["anthropic", "chat", "responses"])
async def test_an_inline_pdf_reserves_as_a_document_by_reference_does(
    make_settings: Settings, tmp_path: Path, shape: str
) -> None:
    """A PDF is billed by its pages (each one's text and an image of it), which its bytes do not
    bound: 6 KB of PDF reserved ~2,700 tokens, billed 30,000. 20 at once on a $0.50 budget spent
    ~$1.80 (Claude) / $1.50 (gpt-4o). Reserving as a document sent by reference does (the most
    one has been measured to take, all one request can be charged before), none overshoots."""
    prices = {
        "openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10},
        "anthropic/claude-sonnet-4-5": {"input_per_mtok": 3, "output_per_mtok": 15},
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": prices}))
    routes = [Route(p, pdf_provider, methods=["POST"])
              for p in ("/v1/chat/completions", "/v1/responses", "/v1/messages")]  # fmt: skip
    app = BudgetMiddleware(Starlette(routes=routes), settings=make_settings(pricing_file=path))
    engine = app.engine
    url, body = inline_document(shape)
    limit = 0.50
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": limit}])
        auth = {"authorization": f"Bearer {key.value}"}

        async def burst(n: int) -> list[int]:
            answers = await asyncio.gather(
                *[http.post(url, json=body, headers=auth) for _ in range(n)]
            )
            return [a.status_code for a in answers]

        codes = await burst(20) + await burst(20)
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    print(
        f"{shape}: 2 x 20 inline PDFs at once: {codes.count(200)} admitted, "
        f"${spent:.4f} of ${limit}"
    )
    assert set(codes) <= {200, 429, 402}
    assert codes.count(200) >= 3
    assert spent <= limit + 1e-9


async def test_an_unread_spoken_answer_is_charged_its_most_output_as_audio(
    make_settings: Settings,
) -> None:
    """A spoken answer (gpt-audio, `modalities` with audio) that cannot be read (a coding not
    decoded here) is charged the most it could have cost, as its reservation counts it: its
    1,000 output tokens at the audio price ($0.064), not the text price ($0.01)."""

    async def unreadable(request: Request) -> Response:
        await request.body()
        return Response(b"\x1b\x8f\x00 brotli bytes", headers={"content-encoding": "br"})

    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", unreadable, methods=["POST"])]),
        settings=make_settings(),
    )
    engine = app.engine
    body = {
        "model": "gpt-audio",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_completion_tokens": 1_000,
    }
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1.0}])
        auth = {"authorization": f"Bearer {key.value}"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as a:
            async for _ in a.aiter_raw():
                pass
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    print(f"an unread spoken answer of at most 1,000 tokens: ${spent:.6f} charged")
    assert spent >= 1_000 * 64 / 1e6


async def test_a_stream_without_usage_is_charged_its_image_urls_too(
    make_settings: Settings, pricing_file: Path
) -> None:
    """A stream that ends without usage is charged an estimate of its prompt: for a request with
    an image URL, that is what its reservation counted, the image's measured 1,500 tokens
    included, not the ~60 of its body alone (the provider billed the image)."""

    async def upstream(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return await provider(request)  # teaches what an image takes: 1,500 tokens
        chunk = {"choices": [{"index": 0, "delta": {"content": "a cat"}}]}
        text = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"  # ended without its usage
        return Response(text, media_type="text/event-stream")

    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", upstream, methods=["POST"])]),
        settings=make_settings(pricing_file=pricing_file),
    )
    engine = app.engine
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": LIMIT}])
        auth = {"authorization": f"Bearer {key.value}"}
        measured = await http.post("/v1/chat/completions", json=image_chat(), headers=auth)
        assert measured.status_code == 200
        await engine.flush()
        before = engine.manager.get_budget(key.budgets[0].id).current_usage
        body = {**image_chat(), "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as a:
            async for _ in a.aiter_raw():
                pass
        await engine.flush()
        after = engine.manager.get_budget(key.budgets[0].id).current_usage
    charged = after - before
    print(f"a stream with an image URL ended without usage: ${charged:.6f} charged")
    assert charged >= IMAGE_TOKENS * 2.5 / 1e6


def wav(seconds: int, rate: int = 16_000) -> bytes:
    """PCM WAV, mono, 16-bit: `rate` x 2 bytes a second."""
    data = os.urandom(seconds * rate * 2)
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
    fmt += (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    head = (
        b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    )
    return head + fmt + b"data" + len(data).to_bytes(4, "little") + data


async def voice_provider(request: Request) -> JSONResponse:
    """gpt-audio: 10 audio tokens a second of the WAV it heard (its header's length)."""
    body = await request.json()
    part = body["messages"][0]["content"][1]["input_audio"]
    heard = len(base64.b64decode(part["data"])) - 44
    await asyncio.sleep(0.02)  # in flight together
    audio = heard // 32_000 * 10
    usage = {
        "prompt_tokens": 20 + audio,
        "completion_tokens": 10,
        "prompt_tokens_details": {"audio_tokens": audio},
    }
    return JSONResponse({"choices": [{"message": {"content": "hello"}}], "usage": usage})


def test_audio_seconds_reads_a_wav_s_byte_rate() -> None:
    assert audio_seconds(b64(wav(3)), "wav") == 4  # its header counted: a second at most more
    assert audio_seconds(b64(wav(2, rate=8_000)), "wav") == 3
    assert audio_seconds(b64(b"ID3" + os.urandom(3_000)), "mp3") is None  # by its bytes
    assert audio_seconds(b64(os.urandom(100)), "wav") is None


async def test_inline_wav_reserves_its_length_not_its_bytes(make_settings: Settings) -> None:
    """30 s of 16 kHz WAV (960 KB) is billed ~300 audio tokens ($0.0097 on gpt-audio, audio at
    $32/Mtok) but reserved ~427k tokens by its bytes ($1.07): on a $0.30 budget, 1 of 4 at once
    admitted, 3 false 429s. Reserving 64 tokens a second at the audio price ($0.066), all 4 are,
    and 60 more at once spend no more than the limit (at the text price, $0.005 each, they
    would: the audio costs more than that)."""
    app = BudgetMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", voice_provider, methods=["POST"])]),
        settings=make_settings(),
    )
    engine = app.engine
    part = {"type": "input_audio", "input_audio": {"data": b64(wav(30)), "format": "wav"}}
    body = {
        "model": "gpt-audio",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}],
        "max_completion_tokens": 10,
    }
    content = json.dumps(body).encode()
    limit = 0.30
    async with running(app), client(app) as http:
        key = engine.manager.create_virtual_key(name="alice", budgets=[{"max_limit": limit}])
        headers = {"authorization": f"Bearer {key.value}", "content-type": "application/json"}

        async def burst(n: int) -> list[int]:
            answers = await asyncio.gather(
                *[
                    http.post("/v1/chat/completions", content=content, headers=headers)
                    for _ in range(n)
                ]
            )
            return [a.status_code for a in answers]

        first = await burst(4)
        more = await burst(60)
        await engine.flush()
        spent = engine.manager.get_budget(key.budgets[0].id).current_usage
    print(
        f"4 WAVs of 30 s at once: {first.count(200)} admitted; then 60: "
        f"{more.count(200)} admitted, ${spent:.4f} of ${limit}"
    )
    assert first == [200] * 4
    assert spent <= limit + 1e-9


@pytest.mark.parametrize(
    ("model", "size", "quality", "tokens"),
    [
        # OpenAI's tables (gpt-image-1, -1-mini, -1.5: the same tokens, each at its own price)
        ("gpt-image-1", "1024x1024", "high", 4160),
        ("gpt-image-1", "1024x1536", "high", 6240),
        ("gpt-image-1", "1536x1024", "high", 6208),
        ("gpt-image-1-mini", "1024x1024", "low", 272),
        ("gpt-image-1.5", "1536x1024", "medium", 1568),
        ("chatgpt-image-latest", "1024x1536", "low", 408),
        # not given, `auto`, or not known: the largest of the quality, or of all
        ("gpt-image-1", None, None, 6240),
        ("gpt-image-1", "auto", "auto", 6240),
        ("gpt-image-1", "1792x1024", "medium", 1584),
        ("gpt-image-1", 1024, ["high"], 6240),
        # gpt-image-2's sizes, any in 16-pixel steps: OpenAI's cost calculator
        ("gpt-image-2", "1024x1024", "high", 7024),
        ("gpt-image-2", "1536x1024", "high", 5488),
        ("gpt-image-2", "3840x2160", "high", 13342),
        ("gpt-image-2", "1024x1024", "low", 196),
        ("gpt-image-2", "auto", None, 23719),  # 2880x2880, the most pixels
        ("gpt-image-2", "9999x9999", "high", 23719),  # refused upstream: the largest
        ("gpt-image-2.5-flare", None, "high", 23719),
        ("someone/unknown-image-model", "1024x1024", None, 7024),
        # Gemini: one figure a model
        ("gemini-2.5-flash-image", "1024x1024", "low", 1290),
        ("gemini-3-pro-image-preview", None, None, 2520),
    ],
)
def test_drawn_image_tokens_by_size_and_quality(
    model: str, size: object, quality: object, tokens: int
) -> None:
    found = drawn_image_tokens(model, size, quality)
    print(model, size, quality, found)
    assert found == tokens
    assert drawn_image_tokens(model) >= found  # the largest, when not asked
    assert asked_image_tokens(model, size, quality, 2) == tokens + 200
    assert asked_image_tokens(model, size, quality, 9) == tokens + 300  # 3 at most
