"""The command tree (SPEC §16). Every command asks a `Client` (the store, or the admin API with
`--url`) and prints what it answers: a table or `field: value` lines for people, the admin API's
JSON with `--json`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from budget_middleware.cli import output as out
from budget_middleware.cli import values
from budget_middleware.cli.client import (
    KINDS,
    Client,
    CliError,
    HttpClient,
    Json,
    Kind,
    StoreClient,
    config_message,
)
from budget_middleware.core.scopes import OWNER_TYPES

USAGE_GROUPS = {
    "key": "virtual_key",
    "team": "team",
    "customer": "customer",
    "provider": "provider",
    "model": "model",
    "tag": "tag",
    "day": "day",
}


@dataclass(slots=True)
class State:
    """The group's options, and the client made from them on first use."""

    url: str | None = None
    admin_key: str | None = None
    json: bool = False
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        if self._client is None:
            if self.url:
                from budget_middleware.settings import UNUSABLE_BEARER, bearer_token_usable

                key = (self.admin_key or "").strip()  # as the admin API reads a bearer token
                if not key:
                    raise click.UsageError("--url needs --admin-key (or BUDGET_ADMIN_KEY)")
                if not bearer_token_usable(key):
                    raise click.BadParameter(UNUSABLE_BEARER, param_hint="--admin-key")
                self._client = HttpClient(self.url, key)
            else:
                from budget_middleware.exceptions import SettingsError
                from budget_middleware.settings import BudgetSettings

                try:
                    settings = BudgetSettings()
                except SettingsError as exc:
                    raise CliError(str(exc)) from None
                self._client = StoreClient(settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _state() -> State:
    return click.get_current_context().ensure_object(State)


def _existing() -> Client:
    """The client of a command that reads the store, or changes what must be in it already: one
    on a SQLite file that does not exist is refused (an empty store would be made, and shown)."""
    client = _state().client()
    client.need_store()
    return client


def _json_flag(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).json = True


def _json_option() -> click.Option:
    return click.Option(
        ["--json"],
        is_flag=True,
        expose_value=False,
        callback=_json_flag,
        help="Print the admin API's JSON instead of a table.",
    )


def command(name: str, callback: Callable[..., None], help: str, params: Sequence[Any]) -> Any:
    """A leaf command: its parameters, and `--json` (also accepted before the command)."""
    return click.Command(
        name, callback=callback, help=help, params=[*params, _json_option()], no_args_is_help=False
    )


def _opt(*decls: str, **attrs: Any) -> click.Option:
    return click.Option(list(decls), **attrs)


# -- the fields of create and update ----------------------------------------------------------


def _limit_options() -> list[click.Option]:
    return [
        _opt(
            "--budget",
            "budgets",
            multiple=True,
            metavar="USD[/DURATION]",
            help="A budget: 10/1d is $10 a day, 100 is $100 that never resets, 50/1M:soft "
            "a soft one (alerts, never refuses). Repeat for "
            "several; in an update they replace the owner's budgets, each keeping the usage "
            "of the one with the same duration.",
        ),
        _opt("--request-limit", metavar="N/DURATION", help="At most N requests per DURATION."),
        _opt("--token-limit", metavar="N/DURATION", help="At most N tokens per DURATION."),
        _opt(
            "--max-concurrent-requests",
            type=click.IntRange(min=1),
            help="At most N requests in flight. The three rate-limit options together are the "
            "owner's whole rate limit.",
        ),
        _opt(
            "--calendar-aligned/--no-calendar-aligned",
            default=None,
            help="Windows of a day or more start at the calendar's boundary (UTC).",
        ),
    ]


def _body_options() -> list[click.Option]:
    return [
        _opt("--body", metavar="JSON", help="The admin API's body, as JSON; options override it."),
        _opt("--file", metavar="PATH", help="The admin API's body from a JSON file ('-': stdin)."),
    ]


_NAME = _opt("--name", help="The name (unique).")
_CUSTOMER = _opt("--customer-id", help="The customer (id or name).")
_TEAM = _opt("--team-id", help="The team (id or name).")

FIELDS: dict[str, list[click.Option]] = {
    "customers": [_NAME, *_limit_options()],
    "teams": [_NAME, _CUSTOMER, *_limit_options()],
    "keys": [
        _NAME,
        _TEAM,
        _CUSTOMER,
        _opt("--active/--inactive", "is_active", default=None, help="Whether the key may be used."),
        _opt(
            "--expires-at",
            metavar="TIME",
            help="When the key expires: 30d (from now), 2027-01-01 or 2027-01-01T00:00:00Z.",
        ),
        _opt("--tag", "tags", multiple=True, help="A tag added to every request (repeatable)."),
        *_limit_options(),
    ],
    "providers": _limit_options(),
    "tags": _limit_options(),
    "model-configs": [
        _opt("--model-name", help="An exact model name, '*' (every model) or a glob (gpt-4o*)."),
        _opt("--provider", help="Only this provider's model."),
        _opt(
            "--scope-id",
            metavar="KEY",
            help="Only for this virtual key (id or name; default: global).",
        ),
        *_limit_options(),
    ],
    "routes": [
        _NAME,
        _opt(
            "--target",
            "targets",
            multiple=True,
            metavar="PROVIDER/MODEL",
            help="A target, tried in the order given (repeatable).",
        ),
        _opt(
            "--strategy",
            type=click.Choice(["ordered", "most_remaining"]),
            help="ordered: the first target that passes; most_remaining: the one with most left.",
        ),
    ],
}

FILTERS: dict[str, list[click.Option]] = {
    "teams": [_opt("--customer-id", help="Only this customer's teams (id or name).")],
    "keys": [
        _opt("--team-id", help="Only this team's keys (id or name)."),
        _opt("--customer-id", help="Only this customer's keys (id or name)."),
    ],
    "model-configs": [
        _opt("--search", help="Only model names containing this."),
        _opt("--scope", type=click.Choice(["global", "virtual_key"]), help="Only this scope."),
        _opt("--provider", help="Only this provider's."),
    ],
}


# What a create needs beyond its body's defaults, and the option that gives it.
_REQUIRED = {
    "model-configs": (("model_name", "--model-name"),),
    "routes": (("name", "--name"), ("targets", "--target")),
}


def build_body(options: dict[str, Any]) -> Json:
    """The body of a create or update: `--body`/`--file`, then each option given."""
    body = values.body(options.pop("body", None), options.pop("file", None))
    rate: Json = {}
    for option, prefix in (("request_limit", "request"), ("token_limit", "token")):
        text = options.pop(option, None)
        if text is not None:
            opt_name = "--" + option.replace("_", "-")
            rate[f"{prefix}_max_limit"], rate[f"{prefix}_reset_duration"] = values.limit(
                text, opt_name
            )
    concurrent = options.pop("max_concurrent_requests", None)
    if concurrent is not None:
        from budget_middleware.manage.schemas import Concurrency

        rate["max_concurrent_requests"] = values.within(
            concurrent, Concurrency, "--max-concurrent-requests"
        )
    if rate:
        body["rate_limit"] = rate
    budgets = options.pop("budgets", ())
    if budgets:
        body["budgets"] = [values.budget(text) for text in budgets]
    expires = options.pop("expires_at", None)
    if expires is not None:
        # `30d` from the server's clock (which expires the key), not this machine's
        now = _state().client().server_time() if values.is_duration(expires) else None
        body["expires_at"] = values.moment(expires, "--expires-at", ahead=True, now=now)
    scope_id = options.pop("scope_id", None)
    if scope_id is not None:
        body["scope"], body["scope_id"] = "virtual_key", scope_id
    for name, value in options.items():
        if value is not None and value != ():
            body[name] = list(value) if isinstance(value, tuple) else value
    return body


# -- showing objects ---------------------------------------------------------------------------

_STAMPS = ["calendar_aligned", "source", "created_at", "updated_at"]
SHOWN: dict[str, list[str]] = {
    "customers": ["id", "name", *_STAMPS],
    "teams": ["id", "name", "customer_id", *_STAMPS],
    "keys": [
        "id",
        "name",
        "key_display",
        "team_id",
        "customer_id",
        "is_active",
        "expires_at",
        "tags",
        *_STAMPS,
    ],
    "providers": ["provider", *_STAMPS],
    "tags": ["tag", *_STAMPS],
    "model-configs": ["id", "model_name", "provider", "scope", "scope_id", "scope_name", *_STAMPS],
    "routes": ["id", "name", "strategy", "targets", "source", "created_at", "updated_at"],
}

_LIMITS: list[out.Column] = [("BUDGETS", out.budgets_summary), ("RATE LIMIT", out.rate_summary)]


def _scope(item: Json) -> str:
    if item.get("scope") != "virtual_key":
        return "global"
    return f"key {item.get('scope_name') or item.get('scope_id')}"


COLUMNS: dict[str, list[out.Column]] = {
    "customers": [("ID", lambda i: i["id"]), ("NAME", lambda i: i["name"]), *_LIMITS],
    "teams": [
        ("ID", lambda i: i["id"]),
        ("NAME", lambda i: i["name"]),
        ("CUSTOMER", lambda i: i.get("customer_id")),
        *_LIMITS,
    ],
    "keys": [
        ("ID", lambda i: i["id"]),
        ("NAME", lambda i: i["name"]),
        ("KEY", lambda i: i.get("key_display")),
        ("TEAM", lambda i: i.get("team_id")),
        ("CUSTOMER", lambda i: i.get("customer_id")),
        ("ACTIVE", lambda i: i.get("is_active")),
        ("EXPIRES", lambda i: out.when(i.get("expires_at"))),
        *_LIMITS,
    ],
    "providers": [("PROVIDER", lambda i: i["provider"]), *_LIMITS],
    "tags": [("TAG", lambda i: i["tag"]), *_LIMITS],
    "model-configs": [
        ("ID", lambda i: i["id"]),
        ("MODEL", lambda i: i["model_name"]),
        ("PROVIDER", lambda i: i.get("provider")),
        ("SCOPE", _scope),
        *_LIMITS,
    ],
    "routes": [
        ("ID", lambda i: i["id"]),
        ("NAME", lambda i: i["name"]),
        ("STRATEGY", lambda i: i.get("strategy")),
        ("TARGETS", lambda i: i.get("targets")),
    ],
}


def show(kind: Kind, item: Json) -> None:
    out.fields(item, SHOWN[kind.command])
    out.show_limits(item)
    for config in item.get("provider_configs") or []:
        blocked = config.get("blocked_models") or []
        click.echo(
            f"provider {config['provider']}: models {out.text(config.get('allowed_models'))}"
            + (f", blocked {out.text(blocked)}" if blocked else "")
            + f"; budgets {out.budgets_summary(config)}; rate limit {out.rate_summary(config)}"
        )


def emit(kind: Kind, answer: Json, headline: str | None = None) -> None:
    """One object: the admin API's answer with `--json`, else its fields."""
    if _state().json:
        out.emit_json(answer)
        return
    item = answer[kind.one]
    if headline:
        click.echo(headline)
    show(kind, item)
    if item.get("value"):
        click.echo(f"value: {item['value']}")
        click.echo("(the key's value is shown this once: store it now)", err=True)


def _label(kind: Kind, item: Json) -> str:
    ident = item.get("id") or item.get(kind.one)
    name = item.get("name") or item.get("model_name")
    return f"{kind.what} {ident}" + (f" ({name})" if name and name != ident else "")


# -- finding an object by id or name -----------------------------------------------------------


def resolve(client: Client, kind: Kind, ref: str) -> Json:
    """The object `ref` names: its id (or, for providers and tags, its name); else, when exactly
    one object has it as its name (model configs: its model name), that one."""
    try:
        found: Json = client.get(kind, ref)[kind.one]
        return found
    except CliError as exc:
        if exc.status != 404 or kind.named:
            raise
        field_name = "model_name" if kind.command == "model-configs" else "name"
        matches = [i for i in client.list(kind, {})[kind.many] if i.get(field_name) == ref]
        if len(matches) > 1:
            ids = ", ".join(str(i["id"]) for i in matches)
            raise CliError(
                f"{len(matches)} {kind.command} are named {ref!r} ({ids}): name one by its id",
                status=409,
            ) from None
        if not matches:
            raise
        first: Json = matches[0]
        return first


def _named(client: Client, kind: Kind, name: str) -> Json | None:
    """The provider or tag `name` names, or None when the store has none (a `PUT` creates it)."""
    try:
        found: Json = client.get(kind, name)[kind.one]
    except CliError as exc:
        if exc.status != 404:
            raise
        return None
    return found


_PARENTS = {"customer_id": "customers", "team_id": "teams", "scope_id": "keys"}


def resolve_parents(client: Client, body: Json) -> Json:
    """`customer_id`, `team_id` and `scope_id` given by name (`--team-id research`) as ids."""
    for field_name, command_name in _PARENTS.items():
        ref = body.get(field_name)
        if isinstance(ref, str) and ref:
            body[field_name] = resolve(client, KINDS[command_name], ref)["id"]
    return body


def _ref(kind: Kind, item: Json) -> str:
    return str(item[kind.one] if kind.named else item["id"])


# -- the commands of one kind of object --------------------------------------------------------


def entity_group(kind: Kind) -> click.Group:
    ref_name = "NAME" if kind.named else "ID"
    by = "by name" if kind.named else "by id or name"

    def list_(**filters: Any) -> None:
        client = _existing()
        answer = client.list(kind, resolve_parents(client, filters))
        if _state().json:
            out.emit_json(answer)
        else:
            out.table(answer[kind.many], COLUMNS[kind.command])

    def show_(ref: str) -> None:
        item = resolve(_existing(), kind, ref)
        emit(kind, {kind.one: item})

    def create_(**options: Any) -> None:
        client = _state().client()
        if kind.named:
            name = options.pop("ref")
            body = build_body(options)
            if _named(client, kind, name) is not None:
                raise CliError(
                    f"{kind.what} {name!r} already exists: change it with "
                    f"'{kind.command} update {name}'",
                    status=409,
                )
            answer = client.put(kind, name, body)
        else:
            body = build_body(options)
            for name, option in _REQUIRED.get(kind.command, (("name", "--name"),)):
                if name not in body:  # was `error: name: Field required`, exit 1
                    raise click.UsageError(
                        f"Missing option '{option}' (or {name!r} in --body or --file)."
                    )
            answer = client.create(kind, resolve_parents(client, body))
        emit(kind, answer, f"created {_label(kind, answer[kind.one])}")

    def update_(ref: str, **options: Any) -> None:
        client = _existing()
        body = resolve_parents(client, build_body(options))
        if kind.named:  # `PUT /providers/{provider}` sets its limits, creating it (SPEC §9)
            item = _named(client, kind, ref)
            answer = client.put(kind, ref if item is None else _ref(kind, item), body)
            done = "created" if item is None else "updated"
        else:
            answer = client.update(kind, _ref(kind, resolve(client, kind, ref)), body)
            done = "updated"
        emit(kind, answer, f"{done} {_label(kind, answer[kind.one])}")

    def delete_(ref: str) -> None:
        client = _existing()
        item = resolve(client, kind, ref)
        answer = client.delete(kind, _ref(kind, item))
        if _state().json:
            out.emit_json(answer)
        else:
            click.echo(f"deleted {_label(kind, item)}")

    ref = click.Argument(["ref"], metavar=ref_name)
    fields = FIELDS[kind.command]
    bodies = _body_options()
    group = click.Group(
        kind.command,
        help=f"{kind.what.capitalize()}s: list, show, create, update, delete.",
        no_args_is_help=True,
    )
    group.add_command(command("list", list_, f"List {kind.what}s.", FILTERS.get(kind.command, [])))
    group.add_command(command("show", show_, f"Show a {kind.what} ({by}).", [ref]))
    create_params: list[Any] = [ref] if kind.named else []
    what = "the admin API's create body" if not kind.named else "the admin API's PUT body"
    group.add_command(
        command(
            "create",
            create_,
            f"Create a {kind.what} from options and/or {what}.",
            [*create_params, *fields, *bodies],
        )
    )
    group.add_command(
        command(
            "update",
            update_,
            f"Change a {kind.what} ({by}): only what is given changes."
            + (" A limit keeps its usage." if kind.command != "routes" else "")  # (none to keep)
            + (" One the store does not have is created (as PUT does)." if kind.named else ""),
            [ref, *fields, *bodies],
        )
    )
    group.add_command(command("delete", delete_, f"Delete a {kind.what} ({by}).", [ref]))
    if kind.command == "keys":

        def rotate_(ref: str) -> None:
            client = _existing()
            answer = client.rotate_key(resolve(client, kind, ref)["id"])
            emit(
                kind,
                answer,
                f"rotated {_label(kind, answer[kind.one])}: the old value stops working",
            )

        group.add_command(
            command("rotate", rotate_, "Give a key a new value, shown once (by id or name).", [ref])
        )
    return group


# -- budgets, usage, alerts, config ----------------------------------------------------------


# Owners known by an id or a name (`resolve`), by their owner type; providers and tags are
# known by their name only, a provider config by its id.
_OWNERS = {kind.one: kind for kind in KINDS.values() if not kind.named and kind.command != "routes"}


def _owner_filter(client: Client, owner_type: str | None, owner_id: str | None) -> Json:
    """`--owner-type` and `--owner-id` as the admin API takes them: an owner named by its name
    (`--owner-id alice`, as every other command takes one) by its id; without `--owner-type`,
    the one customer, team, key or model config of that name. Anything else as given (a
    provider's or a tag's name, the id of an owner deleted since: its alerts)."""
    query: Json = {"owner_type": owner_type, "owner_id": owner_id}
    if owner_id is None or owner_type not in (None, *_OWNERS):
        return query
    kinds = [_OWNERS[owner_type]] if owner_type is not None else list(_OWNERS.values())
    found: list[tuple[str, Json]] = []
    for kind in kinds:
        try:
            found.append((kind.one, resolve(client, kind, owner_id)))
        except CliError as exc:
            if exc.status != 404:
                raise
    if not found or any(item["id"] == owner_id for _, item in found):
        return query
    if len(found) > 1:
        named = ", ".join(f"{one} {item['id']}" for one, item in found)
        raise CliError(f"{named} are named {owner_id!r}: give --owner-type", status=409)
    [(one, item)] = found
    return {"owner_type": one, "owner_id": item["id"]}


def _no_such_owner(client: Client, owner_type: str | None, owner_id: str | None) -> None:
    """A filter that found nothing: an error when nothing has that id or name (a typo would
    read as an owner with no budgets or alerts). A deleted owner's id still finds its alerts."""
    if owner_id is None:
        return
    named = {kind.one: kind for kind in KINDS.values() if kind.command != "routes"}
    kinds = [named[owner_type]] if owner_type in named else []
    if owner_type is None:
        kinds = list(named.values())
    for kind in kinds:
        try:
            resolve(client, kind, owner_id)
            return
        except CliError as exc:
            if exc.status != 404:
                raise
    words = [kind.what for kind in kinds]
    if owner_type in (None, "provider_config"):  # a key's provider config: by its id, in its key
        keys = client.list(KINDS["keys"], {})[KINDS["keys"].many]
        if any(pc.get("id") == owner_id for k in keys for pc in k.get("provider_configs") or ()):
            return
        words.append("provider config")
    what = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
    raise CliError(f"no {what} has the id or name {owner_id!r}", status=404)


def _budgets_list(owner_type: str | None, owner_id: str | None) -> None:
    client = _existing()
    answer = client.budgets(_owner_filter(client, owner_type, owner_id))
    if not answer["budgets"]:
        _no_such_owner(client, owner_type, owner_id)
    if _state().json:
        out.emit_json(answer)
    else:
        out.table(answer["budgets"], out.LIVE_BUDGET_COLUMNS)


def _budgets_reset(ref: str) -> None:
    answer = _existing().reset_budget(ref)
    if _state().json:
        out.emit_json(answer)
        return
    budget = answer["budget"]
    click.echo(
        f"reset budget {budget['id']} ({budget.get('user_path', '-')}): a new window starts now"
    )
    out.table([budget], out.BUDGET_COLUMNS)


_OWNER_FILTERS = [
    _opt("--owner-type", type=click.Choice(OWNER_TYPES), help="Only this kind of owner's."),
    _opt("--owner-id", help="Only this owner's: its id or name (a provider's or a tag's name)."),
]

budgets_group = click.Group(
    "budgets", help="Budgets of every owner, with their status.", no_args_is_help=True
)
budgets_group.add_command(
    command("list", _budgets_list, "List budgets: spent, limit, window.", _OWNER_FILTERS)
)
budgets_group.add_command(
    command(
        "reset",
        _budgets_reset,
        "Start a new window of a budget now (usage 0).",
        [click.Argument(["ref"], metavar="ID")],
    )
)


def _usage_name(row: dict[str, Any]) -> object:
    """A group's name, marked when its key, team or customer has been deleted since."""
    name = row.get("name")
    return f"{name} (deleted)" if row.get("deleted") else name


def _usage(by: str, since: str | None, until: str | None) -> None:
    client = _existing()
    # `7d` ago by the server's clock (as its records are dated), not this machine's
    relative = values.is_duration(since) or values.is_duration(until)
    start, end = values.period(since, until, client.server_time() if relative else None)
    query = {"group_by": USAGE_GROUPS[by], "start": start, "end": end}
    answer = client.usage(query)
    if _state().json:
        out.emit_json(answer)
        return
    rows = [*answer["usage"], {**answer["total"], "key": "total"}] if answer["usage"] else []
    named = by in ("key", "team", "customer")
    columns: list[out.Column] = [(by.upper(), lambda r: r.get("key"))]
    if named:
        columns.append(("NAME", _usage_name))
    columns += [
        ("REQUESTS", lambda r: r["requests"]),
        ("INPUT TOKENS", lambda r: r["input_tokens"]),
        ("OUTPUT TOKENS", lambda r: r["output_tokens"]),
        ("CACHED TOKENS", lambda r: r["cached_tokens"]),
        ("COST", lambda r: out.usd(r["cost"])),
    ]
    out.table(rows, columns, empty="no usage in this period")


usage_command = command(
    "usage",
    _usage,
    "Spend, tokens and requests by key, model, day, ...",
    [
        _opt(
            "--by",
            type=click.Choice(list(USAGE_GROUPS)),
            default="key",
            show_default=True,
            help="What to group by.",
        ),
        _opt(
            "--since",
            metavar="TIME",
            help="From (inclusive): 7d (ago), 12h, 1M, a date (2026-01-01) or a time "
            "(2026-01-01T00:00:00Z). Default: the beginning.",
        ),
        _opt("--until", metavar="TIME", help="To (exclusive), in the same forms. Default: now."),
    ],
)


def _alerts_list(owner_type: str | None, owner_id: str | None, limit: int) -> None:
    client = _existing()
    answer = client.alerts({**_owner_filter(client, owner_type, owner_id), "limit": limit})
    if not answer.get("alerts"):
        _no_such_owner(client, owner_type, owner_id)
    if _state().json:
        out.emit_json(answer)
        return

    def owner(alert: Json) -> str:
        who = alert.get("owner") or {}
        return f"{who.get('type', '-')} {who.get('name') or who.get('id') or '-'}"

    out.table(
        answer.get("alerts", []),
        [
            ("RAISED", lambda a: out.when(a.get("raised_at"))),
            ("TYPE", lambda a: a.get("type")),
            ("OWNER", owner),
            ("THRESHOLD", lambda a: a.get("threshold")),
            ("BUDGET", lambda a: a.get("budget_id")),
            ("DELIVERY", out.delivery),
            ("ATTEMPTS", lambda a: a.get("attempts")),
        ],
    )


alerts_group = click.Group(
    "alerts", help="Alerts raised by budgets (newest first).", no_args_is_help=True
)
alerts_group.add_command(
    command(
        "list",
        _alerts_list,
        "List recent alerts and their delivery.",
        [
            *_OWNER_FILTERS,
            _opt(
                "--limit",
                type=click.IntRange(min=1),
                default=100,
                show_default=True,
                help="At most this many.",
            ),
        ],
    )
)


def _check(
    file: str,
    unset: dict[str, list[str]] | None = None,
    ignored: list[str] | None = None,
    unchecked: list[str] | None = None,
) -> dict[str, int]:
    from budget_middleware.exceptions import ConfigFileError
    from budget_middleware.manage.config_file import check_config_file

    try:
        sections = check_config_file(Path(file), unset=unset, ignored=ignored, unchecked=unchecked)
    except ConfigFileError as exc:
        raise CliError(config_message(str(exc))) from None
    return {name: len(entries) for name, entries in sections.items() if entries}


def _counts(entries: dict[str, int]) -> str:
    return (
        ", ".join(f"{name.replace('_', ' ')}: {n}" for name, n in entries.items()) or "no entries"
    )


def _config_check(file: str, require_env: bool) -> None:
    unset: dict[str, list[str]] | None = None if require_env else {}
    ignored: list[str] = []
    unchecked: list[str] = []
    entries = _check(file, unset, ignored, unchecked)
    for name, where in (unset or {}).items():
        click.echo(
            f"warning: {name} is not set here: the value of {', '.join(where)} is checked where "
            "the file is applied (--require-env makes it an error)",
            err=True,
        )
    for reference in unchecked:  # `config check` reads no store: "valid" is not said of these
        click.echo(
            f"warning: not checked: {reference} is not declared in {file}; applying the file "
            "checks it against the store",
            err=True,
        )
    _warn_ignored(file, ignored)
    if _state().json:
        answer: Json = {"file": file, "valid": True, "entries": entries}
        if unset:
            answer["unset_variables"] = unset
        if unchecked:
            answer["unchecked_references"] = unchecked
        if ignored:
            answer["ignored"] = ignored
        out.emit_json(answer)
    else:
        more = f" ({len(unchecked)} unchecked: see the warnings)" if unchecked else ""
        click.echo(f"{file} is valid: {_counts(entries)}{more}")


def _warn_ignored(file: str, ignored: list[str]) -> None:
    """What of a LiteLLM file is not read, as start-up's log says it (`config check`, `config
    apply`, on the store or through `--url`)."""
    if ignored:
        click.echo(
            f"warning: {file} is a LiteLLM config: only its budgets, routes and prices are "
            f"read; ignored: {', '.join(ignored)}",
            err=True,
        )


def _config_apply(file: str) -> None:
    ignored: list[str] = []
    warnings: list[str] = []
    entries = _state().client().apply_config(Path(file), ignored, warnings)  # checks it first
    _warn_ignored(file, ignored)
    # the apply's warnings (a key made without a value, ...), whether applied here or by a
    # server through --url (in its log alone, where the sender never looked)
    told = [config_message(text) for text in warnings]
    for text in told:
        click.echo(f"warning: {out.text(text)}", err=True)  # a stored name's controls: "?"
    if _state().json:
        answer: Json = {"file": file, "applied": True, "entries": entries}
        if ignored:
            answer["ignored"] = ignored
        if told:
            answer["warnings"] = told
        out.emit_json(answer)
    else:
        click.echo(
            f"applied {file}: {_counts(entries)} (created, or updated where the entry changed)"
        )


_FILE = click.Argument(["file"], metavar="FILE")
config_group = click.Group(
    "config",
    help="A config file (YAML or JSON, BUDGET_CONFIG_FILE's format).",
    no_args_is_help=True,
)
config_group.add_command(
    command(
        "check",
        _config_check,
        "Check a config file without touching the store. A key's `value: ${VAR}` whose VAR is "
        "not set in this shell (the server that applies the file has it) is a warning naming "
        "VAR, the rest of the file is checked, and the exit status is 0; that value itself is "
        "checked where the file is applied. Of a LiteLLM proxy_config.yaml, a warning names "
        "what is not read, as start-up's does.",
        [
            _FILE,
            _opt(
                "--require-env",
                is_flag=True,
                help="Fail (exit 1) on a ${VAR} not set here, as applying the file does: to "
                "check the file in the environment that applies it.",
            ),
        ],
    )
)
config_group.add_command(
    command(
        "apply",
        _config_apply,
        "Apply a config file to the store: create what is missing, update what changed.",
        [_FILE],
    )
)


# -- the root ----------------------------------------------------------------------------------


@click.group(
    "budget-middleware",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--url",
    envvar="BUDGET_ADMIN_URL",
    metavar="URL",
    help="A running admin API (where it is mounted, e.g. http://localhost:8000/budget-admin); "
    "default: the store of BUDGET_DATABASE_URL, directly. Env: BUDGET_ADMIN_URL.",
)
@click.option(
    "--admin-key",
    envvar="BUDGET_ADMIN_KEY",
    metavar="KEY",
    help="The admin API's bearer token, with --url. Env: BUDGET_ADMIN_KEY.",
)
@click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_json_flag,
    help="Print JSON (also accepted after any command).",
)
@click.version_option(package_name="budget-middleware")
@click.pass_context
def cli(ctx: click.Context, url: str | None, admin_key: str | None) -> None:
    """Manage budget-middleware's customers, teams, virtual keys, limits and usage.

    Works on the store of BUDGET_DATABASE_URL directly (the same BUDGET_* settings as the
    middleware), or on a running admin API with --url and --admin-key.
    """
    state = ctx.ensure_object(State)
    state.url, state.admin_key = url, admin_key
    ctx.call_on_close(state.close)


for _kind in KINDS.values():
    cli.add_command(entity_group(_kind))
cli.add_command(budgets_group)
cli.add_command(usage_command)
cli.add_command(config_group)
cli.add_command(alerts_group)
