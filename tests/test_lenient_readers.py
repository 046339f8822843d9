"""Bodies read as a lenient reader reads them: the host app's lax pydantic model (a
`background: "true"` it sends on as `true`) and a lenient upstream's JSON parser (Go's
encoding/json: a byte that is no UTF-8 read as U+FFFD, what follows the first value left
unread). What such a reader serves is charged (SPEC §7; README: a body the middleware could not
read would otherwise be served the model it names for free)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.engine.engine import get_engine
from support import client, running

Settings = Callable[..., BudgetSettings]


@pytest.fixture
def priced(tmp_path: Path) -> Path:
    """gpt-4o at $1 per million tokens in and out: 1,000 tokens cost $0.001."""
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"models": {"openai/gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 1}}})
    )
    return path


def spent(engine: Any, budget_id: str) -> int:
    counter = engine.registry.windows["budget"].get(budget_id)
    return 0 if counter is None else int(counter.value)


class ResponsesRequest(BaseModel):
    """The Responses API request as a host app declares it: FastAPI reads it in pydantic's lax
    mode, where `"true"`, `"1"`, `1`, `"yes"` and `"on"` are the boolean True that the app
    then sends on (`client.responses.create(..., background=request.background)`)."""

    model: str
    input: str
    max_output_tokens: int | None = None
    background: bool = False


def lax_responses_app(settings: BudgetSettings) -> FastAPI:
    app = FastAPI()
    made: dict[str, ResponsesRequest] = {}

    def response(rid: str, request: ResponsesRequest, done: bool) -> dict[str, Any]:
        output = request.max_output_tokens or 4096
        usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 10 + output}  # fmt: skip
        text = [{"type": "message", "content": [{"type": "output_text", "text": "word"}]}]
        return {"id": rid, "object": "response", "status": "completed" if done else "queued",
                "model": request.model, "output": text if done else [],
                "usage": usage if done else None}  # fmt: skip

    @app.post("/v1/responses")
    async def create(request: ResponsesRequest) -> dict[str, Any]:
        rid = f"resp_{len(made)}"
        made[rid] = request
        return response(rid, request, not request.background)  # queued: answered at once

    @app.get("/v1/responses/{rid}")
    async def fetch(rid: str) -> dict[str, Any]:
        return response(rid, made[rid], True)

    app.add_middleware(BudgetMiddleware, settings=settings)
    return app


@pytest.mark.parametrize("spelled", ["true", 1, "1", "on"], ids=["str", "int", "str-1", "on"])
async def test_a_background_flag_the_app_reads_leniently_is_charged_what_it_makes(
    make_settings: Settings, priced: Path, spelled: Any
) -> None:
    """README: "A Responses API request with `background: true` is answered at once, queued
    and without usage ... such an answer without usage is charged the request's most output".
    `background: "true"` (or 1, "1", "on"), which the app's pydantic model reads as True and
    sends on as such, is queued the same and makes the same 100,000 output tokens, fetched by
    an unmetered GET: it must be charged the same, as the lax `max_tokens: "20000"` is
    reserved as the app reads it (tests/test_adversary.py)."""
    settings = make_settings(pricing_file=priced)
    app = lax_responses_app(settings)
    engine = get_engine(settings)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        body = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 100_000,
                "background": spelled}  # fmt: skip
        async with client(app) as http:
            queued = await http.post(
                "/v1/responses", json=body, headers={"x-budget-key": key.value}
            )
            assert queued.status_code == 200 and queued.json()["status"] == "queued"
            done = await http.get(f"/v1/responses/{queued.json()['id']}")
        usage = done.json()["usage"]
        served = (usage["input_tokens"] + usage["output_tokens"]) * 1000
        charged = spent(engine, key.budgets[0].id)
        print(f"background={spelled!r}: served {served} nUSD, charged {charged} nUSD")
        assert charged >= served - 100 * 1000  # its most output, beside a prompt's estimate


LENIENT_BODIES = {
    # Go's encoding/json reads a byte that is no UTF-8 as U+FFFD, silently
    "byte 0xff": b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi \xff"}],'
    b' "max_tokens": 1000}',
    # Go's `json.NewDecoder(r.Body).Decode(&req)`, the usual way a Go server reads a request,
    # reads the first value and leaves what follows it unread (Python's `raw_decode` too)
    "trailing bytes": b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],'
    b' "max_tokens": 1000} x',
}


@pytest.mark.parametrize("name", list(LENIENT_BODIES))
async def test_a_body_a_lenient_parser_reads_is_not_served_free(
    make_settings: Settings, priced: Path, name: str
) -> None:
    """A pass-through host sends the bytes on to a server whose JSON parser reads invalid UTF-8
    inside a string as U+FFFD (Go's encoding/json does so silently: Bifrost, GoModel and most Go
    gateways; so does any server that decodes with errors="replace"). One byte 0xFF in the
    prompt made the body no JSON to the middleware alone, which metered it as model `unknown`,
    unpriced, and charged $0 for 1,000 output tokens of gpt-4o. README: a body that cannot be
    read "cannot be metered (a host passing the bytes on could otherwise be served the model it
    names for free)" -- the same reason `request_too_deep` and `undecodable_body` are refused."""
    served: list[int] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def proxy(request: Request) -> dict[str, Any]:
        raw = await request.body()
        # as a lenient provider reads it
        data, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8", "replace"))
        served.append(data["max_tokens"])
        usage = {"prompt_tokens": 10, "completion_tokens": data["max_tokens"],
                 "total_tokens": 10 + data["max_tokens"]}  # fmt: skip
        return {"id": "c", "object": "chat.completion", "created": 0, "model": data["model"],
                "choices": [], "usage": usage}  # fmt: skip

    settings = make_settings(pricing_file=priced)
    app.add_middleware(BudgetMiddleware, settings=settings)
    engine = get_engine(settings)
    async with running(app):
        key = engine.manager.create_virtual_key(
            name="k", budgets=[{"max_limit": 1, "reset_duration": "1d"}]
        )
        await engine.invalidate()
        body = LENIENT_BODIES[name]
        async with client(app) as http:
            answer = await http.post(
                "/v1/chat/completions",
                content=body,
                headers={"x-budget-key": key.value, "content-type": "application/json"},
            )
        charged = spent(engine, key.budgets[0].id)
        cost = (10 + sum(served)) * 1000
        print(
            f"{name}: status {answer.status_code}, served {served}: {cost} nUSD, "
            f"charged {charged} nUSD"
        )
        assert answer.status_code == 200 and served == [1000]
        assert charged == cost  # what the lenient upstream served, as gpt-4o
