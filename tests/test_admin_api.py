"""The admin API's routes (SPEC §9): create, read, update, delete; limits written through owners."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import BudgetSettings, InvalidRequest, get_engine
from budget_middleware.admin import create_admin_app
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.manage.schemas import ProviderPut, TagPut
from budget_middleware.store.database import Store


@pytest.fixture
def settings(tmp_path: Path) -> BudgetSettings:
    return admin_settings(tmp_path)


async def test_create_answers_201_with_the_object_under_its_singular_name(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        r = await c.post("/customers", json={"name": "acme"}, headers=ADMIN)
        assert r.status_code == 201
        customer = r.json()["customer"]
        assert isinstance(customer["id"], str) and customer["name"] == "acme"
        r = await c.get(f"/customers/{customer['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["customer"]["id"] == customer["id"]
        r = await c.get("/customers", headers=ADMIN)
        assert r.json()["count"] == 1 and r.json()["customers"][0]["name"] == "acme"


async def test_key_value_is_returned_once_by_create_and_by_rotate(settings: BudgetSettings) -> None:
    async with admin_client(settings) as c:
        r = await c.post("/virtual-keys", json={"name": "alice"}, headers=ADMIN)
        key = r.json()["virtual_key"]
        value = key["value"]
        assert value.startswith("sk-bm-") and key["key_display"] == f"sk-bm-…{value[-4:]}"
        r = await c.get(f"/virtual-keys/{key['id']}", headers=ADMIN)
        assert "value" not in r.json()["virtual_key"] and value not in r.text
        r = await c.get("/virtual-keys", headers=ADMIN)
        assert value not in r.text
        r = await c.post(f"/virtual-keys/{key['id']}/rotate", headers=ADMIN)
        new = r.json()["virtual_key"]["value"]
        assert r.status_code == 200 and new != value and new.startswith("sk-bm-")
        manager = get_engine(settings).manager
        assert manager.find_virtual_key(value) is None
        assert manager.find_virtual_key(new) == key["id"]


@pytest.mark.parametrize(
    "value", ["abcdefgh", "sk-bm-12345678", "team-a-key-0001", "x" * 20, "sk-bm-" + "y" * 19]
)
async def test_a_chosen_key_value_is_not_shown_back_by_its_display(
    settings: BudgetSettings, value: str
) -> None:
    """`key_display` is in every list, the dashboard and the CLI's tables: of a short value
    chosen by the operator it must not give most of the value away (`abc…efgh` showed 7 of 8)."""
    async with admin_client(settings) as c:
        r = await c.post("/virtual-keys", json={"name": "k", "value": value}, headers=ADMIN)
        assert r.status_code == 201, r.text
        r = await c.get("/virtual-keys", headers=ADMIN)
        shown = r.json()["virtual_keys"][0]["key_display"]
        secret = value.removeprefix("sk-bm-")
        told = shown.removeprefix("sk-bm-").replace("…", "")
        print(f"{value!r} is shown as {shown!r}: {len(told)} of {len(secret)} characters")
        assert told == "" or (secret.endswith(told) and 4 * len(told) <= len(secret))


async def test_budgets_carry_bifrost_and_gomodel_fields_with_the_user_path(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        acme = (await c.post("/customers", json={"name": "acme"}, headers=ADMIN)).json()["customer"]
        team = (
            await c.post(
                "/teams", json={"name": "research", "customer_id": acme["id"]}, headers=ADMIN
            )
        ).json()["team"]
        body = {"name": "alice", "team_id": team["id"],
                "budget": {"max_limit": 10, "reset_duration": "1d"}}  # fmt: skip
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        await c.put("/providers/openai", json={"budgets": [{"max_limit": 5}]}, headers=ADMIN)
        await c.put("/tags/product:chat", json={"budgets": [{"max_limit": 1}]}, headers=ADMIN)
        rule = {"model_name": "gpt-4o", "budgets": [{"max_limit": 2}]}
        await c.post("/model-configs", json=rule, headers=ADMIN)
        r = await c.get("/budgets", headers=ADMIN)
        answer = r.json()
        assert answer["count"] == 4 and "server_time" in answer
        paths = {b["user_path"] for b in answer["budgets"]}
        assert paths == {"/acme/research/alice", "/provider/openai", "/tag/product:chat",
                         "/model/gpt-4o"}  # fmt: skip
        daily = next(b for b in answer["budgets"] if b["owner_type"] == "virtual_key")
        assert daily["virtual_key_id"] == key["id"] and "team_id" not in daily
        assert daily["max_limit"] == daily["amount"] == 10.0
        assert daily["remaining"] == 10.0 and daily["spent"] == 0.0 and not daily["has_usage"]
        assert daily["period_label"] == "daily" and daily["period_seconds"] == 86400
        assert daily["source"] == "manual"
        prepaid = next(b for b in answer["budgets"] if b["owner_type"] == "provider")
        assert prepaid["provider"] == "openai" and prepaid["period_end"] is None  # never resets
        r = await c.get("/budgets?owner_type=tag&owner_id=product:chat", headers=ADMIN)
        assert [b["tag"] for b in r.json()["budgets"]] == ["product:chat"]


async def test_a_customer_s_keys_are_its_own_and_those_of_its_teams(
    settings: BudgetSettings,
) -> None:
    """`GET /virtual-keys?customer_id=` listed only the keys attached to the customer itself,
    none of its teams' (`keys list --customer-id acme`: "(none)" for a key at /acme/research,
    whose spend acme's budget counts; a fault hunt's). A key's customer is its team's, or its
    own (SPEC §5): the filter says the same."""
    async with admin_client(settings) as c:
        ids = {}
        for name in ("acme", "other"):
            made = await c.post("/customers", json={"name": name}, headers=ADMIN)
            ids[name] = made.json()["customer"]["id"]
        team = {"name": "research", "customer_id": ids["acme"]}
        research = (await c.post("/teams", json=team, headers=ADMIN)).json()["team"]["id"]
        loose = (await c.post("/teams", json={"name": "loose"}, headers=ADMIN)).json()["team"]["id"]
        for body in (
            {"name": "in-team", "team_id": research},
            {"name": "direct", "customer_id": ids["acme"]},
            {"name": "elsewhere", "customer_id": ids["other"]},
            {"name": "team-alone", "team_id": loose},
            {"name": "nobody"},
        ):
            assert (await c.post("/virtual-keys", json=body, headers=ADMIN)).status_code == 201
        listed = {}
        for name, customer in ids.items():
            r = await c.get(f"/virtual-keys?customer_id={customer}", headers=ADMIN)
            listed[name] = sorted(k["name"] for k in r.json()["virtual_keys"])
    print(f"keys by customer: {listed}")
    assert listed == {"acme": ["direct", "in-team"], "other": ["elsewhere"]}


async def test_update_keeps_the_usage_of_budgets_matched_by_reset_duration(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        body = {"name": "acme", "budgets": [{"max_limit": 10, "reset_duration": "1d"},
                                            {"max_limit": 50, "reset_duration": "1w"}]}  # fmt: skip
        acme = (await c.post("/customers", json=body, headers=ADMIN)).json()["customer"]
        daily = next(b for b in acme["budgets"] if b["reset_duration"] == "1d")
        store = get_engine(settings).store
        from budget_middleware.store.tables import BudgetRow

        with store.session() as s:
            row = s.get(BudgetRow, daily["id"])
            assert row is not None
            row.current_usage_nanos = 3_000_000_000
            s.add(row)
            s.commit()
        update = {"budgets": [{"max_limit": 20, "reset_duration": "1d"}]}
        r = await c.put(f"/customers/{acme['id']}", json=update, headers=ADMIN)
        budgets = r.json()["customer"]["budgets"]
        assert [(b["id"], b["max_limit"], b["current_usage"]) for b in budgets] == [
            (daily["id"], 20.0, 3.0)
        ]
        r = await c.put(f"/customers/{acme['id']}", json={"name": "acme2"}, headers=ADMIN)
        assert [b["id"] for b in r.json()["customer"]["budgets"]] == [daily["id"]]
        r = await c.post(f"/budgets/{daily['id']}/reset", headers=ADMIN)
        assert r.status_code == 200 and r.json()["budget"]["current_usage"] == 0.0


async def test_a_budget_matched_by_its_id_keeps_the_terms_an_update_leaves_out(
    settings: BudgetSettings,
) -> None:
    """`PUT budgets=[{"id": ..., "max_limit": 20}]` changes the limit alone: the daily, soft
    budget with its thresholds stays so. It became a budget that never resets
    and refuses (its other terms set to their defaults). Its duration kept counts as given: a
    second budget of that duration in the same update is a 409."""
    async with admin_client(settings) as c:
        budget = {"max_limit": 10, "reset_duration": "1d", "soft": True,
                  "alert_thresholds": [0.5]}  # fmt: skip
        body = {"name": "research", "calendar_aligned": True, "budgets": [budget]}
        team = (await c.post("/teams", json=body, headers=ADMIN)).json()["team"]
        daily = team["budgets"][0]
        update = {"budgets": [{"id": daily["id"], "max_limit": 20}]}
        r = await c.put(f"/teams/{team['id']}", json=update, headers=ADMIN)
        after = r.json()["team"]["budgets"]
        terms = (
            "id",
            "max_limit",
            "reset_duration",
            "soft",
            "alert_thresholds",
            "calendar_aligned",
        )
        print("after an update of the limit alone:", {k: after[0][k] for k in terms})
        assert r.status_code == 200 and len(after) == 1
        assert {k: after[0][k] for k in terms} == {
            "id": daily["id"], "max_limit": 20.0, "reset_duration": "1d", "soft": True,
            "alert_thresholds": [0.5], "calendar_aligned": True,
        }  # fmt: skip
        twice = {"budgets": [{"id": daily["id"], "max_limit": 20},
                             {"max_limit": 5, "reset_duration": "1d"}]}  # fmt: skip
        r = await c.put(f"/teams/{team['id']}", json=twice, headers=ADMIN)
        assert r.status_code == 409, r.text
        # Its calendar_aligned left out is its owner's, as ever: the owner's changed with it.
        realigned = {"calendar_aligned": False, **update}
        r = await c.put(f"/teams/{team['id']}", json=realigned, headers=ADMIN)
        assert r.json()["team"]["budgets"][0]["calendar_aligned"] is False


async def test_a_duplicate_the_store_finds_before_the_commit_is_a_409_not_a_503(
    settings: BudgetSettings,
) -> None:
    """Creates of one name at once, with budgets (the duplicate found as the budgets are
    flushed, before the commit): one 201 and 409s. The store's `IntegrityError` escaped the
    write and was answered 503 "the budget store cannot be reached", `Retry-After: 1`. And a
    key's provider config renamed to the provider of one the update drops is a 200: the one
    dropped goes first (it was the same 503)."""
    answers: set[int] = set()
    async with admin_client(settings) as c:
        for attempt in range(15):
            body = {
                "name": f"acme-{attempt}",
                "budgets": [{"max_limit": 10, "reset_duration": "1d"}],
            }
            sent = [c.post("/customers", json=body, headers=ADMIN) for _ in range(3)]
            statuses = sorted(r.status_code for r in await asyncio.gather(*sent))
            answers.update(statuses)
            assert statuses.count(201) == 1 and set(statuses) <= {201, 409}, statuses
        body = {
            "name": "k",
            "provider_configs": [{"provider": "openai"}, {"provider": "anthropic"}],
        }
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        openai_config = next(p for p in key["provider_configs"] if p["provider"] == "openai")
        renamed = {"provider_configs": [{"id": openai_config["id"], "provider": "anthropic"}]}
        r = await c.put(f"/virtual-keys/{key['id']}", json=renamed, headers=ADMIN)
    print(f"15 rounds of 3 creates of one name: {sorted(answers)} seen; rename {r.status_code}")
    assert r.status_code == 200, r.text
    configs = r.json()["virtual_key"]["provider_configs"]
    assert [(p["id"], p["provider"]) for p in configs] == [(openai_config["id"], "anthropic")]


async def test_a_key_s_provider_configs_swapped_by_id_keep_their_budgets(
    settings: BudgetSettings,
) -> None:
    """An update naming both of a key's provider configs by id, each with the other's provider
    (openai's $1 a day made anthropic's, anthropic's $2 made openai's): it was refused 409 (the
    first renamed met the second's provider still stored, at the store's unique key). Each
    config keeps its id and budget under its new provider."""
    async with admin_client(settings) as c:
        body = {
            "name": "k",
            "provider_configs": [
                {"provider": "openai", "budgets": [{"max_limit": 1, "reset_duration": "1d"}]},
                {"provider": "anthropic", "budgets": [{"max_limit": 2, "reset_duration": "1d"}]},
            ],
        }
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        ids = {p["provider"]: p["id"] for p in key["provider_configs"]}
        swapped = {
            "provider_configs": [
                {"id": ids["openai"], "provider": "anthropic"},
                {"id": ids["anthropic"], "provider": "openai"},
            ]
        }
        r = await c.put(f"/virtual-keys/{key['id']}", json=swapped, headers=ADMIN)
        print(f"swap: {r.status_code} {r.text[:200]}")
        assert r.status_code == 200, r.text
        configs = {
            p["id"]: (p["provider"], [b["max_limit"] for b in p["budgets"]])
            for p in r.json()["virtual_key"]["provider_configs"]
        }
        assert configs == {ids["openai"]: ("anthropic", [1]), ids["anthropic"]: ("openai", [2])}


async def test_a_key_whose_team_went_as_it_was_made_can_still_be_updated(
    settings: BudgetSettings,
) -> None:
    """A team deleted while a key was created in it (the two at once: the key keeps the
    team's id). An update that does not name the team (`{"is_active": false}`) was refused
    404 "team ... not found", so the operator could not deactivate the key. The key is left
    without the team, as the team's delete leaves its keys."""
    async with admin_client(settings) as c:
        team = (await c.post("/teams", json={"name": "t"}, headers=ADMIN)).json()["team"]
        body = {"name": "k", "team_id": team["id"]}
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        with get_engine(settings).store.engine.begin() as conn:  # the race's outcome
            conn.execute(text("DELETE FROM bm_teams WHERE id = :id"), {"id": team["id"]})
        r = await c.put(f"/virtual-keys/{key['id']}", json={"is_active": False}, headers=ADMIN)
    print("deactivating a key whose team is gone:", r.status_code, r.json().get("error"))
    assert r.status_code == 200, r.text
    assert (r.json()["virtual_key"]["is_active"], r.json()["virtual_key"]["team_id"]) == (
        False,
        None,
    )


async def test_conflicts_answer_409(settings: BudgetSettings) -> None:
    async with admin_client(settings) as c:
        await c.post("/teams", json={"name": "research"}, headers=ADMIN)
        r = await c.post("/teams", json={"name": "research"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["param"] == "name"
        twice = [{"max_limit": 1, "reset_duration": "1d"}, {"max_limit": 2, "reset_duration": "1d"}]
        r = await c.post("/teams", json={"name": "other", "budgets": twice}, headers=ADMIN)
        assert r.status_code == 409
        r = await c.get("/teams", headers=ADMIN)
        assert r.json()["count"] == 1  # the refused create left nothing behind


async def test_one_duration_spelt_two_ways_is_a_duplicate_reset_duration(
    settings: BudgetSettings,
) -> None:
    """SPEC §9: an owner holds at most one budget per `reset_duration`, a 409 otherwise. `24h`
    is `1d` spelt otherwise (an update matches them as one), so `1d` beside `24h` is that
    duplicate: both were created, and an update naming `1d` then matched either one."""
    async with admin_client(settings) as c:
        answers = []
        for twice in (("1d", "24h"), ("1w", "7d"), ("1Y", "12M"), ("60s", "1m")):
            budgets = [{"max_limit": n + 1, "reset_duration": d} for n, d in enumerate(twice)]
            r = await c.post("/teams", json={"name": f"t-{twice[0]}", "budgets": budgets},
                             headers=ADMIN)  # fmt: skip
            answers.append((twice, r.status_code, r.json().get("error", {}).get("param")))
        r = await c.post("/teams", json={"name": "ok", "budgets": [
            {"max_limit": 1, "reset_duration": "1d"}, {"max_limit": 2, "reset_duration": "1h"},
            {"max_limit": 3, "reset_duration": "1mo"}, {"max_limit": 4, "reset_duration": "30d"},
        ]}, headers=ADMIN)  # fmt: skip
        team = r.json()["team"]
        put = await c.put(f"/teams/{team['id']}", json={"budgets": [
            {"max_limit": 1, "reset_duration": "1d"}, {"max_limit": 5, "reset_duration": "24h"},
        ]}, headers=ADMIN)  # fmt: skip
        print("\nanswers:", answers, "different durations:", r.status_code, "update:",
              put.status_code)  # fmt: skip
        assert answers == [(t, 409, "budgets") for t, _, _ in answers]
        assert r.status_code == 201 and len(team["budgets"]) == 4  # a month is not 30 days
        assert put.status_code == 409
        r = await c.get("/teams", headers=ADMIN)
        assert r.json()["count"] == 1  # the refused creates left nothing behind


async def test_one_budget_or_provider_config_id_given_twice_in_an_update_is_a_409(
    settings: BudgetSettings,
) -> None:
    """SPEC §9: budgets are matched by `id`; an update naming one budget's id twice (on two
    durations) matched the first and made the second a new budget under another id, without
    its usage, answering 200; a provider config's id twice (two providers) made a second config
    the same way. Both are a 409 naming the list now, and nothing changes."""
    async with admin_client(settings) as c:
        body = {"name": "k", "budgets": [{"max_limit": 1, "reset_duration": "1d"}],
                "provider_configs": [{"provider": "openai"}]}  # fmt: skip
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        budget, config = key["budgets"][0]["id"], key["provider_configs"][0]["id"]
        twice = [{"id": budget, "max_limit": 2, "reset_duration": "1d"},
                 {"id": budget, "max_limit": 3, "reset_duration": "1w"}]  # fmt: skip
        r = await c.put(f"/virtual-keys/{key['id']}", json={"budgets": twice}, headers=ADMIN)
        print("a budget id twice:", r.status_code, r.text[:200])
        assert r.status_code == 409 and r.json()["error"]["param"] == "budgets"
        configs = [{"id": config, "provider": "openai"}, {"id": config, "provider": "anthropic"}]
        r = await c.put(
            f"/virtual-keys/{key['id']}", json={"provider_configs": configs}, headers=ADMIN
        )
        print("a provider config id twice:", r.status_code, r.text[:200])
        assert r.status_code == 409 and r.json()["error"]["param"] == "provider_configs"
        after = (await c.get(f"/virtual-keys/{key['id']}", headers=ADMIN)).json()["virtual_key"]
        assert [(b["id"], b["max_limit"]) for b in after["budgets"]] == [(budget, 1.0)]
        assert [p["id"] for p in after["provider_configs"]] == [config]


async def test_invalid_bodies_answer_422_naming_every_failing_field(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        body = {"name": "k", "budgets": [{"max_limit": -1, "reset_duration": "3x"}],
                "rate_limit": {"request_max_limit": 5}}  # fmt: skip
        r = await c.post("/virtual-keys", json=body, headers=ADMIN)
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        params = {e["param"] for e in error["errors"]}
        assert {"budgets.0.max_limit", "budgets.0.reset_duration", "rate_limit"} <= params
        # The message names the first and says how many more, as the Python API's InvalidBody
        # does (it named the first alone: a client fixed one field and met the next).
        first = error["errors"][0]
        print(error["message"])
        assert error["param"] == first["param"]
        assert error["message"] == (
            f"{first['param']}: {first['message']} (and {len(error['errors']) - 1} more)"
        )
        r = await c.post("/customers", content=b"{not json", headers=ADMIN)
        assert r.status_code == 422
        r = await c.post("/customers", json={"name": "x", "surprise": 1}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["param"] == "surprise"
        # 1e309 reads as infinity: said as such, not "should be less than or equal to 1e9"
        huge = b'{"name": "x", "budgets": [{"max_limit": 1e309}]}'
        r = await c.post("/customers", content=huge, headers=ADMIN)
        assert r.status_code == 422 and "finite amount of USD" in r.json()["error"]["message"]


async def test_every_422_lists_its_failure_in_errors(settings: BudgetSettings) -> None:
    """A body's shape is checked by its schema, a model name, a glob or a config file by the
    management API: those 422s had no `errors` list, which docs/admin-api.md promises every 422
    (a client reading `error["errors"]` failed on them)."""
    glob = {"name": "k", "provider_configs": [{"provider": "openai", "allowed_models": ["gpt["]}]}
    config = {"text": "customers: [{name: acme, colour: red}]", "format": "yaml"}
    async with admin_client(settings) as c:
        for path, body in (("/virtual-keys", glob), ("/config/apply", config)):
            r = await c.post(path, json=body, headers=ADMIN)
            error = r.json()["error"]
            print(path, r.status_code, error)
            assert r.status_code == 422 and error["type"] == "invalid_request_error"
            assert error["errors"] == [
                {"param": error["param"], "message": error["message"], "kind": "value_error"}
            ]
            assert error["param"] in ("provider_configs", "text")


async def test_provider_and_tag_names_are_those_requests_can_carry(
    settings: BudgetSettings,
) -> None:
    """A tag may hold a `/` (sent as %2F: it answered 404 "no admin route"); a name with a
    space at either end is refused, as no request's provider or tag (read trimmed) meets it."""
    limit = {"budgets": [{"max_limit": 1}]}
    async with admin_client(settings) as c:
        slashed = await c.put("/tags/team%2Fsearch", json=limit, headers=ADMIN)
        blank = await c.put("/providers/%20", json=limit, headers=ADMIN)
        padded = await c.put("/tags/%20chat", json=limit, headers=ADMIN)
        tags = (await c.get("/tags", headers=ADMIN)).json()["tags"]
        removed = await c.delete("/tags/team%2Fsearch", headers=ADMIN)
    print("tag with a slash:", slashed.status_code, removed.status_code, [t["tag"] for t in tags])
    assert (slashed.status_code, removed.status_code) == (201, 200)
    assert [t["tag"] for t in tags] == ["team/search"]
    # SPEC §9: every object has a string `id`; a tag's (and a provider's) is its name
    assert slashed.json()["tag"]["id"] == tags[0]["id"] == "team/search"
    assert blank.status_code == padded.status_code == 422
    assert "no space at either end" in padded.json()["error"]["message"]


async def test_a_name_no_request_can_carry_is_refused_naming_it(settings: BudgetSettings) -> None:
    """A request's tag and provider are read with "?" for a control character or a line break
    and cut at 100 characters (`identity.clean_text`): such a name's limits never applied. PUT
    /tags/a%0Ab answered 404 "no admin route /tags/ab" (the route's `.*` stops at a line
    break), /tags/ab%0A wrote the tag `ab`, /tags/a%09b and /providers/a%0Ab wrote a name no
    request meets, as did a tag of 101 to 200 characters."""
    limit = {"budgets": [{"max_limit": 1}]}
    refused = {
        "/tags/a%0Ab": ("tag", "a tag name has no control character or line break: 'a\\nb' "
                        "(a request's tag is read with '?' for it)"),
        "/tags/ab%0A": ("tag", "a tag name has no space at either end: 'ab\\n'"),
        "/tags/a%09b": ("tag", "a tag name has no control character or line break: 'a\\tb' "
                        "(a request's tag is read with '?' for it)"),
        "/tags/a%E2%80%A8b": ("tag", "a tag name has no control character or line break: "
                              "'a\\u2028b' (a request's tag is read with '?' for it)"),
        "/providers/a%0Ab": ("provider", "a provider name has no control character or line "
                             "break: 'a\\nb' (a request's provider is read with '?' for it)"),
        "/tags/" + "t" * 101: ("tag", "tag: has at most 100 characters"),
        "/providers/" + "p" * 101: ("provider", "provider: has at most 100 characters"),
    }  # fmt: skip
    async with admin_client(settings) as c:
        for path, (param, message) in refused.items():
            r = await c.put(path, json=limit, headers=ADMIN)
            print(path[:30], r.status_code, r.json()["error"]["message"])
            assert r.status_code == 422, (path, r.text)
            assert (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, message)
        gone = await c.delete("/tags/a%0Ab", headers=ADMIN)  # the route is found: no such tag
        assert (gone.status_code, gone.json()["error"]["message"]) == (404, "tag 'a\\nb' not found")
        kept = await c.put("/tags/" + "t" * 100, json=limit, headers=ADMIN)
        assert kept.status_code == 201
        # A key's tags, which its requests carry, are held to the same: they were stored as
        # given, and no tag limit could name them.
        for tags, param, message in (
            (["ok", "a\nb"], "tags.1",
             "Value error, a tag name has no control character or line break: 'a\\nb' (a "
             "request's tag is read with '?' for it)"),
            (["t" * 101], "tags.0", "String should have at most 100 characters"),
        ):  # fmt: skip
            r = await c.post("/virtual-keys", json={"name": "k", "tags": tags}, headers=ADMIN)
            print(r.status_code, r.text[:200])
            assert r.status_code == 422, r.text
            assert r.json()["error"]["errors"][0] == {
                "param": param, "message": message, "kind": r.json()["error"]["errors"][0]["kind"]
            }  # fmt: skip
        assert (await c.get("/virtual-keys", headers=ADMIN)).json()["count"] == 0
        assert [t["tag"] for t in (await c.get("/tags", headers=ADMIN)).json()["tags"]] == [
            "t" * 100
        ]
    with pytest.raises(InvalidRequest) as caught:  # the Python API: the same rule
        get_engine(settings).manager.put_tag("a\nb", limit)
    assert caught.value.param == "tag" and "no control character" in caught.value.message


async def test_unknown_ids_answer_404(settings: BudgetSettings) -> None:
    async with admin_client(settings) as c:
        for path in ("/customers/nope", "/teams/nope", "/virtual-keys/nope", "/model-configs/nope"):
            assert (await c.get(path, headers=ADMIN)).status_code == 404
            assert (await c.delete(path, headers=ADMIN)).status_code == 404
        assert (await c.post("/budgets/nope/reset", headers=ADMIN)).status_code == 404
        assert (await c.delete("/providers/nope", headers=ADMIN)).status_code == 404
        made = await c.put("/providers/openai", json={"budgets": [{"max_limit": 1}]}, headers=ADMIN)
        listed = (await c.get("/providers", headers=ADMIN)).json()["providers"]
        assert made.json()["provider"]["id"] == listed[0]["id"] == "openai"


async def test_deleting_a_team_detaches_its_keys_and_removes_its_budgets(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        body = {"name": "t", "budgets": [{"max_limit": 1, "reset_duration": "1d"}]}
        team = (await c.post("/teams", json=body, headers=ADMIN)).json()["team"]
        key = (
            await c.post("/virtual-keys", json={"name": "k", "team_id": team["id"]}, headers=ADMIN)
        ).json()["virtual_key"]
        assert (await c.delete(f"/teams/{team['id']}", headers=ADMIN)).status_code == 200
        r = await c.get(f"/virtual-keys/{key['id']}", headers=ADMIN)
        assert r.json()["virtual_key"]["team_id"] is None
        assert (await c.get("/budgets", headers=ADMIN)).json()["count"] == 0


async def test_model_configs_are_paged_and_filtered(settings: BudgetSettings) -> None:
    async with admin_client(settings) as c:
        for name, provider in [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude", None)]:
            body = {"model_name": name, "provider": provider}
            assert (await c.post("/model-configs", json=body, headers=ADMIN)).status_code == 201
        r = await c.get("/model-configs?search=GPT&limit=1&offset=1", headers=ADMIN)
        answer = r.json()
        assert answer["total_count"] == 2 and len(answer["model_configs"]) == 1
        r = await c.get("/model-configs?provider=openai&scope=global", headers=ADMIN)
        assert r.json()["total_count"] == 2
        for bad in ("limit=0", "offset=-1", "limit=x", "scope=user"):
            assert (await c.get(f"/model-configs?{bad}", headers=ADMIN)).status_code == 422


async def test_key_provider_configs_and_rate_limits_are_written_through_the_key(
    settings: BudgetSettings,
) -> None:
    async with admin_client(settings) as c:
        body = {
            "name": "k",
            "rate_limit": {"request_max_limit": 10, "request_reset_duration": "1m",
                           "max_concurrent_requests": 2},
            "provider_configs": [{"provider": "openai", "allowed_models": ["gpt-4o"],
                                  "budgets": [{"max_limit": 1, "reset_duration": "1h"}]}],
        }  # fmt: skip
        key = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"]
        assert key["rate_limit"]["request_max_limit"] == 10
        policy = key["provider_configs"][0]
        assert policy["allowed_models"] == ["gpt-4o"] and len(policy["budgets"]) == 1
        assert policy["budgets"][0]["user_path"] == "/k/provider/openai"
        r = await c.get("/rate-limits", headers=ADMIN)
        assert r.json()["count"] == 1 and r.json()["rate_limits"][0]["max_concurrent_requests"] == 2
        r = await c.put(f"/virtual-keys/{key['id']}", json={"rate_limit": None}, headers=ADMIN)
        assert r.json()["virtual_key"]["rate_limit"] is None
        # A config sent again with its provider only keeps its model lists and budgets (its
        # `allowed_models` went back to ["*"]: every model opened by an update that named none)
        again = {"provider_configs": [{"provider": "openai"}]}
        r = await c.put(f"/virtual-keys/{key['id']}", json=again, headers=ADMIN)
        policy = r.json()["virtual_key"]["provider_configs"][0]
        assert policy["allowed_models"] == ["gpt-4o"] and len(policy["budgets"]) == 1
        wider = {"provider_configs": [{"provider": "openai", "allowed_models": ["*"]}]}
        r = await c.put(f"/virtual-keys/{key['id']}", json=wider, headers=ADMIN)
        assert r.json()["virtual_key"]["provider_configs"][0]["allowed_models"] == ["*"]


async def test_a_key_s_model_list_names_only_models_a_request_can_name(tmp_path: Path) -> None:
    """A request's model is read cut at 200 characters (as the store keeps it). A key's
    `blocked_models` entry longer than that was stored (201) and never matched: the model it
    blocked was served (200), a limit lifted silently; an `allowed_models` one never admitted
    its model. Such an entry is a 422 naming it (as a model config's `model_name` is, SPEC §5:
    never silently unmatched); one of 200 characters is matched."""
    from support import chat, client, host_app, running

    settings = admin_settings(tmp_path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    longest, longer = "m" * 200, "m" * 201
    async with running(app), client(app) as http:
        answers = {}
        for field in ("blocked_models", "allowed_models"):
            for model in (longer, longest):
                body = {"name": f"{field}-{len(model)}",
                        "provider_configs": [{"provider": "openai", field: [model]}]}  # fmt: skip
                r = await http.post("/admin/virtual-keys", json=body, headers=ADMIN)
                served = None
                if r.status_code == 201:
                    auth = {"Authorization": f"Bearer {r.json()['virtual_key']['value']}"}
                    served = (await http.post("/v1/chat/completions",
                                              json=chat(f"openai/{model}"),
                                              headers=auth)).status_code  # fmt: skip
                answers[(field, len(model))] = (r.status_code, served)
                if r.status_code == 422:
                    error = r.json()["error"]
                    assert error["param"] == f"provider_configs.0.{field}.0", error
                    assert "at most 200 characters" in error["message"], error
    print(f"a key's model lists, (created, its model served): {answers}")
    assert answers == {
        ("blocked_models", 201): (422, None),
        ("blocked_models", 200): (201, 403),  # blocked
        ("allowed_models", 201): (422, None),
        ("allowed_models", 200): (201, 200),  # allowed
    }


async def test_every_tag_of_a_key_is_one_its_requests_carry(tmp_path: Path) -> None:
    """A request carries at most 32 tags (the key's first). A key took 100: its tags past the
    32nd were dropped from every request, their limits with them: a key of 40 tags whose 40th
    has a $0 budget was served (200, not 402). A key's tags are at most 32 (422 naming the
    field beyond), and each of a key's 32 meets its limits."""
    from support import chat, client, host_app, running

    settings = admin_settings(tmp_path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    answers = {}
    async with running(app), client(app) as http:
        for count in (40, 32):
            tags = [f"t{count}-{n:02}" for n in range(count)]
            blocked = {"budgets": [{"max_limit": 0}]}  # the key's last tag: $0
            r = await http.put(f"/admin/tags/{tags[-1]}", json=blocked, headers=ADMIN)
            assert r.status_code == 201, r.text
            body = {"name": f"k{count}", "tags": tags}
            r = await http.post("/admin/virtual-keys", json=body, headers=ADMIN)
            served = None
            if r.status_code == 201:
                auth = {"Authorization": f"Bearer {r.json()['virtual_key']['value']}"}
                answer = await http.post("/v1/chat/completions", json=chat(), headers=auth)
                served = answer.status_code
            else:
                error = r.json()["error"]
                assert error["param"] == "tags" and "32" in error["message"], error
            answers[count] = (r.status_code, served)
    print(f"a key's tags, (created, its request answered): {answers}")
    assert answers == {40: (422, None), 32: (201, 402)}


async def test_usage_is_grouped_in_the_database(settings: BudgetSettings) -> None:
    from datetime import UTC, datetime

    from budget_middleware.store.tables import UsageRecordRow

    async with admin_client(settings) as c:
        await c.get("/health")
        await c.get("/customers", headers=ADMIN)  # starts the engine: the tables exist
        store = get_engine(settings).store
        with store.session() as s:
            for i, tags in enumerate([["a", "b"], ["a"], []]):
                record = UsageRecordRow(
                    request_id=f"r{i}",
                    created_at=datetime(2026, 1, 2, tzinfo=UTC),
                    provider="openai",
                    model="gpt-4o",
                    tags=tags,
                    input_tokens=10,
                    output_tokens=5,
                    cost_nanos=1_000_000_000,
                )
                s.add(record)
            s.commit()
        r = await c.get("/usage?group_by=tag", headers=ADMIN)
        rows = {row["key"]: row for row in r.json()["usage"]}
        assert rows["a"]["requests"] == 2 and rows["b"]["cost"] == 1.0
        assert r.json()["total"]["requests"] == 3
        r = await c.get("/usage?group_by=day&start=2026-01-01&end=2026-01-03", headers=ADMIN)
        assert r.json()["usage"][0]["key"] == "2026-01-02" and r.json()["total"]["cost"] == 3.0
        r = await c.get("/usage?group_by=model", headers=ADMIN)
        assert r.json()["usage"][0]["input_tokens"] == 30
        assert (await c.get("/usage?group_by=nope", headers=ADMIN)).status_code == 422


async def test_usage_past_2_63_nano_dollars_is_reported_not_a_store_outage(
    settings: BudgetSettings,
) -> None:
    """9,300 charges at the $1,000,000 a request is capped at: $9.3 billion, more nano-dollars
    than a 64-bit integer holds. SQLite's sum() of integers raises "integer overflow" there, and
    every `GET /usage` (the CLI's `usage`, the dashboard's chart and tiles) answered 503 "the
    budget store cannot be reached" with `Retry-After: 1`, for good. The report adds them up."""
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from budget_middleware.core.money import MAX_CHARGE_NANOS
    from budget_middleware.store.tables import UsageRecordRow

    records = 9_300
    async with admin_client(settings) as c:
        await c.get("/customers", headers=ADMIN)  # starts the engine: the tables exist
        store = get_engine(settings).store
        at = datetime(2026, 1, 2, tzinfo=UTC)
        with store.session() as s:
            s.execute(insert(UsageRecordRow), [
                {"request_id": f"r{i}", "created_at": at, "provider": "openai", "model": "gpt-4o",
                 "tags": ["a"], "cost_nanos": MAX_CHARGE_NANOS, "cost": 1e6}
                for i in range(records)
            ])  # fmt: skip
            s.commit()
        found = {}
        for group_by in ("model", "tag", "day", "virtual_key"):
            r = await c.get(f"/usage?group_by={group_by}", headers=ADMIN)
            found[group_by] = (r.status_code, r.json().get("total", {}).get("cost"))
    print("status and total USD by group:", found)
    assert found == {g: (200, records * 1e6) for g in ("model", "tag", "day", "virtual_key")}


async def test_a_usage_period_that_ends_before_it_starts_is_a_422_naming_both(
    settings: BudgetSettings,
) -> None:
    """`GET /usage?start=2027-02-01&end=2027-01-01` answered 200 with no usage (as if nothing had
    been spent). A 422 naming both, `param` `end`; an `end` equal to `start` (an empty period, the
    calendar's ends) stays a 200, and so does an end after the start."""
    async with admin_client(settings) as c:
        r = await c.get("/usage?start=2027-02-01&end=2027-01-01", headers=ADMIN)
        print(r.status_code, r.text)
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["param"] == "end" and error["code"] == "invalid_value"
        assert "2027-01-01" in error["message"] and "2027-02-01" in error["message"]
        # one microsecond apart, and the same moment written in two offsets
        r = await c.get("/usage?start=2027-01-01T00:00:00.000001Z&end=2027-01-01T00:00:00Z",
                        headers=ADMIN)  # fmt: skip
        assert r.status_code == 422, r.text
        for query in (
            "start=2027-01-01&end=2027-01-01",
            "start=2027-01-01T01:00:00%2B01:00&end=2027-01-01T00:00:00Z",
            "start=2027-01-01&end=2027-02-01",
            "start=2027-02-01",
            "end=2027-01-01",
        ):
            r = await c.get(f"/usage?{query}", headers=ADMIN)
            assert r.status_code == 200, (query, r.text)
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
        assert "before `start` is refused, 422" in document["paths"]["/usage"]["get"]["description"]


async def test_usage_is_a_list_that_takes_limit_and_offset(settings: BudgetSettings) -> None:
    """SPEC §9: lists take `limit` (≥ 1) and `offset` (≥ 0), other values 422. `GET /usage`
    answered 422 'unknown query parameter' to any page, so a key-by-key report of a large
    deployment came whole or not at all. Its `count` and `total` are of every group."""
    from datetime import UTC, datetime

    from budget_middleware.store.tables import UsageRecordRow

    async with admin_client(settings) as c:
        await c.get("/customers", headers=ADMIN)  # starts the engine: the tables exist
        with get_engine(settings).store.session() as s:
            for i, model in enumerate(["gpt-4o", "gpt-4o-mini", "o3"]):
                when = datetime(2026, 1, 2, tzinfo=UTC)
                s.add(UsageRecordRow(request_id=f"r{i}", created_at=when, provider="openai",
                                     model=model, cost_nanos=(3 - i) * 10**9))  # fmt: skip
            s.commit()
        pages = []
        for query in ("limit=2", "limit=2&offset=2", "offset=1", "limit=0", "offset=-1"):
            r = await c.get(f"/usage?group_by=model&{query}", headers=ADMIN)
            answer = r.json()
            if r.status_code == 200:
                shown = [row["key"] for row in answer["usage"]], answer["count"]
                pages.append((query, 200, shown, answer["total"]["cost"]))
            else:
                pages.append((query, r.status_code, answer["error"]["param"], None))
    print(pages)
    assert pages == [
        ("limit=2", 200, (["gpt-4o", "gpt-4o-mini"], 3), 6.0),
        ("limit=2&offset=2", 200, (["o3"], 3), 6.0),
        ("offset=1", 200, (["gpt-4o-mini", "o3"], 3), 6.0),
        ("limit=0", 422, "limit", None),
        ("offset=-1", 422, "offset", None),
    ]


async def test_usage_keeps_the_names_of_deleted_keys_teams_and_customers(
    settings: BudgetSettings,
) -> None:
    """Where the money went stays readable after the key, team or customer that spent it is
    deleted: its rows keep its name, marked `deleted` (they came back with `name: null`, an id
    nobody could place), and a live owner is never marked."""
    from datetime import UTC, datetime

    from budget_middleware.store.tables import UsageRecordRow

    async with admin_client(settings) as c:
        customer = (await c.post("/customers", json={"name": "acme"}, headers=ADMIN)).json()
        team = (
            await c.post(
                "/teams",
                json={"name": "research", "customer_id": customer["customer"]["id"]},
                headers=ADMIN,
            )
        ).json()["team"]
        owners = {"customer": customer["customer"], "team": team}
        for name in ("alice", "bob"):
            created = await c.post(
                "/virtual-keys", json={"name": name, "team_id": team["id"]}, headers=ADMIN
            )
            owners[name] = created.json()["virtual_key"]
        store = get_engine(settings).store
        with store.session() as s:
            for i, name in enumerate(("alice", "bob")):
                s.add(
                    UsageRecordRow(
                        request_id=f"r{i}",
                        created_at=datetime(2026, 1, 2, tzinfo=UTC),
                        virtual_key_id=owners[name]["id"],
                        team_id=team["id"],
                        customer_id=customer["customer"]["id"],
                        provider="openai",
                        model="gpt-4o",
                        input_tokens=10,
                        output_tokens=5,
                        cost_nanos=1_000_000_000,
                    )
                )
            s.commit()
        for path in (
            f"/virtual-keys/{owners['alice']['id']}",
            f"/teams/{team['id']}",
            f"/customers/{customer['customer']['id']}",
        ):
            assert (await c.delete(path, headers=ADMIN)).status_code in (200, 204)
        found = {}
        for group in ("virtual_key", "team", "customer"):
            r = await c.get(f"/usage?group_by={group}", headers=ADMIN)
            assert r.status_code == 200
            found[group] = sorted((u["name"], u["deleted"], u["cost"]) for u in r.json()["usage"])
    print("usage after deleting alice, research and acme:", found)
    assert found["virtual_key"] == [("alice", True, 1.0), ("bob", False, 1.0)]
    assert found["team"] == [("research", True, 2.0)]
    assert found["customer"] == [("acme", True, 2.0)]


async def test_health_is_open_and_metrics_report_budgets(settings: BudgetSettings) -> None:
    async with admin_client(settings) as c:
        r = await c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok", "store": "ok",
                                                      "redis": "disabled"}  # fmt: skip
        body = {"name": "acme", "budgets": [{"max_limit": 10, "reset_duration": "1d"}]}
        await c.post("/customers", json=body, headers=ADMIN)
        r = await c.get("/metrics", headers=ADMIN)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'budget_remaining_usd{budget_id="' in r.text and 'user_path="/acme"' in r.text
        assert "budget_requests_admitted_total 0.0" in r.text
        assert (await c.get("/metrics")).status_code == 401


async def test_a_path_with_a_line_break_after_a_route_is_no_route(settings: BudgetSettings) -> None:
    """Starlette's route pattern ends in `$`, which also matches before a final line break:
    `POST /customers%0A` created a customer, `GET /health%0A` answered, and
    `DELETE /providers/openai%0A` removed `openai` (the name was read trimmed). SPEC §9: unknown
    ids 404; no such path is a route."""
    limit = {"budgets": [{"max_limit": 1}]}
    async with admin_client(settings) as c:
        assert (await c.put("/providers/openai", json=limit, headers=ADMIN)).status_code == 201
        answers = {
            path: (await c.request(method, path, json=body, headers=ADMIN)).status_code
            for method, path, body in (
                ("POST", "/customers%0A", {"name": "acme"}),
                ("POST", "/teams%0A", {"name": "research"}),
                ("POST", "/virtual-keys%0A", {"name": "alice"}),
                ("POST", "/routes%0A", {"name": "r", "targets": ["openai/gpt-4o"]}),
                ("GET", "/health%0A", None),
                ("GET", "/ui%0A", None),
                ("DELETE", "/providers/openai%0A", None),
                ("DELETE", "/providers/%20openai", None),
            )
        }
        print(answers)
        assert set(answers.values()) == {404}, answers
        assert (await c.get("/customers", headers=ADMIN)).json()["count"] == 0
        assert (await c.get("/teams", headers=ADMIN)).json()["count"] == 0
        assert (await c.get("/virtual-keys", headers=ADMIN)).json()["count"] == 0
        providers = (await c.get("/providers", headers=ADMIN)).json()["providers"]
        assert [p["provider"] for p in providers] == ["openai"]
        assert (await c.delete("/providers/OpenAI", headers=ADMIN)).status_code == 200


async def test_a_key_tag_with_a_space_at_either_end_is_refused_as_a_tag_name_is(
    settings: BudgetSettings,
) -> None:
    """A request's tags are read trimmed (`x-budget-tags: research`), and `PUT /tags/%20research`
    is a 422; a key's own tags were stored as given, so a tag budget on `research` never applied
    to a key tagged ` research`. SPEC §9 (keys' `tags`): invalid bodies get 422."""
    limit = {"budgets": [{"max_limit": 1}]}
    async with admin_client(settings) as c:
        assert (await c.put("/tags/research", json=limit, headers=ADMIN)).status_code == 201
        created = await c.post(
            "/virtual-keys", json={"name": "k", "tags": [" research"]}, headers=ADMIN
        )
        ok_key = await c.post(
            "/virtual-keys", json={"name": "j", "tags": ["research"]}, headers=ADMIN
        )
        assert ok_key.status_code == 201, ok_key.text
        updated = await c.put(
            f"/virtual-keys/{ok_key.json()['virtual_key']['id']}",
            json={"tags": ["research\u00a0"]},
            headers=ADMIN,
        )
        print(created.status_code, created.text[:160])
        print(updated.status_code, updated.text[:160])
        for r, shown in ((created, "' research'"), (updated, "'research\\xa0'")):
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == "tags.0"
            assert r.json()["error"]["errors"][0]["message"] == (
                f"Value error, a tag name has no space at either end: {shown}"
            )
        keys = (await c.get("/virtual-keys", headers=ADMIN)).json()["virtual_keys"]
        assert [(k["name"], k["tags"]) for k in keys] == [("j", ["research"])]
    with pytest.raises(InvalidRequest) as caught:  # the Python API: the same rule
        get_engine(settings).manager.create_virtual_key(name="k", tags=["research "])
    print(caught.value.message)
    assert "no space at either end: 'research '" in caught.value.message


async def test_a_name_with_a_line_break_or_a_space_at_either_end_is_refused(
    settings: BudgetSettings,
) -> None:
    """A customer's, a team's or a key's name goes into answers, error messages, logs and
    `user_path`: `{"name": "acme\\n"}`, `" acme"` or `"a\\tb"` created one (201), a line break
    in every message naming it. SPEC §9: invalid bodies get 422 with the failing fields."""
    async with admin_client(settings) as c:
        acme = await c.post("/customers", json={"name": "acme corp"}, headers=ADMIN)
        assert acme.status_code == 201, acme.text  # a space inside is a name
        acme_id = acme.json()["customer"]["id"]
        answers = []
        for path, kind in (("/customers", "customer"), ("/teams", "team"),
                           ("/virtual-keys", "virtual key")):  # fmt: skip
            for name in ("acme\n", " acme", "acme\u3000", "a\tb", "a\u2028b"):
                r = await c.post(path, json={"name": name}, headers=ADMIN)
                answers.append((path, name, r.status_code))
                assert r.status_code == 422, (path, name, r.text)
                assert r.json()["error"]["param"] == "name"
                message = r.json()["error"]["errors"][0]["message"]
                assert message.startswith(f"Value error, a {kind} name has no "), message
        renamed = await c.put(f"/customers/{acme_id}", json={"name": "acme\r\n"}, headers=ADMIN)
        print(answers, renamed.status_code)
        assert renamed.status_code == 422
        assert [
            x["name"] for x in (await c.get("/customers", headers=ADMIN)).json()["customers"]
        ] == ["acme corp"]
        assert (await c.get("/teams", headers=ADMIN)).json()["count"] == 0
        assert (await c.get("/virtual-keys", headers=ADMIN)).json()["count"] == 0
    with pytest.raises(InvalidRequest) as caught:  # the Python API: the same rule
        get_engine(settings).manager.create_team(name="research\n")
    assert "a team name has no space at either end" in caught.value.message


async def test_a_provider_name_in_a_body_keeps_the_rule_of_provider_names(
    settings: BudgetSettings,
) -> None:
    """A key's `provider_configs[].provider` and a model config's `provider` took `"a\\nb"`
    (stored: a provider no request carries, its limits never met) and read `" openai\\n"` as
    `openai`, while `PUT /providers/%20openai` is a 422. SPEC §9: invalid bodies get 422."""
    async with admin_client(settings) as c:
        answers = []
        for provider in ("a\nb", " openai\n", "openai "):
            for path, body, param in (
                ("/virtual-keys", {"name": "k", "provider_configs": [{"provider": provider}]},
                 "provider_configs.0.provider"),
                ("/model-configs", {"model_name": "gpt-4o", "provider": provider}, "provider"),
            ):  # fmt: skip
                r = await c.post(path, json=body, headers=ADMIN)
                answers.append((path, provider, r.status_code))
                assert r.status_code == 422, (path, provider, r.text)
                assert r.json()["error"]["param"] == param
                assert "a provider name has no " in r.json()["error"]["message"]
        print(answers)
        assert (await c.get("/virtual-keys", headers=ADMIN)).json()["count"] == 0
        assert (await c.get("/model-configs", headers=ADMIN)).json()["total_count"] == 0
        body = {"name": "k", "provider_configs": [{"provider": "OpenAI"}]}
        key = await c.post("/virtual-keys", json=body, headers=ADMIN)
        assert key.json()["virtual_key"]["provider_configs"][0]["provider"] == "openai"
        anywhere = await c.post(
            "/model-configs", json={"model_name": "gpt-4o", "provider": ""}, headers=ADMIN
        )
        assert anywhere.status_code == 201, anywhere.text
        # "" is any provider, stored as none is: it was stored as "", which no request names
        # (its limits never applied), and a second rule for gpt-4o on any provider was a 201.
        again = await c.post("/model-configs", json={"model_name": "gpt-4o"}, headers=ADMIN)
        print(
            "provider '':",
            anywhere.json()["model_config"]["provider"],
            "; again:",
            again.status_code,
        )
        assert anywhere.json()["model_config"]["provider"] is None and again.status_code == 409


async def test_a_store_that_cannot_be_reached_is_a_503_with_retry_after(tmp_path: Path) -> None:
    """The middleware's 503 (store or Redis away) says `Retry-After: 1`; the admin API's said
    nothing, leaving a client (the CLI, a script, a proxy) no hint that a retry may pass."""
    settings = admin_settings(tmp_path, database_url=f"sqlite:///{tmp_path}/no/such/dir/b.db")
    async with admin_client(settings) as c:
        r = await c.get("/teams", headers=ADMIN)
        print(r.status_code, dict(r.headers), r.text)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert r.headers.get("retry-after") == "1"


async def test_a_tag_written_with_a_trailing_slash_is_the_tag_without_it(
    settings: BudgetSettings,
) -> None:
    """A tag is the rest of the path (it may hold a `/`), so `PUT /tags/chat/` made the tag
    `chat/`, whose cap no request tagged `chat` meets, where every other route redirects a
    trailing slash. A slash written at the end is redirected now (307, the body with it); one
    sent as `%2F` is still part of the tag."""
    async with admin_client(settings) as c:
        put = await c.put("/tags/chat/", json={"budgets": [{"max_limit": 1}]}, headers=ADMIN)
        followed = await c.put("/tags/chat/", json={"budgets": [{"max_limit": 2}]},
                               headers=ADMIN, follow_redirects=True)  # fmt: skip
        escaped = await c.put("/tags/team%2F", json={"budgets": [{"max_limit": 3}]}, headers=ADMIN)
        tags = {t["tag"]: t["budgets"][0]["max_limit"]
                for t in (await c.get("/tags", headers=ADMIN)).json()["tags"]}  # fmt: skip
        deleted = await c.delete("/tags/chat/", headers=ADMIN, follow_redirects=True)
        left = [t["tag"] for t in (await c.get("/tags", headers=ADMIN)).json()["tags"]]
    print("PUT /tags/chat/:", put.status_code, put.headers.get("location"), "tags:", tags,
          "after DELETE /tags/chat/:", left)  # fmt: skip
    assert put.status_code == 307 and put.headers["location"] == "http://test/tags/chat"
    assert followed.status_code == 201 and escaped.status_code == 201
    assert tags == {"chat": 2.0, "team/": 3.0}
    assert deleted.status_code == 200 and left == ["team/"]


async def test_a_trailing_slash_is_redirected_to_the_route_without_it(
    settings: BudgetSettings,
) -> None:
    """`GET /customers/` and `POST /teams/` answered 404 `route_not_found` where `/customers`
    and `/teams` answer: every route of the document, written with a trailing slash, is a 307
    to the route without it (Starlette's and FastAPI's `redirect_slashes`), the query kept, so
    a client that follows redirects gets the same answer, and one that does not is told where."""
    async with admin_client(settings) as c:
        customer = (await c.post("/customers", json={"name": "acme"}, headers=ADMIN)).json()
        cid = customer["customer"]["id"]
        await c.put("/tags/chat", json={"budgets": [{"max_limit": 1}]}, headers=ADMIN)
        document = (await c.get("/openapi.json", headers=ADMIN)).json()
        lists = [p for p, methods in document["paths"].items() if "{" not in p and "get" in methods]
        lists += [f"/customers/{cid}"]
        found = {}
        for path in lists:
            plain = await c.get(path, headers=ADMIN)
            slashed = await c.get(path + "/", headers=ADMIN)
            found[path] = slashed.status_code
            assert slashed.status_code == 307, (path, slashed.status_code, slashed.text[:200])
            assert slashed.headers["location"] == f"http://test{path}", path
            followed = await c.get(path + "/", headers=ADMIN, follow_redirects=True)
            assert followed.status_code == plain.status_code, (path, followed.text[:200])
        print(f"{len(found)} routes with a trailing slash:", found)
        r = await c.get("/customers/?limit=1", headers=ADMIN)
        assert r.headers["location"] == "http://test/customers?limit=1"
        r = await c.get("/tags/", headers=ADMIN, follow_redirects=True)  # not the tag ""
        assert r.status_code == 200 and [t["tag"] for t in r.json()["tags"]] == ["chat"], r.text
        r = await c.post("/teams/", json={"name": "research", "customer_id": cid}, headers=ADMIN,
                         follow_redirects=True)  # fmt: skip
        assert r.status_code == 201 and r.json()["team"]["customer_id"] == cid, r.text
        r = await c.get("/teams", headers=ADMIN)
        assert [t["name"] for t in r.json()["teams"]] == ["research"]
        r = await c.get("/customers/", follow_redirects=True)  # still needs the admin key
        assert r.status_code == 401
        r = await c.get(f"/customers/{cid}%2F", headers=ADMIN)  # an id ending in "/": not moved
        assert r.status_code == 404 and r.json()["error"]["param"] is None, r.text
        r = await c.get("/nothing-here/", headers=ADMIN)  # no route either way: still a 404
        assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"


async def test_usage_totals_are_the_sum_of_the_groups_while_records_are_written(
    settings: BudgetSettings,
) -> None:
    """`total` was read by a second query after the groups': a flush that landed between them
    (any busy server) made the total differ from the sum of the rows it was shown beside (the
    CLI's `total` line, the dashboard's spend tile against its chart). Both come from one read
    now; by tag, the total counts each record once (a record with two tags is in two rows)."""
    import threading
    from datetime import UTC, datetime

    from budget_middleware.store.tables import UsageRecordRow

    async with admin_client(settings) as c:
        await c.get("/customers", headers=ADMIN)  # starts the engine: the tables exist
        store = get_engine(settings).store
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                with store.session() as s:
                    for _ in range(5):
                        i += 1
                        s.add(UsageRecordRow(
                            request_id=f"w{i}", created_at=datetime.now(UTC), provider="openai",
                            model=f"m{i % 3}", tags=[f"t{i % 2}", "all"], input_tokens=1,
                            output_tokens=1, cost_nanos=7,
                        ))  # fmt: skip
                    s.commit()

        writer = threading.Thread(target=write)
        writer.start()
        off = 0
        try:
            for group_by in ("model", "tag") * 40:
                answer = (await c.get(f"/usage?group_by={group_by}", headers=ADMIN)).json()
                rows, total = answer["usage"], answer["total"]
                each = 2 if group_by == "tag" else 1  # every record has two tags
                summed = sum(r["requests"] for r in rows)
                nanos = sum(round(r["cost"] * 1e9) for r in rows)
                if (summed, nanos) != (each * total["requests"], each * round(total["cost"] * 1e9)):
                    off += 1
        finally:
            stop.set()
            writer.join()
    print("answers whose total was not the sum of their rows:", off, "of 80")
    assert off == 0


async def test_a_model_config_search_is_text_not_a_pattern(settings: BudgetSettings) -> None:
    """`search` went to SQL's LIKE as given: `_` matched any character and `%` anything, so
    `search=gpt_4` listed gpt-4o and `search=%` every config. It is a case-insensitive
    substring of the model name, as written."""
    async with admin_client(settings) as c:
        for name in ("gpt-4o", "my_model", "100%-cheap"):
            r = await c.post("/model-configs", json={"model_name": name}, headers=ADMIN)
            assert r.status_code == 201, r.text
        found = {}
        for search in ("gpt_4", "_", "%", "my_", "100%"):
            r = await c.get("/model-configs", params={"search": search}, headers=ADMIN)
            found[search] = sorted(m["model_name"] for m in r.json()["model_configs"])
    print(found)
    assert found == {"gpt_4": [], "_": ["my_model"], "%": ["100%-cheap"], "my_": ["my_model"],
                     "100%": ["100%-cheap"]}  # fmt: skip


async def test_a_time_whose_plus_was_read_as_a_space_is_told_so(settings: BudgetSettings) -> None:
    """`?start=2027-01-01T00:00:00+01:00` typed into a URL: a query reads `+` as a space, and the
    422 said "must be an RFC 3339 date-time with its offset" of a time written with its offset.
    It says what happened and how to send it (`%2B`)."""
    async with admin_client(settings) as c:
        r = await c.get("/usage?start=2027-01-01T00:00:00+01:00", headers=ADMIN)
        good = await c.get("/usage?start=2027-01-01T00:00:00%2B01:00", headers=ADMIN)
    message = r.json()["error"]["message"]
    print(r.status_code, message)
    assert r.status_code == 422 and good.status_code == 200
    assert "'2027-01-01T00:00:00 01:00'" in message and "%2B" in message


async def test_a_key_cannot_be_created_already_expired(settings: BudgetSettings) -> None:
    """A key created with `expires_at` in the past was made (201) and its value handed out,
    though every request with it is refused 403 `virtual_key_expired`: a typo in the year
    (2025 for 2027) went unnoticed until the first request. Now a 422 naming `expires_at`, from
    the admin API and from Python alike; an update may still set a past time (expire it now)."""
    from datetime import UTC, datetime, timedelta

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    async with admin_client(settings) as c:
        r = await c.post("/virtual-keys", json={"name": "k", "expires_at": past}, headers=ADMIN)
        print(r.status_code, r.text)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == "expires_at" and "in the past" in error["message"]
        listed = (await c.get("/virtual-keys", headers=ADMIN)).json()["count"]
        assert listed == 0
        with pytest.raises(InvalidRequest, match="in the past") as raised:
            get_engine(settings).manager.create_virtual_key(name="k", expires_at=past)
        assert raised.value.param == "expires_at"
        r = await c.post("/virtual-keys", json={"name": "k", "expires_at": future}, headers=ADMIN)
        assert r.status_code == 201, r.text
        key_id = r.json()["virtual_key"]["id"]
        r = await c.put(f"/virtual-keys/{key_id}", json={"expires_at": past}, headers=ADMIN)
        assert r.status_code == 200, r.text


async def test_an_update_beside_a_stored_duration_no_longer_valid_still_matches(
    settings: BudgetSettings,
) -> None:
    """Budgets are matched by their duration as meant (`7d` is `1w`); a stored duration that
    today's rules refuse (written by an older release) is compared as written, not raised on."""
    from budget_middleware.store.tables import BudgetRow

    async with admin_client(settings) as c:
        m = get_engine(settings).manager
        budgets = [{"max_limit": 1, "reset_duration": d} for d in ("1d", "1w")]
        key = m.create_virtual_key(name="k", budgets=budgets)
        with get_engine(settings).store.session() as s:
            row = s.get(BudgetRow, key.budgets[0].id)
            assert row is not None
            row.reset_duration = "1000Y"
            s.add(row)
            s.commit()
        body = {"budgets": [{"max_limit": 2, "reset_duration": "7d"}]}
        r = await c.put(f"/virtual-keys/{key.id}", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        kept = [(b["reset_duration"], b["id"]) for b in r.json()["virtual_key"]["budgets"]]
        assert kept == [("7d", key.budgets[1].id)]


async def test_a_null_budget_in_an_update_leaves_the_budgets_alone_as_null_budgets_does(
    settings: BudgetSettings,
) -> None:
    """SPEC §9: an update without `budgets` leaves them alone, and `"budgets": null` did; but
    `"budget": null` (the single object's field, as a Bifrost client sends an unset pointer)
    removed every budget of the owner, their spend with them: the limits lifted. It leaves them
    alone too; `"budgets": []` still removes them all."""
    async with admin_client(settings) as c:
        budgets = [{"max_limit": 5, "reset_duration": d} for d in ("1d", "1M")]
        r = await c.post("/teams", json={"name": "t", "budgets": budgets}, headers=ADMIN)
        team_id = r.json()["team"]["id"]
        kept = []
        for body in ({"budgets": None}, {"budget": None}, {"budget": None, "budgets": None}):
            r = await c.put(f"/teams/{team_id}", json=body, headers=ADMIN)
            assert r.status_code == 200, r.text
            kept.append(len(r.json()["team"]["budgets"]))
        r = await c.put(f"/teams/{team_id}", json={"budgets": []}, headers=ADMIN)
        print("budgets kept after null budgets, null budget, both:", kept)
        assert kept == [2, 2, 2] and r.json()["team"]["budgets"] == []
        m = get_engine(settings).manager
        m.update_team(team_id, budgets=budgets)
        assert len(m.update_team(team_id, budget=None).budgets) == 2


async def test_a_body_over_the_admin_api_s_bound_is_a_413_read_no_further(
    settings: BudgetSettings,
) -> None:
    """`POST /config/apply` takes 4,000,000 characters of text, but the body was read whole
    before anything was checked: an admin client sending gigabytes (a runaway script, a file
    concatenated with itself) held them all in memory. A body over 64 MiB is a 413, and
    reading stops there."""
    from collections.abc import AsyncIterator

    sent = [0]
    chunk = b" " * (1 << 20)

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(200):  # 200 MiB, if it were all read
            sent[0] += 1
            yield chunk

    async with admin_client(settings) as c:
        r = await c.post("/config/apply", content=endless(), headers=ADMIN)
        print(r.status_code, r.text[:200], f"{sent[0]} MiB sent")
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert sent[0] <= 70
        claimed = {**ADMIN, "content-length": str(1 << 40)}
        r = await c.post("/teams", content=b"{}", headers=claimed)
        assert r.status_code == 413
        doc = (await c.get("/openapi.json", headers=ADMIN)).json()
        assert "413" in doc["paths"]["/config/apply"]["post"]["responses"]


async def test_concurrent_budget_lists_over_more_durations_than_are_cached_all_answer(
    tmp_path: Path,
) -> None:
    """Each admin call runs in a worker thread, and reading a budget parses its duration through
    a cachetools cache of 1,024, which is not thread-safe (its LRU order changes on every read).
    With more distinct durations in the store than it holds, `GET /budgets` sent 12 at a time
    answered 500 (`KeyError('152d')`, `OrderedDict mutated during iteration`): 16 of 60."""
    import asyncio
    import sys

    settings = admin_settings(tmp_path)
    manager = get_engine(settings).manager
    durations = [f"{n}s" for n in range(1, 1101)]  # 1,100 (of one unit: no two of one length)
    for first in range(0, len(durations), 100):
        manager.create_customer(
            name=f"c{first}",
            budgets=[{"max_limit": 1, "reset_duration": d} for d in durations[first : first + 100]],
        )
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the race made likely
    try:
        async with admin_client(settings) as http:
            statuses: dict[int, int] = {}
            for _ in range(5):
                answers = await asyncio.gather(
                    *(
                        http.get("/budgets", params={"limit": 2000}, headers=ADMIN)
                        for _ in range(12)
                    )
                )
                for answer in answers:
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            counts = {answer.json()["count"] for answer in answers}
    finally:
        sys.setswitchinterval(switch)
    print(f"{len(durations)} durations; GET /budgets 12 at a time x5: {statuses}, counts {counts}")
    assert statuses == {200: 60}
    assert counts == {len(durations)}


def test_model_configs_created_at_once_are_one(store_url: str) -> None:
    """4 threads create the same global model config for any provider at once, 10 times: one
    is stored each time, the others are refused 409. The check ran before the write, and the
    store's unique constraint holds no two NULLs equal: SQLite stored duplicates in 8 of 20
    trials, PostgreSQL in 20 of 20 (each duplicate's budgets applied too)."""
    import threading

    from budget_middleware.exceptions import Conflict
    from budget_middleware.manage.manager import BudgetManager
    from budget_middleware.store.database import Store

    store = Store(store_url)
    store.create_schema()
    manager = BudgetManager(store, BudgetSettings(database_url=store_url))
    outcomes: list[str] = []
    for trial in range(10):
        barrier = threading.Barrier(4)

        def create(model: str = f"model-{trial}", barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                manager.create_model_config(model_name=model, budgets=[{"max_limit": 1}])
                outcomes.append("created")
            except Conflict:
                outcomes.append("409")

        threads = [threading.Thread(target=create) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    stored = manager.list_model_configs(limit=100)[1]
    store.dispose()
    print(f"10 rounds of 4 creates at once: {outcomes.count('created')} created, "
          f"{outcomes.count('409')} refused 409, {stored} stored")  # fmt: skip
    assert stored == outcomes.count("created") == 10 and outcomes.count("409") == 30


@pytest.mark.parametrize("what", ["tag", "provider"])
def test_puts_of_one_new_tag_or_provider_at_once_all_succeed(
    store_url: str, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUT is idempotent: 3 threads PUT the same new tag (or provider) at once, each past
    its read before any writes, 5 times. Each round one creates it (201) and the others update
    it (200), leaving one row and one budget. Before, the others were refused 409 ("tag
    conflicts with an existing one"), as the store's key refused their second insert."""
    import threading

    from budget_middleware.manage import manager as manager_module
    from budget_middleware.manage.manager import BudgetManager
    from budget_middleware.store.database import Store

    store = Store(store_url)
    store.create_schema()
    manager = BudgetManager(store, BudgetSettings(database_url=store_url))
    put = manager.put_tag_created if what == "tag" else manager.put_provider_created
    body: Any = TagPut if what == "tag" else ProviderPut
    barrier: list[threading.Barrier] = []
    real = manager_module.write_limits

    def write_limits(*args: Any, **kwargs: Any) -> None:  # each writer, its read made
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier[-1].wait(5)
        real(*args, **kwargs)

    monkeypatch.setattr(manager_module, "write_limits", write_limits)
    outcomes: list[str] = []
    for trial in range(5):
        barrier.append(threading.Barrier(3))
        name = f"{what}-{trial}" if what == "tag" else f"self-hosted-{trial}"

        def write(name: str = name, n: int = 0) -> None:
            data = body(budgets=[{"max_limit": 1 + n, "reset_duration": "1d"}])
            try:
                outcomes.append("created" if put(name, data)[1] else "updated")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=write, kwargs={"n": n}) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    listed = manager.list_tags() if what == "tag" else manager.list_providers()
    budgets = manager.list_budgets(owner_type=what)
    store.dispose()
    print(f"5 rounds of 3 PUTs at once: {sorted(outcomes)}; {len(listed)} stored, "
          f"{len(budgets)} budgets")  # fmt: skip
    assert outcomes.count("created") == 5 and outcomes.count("updated") == 10
    assert len(listed) == 5 and len(budgets) == 5


@pytest.fixture
def manager(store_url: str) -> Iterator[BudgetManager]:
    """A manager of its own store, closed (its pool's connections too) whatever the test did."""
    store = Store(store_url)
    store.create_schema()
    try:
        yield BudgetManager(store, BudgetSettings(database_url=store_url))
    finally:
        store.dispose()


def _together(*steps: Callable[[], Any]) -> None:
    """Run each step in a thread of its own, at once, and wait for all."""
    threads = [threading.Thread(target=step) for step in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _waiting_at(barrier: list[threading.Barrier]) -> Callable[[Any], Any]:
    """A wrapper of a step of the store's writers that waits (1 s at most) for the round's
    other writer to reach its own (`barrier[-1]`): both past their reads before either writes."""

    def waiting(real: Any) -> Any:
        def wait_then(*args: Any, **kwargs: Any) -> Any:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier[-1].wait(1)
            return real(*args, **kwargs)

        return wait_then

    return waiting


@pytest.mark.parametrize("child", ["team_of_customer", "key_of_team", "key_of_customer"])
def test_a_parent_deleted_as_a_child_is_made_in_it_leaves_no_child_naming_it(
    manager: BudgetManager, child: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team made in a customer (a key in a team, a key in a customer) while that customer
    is deleted, both past their reads before either writes, 3 rounds. Before, the child was
    written naming a parent that was gone, which the delete had looked for children of before
    it was there: `customer_id` left dangling for ever (3 of 3 rounds). Now one of the two
    goes first: the child is refused 404, or made and then taken out of the parent by its
    delete, as the delete leaves every child it finds."""
    from budget_middleware.manage import keys as keys_module
    from budget_middleware.manage import manager as manager_module

    parent_kind = "team" if child == "key_of_team" else "customer"
    barrier: list[threading.Barrier] = []
    waiting = _waiting_at(barrier)

    made_in = keys_module if child.startswith("key") else manager_module
    monkeypatch.setattr(made_in, "write_limits", waiting(made_in.write_limits))
    monkeypatch.setattr(manager_module, "delete_limits", waiting(manager_module.delete_limits))
    outcomes: list[str] = []
    for trial in range(3):
        barrier.append(threading.Barrier(2))
        if parent_kind == "team":
            parent = manager.create_team(name=f"parent-{trial}").id
        else:
            parent = manager.create_customer(name=f"parent-{trial}").id

        def make(parent: str = parent, trial: int = trial) -> None:
            try:
                if child == "team_of_customer":
                    manager.create_team(name=f"child-{trial}", customer_id=parent)
                elif child == "key_of_team":
                    manager.create_virtual_key(name=f"child-{trial}", team_id=parent)
                else:
                    manager.create_virtual_key(name=f"child-{trial}", customer_id=parent)
                outcomes.append("made")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        def delete(parent: str = parent) -> None:
            if parent_kind == "team":
                manager.delete_team(parent)
            else:
                manager.delete_customer(parent)

        _together(make, delete)
    parents = {t.id for t in manager.list_teams()} | {c.id for c in manager.list_customers()}
    children = manager.list_teams() if child == "team_of_customer" else manager.list_virtual_keys()
    named = [getattr(c, f"{parent_kind}_id") for c in children]
    dangling = [p for p in named if p is not None and p not in parents]
    print(f"3 rounds, a {child} made as its parent was deleted: {outcomes}; "
          f"{len(dangling)} children naming a parent that is gone")  # fmt: skip
    assert not dangling
    assert set(outcomes) <= {"made", "NotFound"} and len(outcomes) == 3


@pytest.mark.parametrize("owner", ["customer", "team", "virtual_key"])
def test_an_owner_updated_as_it_is_deleted_leaves_no_budget_behind(
    manager: BudgetManager, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A customer (team, key) given a budget by an update while it is deleted, both past their
    reads before either writes, 3 rounds. Before, the update failed in every round with
    SQLAlchemy's `StaleDataError` (its row gone as it wrote it: a 500 over HTTP). Now the
    update waits for the delete and is refused 404, or the delete for the update and removes
    its budget with the others: no budget is left of an owner that is gone."""
    from budget_middleware.manage import keys as keys_module
    from budget_middleware.manage import manager as manager_module
    from budget_middleware.manage import owner_limits

    barrier: list[threading.Barrier] = []
    waiting = _waiting_at(barrier)

    monkeypatch.setattr(owner_limits, "write_limits", waiting(owner_limits.write_limits))
    deleted_in = keys_module if owner == "virtual_key" else manager_module
    monkeypatch.setattr(deleted_in, "delete_limits", waiting(deleted_in.delete_limits))
    make, update, delete = {
        "customer": (manager.create_customer, manager.update_customer, manager.delete_customer),
        "team": (manager.create_team, manager.update_team, manager.delete_team),
        "virtual_key": (
            manager.create_virtual_key,
            manager.update_virtual_key,
            manager.delete_virtual_key,
        ),
    }[owner]
    outcomes: list[str] = []
    for trial in range(3):
        barrier.append(threading.Barrier(2))
        made = make(name=f"owner-{trial}").id

        def give(made: str = made) -> None:
            try:
                update(made, budgets=[{"max_limit": 5, "reset_duration": "1d"}])
                outcomes.append("updated")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        _together(give, functools.partial(delete, made))
    left = [b.id for b in manager.list_budgets(owner_type=owner)]
    print(f"3 rounds, a {owner} given a budget as it was deleted: {outcomes}; "
          f"{len(left)} budgets left of owners that are gone")  # fmt: skip
    assert not left
    assert set(outcomes) <= {"updated", "NotFound"} and len(outcomes) == 3


@pytest.mark.parametrize("what", ["route", "model_config", "tag"])
def test_a_route_model_config_or_tag_updated_as_it_is_deleted_is_not_found(
    manager: BudgetManager, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route (a model config, a tag's PUT) updated while it is deleted, both past their
    reads before either writes, 3 rounds: the update is made (the delete then removes it, its
    budgets with it) or refused 404 (a PUT makes it anew). Before, an update that found its row
    deleted as it wrote failed with SQLAlchemy's `StaleDataError` (a 500 over HTTP: a route on
    SQLite, a tag's PUT in 3 rounds of 3), and a model config's new budget was written after
    its delete (PostgreSQL: 3 budgets left of model configs that were gone)."""
    from budget_middleware.manage import manager as manager_module

    barrier: list[threading.Barrier] = []
    waiting = _waiting_at(barrier)

    monkeypatch.setattr(manager.origin, "stamp", waiting(manager.origin.stamp))
    remember = waiting(manager_module.remember_deleted)
    monkeypatch.setattr(manager_module, "remember_deleted", remember)
    outcomes: list[str] = []
    for trial in range(3):
        barrier.append(threading.Barrier(1))  # made alone
        if what == "route":
            made = manager.create_route(name=f"r{trial}", targets=["openai/gpt-4o"]).id
            update, delete = manager.update_route, manager.delete_route
            change: dict[str, Any] = {"targets": ["openai/gpt-4o-mini"]}
        elif what == "model_config":
            made = manager.create_model_config(model_name=f"gpt-{trial}").id
            update, delete = manager.update_model_config, manager.delete_model_config
            change = {"budgets": [{"max_limit": 5, "reset_duration": "1d"}]}
        else:  # PUT: made anew when it comes after the delete
            made = manager.put_tag(f"tag-{trial}", TagPut()).tag
            update, delete = manager.put_tag, manager.delete_tag
            change = {"budgets": [{"max_limit": 5, "reset_duration": "1d"}]}
        barrier.append(threading.Barrier(2))

        def change_it(made: str = made, update: Any = update, change: Any = change) -> None:
            try:
                update(made, TagPut(**change)) if what == "tag" else update(made, **change)
                outcomes.append("updated")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        def delete_it(made: str = made, delete: Any = delete) -> None:
            try:
                delete(made)
                outcomes.append("deleted")
            except Exception as exc:
                outcomes.append(f"delete: {type(exc).__name__}")

        _together(change_it, delete_it)
    left: Any = {
        "route": manager.list_routes,
        "model_config": lambda: manager.list_model_configs()[0],
        "tag": manager.list_tags,
    }[what]()
    budgets = manager.list_budgets(owner_type=what)
    if what == "tag":  # made anew by a PUT after the delete: with its budget, and only those
        assert sorted(str(b.tag) for b in budgets) == sorted(t.tag for t in left)
        left = budgets = []
    print(f"3 rounds, a {what} updated as it was deleted: {outcomes}; {len(left)} left, "
          f"{len(budgets)} budgets")  # fmt: skip
    assert set(outcomes) <= {"updated", "NotFound", "deleted"} and outcomes.count("deleted") == 3
    assert not left and not budgets


async def test_budgets_by_owner_id_alone_find_a_provider_by_any_spelling(tmp_path: Path) -> None:
    """`GET /budgets?owner_type=provider&owner_id=OpenAI` answered openai's budget, and
    `GET /budgets?owner_id=OpenAI` (no type, as the CLI sends it) none; `GET /alerts` alike (a
    fault hunt's). A provider is read by any spelling of its name wherever it is named."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/a.db", admin_key="adm-secret-1")
    headers = {"Authorization": "Bearer adm-secret-1"}
    app = create_admin_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        put = await http.put(
            "/providers/openai",
            json={"budgets": [{"max_limit": 10, "alert_thresholds": [0.5]}]},
            headers=headers,
        )
        assert put.status_code in (200, 201), put.text
        found = [
            (await http.get("/budgets", params=params, headers=headers)).json()["count"]
            for params in ({"owner_type": "provider", "owner_id": "OpenAI"}, {"owner_id": "OpenAI"})
        ]
    await get_engine(settings).shutdown()
    print("budgets found by type and name, by name alone:", found)
    assert found == [1, 1]


@pytest.mark.parametrize(
    "change",
    [
        {"reset_duration": "1M"},
        {"reset_duration": None},
        {"reset_duration": "1d", "calendar_aligned": True},
    ],
    ids=["daily-to-monthly", "daily-to-lifetime", "calendar-aligned"],
)
async def test_live_answers_show_a_budget_s_new_terms_before_its_next_request(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """A key's daily budget, spent once, made monthly (or lifetime, or calendar-aligned) through
    the admin API. The store's answer moved its window (SPEC §9: changing a limit keeps its
    usage); the live answers (`from_memory=true`, the dashboard's bars, the key's own
    `GET /virtual-keys/quota`) kept the old day's window until the key's next request in this
    process: `reset_duration` "1M", `period_label` "monthly", but `period_end` tomorrow and
    `period_seconds` 86400. They show the window that request will count in."""
    from support import chat, client, host_app, running

    settings = admin_settings(tmp_path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    fields = ("spent", "period_start", "period_end", "period_seconds", "period_label")
    async with running(app), client(app) as http:
        body = {"name": "k", "budgets": [{"max_limit": 10, "reset_duration": "1d"}]}
        key = (await http.post("/admin/virtual-keys", json=body, headers=ADMIN)).json()
        key = key["virtual_key"]
        auth = {"Authorization": f"Bearer {key['value']}"}
        assert (
            await http.post("/v1/chat/completions", json=chat(), headers=auth)
        ).status_code == 200
        await get_engine(settings).flush()
        budget = {"id": key["budgets"][0]["id"], "max_limit": 10, **change}
        r = await http.put(f"/admin/virtual-keys/{key['id']}", json={"budgets": [budget]},
                           headers=ADMIN)  # fmt: skip
        assert r.status_code == 200, r.text

        async def answers() -> dict[str, tuple[Any, ...]]:
            found = {}
            for name, path, headers in (
                ("store", "/admin/budgets", ADMIN),
                ("live", "/admin/budgets?from_memory=true", ADMIN),
                ("quota", "/admin/virtual-keys/quota", auth),
            ):
                b = (await http.get(path, headers=headers)).json()["budgets"][0]
                found[name] = tuple(b[f] for f in fields)
            return found

        before = await answers()
        assert (
            await http.post("/v1/chat/completions", json=chat(), headers=auth)
        ).status_code == 200
        after = await answers()
    print("before the next request:", before)
    print("after it:", after)
    assert before["live"] == before["store"] == before["quota"]
    # the next request counts in the window shown before it
    assert after["live"][1:] == before["live"][1:] and after["live"][0] > before["live"][0]


async def test_live_answers_show_a_rate_window_s_new_duration_before_its_next_request(
    tmp_path: Path,
) -> None:
    """The same for a rate limit: 60 requests an hour made 60 a minute. The store's answer
    started the minute that holds now (`request_last_reset`); `from_memory=true` kept the
    hour's start, ten minutes back, until the key's next request."""
    from datetime import UTC, datetime, timedelta

    from sqlmodel import select

    from budget_middleware.store.tables import RateLimitRow
    from support import chat, client, host_app, running

    settings = admin_settings(tmp_path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    engine = get_engine(settings)
    async with running(app), client(app) as http:
        rate = {"request_max_limit": 60, "request_reset_duration": "1h"}
        body = {"name": "k", "rate_limit": rate}
        key = (await http.post("/admin/virtual-keys", json=body, headers=ADMIN)).json()
        key = key["virtual_key"]
        with engine.store.session() as s:  # its current hour began ten minutes ago
            row = s.exec(select(RateLimitRow)).one()
            row.request_last_reset = datetime.now(UTC) - timedelta(hours=3, minutes=10)
            s.add(row)
            s.commit()
        await engine.invalidate()
        auth = {"Authorization": f"Bearer {key['value']}"}
        sent = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        assert sent.status_code == 200
        await engine.flush()
        body = {"rate_limit": {**rate, "request_reset_duration": "1m"}}
        r = await http.put(f"/admin/virtual-keys/{key['id']}", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        found = {}
        for name, query in (("store", ""), ("live", "?from_memory=true")):
            answer = (await http.get(f"/admin/rate-limits{query}", headers=ADMIN)).json()
            limit = answer["rate_limits"][0]
            found[name] = (limit["request_current_usage"], limit["request_last_reset"])
    print("requests counted and window start, by answer:", found)
    assert found["live"] == found["store"]


async def test_a_positive_max_limit_too_small_for_a_float_is_not_zero(
    settings: BudgetSettings,
) -> None:
    """SPEC §6: a positive `max_limit` never becomes zero, however small. `1e-400` is a
    positive JSON number that a float cannot hold (it reads as 0.0): it is the one nano-dollar
    that `5e-324` is, not a $0 budget that refuses every request."""
    async with admin_client(settings) as c:
        limits = []
        for written in ("5e-324", "1e-400"):
            body = '{"name": "tiny-' + written + '", "budgets": [{"max_limit": ' + written + "}]}"
            r = await c.post("/virtual-keys", content=body.encode(), headers=ADMIN)
            assert r.status_code == 201, r.text
            limits.append(r.json()["virtual_key"]["budgets"][0]["max_limit"])
    print(f"max_limit 5e-324 and 1e-400 became {limits}")
    assert limits[1] == limits[0] > 0


async def test_a_budget_given_by_its_id_may_leave_its_limit_out(settings: BudgetSettings) -> None:
    """README: a budget given with its `id` "changes only the terms it gives". Its duration
    alone (`{"id": ..., "reset_duration": "1h"}`, as Bifrost's update takes either field) was
    refused, 422 `max_limit: Field required`; it keeps its limit, to the nano-dollar, and its
    usage. A budget without its id still needs its limit, and a null limit is no limit."""
    async with admin_client(settings) as c:
        budget = {"max_limit": 0.000000003, "reset_duration": "1d"}
        body = {"name": "research", "budgets": [budget]}
        team = (await c.post("/teams", json=body, headers=ADMIN)).json()["team"]
        daily = team["budgets"][0]
        update = {"budgets": [{"id": daily["id"], "reset_duration": "1h"}]}
        r = await c.put(f"/teams/{team['id']}", json=update, headers=ADMIN)
        print("its duration alone:", r.status_code, r.json())
        assert r.status_code == 200, r.text
        after = r.json()["team"]["budgets"]
        assert [(b["id"], b["max_limit"], b["reset_duration"]) for b in after] == [
            (daily["id"], 3e-9, "1h")
        ]
        without = {"budgets": [{"reset_duration": "1w"}]}
        r = await c.put(f"/teams/{team['id']}", json=without, headers=ADMIN)
        assert r.status_code == 422 and "max_limit is required" in r.text, r.text
        null = {"budgets": [{"id": daily["id"], "max_limit": None}]}
        r = await c.put(f"/teams/{team['id']}", json=null, headers=ADMIN)
        assert r.status_code == 422 and "not null" in r.text, r.text
        unknown = {"budgets": [{"id": "nope", "reset_duration": "1h"}]}
        r = await c.put(f"/teams/{team['id']}", json=unknown, headers=ADMIN)
        assert r.status_code == 404, r.text


async def test_an_answer_about_one_owner_reads_its_own_rows_not_every_owner_s(
    make_settings: Callable[..., BudgetSettings],
) -> None:
    """Every create, update and get answers with the owner's `user_path`, which read every
    customer (and every team and key) of the store to name one: `POST /customers` on a store of
    300 customers loaded 300 rows, so `config apply` of 3,000 customers took 83 s on SQLite
    (28 ms an entry, growing with the store). One owner's answer reads its own path's rows."""
    from sqlalchemy import event

    from budget_middleware.store.tables import CustomerRow, TeamRow, VirtualKeyRow

    settings = make_settings()
    manager = get_engine(settings).manager
    for n in range(300):
        manager.create_customer({"name": f"c{n}"})
        manager.create_team({"name": f"t{n}"})
    loaded: list[str] = []

    def count(target: Any, context: Any) -> None:
        loaded.append(type(target).__name__)

    tables = (CustomerRow, TeamRow, VirtualKeyRow)
    for table in tables:
        event.listen(table, "load", count)
    try:
        async with admin_client(settings) as c:
            acme = (await c.post("/customers", json={"name": "acme"}, headers=ADMIN)).json()
            body = {"name": "research", "customer_id": acme["customer"]["id"]}
            team = (await c.post("/teams", json=body, headers=ADMIN)).json()["team"]
            body = {"name": "alice", "team_id": team["id"], "budgets": [{"max_limit": 1}]}
            r = await c.post("/virtual-keys", json=body, headers=ADMIN)
            assert r.status_code == 201, r.text
            key = r.json()["virtual_key"]
            assert key["budgets"][0]["user_path"] == "/acme/research/alice"
            r = await c.get(f"/virtual-keys/{key['id']}", headers=ADMIN)
            assert r.json()["virtual_key"]["budgets"][0]["user_path"] == "/acme/research/alice"
    finally:
        for table in tables:
            event.remove(table, "load", count)
    print(f"rows loaded to answer 3 creates and a get, of 301 customers and 301 teams: "
          f"{len(loaded)}")  # fmt: skip
    assert len(loaded) <= 20


@pytest.mark.parametrize("mark", ["\u202e", "\u202a", "\u2066", "\u2069"])
async def test_a_name_with_a_bidi_override_is_refused(settings: BudgetSettings, mark: str) -> None:
    """A bidi embedding, override or isolate (U+202A-U+202E, U+2066-U+2069) in a customer's,
    team's or key's name, or a tag, was stored (201) and then shown reordered in the dashboard,
    `user_path` and every list: `{"name": "alice\\u202egnp.exe"}` reads "aliceexe.png", a
    customer `acme\\u202e` turns the rest of `/acme/research/alice` around (Trojan Source).
    Refused with 422 as a control character is; a request's tag is read with "?" for it."""
    async with admin_client(settings) as c:
        answers = []
        for path, body in (
            ("/customers", {"name": f"acme{mark}evil"}),
            ("/teams", {"name": f"research{mark}"}),
            ("/virtual-keys", {"name": f"alice{mark}gnp.exe"}),
            ("/virtual-keys", {"name": "bob", "tags": [f"product{mark}:chat"]}),
        ):
            r = await c.post(path, json=body, headers=ADMIN)
            answers.append(r.status_code)
            assert r.status_code == 422, (path, r.text)
            assert "no control character" in r.json()["error"]["message"], r.text
        quoted = "".join(f"%{b:02X}" for b in mark.encode())
        r = await c.put(f"/tags/a{quoted}b", json={"budgets": [{"max_limit": 1}]}, headers=ADMIN)
        answers.append(r.status_code)
        print(f"U+{ord(mark):04X}: {answers}")
        assert r.status_code == 422, r.text
        for path in ("/customers", "/teams", "/virtual-keys", "/tags"):
            listed = (await c.get(path, headers=ADMIN)).json()
            assert mark not in str(listed), listed


async def test_the_warnings_of_a_config_applied_through_the_api_are_in_its_answer(
    store_url: str, tmp_path: Path
) -> None:
    """`POST /config/apply` logged its warnings on the server alone (a key declared without a
    value, made with a generated one shown to nobody; an entry the file no longer declares):
    the sender got `{"applied": true}` and nothing else. They are in the answer, as the
    server's log says them; an apply without a warning has none."""
    tagged = "virtual_keys:\n  - name: bot\n    budgets: [{max_limit: 1}]\ntags:\n  - tag: a\n"
    async with admin_client(admin_settings(tmp_path, database_url=store_url)) as c:
        r = await c.post("/config/apply", json={"text": tagged, "format": "yaml"}, headers=ADMIN)
        first = r.json()
        print(first)
        assert r.status_code == 200 and len(first["warnings"]) == 1
        assert first["warnings"][0].startswith(
            "BUDGET_CONFIG_FILE (the config sent), virtual_keys[0] (bot): the entry declares "
            "no value"
        )
        assert "`budget-middleware keys rotate bot`" in first["warnings"][0]
        untagged = tagged.split("tags:")[0]
        r = await c.post("/config/apply", json={"text": untagged, "format": "yaml"}, headers=ADMIN)
        print(r.json())
        assert r.json()["warnings"] == [
            "BUDGET_CONFIG_FILE (the config sent) no longer declares tag 'a': kept, still in force "
            "(the file deletes nothing; delete them through the admin API or the CLI). The file "
            "finds entities by name: an entry renamed in the file declared a new one, without "
            "the old one's spend; to keep it, rename through the admin API first, then in the file"
        ]
        r = await c.post("/config/apply", json={"text": tagged, "format": "yaml"}, headers=ADMIN)
        assert "warnings" not in r.json()  # made once: told once
        doc = (await c.get("/openapi.json", headers=ADMIN)).json()
        assert "warnings" in doc["components"]["schemas"]["ConfigApplied"]["properties"]


async def test_usage_by_key_names_more_gone_keys_than_a_query_takes_parameters(
    tmp_path: Path, store_url: str
) -> None:
    """A report by key looks the names of keys that are gone up among the deleted ones, all in
    one `IN (...)`: with 66,000 gone keys that spent in the period (per-session keys, deleted
    after use), PostgreSQL refused the query ("number of parameters must be between 0 and
    65535") and `GET /usage?group_by=virtual_key` (the CLI's `usage`, the dashboard's top keys)
    answered 503 "the budget store cannot be reached", Retry-After 1, for good. Looked up in
    parts, the report comes, with the deleted keys' names."""
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from budget_middleware.store.tables import DeletedRow, UsageRecordRow

    gone = 66_000
    settings = admin_settings(tmp_path, database_url=store_url)
    async with admin_client(settings) as c:
        await c.get("/customers", headers=ADMIN)  # starts the engine: the tables exist
        at = datetime(2026, 1, 2, tzinfo=UTC)
        with get_engine(settings).store.session() as s:
            s.execute(insert(UsageRecordRow), [
                {"request_id": f"r{i}", "created_at": at, "virtual_key_id": f"k{i}",
                 "provider": "openai", "model": "gpt-4o", "tags": [], "cost_nanos": 1 + i}
                for i in range(gone)
            ])  # fmt: skip
            s.add(DeletedRow(kind="virtual_key", entity_id="k0", name="first"))
            s.add(DeletedRow(kind="virtual_key", entity_id=f"k{gone - 1}", name="last"))
            s.commit()
        r = await c.get("/usage?group_by=virtual_key&limit=1", headers=ADMIN)
        answer = r.json()
        found = (r.status_code, answer.get("count"), answer.get("total", {}).get("requests"))
        r = await c.get(f"/usage?group_by=virtual_key&offset={gone - 1}", headers=ADMIN)
        rows = r.json().get("usage", [])
        found += tuple((row["key"], row["name"], row["deleted"]) for row in rows)
    print("status, groups, requests, first and last named:", found, answer.get("error"))
    assert found[:3] == (200, gone, gone)
    assert found[3:] == (("k0", "first", True),) and answer["usage"][0]["name"] == "last"
