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

Durations are passed on as written (`1mo` is read as `1M`); a duration left out is a budget that
never resets. Amounts written as text (`"1e-12"`, which YAML does not read as a number) are read
as numbers, as LiteLLM's pydantic models do. Everything else (other sections and settings,
credentials such as `os.environ/…`, wildcard deployments as routes, a deployment's `rpm`, `tpm`
and `max_parallel_requests`) is not read: `ignored` names it for one warning. Whether a value is
valid is the config file's checks' business, not this module's: it only reshapes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from budget_middleware.core.routing import parse_target

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
    for section, value in data.items():
        if section in native:
            continue
        if section == "router_settings":
            _settings(value, section, "provider_budget_config", _provider_budgets, out)
        elif section == "litellm_settings":
            settings = _mapping(value, section)
            if _proxy_budget(settings, out):
                settings = {k: v for k, v in settings.items() if k not in _PROXY_BUDGET}
            _settings(settings, section, "tag_budget_config", _tag_budgets, out)
        elif section == "model_list":
            _model_list(value, out)
        else:
            out.ignored.append(str(section))
    return out


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


def litellm_period(duration: str | None) -> str | None:
    """A duration as LiteLLM writes it: months as `mo` (`1M` is no unit to LiteLLM's parser)."""
    if duration is not None and duration.endswith("M"):
        return duration[:-1] + "mo"
    return duration


# A deployment's limits LiteLLM enforces and this package does not read (SPEC §12 reads budgets):
# named in the warning, since a file that sets them expects them enforced.
_LIMITS_NOT_READ: Final = ("rpm", "tpm", "max_parallel_requests")


def _model_list(value: Any, out: Translation) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise LiteLLMConfigError("model_list", "must be a list of mappings")
    routes: dict[str, list[str]] = {}
    budgets: dict[tuple[str | None, str], tuple[dict[str, Any], str]] = {}
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
        ignored = [f"{where}.{k}" for k in _LIMITS_NOT_READ if entry.get(k) is not None]
        out.ignored += ignored + [
            f"{where}.litellm_params.{k}" for k in _LIMITS_NOT_READ if params.get(k) is not None
        ]
        where = f"{where} ({name}: {model})"
        if "*" in name or "*" in model:
            wildcards.append(f"{name}: {model}")
        elif model not in routes.setdefault(name, []):
            routes[name].append(model)
        if params.get("max_budget") is not None:
            _model_budget(params, model, where, budgets, out)
    for name, targets in routes.items():
        origin = f"model_list (model_name {name})"
        out.add("routes", {"name": name, "targets": targets}, origin, {})
    if wildcards:
        out.ignored.append(f"model_list wildcard routes ({', '.join(wildcards)})")


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
        if first != budget:
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
