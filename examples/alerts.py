"""Alerts arriving at a webhook receiver (SPEC §14), all on this machine.

A small receiver listens on 127.0.0.1; the middleware is configured to post alerts to it, signed
with a secret. A key with a $0.01 budget spends it; the receiver prints each alert as it arrives
and checks its signature. Then shadow mode: the same spending with nothing refused, and what
would have been refused said on each answer.

    python examples/alerts.py
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mock_upstream import create_mock_app  # noqa: E402

from budget_middleware import BudgetMiddleware, BudgetSettings, get_engine  # noqa: E402

SECRET = "whsec-example"
arrived = threading.Event()


class Receiver(BaseHTTPRequestHandler):
    """What your alert endpoint does: check the signature, then act on the alert."""

    def do_POST(self) -> None:  # http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        good = hmac.compare_digest(self.headers.get("x-budget-signature", ""), expected)
        alert = json.loads(body)
        print(f"  receiver got {alert['type']:<17} signature {'ok' if good else 'BAD'}: "
              f"{alert['text']}")  # fmt: skip
        self.send_response(204 if good else 401)
        self.end_headers()
        arrived.set()

    def log_message(self, *args: object) -> None:
        pass


async def spend(app: object, key: str, n: int) -> None:
    transport = httpx.ASGITransport(app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        for _ in range(n):
            answer = await http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "max_tokens": 400,
                      "messages": [{"role": "user", "content": "Tell me about budgets."}]},
                headers={"authorization": f"Bearer {key}"},
            )  # fmt: skip
            shadow = answer.headers.get("x-budget-shadow-refusal")
            print(f"  {answer.status_code}" + (f"  (would refuse: {shadow})" if shadow else ""))
            await asyncio.sleep(0.3)  # time for an alert to arrive before the next request


async def run(mode: str, folder: str, url: str) -> None:
    settings = BudgetSettings(
        database_url=f"sqlite:///{folder}/{mode}.db",
        alert_webhook_urls=url,
        alert_secret=SECRET,
        mode=mode,
    )
    engine = get_engine(settings)
    app = create_mock_app()
    app.add_middleware(BudgetMiddleware, settings=settings)
    await engine.ensure_started()
    key = engine.manager.create_virtual_key(
        name="alice", budgets=[{"max_limit": 0.01, "reset_duration": "1d"}]
    )
    await spend(app, key.value or "", 5)
    await engine.flush()
    alerts = engine.manager.list_alerts()
    print(f"  GET /alerts: {[(a['type'], a['threshold'], a['delivery']) for a in alerts]}")
    await engine.shutdown()


async def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/budget-alerts"
    with tempfile.TemporaryDirectory() as folder:
        print(f"== Alerts posted to {url}, signed (BUDGET_ALERT_SECRET)")
        await run("enforce", folder, url)
        print("\n== Shadow mode (BUDGET_MODE=shadow): nothing refused, the same alerts")
        await run("shadow", folder, url)
    server.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    asyncio.run(main())
