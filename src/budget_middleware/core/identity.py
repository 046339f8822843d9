"""Who is calling, for which provider and model, with which tags (SPEC §4)."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Container, Iterable, MutableMapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final
from urllib.parse import unquote_plus

from budget_middleware.core.media import asked_image_tokens, form_file
from budget_middleware.core.providers import (
    BARE_MODEL_PROVIDERS,
    RESOURCE_PREFIX,
    canonical_provider,
)
from budget_middleware.core.usage import USUAL_ACCEPT, readable_accept, tier_name

# Path prefixes that name a provider (`/openai/v1/chat/completions`; `/Google/…` and the other
# spellings `canonical_provider` knows too), by their one name.
KNOWN_PROVIDERS = frozenset(
    {
        "openai",
        "anthropic",
        "azure",
        "gemini",
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

# A POST in every case: `post` reaches the POST routes of frameworks that upper-case the method
# (werkzeug's, Django's), so it must not pass unmetered. One set lookup, whatever the method.
POST = frozenset(map("".join, itertools.product(*zip("POST", "post", strict=True))))

# `Authorization: Bearer `, its scheme in any case (RFC 9110 11.1): one set lookup, as `POST`.
BEARER = frozenset(map(bytes, itertools.product(*zip(b"bearer ", b"BEARER ", strict=True))))

# Headers that ask an app for another method than the request line's (Flask's docs'
# `HTTPMethodOverrideMiddleware` reads the first; Microsoft's and Google's APIs the others): an
# app honouring one inside the middleware serves `GET` saying `POST` at its POST route, which
# passed unmetered (served past an exhausted budget at $0).
METHOD_OVERRIDES: Final = (b"x-http-method-override", b"x-http-method", b"x-method-override")


def says_post(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers ask for POST by a method override (`METHOD_OVERRIDES`)."""
    return any(
        name in METHOD_OVERRIDES and value.strip().upper() == b"POST" for name, value in headers
    )


OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
CHOICE_FIELDS = ("n", "best_of")  # outputs generated (and billed) for one request
PROMPT_FIELD = "prompt"  # a legacy completion's: a list of prompts is a batch, each completed
# OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`), whose `prompt` is one text
# and `n` its images: each billed by its `size` and `quality` (`media.asked_image_tokens`), and
# when streamed its `partial_images` too, whatever its model's prices or an output limit say.
IMAGES_API_PATHS = ("/images/generations", "/images/edits")
PARTIAL_IMAGES_FIELD = "partial_images"
# What prices a request beyond its model and size: its service tier (OpenAI's `priority`, `flex`),
# or its speed (Anthropic's fast mode, `fast`), named as a service tier.
SERVICE_TIER_FIELD = "service_tier"
SPEED_FIELD = "speed"
# The fields that shape a request's worst-case cost, looked for at once.
# The Responses API's `background: true`: answered at once, queued and without usage; the result
# (and its usage) is fetched by a GET, which is no inference path.
BACKGROUND_FIELD = "background"
# OpenAI chat's `modalities: ["text", "audio"]`: an answer in speech, its output priced as audio.
MODALITIES_FIELD = "modalities"
# Anthropic's `inference_geo: "us"`: served on US-only infrastructure, every token billed 1.1
# times; the Responses API's `prompt_cache_options: {"ttl": "12h"}`: its input may be cache
# writes kept 12 hours, billed twice the input.
GEO_FIELD = "inference_geo"
CACHE_OPTIONS_FIELD = "prompt_cache_options"
_SIZE_FIELDS = frozenset(
    (
        MODALITIES_FIELD,
        GEO_FIELD,
        CACHE_OPTIONS_FIELD,
        *OUTPUT_LIMIT_FIELDS,
        *CHOICE_FIELDS,
        SERVICE_TIER_FIELD,
        SPEED_FIELD,
        PROMPT_FIELD,
        BACKGROUND_FIELD,
    )
)
_OUTPUT_LIMITS = frozenset(OUTPUT_LIMIT_FIELDS)


@dataclass(slots=True)
class Credentials:
    """What the headers say: a virtual key (if any), a provider, tags, the body's size."""

    key: str | None = None
    provider: str | None = None
    tags: tuple[str, ...] = ()
    content_length: int | None = None
    # The provider is the host's a call goes to (SPEC §13): it wins over a `provider/` prefix,
    # and the model is kept whole (OpenRouter's `anthropic/claude-sonnet-4`).
    provider_is_host: bool = False
    content_encoding: str | None = None  # the body's, when not `identity` (gzip, say)
    # The `accept-encoding` the app or provider gets instead of the one sent, narrowed to the
    # codings whose answers can be read (`usage.readable_accept`); None: it goes as sent.
    accept_encoding: str | None = None
    # The call goes to an API that refuses `stream_options` (`outbound.hosts.usage_unasked`): a
    # stream is sent as written, not asked for its usage.
    usage_unasked: bool = False
    # The caller's key's digest when its value is not known (a call charged to a key named by
    # its id): a model or provider holding the key is told by it (`TargetResolver`).
    key_digest: bytes | None = None
    # The model the call's URL names, over the body's: an Azure OpenAI deployment
    # (`outbound.hosts.deployment_named`), which is served whatever the body says.
    model: str | None = None
    # `x-budget-tags` entries past MAX_TAGS_READ (stripped, one of each): only those that have
    # limits count (`TargetResolver`, which knows them once the configuration is current).
    unread_tags: frozenset[str] = frozenset()


# A generated key: `BUDGET_KEY_PREFIX` and `secrets.token_urlsafe(KEY_BYTES)`, whose URL-safe
# base64 of 32 bytes is 43 characters.
KEY_BYTES: Final = 32
GENERATED_KEY_CHARS: Final = 43


def key_digest(value: str) -> bytes:
    """A virtual key's SHA-256: the key cache's index (its hex is the store's `key_hash`)."""
    return sha256(value.encode()).digest()


def hash_key(value: str) -> str:
    """A virtual key as the store keeps it: the hex of its SHA-256."""
    return key_digest(value).hex()


# A key's value chosen by hand (a create's `value`, a config file's) as a request can present
# it: a request's key is read trimmed, as the latin-1 text of the header's bytes, and httpx
# (the SDKs' client) sends no character outside ASCII (curl sends UTF-8, read otherwise). So:
# printable ASCII, spaces inside only. KEY_VALUE_PATTERN says it in the OpenAPI document.
KEY_VALUE_PATTERN: Final = "^[\\x21-\\x7e](?:[\\x20-\\x7e]*[\\x21-\\x7e])?$"


def key_value_problem(value: str) -> str | None:
    """Why no request could present a key of this value (KEY_VALUE_PATTERN's rule), or None;
    the value itself is never in the answer (a key's value stays out of messages)."""
    if value != value.strip():
        return "a key's value has no blank at either end: a request's key is read trimmed"
    if not (value.isascii() and value.isprintable()):
        return "a key's value is printable ASCII: a header carries no other as it is"
    return None


# The API-key headers that carry a virtual key with `BUDGET_KEY_PREFIX`, after the key header
# and `Authorization: Bearer`, in this order (SPEC §4): Anthropic's, Gemini's, Azure OpenAI's
# (its SDK sends `api-key`).
API_KEY_HEADERS: Final = (b"x-api-key", b"x-goog-api-key", b"api-key")


def header_reader(
    key_header_name: str, prefix: str
) -> Callable[[Iterable[tuple[bytes, bytes]]], Credentials]:
    """Build, once, the function that reads the headers of a metered request: one dict of them,
    built in C, and a lookup per header of interest (a client SDK sends a dozen others). A
    header sent twice counts by its first value, as the host app reads it (Starlette's
    `request.headers`): the key the app sees is the key charged. But `x-budget-tags`, a list:
    its lines are one list, as a WSGI server joins them (a gateway's line and the client's).
    `key_header_name` carries a key of any value; bearer and API-key headers count only with
    `prefix` (`BUDGET_KEY_HEADER`, `BUDGET_KEY_PREFIX`)."""
    key_header = key_header_name.lower().encode()

    def read(headers: Iterable[tuple[bytes, bytes]]) -> Credentials:
        rows = headers  # a list, as a rule: read as it is
        try:  # in C; a repeated header keeps its first value
            found = dict(reversed(rows))  # type: ignore[call-overload]
        except TypeError:  # ASGI allows any iterable: one that is no sequence is listed first
            rows = list(headers)
            found = dict(reversed(rows))
        key = None
        explicit = found.get(key_header)
        if explicit:
            key = explicit.decode("latin-1").strip() or None
        if key is None:  # none there, or blank: the other headers may hold it
            value = found.get(b"authorization")
            if value is not None and value[:7] in BEARER:
                text = value[7:].decode("latin-1").strip()
                if text.startswith(prefix):
                    key = text
            if not key:  # none there, or blank (with no prefix): the API-key headers may hold it
                for name in API_KEY_HEADERS:
                    value = found.get(name)
                    if value:
                        text = value.decode("latin-1").strip()
                        if text.startswith(prefix):
                            key = text
                            break
        length = found.get(b"content-length")
        size = None
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = None
        credentials = Credentials(key or None, None, (), size)  # by position: ~0.25 µs less
        if not _SELDOM_SENT.isdisjoint(found):  # one C call: the usual request sends none
            _read_seldom_sent(credentials, found.get, rows)
        accept = found.get(b"accept-encoding")
        if accept is not None and accept != USUAL_ACCEPT:
            credentials.accept_encoding = readable_accept(accept.decode("latin-1"))
        return credentials

    return read


# Headers a metered request seldom carries: looked up only when one of them is there.
_SELDOM_SENT = frozenset({b"x-budget-provider", b"x-budget-tags", b"content-encoding"})


def _read_seldom_sent(
    credentials: Credentials,
    get: Callable[[bytes], bytes | None],
    rows: Iterable[tuple[bytes, bytes]],
) -> None:
    """The provider, tags and body coding a request's headers name (`header_reader`)."""
    provider = get(b"x-budget-provider")
    if provider is not None:
        credentials.provider = header_text(provider).strip() or None
    tags = get(b"x-budget-tags")
    if tags is not None:
        lines = [value for name, value in rows if name == b"x-budget-tags"]
        if len(lines) > 1:  # every line's tags, as a WSGI server reads them, joined
            tags = b",".join(lines)
        credentials.tags, credentials.unread_tags = _split_tags(header_text(tags))
    encoding = get(b"content-encoding")
    if encoding is not None:
        lines = [value for name, value in rows if name == b"content-encoding"]
        if len(lines) > 1:  # one list (RFC 9110 5.3): `identity` then `gzip` is gzip
            encoding = b", ".join(lines)
        credentials.content_encoding = body_encoding(encoding.decode("latin-1"))


def headers_named(rows: list[tuple[bytes, bytes]]) -> Credentials:
    """The provider and tags (and the body's coding) a request's headers name, their names
    lowered, as `header_reader` reads them: no key (an outbound call's own headers, which may
    carry the provider's key, never a virtual key)."""
    credentials = Credentials(None, None, (), None)
    _read_seldom_sent(credentials, dict(reversed(rows)).get, rows)
    return credentials


def header_text(value: bytes) -> str:
    """A name a header carries (`x-budget-tags`, `x-budget-provider`): UTF-8, as httpx, the SDKs
    and browsers send a non-ASCII value, so that `café` is the tag an operator set; latin-1 for
    bytes that are no UTF-8 (as Starlette reads every header)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def body_encoding(value: str) -> str | None:
    """A `content-encoding` header's codings, lower case; None for none or `identity`."""
    coding = value.strip().lower()
    return None if coding in ("", "identity") else coding


# Client text as the store keeps it (its column sizes): longer is cut, and characters a store
# refuses or a log would mangle (NUL, controls, lone surrogates) become "?". Tags: at most 32
# kept, of at most 256 read: those with limits are kept first (`_kept_tags`), so that a client's
# 32 other tags do not push a tag's limits out of its request.
MAX_PROVIDER_CHARS = 100
MAX_MODEL_CHARS = 200
MAX_TAG_CHARS = 100
MAX_TAGS = 32
MAX_TAGS_READ = 256
MAX_PATH_KEPT = 256  # a longer path's provider and model are worked out, not remembered


# The characters an operator's provider or tag name may not hold: controls (C0, DEL, C1) and
# the line and paragraph separators, which a request's tag or provider is read with "?" for
# (`clean_text`), so that limits on such a name never applied; nor, at either end, a space
# (what `str.strip` removes: a request's is read trimmed). NAME_PATTERN says it in the OpenAPI
# document, exactly (`name_problem`'s rule): a name valid by the document is never refused.
# The bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) count as controls:
# shown, they reorder the text around them (`alice\u202egnp.exe` reads "aliceexe.png").
_CONTROLS = "\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069"
_SPACES = "\\u0020\\u00a0\\u1680\\u2000-\\u200a\\u202f\\u205f\\u3000"  # the others are controls
NAME_PATTERN = f"^(?:[^{_CONTROLS}{_SPACES}](?:[^{_CONTROLS}]*[^{_CONTROLS}{_SPACES}])?)?$"
CONTROL = re.compile(f"[{_CONTROLS}]")
# ... and what no store takes (a lone surrogate is no UTF-8): what `clean_text` replaces.
_UNSTORABLE = re.compile(f"[{_CONTROLS}\\ud800-\\udfff]")


def clean_text(text: str, limit: int) -> str:
    """`text` bounded to `limit` characters, every control character (`CONTROL`: what a name
    set by the admin side may not hold) and lone surrogate replaced by "?". Any other character
    is kept, printable by Python's rule or not (a no-break space, an emoji's U+200D joiner): an
    operator's tag of them is a tag requests can name."""
    if len(text) <= limit and text.isprintable():
        return text  # the usual case: one C call
    return _UNSTORABLE.sub("?", text[:limit])


def name_problem(kind: str, name: str, limit: int, *, carried: bool = True) -> str | None:
    """Why a name given to the admin side is refused, or None (NAME_PATTERN's rule). A
    provider's or a tag's (`carried`) must be one a request can carry (a request's is read
    trimmed, cut at `limit` characters, a control character as "?"), or limits on it would
    never be met; a customer's, a team's or a key's goes into answers, logs and `user_path`,
    which a line break or a hidden space at an end would garble."""
    if not name or len(name) > limit:
        return f"a {kind} name has 1 to {limit} characters"
    if name != name.strip():
        return f"a {kind} name has no space at either end: {name!r}"
    if CONTROL.search(name):
        why = f" (a request's {kind} is read with '?' for it)" if carried else ""
        return f"a {kind} name has no control character or line break: {name!r}{why}"
    return None


_NO_TAGS: frozenset[str] = frozenset()


def _clean_tags(tags: Iterable[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The first MAX_TAGS_READ tags, and the entries after them (stripped, one of each), of
    which only those with limits count (`limited_of`): cut there, a client's 256 tags first
    (`a,a,…`) pushed a tag with a $0 budget out unread (a gateway's line after the client's),
    and the request was served against none of its limits."""
    cleaned: list[str] = []
    tags = iter(tags)
    for tag in tags:
        tag = clean_text(tag.strip(), MAX_TAG_CHARS)
        if tag:
            cleaned.append(tag)
            if len(cleaned) == MAX_TAGS_READ:
                return tuple(cleaned), frozenset(t.strip() for t in tags)
    return tuple(cleaned), _NO_TAGS


def limited_of(unread: frozenset[str], limited: Container[str]) -> tuple[str, ...]:
    """The tags past MAX_TAGS_READ that have limits (`limited`), cleaned as a read tag is."""
    found = {t for tag in unread if (t := clean_text(tag, MAX_TAG_CHARS)) in limited}
    return tuple(sorted(found))


def _split_tags(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    # Split whole: a bounded split left the rest as one tag when empty entries came first
    # (`,,t0,...,t32` gave "t30,t31,t32"); `_clean_tags` reads MAX_TAGS_READ, then keeps the
    # rest for the tags with limits among it.
    return _clean_tags(text.split(","))


@dataclass(slots=True)
class Target:
    """Provider, model and tags of a metered request (`Credentials` says why no dataclass
    __init__)."""

    provider: str
    model: str
    tags: tuple[str, ...]
    stream: bool
    # A choice's, as the body limits it; an Images API request's: the most one of its images
    # is billed (`IMAGES_API_PATHS`), which no output limit bounds.
    max_output_tokens: int | None
    # Choices the provider generates and bills (OpenAI's `n`, a completion's `best_of`, for
    # each prompt of a batch): the worst case is each of them at the output limit.
    choices: int
    service_tier: str | None = None  # asked for in the body (`tier_name`): it may be priced apart
    background: bool = False  # made apart from its answer (`BACKGROUND_FIELD`)
    spoken: bool = False  # its output may be audio (`MODALITIES_FIELD`), priced as such
    # It asks for prompt caching (`cache_control`): its input may be writes; 2: kept 1 hour
    # (or 12: `prompt_cache_options.ttl`).
    caches: int = 0
    us_inference: bool = False  # asked to be served in the US only (`GEO_FIELD`): 1.1 times


class TargetResolver:
    """Provider and model from the body's `model`, the header, the path, or the catalog; tags
    from the header, the key and the body. Built once per middleware: where a (model, header,
    path) leads is worked out once and kept (bounded: all three come from clients), the
    provider by its one name (`canonical_provider`), so naming it costs nothing per request."""

    def __init__(
        self,
        guess_provider: Callable[[str], str | None],
        key_prefix: str = "",
        limited_tags: Callable[[], Container[str]] = frozenset,
        priced: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.guess_provider = guess_provider
        # Whether (provider, model) has a price (`served`); without one, whether the catalog
        # or the pricing file knows the model's provider.
        self.priced = priced or (lambda _, model: guess_provider(model) is not None)
        # The tags that have limits now (the engine's configuration): asked only of a request
        # with more than MAX_TAGS tags, which keeps them before the others.
        self.limited_tags = limited_tags
        # A virtual key sent where a name goes (`x-budget-tags: sk-bm-…`) would reach usage
        # records, answers, logs and the dashboard (SPEC §8): a client's tag holding the
        # caller's own key, or one shaped as a generated key (the prefix and 40 or more URL-safe
        # characters), is dropped; a model or provider holding the caller's key is `unknown`
        # (known by its digest alone when the call is charged to a key named by its id).
        # Only the caller's own key there: a model is never unpriced for looking like a key.
        # The shape starts where a word does: with the prefix `sk-`, `risk-assessment-…` (44
        # URL-safe characters after `sk-`) is a tag, whose limits a dropped tag escaped.
        shape = re.compile("(?<![A-Za-z0-9_-])" + re.escape(key_prefix) + "[A-Za-z0-9_-]{40}")
        self._key_shaped = shape.search if key_prefix else _never
        self._prefix = key_prefix
        self._routes: dict[tuple[str, str | None, str], tuple[str, str]] = {}
        self._hosted: dict[tuple[str, str | None, str], tuple[str, str]] = {}
        self._targets: dict[tuple[str, str | None, str], tuple[str, str]] = {}  # `retarget`

    def forget(self) -> None:
        """Forget where every (model, header, path) led: what is priced changed (a deployment
        priced through the admin API, `PriceBook.changed`), and a call to an Azure deployment
        is metered as the deployment once it is priced (`served`)."""
        self._routes.clear()
        self._hosted.clear()
        self._targets.clear()

    @staticmethod
    def _remember(
        memo: dict[tuple[str, str | None, str], tuple[str, str]],
        where: tuple[str, str | None, str],
        found: tuple[str, str],
    ) -> tuple[str, str]:
        # A client's huge name, provider header or path is not kept: 4,096 of them at 16 KB
        # each held 130 MB (measured: 18 MB after 1,000 requests of 8 KB of each).
        if (
            len(where[0]) <= MAX_MODEL_CHARS
            and (where[1] is None or len(where[1]) <= MAX_PROVIDER_CHARS)
            and len(where[2]) <= MAX_PATH_KEPT
        ):
            if len(memo) >= 4096:
                memo.clear()
            memo[where] = found
        return found

    def __call__(
        self,
        body: Any,
        route_path: str,
        credentials: Credentials,
        key_tags: tuple[str, ...],
        own_key: str | None = None,
    ) -> Target:
        """`own_key`: the caller's key's value, when it is a known key."""
        data = body if type(body) is dict or type(body) is FormFields else _NO_BODY
        raw_model = (
            data.get("model")
            if credentials.model is None
            else self.served(credentials.model, data.get("model"), credentials.provider)
        )
        provider, model = self.provider_and_model(
            raw_model if type(raw_model) is str else "", credentials, route_path
        )
        # (a provider is named in lower case: the key in it is too)
        if own_key is None and credentials.key_digest is not None:
            own_key = self._own_key_in(raw_model, credentials)
        if own_key is not None and (own_key in model or own_key.lower() in provider):
            provider, model = _without_key(provider, model, own_key)
        tags = credentials.tags
        if credentials.unread_tags:  # past MAX_TAGS_READ: those with limits
            tags += limited_of(credentials.unread_tags, self.limited_tags())
        if "metadata" in data:
            tags += _body_tags(data, self.limited_tags)
        if tags:
            tags = self._no_keys(tags, own_key)
        if key_tags:
            tags += key_tags
        if len(tags) > 1:
            tags = tuple(sorted(set(tags)))
            if len(tags) > MAX_TAGS:
                tags = _kept_tags(tags, key_tags, self.limited_tags())
        limit = None
        sized = _SIZE_FIELDS.intersection(data)  # in C: none, or an output limit, usually
        if sized:
            # Of the output limits given, the largest (in any order): upstreams differ in which
            # one they obey.
            for name in sized & _OUTPUT_LIMITS:
                value = data[name]
                if type(value) is not int or value < 0:  # a count is taken as it is
                    value = _count(value)
                    if value is None:
                        continue
                if limit is None or value > limit:
                    limit = value
            if not sized <= _OUTPUT_LIMITS:  # choices, a tier, a batch, audio: seldom asked
                return _shaped(provider, model, tags, data, sized, limit, route_path)
        # (no `stream` named, the usual body: told without reading it)
        return Target(provider, model, tags, "stream" in data and _streams(data), limit, 1)

    def provider_and_model(
        self, model: str, credentials: Credentials, route_path: str
    ) -> tuple[str, str]:
        """Where a request naming `model` goes: a call to a provider's host (SPEC §13) is that
        provider's, the model as sent (OpenRouter's `vendor/model` too); else §4's rules."""
        where: tuple[str, str | None, str]
        if credentials.provider_is_host and credentials.provider is not None:
            where = (model, credentials.provider, "")
            try:
                return self._hosted[where]
            except KeyError:  # worked out once
                return self._remember(self._hosted, where, _hosted(model, credentials.provider))
        where = (model, credentials.provider, route_path)
        try:
            return self._routes[where]
        except KeyError:  # worked out once
            return self._remember(self._routes, where, self._route(*where))

    def retarget(
        self, target: Target, model: str, credentials: Credentials, route_path: str
    ) -> Target:
        """`target` sent to another model (a route's target, `provider/model` or bare): its
        provider and model found as a request naming that model would have them (a call to a
        provider's host: that host's, as a direct call naming it is). The target as written, not
        the deployment an Azure path names (`_route`): the call is sent to the target's."""
        if credentials.provider_is_host and credentials.provider is not None:
            found = self.provider_and_model(model, credentials, route_path)
        else:
            where = (model, credentials.provider, route_path)
            found = self._targets.get(where) or self._remember(
                self._targets, where, self._named(*where)
            )
        return Target(
            found[0],
            found[1],
            target.tags,
            target.stream,
            target.max_output_tokens,
            target.choices,
            target.service_tier,
            target.background,
            target.spoken,
            target.caches,
            target.us_inference,
        )

    def _own_key_in(self, raw_model: object, credentials: Credentials) -> str | None:
        """The caller's key as the body's model or the provider header holds it, when only its
        digest is known (`Credentials.key_digest`): a generated key there (the prefix and its
        `GENERATED_KEY_CHARS`, wherever they stand) whose digest is the caller's. A value chosen
        by hand is not told so (each of its lengths at each place would be hashed)."""
        prefix = self._prefix
        if not prefix:
            return None
        size = len(prefix) + GENERATED_KEY_CHARS
        for text in (raw_model, credentials.provider):
            if type(text) is not str:
                continue
            at = text.find(prefix)
            while at >= 0:
                candidate = text[at : at + size]
                if len(candidate) == size and key_digest(candidate) == credentials.key_digest:
                    return candidate
                at = text.find(prefix, at + 1)
        return None

    def _no_keys(self, tags: tuple[str, ...], own_key: str | None) -> tuple[str, ...]:
        """A client's tags without those that hold a virtual key (`__init__`)."""
        shaped = self._key_shaped
        for tag in tags:
            if shaped(tag) is not None or (own_key is not None and own_key in tag):
                return tuple(
                    t for t in tags if shaped(t) is None and (own_key is None or own_key not in t)
                )
        return tags

    def served(self, deployment: str, named: object, provider: str | None) -> str:
        """The model a call to an Azure OpenAI deployment (`/openai/deployments/<name>/…`) is
        metered as, the body naming `named`: the deployment, which Azure serves whatever the
        body says (and its REST API needs no `model`); but a deployment no price names
        (`prod-chat`) beside a body naming a model one does (`AzureOpenAI(azure_deployment=
        "prod-chat")` with `model="gpt-4o"`) is the body's model, not an unpriced one charged
        0. One rule for the outbound transport's calls (`Credentials.model`) and for an app
        serving Azure's paths (`_route`); `provider`: the one the call names, if any."""
        if type(named) is str and named != deployment:
            priced = self.priced
            where = canonical_provider(provider) if provider else ""
            if not priced(where, deployment):
                head, _, bare = named.strip().rpartition("/")
                if bare and priced(canonical_provider(head) if head else where, bare):
                    return named
        return deployment

    def _route(self, raw_model: str, header: str | None, route_path: str) -> tuple[str, str]:
        """§4's provider and model of a request naming `raw_model`; on an Azure OpenAI path (an
        app serving Azure's paths), the deployment it names (`served`)."""
        if route_path.startswith(DEPLOYMENTS_PATH):
            deployment = path_deployment(route_path)
            if deployment is not None:
                named = header or _path_provider(route_path)
                raw_model = self.served(deployment, raw_model or None, named)
        return self._named(raw_model, header, route_path)

    def _named(self, raw_model: str, header: str | None, route_path: str) -> tuple[str, str]:
        model = raw_model.strip()
        provider: str | None = None
        if "/" in model:
            head, rest = model.split("/", 1)
            if head == RESOURCE_PREFIX and rest:  # Gemini's `models/<name>`: a bare name
                model = rest
            elif head and rest:
                provider, model = head, rest
        provider = provider or header or _path_provider(route_path)
        if provider is None and model:
            provider = self.guess_provider(model)
        if provider is None and route_path.endswith("/messages"):
            provider = "anthropic"
        name = canonical_provider(provider) if provider else ""
        return (
            clean_text(name, MAX_PROVIDER_CHARS) if name else "unknown",
            clean_text(model, MAX_MODEL_CHARS) if model else "unknown",
        )


_NO_BODY: dict[str, Any] = {}
# Azure OpenAI's deployments API: the path names the deployment served (`path_deployment`).
DEPLOYMENTS_PATH: Final = "/openai/deployments/"


def path_deployment(path: str) -> str | None:
    """The deployment an Azure OpenAI path names (`/openai/deployments/<name>/…`), or None."""
    if not path.startswith(DEPLOYMENTS_PATH):
        return None
    return path[len(DEPLOYMENTS_PATH) :].partition("/")[0] or None


class FormFields(dict[str, str]):
    """A `multipart/form-data` body's text fields (`form_fields`): read as a JSON body's keys
    for its target (`TargetResolver`), and no JSON to rewrite (a route's target, a stream's
    usage asked for: `type(parsed) is dict` is False for it). `media`: its files that are
    images or audio (`media.form_file`), counted by what they are, not their bytes."""

    media: list[tuple[int, int, int]]


# A form is read as Starlette's and FastAPI's forms read it (python-multipart), or the fields
# the middleware meters are not the ones the app serves: a delimiter is `CRLF--<boundary>`
# followed by CRLF (after spaces or tabs, RFC 2046's padding) or by `--`, the form's end
# (what follows it is an epilogue, unread); a part's name is the `name` parameter of its last
# `Content-Disposition` header, its parameters split at `;` outside quotes, quoted or not,
# their names in any case (`name*=`, RFC 2231's, is none); a `filename` parameter makes it a
# file. A `CRLF--<boundary>X` within a field, a `x-name="model"` parameter, a second header or
# a part after the end were read as a field the app never saw: a cheaper model metered than
# the one served.
def _delimited(body: bytes, delimiter: bytes, at: int) -> tuple[int, int]:
    """Where the next delimiter from `at` begins, and where the part after it begins (-1: the
    form ends there); (-1, -1) when there is none."""
    size = len(delimiter)
    found = body.find(delimiter, at)
    while found >= 0:
        after = found + size
        if body.startswith(b"\r\n", after):
            return found, after + 2
        if body.startswith(b"--", after):
            return found, -1
        padded = after
        while body[padded : padded + 1] in (b" ", b"\t"):
            padded += 1
        if padded > after:  # padding then a CRLF, or no form python-multipart reads: the end
            return found, padded + 2 if body.startswith(b"\r\n", padded) else -1
        found = body.find(delimiter, found + 1)  # `CRLF--<boundary>X`: a field's text
    return -1, -1


_PARAMETER_BLANKS: Final = " \t"  # stripped around a parameter's name and value


def _disposition(head: bytes) -> tuple[str | None, bool]:
    """The name of a part of `head` (its headers), and whether it is a file: of the last
    `Content-Disposition` header (`form_fields`)."""
    value = None
    for line in head.split(b"\r\n"):
        field, colon, said = line.partition(b":")
        if colon and field.lower() == b"content-disposition":
            value = said
    if value is None:
        return None, False
    text = value.decode("utf-8", "replace")
    name = None
    is_file = False
    start, size = 0, len(text)
    while start < size:  # the stdlib's `email.message._parseparam`, as python-multipart's
        end = text.find(";", start)
        at, quotes = start, 0
        while end >= 0:  # a `;` within quotes splits nothing
            quotes += text.count('"', at, end) - text.count('\\"', at, end)
            if quotes % 2 == 0:
                break
            at, end = end, text.find(";", end + 1)
        if end < 0:
            end = size
        if start:  # (the first is the disposition's type)
            key, equals, found = text[start:end].partition("=")
            key = key.strip(_PARAMETER_BLANKS)
            if equals:
                key = key.lower()
            if "*" not in key:
                found = found.strip(_PARAMETER_BLANKS)
                if len(found) >= 2 and found[0] == found[-1] == '"':
                    found = found[1:-1].replace("\\\\", "\\").replace('\\"', '"')
                if key == "name":
                    name = found
                elif key == "filename":
                    is_file = True
        start = end + 1
    return name, is_file


def form_fields(body: bytes) -> FormFields | None:
    """The text fields of a `multipart/form-data` body, told by its first line (`--<boundary>`,
    after any leading lines python-multipart skips: from a leading CR or LF to the first `-`),
    read as Starlette's and FastAPI's forms read it (above), the last of a name repeated, and
    its files that are images or audio (`FormFields.media`, by their size:
    `media.form_file`, counted so where the gate walks a body for media: a binary file holds a
    NUL, `may_reference`); None when it is not one. OpenAI's SDKs send the Images API's edits
    so (`images.edit`: `model`, `prompt`, `n`, `size`, `quality` beside the image), whose
    model, images and sizes were otherwise unread: unpriced, charged 0, or reserved the default
    output of a model an Azure deployment names; and the Audio API's transcriptions (`model`
    beside the `file`). A body that is no multipart form but holds a `=` is read as an
    `application/x-www-form-urlencoded` one (`_urlencoded`), which a route of `Form(...)`
    fields reads too."""
    start = 0
    if body[:1] in (b"\r", b"\n"):
        start = body.find(b"-")
    if start < 0 or body[start : start + 2] != b"--":
        return _urlencoded(body) if b"=" in body else None
    end = body.find(b"\r\n", start)
    if end < start + 3:
        return None
    delimiter = b"\r\n" + body[start:end]
    fields = FormFields()
    fields.media = media = []
    at = end + 2
    parts = files = 0
    while at >= 0:
        head_end = body.find(b"\r\n\r\n", at - 2)  # (a part without headers: at once)
        if head_end < 0:
            break
        next_at, after = _delimited(body, delimiter, head_end + 4)
        if next_at < 0:
            break
        head = body[at:head_end] if head_end > at else b""
        name, is_file = _disposition(head)
        if is_file:
            files += 1
            medium = form_file(head, body[head_end + 4 : next_at])
            if medium is not None:
                media.append(medium)
        else:
            parts += 1
            if name is not None:
                fields[name] = body[head_end + 4 : next_at].decode("utf-8", "replace")
        if parts > MAX_FORM_FIELDS or files > MAX_FORM_FIELDS:
            return None  # a form Starlette's and Werkzeug's parsers refuse (400): unread
        at = after
    return fields


def _urlencoded(body: bytes) -> FormFields | None:
    """The fields of an `application/x-www-form-urlencoded` body as Starlette reads them
    (python-multipart's `QuerystringParser`): split at `&`, a name without `=` valued `""`,
    each `unquote_plus`-decoded from Latin-1, the last of a name repeated. FastAPI's `Form(...)`
    takes such a body as a multipart one: read as no form, its `model` was `unknown`,
    unpriced (a gpt-image-1 image charged $0)."""
    fields = FormFields()
    fields.media = []
    for count, found in enumerate(_URLENCODED_FIELD.finditer(body)):
        if count == MAX_FORM_FIELDS:
            return None  # a form Starlette's and Werkzeug's parsers refuse (400): unread
        name, _, value = found[0].partition(b"=")
        fields[unquote_plus(name.decode("latin-1"))] = unquote_plus(value.decode("latin-1"))
    return fields


# The most fields (and, apart, files) of a form read: Starlette's forms refuse more
# (`max_fields`, `max_files`: 400 "Too many fields"), Werkzeug's too (`max_form_parts`), so the
# app serves none of it. Reading on held the event loop for seconds (a 9 MB body of `a=&`: 5 s).
MAX_FORM_FIELDS: Final = 1000
_URLENCODED_FIELD = re.compile(rb"[^&]+")  # a field between `&`s: none empty, as Starlette's


def _batch(prompt: object) -> int:
    """The prompts of a legacy completion's `prompt`: a list of texts (or of token lists) is a
    batch, each prompt completed and billed apart; a list of token ids is one prompt."""
    if type(prompt) is list and prompt and type(prompt[0]) is not int:
        return len(prompt)
    return 1


def _shaped(
    provider: str,
    model: str,
    tags: tuple[str, ...],
    data: dict[str, Any],
    sized: frozenset[str],
    limit: int | None,
    route_path: str,
) -> Target:
    """The target of a request whose body names more than an output limit among the fields
    that shape its worst-case cost (`_SIZE_FIELDS`): its choices, service tier, batch,
    background and audio output, 12-hour cache writes, US-only inference, and an Images API
    request's images (`IMAGES_API_PATHS`)
    (`TargetResolver.__call__`)."""
    choices = 1
    tier = None
    if not sized.isdisjoint(CHOICE_FIELDS):
        for name in CHOICE_FIELDS:
            value = _count(data.get(name))
            if value is not None and value > choices:
                choices = value
    if SERVICE_TIER_FIELD in sized:
        tier = tier_name(data[SERVICE_TIER_FIELD])
    elif SPEED_FIELD in sized:
        tier = tier_name(data[SPEED_FIELD])
    if PROMPT_FIELD in sized:
        if route_path.endswith(IMAGES_API_PATHS):
            # An image answer whatever its model's prices say, and whatever an output limit
            # says (the API has none): each of its `n` images is billed by its size and quality
            partials = _count(data.get(PARTIAL_IMAGES_FIELD)) or 0
            most = asked_image_tokens(model, data.get("size"), data.get("quality"), partials)
            limit = most if limit is None else max(limit, most)
        else:
            choices *= _batch(data[PROMPT_FIELD])
    background = BACKGROUND_FIELD in sized and lax_true(data[BACKGROUND_FIELD])
    modalities = data.get(MODALITIES_FIELD)
    spoken = type(modalities) is list and "audio" in modalities
    stream = _streams(data)
    target = Target(provider, model, tags, stream, limit, choices, tier, background, spoken)
    if CACHE_OPTIONS_FIELD in sized:  # writes kept 12 hours: at the 1-hour writes' rate
        options = data[CACHE_OPTIONS_FIELD]
        if type(options) is dict and options.get("ttl") == "12h":
            target.caches = 2
    target.us_inference = GEO_FIELD in sized and data[GEO_FIELD] == "us"
    return target


# What pydantic's lax mode (FastAPI's request models) reads as the boolean True, which the host
# app then sends on as `true`: `"true"`, `"1"`, `"on"`, `1`, `1.0` (`_count`'s reason).
_TRUE_TEXTS = frozenset(("1", "on", "t", "true", "y", "yes"))


def lax_true(value: object) -> bool:
    """Whether a flag is True as the host app may read it (pydantic's lax bool)."""
    if value is True:
        return True
    if type(value) is str:
        return value.strip().lower() in _TRUE_TEXTS
    return type(value) in (int, float) and value == 1


def _streams(data: dict[str, Any]) -> bool:
    """Whether the request asks for a stream as the host app reads it: `"stream": "true"`, `1`
    is the stream a lax reader serves (FastAPI's models, vLLM's), asked for its usage and read
    as one. (`true`, `false` or none, the usual values, are told without `lax_true`.)"""
    stream = data.get("stream")
    return stream is True or (stream is not None and stream is not False and lax_true(stream))


def _count(value: object) -> int | None:
    """A token or choice count as the host app may read it: FastAPI validates a request model
    in pydantic's lax mode, where `"2000"` and `2000.0` are the integer 2000 the upstream then
    gets. So a number or a string of one counts, rounded up; None for anything else (a bool,
    below 0, not finite), which leaves the default."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is str:
        try:
            value = int(value)  # "2000", " 2000 ", "2_000"
        except ValueError:
            try:
                value = float(value)  # "2000.0"
            except ValueError:
                return None
        if type(value) is int:
            return value if value >= 0 else None
    if type(value) is float and math.isfinite(value) and value >= 0:
        return math.ceil(value)
    return None


def _kept_tags(
    tags: tuple[str, ...], key_tags: tuple[str, ...], limited: Container[str]
) -> tuple[str, ...]:
    """At most MAX_TAGS of the sorted `tags`: the key's own first (its operator set them, and
    their limits apply whatever a client sends), then the client's that have limits (SPEC §5:
    every tag of the request that has limits applies; cut in name order, `zz-prod` escaped its
    $0 budget behind 32 tags sent before it), then the others, in order."""
    kept = set(key_tags[:MAX_TAGS])
    client = [t for t in tags if t not in kept]
    client = [t for t in client if t in limited] + [t for t in client if t not in limited]
    return tuple(sorted(kept.union(client[: MAX_TAGS - len(kept)])))


def _never(_: str) -> None:
    return None


def _without_key(provider: str, model: str, key: str) -> tuple[str, str]:
    return (
        "unknown" if key.lower() in provider else provider,
        "unknown" if key in model else model,
    )


def _hosted(raw_model: str, provider: str) -> tuple[str, str]:
    """A call to a provider's host: that provider, and the model as sent, but for a prefix
    naming that provider itself where its API names models bare (a route's `openai/gpt-4o` on
    api.openai.com is its `gpt-4o`, which its limits and prices name; OpenRouter's
    `openai/gpt-4o` and `openrouter/auto` stay whole, as Groq's `groq/compound`). Gemini's own
    `models/` too: it names a model `models/<name>` and reads a bare name so, and its limits and
    prices name `gemini-2.5-flash` (`models/gemini-2.5-flash` was unpriced: charged 0)."""
    model = raw_model.strip()
    provider = canonical_provider(provider)
    if provider in BARE_MODEL_PROVIDERS:
        head, slash, rest = model.partition("/")
        own = canonical_provider(head) == provider or (
            head == RESOURCE_PREFIX and provider == "gemini"
        )
        if slash and rest and own:
            model = rest
    return (
        clean_text(provider, MAX_PROVIDER_CHARS),
        clean_text(model, MAX_MODEL_CHARS) if model else "unknown",
    )


def _path_provider(route_path: str) -> str | None:
    first = canonical_provider(route_path.lstrip("/").split("/", 1)[0])
    return first if first in KNOWN_PROVIDERS else None


def _body_tags(data: dict[str, Any], limited_tags: Callable[[], Container[str]]) -> tuple[str, ...]:
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        return ()
    tags = metadata.get("tags")
    if not isinstance(tags, list):
        return ()
    read, unread = _clean_tags(t for t in tags if isinstance(t, str))
    return read + limited_of(unread, limited_tags()) if unread else read


def is_inference_path(path: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a POST to `path` is metered: it ends with an inference path, slashes after it
    or not (Flask with `strict_slashes=False`, Django's slashed URLs and a catch-all route
    serve `/v1/chat/completions/` and `//` too: unmetered, they were a way around every
    limit), dot segments removed (a catch-all proxy's httpx sends `/v1/chat/completions/.`
    on as `/v1/chat/completions`). The usual path is told by one `str.endswith`."""
    return path.endswith(suffixes) or (needs_plain(path) and plain_path(path).endswith(suffixes))


def needs_plain(path: str) -> bool:
    """Whether a (decoded) path may be sent on as another: slashes after it, dot segments, or a
    `?`/`#` (sent as `%3F`/`%23`) that a proxy's URL library reads as the query's start."""
    return path[-1:] == "/" or "/." in path or "?" in path or "#" in path


def plain_path(path: str) -> str:
    """`path` as a URL library sends it on (RFC 3986's dot segments removed, as httpx, urllib3
    and yarl remove them) and without slashes after it: what `is_inference_path` compares. An
    empty segment is one too: `/v1/chat/completions//..` is sent as `/v1/chat/completions`.
    A decoded `?` or `#` (`%3F`, `%23` in the request line) ends it, as a URL library reads it."""
    cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        path = path[:cut]
    if "/." in path:
        kept: list[str] = []
        for segment in path.split("/"):
            if segment == "..":
                if len(kept) > 1:  # never above the root
                    kept.pop()
            elif segment != ".":
                kept.append(segment)
        path = "/".join(kept)
    return path.rstrip("/")


def route_path(scope: MutableMapping[str, Any]) -> str:
    """The path below the mount point (`root_path`), as the app's routes see it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
