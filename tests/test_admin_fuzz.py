"""The admin API keeps to its own OpenAPI document (issue 11, item 7).

First a schema-driven fuzzer: Schemathesis loads `openapi.json` from the app (in process, through
ASGI) and runs every phase (examples, coverage, fuzzing, stateful) with every check over every
operation the document lists, so routes added later are covered without touching this file. It
must find nothing: no 5xx, no status missing from the document, no request valid by the document
refused (nor one invalid by it accepted), no unknown query parameter accepted.

Then one plain test per class of bug the fuzzer found.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.generation.meta import TestPhase
from schemathesis.python import asgi

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import BudgetSettings, get_engine
from budget_middleware.admin import create_admin_app
from budget_middleware.admin.context import QueryParam, Refused

# -- the fuzzer ------------------------------------------------------------------------------

# A fixed seed and derandomized generation: the same cases on every run, so a failure is a bug
# to fix (and to replay), never bad luck. MAX_EXAMPLES bounds the fuzzing and stateful phases;
# the coverage phase (boundaries, each parameter's invalid values) is not random anyway.
SEED = 20261107
MAX_EXAMPLES = 20
# Long and unlike anything in the document: a generated key value can never be the admin key.
ADMIN_KEY = "fuzz-admin-key-0c5e2b19d7a4"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Figures:
    """What the fuzzer saw, and every disagreement it found (each as a line to print)."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[str] = field(default_factory=list)
    undocumented: list[str] = field(default_factory=list)
    unknown_accepted: list[str] = field(default_factory=list)
    failed_checks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    engine_errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        checks = {name: len(lines) for name, lines in self.failed_checks.items()}
        return (
            f"admin API fuzz: {self.cases} cases over {len(self.by_operation)} operations; "
            f"statuses {dict(sorted(self.statuses.items()))}; 5xx {len(self.server_errors)}, "
            f"undocumented statuses {len(self.undocumented)}, "
            f"valid requests refused {checks.get('positive_data_acceptance', 0)}, "
            f"unknown query parameters accepted {len(self.unknown_accepted)}, "
            f"failed checks {checks}, engine errors {len(self.engine_errors)}"
        )


def _documented(operation: Any, status: int) -> bool:
    responses = operation.definition.raw.get("responses", {})
    return str(status) in responses or f"{status // 100}XX" in responses or "default" in responses


def _declared_query(operation: Any) -> set[str]:
    return {p.name for p in operation.iter_parameters() if p.location.value == "query"}


def _record(figures: Figures, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    for case_id, interaction in recorder.interactions.items():
        response = interaction.response
        if response is None:
            continue
        case = recorder.cases[case_id].value
        operation = case.operation
        request = interaction.request
        line = f"{request.method} {request.uri} -> {response.status_code}"
        figures.cases += 1
        figures.statuses[response.status_code] += 1
        figures.by_operation[operation.label][response.status_code] += 1
        if response.status_code >= 500:
            figures.server_errors.append(f"{line}: {response.content[:300]!r}")
        same_method = request.method.upper() == operation.method.upper()
        if same_method and not _documented(operation, response.status_code):
            figures.undocumented.append(line)
        query = [name for name, _ in parse_qsl(urlsplit(request.uri).query, True)]
        unknown = set(query) - _declared_query(operation)
        # With an unknown parameter, only a 422 will do (or a refusal that comes first: no
        # credential 401, no such route 404, no such method 405).
        if unknown and response.status_code not in (401, 404, 405, 422):
            figures.unknown_accepted.append(f"{line} (unknown: {sorted(unknown)})")
    for case_id, nodes in recorder.checks.items():
        for node in nodes:
            if node.failure_info is None:
                continue
            interaction = recorder.interactions.get(case_id)
            where = case_id
            if interaction is not None:  # with what was sent and answered, to replay it
                sent, answer = interaction.request, interaction.response
                where = f"{sent.method} {sent.uri} {(sent.body or b'')[:300]!r}"
                if answer is not None:
                    where += f" -> {answer.status_code} {answer.content[:200]!r}"
            failure = node.failure_info.failure
            message = f"{failure.title}: {failure.message}".replace("\n", " ")[:300]
            figures.failed_checks[node.name].append(f"{where}: {message}")


def _fuzz(schema: Any) -> Figures:
    figures = Figures()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(figures, event)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            figures.engine_errors.append(repr(event)[:500])
    return figures


def _with_shutdown(app: Any, settings: BudgetSettings) -> Any:
    """The app, with a lifespan that shuts its engine down in the loop that started it (the
    engine starts on the first request, in Schemathesis' ASGI event loop)."""

    async def host(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await get_engine(settings).shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return host


@dataclass(frozen=True)
class Seeded:
    """Objects made before the run; positive cases of id routes often name them, so that those
    routes are exercised beyond 404. DELETE cases name objects of their own (`doomed`), so that
    deleting never takes an object from the cases that follow."""

    by_path: dict[str, dict[str, str]]
    doomed: dict[str, dict[str, str]]


def _seed(app: Any) -> Seeded:
    daily = [{"max_limit": 10, "reset_duration": "1d"}]
    with asgi.get_client(app) as client:

        def post(path: str, body: dict[str, Any], name: str) -> dict[str, Any]:
            response = client.post(path, json=body, headers=AUTH)
            assert response.status_code == 201, response.text
            created: dict[str, Any] = response.json()[name]
            return created

        def objects(prefix: str) -> dict[str, dict[str, Any]]:
            customer = post("/customers", {"name": f"{prefix}-acme", "budgets": daily}, "customer")
            team = post("/teams", {"name": f"{prefix}-research", "customer_id": customer["id"]},
                        "team")  # fmt: skip
            key = post(
                "/virtual-keys",
                {"name": f"{prefix}-alice", "team_id": team["id"], "budgets": daily,
                 "rate_limit": {"request_max_limit": 60, "request_reset_duration": "1m"},
                 "provider_configs": [{"provider": "openai", "allowed_models": ["gpt-4o*"]}]},
                "virtual_key",
            )  # fmt: skip
            rule = post(
                "/model-configs",
                {"model_name": f"{prefix}-gpt-4o", "scope": "virtual_key", "scope_id": key["id"]},
                "model_config",
            )
            for path in (f"/providers/{prefix}-openai", f"/tags/{prefix}:chat"):
                assert client.put(path, json={"budgets": daily}, headers=AUTH).status_code == 201
            return {"customer": customer, "team": team, "key": key, "rule": rule}

        kept, doomed = objects("seed"), objects("doomed")
    by_path = {
        "/customers/{id}": {"id": kept["customer"]["id"]},
        "/teams/{id}": {"id": kept["team"]["id"]},
        "/virtual-keys/{id}": {"id": kept["key"]["id"]},
        "/virtual-keys/{id}/rotate": {"id": kept["key"]["id"]},
        "/model-configs/{id}": {"id": kept["rule"]["id"]},
        "/budgets/{id}/reset": {"id": kept["customer"]["budgets"][0]["id"]},
        "/providers/{provider}": {"provider": "seed-openai"},
        "/tags/{tag}": {"tag": "seed:chat"},
    }
    return Seeded(
        by_path,
        {
            "/customers/{id}": {"id": doomed["customer"]["id"]},
            "/teams/{id}": {"id": doomed["team"]["id"]},
            "/virtual-keys/{id}": {"id": doomed["key"]["id"]},
            "/model-configs/{id}": {"id": doomed["rule"]["id"]},
            "/providers/{provider}": {"provider": "doomed-openai"},
            "/tags/{tag}": {"tag": "doomed:chat"},
        },
    )


def _steer_to(seeded: Seeded) -> Callable[[Any, Any], Any]:
    """A `map_case` hook: in the fuzzing phase, every other positive case of a route of a
    seeded object names that object (the stateful phase follows its own links, from the objects
    it creates)."""
    turns: Counter[str] = Counter()

    def map_case(context: Any, case: Any) -> Any:
        meta = case.meta
        if (
            case.operation.path == "/config/apply"
            and meta is not None
            and meta.generation.mode.is_positive
            and isinstance(case.body, dict)
        ):
            # What a config file may say is not JSON Schema's to describe: a positive case
            # sends a valid (empty) one in the format it names; negative ones stay as made.
            empty = "{}" if case.body.get("format") == "json" else "teams: []\n"
            case.body = {**case.body, "text": empty}
            return case
        if (
            case.operation.path == "/usage"
            and meta is not None
            and meta.generation.mode.is_positive
        ):
            return _in_order(case)
        if (
            case.operation.path == "/virtual-keys"
            and case.operation.method.upper() == "POST"
            and meta is not None
            and meta.generation.mode.is_positive
        ):
            return _not_expired(case)
        delete = case.operation.method.upper() == "DELETE"
        values = (seeded.doomed if delete else seeded.by_path).get(case.operation.path)
        meta = case.meta
        if values is None or meta is None or meta.phase.name != TestPhase.FUZZING:
            return case
        if not meta.generation.mode.is_positive:
            return case
        turns[case.operation.label] += 1
        if turns[case.operation.label] % 2:
            case.path_parameters = {**case.path_parameters, **values}
        return case

    return map_case


_BOUND = QueryParam("start", {"type": "string", "format": "date-time"})


def _in_order(case: Any) -> Any:
    """A positive case of `GET /usage` keeps to the rule its description states and no schema
    can (one parameter against another): an `end` before `start` is a 422, so a generated pair
    in that order is sent the other way round (the 422 has a test of its own)."""
    query = case.query
    if not isinstance(query, dict) or not {"start", "end"} <= query.keys():
        return case
    try:
        start, end = _BOUND.parse(str(query["start"])), _BOUND.parse(str(query["end"]))
    except Refused:  # not a valid moment: the server refuses it whatever the order
        return case
    if end < start:
        case.query = {**query, "start": query["end"], "end": query["start"]}
    return case


def _not_expired(case: Any) -> Any:
    """A positive case of `POST /virtual-keys` keeps to the rule its `expires_at` states and
    no schema can (the time against the clock): a key created already expired is a 422 (a test
    of its own), so a generated time in the past is sent as none."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("expires_at"), str):
        return case
    try:
        moment = _BOUND.parse(body["expires_at"])
    except Refused:  # not a valid moment: refused for that whenever it is
        return case
    if moment <= datetime.now(UTC):
        case.body = {**body, "expires_at": None}
    return case


@contextmanager
def _fuzzed_app(tmp_path: Path) -> Iterator[tuple[Any, Seeded]]:
    settings = admin_settings(tmp_path, admin_key=ADMIN_KEY)
    app = _with_shutdown(create_admin_app(settings), settings)
    try:
        yield app, _seed(app)
    finally:
        asgi.shutdown_lifespans()  # our lifespan: the engine's shutdown, in its own loop


def test_schemathesis_finds_no_disagreement_between_the_admin_api_and_its_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "headers": AUTH,
            "workers": 1,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                           "database": "none"},
            "checks": {"enabled": True},
            "phases": {phase: {"enabled": True}
                       for phase in ("examples", "coverage", "fuzzing", "stateful")},
        }
    )  # fmt: skip
    with _fuzzed_app(tmp_path) as (app, seeded):
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=AUTH)
        schema.hook("map_case")(_steer_to(seeded))
        figures = _fuzz(schema)
    with capsys.disabled():
        print("\n" + figures.summary())

    def lines(found: list[str]) -> str:
        return "\n  ".join(found[:15])

    assert not figures.engine_errors, lines(figures.engine_errors)
    assert not figures.server_errors, lines(figures.server_errors)
    assert not figures.undocumented, lines(figures.undocumented)
    assert not figures.unknown_accepted, lines(figures.unknown_accepted)
    for name, found in figures.failed_checks.items():
        assert not found, f"check {name} failed {len(found)} times:\n  {lines(found)}"
    # The run was not vacuous: every documented operation was called, the seeded objects were
    # found, and both sides of each answer (accepted, refused) were seen.
    document = schema.raw_schema
    paths = document["paths"]
    documented = {f"{method.upper()} {path}" for path in paths for method in paths[path]}
    documented.discard("GET /openapi.json")  # Schemathesis loaded it, and tests no further
    assert documented <= set(figures.by_operation), documented - set(figures.by_operation)
    for path, methods in paths.items():
        for method in methods:
            label = f"{method.upper()} {path}"
            seeds = seeded.doomed if method == "delete" else seeded.by_path
            if path in seeds:  # found by id: the seeded object at least
                assert figures.by_operation[label][200] > 0, (label, figures.by_operation[label])
    assert {200, 201, 401, 404, 405, 409, 422} <= set(figures.statuses), figures.statuses
    assert figures.cases >= 1000, figures.summary()


# -- the bugs it found, one test each ---------------------------------------------------------


@pytest.fixture
def settings(make_settings: Callable[..., BudgetSettings]) -> BudgetSettings:
    """On SQLite, and on PostgreSQL when it runs (its integers and texts have other limits)."""
    return make_settings()


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


HUGE = str(2**63)  # one past PostgreSQL's bigint and SQLite's integer: it was a 500 (or 503)
BAD_PAGES = [f"limit=-{HUGE}", f"offset=-{HUGE}", "limit=0", "offset=-1", "limit=-5",
             "limit=1.5", "limit=1e3", "limit=x", "limit=", "offset=", "limit=%201", "limit=1_0",
             "limit=%D9%A1", "limit=-" + "9" * 5000]  # fmt: skip


async def test_out_of_range_pages_answer_422_naming_the_parameter(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        for path in ("/model-configs", "/customers", "/budgets", "/tags"):
            for query in BAD_PAGES:
                r = await c.get(f"{path}?{query}", headers=ADMIN)
                assert r.status_code == 422, (path, query[:40], r.text)
                assert _error(r)["param"] == query.split("=")[0], r.text


@pytest.mark.parametrize(
    "big", ["10001", "1000000000001", "9" * 40, "9" * 5000, "0" * 5000 + "10001"]
)
async def test_any_limit_and_offset_past_every_list_are_answered(
    settings: BudgetSettings, big: str
) -> None:
    """SPEC §9: `limit` ≥ 1 and `offset` ≥ 0, others 422; a large one is a page past every
    list, not an error (10,001 and beyond answered 422 'must be at most 10000')."""
    async with admin_client(settings) as c:
        assert (await c.post("/model-configs", json={"model_name": "m"}, headers=ADMIN)).is_success
        for path in ("/model-configs", "/customers", "/budgets", "/tags", "/usage/rejected"):
            r = await c.get(f"{path}?limit={big}&offset={big}", headers=ADMIN)
            assert r.status_code == 200, (path, r.text)
        r = await c.get(f"/model-configs?limit={big}&offset={big}", headers=ADMIN)
        assert r.json() == {"model_configs": [], "total_count": 1}
        r = await c.get(f"/model-configs?limit={big}&offset=0", headers=ADMIN)
        assert [m["model_name"] for m in r.json()["model_configs"]] == ["m"]
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
        for path in ("/model-configs", "/customers", "/budgets", "/tags"):
            params = document["paths"][path]["get"]["parameters"]
            schemas = {p["name"]: p["schema"] for p in params}
            assert schemas["limit"] == {"type": "integer", "minimum": 1}
            assert schemas["offset"] == {"type": "integer", "minimum": 0, "default": 0}


async def test_an_unknown_query_parameter_answers_422_naming_it(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        r = await c.get("/model-configs?limit=1&provder=openai", headers=ADMIN)  # a typo
        assert r.status_code == 422
        error = _error(r)
        assert error["param"] == "provder" and error["code"] == "unknown_parameter"
        assert "'provder'" in error["message"] and "provider" in error["message"]
        for path in ("/health", "/openapi.json", "/metrics", "/customers/nope",
                     "/budgets?owner_type=tag"):  # fmt: skip
            r = await c.get(f"{path}{'&' if '?' in path else '?'}surprise=1", headers=ADMIN)
            assert r.status_code == 422 and _error(r)["param"] == "surprise", (path, r.text)
        r = await c.get("/virtual-keys/quota?surprise=1")  # the credential is checked first
        assert r.status_code == 401
        r = await c.get("/budgets?owner_type=team&owner_type=tag", headers=ADMIN)
        assert r.status_code == 422 and "more than once" in _error(r)["message"]


async def test_typed_query_parameters_refuse_what_their_schema_refuses(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        for query in ("from_memory=", "from_memory=maybe", "owner_type=", "owner_type=user",
                      "limit=", "offset="):  # fmt: skip
            r = await c.get(f"/budgets?{query}", headers=ADMIN)
            assert r.status_code == 422, (query, r.text)
        for query in ("owner_id=", "from_memory=true", "from_memory=0", "owner_type=tag"):
            assert (await c.get(f"/budgets?{query}", headers=ADMIN)).status_code == 200, query
        for query in ("start=", "start=2026-01-01T00:00:00", "start=20260101", "end=2026-13-01",
                      "start=2026-01-01T00:00:00%2B24:00", "end=1700000000"):  # fmt: skip
            r = await c.get(f"/usage?{query}", headers=ADMIN)
            assert r.status_code == 422 and _error(r)["param"] in ("start", "end"), query


async def test_a_flag_takes_every_spelling_fastapi_takes(tmp_path: Path) -> None:
    """A boolean query parameter (`from_memory`) reads as a FastAPI route's `bool` does
    (pydantic's spellings, any case): `yes`/`no` were taken but `on`/`off`, `t`/`f`, `y`/`n`
    answered 422, so a client that worked against a FastAPI service was refused here."""
    from pydantic import TypeAdapter, ValidationError

    as_bool = TypeAdapter(bool)
    spellings = ["true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n",
                 "TRUE", "On", "OFF", "Y", "maybe", "2", "tru", "nope"]  # fmt: skip
    differ = []
    async with admin_client(admin_settings(tmp_path)) as c:
        for spelling in spellings:
            try:
                as_bool.validate_python(spelling)
                expected = 200
            except ValidationError:
                expected = 422
            r = await c.get(f"/budgets?from_memory={spelling}", headers=ADMIN)
            if r.status_code != expected:
                differ.append((spelling, r.status_code, expected))
    print(f"spellings answered otherwise than FastAPI would: {differ}")
    assert differ == []


@pytest.mark.parametrize(
    "moment",
    ["0001-01-01T00:00:00%2B01:00", "9999-12-31T23:59:59-01:00", "0001-01-01", "9999-12-31",
     "2026-01-01t10:00:00.123456789z"],
)  # fmt: skip
async def test_times_at_the_ends_of_the_calendar_do_not_overflow(
    settings: BudgetSettings, moment: str
) -> None:
    async with admin_client(settings) as c:
        for query in (f"start={moment}", f"end={moment}", f"start={moment}&end={moment}"):
            r = await c.get(f"/usage?group_by=day&{query}", headers=ADMIN)
            assert r.status_code == 200, (query, r.text)
            assert r.json()["count"] == 0


@pytest.mark.parametrize(
    ("expires_at", "stored"),
    [("0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z"),
     ("9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59.999999Z"),
     ("2030-01-01T02:00:00+02:00", "2030-01-01T00:00:00Z")],
)  # fmt: skip
async def test_a_key_expiring_at_the_ends_of_the_calendar_is_stored_in_utc(
    settings: BudgetSettings, expires_at: str, stored: str
) -> None:
    async with admin_client(settings) as c:
        # Set by an update: a key created already expired (year 1) is a 422 (its own test).
        r = await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        key_id = r.json()["virtual_key"]["id"]
        r = await c.put(f"/virtual-keys/{key_id}", json={"expires_at": expires_at},
                        headers=ADMIN)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["virtual_key"]["expires_at"].replace("+00:00", "Z") == stored


async def test_nul_characters_answer_422_on_every_store(settings: BudgetSettings) -> None:
    """PostgreSQL cannot store U+0000: it was a 503 "store cannot be reached" there."""
    async with admin_client(settings) as c:
        r = await c.post("/customers", json={"name": "a\x00b"}, headers=ADMIN)
        assert r.status_code == 422 and _error(r)["param"] == "name", r.text
        body = {"name": "k", "tags": ["ok", "t\x00"], "budgets": [{"id": "\x00", "max_limit": 1}]}
        r = await c.post("/virtual-keys", json=body, headers=ADMIN)
        assert r.status_code == 422 and _error(r)["param"] == "tags.1", r.text
        for method, path in (("GET", "/customers/a%00b"), ("PUT", "/providers/a%00b"),
                             ("GET", "/budgets?owner_id=%00")):  # fmt: skip
            r = await c.request(method, path, json={}, headers=ADMIN)
            assert r.status_code == 422, (path, r.text)
        assert (await c.get("/customers", headers=ADMIN)).json()["count"] == 0


async def test_a_lone_surrogate_in_a_reference_answers_422_on_every_store(
    settings: BudgetSettings,
) -> None:
    """JSON's `"\\ud800"` (half a surrogate pair: valid JSON, no Unicode text) in a name was
    refused 422, but in a reference to another object (`team_id`, `customer_id`, `scope_id`) it
    reached the store's lookup, whose UTF-8 encoding raised UnicodeEncodeError: a 500 with no
    error body, on create and update alike. It is a 422 naming the field, as U+0000 is."""
    async with admin_client(settings) as c:
        team = (await c.post("/teams", json={"name": "t"}, headers=ADMIN)).json()["team"]
        key = (await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)).json()
        key_id = key["virtual_key"]["id"]
        cases = [
            ("POST", "/virtual-keys", {"name": "k2", "team_id": "\ud800"}, "team_id"),
            ("POST", "/virtual-keys", {"name": "k3", "customer_id": "a\udfff"}, "customer_id"),
            ("POST", "/teams", {"name": "t2", "customer_id": "\ud800"}, "customer_id"),
            ("PUT", f"/teams/{team['id']}", {"customer_id": "\ud800"}, "customer_id"),
            ("PUT", f"/virtual-keys/{key_id}", {"team_id": "\udbff"}, "team_id"),
            ("POST", "/model-configs",
             {"model_name": "gpt-4o", "scope": "virtual_key", "scope_id": "\ud800"}, "scope_id"),
        ]  # fmt: skip
        found = []
        headers = {**ADMIN, "content-type": "application/json"}
        for method, path, body, _param in cases:
            raw = json.dumps(body).encode()  # the surrogate as its `\ud800` escape
            try:
                r = await c.request(method, path, content=raw, headers=headers)
                found.append((r.status_code, _error(r).get("param")))
            except UnicodeEncodeError:  # raised through the app: a server answers 500
                found.append((500, None))
        print(found)
        assert found == [(422, param) for *_, param in cases]
        assert (await c.get("/virtual-keys", headers=ADMIN)).json()["count"] == 1


async def test_bodies_are_required_and_bounded(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        for method, path in (("PUT", "/providers/openai"), ("PUT", "/tags/t"),
                             ("POST", "/customers")):  # fmt: skip
            r = await c.request(method, path, headers=ADMIN)
            assert r.status_code == 422 and _error(r)["param"] == "body", (path, r.text)
        deep = b"[" * 100_000 + b"]" * 100_000
        r = await c.post("/customers", content=deep, headers=ADMIN)
        assert r.status_code == 422 and "nested" in _error(r)["message"]
        r = await c.post("/customers", content=b'{"name": "x", "budgets": NaN}', headers=ADMIN)
        assert r.status_code == 422 and "not valid JSON" in _error(r)["message"]


async def test_a_key_given_twice_in_a_body_is_refused_as_a_config_file_refuses_it(
    tmp_path: Path,
) -> None:
    """`{"max_limit": 1000, "max_limit": 1}` kept the last silently (a config file refuses it):
    a body a person or a script merged by hand set a budget other than the one they read."""
    async with admin_client(admin_settings(tmp_path)) as c:
        body = b'{"name": "c", "budgets": [{"max_limit": 1000, "max_limit": 1}]}'
        r = await c.post("/customers", content=body, headers=ADMIN)
        print(r.status_code, _error(r)["message"] if r.status_code == 422 else r.text)
        assert r.status_code == 422 and _error(r)["param"] == "body"
        assert "'max_limit' is given twice" in _error(r)["message"]
        assert (await c.get("/customers", headers=ADMIN)).json()["count"] == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/customers", {"name": "c", "calendar_aligned": 0}, "calendar_aligned"),
     ("/customers", {"name": "c", "calendar_aligned": "yes"}, "calendar_aligned"),
     ("/customers", {"name": "c", "budgets": [{"max_limit": "5"}]}, "budgets.0.max_limit"),
     ("/customers", {"name": "c", "budgets": [{"max_limit": True}]}, "budgets.0.max_limit"),
     ("/customers", {"name": "c", "rate_limit": {"max_concurrent_requests": "4"}},
      "rate_limit.max_concurrent_requests"),
     ("/virtual-keys", {"name": "k", "expires_at": 1700000000}, "expires_at"),
     ("/virtual-keys", {"name": "k", "expires_at": "2030-01-01"}, "expires_at"),
     ("/virtual-keys", {"name": "k", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
     ("/virtual-keys", {"name": "k", "is_active": 1}, "is_active")],
)  # fmt: skip
async def test_a_body_invalid_by_the_document_is_refused_not_coerced(
    tmp_path: Path, path: str, body: dict[str, Any], param: str
) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        r = await c.post(path, json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert param in {e["param"] for e in _error(r)["errors"]}, r.text


async def test_what_the_body_schema_says_is_what_is_checked(tmp_path: Path) -> None:
    """Each rule the server applies is in the document, so a body the document accepts is
    accepted; and a body it refuses is refused."""
    from jsonschema import Draft202012Validator

    async with admin_client(admin_settings(tmp_path)) as c:
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
        schemas = document["components"]["schemas"]

        def valid(name: str, body: dict[str, Any]) -> bool:
            assert name in schemas
            root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
            return Draft202012Validator(root).is_valid(body)

        rate = {"request_max_limit": 5, "request_reset_duration": "1m"}
        cases: list[tuple[str, str, dict[str, Any], bool]] = [
            ("CustomerCreate", "/customers", {"name": "a", "budgets": [{"max_limit": 1e9}]}, True),
            ("CustomerCreate", "/customers", {"name": "b", "budgets": [{"max_limit": 1.5e9}]},
             False),
            ("CustomerCreate", "/customers",
             {"name": "c", "budgets": [{"max_limit": 1, "reset_duration": "36524d"}]}, True),
            ("CustomerCreate", "/customers",
             {"name": "d", "budgets": [{"max_limit": 1, "reset_duration": "36525d"}]}, False),
            ("CustomerCreate", "/customers",
             {"name": "e", "budgets": [{"max_limit": 1, "reset_duration": " 1d"}]}, False),
            ("CustomerCreate", "/customers", {"name": "f", "rate_limit": rate}, True),
            ("CustomerCreate", "/customers",
             {"name": "g", "rate_limit": {"request_max_limit": 5}}, False),
            ("CustomerCreate", "/customers",
             {"name": "h", "rate_limit": {"token_max_limit": None, "token_reset_duration": None}},
             True),
            ("VirtualKeyCreate", "/virtual-keys",
             {"name": "i", "team_id": "x", "customer_id": "y"}, False),
            ("VirtualKeyCreate", "/virtual-keys", {"name": "j", "team_id": None,
                                                   "customer_id": None}, True),
            ("ModelConfigCreate", "/model-configs", {"model_name": "m1", "scope": "virtual_key"},
             False),
            ("ModelConfigCreate", "/model-configs", {"model_name": "m2", "scope_id": "x"}, False),
            ("ModelConfigCreate", "/model-configs", {"model_name": "claude-[!3]-*"}, True),
            ("ModelConfigCreate", "/model-configs", {"model_name": "gpt-4ö"}, False),
            ("ModelConfigCreate", "/model-configs", {"model_name": "openai/"}, False),
            ("ModelConfigCreate", "/model-configs", {"model_name": "gpt-[4o"}, False),
        ]  # fmt: skip
        for name, path, body, expected in cases:
            assert valid(name, body) is expected, (name, body)
            r = await c.post(path, json=body, headers=ADMIN)
            assert (r.status_code in (200, 201)) is expected, (body, r.text)


async def test_an_unknown_id_in_a_body_answers_404_naming_the_field(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        for path, body, param in (
            ("/teams", {"name": "t", "customer_id": "nope"}, "customer_id"),
            ("/virtual-keys", {"name": "k", "team_id": "nope"}, "team_id"),
            ("/virtual-keys", {"name": "k", "customer_id": "nope"}, "customer_id"),
            ("/model-configs", {"model_name": "m", "scope": "virtual_key", "scope_id": "nope"},
             "scope_id"),
        ):  # fmt: skip
            r = await c.post(path, json=body, headers=ADMIN)
            assert r.status_code == 404 and _error(r)["param"] == param, (path, r.text)


async def test_every_status_a_route_answers_is_in_the_document(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
        for path, methods in document["paths"].items():
            for method, operation in methods.items():
                if path.startswith("/ui"):  # the dashboard's files: no query read, no store
                    assert {"200", "304"} <= set(operation["responses"]), (method, path)
                    continue
                assert {"422", "503"} <= set(operation["responses"]), (method, path)
                if operation["security"]:
                    assert "401" in operation["responses"], (method, path)


async def test_405_names_every_method_of_the_path_in_allow(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        r = await c.request("TRACE", "/customers", headers=ADMIN)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
        r = await c.request("PATCH", "/customers/x", headers=ADMIN)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD, PUT"
        r = await c.get("/customers/", headers=ADMIN)  # Starlette's redirect to "/customers"
        assert r.status_code == 307 and r.headers["location"].endswith("/customers")


def test_the_duration_pattern_is_exactly_what_the_server_accepts() -> None:
    from budget_middleware.manage.schemas import DURATION_PATTERN, BudgetIn

    pattern = re.compile(DURATION_PATTERN.removesuffix("$") + r"\Z")
    limits = {"s": 3155695200, "m": 52594920, "h": 876582, "d": 36524, "w": 5217, "M": 1200,
              "mo": 1200, "Q": 400, "Y": 100}  # fmt: skip
    for unit, top in limits.items():
        for count in (*range(0, 25), top - 1, top, top + 1, 10 * top, f"0{top}", "00", "001"):
            text = f"{count}{unit}"
            try:
                BudgetIn(max_limit=1, reset_duration=text)
                accepted = True
            except ValueError:
                accepted = False
            assert accepted is bool(pattern.match(text)), text
    for text in ("", "d", "1", "1D", "1 d", " 1d", "1d ", "1dd", "+1d", "1.5d", "1mo1"):
        assert not pattern.match(text), text


def test_the_model_name_pattern_is_exactly_what_the_server_accepts() -> None:
    """Against the manager's own check, on every string of up to 5 characters over an alphabet
    of the characters that matter (and the ASCII rule of the admin API's bodies)."""
    from itertools import product

    from budget_middleware.core.scopes import model_name_problem
    from budget_middleware.manage.schemas import MODEL_NAME_PATTERN, ModelConfigUpdate

    pattern = re.compile(MODEL_NAME_PATTERN.removesuffix("$") + r"\Z")
    alphabet = ["[", "]", "!", "/", "*", "a", " ", "\t", "\x7f", "é"]
    names = ["".join(letters) for size in range(5) for letters in product(alphabet, repeat=size)]
    names += ["claude-opus-*", "gpt-[!3]o", "[]]x", "accounts/fireworks/models/llama-v3",
              "openai/gpt-4o*", "a[!]b]", "a[!]", "[!!]/", "/[a]", "[/]",
              "gpt-4o\u200b"]  # fmt: skip
    accepted_somewhere = 0
    for name in names:
        try:
            ModelConfigUpdate(model_name=name)  # the body's own rules (length, ASCII)
            accepted = model_name_problem(name) is None  # then the manager's
        except ValueError:
            accepted = False
        assert accepted is bool(pattern.match(name)), repr(name)
        accepted_somewhere += accepted
    assert 0 < accepted_somewhere < len(names)
