"""Declarative configuration (SPEC §10): `BUDGET_CONFIG_FILE`, YAML or JSON, applied at start-up.

Top-level lists `customers`, `teams`, `virtual_keys`, `providers`, `model_configs`, `tags` and
`routes` (SPEC §12), each
entry a create body of the admin API. A team names its customer (`customer`: name or id), a key its
team or customer (`team` / `customer`); a key's `value` may be `${ENV_VAR}`; a model config scoped
to a key names it by `virtual_key` (name or id). A provider entry has `provider`, a tag entry `tag`.

Each entry's `config_hash` is the sha256 of its canonical JSON (after `${...}` is substituted). An
entity is created when missing, updated when its stored hash differs, and left alone otherwise, so
changes made through the admin API survive restarts until the file's entry changes. An entry
declares all of its entity: what it leaves out is the create body's default (`_declared`). Entities
are found by name (model configs by model, provider and scope), or else, while their entry is
unchanged, by its hash: an entity renamed through the API is still its entry's, and a reference
to the entry's name (a team's `customer`) is to it. An entity deleted through the API stays
deleted while its entry is unchanged (`DeletedRow`). Nothing is ever deleted by the file.

The whole file is checked before anything is applied, as far as it can be without the store (its
shape, every entry's fields, model names, `${...}` variables): the engine does it when it is
created, so such an error fails like an invalid setting. What needs the store (a name that refers
to nothing) fails when the file is applied, at start-up. Either way the error names the file and
the entry, and start-up fails (`ConfigFileError`, a `ConfigurationError`).

A LiteLLM `proxy_config.yaml` (recognised by its sections: `model_list`, `router_settings`,
`litellm_settings`, `general_settings`) is read unchanged for its budgets and routes
(`litellm_config`); its other parts are ignored with one warning, logged when the file is applied.
Sections of our own may sit beside LiteLLM's in such a file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ValidationError
from sqlmodel import Session, select

from budget_middleware.core.identity import (
    CONTROL,
    MAX_PROVIDER_CHARS,
    MAX_TAG_CHARS,
    hash_key,
    name_problem,
)
from budget_middleware.core.pricing import DeploymentPrice
from budget_middleware.core.providers import canonical_provider
from budget_middleware.exceptions import AdminError, ConfigFileError, Conflict, InvalidBody
from budget_middleware.manage.litellm_config import (
    LITELLM_ENV,
    LiteLLMConfigError,
    is_litellm_config,
    sent_through_api,
    translate,
)
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.manage.owner_limits import (
    OnNewTerms,
    Origin,
    check_budget_durations,
    check_model_names,
    config_hash,
    ensure_schema,
)
from budget_middleware.manage.schemas import (
    MAX_CONFIG_CHARS,
    CustomerCreate,
    ModelConfigCreate,
    ProviderConfigIn,
    ProviderPut,
    RouteCreate,
    TagPut,
    TeamCreate,
    VirtualKeyCreate,
    json_float,
    text_problem_in,
    unique_keys,
)
from budget_middleware.settings import BudgetSettings
from budget_middleware.store.database import Store
from budget_middleware.store.tables import (
    CustomerRow,
    DeletedRow,
    ModelConfigRow,
    ProviderRow,
    RouteRow,
    TagRow,
    TeamRow,
    VirtualKeyRow,
)

# Where a config file's deployment prices go (the engine's `PriceBook.add_deployments`).
OnPrices = Callable[[Mapping[str, DeploymentPrice]], None]

SECTIONS = ("customers", "teams", "virtual_keys", "providers", "model_configs", "tags", "routes")
_TABLES: dict[str, Any] = {
    "customers": CustomerRow,
    "teams": TeamRow,
    "virtual_keys": VirtualKeyRow,
    "routes": RouteRow,
}
# The kind an entity's deletion is recorded under (`DeletedRow.kind`, `remember_deleted`).
_KINDS: dict[Any, str] = {
    CustomerRow: "customer",
    TeamRow: "team",
    VirtualKeyRow: "virtual_key",
    RouteRow: "route",
    ModelConfigRow: "model_config",
    ProviderRow: "provider",
    TagRow: "tag",
}
# A key's `file_value_hash` when its entry declares no value (its value generated): a value the
# entry declares later is a change of the file's value, applied (None: a store from before the
# file's values were kept, where a stored value unlike the file's may be the API's rotation).
_NO_VALUE: Final = "-"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
logger = logging.getLogger("budget_middleware")


@dataclass(slots=True)
class _FileData:
    """A config file's sections; for a LiteLLM file, where each translated entry came from
    (parallel to `sections`) and the parts that were not read."""

    path: Path
    sections: dict[str, list[dict[str, Any]]]
    origins: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    # A translated entry's fields as LiteLLM names them (`Translation.fields`), parallel too.
    fields: dict[str, list[Mapping[str, str]]] = field(default_factory=dict)
    # A LiteLLM file's deployment prices (`Translation.prices`).
    prices: dict[str, DeploymentPrice] = field(default_factory=dict)

    def where(self, section: str, index: int, entry: dict[str, Any]) -> str:
        return f"BUDGET_CONFIG_FILE {str(self.path)!r}, {self.label(section, index, entry)}"

    def label(self, section: str, index: int, entry: dict[str, Any]) -> str:
        """The entry, as `where` names it after the file (`virtual_keys[0] (bot)`)."""
        origins = self.origins.get(section, [])
        return origins[index] if index < len(origins) else _entry_label(section, index, entry)

    def field_names(self, section: str, index: int) -> Mapping[str, str]:
        """An entry's fields as the file names them, where it does not use ours (LiteLLM's)."""
        names = self.fields.get(section, [])
        return names[index] if index < len(names) else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's sections, each a list of mappings (a LiteLLM file's translated)."""
    return dict(_read(path).sections)


# What a config file may stand for, past its size (MAX_CONFIG_CHARS): YAML's aliases repeat what
# an anchor holds, so a few hundred bytes of them stand for 10^9 values (billion laughs), or,
# an alias inside its own anchor, for a list without end; every walk over the entries (the
# checks, `config_hash`) went through all of them. Aliases may add this many values to those
# the document writes, or as many as it writes, whichever is more; no entry nests deeper than
# MAX_DEPTH (a real one nests 6 deep; PyYAML and json recurse, and ran out of stack).
MAX_ALIAS_VALUES: Final = 100_000
MAX_DEPTH: Final = 64
_TOO_DEEP: Final = f"nested too deeply (more than {MAX_DEPTH} levels)"


def _too_big(path: Path, size: str) -> ConfigFileError:
    return ConfigFileError(
        f"BUDGET_CONFIG_FILE {str(path)!r}: {size}, more than the {MAX_CONFIG_CHARS:,} "
        "characters a config file may have"
    )


def config_text(path: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark allowed), or UTF-16 with its mark, as
    Windows editors and PowerShell's `>` write it; anything else is refused by name. At most
    MAX_CONFIG_CHARS characters, as `POST /config/apply` takes."""
    try:
        with path.open("rb") as file:
            raw = file.read(4 * MAX_CONFIG_CHARS + 5)  # 4 bytes a character at most, a mark
    except OSError as exc:
        raise ConfigFileError(f"BUDGET_CONFIG_FILE {str(path)!r}: cannot read: {exc}") from None
    if len(raw) > 4 * MAX_CONFIG_CHARS + 4:
        raise _too_big(path, f"over {len(raw) - 1:,} bytes")
    encoding = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            f"BUDGET_CONFIG_FILE {str(path)!r}: not {encoding.upper().removesuffix('-SIG')} "
            f"text ({exc.reason} at byte {exc.start}): save it as UTF-8"
        ) from None
    if len(text) > MAX_CONFIG_CHARS:
        raise _too_big(path, f"{len(text):,} characters")
    return text


def _yaml_children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _bounded(root: Any) -> None:
    """Refuse a YAML document (its composed nodes, each alias the node of its anchor) that
    refers to itself, nests deeper than MAX_DEPTH, or whose aliases stand for more values than
    MAX_ALIAS_VALUES allows. Each node is visited once, however many aliases name it."""
    import yaml

    size: dict[int, int] = {}  # values a node stands for, its own and all below, aliases repeated
    depth: dict[int, int] = {}
    open_: set[int] = set()  # the nodes being walked: the current one and those above it
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            below = _yaml_children(node)
            size[key] = 1 + sum(size[id(child)] for child in below)
            depth[key] = 1 + max((depth[id(child)] for child in below), default=0)
            open_.discard(key)
            if depth[key] > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(None, None, _TOO_DEEP, node.start_mark)
            continue
        if key in size:
            continue
        open_.add(key)
        stack.append((node, True))
        for child in _yaml_children(node):
            if id(child) in open_:
                raise yaml.constructor.ConstructorError(
                    None, None, "an alias refers to itself (its anchor holds it)", child.start_mark
                )
            if id(child) not in size:
                stack.append((child, False))
    written = len(size)
    stood_for = size[id(root)]
    if stood_for - written > max(MAX_ALIAS_VALUES, written):
        raise yaml.constructor.ConstructorError(
            None, None,
            f"its aliases stand for {stood_for:,} values, from {written:,} written: at most "
            f"{max(MAX_ALIAS_VALUES, written):,} more (an alias repeats all its anchor holds)",
            root.start_mark,
        )  # fmt: skip


def _json_depth_ok(data: Any) -> bool:
    """Whether parsed JSON nests at most MAX_DEPTH deep (not recursive)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if level > MAX_DEPTH:
            return False
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
    return True


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's SafeLoader, refusing a mapping that names a key twice (it keeps the last one
    silently: a second `customers:` section dropped the first). Checked as the mapping is read,
    before merge keys (`<<`) are applied: their keys may still be overridden, as YAML means."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def fetch_flow_collection_start(self, token_class: Any) -> None:
            if self.flow_level >= MAX_DEPTH:  # `[[[[…`: refused as read, before any recursion
                raise yaml.scanner.ScannerError(None, None, _TOO_DEEP, self.get_mark())
            super().fetch_flow_collection_start(token_class)

        def construct_document(self, node: Any) -> Any:
            _bounded(node)  # before anything walks what its aliases stand for
            return super().construct_document(node)

        def compose_mapping_node(self, anchor: Any) -> Any:
            node = super().compose_mapping_node(anchor)
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = (key_node.tag, key_node.value)
                if key[0] == "tag:yaml.org,2002:merge":
                    continue
                if key in seen:
                    raise yaml.composer.ComposerError(
                        "while reading a mapping", node.start_mark,
                        f"the key {key_node.value!r} is given twice", key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
            return node

    # A time is read as JSON reads it, as text for the schema's check (RFC 3339, its offset):
    # PyYAML made `2027-01-01T00:00:00Z` a datetime, whose `config_hash` was not the same
    # entry's in JSON (switching formats applied it again, over the admin API's edits), and let
    # a time without an offset, or a bare date, past the check JSON's text gets.
    UniqueKeyLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # A number with an exponent and no dot (`1e-9`, `5E3`) is a number, as JSON and YAML 1.2
    # read it: YAML 1.1 made it text, and `max_limit: 1e-9` was refused as "not a number".
    UniqueKeyLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
    )
    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _yaml_1_2_int)
    return UniqueKeyLoader


def _yaml_1_2_int(loader: Any, node: Any) -> Any:
    """An integer as YAML 1.2 (and JSON) reads it: YAML 1.1 made `max_limit: 050` octal, a $40
    budget for the $50 written, and `1:30` base 60 (90), a name or a duration nobody wrote.
    A leading zero is decimal; `1:30` is the text it is."""
    import yaml

    text = loader.construct_scalar(node)
    digits = text.replace("_", "")
    if ":" in digits:
        return text
    try:
        if re.fullmatch(r"[-+]?0[0-9]+", digits):
            number = int(digits, 10)
        else:
            number = yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # Python reads at most 4,300 digits (sys.get_int_max_str_digits)
        number = None
    # Nor is one written out again past 4,300 digits (a hexadecimal one of 4,000 digits made
    # ValueError in every message and hash that showed it): no limit needs more than 64 bits.
    if number is None or number.bit_length() > 4096:
        raise yaml.constructor.ConstructorError(
            None, None, "an integer too long to read (thousands of digits)", node.start_mark
        )
    return number


def _unquoted(exc: Exception) -> str:
    """A YAML error with its line and column but without the file's lines PyYAML quotes under
    them: a key's `value` may stand on such a line (SPEC §8: a virtual key never appears in an
    error), and the message reaches the start-up log, `config check` and `POST /config/apply`."""
    for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
        if mark is not None:
            mark.buffer = None  # PyYAML quotes no snippet of a mark without its buffer
    return str(exc)


def _read(path: Path) -> _FileData:
    text = config_text(path)
    if path.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text, object_pairs_hook=unique_keys, parse_float=json_float)
            deep = not _json_depth_ok(data)
        except RecursionError:  # json recurses: deeper than its stack
            deep = True
        except ValueError as exc:
            raise ConfigFileError(
                f"BUDGET_CONFIG_FILE {str(path)!r}: invalid JSON: {exc}"
            ) from None
        if deep:
            raise ConfigFileError(f"BUDGET_CONFIG_FILE {str(path)!r}: {_TOO_DEEP}")
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigFileError(
                f"BUDGET_CONFIG_FILE {str(path)!r} is YAML, which needs pyyaml: "
                "pip install 'budget-middleware[yaml]' (or use a .json file)"
            ) from None
        try:
            data = yaml.load(text, Loader=_unique_key_loader())
        except RecursionError:  # PyYAML composes recursively: deeper than its stack
            raise ConfigFileError(f"BUDGET_CONFIG_FILE {str(path)!r}: {_TOO_DEEP}") from None
        except yaml.YAMLError as exc:
            raise ConfigFileError(
                f"BUDGET_CONFIG_FILE {str(path)!r}: invalid YAML: {_unquoted(exc)}"
            ) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"BUDGET_CONFIG_FILE {str(path)!r}: the top level must be a mapping")
    if is_litellm_config(data):
        return _read_litellm(path, data)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigFileError(
            f"BUDGET_CONFIG_FILE {str(path)!r}: unknown section(s) {', '.join(unknown)}; "
            f"expected {', '.join(SECTIONS)}"
        )
    for section in SECTIONS:
        entries = data.get(section) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigFileError(
                f"BUDGET_CONFIG_FILE {str(path)!r}: {section} must be a list of mappings"
            )
        data[section] = entries
    return _FileData(path, data)


def _read_litellm(path: Path, data: dict[str, Any]) -> _FileData:
    """A LiteLLM file: its budget parts translated; sections of our own beside them come after,
    and an entry of ours replaces the translated one it names (a route's `strategy`, say)."""
    try:
        translation = translate(data, native=SECTIONS)
    except LiteLLMConfigError as exc:
        raise ConfigFileError(f"BUDGET_CONFIG_FILE {str(path)!r}, {exc}") from None
    out = _FileData(path, {}, ignored=translation.ignored, prices=translation.prices)
    for section in SECTIONS:
        entries = data.get(section) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigFileError(
                f"BUDGET_CONFIG_FILE {str(path)!r}: {section} must be a list of mappings"
            )
        ours = {_identity(section, e): i for i, e in enumerate(entries)}
        if section in ("providers", "tags", "model_configs"):
            # A limit LiteLLM's part declares is never dropped unsaid (a route of ours may
            # replace one built from model_list: README): the same owner twice is refused.
            for entry, origin in zip(
                translation.sections.get(section, []),
                translation.origins.get(section, []),
                strict=True,
            ):
                clash = ours.get(_identity(section, entry))
                if clash is not None:
                    raise ConfigFileError(
                        f"BUDGET_CONFIG_FILE {str(path)!r}, "
                        f"{_entry_label(section, clash, entries[clash])}: the same owner as "
                        f"{origin}, whose budget would be dropped: declare its budgets in one "
                        "place"
                    )
        kept = [
            (entry, origin, names)
            for entry, origin, names in zip(
                translation.sections.get(section, []),
                translation.origins.get(section, []),
                translation.fields.get(section, []),
                strict=True,
            )
            if _identity(section, entry) not in ours
        ]
        out.sections[section] = [entry for entry, _, _ in kept] + entries
        out.origins[section] = [origin for _, origin, _ in kept] + [
            _entry_label(section, index, entry) for index, entry in enumerate(entries)
        ]
        out.fields[section] = [names for _, _, names in kept]
    return out


def _identity(section: str, entry: dict[str, Any]) -> str:
    """What the loader finds an entry's entity by."""
    if section == "providers":
        identity: Any = _provider(entry.get("provider"))
    elif section == "tags":
        identity = entry.get("tag")
    elif section == "model_configs":
        scope = entry.get("virtual_key") or entry.get("scope_id")
        identity = [entry.get("model_name"), _provider(entry.get("provider")), scope]
    else:
        identity = entry.get("name")
    return json.dumps(identity, sort_keys=True, default=str)


def _provider(name: Any) -> Any:
    """A provider as the store keeps it (`OpenAI` is `openai`), when the entry names one; ""
    (a model config's any provider) as none, as the store keeps it."""
    if not isinstance(name, str):
        return name
    return canonical_provider(name) if name else None


Unset = dict[str, list[str]]  # a variable not set here: the entries whose value names it


def _expand(
    section: str, raw: dict[str, Any], where: str, unset: Unset | None = None, label: str = ""
) -> dict[str, Any]:
    """An entry as it applies: `${VAR}` read from the environment in a virtual key's `value`
    only (SPEC §10: key values stay out of the file). Every other text is taken as written: a
    variable never ends up in a name, a tag or a model the API shows (`POST /config/apply`
    would otherwise read any of the server's variables, its passwords included, back).
    With `unset`, a variable not set here is recorded there (with `label`, the entry's name in
    `where`) and the entry is without its value (unknown here) instead of an error."""
    if section == "virtual_keys" and isinstance(raw.get("value"), str):
        missing = _missing(raw["value"])
        if unset is not None and missing:
            for name in missing:
                unset.setdefault(name, []).append(label or where)
            return {k: v for k, v in raw.items() if k != "value"}
        return {**raw, "value": _substitute(raw["value"], where)}
    return raw


def _reference(value: str) -> str:
    """`os.environ/NAME` (LiteLLM's way) as `${NAME}`: taken as written, it made the key's value
    that very text, which anyone reading the file could present."""
    found = LITELLM_ENV.fullmatch(value.strip())
    return "${" + found[1] + "}" if found else value


def _missing(value: str) -> list[str]:
    """The variables `value` names that this environment does not set, each once."""
    value = _reference(value)
    return list(dict.fromkeys(m[1] for m in _ENV.finditer(value) if not _set(m[1])))


def _set(name: str) -> bool:
    """Whether a variable is set here; an empty one (`BOT_KEY=` in a compose file) counts as
    unset, as it does for the BUDGET_* settings."""
    return bool(os.environ.get(name, "").strip())


def _substitute(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def env(match: re.Match[str]) -> str:
            name = match[1]
            if not _set(name):
                empty = " (it is empty)" if name in os.environ else ""
                raise ConfigFileError(f"{where}: environment variable {name} is not set{empty}")
            # without blanks around it: set from a secret file, it ends in a line break, and
            # a request presents no key with one (a header's value is read without them)
            return os.environ[name].strip()

        return _ENV.sub(env, _reference(value))
    if isinstance(value, list):
        return [_substitute(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, where) for k, v in value.items()}
    return value


def _entry_label(section: str, index: int, entry: dict[str, Any]) -> str:
    label = entry.get("name") or entry.get("provider") or entry.get("tag")
    label = label or entry.get("model_name") or f"#{index + 1}"
    # The label goes into error lines and logs: a control character (a line break, a terminal
    # escape) of a name the file gives is shown as "?", as a request's text is stored.
    return f"{section}[{index}] ({CONTROL.sub('?', str(label))})"


def _problems(exc: ValidationError, names: Mapping[str, str]) -> str:
    problems = []
    for e in exc.errors(include_input=False, include_url=False):
        loc = ".".join(map(str, e["loc"])) or "entry"
        problems.append(f"{names.get(loc, loc)}: {e['msg']}")
    return "; ".join(problems)


@contextmanager
def _entry_errors(where: str, names: Mapping[str, str]) -> Iterator[None]:
    """An entry's validation or management error, as a ConfigFileError naming the entry and
    its fields as the file does (`names`: ours to its, for a LiteLLM file's)."""
    try:
        yield
    except ValidationError as exc:
        raise ConfigFileError(f"{where}: {_problems(exc, names)}") from None
    except InvalidBody as exc:  # the manager's, when the file is applied: every field, as above
        cause = exc.__cause__
        found = _problems(cause, names) if isinstance(cause, ValidationError) else exc.message
        raise ConfigFileError(f"{where}: {found}") from None
    except AdminError as exc:
        raise ConfigFileError(f"{where}: {exc.message}") from None


_CREATE: dict[str, type[BaseModel]] = {
    "customers": CustomerCreate,
    "teams": TeamCreate,
    "virtual_keys": VirtualKeyCreate,
    "providers": ProviderPut,
    "model_configs": ModelConfigCreate,
    "tags": TagPut,
    "routes": RouteCreate,
}
# The fields that name an entity, or refer to one by its name.
_NAMES = ("name", "provider", "tag", "model_name", "customer", "team", "virtual_key")
_REFERENCES = (("customer", "customer_id"), ("team", "team_id"), ("virtual_key", "scope_id"))
# What a create body's field left out means, where its default would read as "leave it alone"
# in an update: no budgets, no rate limit, no provider configs, not calendar-aligned.
_LEFT_OUT: dict[str, Any] = {
    "budgets": [], "rate_limit": None, "provider_configs": [], "calendar_aligned": False,
}  # fmt: skip
_NOT_DECLARED = ("id", "value", "budget", "scope", "scope_id")  # not the entity's fields


def _declared(model: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """An entry as the whole declaration of its entity (SPEC §10: a create body): every field
    it leaves out at the create body's default, so that an update writes it too. Applied as it
    is, a changed entry was a partial update: what it left out kept what the store held (an
    admin API edit, or an earlier entry's customer, budgets, rate limit or strategy)."""
    left_out = {
        name: _LEFT_OUT[name] if name in _LEFT_OUT else info.get_default(call_default_factory=True)
        for name, info in model.model_fields.items()
        if name not in body and name not in _NOT_DECLARED and not info.is_required()
    }
    return {**left_out, **body}


def _check_entry(section: str, body: dict[str, Any], where: str) -> None:
    """What an entry's create body must be, checked without the store: references by name stand
    in as ids (whether they exist is known only when the file is applied)."""
    found = text_problem_in(body)  # as the admin API refuses it in a body
    if found is not None:
        raise ConfigFileError(f"{where}: {found[0]}: {found[1]}")
    try:  # a lone surrogate (YAML's and JSON's `\ud800`) in a mapping's key
        json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigFileError(
            f"{where}: holds a lone surrogate (an escape from \\ud800 to \\udfff alone), "
            "which is no Unicode text"
        ) from None
    for name in _NAMES:
        value = body.get(name)
        if isinstance(value, bool | int | float):  # a reference became 'False' or '7' unsaid
            raise ConfigFileError(
                f"{where}: {name} is not text but {value!r} (YAML reads no, yes, on and off as "
                f"booleans, 007 as 7): write it in quotes"
            )
        if isinstance(value, list | dict):  # `team: [research]`: start-up raised TypeError
            kind = "list" if isinstance(value, list) else "mapping"
            raise ConfigFileError(f"{where}: {name} is not text but a {kind}: give one name or id")
    if section in ("providers", "tags"):
        field = "provider" if section == "providers" else "tag"
        name = body.pop(field, None)
        if not isinstance(name, str) or not name:
            raise ConfigFileError(f"{where}: needs '{field}', the {field}'s name")
        # As the write checks it (`_put_named`): a name no request carries is refused here,
        # where `config check` and the engine's check before applying see it.
        checked = canonical_provider(name) if section == "providers" else name
        limit = MAX_PROVIDER_CHARS if section == "providers" else MAX_TAG_CHARS
        problem = name_problem(field, checked, limit)
        if problem is not None:
            raise ConfigFileError(f"{where}: {problem}")
    for reference, id_field in _REFERENCES:
        if reference in body and id_field in body:  # one would be dropped unsaid
            raise ConfigFileError(
                f"{where}: give '{reference}' (a name or an id) or '{id_field}', not both"
            )
        if reference in body:
            if reference == "virtual_key" and body.get("scope", "virtual_key") != "virtual_key":
                # A key's model config: `scope: global` beside it was dropped unsaid, and the
                # limit meant for every key held for this one alone (the admin API refuses
                # `scope: global` with a `scope_id`).
                raise ConfigFileError(
                    f"{where}: give 'virtual_key' (the model config of that key) or scope "
                    f"{body['scope']!r}, not both"
                )
            value = body.pop(reference)
            body[id_field] = None if value is None else str(value)
            if reference == "virtual_key":
                body["scope"] = "virtual_key"
    data: Any = _CREATE[section].model_validate(body)
    budgets = data.budget_list() if hasattr(data, "budget_list") else None
    if budgets:
        check_budget_durations(_OWNER[section], budgets)
    if section == "model_configs":
        check_model_names([data.model_name], "model_name")
    elif section == "virtual_keys":
        configs = data.provider_configs or []
        providers = [config.provider for config in configs]
        for i, config in enumerate(configs):
            for field in ("allowed_models", "blocked_models"):
                where_ = f"provider_configs[{i}].{field}"
                check_model_names(getattr(config, field), "provider_configs", where_)
            # As the key's write refuses them (`_write_provider_configs`, `write_budgets`): the
            # file passed `config check` and failed at start-up.
            if providers.count(config.provider) > 1:
                raise Conflict(
                    f"two provider configs for {config.provider!r}", param="provider_configs"
                )
            config_budgets = config.budget_list()
            if config_budgets:
                check_budget_durations("provider_config", config_budgets)


def check_config_file(
    path: Path,
    *,
    unset: Unset | None = None,
    ignored: list[str] | None = None,
    unchecked: list[str] | None = None,
) -> dict[str, Any]:
    """Read `path` and check every entry as far as possible without the store (raises
    ConfigFileError naming the file and the entry); the file's data, `${...}` not substituted.

    A key's `value: ${VAR}` whose VAR this environment does not set is an error, unless
    `unset` is given (the CLI's `config check`, run where the server's variables are not): VAR
    is then recorded in it (with the entries naming it) and that value is left unchecked.
    `ignored`, when given, receives what of a LiteLLM file is not read (applying it warns);
    `unchecked`, the references to what the file does not declare, which only applying the file
    checks, against the store (`teams[0] (research): customer 'acme'`)."""
    data = _check(path, unset)
    if ignored is not None:
        ignored += data.ignored
    if unchecked is not None:
        unchecked += [
            f"{data.label(section, index, raw)}: {_TARGETS[field_][2]} {ref!r}"
            for section, index, raw, field_, ref in _undeclared(data)
        ]
        unchecked += [  # an id names what only the store holds, whatever the file declares
            f"{data.label(section, index, raw)}: {field_} {raw[field_]!r}"
            for section in _ENTRY_TABLES
            for index, raw in enumerate(data.sections[section])
            for _name, field_ in _REFERENCES
            if isinstance(raw.get(field_), str)
        ]
    return dict(data.sections)


def _check(path: Path, unset: Unset | None = None) -> _FileData:
    """The file's data, every entry checked; one ConfigFileError naming every problem found (the
    first as it is, the others after it by their entry), so that one check shows them all."""
    data = _read(path)
    problems: list[str] = []
    for section in SECTIONS:
        seen: dict[Any, str] = {}
        for index, raw in enumerate(data.sections[section]):
            where = data.where(section, index, raw)
            try:
                entry = _expand(section, raw, where, unset, data.label(section, index, raw))
                with _entry_errors(where, data.field_names(section, index)):
                    _check_entry(section, dict(entry), where)
                identity = _identity(section, entry)
            except ConfigFileError as exc:
                problems.append(str(exc))
                continue
            first = seen.setdefault(identity, where)
            if first is not where:
                problems.append(
                    f"{where}: the same {_OWNER[section].replace('_', ' ')} as "
                    f"{first.rsplit(', ', 1)[-1]}: each is written once (the API answers 409)"
                )
    values: dict[str, str] = {}
    for index, raw in enumerate(data.sections["virtual_keys"]):
        value = raw.get("value")
        if isinstance(value, str):
            where = data.where("virtual_keys", index, raw)
            if unset is not None and _missing(value):
                continue  # unknown here: recorded above
            try:
                first = values.setdefault(_substitute(value, where), where)
            except ConfigFileError:
                continue  # said above, with the entry's other problems
            if first is not where:
                problems.append(f"{where}: this key value is also {first.rsplit(', ', 1)[-1]}'s")
    if problems:
        file = f"BUDGET_CONFIG_FILE {str(path)!r}, "
        rest = [problem.removeprefix(file) for problem in problems[1:]]
        more = f" (and {len(rest)} more: {'; '.join(rest)})" if rest else ""
        raise ConfigFileError(problems[0] + more)
    return data


_OWNER = {
    "customers": "customer",
    "teams": "team",
    "virtual_keys": "virtual_key",
    "providers": "provider",
    "model_configs": "model_config",
    "tags": "tag",
    "routes": "route",
}


def _made_by(table: Any, digest: str, value: str | None = None) -> Any:
    """Where a row is the one an entry with this hash made (renamed through the API since), or
    (`value`: a key's) the key the file gave this value, whatever its entry has become."""
    made = (table.source == "config") & (table.config_hash == digest)
    if value is not None:
        made = made | (table.file_value_hash == hash_key(value))
    return made


def _deleted_through_api(s: Session, table: Any, ref: str, entry: Any, digest: str) -> bool:
    """Whether a reference an unchanged entry makes (a team's `customer`, a key's `team`, by
    name or id) names what was deleted through the API and is not in the store: it refers to
    none, as the delete left the entry's entity (start-up stopped, "neither a name nor an id":
    SPEC §10 keeps the API's change while the entry is unchanged). `entry`: the table of the
    entry's entity, which holds the entry's hash `digest` when it is unchanged; a new or
    changed entry naming what is gone is refused, as one naming what never was."""
    if s.exec(select(entry).where(entry.config_hash == digest)).first() is None:
        return False
    kind = _KINDS[table]
    found = select(DeletedRow.id).where(
        DeletedRow.kind == kind, (DeletedRow.entity_id == ref) | (DeletedRow.name == ref)
    )
    return s.exec(found).first() is not None


_ENTRY_TABLES: dict[str, Any] = {
    "teams": TeamRow,
    "virtual_keys": VirtualKeyRow,
    "model_configs": ModelConfigRow,
}


# A reference's field: the section that declares what it names, its table, and its kind in words.
_TARGETS: dict[str, tuple[str, Any, str]] = {
    "customer": ("customers", CustomerRow, "customer"),
    "team": ("teams", TeamRow, "team"),
    "virtual_key": ("virtual_keys", VirtualKeyRow, "virtual key"),
}


def _undeclared(data: _FileData) -> Iterator[tuple[str, int, dict[str, Any], str, str]]:
    """The references of the file's entries (a team's `customer`, a key's `team`, a model
    config's `virtual_key`) to what the file declares by no such name, as (section, index,
    entry, field, reference): only the store can tell whether each names anything."""
    defined = {
        section: {e.get("name") for e in data.sections[section]}
        for section in ("customers", "teams", "virtual_keys")
    }
    for section in _ENTRY_TABLES:
        for index, raw in enumerate(data.sections[section]):
            for field_, (target, _table, _what) in _TARGETS.items():
                ref = raw.get(field_)
                if ref is not None and ref not in defined[target]:
                    yield section, index, raw, field_, str(ref)


def _preflight(store: Store, data: _FileData) -> None:
    """What only the store can tell, checked before anything is written (so an invalid file
    writes nothing): every entry named by a reference exists, in the store or earlier in the
    file, and no key value is another key's."""
    with store.session() as s:
        for section, index, raw, field_, ref in _undeclared(data):
            _target, table, what = _TARGETS[field_]
            where = data.where(section, index, raw)
            expanded = _expand(section, raw, where)
            digest = config_hash({k: v for k, v in expanded.items() if k != "value"})
            if (
                s.get(table, ref) is None
                and s.exec(select(table).where(table.name == ref)).first() is None
                and not _deleted_through_api(s, table, ref, _ENTRY_TABLES[section], digest)
            ):
                raise ConfigFileError(f"{where}: {what} {ref!r} is neither a name nor an id")
        for index, raw in enumerate(data.sections["virtual_keys"]):
            where = data.where("virtual_keys", index, raw)
            entry = _expand("virtual_keys", raw, where)
            value = entry.get("value")
            if isinstance(value, str):
                other = s.exec(
                    select(VirtualKeyRow).where(VirtualKeyRow.key_hash == hash_key(value))
                ).first()
                digest = config_hash({k: v for k, v in entry.items() if k != "value"})
                if (
                    other is not None
                    and other.name != entry.get("name")
                    and not (other.source == "config" and other.config_hash == digest)
                    and other.file_value_hash != hash_key(value)  # the key the file gave it
                ):
                    raise ConfigFileError(f"{where}: this key value is already in use")


class _Loader:
    def __init__(
        self,
        store: Store,
        settings: BudgetSettings,
        data: _FileData,
        on_new_terms: OnNewTerms | None,
        on_owner_change: Callable[[str], None] | None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.data = data
        self.on_new_terms = on_new_terms  # the engine's (`OwnerWriter.on_new_terms`), if any
        self.on_owner_change = on_owner_change  # the engine's (`OwnerWriter.on_owner_change`)
        self.declared: dict[tuple[Any, str], str] = {}  # (table, the entry's name): its id
        self.left_deleted: set[tuple[Any, str]] = set()  # (table, name): entries not made again
        self.seen: set[tuple[Any, str]] = set()  # (table, primary key): the entities declared
        self.made: set[str] = set()  # ids of the entities this file made (`_reattach`)

    def not_declared(self) -> list[str]:
        """The entities a config file made that this file no longer declares (kept: the file
        deletes nothing), each as `customer 'acme'`."""
        found = []
        with self.store.session() as s:
            for table, key in ((CustomerRow, "id"), (TeamRow, "id"), (VirtualKeyRow, "id"),
                               (ProviderRow, "provider"), (ModelConfigRow, "id"),
                               (TagRow, "tag"), (RouteRow, "id")):  # fmt: skip
                for row in s.exec(select(table).where(table.source == "config")).all():
                    if (table, getattr(row, key)) not in self.seen:
                        label = getattr(row, "name", None) or getattr(row, "model_name", None)
                        label = label or getattr(row, key)
                        found.append(f"{_KINDS[table].replace('_', ' ')} {label!r}")
        return found

    def where(self, section: str, index: int, entry: dict[str, Any]) -> str:
        return self.data.where(section, index, entry)

    def _find(
        self, table: Any, ref: str | None, what: str, where: str, entry: Any, digest: str
    ) -> str | None:
        """The id a reference names (`entry`, `digest`: the table of the referring entry's
        entity, and its hash, for `_deleted_through_api`)."""
        if ref is None:
            return None
        with self.store.session() as s:
            if s.get(table, ref) is not None:
                return ref
            if (table, ref) in self.declared:  # an entry of the file, however it is named now
                return self.declared[table, ref]
            if (table, ref) in self.left_deleted:  # deleted through the API: refers to none
                return None
            row = s.exec(select(table).where(table.name == ref)).first()
            if row is None and _deleted_through_api(s, table, ref, entry, digest):
                logger.info(
                    "budget-middleware: %s: %s %r was deleted through the API: refers to none",
                    where,
                    what,
                    ref,
                )
                return None
        if row is None:
            raise ConfigFileError(f"{where}: {what} {ref!r} is neither a name nor an id")
        return str(row.id)

    def _deleted(self, table: Any, name: str, digest: str, where: str) -> bool:
        """Whether the entity of this unchanged entry was deleted through the API: left deleted
        (SPEC §10: an API change stands until the file's entry changes; a key deleted because
        its value leaked is not made again with that value)."""
        if not self._entry_deleted(table, digest):
            return False
        self.left_deleted.add((table, name))
        logger.info(
            "budget-middleware: %s: deleted through the API since the file made it: left "
            "deleted (change the entry to make it again)",
            where,
        )
        return True

    def _entry_deleted(self, table: Any, digest: str) -> bool:
        """Whether what this entry (its hash) made or declared was deleted through the API."""
        with self.store.session() as s:
            query = select(DeletedRow.id).where(
                DeletedRow.kind == _KINDS[table], DeletedRow.config_hash == digest
            )
            return s.exec(query).first() is not None

    def _made_again(self, table: Any, row: Any, digest: str, where: str) -> bool:
        """Whether `row` was made through the API after the entity of this unchanged entry was
        deleted through it (a manual row, no entry's hash): the API's stands (SPEC §10), as the
        delete alone would. The file took it back, its terms over the API's, at the next start."""
        if row is None or row.source != "manual" or row.config_hash is not None:
            return False
        if not self._entry_deleted(table, digest):
            return False
        logger.info(
            "budget-middleware: %s: deleted and made again through the API since the file made "
            "it: left as the API made it (change the entry to apply it)",
            where,
        )
        return True

    def _stored(self, table: Any, where_clause: Any, digest: str, value: Any = None) -> Any:
        """The entity an entry declares: found by `where_clause`, or else the one the entry
        made and the API renamed since (the entry unchanged: its hash; a key: its file value)."""
        with self.store.session() as s:
            row = s.exec(select(table).where(where_clause)).first()
            if row is None:
                value = value if isinstance(value, str) else None
                row = s.exec(select(table).where(_made_by(table, digest, value))).first()
            return row

    def apply(self, section: str, index: int, raw: dict[str, Any]) -> None:
        where = self.where(section, index, raw)
        entry = _expand(section, raw, where)
        value, prefix = entry.get("value"), self.settings.key_prefix
        if section == "virtual_keys" and isinstance(value, str) and not value.startswith(prefix):
            logger.warning(
                "budget-middleware: %s: the key's value does not begin with BUDGET_KEY_PREFIX "
                "%r: only the %s header carries it; sent as `Authorization: Bearer` (an SDK's "
                "api_key) or `x-api-key` it is not read as this key, and the request is served "
                "as one without a key, outside this key's limits",
                where, prefix, self.settings.key_header,
            )  # fmt: skip
        # A key's value is no part of its hash: the hash is shown in answers, and would check a
        # guess of the value offline (a changed value is told by the key's own hash below).
        digest = config_hash({k: v for k, v in entry.items() if k != "value"})
        body = dict(entry)
        manager = BudgetManager(
            self.store,
            self.settings,
            Origin("config", digest),
            on_new_terms=self.on_new_terms,
            on_owner_change=self.on_owner_change,
        )
        with _entry_errors(where, self.data.field_names(section, index)):
            self._apply(section, body, digest, manager, where)

    def _apply(
        self, section: str, body: dict[str, Any], digest: str, m: BudgetManager, where: str
    ) -> None:
        create: Callable[..., Any]
        update: Callable[..., Any]
        table: Any
        if section in ("providers", "tags"):
            field = "provider" if section == "providers" else "tag"
            name = body.pop(field, None)
            if not isinstance(name, str) or not name:
                raise ConfigFileError(f"{where}: needs '{field}', the {field}'s name")
            table = ProviderRow if section == "providers" else TagRow
            if table is ProviderRow:
                name = canonical_provider(name)  # found as it is stored: by its one name
            row = self._stored(table, getattr(table, field) == name, digest)
            self.seen.add((table, name))
            if row is not None:
                self.seen.add((table, getattr(row, field)))
            if row is None and self._deleted(table, name, digest, where):
                return
            if self._made_again(table, row, digest, where):
                return
            if row is None or row.config_hash != digest:
                put = m.put_provider if section == "providers" else m.put_tag
                put(name, _declared(_CREATE[section], body))
            return
        if section == "model_configs":
            self._apply_model_config(body, digest, m, where)
            return
        table = _TABLES[section]
        name = body.get("name")
        if not isinstance(name, str):
            raise ConfigFileError(f"{where}: needs a 'name'")
        row = self._stored(table, table.name == name, digest, body.get("value"))
        if row is None and self._deleted(table, name, digest, where):
            return
        if self._made_again(table, row, digest, where):
            return
        if section == "customers":
            table, create, update = CustomerRow, m.create_customer, m.update_customer
        elif section == "teams":
            table, create, update = TeamRow, m.create_team, m.update_team
            if "customer" in body:
                body["customer_id"] = self._find(CustomerRow, body.pop("customer"), "customer",
                                                 where, TeamRow, digest)  # fmt: skip
        elif section == "virtual_keys":
            table, create, update = VirtualKeyRow, m.create_virtual_key, m.update_virtual_key
            configs = body.get("provider_configs")
            if isinstance(configs, list):
                body["provider_configs"] = [
                    _declared(ProviderConfigIn, c) if isinstance(c, dict) else c for c in configs
                ]
            if "team" in body:
                body["team_id"] = self._find(TeamRow, body.pop("team"), "team", where,
                                             VirtualKeyRow, digest)  # fmt: skip
            if "customer" in body:
                body["customer_id"] = self._find(CustomerRow, body.pop("customer"), "customer",
                                                 where, VirtualKeyRow, digest)  # fmt: skip
        else:
            table, create, update = RouteRow, m.create_route, m.update_route
        body = _declared(_CREATE[section], body)
        if row is None:
            made = create(body)
            self.declared[table, name] = made.id
            self.seen.add((table, made.id))
            self.made.add(made.id)
            if section == "virtual_keys":
                value = body.get("value")
                self._gave_value(made.id, _NO_VALUE if value is None else hash_key(value))
                if value is None:  # generated, and shown to nobody: no request can present it
                    logger.warning(
                        "budget-middleware: %s: the entry declares no value: the key was made "
                        "with a generated one that is shown to nobody; give it one with "
                        "`budget-middleware keys rotate %s` (printed once; the file keeps it) "
                        "or a `value:` in the file",
                        where, shlex.quote(name),
                    )  # fmt: skip
            return
        self.declared[table, name] = row.id
        self.seen.add((table, row.id))
        if section == "virtual_keys":
            value = body.pop("value", None)
            if value is not None:
                self._declare_value(row, value, m, where)
            elif row.file_value_hash != _NO_VALUE:
                self._gave_value(row.id, _NO_VALUE)
        if row.config_hash != digest:
            update(row.id, body)
        elif section in ("teams", "virtual_keys"):
            self._reattach(row, body, update)

    def _reattach(self, row: Any, body: dict[str, Any], update: Callable[..., Any]) -> None:
        """An unchanged entry of an entity left with no parent (its team or customer deleted
        through the API), whose parent this file has just made again (its entry changed): in
        it again, as the entry says. It stayed with none, out of the made-again parent's limits.
        One the API moved to another parent since stays there."""
        if getattr(row, "team_id", None) is not None or row.customer_id is not None:
            return
        for parent_field in ("team_id", "customer_id"):
            parent = body.get(parent_field)
            if parent is not None and parent in self.made:
                update(row.id, {parent_field: parent})
                return

    def _declare_value(self, row: VirtualKeyRow, value: str, m: BudgetManager, where: str) -> None:
        """A key's value as the file declares it, applied when the file's value changed since it
        last applied one, as any edit of an entry is (SPEC §10): a value rotated through the API
        meanwhile stands (the old one may have leaked) until the file's value changes."""
        declared = hash_key(value)
        if row.file_value_hash == declared:
            return  # the file's value as last applied
        if row.key_hash != declared:
            if row.file_value_hash is None:  # a store from before the file's values were kept
                logger.warning(
                    "budget-middleware: %s: the key's stored value is not the file's (rotated "
                    "through the API?): kept; change the file's value to apply it",
                    where,
                )
            else:
                m.set_virtual_key_value(row.id, value)
        self._gave_value(row.id, declared)

    def _gave_value(self, key_id: str, declared: str) -> None:
        with self.store.session() as s:
            row = s.get(VirtualKeyRow, key_id)
            if row is not None:
                row.file_value_hash = declared
                s.add(row)
                s.commit()

    def _apply_model_config(
        self, body: dict[str, Any], digest: str, m: BudgetManager, where: str
    ) -> None:
        if "virtual_key" in body:
            body["scope"] = "virtual_key"
            body["scope_id"] = self._find(VirtualKeyRow, body.pop("virtual_key"), "virtual key",
                                          where, ModelConfigRow, digest)  # fmt: skip
            if body["scope_id"] is None:  # its key deleted through the API: no key to scope
                return
        body = _declared(ModelConfigCreate, body)
        provider = _provider(body.get("provider"))
        row = self._stored(
            ModelConfigRow,
            (ModelConfigRow.model_name == body.get("model_name"))
            & (ModelConfigRow.provider == provider)
            & (ModelConfigRow.scope == body.get("scope", "global"))
            & (ModelConfigRow.scope_id == body.get("scope_id")),
            digest,
        )
        if row is None and self._deleted(ModelConfigRow, "", digest, where):
            return
        if row is None:
            self.seen.add((ModelConfigRow, m.create_model_config(body).id))
            return
        self.seen.add((ModelConfigRow, row.id))
        if row.config_hash != digest:
            for fixed in ("scope", "scope_id"):
                body.pop(fixed, None)
            m.update_model_config(row.id, body)


SENT: Final = "(the config sent)"  # the text sent to the admin API, as its answers name it


class _Shown(logging.Filter):
    """A record naming the temporary file a config sent to the API was written to, naming it
    as `(the config sent)` instead: that file is gone, and nobody wrote it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.path in message:
            record.msg, record.args = message.replace(self.path, SENT), None
        return True


class _Told(logging.Filter):
    """The warnings an apply logs in its thread (another thread's are not its), kept for its
    caller to tell: the sender of a config to the admin API saw none of them, in the server's
    log alone. Kept without the log's `budget-middleware: ` tag; `logged`: also logged."""

    def __init__(self, into: list[str], logged: bool) -> None:
        super().__init__()
        self.into, self.logged, self.thread = into, logged, threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() != self.thread or record.levelno < logging.WARNING:
            return True
        self.into.append(record.getMessage().removeprefix("budget-middleware: "))
        return self.logged


@contextmanager
def _telling(into: list[str] | None, logged: bool) -> Iterator[None]:
    """The warnings logged meanwhile in this thread, in `into` (when given)."""
    if into is None:
        yield
        return
    told = _Told(into, logged)
    logger.addFilter(told)  # after `_Shown`, when it is there: the text as the log shows it
    try:
        yield
    finally:
        logger.removeFilter(told)


def apply_config_text(
    store: Store,
    settings: BudgetSettings,
    text: str,
    suffix: str,
    on_new_terms: OnNewTerms | None = None,
    on_owner_change: Callable[[str], None] | None = None,
    on_prices: OnPrices | None = None,
    ignored: list[str] | None = None,
    warnings: list[str] | None = None,
) -> dict[str, int]:
    """A config file's text applied to the store, as start-up applies BUDGET_CONFIG_FILE (the
    admin API's `POST /config/apply`, the CLI's `config apply --url`); its entries by section.
    An invalid text raises `ConfigFileError` naming the entry, before anything is written.
    `ignored`, when given, receives what of a LiteLLM file is not read (which the server's log
    says: the sender is told it too); `warnings`, the apply's other warnings, as the server's
    log says them (the file named `(the config sent)`)."""
    with tempfile.TemporaryDirectory(prefix="budget-config-") as folder:
        path = Path(folder) / f"config.{suffix}"
        path.write_text(text, encoding="utf-8")
        shown = _Shown(repr(str(path)))  # its warnings, as its errors, without the file's name
        logger.addFilter(shown)
        try:
            with sent_through_api():  # the server's environment is not the sender's to read
                data = _check(path)
                with_file = settings.model_copy(update={"config_file": path})
                load_config_file(
                    store, with_file, on_new_terms, on_owner_change, on_prices,
                    warnings=warnings, logged=True,
                )  # fmt: skip
            if data.prices and on_prices is not None:
                with _telling(warnings, logged=True):
                    _prices_not_kept(path, data.prices, here=True)
            if ignored is not None:
                ignored += data.ignored
        except ConfigFileError as exc:
            raise ConfigFileError(str(exc).replace(repr(str(path)), SENT)) from None
        finally:
            logger.removeFilter(shown)
    return {section: len(data.sections[section]) for section in SECTIONS if data.sections[section]}


def _prices_not_kept(path: Path, prices: Mapping[str, DeploymentPrice], here: bool) -> None:
    """The warning of a file applied (not read at start-up) that prices deployments: no store
    keeps prices, and a route to a deployment no process prices is charged $0."""
    logger.warning(
        "BUDGET_CONFIG_FILE %r prices deployments (%s: LiteLLM's base_model or custom prices), "
        "which are not kept in the store: %sa process meters them at these prices only when its "
        "BUDGET_CONFIG_FILE names this file (or its BUDGET_PRICING_FILE prices them); elsewhere "
        "they cost what the price catalog says (an Azure deployment's own name: nothing)",
        str(path), ", ".join(sorted(prices)),
        "this process does until it restarts; " if here else "",
    )  # fmt: skip


def load_config_file(
    store: Store,
    settings: BudgetSettings,
    on_new_terms: OnNewTerms | None = None,
    on_owner_change: Callable[[str], None] | None = None,
    on_prices: OnPrices | None = None,
    *,
    tell_ignored: bool = True,
    warnings: list[str] | None = None,
    logged: bool = False,
) -> None:
    """Apply `settings.config_file` to the store (a start-up hook of the engine; blocking).
    `tell_ignored`: log what of a LiteLLM file is not read (the CLI says it itself).
    `on_new_terms`: the engine's live counters, told of windows new terms moved;
    `on_owner_change`: the engine, told of the keys and owners written (`BudgetEngine.forget`:
    it vouches no more for those keys as it last read them, under BUDGET_FAIL_OPEN);
    `on_prices`: the engine's prices, given the deployments a LiteLLM file prices, which the
    store does not keep (without it, a warning names them: applied, not priced);
    `warnings`: the apply's warnings (but what of a LiteLLM file is not read) go there, for the
    caller to tell (the CLI prints them), and are not logged unless `logged`."""
    if settings.config_file is None:
        return
    path = Path(settings.config_file)
    data = _check(path)
    if data.ignored and tell_ignored:
        logger.warning(
            "BUDGET_CONFIG_FILE %r is a LiteLLM config: only its budgets, routes and prices "
            "are read; ignored: %s", str(path), ", ".join(data.ignored),
        )  # fmt: skip
    with _telling(warnings, logged):
        _load(store, settings, path, data, on_new_terms, on_owner_change, on_prices)


def _load(
    store: Store,
    settings: BudgetSettings,
    path: Path,
    data: _FileData,
    on_new_terms: OnNewTerms | None,
    on_owner_change: Callable[[str], None] | None,
    on_prices: OnPrices | None,
) -> None:
    _preflight(store, data)
    ensure_schema(store)
    with store.one_transaction() as joined:  # whole, or nothing written: SPEC §3
        loader = _Loader(joined, settings, data, on_new_terms, on_owner_change)
        for section in SECTIONS:
            for index, entry in enumerate(data.sections[section]):
                loader.apply(section, index, entry)
        gone = loader.not_declared()
    if data.prices:
        if on_prices is not None:
            on_prices(data.prices)
        else:
            _prices_not_kept(path, data.prices, here=False)
    if gone:
        logger.warning(
            "BUDGET_CONFIG_FILE %r no longer declares %s: kept, still in force (the file deletes "
            "nothing; delete them through the admin API or the CLI). The file finds entities by "
            "name: an entry renamed in the file declared a new one, without the old one's "
            "spend; to keep it, rename through the admin API first, then in the file",
            str(path), ", ".join(gone),
        )  # fmt: skip
