"""The `budget-middleware` command (SPEC §16), run for real: `python -m budget_middleware` and the
installed console script, in subprocesses, on a SQLite store of the test's own and on a running
admin API (uvicorn serving examples/app.py: the middleware and `create_admin_app()` mounted).

Usage is produced by real requests through the middleware (in process for the store, over HTTP
for the server). Independent commands run at once (`cli_many`), and the breadth (every kind of
object, every error) runs the same entry point in this process (`here`: `budget_middleware.cli.run`
with the environment and the output of a subprocess), to keep the file quick: each process spends
most of a second importing the package.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from budget_middleware import BudgetSettings, ConfigFileError, get_engine, get_manager
from budget_middleware.cli import run
from budget_middleware.cli.commands import cli as cli_group
from conftest import POSTGRES_BASE_URL, need_postgres
from service_support import private_database
from support import chat, client, host_app, running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "budget-middleware"
ADMIN_KEY = "cli-admin-secret"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def failed_on_one_line(self, code: int = 1) -> str:
        """The error line of a failure: exit status `code`, nothing on stdout, one line on
        stderr starting with `error: `."""
        assert self.code == code, (self.code, self.out, self.err)
        assert self.out == ""
        assert self.err.startswith("error: ") and self.err.count("\n") == 1, self.err
        return self.err.strip()


def _argv(line: str, script: bool) -> list[str]:
    args = shlex.split(line)
    return [str(SCRIPT), *args] if script else [sys.executable, "-m", "budget_middleware", *args]


def cli_many(env: dict[str, str], lines: Sequence[str], *, script: bool = False) -> list[Result]:
    """Run the command lines at once (each in its own process: `python -m budget_middleware`,
    or the console script); their results, in order."""
    variables = {**os.environ, **env}  # conftest has removed the developer's BUDGET_* variables
    processes = [
        subprocess.Popen(
            _argv(line, script),
            env=variables,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for line in lines
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        results.append(Result(process.returncode, out, err))
    return results


def cli(env: dict[str, str], line: str, *, script: bool = False) -> Result:
    return cli_many(env, [line], script=script)[0]


def ok(result: Result) -> Result:
    assert result.code == 0, (result.out, result.err)
    return result


def value_line(out: str) -> str:
    """The key's value from the `value: ...` line a create or a rotate prints."""
    [line] = [line for line in out.splitlines() if line.startswith("value: ")]
    return line.removeprefix("value: ")


def table(out: str) -> list[list[str]]:
    """A table's lines, split on runs of 2+ spaces (cells never hold two spaces)."""
    return [re.split(r" {2,}", line.strip()) for line in out.splitlines() if line.strip()]


class Here:
    """A command line run in this process (`run(argv)`), with `env` set; its Result."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, env: dict[str, str], line: str) -> Result:
        self.capsys.readouterr()
        with self.monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            code = run(shlex.split(line))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Here:
    return Here(capsys, monkeypatch)


def _key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    return {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/budget.db"}


def _exists(env: dict[str, str]) -> bool:
    return Path(env["BUDGET_DATABASE_URL"].removeprefix("sqlite:///")).exists()


def _settings(env: dict[str, str]) -> BudgetSettings:
    # A short cache TTL: a key rotated by the CLI is seen as changed on the next request.
    return BudgetSettings(
        database_url=env["BUDGET_DATABASE_URL"],
        flush_interval_seconds=0.05,
        cache_ttl_seconds=0.05,
    )


async def _requests(env: dict[str, str], *values: str) -> list[int]:
    """The status of a chat completion with each key, through the middleware in process; its
    usage is flushed to the store when the app shuts down."""
    app = host_app(_settings(env))
    statuses = []
    async with running(app), client(app) as http:
        for value in values:
            answer = await http.post("/v1/chat/completions", json=chat(), headers=_key(value))
            statuses.append(answer.status_code)
    return statuses


# -- on the store, directly --------------------------------------------------------------------


async def test_keys_budgets_and_usage_on_the_store(store: dict[str, str], here: Here) -> None:
    acme = ok(cli(store, "customers create --name acme --json")).json()["customer"]
    line = "teams create --name research --customer-id acme --budget 10/1d"
    team = ok(cli(store, line, script=True))
    assert team.out.startswith("created team ")
    assert "name:             research" in team.out
    assert f"customer_id:      {acme['id']}" in team.out  # --customer-id took the name
    assert [row[4] for row in table(team.out) if row[1:3] == ["$0.0000", "$10.0000"]] == ["1d"]

    # keys create prints the value once (and says so on stderr); the key then works.
    line = "keys create --name alice --team-id research --budget 1/1d --request-limit 60/1m"
    created = ok(cli(store, line))
    value = value_line(created.out)
    assert value.startswith("sk-bm-") and created.out.count(value) == 1
    assert "shown this once" in created.err
    assert await _requests(store, value, "sk-bm-not-a-key") == [200, 401]

    keys, usage = cli_many(store, ["keys list", "usage --by model --since 1d"])
    rows = table(ok(keys).out)
    assert rows[0][:4] == ["ID", "NAME", "KEY", "TEAM"]
    assert rows[1][1] == "alice" and rows[1][2].startswith("sk-bm-…") and value not in keys.out
    rows = table(ok(usage).out)
    assert rows[0] == [
        "MODEL",
        "REQUESTS",
        "INPUT TOKENS",
        "OUTPUT TOKENS",
        "CACHED TOKENS",
        "COST",
    ]
    assert rows[1][:2] == ["gpt-4o", "1"] and rows[-1][:2] == ["total", "1"]

    key = ok(here(store, "keys show alice --json")).json()["virtual_key"]
    assert "value" not in key and key["name"] == "alice"
    assert [b["max_limit"] for b in key["budgets"]] == [1.0]
    assert key["rate_limit"]["request_max_limit"] == 60
    report = ok(here(store, "--json usage --by model")).json()
    assert report["group_by"] == "model" and report["count"] == 1
    assert report["usage"][0]["key"] == "gpt-4o" and report["usage"][0]["cost"] > 0
    [spent] = ok(here(store, "budgets list --owner-type team --json")).json()["budgets"]
    assert spent["user_path"] == "/acme/research" and spent["spent"] > 0

    # budgets reset: a new window from now, usage 0.
    reset = ok(cli(store, f"budgets reset {spent['id']}"))
    assert reset.out.startswith(f"reset budget {spent['id']} (/acme/research)")
    [after] = ok(here(store, "budgets list --owner-type team --json")).json()["budgets"]
    assert after["id"] == spent["id"] and after["spent"] == 0

    # keys rotate: a new value, once; the old one stops working.
    rotated = ok(here(store, "keys rotate alice --json")).json()["virtual_key"]
    assert rotated["value"] != value and rotated["id"] == key["id"]
    assert await _requests(store, value, rotated["value"]) == [401, 200]

    # keys delete: where its money went keeps its name, marked deleted.
    ok(here(store, "keys delete alice"))
    rows = table(ok(here(store, "usage --by key")).out)
    print("usage by key after deleting alice:", rows[1])
    assert rows[1][1:3] == ["alice (deleted)", "2"]


def test_every_kind_from_options_and_from_the_api_bodies(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    """Create, update, show, list and delete each kind (in process: `here`)."""
    route = tmp_path / "route.json"
    route.write_text(json.dumps({"name": "gpt-4o", "targets": ["openai/gpt-4o", "azure/gpt-4o"]}))
    tag_body = shlex.quote(json.dumps({"budgets": [{"max_limit": 20, "reset_duration": "1d"}]}))
    customer, provider, tag, routed, config = [here(store, line) for line in [
        "customers create --name acme --calendar-aligned",
        "providers create openai --budget 500/1M",
        f"tags create product:chat --body {tag_body}",
        f"routes create --file {route} --json",
        "model-configs create --model-name gpt-4o* --budget 50/1w --json",
    ]]  # fmt: skip
    assert ok(customer).out.startswith("created customer ")
    assert ok(provider).out.startswith("created provider openai\n") and "$500.0000" in provider.out
    assert "$20.0000" in ok(tag).out
    route_id = ok(routed).json()["route"]["id"]
    assert routed.json()["route"]["targets"] == ["openai/gpt-4o", "azure/gpt-4o"]
    assert ok(config).json()["model_config"]["scope"] == "global"

    provider, tag, routed, customer, configs, again = [here(store, line) for line in [
        "providers update openai --request-limit 10/1s --json",
        "tags show product:chat",
        "routes update gpt-4o --strategy most_remaining --json",
        "customers update acme --name acme-corp --json",
        "model-configs list",
        "providers create openai",
    ]]  # fmt: skip
    openai = ok(provider).json()["provider"]
    assert openai["rate_limit"]["request_max_limit"] == 10
    assert [b["max_limit"] for b in openai["budgets"]] == [500.0]  # an update keeps the rest
    assert ok(tag).out.startswith("tag:              product:chat\n")
    assert ok(routed).json()["route"]["strategy"] == "most_remaining"
    renamed = ok(customer).json()["customer"]
    assert renamed["name"] == "acme-corp" and renamed["calendar_aligned"] is True
    rows = table(ok(configs).out)
    assert rows[0][:4] == ["ID", "MODEL", "PROVIDER", "SCOPE"]
    assert rows[1][1:4] == ["gpt-4o*", "-", "global"] and "$50.0000/1w" in rows[1][4]
    assert again.failed_on_one_line() == (
        "error: provider 'openai' already exists: change it with 'providers update openai'"
    )

    # A model name two configs share names neither: said so, with their ids (it said "not found").
    keyed = here(store, "keys create --name kim --json")
    kim = ok(keyed).json()["virtual_key"]["id"]
    ok(here(store, f"model-configs create --model-name gpt-4o* --scope-id {kim}"))
    ambiguous = here(store, "model-configs show gpt-4o*").failed_on_one_line()
    assert ambiguous.startswith("error: 2 model-configs are named 'gpt-4o*' (")
    assert ambiguous.endswith("): name one by its id")
    ok(here(store, "keys delete kim"))

    deleted = [here(store, line) for line in [
        "providers delete openai",
        "tags delete product:chat",
        "routes delete gpt-4o --json",
        "model-configs delete gpt-4o*",  # a model config by its model name
        "customers delete acme-corp",
    ]]  # fmt: skip
    assert [r.code for r in deleted] == [0] * 5, [r.err for r in deleted]
    assert deleted[0].out == "deleted provider openai\n"
    assert deleted[2].json() == {"deleted": True, "id": route_id}
    assert ok(here(store, "budgets list --json")).json()["count"] == 0  # owners' went with them
    assert ok(here(store, "routes list")).out == "(none)\n"


def test_a_failure_prints_one_line_naming_its_cause(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    unreachable = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/no/such/dir/b.db"}
    invalid = {"BUDGET_DATABASE_URL": "mysql://localhost/x"}
    get_manager(_settings(store)).list_teams()  # the store exists: `show` needs one
    unknown, duration = cli_many(store, ["keys show nope", "keys create --name x --budget 1/1x"])
    [down] = cli_many(unreachable, ["customers create --name x"])
    [settings] = cli_many(invalid, ["keys list"], script=True)
    assert unknown.failed_on_one_line() == "error: virtual key 'nope' not found"
    line = duration.failed_on_one_line(2)
    assert "--budget" in line and "invalid duration '1x'" in line
    assert down.failed_on_one_line() == (
        f"error: the store at {unreachable['BUDGET_DATABASE_URL']} cannot be reached "
        "(unable to open database file)"
    )
    line = settings.failed_on_one_line()
    assert line.startswith("error: invalid budget-middleware settings: BUDGET_DATABASE_URL:")

    # The same entry point in process, for the rest.
    since, far, not_object, invalid_body, parent, command, both = [here(store, line) for line in [
        "usage --since 7x",
        "usage --since 99999Y",
        "customers create --body '[1]'",
        """customers create --body '{"calendar_aligned": true}'""",
        "teams create --name t --customer-id nobody",
        "no-such-command",
        "routes create --body {} --file x.json",
    ]]  # fmt: skip
    line = since.failed_on_one_line(2)
    assert "--since" in line and "'7x' is neither a duration" in line
    line = far.failed_on_one_line(2)  # a duration, too long: it said "neither a duration"
    assert "--since" in line and "'99999Y'" in line and "at most 100 years" in line
    assert "--body" in not_object.failed_on_one_line(2) and "JSON object" in not_object.err
    # A create missing what only an option or the body gives is a command used wrongly, naming
    # the option (it said `error: name: Field required`, exit 1).
    line = invalid_body.failed_on_one_line(2)
    assert line.startswith("error: Missing option '--name' (or 'name' in --body or --file).")
    assert parent.failed_on_one_line() == "error: customer 'nobody' not found"
    assert "No such command 'no-such-command'" in command.failed_on_one_line(2)
    assert "give --body or --file, not both" in both.failed_on_one_line(2)


def test_a_password_in_url_is_not_printed(here: Here) -> None:
    """An admin API behind a proxy's basic auth (`--url https://ops:secret@host/admin`): the
    CLI's error named the URL whole, password included, in a terminal or a CI log."""
    line = "--url http://ops:hunter2@127.0.0.1:9/admin --admin-key k keys list"
    failed = here({}, line)
    print(failed.err.strip())
    assert failed.failed_on_one_line().startswith(
        "error: the admin API at http://ops:***@127.0.0.1:9/admin cannot be reached"
    )
    assert "hunter2" not in failed.err + failed.out


def test_a_usage_period_that_ends_before_it_starts_is_named(
    store: dict[str, str], here: Here
) -> None:
    """SPEC §16: a failure prints one line naming the cause; `--until` before `--since` printed
    "no usage in this period" and exited 0."""
    get_manager(_settings(store)).list_teams()  # the store exists: `usage` needs one
    swapped = here(store, "usage --since 2027-02-01 --until 2027-01-01")
    print("until before since:", swapped.code, swapped.err.strip())
    line = swapped.failed_on_one_line(2)
    assert "--until" in line and "is not after --since '2027-02-01'" in line
    assert here(store, "usage --since 2027-01-01 --until 2027-01-02").code == 0


def test_usage_by_day_lists_the_days_in_order(store: dict[str, str], here: Here) -> None:
    """`usage --by day` (and `GET /usage?group_by=day`) listed the days by spend, as the other
    groups are: 12-02, 11-30, 12-03, 12-01 for a week read as a time series. In date order."""
    from datetime import UTC, datetime, timedelta

    from budget_middleware.store.tables import UsageRecordRow

    engine = get_engine(_settings(store))
    engine.manager.list_teams()  # the store and its tables
    today = datetime.now(UTC)
    with engine.store.session() as s:
        for back, usd in [(3, 5), (2, 1), (1, 9), (0, 2)]:
            at = today - timedelta(days=back)
            s.add(UsageRecordRow(request_id=f"r{back}", created_at=at, provider="openai",
                                 model="gpt-4o", cost_nanos=usd * 10**9))  # fmt: skip
        s.commit()
    listed = ok(here(store, "usage --by day --since 7d"))
    print(listed.out)
    days = [row[0] for row in table(listed.out)[1:-1]]
    expected = [(today - timedelta(days=back)).date().isoformat() for back in (3, 2, 1, 0)]
    assert days == expected
    as_json = ok(here(store, "usage --by day --since 7d --json")).json()
    assert [row["key"] for row in as_json["usage"]] == expected


def test_a_create_without_its_name_names_the_option(store: dict[str, str], here: Here) -> None:
    """`keys create` with no `--name` said `error: name: Field required` (exit 1), in the
    body's words, not the command's: it names the option, as click does (exit 2)."""
    for line, option in [
        ("keys create --budget 1", "--name"),
        ("model-configs create", "--model-name"),
        ("routes create --name r", "--target"),
    ]:
        refused = here(store, line)
        print(line, "->", refused.code, refused.err.strip())
        assert refused.failed_on_one_line(2).startswith(f"error: Missing option '{option}'")
    made = ok(here(store, """keys create --body '{"name": "from-body"}'"""))
    assert "created virtual key" in made.out


def test_a_negative_amount_is_printed_with_its_sign_first(
    store: dict[str, str], here: Here
) -> None:
    """A negative amount (a refund's record) read `$-5.0000` in the CLI's tables, where the
    dashboard writes `-$5.00` and SPEC §8 writes money `$10.0100`: the sign comes first,
    `-$5.0000`, and under a cent as charged, `-$0.0049996`."""
    from datetime import UTC, datetime

    from budget_middleware.store.tables import UsageRecordRow

    engine = get_engine(_settings(store))
    engine.manager.list_teams()  # the store and its tables
    with engine.store.session() as s:
        for n, (model, nanos) in enumerate([("refund", -5 * 10**9), ("credit", -4_999_600)]):
            s.add(UsageRecordRow(request_id=f"neg{n}", created_at=datetime.now(UTC),
                                 provider="openai", model=model, cost_nanos=nanos))  # fmt: skip
        s.commit()
    listed = ok(here(store, "usage --by model"))
    print(listed.out)
    cost = {row[0]: row[-1] for row in table(listed.out)[1:]}
    assert cost == {"refund": "-$5.0000", "credit": "-$0.0049996", "total": "-$5.0050"}


async def test_config_check_and_apply(store: dict[str, str], tmp_path: Path, here: Here) -> None:
    good, bad = tmp_path / "budget.yaml", tmp_path / "bad.yaml"
    good.write_text(
        "customers:\n  - name: globex\n    budgets: [{max_limit: 50, reset_duration: 1M}]\n"
        "teams:\n  - name: ops\n    customer: globex\n"
        "virtual_keys:\n  - name: bot\n    team: ops\n    value: sk-bm-from-the-config-file\n"
    )
    bad.write_text("teams:\n  - name: ops\n    budgets: [{max_limit: 5, reset_duration: 1x}]\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("customers:\n  - name: caf\u00e9\n".encode("latin-1"))
    checked, refused, undecoded = cli_many(
        store, [f"config check {good}", f"config check {bad}", f"config check {latin}"]
    )
    assert undecoded.failed_on_one_line().startswith(
        f"error: config file '{latin}': not UTF-8 text"
    )  # a traceback of UnicodeDecodeError before
    assert ok(checked).out == f"{good} is valid: customers: 1, teams: 1, virtual keys: 1\n"
    line = refused.failed_on_one_line()
    assert line.startswith(f"error: config file '{bad}', teams[0] (ops): budgets.0.reset_duration")
    assert ok(here(store, f"config check {good} --json")).json() == {
        "file": str(good),
        "valid": True,
        "entries": {"customers": 1, "teams": 1, "virtual_keys": 1},
    }
    assert here(store, f"config apply {bad}").failed_on_one_line() == line
    assert not _exists(store)  # nothing was written, not even the store's schema

    applied = ok(cli(store, f"config apply {good}", script=True))  # on a fresh store
    assert applied.out.startswith(f"applied {good}: customers: 1, teams: 1, virtual keys: 1")
    [key] = ok(here(store, "keys list --json")).json()["virtual_keys"]
    assert key["name"] == "bot" and key["source"] == "config" and key["team_id"] is not None
    assert await _requests(store, "sk-bm-from-the-config-file") == [200]


async def test_a_key_the_config_file_declares_without_a_value_is_named_with_how_to_get_one(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    """A key declared without `value:` was made with a generated value that nobody was shown:
    `config apply` printed "virtual keys: 1" and nothing else, and every request presenting
    the key the operator thought they had made was 401 or served outside its limits. Applying
    the file now names the entry and the command that gives it a value; that value survives
    the file's next apply."""
    path = tmp_path / "budget.yaml"
    path.write_text("virtual_keys:\n  - name: bot\n    budgets: [{max_limit: 1}]\n")
    applied = ok(cli(store, f"config apply {path}"))
    print(repr(applied.err))
    assert "virtual_keys[0] (bot)" in applied.err and "keys rotate bot" in applied.err
    value = value_line(ok(here(store, "keys rotate bot")).out)
    again = ok(cli(store, f"config apply {path}"))
    assert "keys rotate" not in again.err  # made once: told once
    assert await _requests(store, value) == [200]


# -- on a running admin API --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str  # where the admin API is mounted
    base: str  # the host app
    env: dict[str, str]  # what the CLI needs to reach the admin API
    tmp: Path  # a folder of the test's


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """examples/app.py under uvicorn: the middleware, and the admin API at /budget-admin."""
    port = _free_port()
    variables = {
        **os.environ,
        "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/server.db",
        "BUDGET_ADMIN_KEY": ADMIN_KEY,
        "BUDGET_FLUSH_INTERVAL_SECONDS": "0.05",
        "SERVERS_OWN_KEY": "sk-bm-in-the-servers-environment",  # not in the CLI's
    }
    line = f"uvicorn app:app --app-dir {ROOT / 'examples'} --port {port} --log-level warning"
    process = subprocess.Popen([sys.executable, "-m", *shlex.split(line)], env=variables)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/budget-admin/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        url = f"{base}/budget-admin"
        yield Server(url, base, {"BUDGET_ADMIN_URL": url, "BUDGET_ADMIN_KEY": ADMIN_KEY}, tmp_path)
    finally:
        process.terminate()
        process.wait(30)


def test_the_same_commands_on_a_running_admin_api(server: Server, here: Here) -> None:
    unused = {"BUDGET_DATABASE_URL": "sqlite:////nonexistent/never/used.db"}  # not with --url
    line = f"--url {server.url} --admin-key {ADMIN_KEY} customers create --name acme --json"
    acme = ok(cli(unused, line)).json()["customer"]
    line = "keys create --name bob --customer-id acme --budget 5/1d"  # BUDGET_ADMIN_URL, _KEY
    created = ok(cli(server.env, line, script=True))
    value = value_line(created.out)
    assert created.out.count(value) == 1 and f"customer_id:      {acme['id']}" in created.out
    with httpx.Client(base_url=server.base) as http:
        assert http.post("/v1/chat/completions", json=chat(), headers=_key(value)).is_success
        wrong = http.post("/v1/chat/completions", json=chat(), headers=_key("sk-bm-nope-nope"))
        assert wrong.status_code == 401
        deadline = time.monotonic() + 10  # the server's flusher writes the usage record
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        while not http.get("/budget-admin/usage", headers=auth).json()["count"]:
            assert time.monotonic() < deadline, "the usage record was never written"
            time.sleep(0.05)

    wrong_key = {**server.env, "BUDGET_ADMIN_KEY": "not-the-key"}
    usage, unknown = cli_many(server.env, ["usage --by model --since 1h", "keys show nope"])
    [refused] = cli_many(wrong_key, ["keys list"])
    [unreachable] = cli_many({}, ["--url http://127.0.0.1:9/admin --admin-key k keys list"])
    rows = table(ok(usage).out)
    assert rows[1][:2] == ["gpt-4o", "1"] and rows[-1][:2] == ["total", "1"]
    assert unknown.failed_on_one_line() == (
        "error: admin API answered 404: virtual key 'nope' not found"
    )
    assert refused.failed_on_one_line() == (
        "error: admin API answered 401: the bearer token is not BUDGET_ADMIN_KEY"
    )
    line = unreachable.failed_on_one_line()
    assert line.startswith("error: the admin API at http://127.0.0.1:9/admin cannot be reached")

    # The same entry point in process, for the rest.
    line = "budgets list --owner-type virtual_key --json"
    [budget] = ok(here(server.env, line)).json()["budgets"]
    assert budget["user_path"] == "/acme/bob" and budget["spent"] > 0
    reset = ok(here(server.env, f"budgets reset {budget['id']} --json")).json()["budget"]
    assert reset["id"] == budget["id"] and reset["spent"] == 0
    provider = ok(here(server.env, "providers create openai --budget 100/1d"))
    assert provider.out.startswith("created provider openai\n")
    shown = ok(here(server.env, "providers show openai --json")).json()["provider"]
    assert [b["max_limit"] for b in shown["budgets"]] == [100.0]
    assert "already exists" in here(server.env, "providers create openai").failed_on_one_line()
    no_key = here({}, f"--url {server.url} customers list")
    assert "--url needs --admin-key" in no_key.failed_on_one_line(2)
    # config apply on a running admin API: POST /config/apply, applied by the server
    config, broken = server.tmp / "remote.yaml", server.tmp / "broken.yaml"
    config.write_text(
        "teams:\n  - name: remote\n    budgets: [{max_limit: 7, reset_duration: 1d}]\n"
        "virtual_keys:\n  - name: rk\n    team: remote\n    value: sk-bm-remote-config-key\n"
    )
    broken.write_text("teams:\n  - name: x\n    budgets: [{max_limit: 5, reset_duration: 1x}]\n")
    config.write_bytes(config.read_text().encode("utf-16"))  # as Windows writes it: read too
    applied = ok(here(server.env, f"config apply {config}"))
    assert applied.out.startswith(f"applied {config}: teams: 1, virtual keys: 1")
    team = ok(here(server.env, "teams show remote --json")).json()["team"]
    assert team["source"] == "config" and [b["max_limit"] for b in team["budgets"]] == [7.0]
    with httpx.Client(base_url=server.base) as http:  # the server uses the key at once
        assert http.post("/v1/chat/completions", json=chat(),
                         headers=_key("sk-bm-remote-config-key")).is_success  # fmt: skip
    refused_file = here(server.env, f"config apply {broken}").failed_on_one_line()
    print(refused_file)
    assert refused_file.startswith("error: admin API answered 422: ")
    assert "teams[0] (x): budgets.0.reset_duration" in refused_file
    # Only the store can tell this one is invalid: refused all the same, nothing written.
    broken.write_text("customers:\n  - name: early\nteams:\n  - name: y\n    customer: nobody\n")
    refused_reference = here(server.env, f"config apply {broken}").failed_on_one_line()
    print(refused_reference)
    assert "(the config sent), teams[0] (y): customer 'nobody'" in refused_reference
    assert "early" not in ok(here(server.env, "customers list")).out
    assert ok(here(server.env, "alerts list --json")).json() == {"alerts": [], "count": 0}
    # `${ENV_VAR}` is the server's variable: the CLI, which has none, said "not set" and exited 1
    # after the server had applied the file (it checked the file here to count its entries).
    assert "SERVERS_OWN_KEY" not in os.environ
    referring = server.tmp / "referring.yaml"
    referring.write_text("virtual_keys:\n  - name: sk\n    value: ${SERVERS_OWN_KEY}\n")
    applied = ok(here(server.env, f"config apply {referring}"))
    assert (
        applied.out
        == f"applied {referring}: virtual keys: 1 (created, or updated where the entry changed)\n"
    )
    assert "no longer declares team 'remote', virtual key 'rk'" in applied.err  # remote.yaml's
    line = f"config apply {referring} --json"
    assert ok(here(server.env, line)).json() == {
        "file": str(referring),
        "applied": True,
        "entries": {"virtual_keys": 1},
        "warnings": [applied.err.removeprefix("warning: ").removesuffix("\n")],
    }
    # A LiteLLM file: what the server did not read is said here too (it was in its log alone)
    litellm = server.tmp / "proxy_config.yaml"
    litellm.write_text(
        "model_list:\n  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o, rpm: 100}\n"
        "general_settings:\n  master_key: sk-1234\n"
    )
    sent = ok(here(server.env, f"config apply {litellm}"))
    print(sent.err.strip())
    ignored = ["model_list[0].litellm_params.rpm", "general_settings"]
    assert sent.err.startswith(
        f"warning: {litellm} is a LiteLLM config: only its budgets, routes and prices are "
        f"read; ignored: {', '.join(ignored)}\n"
        f"warning: config file {str(litellm)!r} no longer declares team 'remote', "
    )
    assert sent.err.count("\n") == 2
    assert ok(here(server.env, f"config apply {litellm} --json")).json()["ignored"] == ignored
    with httpx.Client(base_url=server.base) as http:
        assert http.post("/v1/chat/completions", json=chat(),
                         headers=_key("sk-bm-in-the-servers-environment")).is_success  # fmt: skip
    good = ROOT / "examples" / "gateway.yaml"  # config check reads the file alone
    assert ok(here(server.env, f"config check {good}")).out.startswith(f"{good} is valid")


def test_the_warnings_of_a_config_applied_on_a_running_admin_api_are_printed(
    server: Server, here: Here, tmp_path: Path
) -> None:
    """`config apply --url` printed "applied …: virtual keys: 1" and nothing else for a key
    declared without a value: the warning that the key was made with a value shown to nobody
    (and how to give it one) was in the server's log alone. Printed as `warning: …` lines, and
    in `--json`, with the text `config apply` on the store prints."""
    path = server.tmp / "valueless.yaml"
    path.write_text("virtual_keys:\n  - name: bot\n    budgets: [{max_limit: 1}]\n")
    sent = ok(here(server.env, f"config apply {path}"))
    print(repr(sent.err))
    local = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/local.db"}
    on_the_store = ok(here(local, f"config apply {path}"))
    print(repr(on_the_store.err))
    told = (
        f"warning: config file {str(path)!r}, virtual_keys[0] (bot): the entry declares no value: "
        "the key was made with a generated one that is shown to nobody; give it one with "
        "`budget-middleware keys rotate bot` (printed once; the file keeps it) or a `value:` in "
        "the file\n"
    )
    assert sent.err == told and on_the_store.err == told
    path.write_text("virtual_keys:\n  - name: bot2\n    budgets: [{max_limit: 1}]\n")
    answer = ok(here(server.env, f"config apply {path} --json")).json()
    print(answer)
    assert [w.split(": ", 1)[0] for w in answer["warnings"]] == [
        f"config file {str(path)!r}, virtual_keys[0] (bot2)",
        f"config file {str(path)!r} no longer declares virtual key 'bot'",
    ]


# -- alerts (SPEC §14) ---------------------------------------------------------------------------


def test_alerts_list_first_on_a_store_of_a_release_before_alerts(
    store: dict[str, str], here: Here
) -> None:
    """`alerts list` run first on a store an earlier release left (version 4, as 90b018b made
    it: no `bm_alerts`): every other command brings the store up to date as it reads it
    (`ensure_schema`), this one read it as it was: "cannot be reached (no such table:
    bm_alerts)" until some other command ran."""
    from sqlalchemy import text

    from budget_middleware.store.database import Store
    from budget_middleware.store.tables import SCHEMA_VERSION

    old = Store(store["BUDGET_DATABASE_URL"])
    old.create_schema()
    with old.engine.begin() as conn:
        conn.execute(text("DROP TABLE bm_alert_deliveries"))
        conn.execute(text("DROP TABLE bm_alerts"))
        conn.execute(text("UPDATE bm_meta SET value = '4' WHERE key = 'schema_version'"))
    old.dispose()
    listed = here(store, "alerts list --json")
    print("alerts list on a version 4 store:", listed.code, listed.out.strip(), listed.err.strip())
    assert ok(listed).json() == {"alerts": [], "count": 0}
    upgraded = Store(store["BUDGET_DATABASE_URL"])
    assert upgraded.schema_version() == SCHEMA_VERSION
    upgraded.dispose()


async def test_alerts_list(store: dict[str, str], here: Here) -> None:
    from budget_middleware.manage.manager import BudgetManager

    if not hasattr(BudgetManager, "list_alerts"):
        pytest.skip("BudgetManager.list_alerts (SPEC §14) is not there yet")
    created = ok(here(store, "keys create --name alice --budget 0.000001/1d"))
    settings = _settings(store)
    app = host_app(settings)
    async with running(app), client(app) as http:  # spends past 80 % and 100 % of the budget
        headers = _key(value_line(created.out))
        assert (await http.post("/v1/chat/completions", json=chat(), headers=headers)).is_success
        deadline = time.monotonic() + 10  # the engine's alert task raises them in the store
        while len(get_manager(settings).list_alerts()) < 2:
            assert time.monotonic() < deadline, "no alerts were raised"
            await asyncio.sleep(0.05)
    listed, as_json = cli_many(store, ["alerts list", "alerts list --json"])
    rows = table(ok(listed).out)
    assert rows[0] == ["RAISED", "TYPE", "OWNER", "THRESHOLD", "BUDGET", "DELIVERY", "ATTEMPTS"]
    assert any(row[2] == "virtual_key alice" for row in rows[1:])
    # No webhook URL: nowhere to deliver ("delivered" in 0 attempts, SPEC's enum), told so.
    assert {(row[5], row[6]) for row in rows[1:]} == {("no webhook", "0")}
    alerts = ok(as_json).json()
    assert alerts["count"] >= 1 and alerts["count"] == len(alerts["alerts"])
    assert {a["owner"]["name"] for a in alerts["alerts"]} == {"alice"}
    assert {(a["delivery"], a["attempts"]) for a in alerts["alerts"]} == {("delivered", 0)}
    filtered = ok(here(store, "alerts list --owner-type team --json")).json()
    assert filtered == {"alerts": [], "count": 0}
    for line in (
        "alerts list --owner-id alice",
        "alerts list --owner-type virtual_key --owner-id alice",
    ):
        named = ok(here(store, line + " --json")).json()  # by its name, as by its id
        assert named["count"] == alerts["count"], line
    key_id = alerts["alerts"][0]["owner"]["id"]
    ok(here(store, "keys delete alice"))
    gone = ok(here(store, f"alerts list --owner-id {key_id} --json")).json()  # deleted: its id
    [typo] = cli_many(store, ["alerts list --owner-id alcie"])
    assert gone["count"] == alerts["count"]
    assert typo.failed_on_one_line().startswith("error: no customer, team, virtual key")
    # `count` is every alert the filters match, as GET /alerts answers, not the page's length
    # (`--limit 1` on the store said 1, the admin API on the same store said 2)
    page = ok(here(store, f"alerts list --owner-id {key_id} --limit 1 --json")).json()
    print(f"--limit 1: {len(page['alerts'])} listed, count {page['count']} of {gone['count']}")
    assert len(page["alerts"]) == 1 and page["count"] == gone["count"] >= 2


def test_an_owner_named_by_its_name_has_its_budgets_and_alerts_listed(
    store: dict[str, str], here: Here
) -> None:
    """`--owner-id alice` (a name, as every other command takes one) printed "(none)" for
    alice's budget: the filter took the name for an id. An owner is found by its id or its
    name, with or without its type. (Alerts: `test_alerts_list`.)"""
    ok(here(store, "teams create --name research --budget 10/1d"))
    key = ok(here(store, "keys create --name alice --budget 5/1d --json")).json()["virtual_key"]
    shown = {}
    for line in (
        "budgets list --owner-id alice",
        "budgets list --owner-type virtual_key --owner-id alice",
        f"budgets list --owner-type virtual_key --owner-id {key['id']}",
        "budgets list --owner-type team --owner-id research",
    ):
        shown[line] = table(ok(here(store, line)).out)
    by_json = ok(here(store, "budgets list --owner-id alice --json")).json()["budgets"]
    print({line: rows[1:] for line, rows in shown.items()})
    for line, rows in shown.items():
        owner = "/research" if "team" in line else "/alice"
        assert [row[1] for row in rows[1:]] == [owner], line
    assert [b["virtual_key_id"] for b in by_json] == [key["id"]]
    # A typo named nothing and printed "(none)", exit 0, as an owner with no budgets would
    typo, typed = cli_many(
        store,
        ["budgets list --owner-id alcie", "budgets list --owner-type virtual_key --owner-id alcie"],
    )
    print(typo.err, typed.err, sep="")
    assert typo.failed_on_one_line() == (
        "error: no customer, team, virtual key, provider, model config, tag or provider config "
        "has the id or name 'alcie'"
    )
    assert typed.failed_on_one_line() == "error: no virtual key has the id or name 'alcie'"
    # A key's provider config is an owner by its id too: one with no budget lists none, exit 0
    body = '{"provider_configs": [{"provider": "openai", "allowed_models": ["*"]}]}'
    made = ok(here(store, f"keys create --name bob --body '{body}' --json")).json()
    config = made["virtual_key"]["provider_configs"][0]["id"]
    assert table(ok(here(store, f"budgets list --owner-id {config}")).out) == [["(none)"]]
    [config_typo] = cli_many(store, ["budgets list --owner-type provider_config --owner-id x1"])
    assert config_typo.failed_on_one_line() == "error: no provider config has the id or name 'x1'"


# -- help ------------------------------------------------------------------------------------------


def _paths(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in getattr(group, "commands", {}).items():
        yield from _paths(command, (*prefix, name))


def test_every_command_has_help(here: Here) -> None:
    paths = list(_paths(cli_group))
    assert len(paths) > 45  # 7 kinds x 5 (+ rotate), budgets, usage, config, alerts
    for path in paths:
        shown = ok(here({}, " ".join([*path, "--help"]))).out
        assert shown.startswith(" ".join(["Usage: budget-middleware", *path])), shown
    script, module = cli_many({}, ["--help"], script=True) + cli_many({}, ["keys --help"])
    assert ok(script).out.startswith("Usage: budget-middleware [OPTIONS] COMMAND [ARGS]...")
    assert "rotate" in ok(module).out
    # A route has no limit: its update's help said "A limit keeps its usage." all the same.
    said = {kind: " ".join(ok(here({}, f"{kind} update --help")).out.split()) for kind in (
        "routes", "keys")}  # fmt: skip
    print(said["routes"][:120])
    assert "limit" not in said["routes"].lower() and "A limit keeps its usage." in said["keys"]


def test_a_soft_budget_from_the_command_line(store: dict[str, str], here: Here) -> None:
    created = ok(here(store, "teams create --name ops --budget 50/1M:soft --budget 5/1d --json"))
    budgets = {b["reset_duration"]: b["soft"] for b in created.json()["team"]["budgets"]}
    assert budgets == {"1M": True, "1d": False}
    listed = ok(here(store, "budgets list"))
    print(listed.out)
    rows = table(listed.out)
    column = rows[0].index("WINDOW") if rows[0][0] == "ID" else 6
    windows = sorted(row[column] for row in rows if row[0] != "ID")
    assert windows == ["1M (soft)", "1d"]
    bad = here(store, "teams create --name x --budget 5/1d:hard")
    assert "unknown budget flag 'hard': only ':soft'" in bad.failed_on_one_line(2)


async def test_an_amount_under_a_cent_is_shown_as_charged(
    store: dict[str, str], here: Here
) -> None:
    """An amount under a cent was rounded to 3 significant digits: $0.0049996 spent of a $0.005
    budget read `$0.005` spent of `$0.005` (not exhausted, $0.0000004 left). It is shown as
    charged, as the refusals and alerts write it (README: `$0.00002`, `$0.000000001`)."""
    key = ok(here(store, "keys create --name tiny --budget 0.005/1d --json")).json()
    value = key["virtual_key"]["value"]
    app = host_app(_settings(store))
    async with running(app), client(app) as http:
        headers = {**_key(value), "x-mock-header-cost": "0.0049996"}
        answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
        assert answer.status_code == 200, answer.text
    [budget] = ok(here(store, "budgets list --json")).json()["budgets"]
    listed = ok(here(store, "budgets list"))
    print(listed.out)
    head, row = table(listed.out)
    shown = {name: row[head.index(name)] for name in ("SPENT", "LIMIT", "REMAINING")}
    print("api:", budget["spent"], budget["max_limit"], budget["remaining"], "shown:", shown)
    assert shown == {"SPENT": "$0.0049996", "LIMIT": "$0.0050", "REMAINING": "$0.0000004"}
    usage = table(ok(here(store, "usage --by key")).out)
    assert usage[1][-1] == usage[2][-1] == "$0.0049996"


async def test_an_amount_is_rounded_half_up_as_charged_not_as_a_binary_float(
    store: dict[str, str], here: Here
) -> None:
    """$0.02265 spent (22,650,000 nano-dollars) read `$0.0226` in `budgets list` and `usage`,
    where the dashboard shows `$0.0227`; a key refused at $10.00005 spent of $10 was told
    "$10.0000 spent of $10.0000": amounts were rounded as binary floats (0.02265 is
    0.0226499…), where money rounds half up (core/money). Half up everywhere now."""
    tie = ok(here(store, "keys create --name tie --budget 1/1d --json")).json()["virtual_key"]
    over = ok(here(store, "keys create --name over --budget 10/1d --json")).json()["virtual_key"]
    app = host_app(_settings(store))
    async with running(app), client(app) as http:
        for key, cost in ((tie, "0.02265"), (over, "10.00005")):
            headers = {**_key(key["value"]), "x-mock-header-cost": cost}
            answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
            assert answer.status_code == 200, answer.text
        refused = await http.post("/v1/chat/completions", json=chat(), headers=_key(over["value"]))
    message = refused.json()["error"]["message"]
    listed = table(ok(here(store, "budgets list")).out)
    head = listed[0]
    shown = {row[1]: (row[head.index("SPENT")], row[head.index("REMAINING")]) for row in listed[1:]}
    usage = {row[1]: row[-1] for row in table(ok(here(store, "usage --by key")).out)[1:]}
    print(f"refused: {message}; budgets list: {shown}; usage: {usage}")
    assert refused.status_code == 402 and "$10.0001 spent of $10.0000" in message
    assert shown == {"/tie": ("$0.0227", "$0.9774"), "/over": ("$10.0001", "$0.0000")}
    assert usage["tie"] == "$0.0227" and usage["over"] == "$10.0001"


def test_budgets_list_on_a_running_app_shows_what_requests_in_flight_hold(
    server: Server, here: Here
) -> None:
    """`budgets list --url` printed RESERVED `$0.0000` while a request was in flight (the API
    answered from the store, which holds no reservation; a fault hunt's). It reads the live
    counters now, as the dashboard does (`from_memory=true`): the stream's reservation while it
    runs, none once it ended."""
    created = ok(cli(server.env, "keys create --name streamer --budget 1/1d", script=True))
    value = value_line(created.out)
    body = chat(stream=True, max_tokens=20)
    # 20 words: some 8 s in flight, for two CLI runs (3 s were too few on a loaded machine)
    headers = {**_key(value), "x-mock-delay-ms": "400"}
    started = threading.Event()
    statuses: list[int] = []

    def stream() -> None:
        with (
            httpx.Client(base_url=server.base, timeout=30) as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer,
        ):
            statuses.append(answer.status_code)
            for _ in answer.iter_bytes():
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(10)
    during = table(ok(cli(server.env, "budgets list --owner-id streamer", script=True)).out)
    as_json = ok(cli(server.env, "budgets list --owner-id streamer --json", script=True)).json()
    thread.join(30)
    after = table(ok(cli(server.env, "budgets list --owner-id streamer", script=True)).out)
    reserved = during[0].index("RESERVED")
    print(f"in flight: {during[1]}; after: {after[1]}")
    assert statuses == [200]
    assert during[1][reserved] not in ("$0.0000", "-") and as_json["budgets"][0]["reserved"] > 0
    assert after[1][reserved] == "$0.0000"


def test_a_provider_is_found_by_any_spelling_of_its_name_on_a_running_admin_api(
    server: Server, store: dict[str, str], here: Here
) -> None:
    """A provider has one name (`google` is `gemini`, `OpenAI` is `openai`); on the store the
    CLI finds it by any spelling, as the admin API's PUT and DELETE do. With --url, `show`,
    `update` and `delete` answered "provider 'google' not found" for the provider just created
    as `google`, and `create Gemini` answered "created" over the existing one."""
    lines = [
        "providers create google --budget 1",
        "providers show Google --json",
        "providers update GOOGLE --budget 2 --json",
        "providers create Gemini",
        "providers delete google",
    ]
    at = f"--url {server.url} --admin-key {ADMIN_KEY}"
    for where, prefix in (("store", ""), ("admin API", at)):
        env = store if where == "store" else {}
        created, shown, updated, again, deleted = [here(env, f"{prefix} {line}") for line in lines]
        print(where, [r.code for r in (created, shown, updated, again, deleted)], shown.err.strip())
        ok(created)
        assert ok(shown).json()["provider"]["provider"] == "gemini"
        assert [b["max_limit"] for b in ok(updated).json()["provider"]["budgets"]] == [2.0]
        assert again.failed_on_one_line() == (
            "error: provider 'Gemini' already exists: change it with 'providers update Gemini'"
        )
        assert ok(deleted).out == "deleted provider gemini\n"


def test_config_apply_on_a_running_admin_api_waits_for_the_server_to_finish(
    server: Server, here: Here, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`config apply --url` of a file the server takes longer to apply than the CLI's timeout
    (3,000 customers: 83 s on SQLite, against 30 s) said `error: the admin API at … cannot be
    reached (timed out)`, exit 1, while the server went on and applied all of it (a script
    told it failed). The server answers once the whole file is applied: the CLI waits for that
    answer. (Here the CLI's timeout is shortened to 0.05 s, not the file lengthened.)"""
    from budget_middleware.cli.client import HttpClient

    monkeypatch.setitem(HttpClient.__init__.__kwdefaults__, "timeout", 0.05)
    config = server.tmp / "many.yaml"
    config.write_text(
        "customers:\n"
        + "".join(f"  - name: c{i}\n    budgets: [{{max_limit: 1}}]\n" for i in range(100))
    )
    started = time.monotonic()
    applied = here(server.env, f"config apply {config}")
    print(applied.code, applied.out.strip(), applied.err.strip(), time.monotonic() - started)
    assert ok(applied).out.startswith(f"applied {config}: customers: 100")
    monkeypatch.setitem(HttpClient.__init__.__kwdefaults__, "timeout", 30.0)
    assert ok(here(server.env, "customers list --json")).json()["count"] == 100


def test_a_name_of_dots_is_one_name_on_a_running_admin_api(server: Server, here: Here) -> None:
    """A customer may be named `..` (a name is 1 to 200 characters): `--url`'s path to it,
    `/customers/..`, was read as "up one level" (httpx removes dot segments), and `show` and
    `delete` answered "admin API answered 307 without a JSON object: is ... where the admin app
    is mounted?"."""
    at = f"--url {server.url} --admin-key {ADMIN_KEY}"
    created = ok(here({}, f"{at} customers create --name .. --json")).json()["customer"]
    shown, dot = [here({}, f"{at} {line}") for line in ("customers show ..", "keys show .")]
    print("show ..:", shown.code, shown.err.strip(), "| show .:", dot.err.strip())
    assert ok(shown).out.startswith(f"id:               {created['id']}\n")
    assert dot.failed_on_one_line() == "error: admin API answered 404: virtual key '.' not found"
    assert ok(here({}, f"{at} customers delete ..")).out.startswith("deleted customer ")


# -- what the operator gives, and what answers -----------------------------------------------------


def test_an_admin_key_no_header_can_carry_is_named(server: Server, here: Here) -> None:
    at = f"--url {server.url} --admin-key"
    quoted = here({}, f"{at} '\u201c{ADMIN_KEY}\u201d' keys list")  # pasted with curly quotes
    print(quoted)  # a traceback of UnicodeEncodeError before
    line = quoted.failed_on_one_line(2)
    assert "--admin-key" in line and "printable ASCII without spaces" in line
    padded = here({}, f"{at} '{ADMIN_KEY}\n' keys list --json")  # read from a file, its newline too
    print(padded)  # "cannot be reached (Illegal header value ...)" before: the server was fine
    assert ok(padded).json() == {"virtual_keys": [], "count": 0}  # trimmed, as the server reads it


def test_a_url_that_is_not_one_is_named(here: Here) -> None:
    results = [here({}, f"--url {url} --admin-key k keys list") for url in
               ["'http://[::1'", "http://localhost:80x/admin"]]  # fmt: skip
    print(results)  # a traceback of httpx.InvalidURL before
    assert [r.failed_on_one_line(2) for r in results] == [
        "error: --url 'http://[::1' is not a URL (Invalid port: ':1')",
        "error: --url 'http://localhost:80x/admin' is not a URL (Invalid port: '80x')",
    ]


@contextmanager
def _answering(status: int, content_type: str, body: bytes) -> Iterator[str]:
    """A server that answers every call the same: `status`, `content_type`, `body`; its URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def other_json_service() -> Iterator[str]:
    """A server that answers every call with a JSON object that is not the admin API's."""
    with _answering(200, "application/json", b'{"status": "ok"}') as url:
        yield url


def test_an_answer_that_is_not_the_admin_apis_is_named(other_json_service: str, here: Here) -> None:
    env = {"BUDGET_ADMIN_URL": other_json_service, "BUDGET_ADMIN_KEY": ADMIN_KEY}
    lines = ["keys list", "budgets list --json", "budgets reset b", "usage --by tag", "keys show x"]
    results = [here(env, line) for line in lines]
    print(results)  # KeyError tracebacks before, and `--json` printed {"status": "ok"}, exit 0
    envelopes = ["virtual_keys", "budgets", "budget", "usage", "virtual_key"]
    assert [r.failed_on_one_line() for r in results] == [
        f"error: admin API answered 200 without {name!r}: is {other_json_service} where the "
        "admin app is mounted?"
        for name in envelopes
    ]


@pytest.fixture
def html_error_service() -> Iterator[str]:
    """A proxy in front of an admin API that is down: every call a 502 HTML page."""
    page = (
        b"<html>\r\n<head><title>502 Bad Gateway &amp; more</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
        b"</body>\r\n</html>\r\n"
    )
    with _answering(502, "text/html", page) as url:
        yield url


def test_an_html_error_page_is_named_by_its_title_on_one_line(
    html_error_service: str, here: Here
) -> None:
    """A proxy's error page was quoted as markup, cut at 200 characters across lines."""
    env = {"BUDGET_ADMIN_URL": html_error_service, "BUDGET_ADMIN_KEY": ADMIN_KEY}
    result = here(env, "keys list")
    print(result)
    assert result.code != 0
    assert result.failed_on_one_line() == "error: admin API answered 502: 502 Bad Gateway & more"


def test_ctrl_c_prints_one_line_and_exits_130(
    store: dict[str, str], here: Here, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budget_middleware.cli import client as client_module
    from budget_middleware.cli import commands

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    get_manager(_settings(store)).list_teams()  # the store exists: `budgets list` needs one
    monkeypatch.setattr(client_module.StoreClient, "budgets", interrupted)  # while a command runs
    running_ = here(store, "budgets list")
    monkeypatch.setattr(commands.cli, "main", interrupted)  # before click has it: start-up
    try:
        starting = here(store, "budgets list")
    except KeyboardInterrupt:  # not re-raised: pytest would take it for the tester's Ctrl-C
        pytest.fail(f"Ctrl-C at start-up escaped run() (a traceback); {running_}")
    print(running_, starting)  # exit 1 "aborted", then a KeyboardInterrupt traceback, before
    # click puts a newline first (after the terminal's "^C"): then the one line
    assert (running_.code, running_.out, running_.err.strip()) == (130, "", "error: interrupted")
    assert starting.failed_on_one_line(130) == "error: interrupted"


def test_config_check_names_every_problem(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "customers:\n  - name: acme\n    budgets: [{max_limit: -5, reset_duration: 1M}]\n"
        "teams:\n  - name: ops\n    budgets: [{max_limit: 5, reset_duration: 1x}]\n"
        "virtual_keys:\n  - name: bot\n    colour: blue\n"
    )
    line = here(store, f"config check {bad}").failed_on_one_line()
    print(line)  # the first problem alone before: three runs to find three
    assert line.startswith(f"error: config file '{bad}', customers[0] (acme): budgets.0.max_limit")
    assert "(and 2 more: teams[0] (ops): budgets.0.reset_duration" in line
    assert "; virtual_keys[0] (bot): colour: Extra inputs are not permitted)" in line
    assert not _exists(store)


def test_a_command_that_reads_makes_no_store_where_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, here: Here
) -> None:
    """Run where the default store (`./budget_middleware.db`) is not, a command that reads made
    the file and its tables, and printed empty results (or, for alerts, "cannot be reached")."""
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "budget_middleware.db"
    lines = [
        "keys list", "teams show research", "budgets list", "usage --by model", "alerts list",
        "keys update alice --inactive", "customers delete acme", "keys rotate alice",
        "budgets reset 1f2e", "--json model-configs list",
    ]  # fmt: skip
    for line in lines:
        refused = here({}, line)  # BUDGET_DATABASE_URL unset: its default
        print(f"{line}: {refused.code} {refused.err.strip()}")
        assert refused.failed_on_one_line() == (
            f"error: no store at sqlite:///./budget_middleware.db: {default} does not exist. "
            "Set BUDGET_DATABASE_URL to your store's URL, or --url to a running admin API; "
            "'create' and 'config apply' make a new store there"
        )
        assert list(tmp_path.iterdir()) == []  # nothing made
    [subprocess_run] = [  # the installed command, as a user runs it
        subprocess.run([str(SCRIPT), "keys", "list"], cwd=tmp_path, capture_output=True,
                       text=True, env=os.environ, timeout=60)
    ]  # fmt: skip
    assert subprocess_run.returncode == 1 and subprocess_run.stdout == ""
    assert subprocess_run.stderr.startswith("error: no store at sqlite:///./budget_middleware.db")
    assert list(tmp_path.iterdir()) == []

    # A command that writes makes the store, as before; then the others read it.
    assert ok(here({}, "teams create --name research")).out.startswith("created team")
    assert default.exists()
    assert table(ok(here({}, "teams list")).out)[1][1] == "research"
    assert ok(here({}, "usage")).out == "no usage in this period\n"
    # A store elsewhere, named by BUDGET_DATABASE_URL, is not affected.
    other = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/elsewhere.db"}
    line = here(other, "keys list").failed_on_one_line()
    assert f"no store at {other['BUDGET_DATABASE_URL']}: {tmp_path}/elsewhere.db" in line


def test_a_command_that_reads_makes_no_tables_in_an_empty_database(
    tmp_path: Path, here: Here
) -> None:
    """On a PostgreSQL database without the store's tables (or a SQLite file without them), a
    command that reads created every table, and printed empty results."""
    from sqlalchemy import create_engine, inspect

    need_postgres()
    empty_file = tmp_path / "empty.db"
    empty_file.touch()
    with private_database(POSTGRES_BASE_URL) as url:
        for env in ({"BUDGET_DATABASE_URL": url},
                    {"BUDGET_DATABASE_URL": f"sqlite:///{empty_file}"}):  # fmt: skip
            engine = create_engine(env["BUDGET_DATABASE_URL"])
            for line in ("keys list", "usage --by model", "budgets list", "teams show research",
                         "keys update alice --inactive", "--json model-configs list"):  # fmt: skip
                refused = here(env, line)
                print(f"{line}: {refused.code} {refused.err.strip()}")
                assert refused.failed_on_one_line() == (
                    f"error: no store at {env['BUDGET_DATABASE_URL']}: the database has no "
                    "budget-middleware tables yet. Set BUDGET_DATABASE_URL to your store's URL, "
                    "or --url to a running admin API; 'create' and 'config apply' make a new "
                    "store there"
                )
                assert inspect(engine).get_table_names() == []  # nothing made
            # A command that writes makes the tables, as before; then the others read them.
            assert ok(here(env, "teams create --name research")).out.startswith("created team")
            assert table(ok(here(env, "teams list")).out)[1][1] == "research"
            assert ok(here(env, "usage")).out == "no usage in this period\n"
            engine.dispose()


def test_times_at_the_calendar_s_ends_are_taken_as_the_admin_api_takes_them(
    store: dict[str, str], here: Here
) -> None:
    """`--expires-at 9999-12-31T23:59:59-05:00` is past year 9999 in UTC: the CLI raised
    OverflowError (a traceback), where the admin API and the Python API clamp it to the
    calendar's end (`to_utc`); so did `--until` and `--since` near either end."""
    created = ok(here(store, "--json keys create --name a --expires-at 9999-12-31T23:59:59-05:00"))
    assert created.json()["virtual_key"]["expires_at"] == "9999-12-31T23:59:59.999999Z"
    ok(here(store, "--json keys create --name b"))  # a key created already expired is refused
    early = ok(here(store, "--json keys update b --expires-at 0001-01-01T00:00:00+05:00"))
    assert early.json()["virtual_key"]["expires_at"] == "0001-01-01T00:00:00Z"
    for line, bounds in (
        ("usage --until 9999-12-31T23:59:59-05:00", (None, "9999-12-31T23:59:59.999999Z")),
        ("usage --since 0001-01-01T00:00:00+05:00", ("0001-01-01T00:00:00Z", None)),
        ("usage --since 0001-01-01T00:00:00+05:00 --until 9999-12-31T23:59:59-14:00",
         ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z")),
    ):  # fmt: skip
        answer = ok(here(store, f"--json {line}")).json()
        print(line, "->", answer["start"], answer["end"])
        assert (answer["start"], answer["end"]) == bounds


def test_config_check_warns_of_what_a_litellm_file_leaves_unread(
    store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, here: Here
) -> None:
    """SPEC §12: a LiteLLM file's other sections are ignored with one warning naming them.
    Applying it warned; `config check` said "valid" alone, and a deployment whose `model:
    os.environ/PROD_MODEL` is unset here (its $50 budget not read) or an `rpm` left unenforced
    was learnt of only at start-up. The check names them too, on stderr (and under `ignored`
    with --json), and still exits 0, as applying the file does."""
    monkeypatch.delenv("PROD_MODEL", raising=False)
    file = tmp_path / "proxy_config.yaml"
    file.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o, rpm: 100, max_budget: 5, budget_duration: 1d}\n"
        "  - model_name: prod\n"
        "    litellm_params: {model: os.environ/PROD_MODEL, max_budget: 50, budget_duration: 30d}\n"
        "general_settings:\n  master_key: sk-1234\n"
    )
    checked = here(store, f"config check {file}")
    print(checked.code, checked.out.strip(), "|", checked.err.strip())
    assert checked.code == 0 and checked.out == f"{file} is valid: model configs: 1, routes: 1\n"
    assert checked.err.count("\n") == 1 and checked.err.startswith(f"warning: {file} is a LiteLLM")
    for part in ("model_list[0].litellm_params.rpm", "os.environ/PROD_MODEL", "general_settings"):
        assert part in checked.err, part
    assert "sk-1234" not in checked.err  # names, never values
    answer = ok(here(store, f"config check {file} --json")).json()
    assert (
        answer["ignored"][0] == "model_list[0].litellm_params.rpm" and len(answer["ignored"]) == 3
    )
    plain = ROOT / "examples" / "gateway.yaml"  # our own format: nothing is ignored, nothing said
    assert ok(here(store, f"config check {plain}")).err == ""
    # Applied to the store: the same warning, once (the log's line said "BUDGET_CONFIG_FILE
    # '…' is a LiteLLM config", a variable this command does not read)
    applied = ok(here(store, f"config apply {file}"))
    print(applied.out.strip(), "|", applied.err.strip())
    assert applied.err == checked.err
    assert ok(here(store, f"config apply {file} --json")).json()["ignored"] == answer["ignored"]


def test_config_check_warns_of_a_variable_only_the_server_has(
    store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, here: Here
) -> None:
    """A key's `value: ${VAR}` is read where the file is applied: checked in a shell without
    VAR, the file failed as invalid ("environment variable VAR is not set", exit 1)."""
    monkeypatch.delenv("BOT_KEY", raising=False)
    monkeypatch.delenv("CI_KEY", raising=False)
    file = tmp_path / "budget.yaml"
    file.write_text(
        "teams:\n  - name: ops\n    budgets: [{max_limit: 5, reset_duration: 1d}]\n"
        "virtual_keys:\n  - name: bot\n    team: ops\n    value: ${BOT_KEY}\n"
        "  - name: ci\n    value: sk-${CI_KEY}\n"
    )
    checked = here(store, f"config check {file}")
    print(checked.code, checked.out.strip(), "|", checked.err.strip())
    assert checked.code == 0
    assert checked.out == f"{file} is valid: teams: 1, virtual keys: 2\n"
    assert checked.err == (
        "warning: BOT_KEY is not set here: the value of virtual_keys[0] (bot) is checked where "
        "the file is applied (--require-env makes it an error)\n"
        "warning: CI_KEY is not set here: the value of virtual_keys[1] (ci) is checked where "
        "the file is applied (--require-env makes it an error)\n"
    )
    answer = ok(here(store, f"config check {file} --json")).json()
    assert answer["valid"] is True and answer["unset_variables"] == {
        "BOT_KEY": ["virtual_keys[0] (bot)"], "CI_KEY": ["virtual_keys[1] (ci)"]
    }  # fmt: skip

    # --require-env: as the server applies it, an unset variable is an error.
    line = here(store, f"config check --require-env {file}").failed_on_one_line()
    assert line.startswith(
        f"error: config file '{file}', virtual_keys[0] (bot): environment variable BOT_KEY is "
        "not set (and 1 more"
    )
    # The rest of the file is still checked: another problem fails it (one line, as ever),
    # and that line does not count the unset variables among the problems.
    file.write_text(file.read_text().replace("1d", "1x"))
    line = here(store, f"config check {file}").failed_on_one_line()
    assert line.startswith(f"error: config file '{file}', teams[0] (ops): budgets.0.reset_duration")
    assert "KEY" not in line and "more" not in line
    # Set here, the values are checked as before: too short a value is named.
    monkeypatch.setenv("BOT_KEY", "short")
    monkeypatch.setenv("CI_KEY", "a-long-enough-value")
    file.write_text(file.read_text().replace("1x", "1d"))
    line = here(store, f"config check {file}").failed_on_one_line()
    assert "virtual_keys[0] (bot): value: String should have at least 8 characters" in line
    # Applying it needs the variables, as ever; nothing is written without them.
    monkeypatch.delenv("BOT_KEY")
    line = here(store, f"config apply {file}").failed_on_one_line()
    assert "environment variable BOT_KEY is not set" in line and not _exists(store)
    with pytest.raises(ConfigFileError, match="environment variable BOT_KEY is not set"):
        get_engine(BudgetSettings(database_url=store["BUDGET_DATABASE_URL"], config_file=file))


def test_config_check_names_a_key_whose_name_has_a_comma_whole(
    store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, here: Here
) -> None:
    """The entry an unset `${VAR}` is named by is the entry's whole label: a key named
    `ci, prod` (in a folder whose name has one too) was cut at its last ", " (`prod)`)."""
    monkeypatch.delenv("PROD_KEY", raising=False)
    folder = tmp_path / "ops, eu"
    folder.mkdir()
    file = folder / "budget.yaml"
    file.write_text('virtual_keys:\n  - name: "ci, prod"\n    value: ${PROD_KEY}\n')
    checked = here(store, f"config check {shlex.quote(str(file))}")
    print(checked.code, checked.out.strip(), "|", checked.err.strip())
    assert checked.code == 0
    assert checked.err == (
        "warning: PROD_KEY is not set here: the value of virtual_keys[0] (ci, prod) is checked "
        "where the file is applied (--require-env makes it an error)\n"
    )
    answer = ok(here(store, f"config check {shlex.quote(str(file))} --json")).json()
    assert answer["unset_variables"] == {"PROD_KEY": ["virtual_keys[0] (ci, prod)"]}


async def test_spend_under_its_limit_is_never_shown_as_the_limit(
    store: dict[str, str], here: Here
) -> None:
    """$0.99996 spent of a $1 budget (it still admits) read `$1.0000` spent of `$1.0000`, and
    $0.019999 of $0.02 `$0.0200` of `$0.0200`: as if used up. Spend under its limit is shown
    with the decimals that tell it from the limit."""
    costs = {"one": (1, 0.99996), "cents": (0.02, 0.019999), "plain": (10, 2.5),
             "tiny": (1, 0.0000219)}  # fmt: skip
    values = {}
    for name, (limit, _) in costs.items():
        made = ok(here(store, f"keys create --name {name} --budget {limit}/1d --json")).json()
        values[name] = made["virtual_key"]["value"]
    app = host_app(_settings(store))
    async with running(app), client(app) as http:
        for name, (_, cost) in costs.items():
            for charge in (cost, 0):  # the second is admitted: not exhausted
                headers = {**_key(values[name]), "x-mock-header-cost": str(charge)}
                answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
                assert answer.status_code == 200, (name, answer.text)
    head, *rows = table(ok(here(store, "budgets list")).out)
    columns = ("SPENT", "LIMIT", "REMAINING", "RESERVED")
    shown = {r[head.index("OWNER")]: tuple(r[head.index(c)] for c in columns) for r in rows}
    listed = ok(here(store, "keys list")).out
    as_json = ok(here(store, "budgets list --json")).json()["budgets"]
    print(shown, listed, sep="\n")
    # What remains under the limit too (`$1.0000` left of `$1.0000` read untouched); what
    # requests in flight hold, the serving processes alone know: not `$0.0000` from the store
    assert shown == {
        "/one": ("$0.99996", "$1.0000", "$0.00004", "-"),
        "/cents": ("$0.019999", "$0.0200", "$0.000001", "-"),
        "/plain": ("$2.5000", "$10.0000", "$7.5000", "-"),
        "/tiny": ("$0.0000219", "$1.0000", "$0.99998", "-"),
    }
    assert {b["reserved"] for b in as_json} == {None}
    assert "$0.99996 of $1.0000/1d" in listed and "$0.019999 of $0.0200/1d" in listed


def test_a_table_s_columns_line_up_under_wide_and_combining_characters(
    store: dict[str, str], here: Here
) -> None:
    """Cells were padded by their number of characters: a name in CJK (two columns a
    character on a terminal) pushed the rest of its row 5 columns right of the heading, and a
    combining accent (no column) pulled it left. Cells are padded by the columns they take."""
    import unicodedata

    for name in ("名前の顧客", "e\u0301mile", "plain"):
        ok(here(store, f"customers create --name '{name}' --budget 5/1d"))
    listed = ok(here(store, "customers list")).out

    def column(line: str, text: str) -> int:  # where `text` starts on a terminal
        before = line[: line.index(text)]
        wide = sum(unicodedata.east_asian_width(c) in "WF" for c in before)
        return len(before) + wide - sum(unicodedata.combining(c) > 0 for c in before)

    lines = listed.splitlines()
    starts = [column(lines[0], "BUDGETS")] + [column(line, "$0.0000") for line in lines[1:]]
    print(listed, "BUDGETS starts at:", starts)
    assert len(set(starts)) == 1


def test_a_budget_or_limit_with_its_duration_left_out_after_the_slash_is_refused(
    store: dict[str, str], here: Here
) -> None:
    """`--budget 10/` (the duration forgotten, or cut by a shell variable left empty:
    `10/$PERIOD`) made a budget of $10 that never resets, a prepaid amount that stops the
    key for good once spent, where the help reads `10` for that. It is a usage error."""
    made = [
        here(store, line)
        for line in (
            "keys create --name a --budget 10/",
            "keys create --name b --budget 10/:soft",
            "teams create --name c --request-limit 60/",
        )
    ]
    print([(r.code, r.err.strip()) for r in made])
    for result in made:
        line = result.failed_on_one_line(2)
        assert "invalid duration ''" in line
    kept = ok(here(store, "keys create --name d --budget 10 --json")).json()["virtual_key"]
    assert kept["budgets"][0]["reset_duration"] is None  # `10` alone: never resets, as before
    keys = ok(here(store, "keys list --json")).json()["virtual_keys"]
    assert [k["name"] for k in keys] == ["d"]  # nothing written by the refused ones


def test_the_dashboard_s_address_as_url_is_named(server: Server, here: Here) -> None:
    """The README has the operator open `<mount>/ui` in a browser; that address given as
    `--url` answered "admin API answered 404: no dashboard asset 'customers'", and a path
    inside the admin app that is no route "no admin route /budget-admin/x/customers", with no
    word of where the admin API is. Both say where to point `--url` now."""
    at = f"--admin-key {ADMIN_KEY} --url"
    ui, inside = [
        here({}, f"{at} {url} customers list") for url in (server.url + "/ui", server.url + "/x")
    ]
    print(ui.err.strip(), inside.err.strip(), sep="\n")
    assert ui.failed_on_one_line() == (
        "error: admin API answered 404: no dashboard asset 'customers' "
        f"(--url {server.url}/ui is the dashboard's address: the admin API is at {server.url})"
    )
    assert inside.failed_on_one_line().endswith(
        f"(is {server.url}/x where the admin API is mounted?)"
    )


PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `git log | head -1`'s git


def test_output_into_a_pipe_that_closed_ends_quietly(store: dict[str, str]) -> None:
    """`budget-middleware keys list | head -1`: the table's next line, written into a pipe that
    `head` had closed, exited 1 (the CLI's status for a failure) with no line naming a cause,
    and a group's help (`keys | head -1`) exited 1 with a BrokenPipeError traceback. Now every
    command ends quietly with 141 (128 + SIGPIPE, as a shell reports `git log | head`'s git):
    nothing on stderr, and `head` has its line. A real pipeline first (the installed script,
    its output past a pipe's 64 KiB), then a pipe whose reader has gone before the command runs
    (every command that prints)."""
    manager = get_manager(_settings(store))
    for n in range(300):  # the table some 75 kB, the --json list 150: past what a pipe holds
        manager.create_virtual_key(name=f"key-{n:03d}-" + "x" * 180)
    env = {**os.environ, **store}
    for args in (["keys", "list"], ["--json", "keys", "list"]):
        cli_process = subprocess.Popen(
            [str(SCRIPT), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        head = subprocess.Popen(["head", "-1"], stdin=cli_process.stdout, stdout=subprocess.PIPE)
        assert cli_process.stdout is not None
        cli_process.stdout.close()  # head alone reads it
        first, _ = head.communicate(timeout=60)
        code = cli_process.wait(timeout=60)
        assert cli_process.stderr is not None
        with cli_process.stderr:
            err = cli_process.stderr.read().decode()
        print(f"{' '.join(args)} | head -1: {first!r}, exit {code}, stderr {err!r}")
        assert first.startswith(b"ID " if args[0] == "keys" else b"{")
        assert (code, err) == (PIPE_CLOSED, "")
    for line in ("keys list", "--json keys list", "usage --by model", "keys", "--help",
                 "keys show key-001-" + "x" * 180):  # fmt: skip
        read, write = os.pipe()
        os.close(read)  # nobody will read: every write meets EPIPE
        try:
            done = subprocess.run(_argv(line, script=False), env=env, cwd=ROOT, stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
        finally:
            os.close(write)
        print(f"{line} > closed pipe: exit {done.returncode}, stderr {done.stderr[-300:]!r}")
        assert (done.returncode, done.stderr) == (PIPE_CLOSED, ""), line
    # and a failure still prints its line and exits 1, into a closed pipe or not
    read, write = os.pipe()
    os.close(read)
    try:
        argv = _argv("keys show nobody", script=False)
        done = subprocess.run(argv, env=env, cwd=ROOT, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr


def test_durations_count_from_the_server_s_clock(
    server: Server, here: Here, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`usage --since 1h` counted back from the CLI's own clock: on a laptop whose clock was
    ten days ahead of the server's, the last hour was ten days to come, and the report of a
    request just made said "no usage in this period"; `--expires-at 30d` made a key that
    expired in 40 days. Through `--url`, a duration counts from the server's time
    (`server_time` of `GET /budgets`), as the dashboard's days do."""
    from datetime import UTC, datetime, timedelta

    import budget_middleware.cli.values as values

    created = ok(here(server.env, "keys create --name clock --json")).json()["virtual_key"]
    with httpx.Client(base_url=server.base) as http:
        sent = http.post("/v1/chat/completions", json=chat(), headers=_key(created["value"]))
        assert sent.is_success
        deadline = time.monotonic() + 10
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        while not http.get("/budget-admin/usage", headers=auth).json()["count"]:
            assert time.monotonic() < deadline, "the usage record was never written"
            time.sleep(0.05)

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Ahead:  # type: ignore[override]
            at = datetime.now(tz or UTC) + timedelta(days=10)
            return cls.fromtimestamp(at.timestamp(), tz)

    monkeypatch.setattr(values, "datetime", Ahead)
    report = ok(here(server.env, "usage --by model --since 1h --json")).json()
    print("start asked:", report["start"], "requests:", report["total"]["requests"])
    line = "keys create --name later --expires-at 30d --json"
    expires = ok(here(server.env, line)).json()["virtual_key"]["expires_at"]
    days = (datetime.fromisoformat(expires) - datetime.now(UTC)) / timedelta(days=1)
    print("--expires-at 30d: expires in", round(days, 3), "days of the server's clock")
    assert report["total"]["requests"] == 1
    assert datetime.fromisoformat(report["start"]) < datetime.now(UTC)
    assert 29.9 < days <= 30


def test_budgets_list_by_a_provider_s_other_spelling_shows_its_budget(
    store: dict[str, str], here: Here
) -> None:
    """`budgets list --owner-type provider --owner-id OpenAI` found provider openai's $10/1d
    budget; without the type it printed "(none)" and exited 0 (a fault hunt's): an owner by any
    spelling of a provider's name is that provider, as everywhere a provider is named."""
    ok(here(store, "providers create openai --budget 10/1d"))
    for line in ("budgets list --owner-type provider --owner-id OpenAI --json",
                 "budgets list --owner-id OpenAI --json"):  # fmt: skip
        budgets = json.loads(ok(here(store, line)).out)["budgets"]
        print(line, "->", [(b["provider"], b["max_limit"]) for b in budgets])
        assert [(b["provider"], b["max_limit"]) for b in budgets] == [("openai", 10.0)]


@pytest.mark.parametrize(
    "body",
    [
        '{"budgets": [{"max_limit": 1, "reset_duration": "1d", "max_limit": 100}]}',
        '{"budgets": [{"max_limit": 1, "reset_duration": "1d"}], "budgets": []}',
    ],
)
def test_a_body_naming_a_key_twice_is_refused_as_the_admin_api_refuses_it(
    store: dict[str, str], tmp_path: Path, here: Here, body: str
) -> None:
    """`customers create --body` made a $100 budget of `max_limit: 1 ... max_limit: 100`, and
    none of `budgets: [$1], budgets: []`, exit 0, where the admin API answers 422 and a config
    file is refused (a fault hunt's): the last key silently won."""
    file = tmp_path / "body.json"
    file.write_text(body)
    for n, option in enumerate((f"--body {shlex.quote(body)}", f"--file {file}")):
        line = here(store, f"customers create --name c{n} {option}").failed_on_one_line(2)
        print(option[:6], "->", line)
        assert "is given twice in one object" in line
    assert not _exists(store)  # nothing written: not even the store made


@pytest.mark.parametrize(
    "option",
    [
        "--budget nan/1d",
        "--budget inf",
        "--budget 1e400/1d",
        """--body '{"budgets": [{"max_limit": NaN}]}'""",
        """--body '{"budgets": [{"max_limit": 1e400, "reset_duration": "1d"}]}'""",
    ],
)
def test_an_amount_json_cannot_carry_is_named_on_one_line(
    store: dict[str, str], here: Here, option: str
) -> None:
    """`--budget nan/1d`, `inf`, `1e400` (read by float()) and a `--body` with `NaN` or
    `1e400` (read by json.loads) are no JSON number: with `--url` the request could not be
    encoded, and the command died with json's ValueError's traceback (exit 1) before sending
    anything; on the store it was refused by the management API instead. Either way, a usage
    error naming the option (exit 2), and nothing written."""
    lines = {
        "url": f"--url http://127.0.0.1:9/admin --admin-key k customers create --name c {option}",
        "store": f"customers create --name c {option}",
    }
    results = {}
    for where, line in lines.items():
        try:
            results[where] = here(store, line)
        except ValueError as exc:  # raised through `run`: a traceback for the user
            results[where] = Result(1, "", f"Traceback ... ValueError: {exc}\n")
    for where, result in results.items():
        print(f"{where}: {option} -> exit {result.code}: {result.err.strip()}")
    for result in results.values():
        error = result.failed_on_one_line(2)
        assert error.startswith(
            ("error: Invalid value for --budget", "error: Invalid value for --body")
        )
    assert not _exists(store)  # nothing written: not even the store made


def test_an_argument_the_terminal_could_not_decode_is_named_on_one_line(
    store: dict[str, str], here: Here
) -> None:
    """An argument holding bytes the locale cannot decode (Latin-1 `\xff` typed or pasted in a
    UTF-8 terminal) reaches Python as a lone surrogate, which no store lookup, URL or JSON body
    can encode: `customers show`, `keys create --team-id` on the store and any command with
    `--url` died with UnicodeEncodeError's traceback. A usage error naming the argument."""
    url = "--url http://127.0.0.1:9/admin --admin-key k"
    lines = [
        "customers create --name acme",  # a store to look in
        "customers show \udcff",
        "keys create --name k --team-id ab\udcff",
        f"{url} customers show \udcff",
        f"{url} customers create --name \udcff",
    ]
    results = []
    for line in lines:
        try:
            results.append(here(store, line))
        except UnicodeEncodeError as exc:  # raised through `run`: a traceback for the user
            results.append(Result(1, "", f"Traceback ... UnicodeEncodeError: {exc}\n"))
    for line, result in zip(lines, results, strict=True):
        print(f"{line!r} -> exit {result.code}: {result.err.strip()}")
    ok(results[0])
    for result in results[1:]:
        line = result.failed_on_one_line(2)
        assert "\\udcff' is not valid text in this terminal's encoding" in line
    keys = ok(here(store, "keys list --json")).json()["virtual_keys"]
    assert keys == []


def test_alerts_list_with_a_limit_past_any_database_integer_on_the_store(
    store: dict[str, str], here: Here
) -> None:
    """`alerts list --limit 100000000000000000000` (any number, as the admin API takes it: a
    page past every list) died on the store with OverflowError's traceback ("Python int too
    large to convert to SQLite INTEGER"). It lists every alert, as with `--url`."""
    ok(here(store, "customers create --name acme"))  # a store to read
    try:
        result = here(store, "alerts list --limit 100000000000000000000 --json")
    except OverflowError as exc:  # raised through `run`: a traceback for the user
        result = Result(1, "", f"Traceback ... OverflowError: {exc}\n")
    print(f"exit {result.code}: {result.out.strip() or result.err.strip()}")
    assert ok(result).json() == {"alerts": [], "count": 0}


def test_a_failure_names_the_store_without_the_password_of_its_query() -> None:
    """`?password=` (libpq's) was printed in clear in the store's error line (a fault hunt's)."""
    url = "postgresql+psycopg://u@127.0.0.1:1/x?password=DBSECRETQ9"
    line = cli({"BUDGET_DATABASE_URL": url}, "keys list").failed_on_one_line()
    print(line)
    assert "DBSECRETQ9" not in line and "password=***" in line


def test_a_config_entry_s_name_reaches_an_error_line_without_its_control_characters(
    tmp_path: Path,
) -> None:
    """A config file's entry named with a line break and terminal escapes was refused, but
    its label `virtual_keys[0] (<name>)` put the name raw in the error line: a forged second
    line, an OSC sequence for the terminal (a fault hunt's). Shown with "?" for each, as a
    request's text is stored."""
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"virtual_keys": [{"name": "a\nFAKE: ok\x1b]0;PWNED\x07"}]}))
    env = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/s.db"}
    line = cli(env, f"config check {file}").failed_on_one_line()
    print(repr(line))
    assert "\x1b" not in line and "\x07" not in line
    assert "(a?FAKE: ok?]0;PWNED?)" in line


def test_a_stored_name_s_control_characters_never_reach_the_terminal(
    store: dict[str, str], here: Here
) -> None:
    """A name stored as an older release wrote it (control characters were not refused then)
    was printed raw in tables: a terminal escape sets the window's title or the clipboard even
    through a pipe (a security hunt's). Shown with "?" for each."""
    import sqlite3

    ok(here(store, "customers create --name acme"))
    with sqlite3.connect(store["BUDGET_DATABASE_URL"].removeprefix("sqlite:///")) as db:
        db.execute("UPDATE bm_customers SET name = ?", ("acme\x1b]0;PWNED\x07\nx",))
    for line in ("customers list", "budgets list"):
        out = ok(here(store, line)).out
        print(repr(out))
        assert "\x1b" not in out and "\x07" not in out
    assert "acme?]0;PWNED??x" in ok(here(store, "customers list")).out


def test_a_stored_name_s_bidi_override_is_not_shown_reordering_the_line(
    store: dict[str, str], here: Here
) -> None:
    """A name with U+202E (right-to-left override), stored before it was refused, was printed
    as is: `alice\u202egnp.exe` reads "aliceexe.png" in a terminal that reorders, and the rest
    of the table's line with it. Shown with "?" for it, as a control character is."""
    import sqlite3

    ok(here(store, "keys create --name alice"))
    with sqlite3.connect(store["BUDGET_DATABASE_URL"].removeprefix("sqlite:///")) as db:
        db.execute("UPDATE bm_virtual_keys SET name = ?", ("alice\u202egnp.exe",))
    out = ok(here(store, "keys list")).out
    print(repr(out))
    assert "\u202e" not in out and "alice?gnp.exe" in out


def _run_in(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    line: str,
) -> tuple[int, str, str]:
    capsys.readouterr()
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code = run(shlex.split(line))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        # PowerShell's `>` and Notepad's "Unicode": UTF-16 with its mark
        ("utf16", '{"name": "from-windows"}'.encode("utf-16")),
        # Notepad's "UTF-8 with BOM"
        ("bom", b"\xef\xbb\xbf" + b'{"name": "with-bom"}'),
    ],
    ids=["utf-16", "utf-8-bom"],
)
def test_a_body_file_written_on_windows_is_read_as_a_config_file_is(
    name: str,
    raw: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--file body.json` read the file in the locale's encoding: UTF-16 (PowerShell's
    `> body.json`) escaped as a UnicodeDecodeError traceback, exit 1 with no `error:` line; a
    UTF-8 byte-order mark was "not valid JSON". A config file in either encoding is read
    (`config_text`)."""
    env = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/b.db"}
    (tmp_path / "body.json").write_bytes(raw)
    try:
        code, out, err = _run_in(
            capsys, monkeypatch, env, f"customers create --file {tmp_path}/body.json"
        )
    except UnicodeDecodeError as exc:
        pytest.fail(f"traceback: {exc!r}")
    print(name, code, out[:80], err)
    assert code == 0, err
    assert out.startswith("created customer ")


def test_a_body_file_that_is_not_text_is_named_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/b.db"}
    (tmp_path / "body.json").write_bytes(b'{"name": "caf\xe9"}')  # Latin-1
    try:
        code, out, err = _run_in(
            capsys, monkeypatch, env, f"customers create --file {tmp_path}/body.json"
        )
    except UnicodeDecodeError as exc:
        pytest.fail(f"traceback: {exc!r}")
    print(code, err)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--file" in err and "UTF-8" in err


def test_a_name_the_output_s_encoding_cannot_write_is_no_traceback(tmp_path: Path) -> None:
    """Output redirected on Windows (`budget-middleware customers list > out.txt`) is in the
    ANSI code page, cp1252 (PYTHONIOENCODING=cp1252 here): a customer named `名前` made the
    table and `--json` end in a UnicodeEncodeError traceback, exit 1, the list cut short."""
    env = {
        **os.environ,
        "BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/b.db",
        "PYTHONIOENCODING": "cp1252",
    }
    for name in ("acme", "名前 😀"):
        made = subprocess.run(
            [sys.executable, "-m", "budget_middleware", "customers", "create", "--name", name],
            env={**env, "PYTHONIOENCODING": "utf-8"},
            capture_output=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
    table, as_json = (
        subprocess.run(
            [sys.executable, "-m", "budget_middleware", "customers", "list", *extra],
            env=env,
            capture_output=True,
            timeout=60,
        )
        for extra in ([], ["--json"])
    )
    print(table.returncode, table.stderr[-200:], as_json.returncode, as_json.stderr[-200:])
    assert table.returncode == 0 and b"Traceback" not in table.stderr
    assert b"acme" in table.stdout and b"?? ?" in table.stdout  # as a control character is shown
    assert as_json.returncode == 0 and b"Traceback" not in as_json.stderr
    names = [c["name"] for c in json.loads(as_json.stdout.decode("cp1252"))["customers"]]
    assert sorted(names) == ["acme", "名前 😀"]  # the same JSON, every character kept


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            "{name: k, provider_configs: [{provider: openai}, {provider: OpenAI}]}",
            "virtual_keys[0] (k): two provider configs for 'openai'",
        ),
        (
            "{name: k, provider_configs: [{provider: openai, budgets: "
            "[{max_limit: 1, reset_duration: 1d}, {max_limit: 2, reset_duration: 1d}]}]}",
            "virtual_keys[0] (k): two budgets of one provider_config have reset_duration 1d",
        ),
    ],
    ids=["two-configs-of-one-provider", "two-budgets-of-one-duration-in-a-config"],
)
def test_config_check_refuses_what_applying_the_file_refuses(
    entry: str,
    error: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`config check` said the file was valid (exit 0) and `config apply` (and start-up, the
    engine's check passing too) then failed on it: the key's write refuses two provider
    configs for one provider, or two budgets of one duration in a config, which the check,
    made "as far as it can be without the store", did not look at."""
    env = {"BUDGET_DATABASE_URL": f"sqlite:///{tmp_path}/b.db"}
    path = tmp_path / "budgets.yaml"
    path.write_text(f"virtual_keys:\n  - {entry}\n")
    checked = _run_in(capsys, monkeypatch, env, f"config check {path}")
    applied = _run_in(capsys, monkeypatch, env, f"config apply {path}")
    print("check:", checked, "apply:", applied)
    assert applied[0] == 1 and error in applied[2]  # the store refuses it
    assert checked[0] == 1, checked
    assert checked[1] == "" and error in checked[2] and str(path) in checked[2]


def test_a_model_config_entry_both_global_and_of_a_key_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scope: global` beside `virtual_key: k` (a line copied from a key's entry) was dropped
    unsaid: the file applied a model config of key k alone, and the $1 limit meant for every
    key held for none of the others. The admin API refuses the same body (`scope: global`
    with a `scope_id`): the entry is refused, naming the file and the entry."""
    url = f"sqlite:///{tmp_path}/b.db"
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "virtual_keys:\n  - {name: k}\n"
        "model_configs:\n"
        "  - {model_name: gpt-4o, scope: global, virtual_key: k,"
        " budgets: [{max_limit: 1, reset_duration: 1d}]}\n"
    )
    code, out, err = _run_in(
        capsys, monkeypatch, {"BUDGET_DATABASE_URL": url}, f"config apply {path}"
    )
    written = [
        (c.scope, c.scope_id)
        for c in get_manager(BudgetSettings(database_url=url)).list_model_configs()[0]
    ]
    print(code, out, err, "model configs written (scope, scope_id):", written)
    assert code == 1 and out == ""
    assert str(path) in err and "model_configs[0] (gpt-4o)" in err and "not both" in err
    assert written == []


# -- what a new user meets first -------------------------------------------------------------------


def check_and_apply(store: dict[str, str], file: Path) -> tuple[Result, Result, Result]:
    """`config check` of `file`, with `--json`, and `config apply`, run at once (and printed)."""
    checked, as_json, applied = cli_many(
        store, [f"config check {file}", f"config check {file} --json", f"config apply {file}"]
    )
    print(checked.code, checked.out.strip(), "|", checked.err.strip(), "|", applied.err.strip())
    return checked, as_json, applied


def test_config_check_says_which_references_it_could_not_check(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    """`config check` reads no store, so a team's `customer: ghost` that the file does not
    declare cannot be checked by it; it said "valid: teams: 1" and nothing else, and `config
    apply` then failed ("customer 'ghost' is neither a name nor an id"). It now says, on
    stdout and stderr, which references are left to applying the file."""
    file = tmp_path / "budget.yaml"
    file.write_text(
        "customers:\n  - name: acme\n"
        "teams:\n  - name: research\n    customer: ghost\n  - name: dev\n    customer: acme\n"
        "virtual_keys:\n  - name: bot\n    team: dev\n"
    )
    checked, as_json, applied = check_and_apply(store, file)
    assert "customer 'ghost' is neither a name nor an id" in applied.failed_on_one_line()
    assert ok(checked).out == (
        f"{file} is valid: customers: 1, teams: 2, virtual keys: 1 (1 unchecked: see the "
        "warnings)\n"
    )
    assert checked.err == (
        f"warning: not checked: teams[0] (research): customer 'ghost' is not declared in "
        f"{file}; applying the file checks it against the store\n"
    )
    assert ok(as_json).json()["unchecked_references"] == ["teams[0] (research): customer 'ghost'"]
    # What the store has, applying the file finds: the same check, the same warning.
    ok(cli(store, "customers create --name ghost"))
    ok(cli(store, f"config apply {file}"))
    assert ok(cli(store, f"config check {file}")).err == checked.err


def test_config_check_says_it_could_not_check_a_reference_by_id(
    store: dict[str, str], tmp_path: Path, here: Here
) -> None:
    """A reference by id (`customer_id`, `team_id`, a model config's `scope_id`: the create
    body's own fields, SPEC §10) names what only the store can hold. `config check` said
    "valid: teams: 1, virtual keys: 1, model configs: 1" with no warning, exit 0, of ids that
    name nothing, and `config apply` then failed ("customer 'ghost-id' not found"). It now
    names each one as not checked, as it does a name the file does not declare."""
    file = tmp_path / "budget.yaml"
    file.write_text(
        "teams:\n  - name: research\n    customer_id: ghost-id\n"
        "virtual_keys:\n  - name: bot\n    team_id: ghost-team\n"
        "model_configs:\n  - model_name: gpt-4o\n    scope: virtual_key\n"
        "    scope_id: ghost-key\n"
    )
    checked, as_json, applied = check_and_apply(store, file)
    assert "customer 'ghost-id' not found" in applied.failed_on_one_line()
    assert ok(checked).out == (
        f"{file} is valid: teams: 1, virtual keys: 1, model configs: 1 (3 unchecked: see the "
        "warnings)\n"
    )
    assert ok(as_json).json()["unchecked_references"] == [
        "teams[0] (research): customer_id 'ghost-id'",
        "virtual_keys[0] (bot): team_id 'ghost-team'",
        "model_configs[0] (gpt-4o): scope_id 'ghost-key'",
    ]


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--budget 1e30/1d", "--budget: '1e30' is out of range"),
        ("--budget 1000000001", "--budget: '1000000001' is out of range"),
        ("--request-limit 99999999999999999999/1m", "--request-limit: '99999999999999999999'"),
        ("--max-concurrent-requests 9999999999", "--max-concurrent-requests: '9999999999'"),
    ],
)
def test_an_option_past_the_admin_apis_bounds_is_a_usage_error(
    option: str, named: str, store: dict[str, str], here: Here
) -> None:
    """`--budget 1e30/1d` exited 1 with the admin API's wording (`budgets.0.max_limit: Input
    should be less than or equal to 1000000000`), while `--budget 1x/1d` exits 2 with "Invalid
    value for --budget": bad input to an option is one exit status and one style of message."""
    bad = here(store, f"customers create --name acme {option}")
    wrong = here(store, "customers create --name acme --budget 1x/1d")
    print(bad.code, bad.err.strip(), "|", wrong.code, wrong.err.strip())
    assert wrong.failed_on_one_line(2).startswith("error: Invalid value for --budget: ")
    assert bad.failed_on_one_line(2).startswith(f"error: Invalid value for {named}")
    assert "less than or equal to" in bad.err
    assert not _exists(store)  # refused before the store is made


def test_providers_and_tags_update_creates_one_as_the_admin_apis_put_does(
    server: Server, store: dict[str, str], here: Here
) -> None:
    """The admin API has no POST for a provider or a tag: its `PUT /providers/{provider}` sets
    the limits and creates it (SPEC §9, 201). `providers update openai` on a store without it
    said "error: provider 'openai' not found" (exit 1), on the store and through --url."""
    at = f"--url {server.url} --admin-key {ADMIN_KEY}"
    ok(here(store, "customers create --name acme"))  # a store (`update` makes none)
    for where, prefix in (("store", ""), ("admin API", at)):
        env = store if where == "store" else {}
        made, again, tag = [
            here(env, f"{prefix} {line}")
            for line in (
                "providers update openai --budget 5/1d",
                "providers update OpenAI --budget 6/1d --json",
                "tags update team:x --budget 1",
            )
        ]
        print(where, made.code, made.err.strip() or made.out.splitlines()[0], "|", tag.err.strip())
        assert ok(made).out.startswith("created provider openai\n")
        assert [b["max_limit"] for b in ok(again).json()["provider"]["budgets"]] == [6.0]
        assert ok(tag).out.startswith("created tag team:x\n")
        listed = ok(here(env, f"{prefix} providers list --json")).json()["providers"]
        assert [p["provider"] for p in listed] == ["openai"]


def test_the_database_url_error_lists_every_scheme_accepted(here: Here) -> None:
    """`postgresql://` is accepted (read as `postgresql+psycopg://`), but a URL of no accepted
    scheme was answered "must be a sqlite:/// (or sqlite+pysqlite:///) or postgresql+psycopg://
    URL": a user with `postgresql://…` in hand could not tell it would do."""
    line = here({"BUDGET_DATABASE_URL": "mysql://db/budgets"}, "customers list")
    print(line.err.strip())
    error = line.failed_on_one_line()
    assert "BUDGET_DATABASE_URL" in error
    for scheme in ("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://"):
        assert scheme in error, scheme


def test_a_tag_given_twice_to_a_key_is_refused_on_the_store_and_the_admin_api(
    store: dict[str, str], server: Server, here: Here
) -> None:
    """`--tag dup --tag dup` (or `"tags": ["dup", "dup"]`) was stored and shown twice (`tags:
    dup, dup`) while every request of the key carries the tag once: accepted silently, as no
    route's target nor provider config is. It is refused, naming the tag; a key's tags are
    case-sensitive (`a` and `A` are two)."""
    for env in (store, server.env):
        made = here(env, "keys create --name twice --tag dup --tag other --tag dup")
        print(made.code, made.err.strip())
        assert "tag 3, 'dup', is given twice" in made.failed_on_one_line()
        key = ok(here(env, "keys create --name k --tag a --tag A --json")).json()["virtual_key"]
        assert key["tags"] == ["a", "A"]
        changed = here(env, """keys update k --body '{"tags": ["x", "x"]}'""")
        assert "tag 2, 'x', is given twice" in changed.failed_on_one_line()
        keys = ok(here(env, "keys list --json")).json()["virtual_keys"]
        assert [(k["name"], k["tags"]) for k in keys] == [("k", ["a", "A"])]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device always full)")
def test_output_that_cannot_be_written_is_a_failure_on_one_line(store: dict[str, str]) -> None:
    """`budget-middleware usage --json > report.json` on a full disk: every command that
    printed (a table, JSON, a key's fields, a create's `value:` line, the help) died with an
    OSError's traceback. Now each is one line naming it, exit 1 (`/dev/full` fails every write
    with ENOSPC, as a full disk does)."""
    manager = get_manager(_settings(store))
    for n in range(100):  # a table of some 25 kB
        manager.create_virtual_key(name=f"key-{n:03d}-" + "x" * 180)
    env = {**os.environ, **store}
    for line in ("keys list", "--json keys list", "keys show key-001-" + "x" * 180,
                 "keys create --name new", "--help"):  # fmt: skip
        with open("/dev/full", "w") as full:
            done = subprocess.run(_argv(line, script=False), env=env, cwd=ROOT, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
        print(f"{line[:20]} > /dev/full: exit {done.returncode}, stderr {done.stderr[-200:]!r}")
        assert done.returncode == 1, line
        assert done.stderr == "error: the output could not be written: No space left on device\n"
    # and an output closed before the command runs (`>&-`): `keys create` printed nothing, its
    # value lost, and exited 0; now nothing is done, one line names it, exit 1
    argv = _argv("keys create --name never-shown", script=False)
    done = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', *argv], env=env, cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    print(f"keys create >&-: exit {done.returncode}, stderr {done.stderr!r}")
    assert done.returncode == 1
    assert done.stderr == "error: the output could not be written: standard output is closed\n"
    assert not [k for k in manager.list_virtual_keys() if k.name == "never-shown"]


def test_a_write_the_admin_api_does_not_answer_in_time_may_have_been_made(
    here: Here, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command whose request reached the admin API and got no answer in time said `the admin
    API at … cannot be reached (timed out)`: of a write (`keys create`), which the server may
    well have made, a script then made the key again (a hunt's note). Now the line says the
    server did not answer in time and, of a write, that it may have been made; a server that
    cannot be connected to is still `cannot be reached`."""
    from budget_middleware.cli.client import HttpClient

    monkeypatch.setitem(HttpClient.__init__.__kwdefaults__, "timeout", 0.2)
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()  # bound, not listening: a connection is refused
    closed.bind(("127.0.0.1", 0))
    try:
        at = f"--url http://127.0.0.1:{silent.getsockname()[1]} --admin-key {ADMIN_KEY}"
        write = here({}, f"{at} keys create --name k").failed_on_one_line()
        read = here({}, f"{at} keys list").failed_on_one_line()
        gone = f"--url http://127.0.0.1:{closed.getsockname()[1]} --admin-key {ADMIN_KEY}"
        refused = here({}, f"{gone} keys create --name k").failed_on_one_line()
    finally:
        silent.close()
        closed.close()
    print(write, read, refused, sep="\n")
    assert "did not answer within 0.2 s" in write and "may have been made" in write
    assert "did not answer within 0.2 s" in read and "may have been made" not in read
    assert "cannot be reached" in refused
