"""A FastAPI gateway routing `gpt-4o` across OpenAI, Azure and Anthropic, each with its budget.

Clients ask for `model: "gpt-4o"`; the middleware admits each request on the first provider whose
budget still has room, rewrites the body's `model` to that target (`azure/gpt-4o`), and says which
in `x-budget-route`. When all three are spent, the client gets one 402 listing every target.
The providers here are the example mock upstream (no network); in a real gateway the route
handler would call the provider the rewritten `model` names.

    python examples/gateway.py              # sends requests until every budget is spent
    uvicorn examples.gateway:app --port 8000   # or serve it
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mock_upstream import create_mock_app  # noqa: E402

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine  # noqa: E402

STORE = Path(tempfile.gettempdir()) / "budget_middleware_gateway.db"
settings = BudgetSettings(
    database_url=f"sqlite:///{STORE}", config_file=HERE / "gateway.yaml", pricing_file=None
)
app = create_mock_app()  # the host app: its /v1/chat/completions stands in for the providers
app.add_middleware(BudgetMiddleware, settings=settings)


async def main() -> None:
    engine = get_engine(settings)
    await engine.ensure_started()  # applies gateway.yaml (as the app's start-up would)
    request = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Summarise our budget policy."}],
        "max_tokens": 500,
    }
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        for n in range(1, 30):
            answer = await http.post("/v1/chat/completions", json=request)
            if answer.status_code != 200:
                error = answer.json()["error"]
                codes = ", ".join(f"{t['target']}: {t['code']}" for t in error["targets"])
                print(f"{n:>3}  {answer.status_code} {error['code']} ({codes})")
                break
            print(
                f"{n:>3}  200 via {answer.headers['x-budget-route']:<26}"
                f" provider budget left before: ${answer.headers['x-budget-remaining']}"
            )
    await engine.shutdown()


def _forget_store() -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{STORE}{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    _forget_store()
    asyncio.run(main())
    _forget_store()  # its spent budgets are not left to `uvicorn examples.gateway:app` (402s)
