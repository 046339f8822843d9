"""The demo: budget-middleware in front of an example app, on the default store: SQLite.

It creates a customer, a team and three virtual keys with small budgets and a rate limit, sends
requests through the real middleware (in process, no network), shows the spend growing, a
rate-limit refusal and a budget refusal with their messages, the alerts raised at 80 % and 100 %
of a budget, a route falling over to its next
target when a provider's budget runs out, and prints a table of budgets.

    bash scripts/demo.sh
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mock_upstream import create_mock_app  # noqa: E402

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine  # noqa: E402

DB_FILE = Path("budget_middleware_demo.db")


def banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 72 - len(text)))


def chat(max_tokens: int = 200) -> dict[str, Any]:
    return {
        "model": "openai/gpt-4o",
        "messages": [{"role": "user", "content": "Write a haiku about budgets."}],
        "max_tokens": max_tokens,
    }


def usd(amount: float | str | None, width: int = 0) -> str:
    """An amount as the demo prints it: dollars to six decimals (a millionth of a dollar),
    rounded half up, whatever precision it came in (the `x-budget-remaining` header writes as
    many decimals as the amount needs, `0.050000` beside `0.047962500`)."""
    if amount is None:
        return "-".rjust(width + 1)
    value = Decimal(str(amount)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    return "$" + f"{value}".rjust(width)


def show(response: httpx.Response) -> None:
    headers = response.headers
    if response.status_code == 200:
        usage = response.json()["usage"]
        print(
            f"  200 ok   tokens in/out {usage['prompt_tokens']:>3}/{usage['completion_tokens']:<4}"
            f" budget remaining before: {usd(headers.get('x-budget-remaining')):<10}"
            f" requests left: {headers.get('x-ratelimit-remaining-requests', '-')}"
        )
    else:
        error = response.json()["error"]
        retry = headers.get("retry-after")
        extra = f" (Retry-After: {retry}s)" if retry else ""
        print(f"  {response.status_code} {error['code']}: {error['message']}{extra}")


def fresh_store() -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DB_FILE}{suffix}").unlink(missing_ok=True)


async def main() -> None:
    # The default store is SQLite; the demo uses its own file so it starts afresh every run.
    settings = BudgetSettings(database_url=f"sqlite:///./{DB_FILE}", pricing_file=None)
    engine = get_engine(settings)
    app = create_mock_app()
    alerts: list[str] = []

    def on_alert(alert: dict[str, Any]) -> None:  # called off the request path (SPEC §14)
        alerts.append(alert["text"])

    app.add_middleware(BudgetMiddleware, settings=settings, on_alert=on_alert)
    await engine.ensure_started()
    manager = engine.manager

    banner("1. Keys, teams and customers (Python management API)")
    acme = manager.create_customer(
        name="acme", budgets=[{"max_limit": 5.00, "reset_duration": "1M", "calendar_aligned": True}]
    )
    research = manager.create_team(
        name="research",
        customer_id=acme.id,
        budgets=[{"max_limit": 0.05, "reset_duration": "1d", "calendar_aligned": True}],
    )
    alice = manager.create_virtual_key(
        name="alice",
        team_id=research.id,
        rate_limit={"request_max_limit": 3, "request_reset_duration": "1m"},
    )
    bob = manager.create_virtual_key(
        name="bob",
        team_id=research.id,
        budgets=[{"max_limit": 0.01, "reset_duration": "1h"}],
    )
    await engine.invalidate()
    print("  customer acme ($5.00 a month) > team research ($0.05 a day)")
    print(f"  key alice: 3 requests a minute   value {alice.value[:12]}… (shown once)")
    print(f"  key bob:   $0.01 an hour          value {bob.value[:12]}… (shown once)")

    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as http:

        async def send(key: str, max_tokens: int = 200) -> httpx.Response:
            return await http.post(
                "/v1/chat/completions",
                json=chat(max_tokens),
                headers={"Authorization": f"Bearer {key}"},
            )

        banner("2. Requests are metered (gpt-4o at catalog prices)")
        for _ in range(3):
            show(await send(alice.value or ""))

        banner("3. alice's rate limit (3 a minute) refuses the 4th request")
        show(await send(alice.value or ""))

        banner("4. bob spends until his $0.01 budget is gone; alerts at 80 % and 100 %")
        for _ in range(6):
            response = await send(bob.value or "", max_tokens=400)
            show(response)
            # The alert task raises alerts within a moment; the demo waits for them, to print
            # each one after the request that crossed its threshold.
            await engine.alerts.raise_queued()
            engine.hooks.drain()
            while alerts:
                print(f"  ALERT {alerts.pop(0)}")
            if response.status_code == 402:
                break

        banner("5. An unknown key")
        show(await send("sk-bm-not-a-key"))

        banner("6. A route falls over when a provider's budget runs out (SPEC §12)")
        manager.put_provider("openai", budgets=[{"max_limit": 0.012, "reset_duration": "1d"}])
        manager.create_route(
            name="gpt-4o", targets=["openai/gpt-4o", "azure/gpt-4o", "anthropic/claude-sonnet-4"]
        )
        carol = manager.create_virtual_key(name="carol")
        await engine.invalidate()
        print("  route gpt-4o -> openai/gpt-4o, azure/gpt-4o, anthropic/claude-sonnet-4")
        print("  provider openai: $0.012 a day; carol asks for model 'gpt-4o'")
        for _ in range(5):
            body = {**chat(400), "model": "gpt-4o"}
            headers = {"Authorization": f"Bearer {carol.value}"}
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            print(
                f"  {response.status_code} routed to {response.headers['x-budget-route']:<26}"
                f" the app saw model {response.json()['model']!r}"
            )
        await engine.flush()

    banner("7. Budgets (from the store, after the flush)")
    print(f"  {'owner':<28} {'limit':>9} {'spent':>9} {'remaining':>9}  window")
    for budget in manager.list_budgets():
        print(
            f"  {budget.user_path:<28} {usd(budget.max_limit, 8)} {usd(budget.current_usage, 8)}"
            f" {usd(budget.remaining, 8)}  {budget.reset_duration} ({budget.period_label})"
        )
    records = manager.usage(group_by="virtual_key")
    banner("8. Spend by key")
    for row in records.usage:
        print(
            f"  {row.name or row.key or '-':<12} requests {row.requests:>3}"
            f"  tokens {row.input_tokens:>4} in {row.output_tokens:>5} out  spend {usd(row.cost)}"
        )
    await engine.shutdown()
    store = f"BUDGET_DATABASE_URL=sqlite:///./{DB_FILE}"
    print(f"\nThe store is ./{DB_FILE}; run the demo again to start afresh. Look at it")
    print(f"  from a shell:   {store} .venv/bin/budget-middleware usage --by model")
    print(f"  in a browser:   {store} BUDGET_ADMIN_KEY=admin-secret \\")
    print("                    .venv/bin/uvicorn examples.app:app --port 8000")
    print("                  then open http://127.0.0.1:8000/budget-admin/ui (key: admin-secret)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    fresh_store()
    asyncio.run(main())
