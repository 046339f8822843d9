"""A FastAPI app whose own route calls OpenAI through the SDK, metered per caller (SPEC §13).

`/summarize` is not an inference path: the app calls the provider itself. `BudgetTransport` in
the SDK's HTTP client meters that call like an inbound one and charges it to the virtual key of
the request being served (`BudgetMiddleware` notes who is calling on every path). The provider
here is the example mock upstream, reached in process (no network); in a real app leave out
`transport=` and `base_url=`.

    python examples/summarize.py          # alice and bob summarise until alice's budget is gone
    uvicorn examples.summarize:app        # or serve it
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
from fastapi import FastAPI
from fastapi.responses import JSONResponse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mock_upstream import create_mock_app  # noqa: E402

from budget_middleware import (  # noqa: E402
    BudgetMiddleware,
    BudgetSettings,
    BudgetTransport,
    get_engine,
)

STORE = Path(tempfile.gettempdir()) / "budget_middleware_summarize.db"
settings = BudgetSettings(database_url=f"sqlite:///{STORE}", pricing_file=None)
provider = httpx2.ASGITransport(create_mock_app())  # stands in for api.openai.com
llm = openai.AsyncOpenAI(
    api_key="sk-your-openai-key",
    base_url="https://api.openai.com/v1",
    http_client=httpx2.AsyncClient(transport=BudgetTransport(provider, settings)),
)

app = FastAPI()
app.add_middleware(BudgetMiddleware, settings=settings)


@app.post("/summarize")
async def summarize(body: dict[str, str]) -> Any:
    try:
        answer = await llm.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": f"Summarise: {body['text']}"}],
            max_tokens=300,
        )
    except openai.APIStatusError as exc:  # refused by a budget or a rate limit: never sent
        return JSONResponse({"error": exc.body}, status_code=exc.status_code)  # §8's error
    return {"summary": answer.choices[0].message.content}


async def main() -> None:
    engine = get_engine(settings)
    await engine.ensure_started()
    m = engine.manager
    alice = m.create_virtual_key(
        name="alice", budgets=[{"max_limit": 0.01, "reset_duration": "1d"}]
    )
    bob = m.create_virtual_key(name="bob")
    print("alice: $0.01 a day; bob: no budget")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as http:
        for n in range(1, 6):
            for name, key in (("alice", alice.value), ("bob", bob.value)):
                answer = await http.post(
                    "/summarize",
                    json={"text": "the quarterly budget review"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                shown = "ok" if answer.status_code == 200 else answer.json()["error"]
                print(f"  call {n} {name:<5} {answer.status_code} {shown}")
    await engine.flush()
    print("spend by caller (the app's own calls to OpenAI):")
    for row in m.usage(group_by="virtual_key").usage:
        print(f"  {row.name:<5} requests {row.requests}  ${row.cost:.6f}")
    await engine.shutdown()


if __name__ == "__main__":
    for suffix in ("", "-wal", "-shm"):
        Path(f"{STORE}{suffix}").unlink(missing_ok=True)
    asyncio.run(main())
