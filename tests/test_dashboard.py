"""The dashboard (SPEC §16): `GET /ui` and its assets, and the page at work in a real browser.

The unit tests ask the admin app through ASGI: the page and its assets need no admin key, carry
the right types and headers, and hold no data. The browser test serves `examples/app.py` (the
mock LLM service with the middleware, and the admin API at `/budget-admin`) under uvicorn on a
fresh SQLite store seeded with a fortnight of usage, sends it live traffic, and drives Debian's
chromium through the page: sign in, read the budgets and the chart, create a key, change a limit,
reset a budget. `BUDGET_TEST_SCREENSHOT=1` has it write docs/dashboard.png anew.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from budget_middleware import BudgetSettings, create_admin_app, get_engine
from budget_middleware.admin.dashboard import ASSETS, CSP
from budget_middleware.core.money import nanos_from_usd
from budget_middleware.store.tables import UsageRecordRow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "dashboard.png"
ADMIN_KEY = "dashboard-admin-secret"
MOUNT = "/budget-admin"  # where examples/app.py mounts the admin API
IN_CI = os.environ.get("CI") == "true"


# -- the page and its assets, through ASGI ------------------------------------------------------


def _settings(tmp_path: Path) -> BudgetSettings:
    return BudgetSettings(database_url=f"sqlite:///{tmp_path}/ui.db", admin_key=ADMIN_KEY)


async def _get(tmp_path: Path, *paths: str, **headers: str) -> list[httpx.Response]:
    app = create_admin_app(_settings(tmp_path))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.get(path, headers=headers) for path in paths]


async def test_the_page_is_served_without_an_admin_key(tmp_path: Path) -> None:
    (page,) = await _get(tmp_path, "/ui")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "connect-src 'self'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-cache"
    assert "<title>Budgets · budget-middleware</title>" in page.text
    # Nothing from elsewhere: every asset is one of the package's, named with its digest.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(re.fullmatch(r"ui/[a-z]+\.(css|js|svg)\?v=[0-9a-f]{20}", r) for r in refs)
    assert "http://" not in page.text and "https://" not in page.text


async def test_the_page_holds_no_data(tmp_path: Path) -> None:
    """Budgets, keys and usage come from the admin API, with the admin key: never in the page."""
    manager = get_engine(_settings(tmp_path)).manager
    team = manager.create_team(name="secret-team", budgets=[{"max_limit": 12.34}])
    key = manager.create_virtual_key(name="secret-key", team_id=team.id)
    assert key.value
    page, script, budgets = await _get(tmp_path, "/ui", "/ui/dashboard.js", "/budgets")
    assert budgets.status_code == 401  # the data needs the admin key; the page does not
    for answer in (page, script):
        assert answer.status_code == 200
        for secret in ("secret-team", "secret-key", team.id, key.id, key.value, "12.34", ADMIN_KEY):
            assert secret not in answer.text


async def test_each_asset_is_served_with_its_type(tmp_path: Path) -> None:
    answers = await _get(tmp_path, *(f"/ui/{name}" for name in ASSETS))
    for (name, media_type), answer in zip(ASSETS.items(), answers, strict=True):
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == media_type
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-cache"  # asked for without its digest
        assert answer.content  # shipped in the package
    assert "sessionStorage" in answers[1].text and "localStorage" not in answers[1].text


async def test_an_asset_asked_for_with_its_digest_is_cached_for_good(tmp_path: Path) -> None:
    (page,) = await _get(tmp_path, "/ui")
    ref = re.search(r'src="(ui/dashboard\.js\?v=[0-9a-f]+)"', page.text)
    assert ref is not None
    current, stale = await _get(tmp_path, "/" + ref.group(1), "/ui/dashboard.js?v=0123")
    assert current.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert stale.headers["cache-control"] == "no-cache"
    (again,) = await _get(tmp_path, "/ui", **{"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


async def test_unknown_assets_are_404(tmp_path: Path) -> None:
    names = ["/ui/index.html", "/ui/nope.js", "/ui/../app.py", "/ui/static/dashboard.js",
             "/ui/dashboard.js/x", "/ui/__init__.py", "/ui2"]  # fmt: skip
    for answer, name in zip(await _get(tmp_path, *names), names, strict=True):
        assert answer.status_code == 404, name
        assert answer.json()["error"]["code"] == "route_not_found"
    (slash,) = await _get(tmp_path, "/ui/")
    assert slash.status_code == 307 and slash.headers["location"].endswith("/ui")


async def test_mounted_under_a_prefix_the_page_finds_its_assets(tmp_path: Path) -> None:
    """The page names its assets and the API relative to itself: any mount point works."""
    host = Starlette(routes=[Mount("/budget-admin", create_admin_app(_settings(tmp_path)))])
    transport = httpx.ASGITransport(host)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        page = await client.get("/budget-admin/ui")
        assert page.status_code == 200
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert (await client.get("/budget-admin/" + ref)).status_code == 200, ref
        slash = await client.get("/budget-admin/ui/")
        assert slash.status_code == 307
        assert slash.headers["location"] == "http://test/budget-admin/ui"


async def test_the_page_answers_head_and_refuses_other_methods(tmp_path: Path) -> None:
    app = create_admin_app(_settings(tmp_path))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        head = await client.head("/ui")
        assert head.status_code == 200 and head.content == b""
        posted = await client.post("/ui", json={})
        assert posted.status_code == 405
        assert "GET" in posted.headers["allow"]


# -- a served app with a fortnight of usage ------------------------------------------------------

# name, team, daily budget (USD; None: none), model, share of the past spend, and today's traffic:
# requests and output tokens each. support-bot's budget is soft (it goes over), bob's runs out.
KEYS: list[tuple[str, str, float | None, str, float, int, int]] = [
    ("alice", "research", 4.0, "gpt-4o", 0.26, 8, 12000),
    ("bob", "research", 0.40, "claude-sonnet-4-5", 0.08, 6, 8000),
    ("checkout-svc", "product", 0.12, "gpt-4o-mini", 0.18, 10, 16000),
    ("search-api", "product", 5.0, "gpt-4.1", 0.22, 8, 10000),
    ("support-bot", "support", 0.25, "claude-3-5-haiku-latest", 0.16, 8, 10000),
    ("nightly-batch", "product", None, "gpt-4o", 0.10, 5, 16000),
]
TEAMS = {"research": ("acme", 2.5), "product": ("acme", 4.0), "support": ("globex", 1.0)}
CUSTOMERS = {"acme": 400.0, "globex": 150.0}
SOFT = {"support-bot"}  # alerts, never refuses
OPENAI_POLICY = {
    "provider": "openai",
    "budgets": [{"max_limit": 2.0, "reset_duration": "1d"}],
    "rate_limit": {"request_max_limit": 1000, "request_reset_duration": "1m"},
}


@dataclass
class Served:
    url: str
    tmp_path: Path
    keys: dict[str, str] = field(default_factory=dict)  # name -> value
    key_ids: dict[str, str] = field(default_factory=dict)
    budgets: dict[str, str] = field(default_factory=dict)  # key name -> its budget's id

    @property
    def admin(self) -> str:
        return self.url + MOUNT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(url: str, served: Served) -> None:
    """Customers, teams, keys and budgets, and 13 days of usage records before today's."""
    engine = get_engine(BudgetSettings(database_url=url, admin_key=ADMIN_KEY))
    m = engine.manager
    monthly = {"reset_duration": "1M", "calendar_aligned": True}
    customers = {n: m.create_customer(name=n, budgets=[{"max_limit": amount, **monthly}]).id
                 for n, amount in CUSTOMERS.items()}  # fmt: skip
    teams = {name: m.create_team(name=name, customer_id=customers[customer],
                                 budgets=[{"max_limit": amount, "reset_duration": "1d"}])
             for name, (customer, amount) in TEAMS.items()}  # fmt: skip
    for name, team, daily, *_ in KEYS:
        budget = {"max_limit": daily, "reset_duration": "1d", "soft": name in SOFT}
        budgets = [budget] if daily is not None else []
        policies = [] if budgets else [OPENAI_POLICY]  # the key without a budget has a policy
        key = m.create_virtual_key(
            name=name, team_id=teams[team].id, budgets=budgets, provider_configs=policies
        )
        assert key.value is not None
        served.keys[name], served.key_ids[name] = key.value, key.id
        if budgets:
            served.budgets[name] = key.budgets[0].id
    m.put_provider("openai", budgets=[{"max_limit": 250.0, **monthly}])
    m.create_model_config(
        model_name="gpt-4o", budgets=[{"max_limit": 60.0, "reset_duration": "1w"}]
    )
    rng = random.Random(16)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = []
    for back in range(13, 0, -1):
        weekday = (today - timedelta(back)).weekday() < 5
        day_total = 3.0 + 2.5 * rng.random() + (2.0 if weekday else 0.0)  # USD
        for name, team, _daily, model, share, *_ in KEYS:
            provider = "anthropic" if model.startswith("claude") else "openai"
            for _ in range(rng.randint(2, 5)):
                cost = day_total * share / 3.5 * (0.6 + 0.8 * rng.random())
                at = today - timedelta(days=back) + timedelta(seconds=rng.randint(0, 86399))
                row = UsageRecordRow(
                    request_id=uuid.uuid4().hex,
                    created_at=at,
                    virtual_key_id=served.key_ids[name],
                    team_id=teams[team].id,
                    customer_id=teams[team].customer_id,
                    provider=provider,
                    model=model,
                    input_tokens=rng.randint(800, 6000),
                    output_tokens=rng.randint(200, 2500),
                    cost_nanos=nanos_from_usd(cost),
                    cost=cost,
                    cost_source="catalog",
                    status=200,
                )
                rows.append(row)
    with engine.store.session() as s:
        s.add_all(rows)
        s.commit()
    engine.store.dispose()


def _chat(model: str, tokens: int) -> dict[str, Any]:
    prompt = "Summarise the quarterly budget review for the platform team. " * 60
    return {"model": model, "max_tokens": tokens, "messages": [{"role": "user", "content": prompt}]}


def _traffic(served: Served) -> int:
    """Today's requests, through the middleware; bob runs out of budget and is refused."""
    admitted = 0
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for name, _team, _daily, model, _share, requests, tokens in KEYS:
            auth = {"Authorization": f"Bearer {served.keys[name]}"}
            statuses = [
                http.post("/v1/chat/completions", json=_chat(model, tokens), headers=auth)
                for _ in range(requests)
            ]
            codes = [answer.status_code for answer in statuses]
            assert set(codes) == ({200, 402} if name == "bob" else {200}), (name, codes)
            admitted += codes.count(200)
    return admitted


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(url + MOUNT + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not come up within 30 s")


def _stored_requests(served: Served) -> int:
    """The usage records the store holds (`/usage` reads the store)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    answer = httpx.get(served.admin + "/usage?group_by=day", headers=headers).json()
    return int(answer["total"]["requests"])


def _wait_for_the_flush(served: Served, expected: int) -> None:
    """Until the store holds `expected` usage records: the seeded ones and one for every
    request admitted since. (Two equal reads 0.2 s apart, as it was, also came when a loaded
    machine's flusher had not run between them.)"""
    stored = None
    for _ in range(300):
        stored = _stored_requests(served)
        if stored == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{stored} usage records stored of {expected} after 30 s")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    _need_chromium()
    url = f"sqlite:///{tmp_path}/dashboard.db"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env |= {"BUDGET_DATABASE_URL": url, "BUDGET_ADMIN_KEY": ADMIN_KEY,
            "BUDGET_FLUSH_INTERVAL_SECONDS": "0.1", "BUDGET_CACHE_TTL_SECONDS": "0.5"}  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "examples"),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    server = Served(f"http://127.0.0.1:{port}", tmp_path)
    _seed(url, server)  # before the server starts: one process creates the schema
    process = subprocess.Popen(command, env=env)
    try:
        _wait_until_up(server.url, process)
        seeded = _stored_requests(server)
        _wait_for_the_flush(server, seeded + _traffic(server))
        yield server
    finally:
        process.terminate()
        process.wait(15)


# -- the page in a browser -----------------------------------------------------------------------


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium")
        pytest.skip(f"the browser test drives Debian's chromium, and {CHROMIUM} is missing")


def usd(value: float) -> str:
    """As the page writes an amount: Intl.NumberFormat en-US, 4 decimals (as the CLI),
    trailing zeros past the second left out; under a cent, as charged, to the nano-dollar
    (never $0.00 for an amount that is not 0)."""
    size = abs(value)
    sign = "-" if value < 0 else ""
    if 0 < size < 0.01:
        return f"{sign}${size:.9f}".rstrip("0")
    digits = 2 if size == 0 else 4
    whole, fraction = f"{size:,.{digits}f}".split(".")
    return sign + f"${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _admin_get(served: Served, path: str) -> Any:
    answer = httpx.get(served.admin + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _budget(served: Served, key: str) -> dict[str, Any]:
    """A key's budget as the admin API has it now (live counters)."""
    query = f"/budgets?from_memory=true&owner_type=virtual_key&owner_id={served.key_ids[key]}"
    found: dict[str, Any] = _admin_get(served, query)["budgets"][0]
    return found


def test_an_operator_works_the_dashboard_in_a_browser(served: Served) -> None:
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    count = _admin_get(served, "/budgets")["count"]
    alice = _budget(served, "alice")
    assert alice["spent"] > 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: _console(msg, problems))
            page.on("response", lambda answer: _response(answer, problems))
            page.set_default_timeout(10_000)

            # Asked for the admin key once; a wrong key is refused and asked for again.
            page.goto(served.admin + "/ui")
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#app")).to_be_hidden()
            page.fill("#admin-key", "not-the-key")
            page.click("#login-form button[type=submit]")
            expect(page.locator("#login-error")).to_contain_text("BUDGET_ADMIN_KEY")
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#app")).to_be_visible()

            # Every budget is a bar, with its spend, limit and period end; soft ones marked.
            row = page.locator(f'li.budget[data-id="{alice["id"]}"]')
            expect(row.locator('[data-field="spent"]')).to_have_text(usd(alice["spent"]))
            expect(row.locator('[data-field="limit"]')).to_have_text(usd(alice["amount"]))
            expect(row).to_contain_text("/acme/research/alice")
            expect(row).to_contain_text("resets in")
            expect(page.locator("li.budget")).to_have_count(count)
            soft = page.locator(f'li.budget[data-id="{served.budgets["support-bot"]}"]')
            expect(soft.locator('[data-field="soft"]')).to_have_text("soft")
            expect(soft.locator('[data-field="over"]')).to_have_text("over")  # and not refused
            assert page.locator('li.budget [data-field="soft"]').count() == 1
            bob = page.locator(f'li.budget[data-id="{served.budgets["bob"]}"]')
            expect(bob.locator('[data-field="over"]')).to_have_text("exhausted")

            # The chart: a stacked bar a day, by model, with today's traffic in it.
            segments = page.locator("#chart svg rect.seg")
            expect(segments.first).to_be_visible()
            assert segments.count() > 14
            assert page.locator(f'#chart rect.seg[data-day="{_day(0)}"]').count() >= 1
            expect(page.locator("#legend")).to_contain_text("claude-sonnet-4-5")
            page.select_option("#chart-group", "team")
            expect(page.locator("#legend")).to_contain_text("research")
            assert page.locator("#top-keys tbody tr").count() == len(KEYS)
            expect(page.locator("#top-keys tbody tr").first).to_contain_text("alice")
            spent_14 = _admin_get(served, f"/usage?group_by=day&start={_day(-13)}&end={_day(1)}")
            expect(page.locator("#tile-spend")).to_have_text(usd(spent_14["total"]["cost"]))
            for box, route in (("#refusals", "/refusals"), ("#alerts", "/alerts")):
                _check_optional(page, served, box, route)
            page.select_option("#chart-group", "model")
            expect(page.locator("#legend")).to_contain_text("gpt-4o")

            # A request in flight: its reservation shows on the bar, and is gone when it ends.
            busy = page.locator(f'li.budget[data-id="{served.budgets["checkout-svc"]}"]')
            with _slow_request(served, "checkout-svc", "gpt-4o-mini") as reserved:
                page.click("#refresh")
                held = busy.locator('[data-field="reserved"]')
                expect(held).to_have_text(f" + {usd(reserved)} reserved")
                page.mouse.move(0, 0)
                page.screenshot(path=str(_screenshot_path(served)))
            checkout = _budget(served, "checkout-svc")
            assert checkout["reserved"] == 0
            page.click("#refresh")
            expect(busy.locator('[data-field="spent"]')).to_have_text(usd(checkout["spent"]))
            expect(held).to_have_count(0)

            # A new key: its value is shown once, and it works.
            page.fill("#create-name", "ops-dashboard")
            page.select_option("#create-parent", label="acme / research")
            page.fill("#create-limit", "5")
            page.click("#create-form button[type=submit]")
            value = page.locator("#new-key-value")
            expect(value).to_have_text(re.compile(r"^sk-bm-\S{16,}$"))
            shown = value.inner_text()
            quota = httpx.get(served.admin + "/virtual-keys/quota",
                              headers={"Authorization": f"Bearer {shown}"})  # fmt: skip
            assert quota.status_code == 200
            assert quota.json()["virtual_key"]["name"] == "ops-dashboard"
            assert quota.json()["budgets"][0]["max_limit"] == 5
            page.click("#new-key-done")
            expect(page.locator("#new-key")).to_be_hidden()
            assert shown not in page.content()  # gone from the page once dismissed
            page.click("#refresh")
            expect(page.locator("li.budget")).to_have_count(count + 1)
            assert shown not in page.content()

            # Change the soft budget's limit: the bar shows it; spend and softness are kept.
            before = _budget(served, "support-bot")
            soft.locator('[data-action="edit"]').click()
            page.fill("#edit-limit", "7.5")
            page.click("#edit-save")
            expect(soft.locator('[data-field="limit"]')).to_have_text("$7.50")
            expect(soft.locator('[data-field="spent"]')).to_have_text(usd(before["spent"]))
            after = _budget(served, "support-bot")
            assert (after["id"], after["max_limit"], after["soft"]) == (before["id"], 7.5, True)
            assert after["spent"] == pytest.approx(before["spent"])

            # A key's provider config: written through the key, its rate limit left alone.
            policy = page.locator('li.budget[data-owner-type="provider_config"]')
            expect(policy).to_contain_text("/acme/product/nightly-batch/provider/openai")
            policy.locator('[data-action="edit"]').click()
            page.fill("#edit-limit", "2.5")
            page.click("#edit-save")
            expect(policy.locator('[data-field="limit"]')).to_have_text("$2.50")
            nightly = _admin_get(served, f"/virtual-keys/{served.key_ids['nightly-batch']}")
            (config,) = nightly["virtual_key"]["provider_configs"]
            assert [b["max_limit"] for b in config["budgets"]] == [2.5]
            assert config["rate_limit"]["request_max_limit"] == 1000

            # Reset alice's: a new window, nothing spent.
            row.locator('[data-action="reset"]').click()
            expect(page.locator("#reset-text")).to_contain_text(usd(alice["spent"]))
            page.click("#reset-confirm")
            expect(row.locator('[data-field="spent"]')).to_have_text("$0.00")
            assert _budget(served, "alice")["spent"] == 0

            # The key is kept for the tab: a reload asks for nothing; signing out forgets it.
            page.reload()
            expect(page.locator("#app")).to_be_visible()
            expect(row.locator('[data-field="spent"]')).to_have_text("$0.00")
            page.click("#signout")
            expect(page.locator("#login")).to_be_visible()
            assert page.evaluate("() => sessionStorage.length") == 0
        finally:
            browser.close()
    assert problems == []


@contextmanager
def _slow_request(served: Served, key: str, model: str) -> Iterator[float]:
    """A streamed request of `key` in flight (about 3 s); gives what it holds reserved."""
    body = {**_chat(model, 16000), "stream": True}
    headers = {"Authorization": f"Bearer {served.keys[key]}", "x-mock-output-tokens": "30",
               "x-mock-delay-ms": "100"}  # fmt: skip
    done: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=served.url, timeout=30) as http:
            answer = http.post("/v1/chat/completions", json=body, headers=headers)
            done.append(answer.status_code)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while (reserved := _budget(served, key)["reserved"]) == 0:
            assert time.monotonic() < deadline, "the request reserved nothing"
            time.sleep(0.05)
        yield reserved
    finally:
        thread.join(30)
    assert done == [200]
    # The server settles it once its answer has ended (waited for: a fixed 0.3 s could come
    # before a loaded machine's server had, and the page then showed it still reserved).
    deadline = time.monotonic() + 10
    while _budget(served, key)["reserved"] and time.monotonic() < deadline:
        time.sleep(0.05)


def _screenshot_path(served: Served) -> Path:
    """docs/dashboard.png when it is missing or BUDGET_TEST_SCREENSHOT=1 asks for a new one;
    else a file of the test's own (a test run leaves the tree as it was)."""
    if os.environ.get("BUDGET_TEST_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        return SCREENSHOT
    return served.tmp_path / "dashboard.png"


def _console(message: Any, problems: list[str]) -> None:
    # A failed load is logged by the browser too; `_response` judges those, with their URL.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        problems.append(f"console: {message.text}")


def _response(answer: Any, problems: list[str]) -> None:
    """Every call succeeds, but the wrong key's and those of routes that may be missing yet."""
    optional = answer.status == 404 and answer.url.endswith(("/refusals", "/alerts"))
    wrong_key = answer.request.headers.get("authorization") == "Bearer not-the-key"
    if answer.status >= 400 and not optional and not wrong_key:
        problems.append(f"{answer.request.method} {answer.url}: {answer.status}")


def _day(offset: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=offset)).isoformat()


def _check_optional(page: Any, served: Served, box: str, route: str) -> None:
    """Refusals and alerts: a table when the server has the route, else "not available"."""
    from playwright.sync_api import expect

    answer = httpx.get(served.admin + route, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    if answer.status_code == 404:
        expect(page.locator(box)).to_contain_text("Not available on this server")
        return
    assert answer.status_code == 200, answer.text
    rows = page.locator(f"{box} tbody tr")
    if route == "/refusals":  # bob was refused
        expect(rows.first).to_contain_text("bob")
        expect(rows.first).to_contain_text("budget_exceeded")
        expect(rows.first).to_contain_text("402")
    else:  # support-bot's soft budget went over (alerts, no refusal); bob's ran out
        expect(rows.filter(has_text="support-bot")).to_contain_text(["100% reached", "80% reached"])
        expect(rows.filter(has_text="bob")).to_contain_text(["exhausted"])
        expect(rows).to_have_count(min(len(answer.json()["alerts"]), 8))


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Served]:
    """examples/app.py with an empty store: for what the page does before any data."""
    _need_chromium()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env |= {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/bare.db", "BUDGET_ADMIN_KEY": ADMIN_KEY}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "examples"),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    try:
        server = Served(f"http://127.0.0.1:{port}", tmp_path)
        _wait_until_up(server.url, process)
        yield server
    finally:
        process.terminate()
        process.wait(15)


@contextmanager
def _signed_in(served: Served, viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """A page of the dashboard in headless chromium, signed in with the admin key."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"])  # fmt: skip
        try:
            page = browser.new_page(viewport=viewport) if viewport else browser.new_page()
            page.set_default_timeout(10_000)
            page.goto(served.admin + "/ui")
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#login-form button[type=submit]")
            yield page
        finally:
            browser.close()


def _stopped_key(served: Served) -> None:
    """A key named `stopped` with a $0 budget, refused once (402: `budget.exhausted` raised)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "stopped", "budgets": [{"max_limit": 0, "reset_duration": "1d"}]}
    created = httpx.post(served.admin + "/virtual-keys", json=body, headers=headers)
    key = created.json()["virtual_key"]
    refused = httpx.post(
        served.url + "/v1/chat/completions",
        json=_chat("gpt-4o", 10),
        headers={"Authorization": f"Bearer {key['value']}"},
    )
    assert refused.status_code == 402, refused.text


def test_a_key_no_header_can_carry_is_told_at_sign_in(bare: Served) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"])  # fmt: skip
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.goto(bare.admin + "/ui")
            page.fill("#admin-key", f"\u201c{ADMIN_KEY}\u201d")  # pasted with a document's quotes
            page.click("#login-form button[type=submit]")
            page.wait_for_timeout(500)
            shown = {box: page.locator(box).inner_text() for box in ("#login-error", "#app-error")}
            print(shown)  # before: signed in, "the admin API cannot be reached" six times over
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#login-error")).to_contain_text("printable ASCII without spaces")
            assert page.evaluate("() => sessionStorage.length") == 0
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#app")).to_be_visible()
            expect(page.locator("#app-error")).to_be_hidden()
        finally:
            browser.close()


def test_a_cause_every_call_fails_for_is_told_once(bare: Served) -> None:
    """The store away: the six calls of a refresh fail alike (503 naming it), and the page said
    so six times over, in one line; it says it once."""
    from playwright.sync_api import Route, expect

    down = {"error": {"message": "the store is unavailable", "type": "server_error"}}

    def store_away(route: Route) -> None:
        if "/ui" in route.request.url:  # the page and its assets still come
            route.continue_()
        else:
            route.fulfill(status=503, json=down)

    with _signed_in(bare) as page:
        expect(page.locator("#app")).to_be_visible()
        # The first load over (a refresh asked for while one runs is not made again)
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        page.route(bare.admin + "/**", store_away)
        page.click("#refresh")
        shown = page.locator("#app-error")
        expect(shown).to_contain_text("the store is unavailable")
        text = shown.inner_text()
        print("shown:", text)
        assert text.count("the store is unavailable") == 1


def test_a_budget_of_a_fraction_of_a_cent_can_be_set_from_the_page(bare: Served) -> None:
    """SPEC §6: a budget may be a fraction of a cent (LiteLLM's `0.000000000001`), and an
    operator changes a budget and creates a key from the page (§16). The limit fields had
    `step="0.01"`: the browser refused $0.0025 ("The two nearest valid values are 0 and 0.01")
    before the page could send it, and nothing was saved."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "tiny", "budgets": [{"max_limit": 0.005, "reset_duration": "1d"}]}
    created = httpx.post(bare.admin + "/customers", json=body, headers=headers)
    assert created.status_code == 201, created.text
    customer = created.json()["customer"]
    with _signed_in(bare) as page:
        row = page.locator(f'li.budget[data-id="{customer["budgets"][0]["id"]}"]')
        row.locator('[data-action="edit"]').click()
        page.fill("#edit-limit", "0.0025")
        page.click("#edit-save")
        refused = page.evaluate("() => document.getElementById('edit-limit').validationMessage")
        print("browser refused:", refused or "nothing")
        page.wait_for_function("() => !document.getElementById('edit-dialog').open")
        expect(row.locator('[data-field="limit"]')).to_have_text("$0.0025")

        page.fill("#create-name", "nano")
        page.fill("#create-limit", "0.000000001")
        page.click("#create-form button[type=submit]")
        expect(page.locator("#new-key-value")).to_have_text(re.compile(r"^sk-bm-"))
    saved = httpx.get(bare.admin + f"/customers/{customer['id']}", headers=headers).json()
    keys = httpx.get(bare.admin + "/virtual-keys", headers=headers).json()["virtual_keys"]
    limits = (saved["customer"]["budgets"][0]["max_limit"], keys[0]["budgets"][0]["max_limit"])
    print("saved limits:", limits)
    assert limits == (0.0025, 1e-9)


def test_an_amount_under_a_cent_is_shown_as_charged(bare: Served) -> None:
    """An amount under a cent was rounded to 3 significant digits: $0.0049996 spent of a
    $0.005 budget read `$0.005 of $0.005`, not marked exhausted. It is shown as charged, to
    the nano-dollar, as the refusals and the CLI write it."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "tiny", "budgets": [{"max_limit": 0.005, "reset_duration": "1d"}]}
    created = httpx.post(bare.admin + "/virtual-keys", json=body, headers=headers)
    assert created.status_code == 201, created.text
    key = created.json()["virtual_key"]
    sent = httpx.post(
        bare.url + "/v1/chat/completions",
        json=_chat("gpt-4o", 10),
        headers={"Authorization": f"Bearer {key['value']}", "x-mock-header-cost": "0.0049996"},
    )
    assert sent.status_code == 200, sent.text
    query = f"/budgets?from_memory=true&owner_type=virtual_key&owner_id={key['id']}"
    [budget] = httpx.get(bare.admin + query, headers=headers).json()["budgets"]
    assert budget["spent"] == 0.0049996
    with _signed_in(bare) as page:
        row = page.locator(f'li.budget[data-id="{budget["id"]}"]')
        expect(row).to_be_visible()
        shown = [row.locator(f'[data-field="{f}"]').inner_text() for f in ("spent", "limit")]
        print("api:", budget["spent"], budget["max_limit"], "shown:", shown)
        assert shown == ["$0.0049996", "$0.005"]


def test_a_limit_of_a_dollar_or_more_is_shown_as_set(bare: Served) -> None:
    """Amounts of $1 or more were rounded to the cent: a $9.999 budget read "$0.00 of $10.00"
    and a $12.345 one "$12.35", limits nobody set (the API says 9.999 and 12.345; the CLI
    `$9.9990`, `$12.3450`). They are shown to four decimals, as amounts under $1 already were."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    ids = {}
    for name, limit in (("nines", 9.999), ("halves", 12.345), ("round", 10)):
        body = {"name": name, "budgets": [{"max_limit": limit, "reset_duration": "1d"}]}
        created = httpx.post(bare.admin + "/customers", json=body, headers=headers)
        assert created.status_code == 201, created.text
        ids[name] = created.json()["customer"]["budgets"][0]["id"]
    with _signed_in(bare) as page:
        shown = {}
        for name, budget_id in ids.items():
            row = page.locator(f'li.budget[data-id="{budget_id}"]')
            expect(row).to_be_visible()
            shown[name] = row.locator('[data-field="limit"]').inner_text()
    print("shown:", shown)
    assert shown == {"nines": "$9.999", "halves": "$12.345", "round": "$10.00"}


def test_spend_by_tag_is_drawn_within_the_chart(bare: Served) -> None:
    """By tag, a request with two tags counts under each (`GET /usage`), so a day's stacked
    bar is taller than the day's spend; the axis was scaled to the day's spend, and the
    segments above it were drawn outside the chart (y < 0: tags b and c not seen at all)."""

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(bare.admin + "/virtual-keys", json={"name": "tagged"}, headers=headers)
    value = created.json()["virtual_key"]["value"]
    for tags in ("a,b", "a,b", "a,b,c"):
        sent = httpx.post(
            bare.url + "/v1/chat/completions",
            json=_chat("gpt-4o", 10),
            headers={"Authorization": f"Bearer {value}", "x-budget-tags": tags,
                     "x-mock-header-cost": "1"},
        )  # fmt: skip
        assert sent.status_code == 200, sent.text
    deadline = time.monotonic() + 10
    while _stored_requests(bare) < 3:  # /usage reads the store
        assert time.monotonic() < deadline, "the usage records were not written"
        time.sleep(0.05)
    with _signed_in(bare, {"width": 1280, "height": 800}) as page:
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        page.select_option("#chart-group", "tag")
        page.wait_for_function(
            "() => document.querySelectorAll('#chart rect.seg[data-group=\"c\"]').length"
        )
        segments = page.evaluate(
            "() => [...document.querySelectorAll('#chart rect.seg')].map(r =>"
            " [r.dataset.group, Number(r.dataset.cost), Number(r.getAttribute('y'))])"
        )
    print("segments (tag, cost, y):", segments)
    assert sorted((tag, cost) for tag, cost, _ in segments) == [("a", 3), ("b", 3), ("c", 1)]
    assert min(y for _, _, y in segments) >= 0


def test_a_budget_of_zero_is_shown_used_up(bare: Served) -> None:
    """A $0 budget refuses every request (SPEC §6: exhausted when `current_usage >= max_limit`),
    an operator's way to stop a key. Its `usage_ratio` was 0.0, and the page showed it as
    "$0.00 of $0.00 · 0%", not exhausted, last of the list, not counted as near its limit."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    _stopped_key(bare)
    [budget] = httpx.get(bare.admin + "/budgets?from_memory=true", headers=headers).json()[
        "budgets"
    ]
    with _signed_in(bare) as page:
        row = page.locator(f'li.budget[data-id="{budget["id"]}"]')
        expect(row).to_be_visible()
        shown = row.locator(".budget-numbers").inner_text()
        over = row.locator('[data-field="over"]').all_inner_texts()
        hot = page.locator("#tile-hot").inner_text()
    print("usage_ratio:", budget["usage_ratio"], "shown:", shown, over, "near the limit:", hot)
    assert budget["usage_ratio"] == 1.0
    assert (over, hot) == (["exhausted"], "1 of 1")


def test_an_alert_with_no_webhook_to_go_to_is_shown_not_sent(bare: Served) -> None:
    """With no `BUDGET_ALERT_WEBHOOK_URLS` an alert has nowhere to go: the API says
    `"delivery": "delivered"` (nothing left to deliver, never tried again) with `attempts: 0`,
    and the page showed it as a green "delivered", as if a webhook had it. It shows "no
    webhook", as the CLI does."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    _stopped_key(bare)  # raises budget.exhausted
    deadline = time.monotonic() + 10
    while not (alerts := httpx.get(bare.admin + "/alerts", headers=headers).json()["alerts"]):
        assert time.monotonic() < deadline, "no alert was raised"
        time.sleep(0.1)
    with _signed_in(bare) as page:
        row = page.locator("#alerts tbody tr").first
        expect(row).to_contain_text("stopped")
        shown = row.locator("td").last.inner_text()
    print("alert:", alerts[0]["delivery"], alerts[0]["attempts"], "shown:", repr(shown))
    assert (alerts[0]["delivery"], alerts[0]["attempts"]) == ("delivered", 0)
    assert shown == "no webhook"


def test_an_alert_s_threshold_is_shown_as_set(bare: Served) -> None:
    """A threshold between whole percents was rounded: 0.125 showed "13% reached" (the alert's
    own text said 12%), half a percent "1% reached". Shown as set, as the alert's text says."""
    from playwright.sync_api import expect

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    budget = {"max_limit": 1, "reset_duration": "1d", "alert_thresholds": [0.005, 0.125]}
    created = httpx.post(bare.admin + "/virtual-keys", headers=headers,
                         json={"name": "eighth", "budgets": [budget]})  # fmt: skip
    value = created.json()["virtual_key"]["value"]
    auth = {"Authorization": f"Bearer {value}", "x-mock-cost": "0.2"}
    spent = httpx.post(bare.url + "/v1/chat/completions", json=_chat("gpt-4o", 10), headers=auth)
    assert spent.status_code == 200, spent.text
    deadline = time.monotonic() + 10
    while len(httpx.get(bare.admin + "/alerts", headers=headers).json()["alerts"]) < 2:
        assert time.monotonic() < deadline, "the alerts were not raised"
        time.sleep(0.1)
    with _signed_in(bare) as page:
        rows = page.locator("#alerts tbody tr")
        expect(rows).to_have_count(2)
        shown = sorted(row.locator("td").nth(2).inner_text() for row in rows.all())
    print("shown:", shown)
    assert shown == ["0.5% reached", "12.5% reached"]


def test_a_budget_of_a_tag_named_dots_is_not_offered_for_a_change_that_cannot_be_sent(
    bare: Served,
) -> None:
    """A tag (or provider) may be named `..` or `.`, but no browser can send that name as a
    path segment: `tags/..`, and `tags/%2E%2E` alike, is read as the admin app's root (WHATWG
    URL), and the page's Edit ended in "no admin route /budget-admin/" with nothing saved. The
    page says so on the Edit button (disabled) and names the CLI command that can change it."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    budget = {"budgets": [{"max_limit": 1, "reset_duration": "1d"}]}
    for path in ("/tags/%2E%2E", "/providers/%2E", "/tags/a..b"):
        created = httpx.put(bare.admin + path, json=budget, headers=headers)
        assert created.status_code == 201, created.text
    found = httpx.get(bare.admin + "/budgets", headers=headers).json()["budgets"]
    ids = {b.get("tag") or b.get("provider"): b["id"] for b in found}
    with _signed_in(bare) as page:
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        buttons = {
            name: page.locator(f'li.budget[data-id="{id_}"] [data-action="edit"]')
            for name, id_ in ids.items()
        }
        shown = {n: (b.is_enabled(), b.get_attribute("title")) for n, b in buttons.items()}
        print("edit buttons (enabled, title):", shown)
        assert shown[".."] == (False, "A browser cannot send the name \"..\" in a URL: change "
                               "it with budget-middleware tags update .. --budget ...")  # fmt: skip
        assert shown["."][0] is False and "providers update ." in (shown["."][1] or "")
        assert shown["a..b"] == (True, "Change the limit")  # dots among others: sent as they are
        buttons["a..b"].click()
        page.fill("#edit-limit", "2.5")
        page.click("#edit-save")
        page.wait_for_function("() => !document.getElementById('edit-dialog').open")
    found = httpx.get(bare.admin + "/budgets", headers=headers).json()["budgets"]
    assert {b.get("tag") or b.get("provider"): b["max_limit"] for b in found}["a..b"] == 2.5


def test_the_longest_names_stay_within_the_page(bare: Served) -> None:
    """Names as long as the admin API takes them (200 characters, with no space to break at)
    pushed the page past the window: the Create a key form's "Belongs to" list grew to the
    longest customer's name and the top keys table to the longest key's, 2562 px of page in a
    1400 px window, with the Spend column out of sight. Every card keeps its content now."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    long = "x" * 199

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = httpx.post(bare.admin + path, json=body, headers=headers)
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    budget = [{"max_limit": 5, "reset_duration": "1d"}]
    customer = post("/customers", {"name": "c" + long, "budgets": budget})["customer"]
    post("/teams", {"name": "t" + long, "customer_id": customer["id"], "budgets": budget})
    key = post("/virtual-keys", {"name": "k" + long, "budgets": budget})["virtual_key"]
    sent = httpx.post(
        bare.url + "/v1/chat/completions",
        json={**_chat("m" + "z" * 150, 10)},
        headers={"Authorization": f"Bearer {key['value']}", "x-mock-header-cost": "1",
                 "x-budget-tags": "g" + "q" * 99},
    )  # fmt: skip
    assert sent.status_code == 200, sent.text
    _stopped_key(bare)  # a refusal to show
    deadline = time.monotonic() + 10
    while _stored_requests(bare) < 1:
        assert time.monotonic() < deadline, "the usage record was not written"
        time.sleep(0.05)
    measure = """() => ({
        page: [document.documentElement.scrollWidth, window.innerWidth],
        cards: [...document.querySelectorAll('.card, .tile, dialog[open]')]
            .filter((c) => c.scrollWidth > c.clientWidth + 1)
            .map((c) => (c.id || c.getAttribute('aria-labelledby') || c.className)
                 + ': ' + c.scrollWidth + ' > ' + c.clientWidth),
    })"""
    edit = f'li.budget[data-id="{customer["budgets"][0]["id"]}"] [data-action="edit"]'
    shown = {}
    for width in (1400, 900):  # two columns, and one (under 1000 px)
        with _signed_in(bare, {"width": width, "height": 900}) as page:
            page.wait_for_function("() => document.querySelectorAll('#top-keys tbody tr').length")
            page.wait_for_function("() => document.querySelectorAll('#refusals tbody tr').length")
            shown[f"{width} signed in"] = page.evaluate(measure)
            for group in ("model", "tag", "team", "customer"):
                page.select_option("#chart-group", group)
                page.wait_for_timeout(300)
                shown[f"{width} by {group}"] = page.evaluate(measure)
            page.locator(edit).click()
            shown[f"{width} edit"] = page.evaluate(measure)
    print(shown)
    for measured in shown.values():
        assert measured["page"][0] <= measured["page"][1]
        assert measured["cards"] == []


def test_spend_under_its_limit_is_never_shown_as_the_limit(bare: Served) -> None:
    """$9.996 spent of a $10 budget (it still admits: the next request is a 200) was shown
    "$10.00 of $10.00 · 100%", as if used up; $0.99996 of $1 "$1.00 of $1.00 · 100%". Spend
    under its limit is shown with the decimals that tell it from the limit, and under 100%."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cases = {"ten": (10, 9.996), "one": (1, 0.99996), "cents": (0.02, 0.019999)}
    ids = {}
    for name, (limit, cost) in cases.items():
        body = {"name": name, "budgets": [{"max_limit": limit, "reset_duration": "1d"}]}
        created = httpx.post(bare.admin + "/virtual-keys", json=body, headers=headers)
        key = created.json()["virtual_key"]
        ids[name] = key["budgets"][0]["id"]
        auth = {"Authorization": f"Bearer {key['value']}"}
        codes = [
            httpx.post(bare.url + "/v1/chat/completions", json=_chat("gpt-4o", 10),
                       headers={**auth, "x-mock-header-cost": str(cost)}).status_code
            for cost in (cost, 0)
        ]  # fmt: skip
        assert codes == [200, 200], (name, codes)  # not exhausted: the second is admitted
    with _signed_in(bare) as page:
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        shown = {
            name: page.locator(f'li.budget[data-id="{id_}"] .budget-numbers > span').first
            .inner_text()
            for name, id_ in ids.items()
        }  # fmt: skip
        over = page.locator('[data-field="over"]').count()
    print("shown:", shown)
    assert shown == {
        "ten": "$9.996 of $10.00 · 99%",
        "one": "$0.99996 of $1.00 · 99%",
        "cents": "$0.019999 of $0.02 · 99%",
    }
    assert over == 0


def test_the_chart_shows_the_grouping_last_chosen(bare: Served) -> None:
    """Each choice of "by" loads the chart anew, and the answers drew the chart in the order
    they came: by team chosen, then by provider before team's answers were in, and the chart
    ended by team ("(no team)") under a select that said provider. The last choice wins."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(bare.admin + "/virtual-keys", json={"name": "quick"}, headers=headers)
    value = created.json()["virtual_key"]["value"]
    sent = httpx.post(
        bare.url + "/v1/chat/completions",
        json=_chat("gpt-4o", 10),
        headers={"Authorization": f"Bearer {value}", "x-mock-header-cost": "1"},
    )
    assert sent.status_code == 200, sent.text
    deadline = time.monotonic() + 10
    while _stored_requests(bare) < 1:
        assert time.monotonic() < deadline, "the usage record was not written"
        time.sleep(0.05)
    slow_team = """(() => {  // the answers by team come 1.5 s late (a slow query)
        const fetch = window.fetch.bind(window);
        window.fetch = async (url, init) => {
            if (String(url).includes("group_by=team")) await new Promise(r => setTimeout(r, 1500));
            return fetch(url, init);
        };
    })();"""
    with _signed_in(bare) as page:
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        page.evaluate(slow_team)
        page.select_option("#chart-group", "team")
        page.select_option("#chart-group", "provider")
        page.wait_for_timeout(2500)  # every answer in
        chosen = page.locator("#chart-group").input_value()
        legend = page.locator("#legend .name").all_inner_texts()
        groups = page.evaluate(
            "() => [...new Set([...document.querySelectorAll('#chart rect.seg')]"
            ".map(r => r.dataset.group))]"
        )
    print("chosen:", chosen, "legend:", legend, "drawn:", groups)
    assert (chosen, legend, groups) == ("provider", ["openai"], ["openai"])


def test_an_admin_api_with_no_admin_key_set_is_told_at_sign_in(tmp_path: Path) -> None:
    """With BUDGET_ADMIN_KEY unset the admin API answers 503 `admin_api_disabled` (SPEC §3):
    no key can open it. The page signed in with whatever was typed, kept it, and showed an
    empty dashboard under a banner, retried every 30 s (and at every reload). It stays at the
    sign-in, saying what to set, and keeps nothing."""
    from playwright.sync_api import expect

    _need_chromium()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env |= {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/nokey.db"}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "examples"),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    try:
        server = Served(f"http://127.0.0.1:{port}", tmp_path)
        _wait_until_up(server.url, process)
        with _signed_in(server) as page:
            page.wait_for_function(
                "() => document.body.dataset.loaded !== undefined"
                " || !document.getElementById('login-error').hidden"
            )
            shown = {
                "login": page.locator("#login").is_visible(),
                "app": page.locator("#app").is_visible(),
                "said": page.locator("#login-error").inner_text(),
                "kept": page.evaluate("() => sessionStorage.length"),
            }
            print(shown, "banner:", page.locator("#app-error").inner_text())
            expect(page.locator("#login-error")).to_contain_text("set BUDGET_ADMIN_KEY")
        assert (shown["login"], shown["app"], shown["kept"]) == (True, False, 0)
    finally:
        process.terminate()
        process.wait(15)


def test_the_chart_and_the_periods_take_today_from_the_server(bare: Served) -> None:
    """The page took "today" from the browser's clock: a browser whose clock was ten days
    ahead (or a laptop's wrong date) asked `/usage` for ten days that had not come yet, drew
    "No spend in this period." over the day's spend, and said of a daily budget that it reset
    "9 d ago"; the end of a window was written in the browser's time zone, unlabelled (Dec 5,
    03:19 AM in Kiritimati for Dec 4, 13:19 UTC). Days, periods and times are the server's (UTC,
    as `/usage`, the budgets and the CLI have them): the page reads the server's time from
    `/budgets` (`server_time`) and writes times in UTC, saying so."""
    from playwright.sync_api import sync_playwright

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "today", "budgets": [{"max_limit": 5, "reset_duration": "1d"}]}
    created = httpx.post(bare.admin + "/virtual-keys", json=body, headers=headers)
    key = created.json()["virtual_key"]
    sent = httpx.post(
        bare.url + "/v1/chat/completions",
        json=_chat("gpt-4o", 10),
        headers={"Authorization": f"Bearer {key['value']}", "x-mock-header-cost": "1.25"},
    )
    assert sent.status_code == 200, sent.text
    deadline = time.monotonic() + 10
    while _stored_requests(bare) < 1:
        assert time.monotonic() < deadline, "the usage record was not written"
        time.sleep(0.05)
    wrong = datetime.now(UTC) + timedelta(days=10, hours=5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"])  # fmt: skip
        try:
            context = browser.new_context(timezone_id="Pacific/Kiritimati")  # UTC+14
            page = context.new_page()
            page.clock.install(time=wrong)
            page.set_default_timeout(10_000)
            page.goto(bare.admin + "/ui")
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#login-form button[type=submit]")
            page.wait_for_function("() => document.body.dataset.loaded !== undefined")
            page.select_option("#chart-days", "7")
            page.wait_for_timeout(500)
            shown = {
                "browser today": page.evaluate("() => new Date().toISOString().slice(0, 10)"),
                "days": page.evaluate(
                    "() => [...document.querySelectorAll('#chart rect.seg')]"
                    ".map(r => r.dataset.day)"
                ),
                "spend": page.locator("#tile-spend").inner_text(),
                "period": page.locator("li.budget .budget-numbers > span.muted").last.inner_text(),
                "updated": page.locator("#updated").inner_text(),
            }
        finally:
            browser.close()
    end = datetime.fromisoformat(key["budgets"][0]["period_end"].replace("Z", "+00:00"))
    print("server today:", _day(0), "shown:", shown, "period_end:", end.isoformat())
    assert shown["browser today"] != _day(0)  # the browser's clock is wrong indeed
    assert shown["days"] == [_day(0)]
    assert shown["spend"] == "$1.25"
    assert "resets in" in shown["period"] and "ago" not in shown["period"]
    # when it ends, as the API and the CLI write it: in UTC, said so (not Kiritimati's day)
    assert f"({end:%b} {end.day}, " in shown["period"] and shown["period"].endswith(" UTC)")
    # and the time of the last refresh too (it was the browser's zone's, unlabelled: 14 hours
    # ahead in Kiritimati), by the browser's clock, which is all the page has for it
    assert shown["updated"].startswith("Updated ") and shown["updated"].endswith(" UTC")
    hour, minute, _ = (int(part) for part in shown["updated"].split()[1].split(":"))
    apart = (hour * 60 + minute - (wrong.hour * 60 + wrong.minute)) % (24 * 60)
    assert min(apart, 24 * 60 - apart) <= 5, shown["updated"]


def test_the_chart_by_tag_adds_up_to_the_records_with_a_tag_named_null(bare: Served) -> None:
    """SPEC §16: the chart adds up to the records. Tags are the clients': the page keyed each
    series by `String(row.key)`, so spend with no tag (null) and a tag named "null" were one
    series drawn twice: $1 untagged and $2 tagged "null" drew $6 for $3 (a fault hunt's)."""
    served = bare
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    sent = [
        httpx.post(served.url + "/v1/chat/completions", json=_chat("gpt-4o", 10),
                   headers={"x-mock-header-cost": "1", **({"x-budget-tags": t} if t else {})})
        for t in ("", "null", "null")
    ]  # fmt: skip
    assert [s.status_code for s in sent] == [200, 200, 200], [s.text for s in sent]
    deadline = time.monotonic() + 10
    while _stored_requests(served) < 3:
        assert time.monotonic() < deadline, "the usage records were not written"
        time.sleep(0.05)
    usage = httpx.get(served.admin + "/usage", params={"group_by": "tag"}, headers=headers).json()
    print("GET /usage by tag:", [(u["key"], u["cost"]) for u in usage["usage"]])
    with _signed_in(served, {"width": 1280, "height": 800}) as page:
        page.wait_for_function("() => document.body.dataset.loaded !== undefined")
        page.select_option("#chart-group", "tag")
        page.wait_for_function(  # drawn by tag: the model's series gone
            "() => { const s = [...document.querySelectorAll('#chart rect.seg')];"
            " return s.length && !s.some(r => r.dataset.group === 'gpt-4o'); }"
        )
        segments = page.evaluate(
            "() => [...document.querySelectorAll('#chart rect.seg')].map(r =>"
            " [r.dataset.group, Number(r.dataset.cost)])"
        )
    print("segments drawn (series, cost):", segments)
    assert sum(cost for _, cost in segments) == pytest.approx(3.0), segments
