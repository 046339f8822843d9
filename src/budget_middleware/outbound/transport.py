"""Transports for `httpx` and `httpx2` clients that meter the provider calls going through them
(SPEC §13): the same checks, reservation, usage reading and charges as an inbound request, with
usage records marked `direction: "outbound"`. Requests to other paths pass untouched.

    client = openai.AsyncOpenAI(http_client=httpx2.AsyncClient(transport=BudgetTransport()))

A refused call is never sent: the SDK gets the answer an inbound client would (§8) and raises its
usual exception. Responses reach the SDK chunk by chunk; the charge is settled exactly once, when
the body ends or the SDK closes it.

The transport answers with the library of the request it is given (`httpx` or `httpx2`: the
current OpenAI and Anthropic SDKs take `httpx2` clients), so one class serves both. The sync
transport hands its admission and settlement to the event loop the engine runs in (the app's,
or one of its own in a background thread for a script): one loop decides, so admission stays
atomic whatever the threads. With in-process counters on that background loop it admits and
settles in the calling thread instead, holding the lock every step of the loop holds (as the
WSGI middleware does), unless something must be awaited.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import operator
import sys
import threading
import weakref
from dataclasses import dataclass
from time import perf_counter
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from budget_middleware.answers import ErrorAnswer
from budget_middleware.core.identity import (
    Credentials,
    body_encoding,
    header_reader,
    headers_named,
    is_inference_path,
    key_digest,
    limited_of,
    plain_path,
)
from budget_middleware.core.scopes import KeyConfig
from budget_middleware.core.usage import USUAL_ACCEPT, readable_accept
from budget_middleware.engine.cache import NOT_CACHED, NotCached
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.engine.exchange import METERED_BY, Exchange, settle_unwanted
from budget_middleware.engine.gate import RoutePlan, body_to_send, parse_json
from budget_middleware.engine.hooks import Hook
from budget_middleware.engine.portal import (
    done_there,
    engine_loop,
    home,
    is_background,
    loop_lock,
    on_loop,
    settle_before_exit,
)
from budget_middleware.exceptions import ConfigurationError
from budget_middleware.outbound.hosts import (
    AZURE_PATHS,
    USAGE_CHECKED,
    HostTable,
    deployment_named,
    usage_unasked,
)
from budget_middleware.outbound.payer import Payer, inbound_headers, noting, payer
from budget_middleware.settings import BudgetSettings

T = TypeVar("T")
_UNKNOWN = "Unknown virtual key"
# Not the rewritten body's: its length is known (a body sent chunked goes with its length).
_REWRITTEN = (b"content-length", b"content-encoding", b"transfer-encoding")
_USUAL_ACCEPT = USUAL_ACCEPT.decode()
_running_loop = asyncio._get_running_loop  # the loop running in this thread, else None

# From the moment an app imports the transports (at its top, as it does), the middlewares note
# every request's caller: also those of the request that makes the app's first client.
noting.active = True


def _deployment_routed(url: Any, exchange: Exchange) -> Any:
    """A routed call to Azure OpenAI (SPEC §12, §13): Azure serves the deployment its path names
    (`/openai/deployments/<name>/…`), not the body's `model`, so the chosen target goes there
    too; else the route's own name is served while the target is checked and charged. By the
    path's shape, whatever the target's provider: on a gateway's host (API Management's
    `*.azure-api.net`) a target of another provider is no deployment there either, and a 404
    costs nothing where the route's deployment would be served past its budget."""
    path: str = url.path
    marker = "/deployments/"
    at = path.find(marker)
    if at < 0:
        return url
    start = at + len(marker)
    end = path.find("/", start)
    if end <= start:
        return url
    # The target's model (`azure/gpt-4o-mini` on a host that is not a provider's, APIM's
    # `*.azure-api.net` say, is deployment `gpt-4o-mini`: the route's text is what the body
    # gets, never a deployment's name)
    model = exchange.target.model
    return url.copy_with(path=path[:start] + quote(model, safe="") + path[end:])


class _Meter:
    """What both transports share: which calls are metered, who pays, and the answers."""

    def __init__(
        self, settings: BudgetSettings | None, engine: BudgetEngine | None, hooks: dict[str, Any]
    ) -> None:
        self.engine = engine if engine is not None else get_engine(settings)
        self.engine.add_hooks(**hooks)  # on_alert, on_refusal, on_settled (SPEC §14)
        s = self.engine.settings
        self.shadow = s.mode == "shadow"
        self.suffixes = s.inference_paths
        self.max_body = s.max_body_bytes
        self.fail_open = s.fail_open
        self.require_key = s.require_virtual_key
        self.key_required = (
            "A virtual key is required: the request being served carries none (send it in the "
            f"'{s.key_header}' header), and the call is not made inside charge_to(...)"
        )
        self.read_headers = header_reader(s.key_header, s.key_prefix)
        self.hosts = HostTable(dict(s.provider_hosts))

    def metered(self, request: Any) -> str | None:
        """The path of a call to meter (a POST to an inference path), else None."""
        if request.method != "POST":
            return None
        path: str = request.url.path
        if not is_inference_path(path, self.suffixes):
            return None
        if "/threads/" in path and _thread_messages(path):
            return None
        return path

    def readable(
        self, headers: _RawHeaders, names: list[bytes], body: bytes
    ) -> bytes | ErrorAnswer:
        """The body as the gate reads it: decoded when the app sent it compressed (a
        `content-encoding` of gzip or deflate; the provider still gets it as sent), else as it
        is; a 413 answer when it is over BUDGET_MAX_BODY_BYTES, as sent or decoded."""
        if len(body) > self.max_body:
            return self.engine.gate.too_large()
        if b"content-encoding" not in names:  # as a rule: sent as it is (a search in C)
            return body
        sent = _header(headers, names, b"content-encoding")
        coding = None if sent is None else body_encoding(sent)
        if coding is None:
            return body
        plain = self.engine.gate.plain_body(body, coding)
        return self.engine.gate.too_large() if plain is None else plain

    async def admit(
        self, request: Any, path: str, body: bytes, headers: _RawHeaders, names: list[bytes]
    ) -> Exchange | ErrorAnswer:
        """Who pays, the gate's decision and admission (on the engine's event loop).
        `headers`: the request's raw headers, `names`: theirs lowered (`_names`), read once a
        call (httpx builds its raw list anew each time it is asked)."""
        engine = self.engine
        started = perf_counter()
        if engine.needs_start():  # not yet, or its loop closed (`asyncio.run` per job)
            there = home(engine)
            if there is not None and there is not asyncio.get_running_loop():
                # Its loop closed since this call chose to be admitted here (stopped, not
                # closed, between the steps of a script's `asyncio.run` ending): started here,
                # on a worker thread's loop, the engine would run on a loop that ends with
                # this call's `asyncio.run`, while other threads' calls start it on the
                # background one (3 threads of 4 once waited there for ever, on an asyncio
                # lock of two loops). Admitted where it starts, as the call would be now.
                return await _admitted_elsewhere(self, request, path, body, headers, names, there)
            try:
                await engine.ensure_started()
            except ConfigurationError:
                raise
            except Exception:
                if not self.fail_open:
                    return self.engine.gate.unavailable()
        if engine.stale:
            await engine.ensure_current()
        chosen = payer.get()
        value, tags = self.caller(chosen)
        by_id: bytes | None = None  # the digest of a key named by its id
        try:
            key = self.cached_key(chosen, self.digest(chosen, value))
            if key is NOT_CACHED:
                if value is None:  # `charge_to(virtual_key_id=...)`
                    assert chosen is not None and chosen.virtual_key_id is not None
                    found = await engine.lookup_key_id(chosen.virtual_key_id)
                    key, by_id = (None, None) if found is None else found
                else:
                    key = await engine.vouch_for(value, self.fail_open)
        except ServiceUnavailable:
            return self.engine.gate.unavailable(self.fail_open)
        parsed = parse_json(body)
        decision = self.decide(
            request, path, body, headers, names, parsed, chosen, value, tags, key, started, by_id
        )
        if type(decision) is ErrorAnswer:
            return decision
        gate = engine.gate
        try:
            if engine.in_process:
                admitted = gate.admit_now(decision)  # type: ignore[arg-type]
            else:
                admitted = await gate.admit(decision)  # type: ignore[arg-type]
        except ServiceUnavailable:
            return gate.unavailable_after(decision)  # type: ignore[arg-type]
        return _outbound(admitted)

    def admit_here(
        self, request: Any, path: str, body: bytes, headers: _RawHeaders, names: list[bytes]
    ) -> Exchange | ErrorAnswer | None:
        """A sync call's admission in the calling thread, as the WSGI middleware admits: with
        in-process counters on the background loop, decided and admitted holding `loop_lock`,
        which every step of that loop holds (atomic whatever the threads), with no hop to the
        loop and back (~100 µs of a call's wall time). None when something must be awaited
        (the engine to start, a reload, a key not cached yet or named by its id) or the loop
        is not the background one: the loop admits (`admit`)."""
        engine = self.engine
        if (
            engine.memory is None
            or not is_background(engine.loop)
            or engine.needs_start()
            or engine.stale
            or engine.cannot_wait()
        ):
            return None
        started = perf_counter()
        chosen = payer.get()
        value, tags = self.caller(chosen)
        # The body read and the key hashed before the lock, as WSGI does: under it, every
        # thread and the engine's loop wait (a 5 MB body's parse alone held it ~9 ms).
        digest = self.digest(chosen, value)
        parsed = parse_json(body)
        with loop_lock:
            key = self.cached_key(chosen, digest)
            if key is NOT_CACHED:
                return None
            decision = self.decide(
                request, path, body, headers, names, parsed, chosen, value, tags, key, started
            )
            if type(decision) is ErrorAnswer:
                return decision
            admitted = engine.gate.admit_now(decision)  # type: ignore[arg-type]
        return _outbound(admitted)

    def caller(self, chosen: Payer | None) -> tuple[str | None, tuple[str, ...]]:
        """Who pays: the key's value and the tags. `charge_to`'s (its value None when it names
        the key by its id), else the inbound request's being served (§4: its key, if any, and
        its `x-budget-tags`), else nobody."""
        if chosen is not None:
            return chosen.virtual_key, chosen.tags
        headers = inbound_headers.get()
        if headers is None:
            return None, ()
        credentials = self.read_headers(headers)
        if credentials.unread_tags:  # past MAX_TAGS_READ: those with limits count
            limited = self.engine.gate.resolve_target.limited_tags()
            return credentials.key, credentials.tags + limited_of(credentials.unread_tags, limited)
        return credentials.key, credentials.tags

    @staticmethod
    def digest(chosen: Payer | None, value: str | None) -> bytes | None:
        """The paying key's digest, the key cache's index: None when no key is given by its
        value (nobody pays, or `charge_to` names it by its id)."""
        if value is None:
            return None
        if chosen is not None:
            return chosen.digest or b""  # hashed once, by `charge_to`
        return key_digest(value)

    def cached_key(
        self, chosen: Payer | None, digest: bytes | None
    ) -> KeyConfig | NotCached | None:
        """The paying key as the engine's cache has it, with no await (None: nobody pays, or
        the key is known not to exist), or NOT_CACHED: to be read (a key named by its id is
        read through `lookup_key_id`, which has a cache of its own)."""
        if digest is None:
            return NOT_CACHED if chosen is not None else None
        return self.engine.keys.get(digest)

    def decide(
        self,
        request: Any,
        path: str,
        body: bytes,
        raw: _RawHeaders,
        names: list[bytes],
        parsed: Any,
        chosen: Payer | None,
        value: str | None,
        tags: tuple[str, ...],
        key: KeyConfig | None,
        started: float,
        by_id: bytes | None = None,
    ) -> Exchange | ErrorAnswer | RoutePlan:
        """The answer to the paying key (SPEC §5's checks) and the gate's decision: no await.
        `raw`, `names`: the request's raw headers and their names lowered (`_names`).
        `parsed`: the body's JSON (`parse_json`), read before any lock is taken. `by_id`: the
        digest of a key named by its id (its value unknown here)."""
        engine = self.engine
        shadowed: str | None = None
        if key is None and (chosen is not None or value is not None):
            # A key named and unknown (or revoked): SPEC §5.1.
            if not self.shadow:
                return engine.gate.refuse(401, "invalid_virtual_key", _UNKNOWN)
            shadowed = "invalid_virtual_key"
        elif key is None and self.require_key:
            # Nobody pays, and keys are required (SPEC §13: §5's checks): a caller could
            # otherwise leave its key out to be served free of its limits.
            if not self.shadow:
                return engine.gate.refuse(401, "virtual_key_required", self.key_required)
            shadowed = "virtual_key_required"
        host_provider = self.hosts.provider(request.url.host)
        # SPEC §4's headers of the call itself (an SDK's `default_headers` / `extra_headers`):
        # the provider a bare model names on a host that is no provider's, and tags.
        provider = host_provider
        if not _NAMED.isdisjoint(names):  # seldom sent: one pass in C
            named = headers_named(list(zip(names, map(_VALUE, raw), strict=True)))
            own = named.tags
            if named.unread_tags:  # past MAX_TAGS_READ: those with limits, as the caller's
                own += limited_of(named.unread_tags, engine.gate.resolve_target.limited_tags())
            tags = (*tags, *(t for t in own if t not in tags))
            if provider is None:  # the host's first
                provider = named.provider
        # The payer's key, when its value is known (`charge_to(virtual_key=...)`, the inbound
        # caller's): a model or provider holding it is `unknown` in the record (SPEC §8).
        credentials = Credentials(value, provider, tags, len(body), host_provider is not None)
        credentials.key_digest = by_id
        if host_provider in USAGE_CHECKED or (
            host_provider is None and path.startswith(AZURE_PATHS)
        ):
            version = request.url.params.get("api-version")
            credentials.usage_unasked = usage_unasked(host_provider, path, version, parsed)
            if host_provider == "azure" or host_provider is None:  # or Azure's path on a gateway
                credentials.model = deployment_named(path, parsed)
        return engine.gate.decide(body, path, credentials, key, started, shadowed, parsed)

    def settle_sync(self, exchange: Exchange, outcome: str) -> None:
        """A sync call settled: here (`Exchange.settle_locked`), else on the engine's loop."""
        if not exchange.settle_locked(outcome):
            on_loop(self.engine, lambda: exchange.settle(outcome))

    @staticmethod
    def outgoing(
        lib: ModuleType,
        request: Any,
        headers: _RawHeaders,
        names: list[bytes],
        exchange: Exchange,
        carried: _Redirect | None = None,
    ) -> Any:
        """The request to send (its raw `headers`, their `names` lowered): as it is, or with
        the body `gate.body_to_send` rewrote, and an `accept-encoding` narrowed to the codings
        whose answers can be read. `carried`: the redirect this request follows, whose body,
        rewritten, goes again as it went (httpx sends the client's again)."""
        new_body = body_to_send(exchange) if carried is None else carried.body
        if exchange.injected_usage:
            # The stream in clear: the usage chunk we asked for is taken out of it on its way
            # to the SDK, which a compressed stream would not let us do.
            accept: str | None = "identity"
        else:
            sent = _header(headers, names, b"accept-encoding")
            accept = None if sent is None or sent == _USUAL_ACCEPT else readable_accept(sent)
        if new_body is None and accept is None:
            return request
        if new_body is not None:
            # JSON as it is: its own length, and no content-encoding (the app's was for its body)
            headers = [(n, v) for n, v in headers if n.lower() not in _REWRITTEN]
        if accept is not None:
            headers = [(n, v) for n, v in headers if n.lower() != b"accept-encoding"]
            headers.append((b"accept-encoding", accept.encode("latin-1")))
        url = request.url
        if exchange.route_model is not None:
            url = _deployment_routed(url, exchange)
        rewritten = lib.Request(
            request.method,
            url,
            headers=headers,
            content=request.content if new_body is None else new_body,
            extensions=request.extensions,
        )
        # (the request it is sent for: a transport further in that sees it redirected notes
        # the redirect on the client's request, `_followed`)
        rewritten.extensions[_SENT_FOR] = request
        return rewritten

    def metered_response(
        self,
        library: _Library,
        request: Any,
        response: Any,
        exchange: Exchange,
        stream: type,
        sent: Any = None,
    ) -> Any:
        """The provider's answer as the SDK gets it: its headers as they came (less
        `x-budget-cost`, which is ours to read, and a `content-length` that a dropped usage
        chunk made stale) with `x-budget-route` and
        `x-budget-shadow-refusal` when they apply, the body measured as it passes (`stream`: the
        async or sync metered stream, as the library's own type: `_Library`). A redirect the
        client follows (`_followed`) passes unmetered, its call's admission kept for the request
        that follows it (`sent`: the request that was sent, its body as rewritten)."""
        redirect = response.status_code in _REDIRECTS
        origin = _followed(request, response, self.engine) if redirect else None
        if origin is not None:
            # Not the provider's answer to the call: its admission carries over to the request
            # that follows it (`_Redirect`), which the client makes at once.
            answer = self.redirected(library, request, origin, response, exchange, sent)
            if stream is library.async_stream:
                _watch_follow(answer.marks)
            else:
                _following[id(answer.marks)] = (threading.get_ident(), _greenlet(), answer.marks)
            return answer
        lib = library.module
        raw = response.headers.raw
        cost = exchange.read_start(response.status_code, raw)
        added = exchange.headers_added(limits=False)
        metered = stream(response, exchange, self)
        if cost or hasattr(response, "_content"):
            # Read already (a mock transport), or headers to leave out: a new response,
            # which the client reads through the metered stream.
            left_out = exchange.left_out
            headers = [h for h in raw if h[0].lower() not in left_out] if cost else raw
            return lib.Response(
                response.status_code,
                headers=headers + added,
                stream=metered,
                request=request,
                extensions=response.extensions,
            )
        # The transport's own response, unread (as a real transport's is): ours to finish.
        headers = response.headers
        for name, value in added:
            headers[name.decode()] = value.decode()
        response.stream = metered
        return response

    def redirected(
        self, lib: _Library, request: Any, origin: Any, response: Any, exchange: Exchange, sent: Any
    ) -> Any:
        """A redirect the client follows: the call's admission noted on the client's request
        (`origin`: `request` itself, or the one it was sent for by a transport further out),
        under this engine (the transports of two engines, one in the other, each carry their
        own), for the request that follows it; the redirect answered as a `_RedirectAnswer`,
        which settles the call at once should the client close it and not follow (a response
        hook raising on it)."""
        body = None if sent is None else sent.content  # (as rewritten: sent again)
        host = self.hosts.provider(request.url.host)
        redirect = _Redirect(exchange, body, response.status_code, self, host)
        marks = origin.extensions.get(_REDIRECTED)
        if type(marks) is not dict:
            marks = origin.extensions[_REDIRECTED] = {}
        marks[self.engine] = redirect
        if isinstance(response, _RedirectAnswer):  # a transport further in followed it too
            return response
        kind: Any = lib.redirect  # the library's `Response`, with `_RedirectAnswer`'s close
        answer = kind(
            response.status_code,
            headers=response.headers.raw,
            stream=response.stream,
            request=request,
            extensions=response.extensions,
        )
        answer.marks = marks
        return answer

    @staticmethod
    def refused(lib: ModuleType, request: Any, answer: ErrorAnswer) -> Any:
        return lib.Response(
            answer.status, headers=answer.headers, content=answer.body, request=request
        )


_RawHeaders = list[tuple[bytes, bytes]]


# SPEC §4's headers that name a provider and tags, which a call's own headers may carry (an
# SDK's `default_headers` or `extra_headers`).
_NAMED = frozenset((b"x-budget-provider", b"x-budget-tags"))


def _thread_messages(path: str) -> bool:
    """Whether `path` is OpenAI's (and Azure's) Assistants API `/threads/{id}/messages`: a POST
    there stores a message in a thread, generates nothing and is not billed, though its path
    ends with `/messages` (the runs that read it, `/threads/{id}/runs`, are not metered)."""
    segments = plain_path(path).split("/")
    return len(segments) >= 3 and segments[-3] == "threads" and segments[-1] == "messages"


def _outbound(admitted: Exchange | ErrorAnswer) -> Exchange | ErrorAnswer:
    """An admitted call marked as outbound (SPEC §13), its caller named."""
    if type(admitted) is ErrorAnswer:
        return admitted
    exchange: Exchange = admitted  # type: ignore[assignment]
    exchange.direction = "outbound"
    exchange.name_caller()
    return exchange


def _names(headers: _RawHeaders) -> list[bytes]:
    """The request headers' names, lowered once for the two that are read (`_header`): in C,
    as fast as a list comprehension and no bytecode a header."""
    return list(map(bytes.lower, map(_NAME, headers)))


_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)


def _header(headers: _RawHeaders, names: list[bytes], name: bytes) -> str | None:
    """A request header's value as `request.headers.get` gives it (several joined by ", "),
    read from its raw list (`names`: theirs lowered): `get` works out the headers' encoding
    first, a pass over them all, on every new request (two headers read so took ~350 bytecodes
    of httpx's a call). Read as latin-1: the codings it may name are ASCII, and any other text
    is read as unknown alike. Searched in C: a header that is not there (`content-encoding`,
    as a rule) or there once (`accept-encoding`) costs no pass in Python."""
    count = names.count(name)
    if count == 0:
        return None
    if count == 1:
        return headers[names.index(name)][1].decode("latin-1")
    values = [value for (_, value), lowered in zip(headers, names, strict=True) if lowered == name]
    return b", ".join(values).decode("latin-1")


@dataclass(frozen=True, slots=True)
class _Library:
    """`httpx` or `httpx2`, with the metered streams as its own byte-stream types (its
    responses check the type)."""

    module: ModuleType
    async_stream: type[_AsyncMetered]
    sync_stream: type[_SyncMetered]
    redirect: type[_RedirectAnswer]  # its `Response`, as a followed redirect's answer


_LIBRARIES: dict[type, _Library] = {}


def _library(request: Any) -> _Library:
    """The library of the client that sent `request`."""
    lib = _LIBRARIES.get(type(request))
    if lib is None:
        kind = type(request)
        module = sys.modules[kind.__module__.split(".", 1)[0]]
        lib = _LIBRARIES[kind] = _Library(
            module=module,
            async_stream=type("MeteredStream", (_AsyncMetered, module.AsyncByteStream), {}),
            sync_stream=type("MeteredStream", (_SyncMetered, module.SyncByteStream), {}),
            redirect=type("Response", (_RedirectAnswer, module.Response), {}),
        )
    return lib


# Failures of a call the provider never received whole: the connection was never made, or the
# request was never all written (a write that timed out or failed, a request httpx refused to
# send). The provider cannot answer a request it does not have: nothing to bill.
_NOT_SENT = (
    "ConnectError",
    "ConnectTimeout",
    "PoolTimeout",
    "UnsupportedProtocol",
    "ProxyError",
    "WriteTimeout",
    "WriteError",
    "LocalProtocolError",
)


# The steps of httpcore (the connection pool of httpx's and httpx2's own transports) before a
# request is all written: waiting for a connection from the pool, connecting (TCP, TLS, a SOCKS
# proxy's handshake), writing the request's headers and body (HTTP/1.1 and HTTP/2).
_UNSENT_STEPS = frozenset(
    {
        "wait_for_connection",
        "_connect",
        "_init_socks5_connection",
        "_send_connection_init",
        "_send_request_headers",
        "_send_request_body",
    }
)


def _sent(lib: ModuleType, exc: BaseException) -> bool:
    """Whether a call that failed before its answer's headers reached the provider: anything
    but a connection never made or a request never all written (a read timeout, a connection
    dropped, a wait for the answer cancelled). The provider may have answered it whole: it is
    charged the most it could cost."""
    if any(isinstance(exc, getattr(lib, name)) for name in _NOT_SENT if hasattr(lib, name)):
        return False
    return isinstance(exc, Exception) or not _stopped_unsent(exc)


def _stopped_unsent(exc: BaseException) -> bool:
    """Whether a call its caller stopped (cancelled: `asyncio.wait_for` around it, a task
    group's cancellation, Ctrl+C) was stopped in one of httpcore's steps before its request was
    all written (waiting for a pool's connection, as a rule, under load): read from where the
    stop struck, on this failure's path only. Stopped anywhere else, or in a transport of
    another kind, it may have reached the provider: sent."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in _UNSENT_STEPS and str(
            frame.f_globals.get("__name__", "")
        ).startswith("httpcore"):
            return True
        tb = tb.tb_next
    return False


def _closed_here(exc: BaseException | None) -> bool:
    """Whether a body's read failed because this process closed its connection (the app's
    client closed, and its pool with it, while the body was open: an `async with` client left,
    a shutdown): anyio's `ClosedResourceError` (async), a socket closed under a read, `EBADF`
    (sync), in the failure's causes. The caller's leaving, as its own close of the body is,
    not the provider's failure (an `upstream_error`, charged its most output when nothing had
    streamed yet)."""
    for _ in range(8):  # httpx's error, from httpcore's, from the socket's
        if exc is None:
            return False
        if type(exc).__name__ == "ClosedResourceError" or (
            isinstance(exc, OSError) and exc.errno == errno.EBADF
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _failed(exc: BaseException) -> str:
    """The outcome of a call that failed before its answer came: the upstream's failure (a
    timeout, a connection lost), or its caller's leaving (cancelled, interrupted), as a body's
    read is told apart (`_Metered`): a failure on a connection this process closed (the app's
    client closed as the call waited) is its caller's leaving too (`_closed_here`)."""
    if isinstance(exc, Exception) and not _closed_here(exc):
        return "upstream_error"
    return "client_disconnected"


def _outcome(exchange: Exchange, read_to_the_end: bool) -> str:
    """An SDK closes a stream once it has seen its last event (`[DONE]`, `message_stop`),
    without reading on: that stream is complete too."""
    stream = exchange.stream
    if read_to_the_end or (stream is not None and stream.completed):
        return "completed"
    return "client_disconnected"


# -- async -------------------------------------------------------------------------------------


class _Transport:
    """What both transports take: the transport to send through (default: the library's own),
    the settings or engine, and the hooks (SPEC §14)."""

    def __init__(
        self,
        transport: Any = None,
        settings: BudgetSettings | None = None,
        *,
        engine: BudgetEngine | None = None,
        on_alert: Hook | None = None,
        on_refusal: Hook | None = None,
        on_settled: Hook | None = None,
    ) -> None:
        self.transport = transport  # the one given, else each library's own, made on first use:
        self.own: dict[ModuleType, Any] = {}  # one transport may serve httpx and httpx2 clients
        hooks = {"on_alert": on_alert, "on_refusal": on_refusal, "on_settled": on_settled}
        self.meter = _Meter(settings, engine, hooks)
        self._lock = threading.Lock()  # threads share a sync client: one transport, one pool


class BudgetTransport(_Transport, httpx.AsyncBaseTransport):
    """An async transport for `httpx.AsyncClient` and `httpx2.AsyncClient` that meters the
    inference calls going through `transport` (default: the library's own)."""

    def _inner(self, lib: ModuleType) -> Any:
        if self.transport is not None:
            return self.transport
        own = self.own.get(lib)
        if own is None:
            own = self.own[lib] = lib.AsyncHTTPTransport()
        return own

    async def handle_async_request(self, request: Any) -> Any:
        lib = _library(request)
        inner = self._inner(lib.module)
        meter = self.meter
        path = meter.metered(request)
        carried = _carried(request, meter.engine) if _REDIRECTED in request.extensions else None
        if carried is not None and (request.method != "POST" or carried.elsewhere(request)):
            # Redirected to a GET (303): the answer. Or to another provider's host: a call of
            # that provider's, admitted (and billed) as its own. (A POST to another path is the
            # call, moved: metered as it, whatever the path.)
            exchange = carried.answered()
            await exchange.settle_anywhere("completed")
            carried = None
        if path is None:
            if carried is None:
                return await inner.handle_async_request(request)
            path = request.url.path  # a POST moved to another path: the call, carried on
        if request.extensions.get(METERED_BY) is meter.engine:
            return await inner.handle_async_request(request)  # metered further out
        headers = request.headers.raw
        names = _names(headers)
        if carried is not None:  # a redirect followed: admitted already, as one call
            exchange = carried.exchange
        else:
            body = meter.readable(headers, names, await request.aread())
            if isinstance(body, ErrorAnswer):
                return meter.refused(lib.module, request, body)
            try:
                loop = engine_loop(meter.engine)
            except RuntimeError:  # no asyncio loop runs here: trio's
                raise ConfigurationError(_NOT_ASYNCIO) from None
            if loop is None:  # the engine runs here, or starts here
                admitted = await meter.admit(request, path, body, headers, names)
            else:  # another thread's loop runs the engine: here, or there (`_admitted_elsewhere`)
                admitted = await _admitted_elsewhere(
                    meter, request, path, body, headers, names, loop
                )
            if type(admitted) is ErrorAnswer:
                return meter.refused(lib.module, request, admitted)
            exchange = admitted  # type: ignore[assignment]
        sent = None
        try:
            sent = meter.outgoing(lib.module, request, headers, names, exchange, carried)
            marks = sent.extensions  # metered here: a transport of this engine further in
            marks[METERED_BY] = meter.engine  # passes it on (`METERED_BY`), till it is sent
            try:
                response = await inner.handle_async_request(sent)
            finally:
                marks.pop(METERED_BY, None)  # a request sent again is metered again
        except BaseException as exc:
            # (a request its body could not be written for, `outgoing`, was never sent)
            exchange.sent_unanswered = sent is not None and _sent(lib.module, exc)
            await exchange.settle_anywhere(_failed(exc))
            raise
        return meter.metered_response(lib, request, response, exchange, lib.async_stream, sent)

    async def aclose(self) -> None:
        for transport in (self.transport, *self.own.values()):
            if transport is not None:
                await transport.aclose()


_NOT_ASYNCIO = (
    "BudgetTransport meters calls made under asyncio (or anyio on asyncio), not under trio: "
    "its engine runs on an asyncio event loop. Under trio, make the calls with a sync client "
    "through BudgetSyncTransport in a worker thread (trio.to_thread.run_sync)"
)


async def _admitted_elsewhere(
    meter: _Meter,
    request: Any,
    path: str,
    body: bytes,
    headers: _RawHeaders,
    names: list[bytes],
    loop: asyncio.AbstractEventLoop,
) -> Exchange | ErrorAnswer:
    """An async call's admission when another thread's loop runs the engine (a sync
    transport's or a WSGI app's background loop, a server's): here (`admit_here`), or on that
    loop (`portal.done_there`), where every admission and settlement is one step among its own.
    Run on a loop of its own (an async SDK called through `asyncio.run` from a Flask view), two
    admissions could interleave and pass one limit together."""
    chosen, inbound = payer.get(), inbound_headers.get()
    return await done_there(
        meter.engine,
        loop,
        lambda: _admit(meter, request, path, body, headers, names, chosen, inbound),
        lambda: meter.admit_here(request, path, body, headers, names),
        settle_unwanted,
    )


async def _admit(
    meter: _Meter,
    request: Any,
    path: str,
    body: bytes,
    headers: _RawHeaders,
    names: list[bytes],
    chosen: Payer | None,
    inbound: Any,
) -> Exchange | ErrorAnswer:
    """An admission on the engine's loop, for a call of another thread's."""
    payer.set(chosen)  # this task's context, on the engine's loop
    inbound_headers.set(inbound)
    return await meter.admit(request, path, body, headers, names)


# A redirect's answer (httpx's `has_redirect_location`): the client may follow it.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REDIRECTED = "budget_middleware.redirected"  # the request's mark: the redirect it follows


_SENT_FOR = "budget_middleware.sent_for"  # a rewritten request's mark: the one it is sent for


class _Redirect:
    """A metered call its provider answered with a redirect that its client follows (httpx's
    `follow_redirects`, on in the SDKs' own clients): not the provider's answer to bill, and
    not a second call. Its admission carries over to the request that follows (one request on
    every limit, one reservation, one settlement, with that request's answer); the mark rides
    on the request's `extensions` (under its engine), which httpx gives the request it follows
    with. Should the client not follow it after all (a response hook raising on it), settled
    as the redirect it was when the client closes it (`_RedirectAnswer`); should none come here
    otherwise (a request hook raising on it), when the async client's follow ends
    (`_watch_follow`), or before a sync call is next admitted (`_sweep_follows`); else (a
    client of another kind) when the requests are collected."""

    __slots__ = ("body", "exchange", "host", "meter", "status", "taken")

    def __init__(
        self, exchange: Exchange, body: bytes | None, status: int, meter: _Meter, host: str | None
    ) -> None:
        self.exchange = exchange
        self.body = body  # the body as it was sent (rewritten or not), None: not known
        self.status = status
        self.meter = meter
        self.host = host  # the provider of the host that redirected, if it is one's
        self.taken = False

    def answered(self) -> Exchange:
        """The call, answered by this redirect (followed with a GET, or nowhere): its answer
        costs nothing."""
        self.taken = True
        exchange = self.exchange
        exchange.read_start(self.status, ())
        return exchange

    def elsewhere(self, request: Any) -> bool:
        """Whether the request that follows goes to another provider's host: that provider
        answers, and bills, the call (its checks, its price, its budgets), a call of its own."""
        there = self.meter.hosts.provider(request.url.host)
        return there is not None and there != self.host and there != self.exchange.target.provider

    def given_up(self) -> None:
        """Settled in a sync client's thread, as answered by this redirect: the client stopped
        following it."""
        exchange, meter = self.answered(), self.meter
        if meter.engine.cannot_wait():  # (as `_SyncMetered._settle`)
            exchange.settle_dropped(self._left)
        else:
            meter.settle_sync(exchange, "completed")

    def _left(self) -> str | None:
        return None if self.exchange.settled else "completed"

    def __del__(self) -> None:
        if not self.taken:
            self.answered().settle_dropped(self._left)


class _RedirectAnswer:
    """A followed redirect's answer as the client gets it (the library's `Response`, `_Library`):
    closed by the client with no request to follow (httpx closes it as a response hook's
    exception, or its redirect URL's, goes through `_send_handling_redirects`), its calls are
    settled at once, as answered by it, their slots and reservations given back. They were held
    as long as the request was: the exception's (`HTTPStatusError.request`), kept by an app's
    log or `gather(return_exceptions=True)`, or a reference cycle until the collector ran. Closed
    by the client's read as it follows it, they carry over."""

    marks: dict[BudgetEngine, _Redirect]  # the calls it answers, by engine

    async def aclose(self) -> None:
        try:
            await super().aclose()  # type: ignore[misc]
        finally:
            if _abandoned(self):
                for redirect in _untaken(self.marks):
                    await redirect.answered().settle_anywhere("completed")

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]
        finally:
            if _abandoned(self):
                for redirect in _untaken(self.marks):
                    redirect.given_up()


def _watch_follow(marks: dict[BudgetEngine, _Redirect]) -> None:
    """An async client following a redirect: watched from its task's next pause, where the
    client's `_send_handling_redirects` is found awaiting (a request hook, the request that
    follows sent), or is gone. Should it end without the request that follows coming here (a
    request hook raising on it), the calls it carried are settled as answered by the redirect
    once its coroutine is freed, at once: they were held as long as the request was (the
    error's, kept by an app's log or `gather(return_exceptions=True)`). (A sync client's:
    `_sweep_follows`.)"""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().call_soon(_follow_watched, task, marks)


def _follow_watched(task: asyncio.Task[Any], marks: dict[BudgetEngine, _Redirect]) -> None:
    if all(redirect.taken for redirect in marks.values()):
        return  # followed, or given up already (`_RedirectAnswer`)
    step: Any = None if task.done() else task.get_coro()
    for _ in range(64):  # the task's coroutines, each awaiting the next
        frame = getattr(step, "cr_frame", None)
        if frame is not None and _follows(frame, marks):
            weakref.finalize(step, _given_up, marks)  # following it still
            return
        awaited = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
        if awaited is None:
            break
        step = awaited
    else:
        return
    if step is None or type(step).__name__ in _SEEN_TO_THE_END:
        _given_up(marks)  # the whole chain seen, and no client following it


# What a task's chain of awaits ends at when all of it was seen: a Future's wait (asyncio's
# `FutureIter`; the Python Future's `__await__`, a generator), a bare `yield` (a generator:
# `asyncio.sleep(0)`). Anything else does not show what it awaits in turn (an async
# generator's step; the `coroutine_wrapper` of an object whose `__await__` is a coroutine's,
# as the SDKs' paginators have): a client following a redirect may be behind it, so nothing is
# settled.
_SEEN_TO_THE_END = frozenset({"FutureIter", "generator", "coroutine"})


def _given_up(marks: dict[BudgetEngine, _Redirect]) -> None:
    """The redirects whose client stopped following them, settled as the calls' answers."""
    for redirect in _untaken(marks):
        redirect.answered().settle_dropped(redirect._left)


# The redirects sync clients are following, by the id of their marks: the thread (and
# greenlet) following them and the calls they carry (`_Redirect`), till the request that
# follows comes here (`_carried`). One thread may follow several, one inside the other (a
# request hook's call), or one in each of its greenlets.
_following: dict[int, tuple[int, Any, dict[BudgetEngine, _Redirect]]] = {}


def _greenlet() -> Any:
    """The greenlet running here when greenlets are in use (gevent's workers: several, each
    following its own redirect, take turns on one thread), else None."""
    greenlets = sys.modules.get("greenlet")
    return None if greenlets is None else greenlets.getcurrent()


def _top_frame(thread: int, greenlet: Any, stacks: dict[int, Any]) -> Any:
    """Where the thread (or greenlet) that follows a redirect is: its stack's top frame. A
    greenlet switched away from is at its own (`gr_frame`), not at its thread's, another
    greenlet's; under gevent its "thread" is the greenlet's id, which `stacks` has not."""
    if greenlet is not None:
        if greenlet is _greenlet():
            return sys._getframe()
        if greenlet.gr_frame is not None:
            return greenlet.gr_frame
    return stacks.get(thread)


def _sweep_follows() -> None:
    """Before a sync call is admitted: the redirects whose client's thread is no longer
    following them (no `_send_handling_redirects` of its stack has their request), the request
    that follows never having come here (a request hook raising on it), settled as the calls'
    answers. A sync client's follow can be watched from nowhere else: they were held as long
    as the client's request was (the error's, kept by an app's log; a reference cycle)."""
    stacks = sys._current_frames()
    for key, (thread, greenlet, marks) in list(_following.items()):
        frame = _top_frame(thread, greenlet, stacks)
        for _ in range(64):  # up the thread's stack
            if frame is None or _follows(frame, marks):
                break
            frame = frame.f_back
        if frame is not None:  # following them still (its request hooks run)
            continue
        if _following.pop(key, None) is None:
            continue  # followed meanwhile, or another thread's sweep settles them
        for redirect in _untaken(marks):
            redirect.given_up()


def _follows(frame: Any, marks: dict[BudgetEngine, _Redirect]) -> bool:
    """Whether `frame` is a client's `_send_handling_redirects` following the redirects `marks`
    notes: its request, before or after it is built anew, carries them."""
    if frame.f_code.co_name != "_send_handling_redirects":
        return False
    request = frame.f_locals.get("request")
    return request is not None and request.extensions.get(_REDIRECTED) is marks


def _untaken(marks: dict[BudgetEngine, _Redirect]) -> list[_Redirect]:
    """The redirects noted, not yet taken by the request that follows: taken out."""
    left = [redirect for redirect in marks.values() if not redirect.taken]
    marks.clear()
    return left


def _abandoned(response: Any) -> bool:
    """Whether `response`, a followed redirect's answer, is being closed by the client as an
    exception goes through its `_send_handling_redirects` (a response hook's, a redirect URL it
    refuses): the exception being handled passed through the frame that holds it. Its close as
    the client reads it to follow it handles none of its own."""
    exc = sys.exc_info()[1]
    if exc is None:
        return False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if (
            frame.f_code.co_name == "_send_handling_redirects"
            and frame.f_locals.get("response") is response
        ):
            return True
        tb = tb.tb_next
    return False


def _carried(request: Any, engine: BudgetEngine) -> _Redirect | None:
    """The redirect of this engine's metered call that `request` follows, taken once (another
    engine's is left to its transport)."""
    marks = request.extensions.get(_REDIRECTED)
    if type(marks) is not dict:
        return None
    carried = marks.pop(engine, None)
    if not marks:
        del request.extensions[_REDIRECTED]
        _following.pop(id(marks), None)
    if type(carried) is not _Redirect or carried.taken:
        return None
    carried.taken = True
    return carried


def _followed(request: Any, response: Any, engine: BudgetEngine) -> Any:
    """The client's request that `request` is (or was rewritten from, by a transport further
    out: `_SENT_FOR`) when that client follows the redirect `response` (httpx's and httpx2's
    `_send_handling_redirects`, found up the stack of the call: its `follow_redirects`, and a
    redirect within its `max_redirects`), else None. Not found (another client, another
    version): not followed, the redirect settled as the call's answer. Nor followed here when
    the client sends the request that follows through another transport (`_routed_alike`)."""
    if "location" not in response.headers:
        return None
    frame: Any = sys._getframe(2)
    for _ in range(16):
        if frame is None:
            return None
        if frame.f_code.co_name == "_send_handling_redirects" and str(
            frame.f_globals.get("__name__", "")
        ).startswith(("httpx.", "httpx2.")):
            seen = frame.f_locals
            client, history, origin = seen.get("self"), seen.get("history"), seen.get("request")
            if not (
                seen.get("follow_redirects") is True
                and isinstance(history, list)
                and len(history) < getattr(client, "max_redirects", 0)
            ):
                return None
            sent = request
            for _ in range(8):  # transports one in the other
                if sent is origin:
                    return origin if _routed_alike(client, origin, response, engine) else None
                sent = sent.extensions.get(_SENT_FOR)
                if sent is None:
                    return None
            return None
        frame = frame.f_back
    return None


def _routed_alike(client: Any, origin: Any, response: Any, engine: BudgetEngine) -> bool:
    """Whether `client` sends the request that follows the redirect `response` through the
    transport it sent `origin` through, or through another transport of `engine`'s (which takes
    the call's admission as its own: `_carried`). A client of `mounts=` may route the
    redirect's host through another, which never sees the call: its admission, carried over,
    was held as long as the client's request was (the final response's `request`, kept by the
    app). Its URL unreadable, the client raises as it builds that request
    (`_RedirectAnswer`)."""
    route = getattr(client, "_transport_for_url", None)
    moved = getattr(client, "_redirect_url", None)
    if route is None or moved is None:  # another version: as if routed alike
        return True
    try:
        there = route(moved(origin, response))
        if isinstance(there, _Transport) and there.meter.engine is engine:
            return True
        return there is route(origin.url)
    except Exception:
        return True


class _Metered:
    """The body on its way to the SDK, each chunk measured as it passes, settled once: when it
    ends or is closed (the async and sync streams below differ only in how they wait). An
    iterator of its own, not a generator: an async generator costs asyncio's bookkeeping of
    async generators (~50 bytecodes a call). Its state is set on each one, not left to class
    defaults: an attribute read through the instance from its class is ~2.4x slower."""

    def __init__(self, response: Any, exchange: Exchange, meter: _Meter) -> None:
        self.stream = response.stream  # the transport's: read through, closed through
        self.exchange = exchange
        self.meter = meter
        self.done = False  # its last chunk passed
        self.settled = False
        self.failed = False  # the provider's body failed midway (a read timeout, a cut)
        # Its read was stopped midway by the caller (a cancellation): the body's iterator is
        # gone, the rest cannot be read.
        self.cut = False
        self.chunks: Any = None  # the body's iterator, once the SDK began to read it
        # The loop it was answered on (an async body's, where its rest can be read once dropped)
        self.loop = _running_loop()

    def _to_drain(self) -> bool:
        """Closed before its end: a JSON answer (no stream) is read to its end here, from where
        the SDK stopped, for its usage. The provider made all of it before answering and bills
        it whole; a stream closed early ends there (the provider stops), and is charged an
        estimate."""
        exchange = self.exchange
        return (
            not self.done
            and not self.failed
            and not self.cut
            and exchange.stream is None
            and exchange.unreadable is None
            and exchange.status < 400
        )

    def _broke(self, exc: BaseException) -> None:
        """Its read stopped by `exc`, whoever read it (the SDK, or a close draining a JSON
        answer for its usage): the caller's leaving (cancelled, interrupted, its client closed
        under it: `_closed_here`), or the provider's failure (a read timeout, a cut), not the
        SDK's choice."""
        if isinstance(exc, Exception) and not _closed_here(exc):
            self.failed = True
        else:
            self.cut = True

    def _last(self) -> bytes:
        self.done = True
        return self.exchange.on_chunk(b"", False)

    def _settling(self) -> str | None:
        """The outcome to settle with, the first time only."""
        if self.settled:
            return None
        self.settled = True
        exchange = self.exchange
        if not self.done and self._to_drain():  # (read to its end, as a rule: no call)
            # A JSON answer dropped before its end whose rest was not read (at exit, or with
            # no loop to read it on): the provider made and bills all of it, charged its most,
            # as a read the caller cut is (it was charged its prompt's estimate alone).
            exchange.unreadable = "dropped before its end, unread"
        if self.cut and not self.done and exchange.stream is None and exchange.status < 400:
            # A JSON answer the caller stopped reading (cancelled): the provider made and
            # bills all of it, and the rest cannot be read for its usage: charged its most.
            exchange.unreadable = exchange.unreadable or "its read was cancelled midway"
        if self.failed:
            # Received, and its answer broke off: with nothing of it read (its headers alone),
            # as one whose headers never came (`Exchange.sent_unanswered`).
            exchange.sent_unanswered = True
            return "upstream_error"
        if exchange.status >= 400 and not self.cut:
            # The provider's error, closed unread: an SDK does so before it retries a streamed
            # call (429, 5xx). Whole as the provider gave it, as the same error read is.
            return "completed"
        return _outcome(exchange, self.done)

    def __del__(self) -> None:
        """A body the SDK dropped unread and unclosed (a stream it never iterated, a response
        abandoned with its client): settled on the engine's loop, as a disconnect; a JSON
        answer's rest read first, off the finalizer (`_read_on`)."""
        if not self.settled and not self._read_on():
            self.dropped()

    def dropped(self) -> None:
        """Settled as dropped: by its finalizer, or at exit (`_settle_open_at_exit`)."""
        self.exchange.settle_dropped(self._settling)

    def _read_on(self) -> bool:
        """Whether a JSON answer dropped before its end is read on, for its usage, as its close
        reads it (the provider made and bills all of it): on its loop (async), or in a thread
        of its own (sync), never in the finalizer, which may run anywhere. Kept for the next
        loop or the exit should that read never run: charged its most then (`_settling`)."""
        exchange = self.exchange
        engine = exchange.engine
        if not self._to_drain() or exchange.started < engine.forked_at:
            return False
        engine.settle_later(exchange, self._settling)
        try:
            self._read_elsewhere()
        except RuntimeError:  # its loop closed, no thread at the interpreter's end
            return False
        return True

    def _read_elsewhere(self) -> None:
        raise RuntimeError("no loop to read it on")


def _settle_open_at_exit() -> None:
    """At exit (before the engines write what is pending), the bodies still open: nothing will
    end them (a stream a daemon thread reads as the script ends, a response held unclosed). Each
    is settled as dropped: a stream cut, charged what it streamed, which was never charged.
    Found among the live objects then, at no cost to a call (as the WSGI middleware's answers
    its server's daemon threads leave are settled)."""
    for found in gc.get_objects():
        # By its type: `isinstance` would read `__class__`, which a proxy may answer by raising
        # (werkzeug's `LocalProxy` of `flask.request`, outside a request)
        if issubclass(type(found), _Metered) and not found.settled:
            found.dropped()


settle_before_exit(_settle_open_at_exit)


class _AsyncMetered(_Metered):
    def __aiter__(self) -> _AsyncMetered:
        # Once: httpx asks twice as it begins to read, and an SDK again as it drains the rest
        # (openai's `drain_response_async`); a body that can be read again (a mock's, a
        # cache's `ByteStream`) began anew each time, its text metered twice.
        if self.chunks is None:
            self.chunks = self.stream.__aiter__()  # raw, as it came (read already or not)
        return self

    async def __anext__(self) -> bytes:
        """The next chunk that is not empty (a usage chunk taken out leaves nothing)."""
        exchange = self.exchange
        chunks = self.chunks
        while not self.done:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                out = self._last()
                if out:
                    return out
                break
            except BaseException as exc:
                self._broke(exc)
                raise
            out = exchange.on_chunk(chunk, True)
            if out:
                return out
        outcome = self._settling()  # (`_settle`, with no coroutine of its own)
        if outcome is not None:
            await exchange.settle_anywhere(outcome)
        raise StopAsyncIteration

    async def aclose(self, within: float | None = None) -> None:
        """Closed (`within`: the seconds a dropped answer's rest is read for, `read_dropped`)."""
        try:
            if not self.done and self._to_drain():  # (read to its end, as a rule: no call)
                chunks = self.chunks or self.stream.__aiter__()
                try:
                    if within is None:
                        await self._drain(chunks)
                    else:  # (its `TimeoutError`: a read timeout's, charged so)
                        async with asyncio.timeout(within):
                            await self._drain(chunks)
                except BaseException as exc:
                    # Its rest unread: charged as a read of the SDK's stopped so (a cancel
                    # scope cancelled still as the SDK closes it, a read timeout), not as if
                    # nothing more were to come.
                    self._broke(exc)
                    if not isinstance(exc, Exception):
                        raise
            await self.stream.aclose()
        finally:
            if not self.settled:  # at its end already, as a rule: no coroutine made
                await self._settle()

    async def _drain(self, chunks: Any) -> None:
        async for chunk in chunks:
            self.exchange.on_chunk(chunk, True)
        self._last()

    async def _settle(self) -> None:
        outcome = self._settling()
        if outcome is not None:
            await self.exchange.settle_anywhere(outcome)

    def _read_elsewhere(self) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("no loop to read it on")
        loop.call_soon_threadsafe(_read_dropped, self)

    async def read_dropped(self) -> None:
        try:
            await self.aclose(READ_ON_SECONDS)
        finally:
            self.exchange.engine.taken(self.exchange)


_READING: set[asyncio.Task[None]] = set()  # dropped answers whose rest is being read
# How long a dropped answer's rest is read for, at most (whatever the client's read timeout,
# none included): a provider that stalls then would hold the call's slot and reservation for
# ever. Its rest not come by then, it is settled as a read that timed out: charged its most.
READ_ON_SECONDS = 60.0


def _read_dropped(body: _AsyncMetered) -> None:
    task = asyncio.get_running_loop().create_task(body.read_dropped())
    _READING.add(task)
    task.add_done_callback(_READING.discard)


# -- sync --------------------------------------------------------------------------------------


class BudgetSyncTransport(_Transport, httpx.BaseTransport):
    """The same for `httpx.Client` and `httpx2.Client`. Admission and settlement run on the
    engine's event loop (the app's, or a background one started on first use), or under the lock
    its every step holds (`_Meter.admit_here`), so they stay atomic with everything else the
    engine admits; the call itself runs in the caller's thread."""

    def _inner(self, lib: ModuleType) -> Any:
        if self.transport is not None:
            return self.transport
        own = self.own.get(lib)
        if own is None:
            with self._lock:  # threads share the client: one transport, one pool
                own = self.own.get(lib)
                if own is None:
                    own = self.own[lib] = lib.HTTPTransport()
        return own

    def handle_request(self, request: Any) -> Any:
        lib = _library(request)
        inner = self._inner(lib.module)
        meter = self.meter
        path = meter.metered(request)
        carried = _carried(request, meter.engine) if _REDIRECTED in request.extensions else None
        if carried is not None and (request.method != "POST" or carried.elsewhere(request)):
            # Redirected to a GET (303): the answer; or to another provider's host (async's)
            meter.settle_sync(carried.answered(), "completed")
            carried = None
        if path is None:
            if carried is None:
                return inner.handle_request(request)
            path = request.url.path  # a POST moved to another path: the call, carried on
        if request.extensions.get(METERED_BY) is meter.engine:
            return inner.handle_request(request)  # metered further out
        headers = request.headers.raw
        names = _names(headers)
        if carried is not None:  # a redirect followed: admitted already, as one call
            admitted: Exchange | ErrorAnswer | None = carried.exchange
        else:
            body = meter.readable(headers, names, request.read())
            if isinstance(body, ErrorAnswer):
                return meter.refused(lib.module, request, body)
            plain: bytes = body
            if _following:
                _sweep_follows()
            admitted = meter.admit_here(request, path, plain, headers, names)
        if admitted is None:  # the engine's loop admits
            chosen, inbound = payer.get(), inbound_headers.get()
            handoff = _Handoff()

            async def admit() -> Exchange | ErrorAnswer:
                payer.set(chosen)  # this thread's context, on the loop's task
                inbound_headers.set(inbound)
                return await handoff.taken(await meter.admit(request, path, plain, headers, names))

            try:
                admitted = on_loop(meter.engine, admit)
            except BaseException:
                handoff.leave(meter)
                raise
        if type(admitted) is ErrorAnswer:
            return meter.refused(lib.module, request, admitted)
        exchange: Exchange = admitted  # type: ignore[assignment]
        sent = None
        try:
            sent = meter.outgoing(lib.module, request, headers, names, exchange, carried)
            marks = sent.extensions  # as the async transport marks it
            marks[METERED_BY] = meter.engine
            try:
                response = inner.handle_request(sent)
            finally:
                marks.pop(METERED_BY, None)
        except BaseException as exc:
            exchange.sent_unanswered = sent is not None and _sent(lib.module, exc)
            meter.settle_sync(exchange, _failed(exc))
            raise
        return meter.metered_response(lib, request, response, exchange, lib.sync_stream, sent)

    def close(self) -> None:
        for transport in (self.transport, *self.own.values()):
            if transport is not None:
                transport.close()


class _Handoff:
    """A sync call's admission made on the engine's loop while its thread waits. Should the
    thread stop waiting (interrupted: Ctrl+C, a signal's timeout), the call is never sent: an
    admission that went through all the same is settled as a disconnect, at no cost, so its
    slot and reservation go back (as `portal.done_there` does for an async caller)."""

    __slots__ = ("admitted", "left", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.left = False  # the thread stopped waiting
        self.admitted: Exchange | ErrorAnswer | None = None  # handed to the thread

    async def taken(self, admitted: Exchange | ErrorAnswer) -> Exchange | ErrorAnswer:
        """On the loop: the admission handed over, or settled if its thread has left."""
        with self.lock:
            if not self.left:
                self.admitted = admitted
                return admitted
        if type(admitted) is Exchange:
            await admitted.settle("client_disconnected")
        return admitted

    def leave(self, meter: _Meter) -> None:
        """In the thread, stopping its wait: an admission handed over already is settled."""
        with self.lock:
            self.left = True
            admitted, self.admitted = self.admitted, None
        if type(admitted) is Exchange:
            meter.settle_sync(admitted, "client_disconnected")


class _SyncMetered(_Metered):
    def __iter__(self) -> _SyncMetered:
        if self.chunks is None:  # once, as `_AsyncMetered.__aiter__`
            self.chunks = iter(self.stream)
        return self

    def __next__(self) -> bytes:
        exchange = self.exchange
        chunks = self.chunks
        while not self.done:
            try:
                chunk = next(chunks)
            except StopIteration:
                out = self._last()
                if out:
                    return out
                break
            except BaseException as exc:
                self._broke(exc)
                raise
            out = exchange.on_chunk(chunk, True)
            if out:
                return out
        self._settle()
        raise StopIteration

    def close(self) -> None:
        try:
            if not self.done and self._to_drain():  # (read to its end, as a rule: no call)
                try:
                    self._drain()
                except BaseException as exc:
                    self._broke(exc)  # (as the async close)
                    if not isinstance(exc, Exception):
                        raise
            self.stream.close()
        finally:
            if not self.settled:  # at its end already, as a rule
                self._settle()

    def _drain(self) -> None:
        """Its rest read, each chunk measured (`close`, `read_dropped`)."""
        for chunk in self.chunks or iter(self.stream):
            self.exchange.on_chunk(chunk, True)
        self._last()

    def _settle(self) -> None:
        outcome = self._settling()
        if outcome is not None:
            meter = self.meter
            if meter.engine.cannot_wait():
                # Closed by code the engine's loop runs, or under its lock (a collector there,
                # finalizing an app's generator): waiting would block; settled on it next.
                self.exchange.settle_dropped(lambda: outcome)
                return
            meter.settle_sync(self.exchange, outcome)

    def _read_elsewhere(self) -> None:
        if sys.is_finalizing():
            # Collected as the interpreter ends (held by a module's global past the exit's
            # settlement): a thread started now never runs, and on Python 3.11 its `start()`
            # waits for it for ever, the process hung at its exit.
            raise RuntimeError("the interpreter is ending")
        threading.Thread(target=self.read_dropped, name="budget-read-dropped", daemon=True).start()

    def read_dropped(self) -> None:
        """Its rest read in a thread of its own, and settled on the engine's loop, as the
        overdue timer's settlement is (`settle_dropped`): one decides, whichever comes first. A
        blocking read cannot be stopped: one still waiting after `READ_ON_SECONDS` (a provider
        stalled, a client of no read timeout) is settled then, as a read timeout's."""
        overdue = threading.Timer(READ_ON_SECONDS, self.exchange.settle_dropped, (self._overdue,))
        overdue.daemon = True
        overdue.start()
        try:
            try:
                self._drain()
            except BaseException as exc:
                self._broke(exc)  # (as `close`)
            self.stream.close()
        finally:
            overdue.cancel()
            self.exchange.settle_dropped(self._settling)

    def _overdue(self) -> str | None:
        """On the engine's loop: a dropped answer whose rest did not come in time, settled as a
        read that timed out (its most), unless it came meanwhile (its reader settles it)."""
        if self.settled or self.done:
            return None
        self.failed = True
        return self._settling()
