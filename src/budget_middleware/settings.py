"""Settings: one typed class read from `BUDGET_*` environment variables (SPEC §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_INFERENCE_PATHS = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
)

ENV_PREFIX = "BUDGET_"


class SettingsError(ValueError):
    """Invalid settings; the message names each offending environment variable."""


class BudgetSettings(BaseSettings):
    """Every `BUDGET_*` variable of the spec; field names are the variable names, lowercased."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    database_url: str = "sqlite:///./budget_middleware.db"
    redis_url: str | None = None
    admin_key: str | None = None
    require_virtual_key: bool = False
    key_header: str = "x-budget-key"
    key_prefix: str = "sk-bm-"
    inference_paths: Annotated[tuple[str, ...], NoDecode] = DEFAULT_INFERENCE_PATHS
    exceeded_status: Literal[402, 429] = 402
    reserve: bool = True
    fail_open: bool = False
    pricing_file: Path | None = None
    config_file: Path | None = None
    cache_ttl_seconds: float = Field(default=5.0, gt=0)
    flush_interval_seconds: float = Field(default=1.0, gt=0)
    max_body_bytes: int = Field(default=33_554_432, ge=1)
    # Beyond SPEC §3 (documented in the README): tuning knobs with safe defaults.
    default_max_output_tokens: int = Field(default=1024, ge=0)
    slot_ttl_seconds: float = Field(default=30.0, gt=0)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @field_validator("inference_paths", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("needs at least one path suffix")
            for part in value:
                if not isinstance(part, str) or not part.startswith("/"):
                    raise ValueError(f"path suffix {part!r} must start with '/'")
            return tuple(value)
        return value

    @field_validator("key_header")
    @classmethod
    def _lower_header(cls, value: str) -> str:
        if not value or any(c.isspace() or c == ":" for c in value):
            raise ValueError(f"{value!r} is not a valid header name")
        return value.lower()

    @field_validator("key_prefix")
    @classmethod
    def _prefix_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty: host credentials would count as virtual keys")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        for plain in ("postgresql://", "postgres://"):  # the driver we ship: psycopg 3
            if value.startswith(plain):
                return "postgresql+psycopg://" + value[len(plain) :]
        if not value.startswith(("sqlite:", "postgresql+psycopg:")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value or None

    @field_validator("pricing_file", "config_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    def cache_key(self) -> str:
        """Equal settings give equal keys; the engine registry shares one engine per key."""
        return self.model_dump_json()


def _env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{_env_name(field)}: {error['msg']}{shown}")
    return "invalid budget-middleware settings:\n  " + "\n  ".join(lines)
