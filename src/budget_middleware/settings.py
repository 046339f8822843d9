"""Settings: one typed class read from `BUDGET_*` environment variables (SPEC §3)."""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from budget_middleware.core.alerts import check_threshold
from budget_middleware.core.providers import canonical_provider
from budget_middleware.exceptions import SettingsError

DEFAULT_INFERENCE_PATHS = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
)

ENV_PREFIX = "BUDGET_"

DEFAULT_ALERT_THRESHOLDS = (0.8, 1.0)
"""SPEC §3's BUDGET_ALERT_THRESHOLDS: also what an empty or blank value means (unset)."""

logger = logging.getLogger("budget_middleware")


def raised_again(error: Exception) -> Exception:
    """A copy of `error` to raise once more (the same object raised on every request would grow
    its traceback without end); a RuntimeError with its message if it cannot be copied."""
    try:
        fresh = copy.copy(error)
    except Exception:
        fresh = RuntimeError(str(error))
    return fresh.with_traceback(None)


UNUSABLE_BEARER = (
    "must be printable ASCII without spaces: a bearer token in a header could never match it"
)


def bearer_token_usable(value: str) -> bool:
    """Whether `value` can travel as `Authorization: Bearer <value>` and be read back as it is:
    the rule of BUDGET_ADMIN_KEY, and of the key a client (the CLI, the dashboard) sends."""
    return value.isascii() and value.isprintable() and " " not in value


def shown_url(url: str) -> str:
    """A URL as a log line or a message may show it: scheme, host and port, `/…` for a path.
    A webhook's path is often its credential (Slack's, Discord's incoming webhooks), and a
    URL's user part may hold a password."""
    try:
        parsed = httpx.URL(url)
        host, port, path = parsed.host, parsed.port, parsed.raw_path
    except Exception:
        return "<a URL that cannot be read>"
    where = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{where}{f':{port}' if port else ''}{'/…' if path != b'/' else ''}"


def without_password(url: str) -> str:
    """A store's or Redis' URL with its password hidden (as SQLAlchemy shows an engine's), in
    its user part or its query (`?password=`, which libpq and redis-py read too)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        secret = {k: "***" for k in parsed.query if k.lower() in _QUERY_SECRETS}
        shown = parsed.update_query_dict(secret).render_as_string(hide_password=True)
        return shown.replace("=%2A%2A%2A", "=***")  # (the query's value is URL-encoded)
    except Exception:
        return shown_url(url)


# Query parameters that carry a password (libpq's `?password=`, redis-py's `?password=`).
_QUERY_SECRETS = frozenset({"password", "passwd", "pwd", "pass", "sslpassword", "sslkey_password"})


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NOT_INSTALLED = "needs the {} package, which is not installed: pip install 'budget-middleware[{}]'"
_HOST_PORT = re.compile(r"[^:]*:[0-9]*")  # `host:8443` (an IPv6 address has more colons)
# A webhook URL's host as httpx sends it (IDNA-encoded): DNS labels, or an IPv6 address. A host
# holding a blank or `%` (a typo: `http://hooks example.com/x`) can never be reached.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_URL_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
_BAD_PORT = "has a port that is not a number from 1 to 65535"


def _list_text(value: Any, what: str) -> Any:
    """A list setting as the environment holds it: a JSON list (what pydantic-settings reads
    for list settings) or comma-separated parts; any other value as it is."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            found = json.loads(value)
        except ValueError:
            raise ValueError(f"is neither a JSON list nor comma-separated {what}") from None
        if not isinstance(found, list):
            raise ValueError(f"is neither a JSON list nor comma-separated {what}")
        return found
    return [part.strip() for part in value.split(",") if part.strip()]


# Headers HTTP sends with every (JSON) request: never a virtual key's carrier.
_PROTOCOL_HEADERS = frozenset(
    {"host", "content-type", "content-length", "transfer-encoding", "connection", "te"}
)


class BudgetSettings(BaseSettings):
    """Every `BUDGET_*` variable of the spec; field names are the variable names, lowercased."""

    # An empty variable (`BUDGET_REDIS_URL=` in a compose file) means "not set". Extra values
    # are ignored here, not forbidden: a `.env` file (`_env_file=`) is the app's too, and its
    # other variables (OPENAI_API_KEY) were refused as "BUDGET_OPENAI_API_KEY". An argument that
    # is no setting is refused by `__init__`.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        validate_default=True,
        env_ignore_empty=True,
    )

    database_url: str = "sqlite:///./budget_middleware.db"
    redis_url: str | None = None
    key_prefix: str = "sk-bm-"  # before admin_key: its check reads it
    admin_key: str | None = None
    require_virtual_key: bool = False
    key_header: str = "x-budget-key"
    inference_paths: Annotated[tuple[str, ...], NoDecode] = DEFAULT_INFERENCE_PATHS
    exceeded_status: Literal[402, 429] = 402
    reserve: bool = True
    fail_open: bool = False
    pricing_file: Path | None = None
    config_file: Path | None = None
    # Durations have upper bounds, as the Redis timeout has: 1e10 s was taken (the flusher's
    # first round in 317 years: charges reached the store only at shutdown; a crashed
    # instance's slots held as long), and 1e300 put a slot's expiry past Redis' integers:
    # every admission a 503.
    cache_ttl_seconds: float = Field(default=5.0, gt=0, le=86400, allow_inf_nan=False)
    # Lower bounds too: a flush every nanosecond spun an idle process at half a core, and
    # slots that expire within milliseconds, before a heartbeat can refresh them, let two
    # instances hold 2 streams on a limit of 1 in flight (a fault hunt's).
    flush_interval_seconds: float = Field(default=1.0, ge=0.01, le=3600, allow_inf_nan=False)
    max_body_bytes: int = Field(default=33_554_432, ge=1)
    # Beyond SPEC §3 (documented in the README): tuning knobs with safe defaults.
    default_max_output_tokens: int = Field(default=1024, ge=0)
    slot_ttl_seconds: float = Field(default=30.0, ge=1, le=86400, allow_inf_nan=False)
    unpriced_models: Literal["allow", "refuse"] = "allow"
    # At most an hour: past some 1e9 s every Redis call fails (time_t overflows), so for ever 503.
    redis_timeout_seconds: float = Field(default=2.0, gt=0, le=3600, allow_inf_nan=False)
    # SPEC §13: host (or `*` pattern) -> provider, over the built-in table; a JSON object.
    provider_hosts: Annotated[tuple[tuple[str, str], ...], NoDecode] = ()
    # SPEC §14: shadow mode and alerts.
    mode: Literal["enforce", "shadow"] = "enforce"
    alert_webhook_urls: Annotated[tuple[str, ...], NoDecode] = ()
    alert_secret: str | None = None
    alert_thresholds: Annotated[tuple[float, ...], NoDecode] = DEFAULT_ALERT_THRESHOLDS
    # Where charges the store cannot take wait on disk (None: `store.spill.default_spill_root`).
    spill_dir: Path | None = None

    def __init__(self, **values: Any) -> None:
        unknown = [name for name in values if name not in type(self).model_fields]
        unknown = [name for name in unknown if not name.startswith("_")]  # `_env_file=`...
        if unknown:
            raise SettingsError(
                "invalid budget-middleware settings:\n  "
                + "\n  ".join(_not_a_setting(name) for name in unknown)
            )
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None
        _warn_misspelt(os.environ)

    # The environment holds strings: every validator below takes the string form of a value as
    # well as the Python one, so that what is valid as an argument is valid as a variable too.

    @field_validator("inference_paths", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        value = _list_text(value, "paths")
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("needs at least one path suffix")
            for part in value:
                if not isinstance(part, str) or not part.startswith("/"):
                    raise ValueError(f"path suffix {part!r} must start with '/'")
                if not part.strip("/"):
                    raise ValueError(f"path suffix {part!r} names no path")
                if "?" in part or "#" in part:  # a request's path never holds them
                    raise ValueError(
                        f"path suffix {part!r} holds a query string or fragment, which no "
                        "request's path does: it would meter nothing"
                    )
            # Paths are told with slashes after them or not (`is_inference_path`): so are these.
            return tuple(part.rstrip("/") for part in value)
        return value

    @field_validator("provider_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                from budget_middleware.manage.schemas import TwiceGiven, unique_keys

                value = json.loads(value, object_pairs_hook=unique_keys) if value.strip() else {}
            except TwiceGiven as exc:  # the last would silently win
                raise ValueError(str(exc)) from None
            except ValueError:
                raise ValueError(
                    'is not a JSON object like {"llm.example.com": "openai"}'
                ) from None
        if isinstance(value, dict):
            value = tuple(value.items())
        if isinstance(value, list | tuple):
            for pair in value:
                if not (
                    isinstance(pair, list | tuple)
                    and len(pair) == 2
                    and all(isinstance(part, str) and part.strip() for part in pair)
                ):
                    raise ValueError(f"maps a host to a provider, both non-empty text: {pair!r}")
                host = pair[0].strip()
                if "/" in host or host[:1] == "[" or _HOST_PORT.fullmatch(host):  # compared bare
                    raise ValueError(
                        f"{host!r} is not a host: write the host alone, without scheme, path, "
                        "port or brackets (llm.example.com, 10.0.0.5, ::1)"
                    )
            # The provider by its one name (`X-AI` is `xai`), as a request's is.
            pairs = tuple(
                (host.strip().lower().rstrip("."), canonical_provider(provider))
                for host, provider in value
            )
            # A host is compared lowercased and bare: `LLM.example.com`, `llm.example.com.` and
            # `llm.example.com` are one, whose last provider would silently win.
            seen: set[str] = set()
            for host, _ in pairs:
                if host in seen:
                    raise ValueError(
                        f"the host {host!r} is given twice (hosts are compared lowercased, "
                        "without a trailing dot)"
                    )
                seen.add(host)
            return pairs
        return value

    @field_validator("alert_webhook_urls", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        value = _list_text(value, "URLs")
        if isinstance(value, list | tuple):
            for n, url in enumerate(value, 1):
                # A scheme in any case (RFC 3986 §3.1): `HTTPS://…` is as valid as `https://…`.
                if not isinstance(url, str) or not url[:8].lower().startswith(
                    ("http://", "https://")
                ):
                    raise ValueError(f"URL {n} is not an http:// or https:// URL")
                try:
                    parsed = httpx.URL(url)
                except Exception:
                    raise ValueError(f"URL {n} is not a valid URL") from None
                if not parsed.host:
                    raise ValueError(f"URL {n} names no host")
                if not _URL_HOST.fullmatch(parsed.raw_host.decode("ascii", "replace")):
                    raise ValueError(f"URL {n} has an invalid host {parsed.host!r}")
                if parsed.port is not None and not 0 < parsed.port < 65536:
                    raise ValueError(f"URL {n} has port {parsed.port}, outside 1-65535")
            return tuple(value)
        return value

    @field_validator("alert_thresholds", mode="before")
    @classmethod
    def _thresholds(cls, value: Any) -> Any:
        """Empty or blank text is unset, as any empty variable is: the default 0.8,1.0 (a blank
        one, a secret's line break, turned every threshold alert off). No threshold alerts is
        said as `[]`; text that names no fraction (`,`) is refused."""
        if isinstance(value, str) and not value.strip():
            return DEFAULT_ALERT_THRESHOLDS
        if (
            isinstance(value, str)
            and not value.lstrip().startswith("[")
            and not any(part.strip() for part in value.split(","))
        ):
            raise ValueError(
                "names no fraction: leave it unset for the default 0.8,1.0, or write [] for no "
                "threshold alerts"
            )
        value = _list_text(value, "fractions like 0.8,1.0")
        if isinstance(value, list | tuple):
            try:
                value = [float(v) if isinstance(v, str) else v for v in value]
            except ValueError:
                raise ValueError("must be comma-separated fractions like 0.8,1.0") from None
            return tuple(sorted(set(check_threshold(v) for v in value)))
        return value

    @field_validator("exceeded_status", mode="before")
    @classmethod
    def _status_number(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())  # a Literal of ints takes no string: "429" from the env
        if isinstance(value, bool | float):  # as "429.0" in the environment is: a status is whole
            raise ValueError("Input should be 402 or 429, a whole number")
        return value

    @field_validator(
        "max_body_bytes",
        "default_max_output_tokens",
        "cache_ttl_seconds",
        "flush_interval_seconds",
        "slot_ttl_seconds",
        "redis_timeout_seconds",
        mode="before",
    )
    @classmethod
    def _no_boolean(cls, value: Any) -> Any:
        """pydantic takes `True` for 1: a body limit of 1 byte, a timeout of 1 s."""
        if isinstance(value, bool):
            raise ValueError(f"must be a number, not the boolean {value}")
        return value

    @field_validator("unpriced_models", "mode", mode="before")
    @classmethod
    def _choice(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "admin_key",
        "redis_url",
        "pricing_file",
        "config_file",
        "alert_secret",
        "spill_dir",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url", "redis_url", "spill_dir", mode="before")
    @classmethod
    def _url_unpadded(cls, value: Any) -> Any:
        """A URL (or the spill folder) never ends with a blank; a variable set from a file or a
        secret often ends with a line break, which SQLite took as part of its file's name."""
        return value.strip() if isinstance(value, str) else value

    @field_validator("admin_key")
    @classmethod
    def _usable_admin_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An admin key no request could present is refused here, not met as a 401 later."""
        if value is None:
            return None
        if not bearer_token_usable(value):
            raise ValueError(UNUSABLE_BEARER)
        prefix = info.data.get("key_prefix")
        if prefix and value.startswith(prefix):
            raise ValueError(
                f"must not begin with BUDGET_KEY_PREFIX ({prefix!r}): a bearer token that does "
                "is read as a virtual key, never as the admin key"
            )
        return value

    @field_validator("alert_secret")
    @classmethod
    def _unpadded_secret(cls, value: str | None) -> str | None:
        """A secret read from a file often ends with a line break: alerts were signed with it,
        and a receiver checking with the secret as the operator knows it refused every one."""
        if value is not None and value != value.strip():
            raise ValueError(
                "must not begin or end with a blank (a line break from a secret's file?): the "
                "alerts would be signed with it"
            )
        return value

    @field_validator("key_header")
    @classmethod
    def _lower_header(cls, value: str) -> str:
        if _HEADER_NAME.fullmatch(value) is None:  # RFC 9110's token: what a client can send
            raise ValueError(f"{value!r} is not a valid header name")
        if value.lower() == "authorization":
            raise ValueError(
                "authorization already carries virtual keys, as 'Bearer <BUDGET_KEY_PREFIX>…' "
                "(named here, its whole value, 'Bearer …', would be read as the key): name "
                "another header, or leave the default x-budget-key"
            )
        if value.lower() in _PROTOCOL_HEADERS:
            raise ValueError(
                f"{value.lower()} is sent with every request by HTTP itself: its value would be "
                "read as a virtual key (every request 401): name another header, or leave the "
                "default x-budget-key"
            )
        return value.lower()

    @field_validator("key_prefix")
    @classmethod
    def _prefix_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty: host credentials would count as virtual keys")
        if not bearer_token_usable(value):  # every key begins with it
            raise ValueError(UNUSABLE_BEARER)
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        for plain in ("postgresql://", "postgres://"):  # the driver we ship: psycopg 3
            if value.startswith(plain):
                value = "postgresql+psycopg://" + value[len(plain) :]
        if not value.startswith(("sqlite:", "sqlite+pysqlite:", "postgresql+psycopg:")):
            raise ValueError(
                "must be a sqlite:/// (or sqlite+pysqlite:///) or postgresql:// (or postgres://, "
                "postgresql+psycopg://) URL: the store writes through Python's sqlite3 or psycopg 3"
            )
        # Read as the store will read it, so that a URL no driver can read is this setting's
        # error at start-up, not an outage answered 503 on every request.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            port = make_url(value).port
        except ArgumentError:
            raise ValueError("is not a valid SQLAlchemy URL") from None
        except ValueError:  # int() of what follows the host's colon
            raise ValueError(_BAD_PORT) from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(_BAD_PORT)
        if value.startswith("postgresql+psycopg:") and find_spec("psycopg") is None:
            raise ValueError(_NOT_INSTALLED.format("psycopg", "postgres"))
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        parts = urlsplit(value)
        if parts.scheme != "unix":
            try:
                port = parts.port
            except ValueError:
                raise ValueError(_BAD_PORT) from None
            if port == 0:
                raise ValueError(_BAD_PORT)
            # redis-py reads a database number from the path, and a path that is none as
            # database 0, without a word.
            if not unquote(parts.path).replace("/", "").isdigit() and parts.path.strip("/"):
                raise ValueError("names no database number after the host: redis://host:6379/0")
        try:
            from redis.connection import parse_url
        except ImportError:
            raise ValueError(_NOT_INSTALLED.format("redis", "redis")) from None
        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:  # "Invalid value for 'db' in connection URL.": no password
            raise ValueError(str(exc)) from None
        return value

    @field_validator("pricing_file", "config_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and value.is_dir():  # a volume mounted at the file's own path
            raise ValueError(f"{str(value)!r} is a folder, not a file")
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("spill_dir")
    @classmethod
    def _spill_dir_not_a_file(cls, value: Path | None) -> Path | None:
        """A folder made when first needed may not exist yet; a file there, or where a folder
        above it goes, never holds one (`os.path`'s tests: a path it may not look into is no
        error here)."""
        if value is None:
            return None
        for path in (value, *value.parents):
            if os.path.exists(path):
                if not os.path.isdir(path):
                    raise ValueError(f"{str(path)!r} is a file, not a folder")
                break
        return value

    def __repr_args__(self) -> Any:
        """`repr()` and `str()` without a secret (a traceback's locals, a logged object): the
        keys masked, the URLs as `shown_url` has them."""
        for name, value in super().__repr_args__():
            if value is None:
                yield name, value
            elif name in ("admin_key", "alert_secret"):
                yield name, "********"
            elif name in ("database_url", "redis_url"):
                yield name, without_password(value)
            elif name == "alert_webhook_urls":
                yield name, tuple(shown_url(url) for url in value)
            else:
                yield name, value

    def cache_key(self) -> str:
        """Equal settings give equal keys; the engine registry shares one engine per key."""
        return self.model_dump_json()


def _env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


_warned: set[str] = set()
_UNITS = ("_URL", "_URLS", "_SECONDS", "_FILE", "_BYTES", "_DIR")  # what a setting's name ends in


def _not_a_setting(argument: str) -> str:
    """The error of a keyword argument that is no setting, with the setting it looks like."""
    text = f"{_env_name(argument)}: is not a setting (the argument {argument}="
    close = difflib.get_close_matches(argument, list(BudgetSettings.model_fields), n=1, cutoff=0.8)
    return text + (f"; did you mean {close[0]}=?)" if close else ")")


def misspelt_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Variables of the environment that look like a setting's name misspelt (`BUDGET_RESERV`),
    each with that name. The environment is shared with other programs, so a `BUDGET_*` name
    that is no setting is left alone, not refused; one this close to a setting's is a typo that
    would silently leave the setting at its default."""
    names = [_env_name(field) for field in BudgetSettings.model_fields]
    # A name without its unit (`BUDGET_REDIS`, `BUDGET_CACHE_TTL`) is too short for the ratio,
    # and as sure a slip: `BUDGET_REDIS=redis://…` left every instance counting on its own.
    shortened = {name.rpartition("_")[0]: name for name in names if name.endswith(_UNITS)}
    found = []
    for variable in environ:
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names:
            continue
        close = difflib.get_close_matches(upper, names, n=1, cutoff=0.9)
        if close:
            found.append((variable, close[0]))
        elif upper in shortened:
            found.append((variable, shortened[upper]))
    return found


def _warn_misspelt(environ: Mapping[str, str]) -> None:
    for variable, setting in misspelt_variables(environ):
        if variable not in _warned:  # once a process: settings are read by every engine
            _warned.add(variable)
            logger.warning(
                "%s is not a budget-middleware setting and is ignored: did you mean %s?",
                variable,
                setting,
            )


# Never shown in an error: a secret, or a URL that may hold a password (a webhook's, its path).
_SECRET = frozenset(
    {"admin_key", "alert_secret", "database_url", "redis_url", "alert_webhook_urls"}
)


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        got = error.get("input")
        shown = "" if isinstance(got, dict) or field in _SECRET else f" (got {got!r})"
        lines.append(f"{_env_name(field)}: {error['msg']}{shown}")
    return "invalid budget-middleware settings:\n  " + "\n  ".join(lines)
