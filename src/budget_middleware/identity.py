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
    """Build, once, the function that reads the headers of a metered request in one pass: one
    dict lookup per header (a client SDK sends a dozen, most of them of no interest here)."""
    prefix = settings.key_prefix
    # header name -> its slot; the key header set last, so it takes its name's slot if it has one
    wanted = {
        b"authorization": 1,
        b"x-api-key": 2,
        b"x-goog-api-key": 3,
        b"x-budget-provider": 4,
        b"x-budget-tags": 5,
        b"content-length": 6,
    }
    wanted[settings.key_header.encode()] = 0

    def read(headers: Iterable[tuple[bytes, bytes]]) -> Credentials:
        found: list[bytes | None] = [None] * 7
        get = wanted.get
        for name, value in headers:
            slot = get(name)
            if slot is not None:
                found[slot] = value
        explicit, authorization, api_key, goog, provider, tags, length = found
        key = None
        if explicit:
            key = explicit.decode("latin-1").strip() or None
        else:
            if authorization is not None:
                authorization = (
                    authorization[7:].strip() if authorization[:7].lower() == b"bearer " else None
                )
            for candidate in (authorization, api_key, goog):
                if candidate:
                    text = candidate.decode("latin-1").strip()
                    if text.startswith(prefix):
                        key = text
                        break
        size = None
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = None
        return Credentials(
            key or None,
            (provider.decode("latin-1").strip() or None) if provider is not None else None,
            _split_tags(tags.decode("latin-1")) if tags is not None else (),
            size,
        )

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
    data = body if type(body) is dict else {}
    raw_model = data.get("model")
    model = raw_model.strip() if type(raw_model) is str else ""
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
    tags = credentials.tags
    if key_tags:
        tags += key_tags
    if "metadata" in data:
        tags += _body_tags(data)
    if len(tags) > 1:
        tags = tuple(sorted(set(tags)))
    limit = None
    for name in OUTPUT_LIMIT_FIELDS:
        value = data.get(name)
        if value is not None and type(value) is int and value >= 0:
            limit = value
            break
    return Target(
        provider or "unknown",
        model or "unknown",
        tags,
        data.get("stream") is True,
        limit,
    )


_path_providers: dict[str, str | None] = {}


def _path_provider(route_path: str) -> str | None:
    found = _path_providers.get(route_path, _NOT_SEEN)
    if found is _NOT_SEEN:
        first = route_path.lstrip("/").split("/", 1)[0]
        found = first if first in KNOWN_PROVIDERS else None
        if len(_path_providers) >= 1024:  # paths come from clients: keep it bounded
            _path_providers.clear()
        _path_providers[route_path] = found
    return found  # type: ignore[return-value]


_NOT_SEEN = object()


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
