"""The Python management API refuses a bad body with the package's own error (`InvalidBody`, an
`InvalidRequest`, 422), worded as the admin API's 422, pydantic's ValidationError behind it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import (
    BudgetError,
    BudgetSettings,
    InvalidBody,
    InvalidRequest,
    get_engine,
    get_manager,
)

BAD_MONEY = {"max_limit": "abc", "reset_duration": "1d"}
BAD_DURATION = {"max_limit": 1, "reset_duration": "fortnight"}


def refusal(call: Callable[[], Any]) -> InvalidBody:
    with pytest.raises(InvalidBody) as caught:
        call()
    exc = caught.value
    print(type(exc).__name__, exc.status, exc.param, "|", exc.message)
    return exc


def test_a_bad_body_is_an_invalid_request_naming_the_field(tmp_path: Path) -> None:
    m = get_manager(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db"))
    exc = refusal(lambda: m.create_team(name="x", budgets=[BAD_MONEY]))
    assert isinstance(exc, InvalidRequest) and isinstance(exc, BudgetError)
    assert isinstance(exc, ValueError)  # as ValidationError is: `except ValueError` still works
    assert (exc.status, exc.code) == (422, "invalid_value")
    assert exc.param == "budgets.0.max_limit"
    assert exc.message == str(exc) == "budgets.0.max_limit: Value error, must be a JSON number"
    assert exc.errors == [
        {"param": exc.param, "message": "Value error, must be a JSON number", "kind": "value_error"}
    ]
    assert isinstance(exc.__cause__, ValidationError)  # still there for whoever wants it

    exc = refusal(lambda: m.create_team(name="x", colour="red"))
    assert exc.param == "colour" and exc.message == "colour: Extra inputs are not permitted"

    exc = refusal(lambda: m.create_team({"name": "x", "budgets": [BAD_DURATION]}))
    assert exc.param == "budgets.0.reset_duration"
    assert exc.message.startswith("budgets.0.reset_duration: Value error, invalid duration")

    # Several failures: the first named, the count of the others said, every one listed.
    exc = refusal(lambda: m.create_team(name=5, colour="red", budgets=[BAD_DURATION]))
    assert exc.message.endswith(" (and 2 more)")
    assert {e["param"] for e in exc.errors} == {"name", "colour", "budgets.0.reset_duration"}

    # A value given is never repeated (a key's value may be in the body).
    exc = refusal(lambda: m.create_virtual_key(name="k", value="sk-secret-123", teams="t"))
    assert exc.param == "teams" and "sk-secret" not in exc.message
    assert "sk-secret" not in repr(exc.errors)
    assert m.list_teams() == [] and m.list_virtual_keys() == []  # nothing written


def test_every_method_that_takes_a_body_refuses_it_so(tmp_path: Path) -> None:
    m = get_engine(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")).manager
    customer = m.create_customer(name="c")
    team = m.create_team(name="t")
    key = m.create_virtual_key(name="k")
    config = m.create_model_config(model_name="gpt-4o")
    route = m.create_route(name="r", targets=["openai/gpt-4o"])
    calls: dict[str, Callable[[], Any]] = {
        "create_customer": lambda: m.create_customer(name="c2", budgets=[BAD_DURATION]),
        "update_customer": lambda: m.update_customer(customer.id, budgets=[BAD_MONEY]),
        "create_team": lambda: m.create_team(name="t2", budgets=[BAD_DURATION]),
        "update_team": lambda: m.update_team(team.id, {"budgets": [BAD_MONEY]}),
        "create_virtual_key": lambda: m.create_virtual_key(name="k2", budgets=[BAD_MONEY]),
        "update_virtual_key": lambda: m.update_virtual_key(key.id, budgets=[BAD_DURATION]),
        "put_provider": lambda: m.put_provider("openai", budgets=[BAD_DURATION]),
        "put_tag": lambda: m.put_tag("chat", budgets=[BAD_MONEY]),
        "create_model_config": lambda: m.create_model_config(model_name="m", budgets=[BAD_MONEY]),
        "update_model_config": lambda: m.update_model_config(config.id, budgets=[BAD_DURATION]),
        "create_route": lambda: m.create_route(name="r2", targets=["openai/gpt-4o"], colour=1),
        "update_route": lambda: m.update_route(route.id, {"strategy": "sometimes"}),
    }
    for name, call in calls.items():
        exc = refusal(call)
        assert isinstance(exc.__cause__, ValidationError), name
        assert exc.param is not None and exc.message.startswith(f"{exc.param}: "), name
        assert exc.param.split(".")[0] in ("budgets", "colour", "strategy"), name


def test_a_body_that_is_not_a_mapping_is_refused_naming_what_was_expected(tmp_path: Path) -> None:
    """`create_team("research")` (the name where the body goes) raised a bare TypeError ("'str'
    object is not a mapping") from inside the manager; `create_team(0, name="x")` created the
    team, the 0 dropped; a body given for a key's id or a tag's name failed in SQLAlchemy."""
    m = get_engine(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")).manager
    team = m.create_team(name="t")
    key = m.create_virtual_key(name="k")
    config = m.create_model_config(model_name="gpt-4o")
    route = m.create_route(name="r", targets=["openai/gpt-4o"])
    calls: dict[str, tuple[str, str, Callable[[], Any]]] = {
        "create_customer": ("CustomerCreate", "str", lambda: m.create_customer("acme")),
        "update_customer": ("CustomerUpdate", "list", lambda: m.update_customer("c", ["x"])),
        "create_team": ("TeamCreate", "str", lambda: m.create_team("research")),
        "create_team 0": ("TeamCreate", "int", lambda: m.create_team(0, name="x")),
        "update_team": ("TeamUpdate", "str", lambda: m.update_team(team.id, "x")),
        "create_virtual_key": ("VirtualKeyCreate", "bytes", lambda: m.create_virtual_key(b"k")),
        "update_virtual_key": (
            "VirtualKeyUpdate",
            "str",
            lambda: m.update_virtual_key(key.id, "-"),
        ),
        "put_provider": ("ProviderPut", "str", lambda: m.put_provider("openai", "x")),
        "put_tag": ("TagPut", "tuple", lambda: m.put_tag("chat", ())),
        "create_model_config": ("ModelConfigCreate", "str", lambda: m.create_model_config("m")),
        "update_model_config": (
            "ModelConfigUpdate",
            "int",
            lambda: m.update_model_config(config.id, 1),
        ),
        "create_route": ("RouteCreate", "str", lambda: m.create_route("r2")),
        "update_route": ("RouteUpdate", "str", lambda: m.update_route(route.id, "r")),
    }
    for name, (model, given, call) in calls.items():
        exc = refusal(call)
        assert exc.param == "body", name
        message = (
            f"must be a {model} or a mapping of its fields (or the fields as keyword arguments), "
            f"not {given}"
        )
        assert exc.message == f"body: {message}", name
        assert exc.errors == [{"param": "body", "message": message, "kind": "model_type"}], name
    # The body given where the id or the name goes.
    for call, message, param in (
        (lambda: m.update_team({"name": "x"}), "a team id is a string, not dict", "id"),
        (lambda: m.get_virtual_key(7), "a virtual key id is a string, not int", "id"),
        (lambda: m.put_tag({"budgets": []}), "a tag name is a string, not dict", "tag"),
        (lambda: m.put_provider({}), "a provider name is a string, not dict", "provider"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            call()
        print(caught.value.message)
        assert (caught.value.message, caught.value.param) == (message, param)
    assert [t.name for t in m.list_teams()] == ["t"]  # nothing written
    assert m.list_tags() == [] and m.list_providers() == []


async def test_the_python_api_words_a_bad_body_as_the_admin_api_does(tmp_path: Path) -> None:
    settings = admin_settings(tmp_path)
    body = {"name": "x", "colour": "red", "budgets": [BAD_MONEY]}
    async with admin_client(settings) as http:
        answer = await http.post("/teams", json=body, headers=ADMIN)
        assert answer.status_code == 422
        error = answer.json()["error"]
        exc = refusal(lambda: get_engine(settings).manager.create_team(body))
    assert exc.errors == error["errors"]
    assert exc.param == error["param"]
    assert exc.message == error["message"]  # one wording: "(and 1 more)" in both
    assert error["message"].endswith(" (and 1 more)")


def test_a_usage_report_takes_iso_text_and_refuses_other_bounds(tmp_path: Path) -> None:
    """`usage`'s bounds: datetimes, or ISO 8601 text as the CLI and the admin API take them; any
    other value is an InvalidRequest naming the bound (it raised AttributeError on `tzinfo`)."""
    m = get_manager(BudgetSettings(database_url=f"sqlite:///{tmp_path}/u.db"))
    by_text = m.usage("team", "2026-12-01T00:00:00Z", "2026-12-02T00:00:00+00:00")
    assert by_text.model_dump()["start"] is not None
    assert (
        by_text.model_dump()
        == m.usage("team", datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2)).model_dump()
    )
    for bound, value in (("start", "yesterday"), ("end", 1764547200), ("start", "")):
        arguments = {bound: value}
        with pytest.raises(InvalidRequest) as caught:
            m.usage("team", **arguments)  # type: ignore[arg-type]
        print(bound, repr(value), "->", caught.value.message)
        assert caught.value.param == bound and caught.value.status == 422
        assert repr(value) in caught.value.message


def test_a_usage_period_that_ends_before_it_starts_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    """`usage(start=2027-02-01, end=2027-01-01)` answered an empty report, as if nothing had been
    spent. An InvalidRequest (422) naming both; an `end` equal to `start` is an empty period."""
    m = get_manager(BudgetSettings(database_url=f"sqlite:///{tmp_path}/u.db"))
    with pytest.raises(InvalidRequest) as caught:
        m.usage("team", "2027-02-01T00:00:00Z", "2027-01-01T00:00:00Z")
    print(caught.value.status, caught.value.message)
    assert caught.value.param == "end" and caught.value.status == 422
    assert "2027-01-01T00:00:00+00:00" in caught.value.message
    assert "2027-02-01T00:00:00+00:00" in caught.value.message
    assert m.usage("team", "2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z").usage == []
    assert m.usage("team", "2027-01-01T00:00:00Z", "2027-01-02T00:00:00Z").usage == []


def test_a_key_value_set_later_has_the_length_a_created_one_must_have(tmp_path: Path) -> None:
    """`set_virtual_key_value` (the config file's `value`) took a one-character value, where a
    create's `value` must have 8 to 512 characters: the same rule now, and the key keeps its
    value when refused."""
    m = get_manager(BudgetSettings(database_url=f"sqlite:///{tmp_path}/v.db"))
    key = m.create_virtual_key(name="k", value="sk-first-value-long-enough-to-show")
    for value in ("x", "1234567", "v" * 513):
        with pytest.raises(InvalidRequest) as caught:
            m.set_virtual_key_value(key.id, value)
        print(len(value), "characters ->", caught.value.message)
        assert caught.value.param == "value" and caught.value.status == 422
    assert m.get_virtual_key(key.id).key_display == key.key_display
    for value in ("12345678", "w" * 512):
        m.set_virtual_key_value(key.id, value)
        assert m.get_virtual_key(key.id).key_display != key.key_display
    with pytest.raises(InvalidBody):  # the create's rule, through its schema
        m.create_virtual_key(name="short", value="1234567")


async def test_from_memory_reads_the_engine_s_live_counters_or_is_refused(
    make_settings: Callable[..., BudgetSettings],
) -> None:
    """`get_manager(settings).list_budgets(from_memory=True)` read the store without a word
    (the engine's manager was not given its live counters): charges not yet written were not
    there. It reads the engine's now; a manager of no engine refuses instead."""
    from budget_middleware import BudgetManager
    from budget_middleware.store.database import Store
    from support import chat, client, engine_of, host_app, running

    settings = make_settings(flush_interval_seconds=3600)
    app = host_app(settings)
    async with running(app), client(app) as http:
        m = get_manager(settings)
        key = m.create_virtual_key(
            name="alice",
            budgets=[{"max_limit": 10, "reset_duration": "1d"}],
            rate_limit={"request_max_limit": 100, "request_reset_duration": "1h"},
        )
        await engine_of(app).invalidate()
        for _ in range(3):
            answer = await http.post(
                "/v1/chat/completions", json=chat(), headers={"x-budget-key": key.value or ""}
            )
            assert answer.status_code == 200
        live = m.list_budgets(from_memory=True)[0].current_usage
        stored = m.list_budgets()[0].current_usage
        requests = m.list_rate_limits(from_memory=True)[0].request_current_usage
        print(f"live ${live}, stored ${stored}, live requests {requests}")
        assert live > 0 and stored == 0 and requests == 3
        alone = BudgetManager(Store(settings.database_url), settings)
        try:
            for listing in (alone.list_budgets, alone.list_rate_limits):
                with pytest.raises(InvalidRequest) as caught:
                    listing(from_memory=True)
                assert caught.value.param == "from_memory"
                assert "no engine" in caught.value.message
            assert alone.list_budgets()[0].current_usage == stored  # the store, as ever
        finally:
            alone.store.dispose()  # its connections closed, not left to the collector


def test_a_usage_bound_at_the_calendar_s_end_is_clamped_as_the_admin_api_clamps_it(
    tmp_path: Path,
) -> None:
    """`usage(end="9999-12-31T23:00:00-05:00")` (past year 9999 in UTC) raised OverflowError
    "date value out of range", a traceback, where `GET /usage` and the CLI take the same bound
    as the calendar's end (docs/admin-api.md: clamped); the same at its start."""
    m = get_manager(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db"))
    found = {}
    for start, end in [
        (None, "9999-12-31T23:00:00-05:00"),
        ("0001-01-01T00:30:00+01:00", None),
        (None, datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))),
    ]:
        try:
            report = m.usage("team", start, end)
            found[str(start or end)] = ("ok", report.count)
        except Exception as exc:
            found[str(start or end)] = (type(exc).__name__, str(exc))
    print(found)
    assert all(answer == ("ok", 0) for answer in found.values()), found
