"""Who is calling, for which provider and model, with which tags (SPEC §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .settings import BudgetSettings

# Path prefixes that name a provider (`/openai/v1/chat/completions`).
KNOWN_PROVIDERS = frozenset(
    {
        "openai",
        "anthropic",
        "azure",
        "gemini",
        "google",
        "vertex",
        "bedrock",
        "mistral",
        "groq",
        "cohere",
        "deepseek",
        "xai",
        "openrouter",
        "together",
        "fireworks",
        "perplexity",
        "ollama",
    }
)

OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass(slots=True)
class Credentials:
    """What the headers say: a virtual key (if any), a provider, tags, the body's size."""

    key: str | None = None
    provider: str | None = None
    tags: tuple[str, ...] = ()
    content_length: int | None = None


def header_reader(
    settings: BudgetSettings,
) -> Callable[[Iterable[tuple[bytes, bytes]]], Credentials]:
    """Build, once, the function that reads the headers of a metered request in one pass."""
    key_header = settings.key_header.encode()
    prefix = settings.key_prefix
    bearer = b"bearer "

    def read(headers: Iterable[tuple[bytes, bytes]]) -> Credentials:
        explicit = authorization = api_key = goog = provider = None
        tags: tuple[str, ...] = ()
        length = None
        for name, value in headers:
            if name == key_header:
                explicit = value
            elif name == b"authorization":
                if value[:7].lower() == bearer:
                    authorization = value[7:].strip()
            elif name == b"x-api-key":
                api_key = value
            elif name == b"x-goog-api-key":
                goog = value
            elif name == b"x-budget-provider":
                provider = value.decode("latin-1").strip() or None
            elif name == b"x-budget-tags":
                tags = _split_tags(value.decode("latin-1"))
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        key = None
        if explicit:
            key = explicit.decode("latin-1").strip()
        else:
            for candidate in (authorization, api_key, goog):
                if candidate:
                    text = candidate.decode("latin-1").strip()
                    if text.startswith(prefix):
                        key = text
                        break
        return Credentials(key or None, provider, tags, length)

    return read


def _split_tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in (part.strip() for part in text.split(",")) if t)


@dataclass(slots=True)
class Target:
    """Provider, model and tags of a metered request."""

    provider: str
    model: str
    tags: tuple[str, ...]
    stream: bool
    max_output_tokens: int | None


def resolve_target(
    body: Any,
    route_path: str,
    credentials: Credentials,
    key_tags: tuple[str, ...],
    guess_provider: Callable[[str], str | None],
) -> Target:
    """Provider and model from the body's `model`, the header, the path, or the catalog."""
    data = body if isinstance(body, dict) else {}
    raw_model = data.get("model")
    model = raw_model.strip() if isinstance(raw_model, str) else ""
    provider: str | None = None
    if "/" in model:
        head, rest = model.split("/", 1)
        if head and rest:
            provider, model = head, rest
    provider = provider or credentials.provider or _path_provider(route_path)
    if provider is None and model:
        provider = guess_provider(model)
    if provider is None and route_path.endswith("/messages"):
        provider = "anthropic"
    tags = credentials.tags + key_tags + _body_tags(data)
    if len(tags) > 1:
        tags = tuple(sorted(set(tags)))
    limit = None
    for name in OUTPUT_LIMIT_FIELDS:
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            limit = value
            break
    return Target(
        provider=provider or "unknown",
        model=model or "unknown",
        tags=tags,
        stream=data.get("stream") is True,
        max_output_tokens=limit,
    )


def _path_provider(route_path: str) -> str | None:
    first = route_path.lstrip("/").split("/", 1)[0]
    return first if first in KNOWN_PROVIDERS else None


def _body_tags(data: dict[str, Any]) -> tuple[str, ...]:
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        return ()
    tags = metadata.get("tags")
    if not isinstance(tags, list):
        return ()
    return tuple(t.strip() for t in tags if isinstance(t, str) and t.strip())


def route_path(scope: MutableMapping[str, Any]) -> str:
    """The path below the mount point (`root_path`), as the app's routes see it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
