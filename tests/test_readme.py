"""What the README and docs/ say is true of the code: its snippets run, its tables match the app."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import BudgetSettings, get_engine
from support import client, engine_of, host_app, running, until

README = Path(__file__).resolve().parent.parent / "README.md"


def management_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "m.create_customer(" in b]
    assert len(found) == 1, "the README has one Python management snippet"
    return found[0]


def test_the_readme_management_snippet_works_on_a_fresh_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default store, ./budget_middleware.db, does not exist yet
    assert not (tmp_path / "budget_middleware.db").exists()
    exec(compile(management_snippet(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("sk-bm-")
    m = get_engine(BudgetSettings()).manager
    key_id = m.find_virtual_key(printed)
    assert key_id is not None and m.get_virtual_key(key_id).name == "alice"
    assert [c.name for c in m.list_customers()] == ["acme"]
    assert [p.provider for p in m.list_providers()] == ["openai"]
    assert [t.tag for t in m.list_tags()] == ["product:chat"]


def test_the_management_api_creates_the_schema_of_a_fresh_database(tmp_path: Path) -> None:
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/fresh.db")
    m = get_engine(settings).manager  # the engine has not started: nothing created the tables
    assert m.list_customers() == []
    assert m.create_team(name="research").name == "research"


def test_no_sentence_of_the_readme_is_written_twice() -> None:
    # An edit that pastes a new version of a passage beside the old one leaves the README saying
    # both (the service tiers' paragraph once said its last three sentences twice, mid-sentence).
    prose = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    sentences = [s for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", prose)) if len(s) >= 60]
    repeated = sorted({s for s in sentences if sentences.count(s) > 1})
    assert repeated == []


def test_no_table_of_the_docs_lists_a_row_twice() -> None:
    # The CLI's table once had two `usage` rows, each with half of what the command does.
    for doc in (
        README,
        README.parent / "docs" / "admin-api.md",
        README.parent / "docs" / "deployment.md",
    ):
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for table in re.findall(r"(?:^\|.*\n)+", text, re.M):
            firsts = [row.split(" | ", 1)[0] for row in table.splitlines()[2:]]
            twice = sorted({f for f in firsts if firsts.count(f) > 1})
            assert twice == [], f"{doc.name}: {twice}"


ADMIN_DOC = README.parent / "docs" / "admin-api.md"


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of every route docs/admin-api.md's table names (`GET/POST /customers`)."""
    table = ADMIN_DOC.read_text(encoding="utf-8").split("## Routes", 1)[1].split("\n## ", 1)[0]
    found = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            first = row.split(" | ", 1)[0]
            for methods, path in re.findall(r"`([A-Z/]+) (/[^`?]*)", first):
                found |= {(m, path) for m in methods.split("/")}
    return found


async def test_the_admin_api_doc_lists_every_route_the_app_serves(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
    served = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    documented = documented_routes()
    print("served, not documented:", sorted(served - documented))
    print("documented, not served:", sorted(documented - served))
    assert served - documented == set()
    assert documented - served == set()  # the dashboard's `/ui` too (it was left out)


async def test_the_sdks_wait_out_a_429_as_the_readme_says(
    make_settings: Callable[..., BudgetSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Good to know": an hourly limit's 429 (Retry-After 3600) is raised at once by both SDKs
    (`x-should-retry: false` past two minutes, OpenAI's own limit; `anthropic` waited it out,
    twice: a call held two hours), and a minute's is waited out by both, once."""
    import anthropic
    import httpx2
    import openai
    from anthropic import _base_client

    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(_base_client.anyio, "sleep", no_wait)  # the wait recorded, not slept
    app = host_app(make_settings())
    calls: list[str] = []

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append(scope["path"])
        await app(scope, receive, send)

    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(counting))
    hi = [{"role": "user", "content": "hi"}]
    async with running(app):
        hourly = {"request_max_limit": 1, "request_reset_duration": "1h"}
        manager = engine_of(app).manager
        gpt = manager.create_virtual_key(name="gpt", rate_limit=hourly).value or ""
        claude = manager.create_virtual_key(name="claude", rate_limit=hourly).value or ""
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key=gpt, http_client=http)
        await sdk.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=5)
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=5)
        other = anthropic.AsyncAnthropic(base_url="http://test", api_key=claude, http_client=http)
        await other.messages.create(model="claude-haiku-4-5", messages=hi, max_tokens=5)
        with pytest.raises(anthropic.RateLimitError):
            await other.messages.create(model="claude-haiku-4-5", messages=hi, max_tokens=5)
        minutely = {"request_max_limit": 1, "request_reset_duration": "1m"}
        minute = manager.create_virtual_key(name="minute", rate_limit=minutely).value or ""
        waiting = anthropic.AsyncAnthropic(
            base_url="http://test", api_key=minute, http_client=http, max_retries=1
        )
        await waiting.messages.create(model="claude-haiku-4-5", messages=hi, max_tokens=5)
        with pytest.raises(anthropic.RateLimitError):  # its wait recorded, not slept: refused
            await waiting.messages.create(model="claude-haiku-4-5", messages=hi, max_tokens=5)
    await http.aclose()
    print(f"requests sent: {calls}; anthropic waited {waits} s")
    assert calls == ["/v1/chat/completions"] * 2 + ["/v1/messages"] * 2 + ["/v1/messages"] * 3
    assert len(waits) == 1 and 50 < waits[0] <= 60


def readme_block(starting: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if b.startswith(starting)]
    assert len(found) == 1, starting
    return found[0]


async def test_the_readme_one_line_app_meters_and_its_admin_api_changes_the_next_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's first snippet as written, configured from BUDGET_* variables: the admin API
    it mounts shares the middleware's engine, so a change applies to the very next request."""
    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/b.db")
    monkeypatch.setenv("BUDGET_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("BUDGET_FLUSH_INTERVAL_SECONDS", "0.05")
    found: dict[str, Any] = {}
    exec(compile(readme_block("from fastapi import FastAPI"), "README.md", "exec"), found)
    app = found["app"]

    @app.post("/v1/chat/completions")
    async def completions() -> dict[str, Any]:
        return {"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}

    admin = {"authorization": "Bearer admin-secret"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    statuses = []
    async with running(app), client(app) as http:
        made = await http.post(
            "/budget-admin/virtual-keys",
            json={"name": "alice", "budgets": [{"max_limit": 1, "reset_duration": "1d"}]},
            headers=admin,
        )
        key = {"authorization": f"Bearer {made.json()['virtual_key']['value']}"}
        key_id = made.json()["virtual_key"]["id"]
        statuses.append(
            (await http.post("/v1/chat/completions", json=body, headers=key)).status_code
        )
        changed = await http.put(
            f"/budget-admin/virtual-keys/{key_id}",
            json={"budgets": [{"max_limit": 0.001, "reset_duration": "1d"}]},
            headers=admin,
        )
        assert changed.status_code == 200
        answer = await http.post("/v1/chat/completions", json=body, headers=key)
        statuses.append(answer.status_code)
    print("statuses", statuses, answer.json()["error"]["message"])
    assert statuses == [200, 402]  # $0.0035 spent of a budget lowered to $0.001
    assert answer.headers["x-should-retry"] == "false"


async def test_the_record_on_settled_gets_is_importable_as_the_readme_names_it(
    make_settings: Callable[..., BudgetSettings],
) -> None:
    """ "Hooks": `on_settled` gets "the `UsageRecord`"; a hook typed with it imports it from the
    package (SPEC §2: everything public is importable from `budget_middleware`)."""
    import budget_middleware

    settled: list[Any] = []
    app = host_app(None)
    app.add_middleware(
        budget_middleware.BudgetMiddleware, settings=make_settings(), on_settled=settled.append
    )
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with running(app), client(app) as http:
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        await until(lambda: settled)  # hooks run off the request path
    print("settled:", [type(r).__name__ for r in settled], "exported:", budget_middleware.__all__)
    assert "UsageRecord" in budget_middleware.__all__
    from budget_middleware import UsageRecord

    assert settled and isinstance(settled[0], UsageRecord)
    assert settled[0].model == "gpt-4o" and settled[0].cost_nanos > 0


def python_blocks() -> list[tuple[str, str]]:
    """(file, block) of every ```python block of the README and docs/."""
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    return [
        (doc.name, block)
        for doc in docs
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    ]


def test_every_name_a_python_block_of_the_docs_imports_exists() -> None:
    """A snippet's imports are what a reader copies first: a name renamed or moved in the code
    (a fragment's `[...]` and top-level `await` still parse) fails here, not in a reader's app;
    so does a dotted name the prose gives (`budget_middleware.wsgi.shutdown()`)."""
    import ast
    import importlib

    missing = []
    for doc, block in python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                missing += [
                    f"{doc}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                ]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    for doc in docs:  # and the prose's `budget_middleware.wsgi.shutdown()` and the like
        text = doc.read_text(encoding="utf-8")
        for dotted in set(re.findall(r"(?<![\w./-])budget_middleware(?:\.\w+)+", text)):
            module, _, name = dotted.rpartition(".")
            try:
                importlib.import_module(dotted)
            except ImportError:
                if not hasattr(importlib.import_module(module), name):
                    missing.append(f"{doc.name}: {dotted}")
    print(f"{len(python_blocks())} blocks; missing: {missing}")
    assert missing == []


def test_the_readme_flask_snippet_meters_and_its_admin_api_changes_the_next_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Flask snippet as written, configured from BUDGET_* variables, as the FastAPI
    one is above: a key made through the admin API it mounts, spent, then its budget lowered."""
    from werkzeug.test import Client

    from budget_middleware.engine.portal import shut_down_engines

    monkeypatch.setenv("BUDGET_DATABASE_URL", f"sqlite:///{tmp_path}/b.db")
    monkeypatch.setenv("BUDGET_ADMIN_KEY", "admin-secret")
    found: dict[str, Any] = {"__name__": "__main__"}  # as run as a script (Flask(__name__))
    exec(compile(readme_block("from flask import Flask"), "README.md", "exec"), found)
    app = found["app"]

    @app.post("/v1/chat/completions")
    def completions() -> dict[str, Any]:
        return {"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}

    admin = {"authorization": "Bearer admin-secret"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    http = Client(app)
    try:
        made = http.post(
            "/budget-admin/virtual-keys",
            json={"name": "alice", "budgets": [{"max_limit": 1, "reset_duration": "1d"}]},
            headers=admin,
        )
        assert made.status_code == 201
        key = {"authorization": f"Bearer {made.json['virtual_key']['value']}"}
        first = http.post("/v1/chat/completions", json=body, headers=key)
        first.get_data()  # settled as its last chunk goes ("Testing a Flask app")
        changed = http.put(
            f"/budget-admin/virtual-keys/{made.json['virtual_key']['id']}",
            json={"budgets": [{"max_limit": 0.001, "reset_duration": "1d"}]},
            headers=admin,
        )
        assert changed.status_code == 200
        second = http.post("/v1/chat/completions", json=body, headers=key)
    finally:
        shut_down_engines()
    print("statuses", first.status_code, second.status_code, second.json["error"]["message"])
    assert (first.status_code, second.status_code) == (200, 402)  # $0.0035 spent of $0.001
    assert second.headers["x-should-retry"] == "false"
