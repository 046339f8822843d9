"""LiteLLM's `proxy_config.yaml`, read for its budgets (SPEC §12 "LiteLLM configuration").

A pure translation: a LiteLLM file's data in, the config file's own sections out (SPEC §10), each
entry a create body that `config_file` then checks and applies like any other.

LiteLLM                                              ours
router_settings.provider_budget_config.<p>           providers: {provider: p, budgets: [...]}
  .budget_limit / .time_period                         max_limit / reset_duration
litellm_settings.tag_budget_config.<t>               tags: {tag: t, budgets: [...]}
  .max_budget / .budget_duration                       max_limit / reset_duration
litellm_settings.max_budget (> 0; the proxy's)        model_configs: {model_name: "*",
  / .budget_duration                                   budgets: [...]} (global, any provider)
model_list[i].litellm_params.model  "azure/dep"      model_configs: {provider: azure,
  .max_budget / .budget_duration                       model_name: dep, budgets: [...]} (global)
model_list entries sharing model_name n              routes: {name: n, targets: [their
                                                       litellm_params.model, in file order]}
  (.custom_llm_provider p: the model is `p/model`)
model_list[i].model_info.id d                        routes: {name: d, targets: [its model]}
router_settings.model_group_alias.<a>: n             routes: {name: a, targets: n's targets}
model_list[i].model_info.base_model "azure/gpt-4o"   `prices` (not a section: the engine's
  (or litellm_params.base_model)                       PriceBook): azure/dep at azure/gpt-4o's
  .input_cost_per_token, .output_cost_per_token, …     over the base's price (litellm_params
                                                       or model_info; `*` matches any text)

Durations are passed on as written (`1mo` is read as `1M`); a duration left out is a budget that
never resets. Amounts written as text (`"1e-12"`, which YAML does not read as a number) are read
as numbers, as LiteLLM's pydantic models do. Everything else (other sections and settings,
credentials such as `os.environ/…` (read for a deployment's `model` alone, as LiteLLM reads it, and
never in a file sent through the admin API: `sent_through_api`),
a `model_name` no request can name or of more than 16 models as a route, wildcard deployments as
routes, a deployment's `rpm`, `tpm`
and `max_parallel_requests`, cost keys other than the token prices above) is not read:
`ignored` names what could change money or limits for one warning. Whether a value is
valid is the config file's checks' business, not this module's: it only reshapes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from budget_middleware.core.durations import Duration
from budget_middleware.core.pricing import DeploymentPrice, ModelPrice, price_key
from budget_middleware.core.routing import MAX_TARGETS, parse_target, route_name_problem

LITELLM_SECTIONS: Final = ("model_list", "router_settings", "litellm_settings", "general_settings")
"""Top-level sections that make a config file a LiteLLM one."""


class LiteLLMConfigError(ValueError):
    """Budget parts of a LiteLLM file in a shape that cannot be read; `where` names the part."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# Our fields as LiteLLM's entries name them, for an error to name what the file says.
_BUDGET_FIELDS: Final = {
    "provider_budget_config": {
        "budgets.0.max_limit": "budget_limit",
        "budgets.0.reset_duration": "time_period",
    },
    "tag_budget_config": {
        "budgets.0.max_limit": "max_budget",
        "budgets.0.reset_duration": "budget_duration",
    },
    "litellm_settings": {
        "budgets.0.max_limit": "max_budget",
        "budgets.0.reset_duration": "budget_duration",
    },
    "litellm_params": {
        "budgets.0.max_limit": "litellm_params.max_budget",
        "budgets.0.reset_duration": "litellm_params.budget_duration",
    },
}


@dataclass(slots=True)
class Translation:
    """The config file's sections, where each entry came from (`origins`, parallel to
    `sections`) and what its fields are called there (`fields`: ours, dotted as a validation
    error names them, to LiteLLM's), and what was not read (`ignored`, in file order)."""

    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    origins: dict[str, list[str]] = field(default_factory=dict)
    fields: dict[str, list[Mapping[str, str]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    # How deployments are priced, by `provider/model` lowercased (the engine's PriceBook).
    prices: dict[str, DeploymentPrice] = field(default_factory=dict)

    def add(
        self, section: str, entry: dict[str, Any], origin: str, fields: Mapping[str, str]
    ) -> None:
        self.sections.setdefault(section, []).append(entry)
        self.origins.setdefault(section, []).append(origin)
        self.fields.setdefault(section, []).append(fields)


def is_litellm_config(data: Mapping[str, Any]) -> bool:
    """Whether a config file's top level is LiteLLM's (it has one of LiteLLM's sections)."""
    return any(section in data for section in LITELLM_SECTIONS)


def translate(data: Mapping[str, Any], native: Collection[str] = ()) -> Translation:
    """The budget parts of a LiteLLM config as config-file sections. Top-level keys in `native`
    are left to the caller (neither read nor ignored)."""
    out = Translation()
    aliases: Any = None
    for section, value in data.items():
        if section in native:
            continue
        if section == "router_settings":
            settings = _mapping(value, section)
            aliases = settings.get("model_group_alias")
            settings = {k: v for k, v in settings.items() if k != "model_group_alias"}
            _settings(settings, section, "provider_budget_config", _provider_budgets, out)
        elif section == "litellm_settings":
            settings = _mapping(value, section)
            if _proxy_budget(settings, out):
                settings = {k: v for k, v in settings.items() if k not in _PROXY_BUDGET}
            _settings(settings, section, "tag_budget_config", _tag_budgets, out)
        elif section == "model_list":
            _model_list(value, out)
        else:
            out.ignored.append(str(section))
            if section == "general_settings" and isinstance(value, Mapping):
                # Named key by key where a key reads as a limit (never a value: the master
                # key and the database's password are here): "general_settings" alone hid them.
                out.ignored += [
                    f"{section}.{k}" for k in value if isinstance(k, str) and _is_limit_key(k)
                ]
    if aliases is not None:
        _aliases(aliases, out)
    return out


def _aliases(value: Any, out: Translation) -> None:
    """`router_settings.model_group_alias`: a request for the alias goes to the group it names
    (`{"gpt-4": "gpt-4o"}`, or `{"gpt-4": {"model": "gpt-4o", "hidden": true}}`; `hidden` only
    keeps it out of LiteLLM's model list): a route of the group's targets, under the alias."""
    where = "router_settings.model_group_alias"
    routes = {
        entry["name"]: entry["targets"] for entry in out.sections.get("routes", [])
    }  # the groups of model_list
    for alias, named in _mapping(value, where).items():
        here = f"{where}.{alias}"
        group = named.get("model") if isinstance(named, Mapping) else named
        if not isinstance(group, str) or not group:
            out.ignored.append(f"{here} (names no model_name: not routed)")
            continue
        if str(alias) in routes:
            # LiteLLM finds a model group before an alias of that name: the alias is never used.
            out.ignored.append(f"{here} (a model_name of its own)")
            continue
        if group not in routes or route_name_problem(str(alias)) is not None:
            # A group a wildcard deployment serves, or LiteLLM keeps in its database (LiteLLM
            # starts with either): not routed here, named in the warning.
            out.ignored.append(f"{here} (alias of {group!r}, no model_list group here: not routed)")
            continue
        origin = f"{here} (alias of {group})"
        out.add("routes", {"name": str(alias), "targets": list(routes[group])}, origin, {})


_LIMIT_WORDS: Final = ("budget", "parallel", "rpm", "tpm", "limit", "max_", "spend", "cost")


def _is_limit_key(key: str) -> bool:
    """A setting's name that reads as a limit or a price (`max_parallel_requests`, …)."""
    return any(word in key.lower() for word in _LIMIT_WORDS)


def _settings(value: Any, section: str, read: str, reader: Any, out: Translation) -> None:
    settings = _mapping(value, section)
    for key, setting in settings.items():
        if key == read:
            reader(setting, f"{section}.{read}", out)
        else:
            out.ignored.append(f"{section}.{key}")


def _provider_budgets(value: Any, where: str, out: Translation) -> None:
    for provider, config in _mapping(value, where).items():
        origin = f"{where}.{provider}"
        budget = _budget(config, origin, "budget_limit", "time_period")
        entry = {"provider": str(provider), "budgets": [budget]}
        out.add("providers", entry, origin, _BUDGET_FIELDS["provider_budget_config"])


# LiteLLM's budget of the whole proxy: every request's spend counts against it.
_PROXY_BUDGET: Final = ("max_budget", "budget_duration")


def _proxy_budget(settings: Mapping[str, Any], out: Translation) -> bool:
    """`litellm_settings.max_budget` / `budget_duration` as a global model config of every
    model of every provider; LiteLLM enforces it only when above 0 (0, its default, is none).
    Whether it was read."""
    amount = _number(settings.get("max_budget"))
    if amount is None or (isinstance(amount, int | float) and amount == 0):
        return False
    budget = {"max_limit": amount, "reset_duration": _period(settings.get("budget_duration"))}
    origin = "litellm_settings (max_budget, the proxy's budget)"
    out.add(
        "model_configs",
        {"model_name": "*", "budgets": [budget]},
        origin,
        _BUDGET_FIELDS["litellm_settings"],
    )
    return True


def _tag_budgets(value: Any, where: str, out: Translation) -> None:
    for tag, config in _mapping(value, where).items():
        origin = f"{where}.{tag}"
        budget = _budget(config, origin, "max_budget", "budget_duration")
        read = "tag_budget_config"
        out.add("tags", {"tag": str(tag), "budgets": [budget]}, origin, _BUDGET_FIELDS[read])


def _budget(config: Any, where: str, amount: str, duration: str) -> dict[str, Any]:
    fields = _mapping(config, where)
    unknown = sorted(str(k) for k in set(fields) - {amount, duration})
    if unknown:
        raise LiteLLMConfigError(
            where, f"unknown field(s) {', '.join(unknown)}; expected {amount}, {duration}"
        )
    if fields.get(amount) is None:
        raise LiteLLMConfigError(where, f"needs '{amount}' (USD)")
    return {"max_limit": _number(fields[amount]), "reset_duration": _period(fields.get(duration))}


# LiteLLM's words for its periods, as its own parser reads them.
_PERIOD_WORDS = {"daily": "1d", "weekly": "1w", "monthly": "1mo"}


def _period(value: Any) -> Any:
    """A LiteLLM period: its words (`daily`, `weekly`, `monthly`) as durations; else as given."""
    if isinstance(value, str):
        return _PERIOD_WORDS.get(value.strip().lower(), value)
    return value


_MONTHS_OF = {"M": 1, "Q": 3, "Y": 12}


def litellm_period(duration: str | None) -> str | None:
    """A duration as LiteLLM writes it: months, quarters and years as months (`1M` → `1mo`,
    `1Q` → `3mo`, `1Y` → `12mo`): LiteLLM's parser knows `s`, `m`, `h`, `d`, `w`, `mo`."""
    count, unit = (duration[:-1], duration[-1:]) if duration is not None else ("", "")
    if unit in _MONTHS_OF and count.isascii() and count.isdigit():
        return f"{int(count) * _MONTHS_OF[unit]}mo"
    return duration


# A value LiteLLM reads from the environment: the whole value `os.environ/NAME` (a key's value, a
# deployment's model).
LITELLM_ENV: Final = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")

# Whether the file being read was sent through the admin API (`POST /config/apply`), where the
# server's environment is not the sender's to read: `sent_through_api()` while it is read.
_SENT: ContextVar[bool] = ContextVar("budget_middleware_litellm_sent", default=False)


@contextmanager
def sent_through_api() -> Iterator[None]:
    """While a LiteLLM file sent through the admin API is read: a deployment's `model` written
    `os.environ/NAME` is refused, not read from this server's environment (its value, an API key
    or a database URL with its password, would be shown back as a route's target, a model
    config's name or an error's text)."""
    token = _SENT.set(True)
    try:
        yield
    finally:
        _SENT.reset(token)


# A deployment's limits LiteLLM enforces and this package does not read (SPEC §12 reads budgets):
# named in the warning, since a file that sets them expects them enforced; and how LiteLLM
# picks within a group (`order`, lowest first; `weight`), where a route takes file order.
_LIMITS_NOT_READ: Final = ("rpm", "tpm", "max_parallel_requests", "order", "weight")


def _model_list(value: Any, out: Translation) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise LiteLLMConfigError("model_list", "must be a list of mappings")
    routes: dict[str, list[str]] = {}
    budgets: dict[tuple[str | None, str], tuple[dict[str, Any], str]] = {}
    priced: dict[str, str] = {}  # a priced deployment's key: where it was first priced
    ids: dict[str, tuple[str, str]] = {}  # model_info.id: (its model, where)
    wildcards: list[str] = []
    for index, raw in enumerate(value):
        where = f"model_list[{index}]"
        entry = _mapping(raw, where)
        name = entry.get("model_name")
        params = _mapping(entry.get("litellm_params"), f"{where}.litellm_params")
        model = params.get("model")
        if not isinstance(name, str) or not name:
            raise LiteLLMConfigError(where, "needs 'model_name', the name requests use")
        if not isinstance(model, str) or not model:
            raise LiteLLMConfigError(where, "needs 'litellm_params.model', like 'openai/gpt-4o'")
        secret = LITELLM_ENV.fullmatch(model.strip())
        if secret is not None and _SENT.get():
            raise LiteLLMConfigError(
                f"{where}.litellm_params.model",
                f"{secret[0].strip()} is read from the environment only in a process's own "
                "BUDGET_CONFIG_FILE, never in a config sent through the admin API (the "
                "variable's value would be shown back); write the model itself",
            )
        if secret is not None:  # LiteLLM reads it from the environment, as every param
            model = os.environ.get(secret[1], "").strip()
            if not model:
                out.ignored.append(f"{where}.litellm_params.model ({secret[0].strip()}: not set "
                                   "here; not routed, its budget and prices not read)")  # fmt: skip
                continue
        model = _with_provider(model, params.get("custom_llm_provider"), where)
        ignored = [f"{where}.{k}" for k in _LIMITS_NOT_READ if entry.get(k) is not None]
        out.ignored += ignored + [
            f"{where}.litellm_params.{k}" for k in _LIMITS_NOT_READ if params.get(k) is not None
        ]
        where = f"{where} ({name}: {model})"
        if "*" in name or "*" in model:
            wildcards.append(f"{name}: {model}")
        else:
            # (a target named twice, or spelt with another name of its provider, `azure_ai/`
            # as `azure/`: the group's deployments of one model, one target)
            target = parse_target(model)
            if (target.provider, target.model) not in {
                (t.provider, t.model) for t in map(parse_target, routes.setdefault(name, []))
            }:
                routes[name].append(model)
        if params.get("max_budget") is not None:
            _model_budget(params, model, where, budgets, out)
        info = entry.get("model_info")
        if not isinstance(info, Mapping):
            if info is not None:
                out.ignored.append(f"model_list[{index}].model_info (not a mapping)")
            info = {}
        ident = info.get("id")
        if ident is not None and str(ident):
            ident = str(ident)
            if ident in ids or route_name_problem(ident) is not None:
                # two deployments of one id, or an id no request can name as a model: the
                # deployment stays, its id is not routed (LiteLLM starts with either)
                out.ignored.append(f"{where}.model_info.id ({ident!r}: not routed)")
                ids[ident] = ("", where)  # neither this one nor the first is routed
            else:
                ids[ident] = (model, where)
        out.ignored += [
            f"model_list[{index}].{part}.{k}"
            for part, keys in (("litellm_params", params), ("model_info", info))
            for k in keys
            if isinstance(k, str) and _is_price_key(k) and k not in _PRICE_KEYS
        ]
        _deployment_price(params, info, model, where, priced, out)
    for name, targets in routes.items():
        origin = f"model_list (model_name {name})"
        # A group no request can name as a model here, or of more models than a route takes
        # (LiteLLM starts with either): not routed, named in the warning; its budgets and
        # prices are read all the same.
        problem = route_name_problem(name)
        if problem is None and len(targets) > MAX_TARGETS:
            problem = f"{len(targets)} models, more than a route's {MAX_TARGETS}"
        if problem is not None:
            out.ignored.append(f"{origin} ({problem}: not routed)")
            continue
        out.add("routes", {"name": name, "targets": targets}, origin, {})
    # A request naming a deployment's id is served by that one deployment (LiteLLM finds a
    # model group of that name first, and a wildcard deployment has no one model to name).
    for ident, (model, where) in ids.items():
        if ident in routes or not model or "*" in model:
            continue
        out.add("routes", {"name": ident, "targets": [model]}, f"{where}.model_info.id", {})
    if wildcards:
        out.ignored.append(f"model_list wildcard routes ({', '.join(wildcards)})")


def _with_provider(model: str, provider: Any, where: str) -> str:
    """The deployment's model as `provider/model`: `litellm_params.custom_llm_provider` names
    its provider when `model` does not (`llama-3-70b` of `hosted_vllm`; LiteLLM sends `model`
    whole to that provider, a `/` in it included); the provider's budgets and prices apply."""
    if provider is None:
        return model
    if not isinstance(provider, str) or not provider.strip() or "/" in provider:
        raise LiteLLMConfigError(where, "litellm_params.custom_llm_provider must be a provider")
    provider = provider.strip()
    return model if model.startswith(f"{provider}/") else f"{provider}/{model}"


def _model_budget(
    params: Mapping[str, Any],
    model: str,
    where: str,
    seen: dict[tuple[str | None, str], tuple[dict[str, Any], str]],
    out: Translation,
) -> None:
    target = parse_target(model)
    budget = {"max_limit": _number(params["max_budget"]),
              "reset_duration": _period(params.get("budget_duration"))}  # fmt: skip
    key = (target.provider, target.model)
    if key in seen:
        # One model config per provider and model: LiteLLM's per-deployment budgets of one model
        # can be kept only when they say the same.
        first, first_where = seen[key]
        if _meaning(first) != _meaning(budget):
            raise LiteLLMConfigError(
                where,
                f"a different budget for {model} than {first_where}: budget_middleware "
                "keeps one budget per provider and model; give them the same max_budget and "
                "budget_duration",
            )
        return
    seen[key] = (budget, where)
    entry: dict[str, Any] = {"model_name": target.model, "budgets": [budget]}
    if target.provider is not None:
        entry["provider"] = target.provider
    out.add("model_configs", entry, where, _BUDGET_FIELDS["litellm_params"])


# LiteLLM's custom prices (USD a token) a deployment may set, in `litellm_params` or
# `model_info`, as ModelPrice's fields (USD a million tokens).
_PRICE_KEYS: Final = {
    "input_cost_per_token": "input_per_mtok",
    "output_cost_per_token": "output_per_mtok",
    "cache_read_input_token_cost": "cached_input_per_mtok",
    "cache_creation_input_token_cost": "cache_write_per_mtok",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h_per_mtok",
    "input_cost_per_audio_token": "input_audio_per_mtok",
    "output_cost_per_audio_token": "output_audio_per_mtok",
    "input_cost_per_image_token": "input_image_per_mtok",
    "output_cost_per_image_token": "output_image_per_mtok",
}


def _is_price_key(key: str) -> bool:
    """A key of LiteLLM's that sets what a deployment costs (`input_cost_per_second`,
    `tiered_pricing`, …): one not read is named in the warning, never dropped unsaid."""
    return "cost" in key or "pric" in key


def _one_value(
    params: Mapping[str, Any],
    info: Mapping[str, Any],
    key: str,
    where: str,
    same: Callable[[Any], Any] = lambda value: _number(value),
) -> Any:
    """`key` as `litellm_params` or `model_info` sets it; the two setting it differently (as
    `same` reads them) is an error (which one LiteLLM would use is not something to guess
    about money)."""
    values = [v for v in (params.get(key), info.get(key)) if v is not None]
    if len(values) == 2 and same(values[0]) != same(values[1]):
        raise LiteLLMConfigError(
            where,
            f"litellm_params.{key} and model_info.{key} differ ({values[0]!r}, {values[1]!r})",
        )
    return values[0] if values else None


def _deployment_price(
    params: Mapping[str, Any],
    info: Mapping[str, Any],
    model: str,
    where: str,
    seen: dict[str, str],
    out: Translation,
) -> None:
    """A deployment's price as LiteLLM reckons it: `model_info.base_model` (or
    `litellm_params.base_model`) names the model whose price it pays (an Azure deployment's
    own name is in no price list: it was unpriced, $0), and its custom prices
    (`input_cost_per_token`, …) replace those. A bare base model is taken under the
    deployment's provider (`gpt-4o` of `azure/my-deployment` is `azure/gpt-4o`)."""
    rates: list[tuple[str, float]] = []
    for key, ours in _PRICE_KEYS.items():
        value = _number(_one_value(params, info, key, where))
        if value is None:
            continue
        wrong = LiteLLMConfigError(where, f"{key} must be a price in USD a token, not {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise wrong
        per_mtok = float(Decimal(str(value)) * 1_000_000)
        try:
            # YAML's `.nan`, `.inf` or a price past what a rate holds: refused here, naming the
            # entry, not raised by every request the deployment prices (a 500 each)
            ModelPrice(per_mtok, 0.0)
        except ValueError:
            raise wrong from None
        rates.append((ours, per_mtok))
    deployment = parse_target(model)

    def as_model(base: Any) -> Any:  # a bare base model is the deployment's provider's
        if not isinstance(base, str) or not base.strip():
            return base
        named = parse_target(base.strip())
        return (named.provider or deployment.provider, named.model)

    base = _one_value(params, info, "base_model", where, as_model)
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise LiteLLMConfigError(where, "model_info.base_model must be a model like 'azure/gpt-4o'")
    named = deployment if base is None else parse_target(base.strip())
    price = DeploymentPrice((named.provider or deployment.provider, named.model), tuple(rates))
    # None: priced as itself (its list price), as it would be anyway
    mine = None if not rates and price.base == (deployment.provider, deployment.model) else price
    key = price_key(deployment.provider, deployment.model)
    if key in seen:
        if out.prices.get(key) != mine:
            # One model served by two backends (two `api_base`s, two regions) priced apart:
            # a request names the model, not the backend; the first deployment's price is
            # kept (it loaded before prices were read: no file stops starting for it).
            out.ignored.append(f"{where} (another price or base_model than {seen[key]}'s)")
        return
    seen[key] = where
    if mine is not None:
        out.prices[key] = mine


def _meaning(budget: Mapping[str, Any]) -> tuple[Any, Any]:
    """What a budget says, however it is spelt (`24h` is `1d`); a value that is not valid stays
    as written, for the checks to name."""
    amount, duration = budget["max_limit"], budget["reset_duration"]
    if isinstance(duration, str):
        try:
            parsed = Duration.parse(duration)
        except ValueError:
            pass
        else:
            duration = (parsed.unit in "MQY", parsed.approx_seconds)
    return amount, duration


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LiteLLMConfigError(where, "must be a mapping")
    return value


def _number(value: Any) -> Any:
    """A number written as text (`"1e-12"`: YAML 1.1 needs a dot to read a float) as a number;
    anything else as it is, for the checks to judge."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value
