"""The routes of SPEC §9: each reads its parameters, calls the manager in a thread, and answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from budget_middleware.admin import envelopes as env
from budget_middleware.admin.answers import AdminAnswer, ok
from budget_middleware.admin.context import Call, Operation, QueryParam
from budget_middleware.admin.provider_budgets import provider_budgets
from budget_middleware.core.identity import MAX_PROVIDER_CHARS, MAX_TAG_CHARS, NAME_PATTERN
from budget_middleware.core.scopes import OWNER_TYPES
from budget_middleware.core.times import rfc3339
from budget_middleware.exceptions import ConfigFileError, InvalidRequest
from budget_middleware.manage.config_file import apply_config_text
from budget_middleware.manage.reports import GROUPS
from budget_middleware.manage.schemas import (
    ConfigApply,
    CustomerCreate,
    CustomerUpdate,
    ModelConfigCreate,
    ModelConfigUpdate,
    ProviderPut,
    QuotaOut,
    RouteCreate,
    RouteUpdate,
    TagPut,
    TeamCreate,
    TeamUpdate,
    UsageOut,
    VirtualKeyCreate,
    VirtualKeyUpdate,
    dump,
    to_utc,
)
from budget_middleware.store import alerts as stored_alerts

PAGE_BOUND = 10**18
"""A larger `limit` or `offset` is taken as this one (SPEC §9: any `limit` ≥ 1 and `offset` ≥ 0
is accepted): far beyond any list, within what a database's integer holds. Without `limit`, a
list answers every item."""

_BOOL = {"type": "boolean", "default": False}
FROM_MEMORY = QueryParam("from_memory", _BOOL, "answer from the live in-process counters")
LIMIT = QueryParam("limit", {"type": "integer", "minimum": 1},
                   "page size (default: every item)", at_most=PAGE_BOUND)  # fmt: skip
OFFSET = QueryParam("offset", {"type": "integer", "minimum": 0, "default": 0}, "page start",
                    at_most=PAGE_BOUND)  # fmt: skip
OWNER_TYPE = QueryParam("owner_type", {"type": "string", "enum": list(OWNER_TYPES)})
OWNER_ID = QueryParam("owner_id", {"type": "string"}, "for provider and tag: the name")


# A provider's or a tag's name in the path. PUT takes one a request can carry (the manager
# checks `identity.name_problem`): no control character, no space at either end. DELETE takes
# what older releases stored too (1 to 200 characters).
def _put_name(limit: int) -> dict[str, object]:
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": NAME_PATTERN}


_STORED_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_ERRORS = {401: env.ErrorAnswer, 422: env.ErrorAnswer}
_ONE_ERRORS = {**_ERRORS, 404: env.ErrorAnswer}
_WRITE_ERRORS = {**_ONE_ERRORS, 409: env.ErrorAnswer}


def _page(call: Call, items: list[dict[str, object]]) -> list[dict[str, object]]:
    limit = call.number("limit")
    offset = call.number("offset", default=0) or 0
    return items[offset : offset + limit if limit is not None else None]


def _now() -> str:
    return rfc3339(datetime.now(UTC))


def _deleted(id_: str) -> AdminAnswer:
    return ok({"deleted": True, "id": id_})


# -- customers, teams, keys --------------------------------------------------------------


async def list_customers(call: Call) -> AdminAnswer:
    items = [dump(c) for c in await call.run(call.manager.list_customers)]
    return ok({"customers": _page(call, items), "count": len(items)})


async def create_customer(call: Call) -> AdminAnswer:
    body = await call.body(CustomerCreate)
    return ok({"customer": dump(await call.write(call.manager.create_customer, body))}, 201)


async def get_customer(call: Call) -> AdminAnswer:
    return ok({"customer": dump(await call.run(call.manager.get_customer, call.path["id"]))})


async def update_customer(call: Call) -> AdminAnswer:
    body = await call.body(CustomerUpdate)
    out = await call.write(call.manager.update_customer, call.path["id"], body)
    return ok({"customer": dump(out)})


async def delete_customer(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_customer, call.path["id"])
    return _deleted(call.path["id"])


async def list_teams(call: Call) -> AdminAnswer:
    customer = call.text("customer_id")
    items = [dump(t) for t in await call.run(call.manager.list_teams, customer)]
    return ok({"teams": _page(call, items), "count": len(items)})


async def create_team(call: Call) -> AdminAnswer:
    body = await call.body(TeamCreate)
    return ok({"team": dump(await call.write(call.manager.create_team, body))}, 201)


async def get_team(call: Call) -> AdminAnswer:
    return ok({"team": dump(await call.run(call.manager.get_team, call.path["id"]))})


async def update_team(call: Call) -> AdminAnswer:
    body = await call.body(TeamUpdate)
    return ok({"team": dump(await call.write(call.manager.update_team, call.path["id"], body))})


async def delete_team(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_team, call.path["id"])
    return _deleted(call.path["id"])


async def list_keys(call: Call) -> AdminAnswer:
    keys = await call.run(call.manager.list_virtual_keys, call.text("team_id"),
                          call.text("customer_id"))  # fmt: skip
    items = [dump(k) for k in keys]
    return ok({"virtual_keys": _page(call, items), "count": len(items)})


async def create_key(call: Call) -> AdminAnswer:
    body = await call.body(VirtualKeyCreate)
    return ok({"virtual_key": dump(await call.write(call.manager.create_virtual_key, body))}, 201)


async def get_key(call: Call) -> AdminAnswer:
    return ok({"virtual_key": dump(await call.run(call.manager.get_virtual_key, call.path["id"]))})


async def update_key(call: Call) -> AdminAnswer:
    body = await call.body(VirtualKeyUpdate)
    out = await call.write(call.manager.update_virtual_key, call.path["id"], body)
    return ok({"virtual_key": dump(out)})


async def delete_key(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_virtual_key, call.path["id"])
    return _deleted(call.path["id"])


async def rotate_key(call: Call) -> AdminAnswer:
    out = await call.write(call.manager.rotate_virtual_key, call.path["id"])
    return ok({"virtual_key": dump(out)})


async def quota(call: Call) -> AdminAnswer:
    assert call.key_id is not None  # the endpoint has authenticated the key
    key = await call.run(call.manager.get_virtual_key, call.key_id)
    owners = [("virtual_key", key.id)]
    owners += [("provider_config", p.id) for p in key.provider_configs]
    budgets, rates = [], []
    # What a key holder's call reads again: its own limits, not every counter of the process.
    configs = key.provider_configs
    ids = [b.id for b in key.budgets] + [b.id for p in configs for b in p.budgets]
    ids += [r.id for r in (key.rate_limit, *(p.rate_limit for p in configs)) if r is not None]
    live = await call.engine.live_counters(ids)
    for owner_type, owner_id in owners:
        budgets += await call.run(call.manager.list_budgets, owner_type=owner_type,
                                  owner_id=owner_id, from_memory=True,
                                  counters=live)  # fmt: skip
        rates += await call.run(call.manager.list_rate_limits, owner_type=owner_type,
                                owner_id=owner_id, from_memory=True,
                                counters=live)  # fmt: skip
    out = QuotaOut(
        virtual_key=key, budgets=budgets, rate_limits=rates, server_time=datetime.now(UTC)
    )
    return ok(dump(out))


# -- providers, tags, model configs ------------------------------------------------------


async def list_providers(call: Call) -> AdminAnswer:
    items = [dump(p) for p in await call.run(call.manager.list_providers)]
    return ok({"providers": _page(call, items), "count": len(items)})


async def put_provider(call: Call) -> AdminAnswer:
    body = await call.body(ProviderPut)
    out, created = await call.write(call.manager.put_provider_created, call.path["provider"], body)
    return ok({"provider": dump(out)}, 201 if created else 200)


async def delete_provider(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_provider, call.path["provider"])
    return _deleted(call.path["provider"])


async def list_tags(call: Call) -> AdminAnswer:
    items = [dump(t) for t in await call.run(call.manager.list_tags)]
    return ok({"tags": _page(call, items), "count": len(items)})


async def put_tag(call: Call) -> AdminAnswer:
    body = await call.body(TagPut)
    out, created = await call.write(call.manager.put_tag_created, call.path["tag"], body)
    return ok({"tag": dump(out)}, 201 if created else 200)


async def delete_tag(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_tag, call.path["tag"])
    return _deleted(call.path["tag"])


async def list_model_configs(call: Call) -> AdminAnswer:
    from_memory = call.flag("from_memory")
    items, total = await call.run(
        call.manager.list_model_configs,
        limit=call.number("limit"),
        offset=call.number("offset", default=0) or 0,
        search=call.text("search"),
        scope=call.choice("scope"),
        provider=call.text("provider"),
        counters=await call.engine.live_counters() if from_memory else None,
    )
    return ok({"model_configs": [dump(m) for m in items], "total_count": total})


async def create_model_config(call: Call) -> AdminAnswer:
    body = await call.body(ModelConfigCreate)
    out = await call.write(call.manager.create_model_config, body)
    return ok({"model_config": dump(out)}, 201)


async def get_model_config(call: Call) -> AdminAnswer:
    out = await call.run(call.manager.get_model_config, call.path["id"])
    return ok({"model_config": dump(out)})


async def update_model_config(call: Call) -> AdminAnswer:
    body = await call.body(ModelConfigUpdate)
    out = await call.write(call.manager.update_model_config, call.path["id"], body)
    return ok({"model_config": dump(out)})


async def delete_model_config(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_model_config, call.path["id"])
    return _deleted(call.path["id"])


# -- routes (SPEC §12) -------------------------------------------------------------------


async def list_routes(call: Call) -> AdminAnswer:
    items = [dump(r) for r in await call.run(call.manager.list_routes)]
    return ok({"routes": _page(call, items), "count": len(items)})


async def create_route(call: Call) -> AdminAnswer:
    body = await call.body(RouteCreate)
    return ok({"route": dump(await call.write(call.manager.create_route, body))}, 201)


async def get_route(call: Call) -> AdminAnswer:
    return ok({"route": dump(await call.run(call.manager.get_route, call.path["id"]))})


async def update_route(call: Call) -> AdminAnswer:
    body = await call.body(RouteUpdate)
    out = await call.write(call.manager.update_route, call.path["id"], body)
    return ok({"route": dump(out)})


async def delete_route(call: Call) -> AdminAnswer:
    await call.write(call.manager.delete_route, call.path["id"])
    return _deleted(call.path["id"])


# -- budgets, rate limits, usage, health -------------------------------------------------


async def list_budgets(call: Call) -> AdminAnswer:
    from_memory = call.flag("from_memory")
    budgets = await call.run(
        call.manager.list_budgets,
        owner_type=call.choice("owner_type"),
        owner_id=call.text("owner_id"),
        from_memory=from_memory,
        counters=await call.engine.live_counters() if from_memory else call.engine.registry,
    )
    items = [dump(b) for b in budgets]
    return ok({"budgets": _page(call, items), "count": len(items), "server_time": _now()})


async def reset_budget(call: Call) -> AdminAnswer:
    out = await call.write(call.manager.reset_budget, call.path["id"])  # the live counter too
    return ok({"budget": dump(out)})


async def list_rate_limits(call: Call) -> AdminAnswer:
    from_memory = call.flag("from_memory")
    rates = await call.run(
        call.manager.list_rate_limits,
        owner_type=call.choice("owner_type"),
        owner_id=call.text("owner_id"),
        from_memory=from_memory,
        counters=await call.engine.live_counters() if from_memory else call.engine.registry,
    )
    items = [dump(r) for r in rates]
    return ok({"rate_limits": _page(call, items), "count": len(items)})


async def usage(call: Call) -> AdminAnswer:
    group_by = call.choice("group_by") or "virtual_key"
    start, end = call.moment("start"), call.moment("end")
    answer = dump(await call.run(call.manager.usage, group_by, start, end))
    answer["usage"] = _page(call, answer["usage"])  # `count` and `total`: of every group
    return ok(answer)


async def list_alerts(call: Call) -> AdminAnswer:
    """Recent alerts, newest first, with their delivery state (SPEC §14)."""
    alerts, total = await call.run(
        stored_alerts.list_alerts,
        call.engine.store,
        call.choice("owner_type"),
        call.text("owner_id"),
        call.number("limit") or 100,
        call.number("offset", default=0) or 0,
    )
    return ok({"alerts": alerts, "count": total})  # count: every alert the filters match


async def apply_config(call: Call) -> AdminAnswer:
    """A config file's text applied as start-up applies BUDGET_CONFIG_FILE (the CLI's
    `config apply --url`); an invalid one is a 422 naming the entry, and nothing is written."""
    body = await call.body(ConfigApply)
    engine = call.engine
    ignored: list[str] = []
    warnings: list[str] = []
    try:
        entries = await call.run(
            apply_config_text,
            engine.store,
            engine.settings,
            body.text,
            body.format,
            engine.terms_moved,
            engine.forget,
            engine.prices.add_deployments,
            ignored,
            warnings,
        )
    except ConfigFileError as exc:
        raise InvalidRequest(str(exc), param="text") from None
    engine.mark_stale()  # written past the manager: the next request reloads
    await engine.ensure_current()
    answer: dict[str, Any] = {"applied": True, "entries": entries}
    if ignored:  # what of a LiteLLM file is not read: the sender is told, as `config check` is
        answer["ignored"] = ignored
    if warnings:  # in the server's log, where the sender never looks: told them too
        answer["warnings"] = warnings
    return ok(answer)


async def list_refusals(call: Call) -> AdminAnswer:
    """The latest refusals of this process, newest first (kept in memory, the last 200)."""
    items = list(reversed(call.engine.hooks.recent_refusals))
    return ok({"refusals": _page(call, items), "count": len(items)})


async def rejected(call: Call) -> AdminAnswer:
    """What the store refused and the flusher set aside, newest first: saved in `bm_rejected`,
    and any still waiting in this process to be saved."""
    limit = call.number("limit") or PAGE_BOUND
    offset = call.number("offset", default=0) or 0
    engine = call.engine
    waiting = [
        {
            "id": f"unsaved-{n}",
            "kind": kind,
            "created_at": rfc3339(datetime.fromtimestamp(at, UTC)),
            "error": error,
            "record": json.loads(payload),
            "saved": False,
        }
        for n, (kind, payload, error, at) in enumerate(reversed(engine.rejects_to_save))
    ]
    rows, total = await call.run(engine.store.list_rejects, limit, max(offset - len(waiting), 0))
    saved = [
        {
            "id": str(row.id),
            "kind": row.kind,
            "created_at": rfc3339(to_utc(row.created_at)),
            "error": row.error,
            "record": json.loads(row.payload),
            "saved": True,
        }
        for row in rows
    ]
    items = (waiting[offset:] + saved)[:limit]
    return ok({"rejected": items, "count": total + len(waiting)})


async def health(call: Call) -> AdminAnswer:
    parts = await call.engine.health()
    down = "down" in parts.values()
    return ok({"status": "degraded" if down else "ok", **parts}, 503 if down else 200)


_LIST = (LIMIT, OFFSET)
_ID = "{id}"
OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/customers", list_customers, "List customers",
              {200: env.CustomerList, **_ERRORS}, query=_LIST),
    Operation("POST", "/customers", create_customer, "Create a customer",
              {201: env.CustomerAnswer, **_WRITE_ERRORS}, body=CustomerCreate),
    Operation("GET", f"/customers/{_ID}", get_customer, "Get a customer",
              {200: env.CustomerAnswer, **_ONE_ERRORS}),
    Operation("PUT", f"/customers/{_ID}", update_customer, "Update a customer",
              {200: env.CustomerAnswer, **_WRITE_ERRORS}, body=CustomerUpdate),
    Operation("DELETE", f"/customers/{_ID}", delete_customer, "Delete a customer",
              {200: env.Deleted, **_ONE_ERRORS}),
    Operation("GET", "/teams", list_teams, "List teams", {200: env.TeamList, **_ERRORS},
              query=(*_LIST, QueryParam("customer_id", {"type": "string"}))),
    Operation("POST", "/teams", create_team, "Create a team",
              {201: env.TeamAnswer, **_WRITE_ERRORS}, body=TeamCreate),
    Operation("GET", f"/teams/{_ID}", get_team, "Get a team", {200: env.TeamAnswer, **_ONE_ERRORS}),
    Operation("PUT", f"/teams/{_ID}", update_team, "Update a team",
              {200: env.TeamAnswer, **_WRITE_ERRORS}, body=TeamUpdate),
    Operation("DELETE", f"/teams/{_ID}", delete_team, "Delete a team (its keys are detached)",
              {200: env.Deleted, **_ONE_ERRORS}),
    Operation("GET", "/virtual-keys", list_keys, "List virtual keys",
              {200: env.VirtualKeyList, **_ERRORS},
              query=(*_LIST, QueryParam("team_id", {"type": "string"}),
                     QueryParam("customer_id", {"type": "string"},
                                "The customer's keys: its own, and those of its teams"))),
    Operation("POST", "/virtual-keys", create_key, "Create a virtual key (its value, once)",
              {201: env.VirtualKeyAnswer, **_WRITE_ERRORS}, body=VirtualKeyCreate),
    Operation("GET", "/virtual-keys/quota", quota, "The calling key's own budgets and limits",
              {200: QuotaOut, 401: env.ErrorAnswer}, auth="virtual_key"),
    Operation("GET", f"/virtual-keys/{_ID}", get_key, "Get a virtual key",
              {200: env.VirtualKeyAnswer, **_ONE_ERRORS}),
    Operation("PUT", f"/virtual-keys/{_ID}", update_key, "Update a virtual key",
              {200: env.VirtualKeyAnswer, **_WRITE_ERRORS}, body=VirtualKeyUpdate),
    Operation("DELETE", f"/virtual-keys/{_ID}", delete_key, "Delete a virtual key",
              {200: env.Deleted, **_ONE_ERRORS}),
    Operation("POST", f"/virtual-keys/{_ID}/rotate", rotate_key, "A new value, once",
              {200: env.VirtualKeyAnswer, **_ONE_ERRORS}),
    Operation("GET", "/routes", list_routes, "List routes", {200: env.RouteList, **_ERRORS},
              query=_LIST),
    Operation("POST", "/routes", create_route, "Create a route",
              {201: env.RouteAnswer, **_WRITE_ERRORS}, body=RouteCreate),
    Operation("GET", f"/routes/{_ID}", get_route, "Get a route",
              {200: env.RouteAnswer, **_ONE_ERRORS}),
    Operation("PUT", f"/routes/{_ID}", update_route, "Update a route",
              {200: env.RouteAnswer, **_WRITE_ERRORS}, body=RouteUpdate),
    Operation("DELETE", f"/routes/{_ID}", delete_route, "Delete a route",
              {200: env.Deleted, **_ONE_ERRORS}),
    Operation("GET", "/budgets", list_budgets, "List budgets with their status",
              {200: env.BudgetList, **_ERRORS}, query=(OWNER_TYPE, OWNER_ID, FROM_MEMORY, *_LIST)),
    Operation("POST", f"/budgets/{_ID}/reset", reset_budget, "Start a new window now",
              {200: env.BudgetAnswer, **_ONE_ERRORS}),
    Operation("GET", "/rate-limits", list_rate_limits, "List rate limits",
              {200: env.RateLimitList, **_ERRORS},
              query=(OWNER_TYPE, OWNER_ID, FROM_MEMORY, *_LIST)),
    Operation("GET", "/providers", list_providers, "List provider-wide limits",
              {200: env.ProviderList, **_ERRORS}, query=_LIST),
    Operation("PUT", "/providers/{provider}", put_provider, "Set a provider's limits",
              {200: env.ProviderAnswer, 201: env.ProviderAnswer, **_WRITE_ERRORS},
              body=ProviderPut, path_params={"provider": _put_name(MAX_PROVIDER_CHARS)}),
    Operation("DELETE", "/providers/{provider}", delete_provider, "Remove a provider's limits",
              {200: env.Deleted, **_ONE_ERRORS}, path_params={"provider": _STORED_NAME}),
    Operation("GET", "/provider/budgets", provider_budgets, "Each provider's tightest budget "
              "(LiteLLM's shape)", {200: env.ProviderBudgets, **_ERRORS}),
    Operation("GET", "/model-configs", list_model_configs, "List model configs",
              {200: env.ModelConfigList, **_ERRORS},
              query=(*_LIST, QueryParam("search", {"type": "string"}),
                     QueryParam("scope", {"type": "string", "enum": ["global", "virtual_key"]}),
                     QueryParam("provider", {"type": "string"}), FROM_MEMORY)),
    Operation("POST", "/model-configs", create_model_config, "Create a model config",
              {201: env.ModelConfigAnswer, **_WRITE_ERRORS}, body=ModelConfigCreate),
    Operation("GET", f"/model-configs/{_ID}", get_model_config, "Get a model config",
              {200: env.ModelConfigAnswer, **_ONE_ERRORS}),
    Operation("PUT", f"/model-configs/{_ID}", update_model_config, "Update a model config",
              {200: env.ModelConfigAnswer, **_WRITE_ERRORS}, body=ModelConfigUpdate),
    Operation("DELETE", f"/model-configs/{_ID}", delete_model_config, "Delete a model config",
              {200: env.Deleted, **_ONE_ERRORS}),
    Operation("GET", "/tags", list_tags, "List tag-wide limits", {200: env.TagList, **_ERRORS},
              query=_LIST),
    Operation("PUT", "/tags/{tag}", put_tag, "Set a tag's limits",
              {200: env.TagAnswer, 201: env.TagAnswer, **_WRITE_ERRORS}, body=TagPut,
              path_params={"tag": _put_name(MAX_TAG_CHARS)}),
    Operation("DELETE", "/tags/{tag}", delete_tag, "Remove a tag's limits",
              {200: env.Deleted, **_ONE_ERRORS}, path_params={"tag": _STORED_NAME}),
    Operation("GET", "/usage", usage, "Spend, tokens and requests, grouped",
              {200: UsageOut, **_ERRORS},
              query=(QueryParam("group_by", {"type": "string", "enum": list(GROUPS)}),
                     QueryParam("start", {"type": "string", "format": "date-time"},
                                "from (inclusive): RFC 3339 with offset, or a date (00:00 UTC)"),
                     QueryParam("end", {"type": "string", "format": "date-time"},
                                "to (exclusive): RFC 3339 with offset, or a date (00:00 UTC); "
                                "not before `start` (an end before the start is a 422 naming "
                                "both, param `end`; an end equal to it, an empty period)"),
                     *_LIST),
              description="Between `start` (inclusive) and `end` (exclusive). An `end` before "
              "`start` is refused, 422 `invalid_value` with `param` `end` and a message naming "
              "both; an `end` equal to `start` is an empty period (200, no usage)."),
    Operation("GET", "/usage/rejected", rejected,
              "Records and counter charges the store refused, set aside",
              {200: env.RejectedList, **_ERRORS}, query=_LIST),
    Operation("GET", "/alerts", list_alerts, "Recent alerts and their delivery state",
              {200: env.AlertList, **_ERRORS}, query=(OWNER_TYPE, OWNER_ID, *_LIST)),
    Operation("POST", "/config/apply", apply_config, "Apply a config file's text",
              {200: env.ConfigApplied, **_WRITE_ERRORS}, body=ConfigApply),
    Operation("GET", "/refusals", list_refusals, "This process's latest refusals",
              {200: env.RefusalList, **_ERRORS}, query=_LIST),
    Operation("GET", "/health", health, "Health of the store and Redis",
              {200: env.HealthAnswer, 503: env.HealthAnswer}, auth="open"),
)  # fmt: skip
