"""The WSGI middleware: the second thin adapter over the engine's gate and `Exchange`.

    app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app)        # Flask
    application = BudgetWSGIMiddleware(get_wsgi_application())  # Django

Check who is calling (a request with no valid key is answered 401, its body unread), read the
request body once, ask the gate, pass the request on (the body replayed from memory),
pass the answer on chunk by chunk as the app yields it, measuring it, and settle the charge
exactly once: at its last chunk, or when the server closes it early (a client gone).

Threads: a WSGI server calls from many threads at once. With in-process counters, a request is
decided and admitted in the calling thread holding `portal.loop_lock`, which every step of the
engine's event loop (a background thread's) holds too: admission stays atomic, with no hop to
the loop. Only what must await (a key not cached yet, a stale configuration, Redis) goes to the
loop and is waited for.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING

from budget_middleware.answers import (
    ErrorAnswer,
    error_answer,
)
from budget_middleware.core.identity import (
    _NO_TAGS,
    API_KEY_HEADERS,
    METHOD_OVERRIDES,
    POST,
    Credentials,
    _split_tags,
    body_encoding,
    header_reader,
    header_text,
    is_inference_path,
    key_digest,
)
from budget_middleware.core.scopes import KeyConfig
from budget_middleware.core.usage import USUAL_ACCEPT, readable_accept
from budget_middleware.engine.cache import NOT_CACHED
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.engine.exchange import (
    COST_HEADER,
    METERED_BY,
    BudgetState,
    Exchange,
    count_of_bytes,
    metering,
)
from budget_middleware.engine.gate import body_to_send, parse_json
from budget_middleware.engine.hooks import Hook
from budget_middleware.engine.mounts import admin_mount, refuse_django_chain
from budget_middleware.engine.portal import (
    is_background,
    loop_lock,
    on_loop,
    settle_before_exit,
)
from budget_middleware.exceptions import ConfigurationError
from budget_middleware.headers import ADDED_TEXT, ADDED_TEXT_NAMES, replaced
from budget_middleware.outbound.payer import inbound_headers, noting
from budget_middleware.settings import BudgetSettings, raised_again

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import InputStream, StartResponse, WSGIApplication, WSGIEnvironment

    Write = Callable[[bytes], object]

logger = logging.getLogger("budget_middleware")

# Where the app finds who is calling (the WSGI twin of ASGI's `request.state.budget`):
# `request.environ["budget_middleware.state"]` (Flask), `request.META[...]` (Django).
STATE_KEY = "budget_middleware.state"

_UNKNOWN = "Unknown virtual key"
_STATUS_LINES: dict[int, str] = {}
# The response headers `Exchange.read_start` reads (the rest pass through as the app wrote them),
# with their names as it reads them.
_COST = COST_HEADER.decode()
_WATCHED = {name: name.encode() for name in ("content-type", "content-encoding", _COST)}
_USUAL_ACCEPT = USUAL_ACCEPT.decode()


def budget_state(environ: WSGIEnvironment | object) -> BudgetState | None:
    """Who is calling, as the middleware resolved it (None on a request it did not meter):
    from the WSGI environ (Flask's `request.environ`, Django's `request.META`), or from a
    request: Flask's, or Django's under either handler (under its ASGI handler,
    `BudgetMiddleware` around `get_asgi_application()`, the caller is in the scope's state,
    and `META` holds none of it)."""
    if type(environ) is dict:  # an environ, or Django's META: the usual case
        state: BudgetState | None = environ.get(STATE_KEY)
        return state
    scope = getattr(environ, "scope", None)  # an ASGI request: Django's, Starlette's
    if isinstance(scope, Mapping):
        held = scope.get("state")
        found = held.get("budget") if isinstance(held, Mapping) else None
        return found if isinstance(found, BudgetState) else None
    meta = getattr(environ, "META", None)  # Django's WSGI request
    if meta is None:
        meta = getattr(environ, "environ", None)  # werkzeug's (Flask's `request`)
    if isinstance(meta, Mapping):
        environ = meta
    if isinstance(environ, Mapping):
        state = environ.get(STATE_KEY)
        return state
    return None


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"{status} {phrase}"
    return line


def answer(start_response: StartResponse, reply: ErrorAnswer) -> list[bytes]:
    """An answer of the middleware's own (a refusal, a 413, a 503), as WSGI sends it."""
    start_response(status_line(reply.status), _as_text(reply.headers))
    return [reply.body]


def _as_text(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Headers as WSGI has them: the latin-1 text of their bytes (PEP 3333). A list
    comprehension: more bytecodes than decoding them in C through `map` and a
    `methodcaller`, but a third of the time (2.6 against 7.4 µs for an answer's 14 limit
    headers: the `methodcaller` makes a bound method for each one)."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def read_rest(stream: InputStream, length: int, body: bytes) -> bytes:
    """`body`, a first `read(length)` of a WSGI input that gave fewer bytes, with the rest up
    to `length`, fewer only where the input ends first: an input may give them in parts (a
    raw socket's: PEP 3333 lets `read(n)` return fewer than `n`)."""
    parts = [body]
    got = len(body)
    while got < length:
        part = stream.read(length - got)
        if not part:
            break
        parts.append(bytes(part))
        got += len(part)
    return b"".join(parts)


def _incomplete() -> ErrorAnswer:
    """The body ended before its Content-Length: the client is gone (ASGI's disconnect)."""
    return error_answer(400, "incomplete_body", "The request body ended before its Content-Length")


class _TooLarge(Exception):
    pass


def _environ_name(header: bytes) -> str:
    return "HTTP_" + header.decode("latin-1").upper().replace("-", "_")


_OVERRIDE_VARS = tuple(_environ_name(name) for name in METHOD_OVERRIDES)


def _says_post(environ: WSGIEnvironment) -> bool:
    """Whether a request asks for POST by a method override (`identity.says_post`)."""
    for name in _OVERRIDE_VARS:
        value = environ.get(name)
        if value and value.strip().upper() == "POST":
            return True
    return False


def _environ_text(value: str) -> str:
    """A name a header carries, from the environ: the latin-1 text of its bytes (PEP 3333),
    read as `header_text` reads the bytes; text beyond latin-1 as it is (Flask's and Django's
    test clients put a header's text in the environ as given)."""
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return value
    return header_text(raw)


def environ_bytes(value: str) -> bytes:
    """A header's bytes from the environ: the latin-1 of its text (PEP 3333); text beyond
    latin-1 (a test client's, as `_environ_text` reads it) as UTF-8, which `header_text` reads
    back as that text."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


class BudgetWSGIMiddleware:
    """Budgets and rate limits for every metered request of a WSGI app (SPEC §15)."""

    def __init__(
        self,
        app: WSGIApplication,
        settings: BudgetSettings | None = None,
        *,
        engine: BudgetEngine | None = None,
        on_alert: Hook | None = None,
        on_refusal: Hook | None = None,
        on_settled: Hook | None = None,
    ) -> None:
        refuse_django_chain(app, "BudgetWSGIMiddleware")
        self.app = app
        # No lifespan in WSGI: invalid settings fail here, where the server loads the app.
        self.engine = engine if engine is not None else get_engine(settings)
        self.engine.add_hooks(on_alert=on_alert, on_refusal=on_refusal, on_settled=on_settled)
        if not self.engine.started:  # no lifespan: the line is written as the engine starts
            self.engine.start_line = lambda: self.engine.describe(admin_mount(self.app))
        s = self.engine.settings
        self.suffixes = s.inference_paths
        self.read_headers = header_reader(s.key_header, s.key_prefix)
        self.max_body = s.max_body_bytes
        self.fail_open = s.fail_open
        self.require_key = s.require_virtual_key
        self.shadow = s.mode == "shadow"  # SPEC §14: nothing refused, what would be is said
        self.gate = self.engine.gate
        self.key_required = (
            "A virtual key is required: send it in the "
            f"'{s.key_header}' header or as 'Authorization: Bearer {s.key_prefix}…'"
        )
        # The headers the gate reads, by their environ names (the rest are never looked at).
        names = [
            s.key_header.lower().encode(),
            b"authorization",
            *API_KEY_HEADERS,
            b"x-budget-provider",
            b"x-budget-tags",
        ]
        self.wanted = tuple((name, _environ_name(name)) for name in dict.fromkeys(names))
        self.key_var = _environ_name(names[0])
        # `x-api-key`, `x-goog-api-key`, `api-key` (Azure OpenAI's SDK), as `header_reader` reads
        self.api_key_vars = tuple(_environ_name(name) for name in API_KEY_HEADERS)
        self.prefix = s.key_prefix

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        failure = self.engine.failure
        if failure is not None:  # a configuration error met at start-up: every request says so
            raise raised_again(failure)
        if noting.active:  # the transports are imported: who calls is noted, on any path
            headers = EnvironHeaders(environ, self.wanted)  # read if a call goes out
            token = inbound_headers.set(headers)
            try:
                answer = self._route(environ, start_response)
            finally:
                inbound_headers.reset(token)
            # A streamed answer (a generator) runs while the server iterates it: noted then too.
            # A list or tuple is made already, and a file the server's `wsgi.file_wrapper` reads
            # runs nothing of the app: those go as they are (a server sends its file wrapper by
            # `sendfile()`, and only it).
            if type(answer) is list or type(answer) is tuple:
                return answer
            wrapper = environ.get("wsgi.file_wrapper")
            if isinstance(wrapper, type) and isinstance(answer, wrapper):
                return answer
            return _Noted(answer, headers)
        path: str = environ.get("PATH_INFO", "")
        if is_inference_path(path, self.suffixes) and (
            environ["REQUEST_METHOD"] in POST or _says_post(environ)
        ):
            return self._metered(environ, start_response, path)
        return self.app(environ, start_response)

    def _route(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if is_inference_path(path, self.suffixes) and (
            environ["REQUEST_METHOD"] in POST or _says_post(environ)
        ):
            return self._metered(environ, start_response, path)
        return self.app(environ, start_response)

    def _credentials(self, environ: WSGIEnvironment) -> Credentials:
        """What `header_reader` finds in the same headers, read from the environ's text as is
        (environ values are the latin-1 text of the bytes sent, PEP 3333: encoding them to
        bytes and decoding them back gives the same text)."""
        get = environ.get
        key = None
        explicit = get(self.key_var)
        if explicit:
            key = explicit.strip() or None
        if key is None:  # none there, or blank: the other headers may hold it
            value = get("HTTP_AUTHORIZATION")
            if value is not None and value[:7].lower() == "bearer ":
                text = value[7:].strip()
                if text and text.startswith(self.prefix):
                    key = text
            if key is None:
                for name in self.api_key_vars:
                    value = get(name)
                    if value:
                        text = value.strip()
                        if text.startswith(self.prefix):
                            key = text
                            break
        provider = get("HTTP_X_BUDGET_PROVIDER")
        tags = get("HTTP_X_BUDGET_TAGS")
        encoding = get("HTTP_CONTENT_ENCODING")
        accept = get("HTTP_ACCEPT_ENCODING")
        length = get("CONTENT_LENGTH")
        size = None
        if length:
            if length.isdigit() and length.isascii():
                try:
                    size = int(length)
                except ValueError:  # past the 4,300 digits `int()` reads: over any limit
                    size = self.max_body + 1
            else:  # as `int()` reads the bytes (ASCII spaces only, no "²")
                try:
                    size = int(length.encode("latin-1"))
                except ValueError:
                    size = None
        read, unread = _split_tags(_environ_text(tags)) if tags else ((), _NO_TAGS)
        credentials = Credentials(
            key or None,
            (_environ_text(provider).strip() or None) if provider else None,
            read,
            size,
            False,
            None if encoding is None else body_encoding(encoding),
            None if accept is None or accept == _USUAL_ACCEPT else readable_accept(accept),
        )
        credentials.unread_tags = unread
        return credentials

    # -- metered requests ----------------------------------------------------------------

    def _metered(
        self, environ: WSGIEnvironment, start_response: StartResponse, path: str
    ) -> Iterable[bytes]:
        engine = self.engine
        if environ.get(METERED_BY) is engine or metering.get() is engine:
            return self.app(environ, start_response)  # metered further out: counted there
        started = perf_counter()
        credentials = self._credentials(environ)
        length = credentials.content_length
        if length is not None and length > self.max_body:
            return answer(start_response, self.gate.too_large())
        if engine.needs_start():
            try:
                on_loop(engine, engine.ensure_started)
            except ConfigurationError:
                raise  # final: the configuration is wrong, not the store away
            except Exception:
                if not self.fail_open:
                    return answer(start_response, self.gate.unavailable())
                engine.write_at_exit()  # admitted with no flusher: written, or kept, at exit
        if engine.stale:
            on_loop(engine, engine.ensure_current)
        # Who is calling first: a request with no valid key is answered before its body is
        # read (it could make this thread read and hold BUDGET_MAX_BODY_BYTES for a 401).
        background = is_background(engine.loop)  # loop_lock guards its work: no hop needed
        caller = self._caller(credentials, background)
        if type(caller) is ErrorAnswer:
            return answer(start_response, caller)
        key, shadowed = caller  # type: ignore[misc]
        stream = environ["wsgi.input"]
        if length is not None:  # (over BUDGET_MAX_BODY_BYTES: answered 413 above)
            body: bytes = stream.read(length) if length > 0 else b""
            if len(body) < length:
                body = read_rest(stream, length, body)
                if len(body) < length:  # the client went away mid-body: nothing counted
                    return answer(start_response, _incomplete())
        else:
            try:
                body = self._unsized_body(environ, stream)
            except _TooLarge:
                return answer(start_response, self.gate.too_large(key))
        plain = body  # as the gate reads it: decoded, when it was sent compressed
        if credentials.content_encoding is not None:
            decoded = self.gate.plain_body(body, credentials.content_encoding)
            if decoded is None:
                return answer(start_response, self.gate.too_large(key))
            plain = decoded
        direct = background and engine.memory is not None
        if direct:
            # In-process counters: decided and admitted in this thread, holding the loop's lock
            # for as little as it can (the body is parsed before it is taken).
            gate = self.gate
            parsed = parse_json(plain)
            with loop_lock:
                admitted = gate.decide(plain, path, credentials, key, started, shadowed, parsed)
                if type(admitted) is not ErrorAnswer:
                    admitted = gate.admit_now(admitted)  # type: ignore[arg-type]
        else:  # Redis, or an engine an ASGI app runs: its loop decides
            handoff = _Handoff()
            try:
                admitted = on_loop(
                    engine,
                    lambda: handoff.taken(
                        self.gate.decided_and_admitted(
                            plain, path, credentials, key, started, shadowed
                        )
                    ),
                )
            except BaseException:  # this thread stopped waiting: the app is never called
                handoff.leave()
                raise
        if type(admitted) is ErrorAnswer:
            return answer(start_response, admitted)
        exchange: Exchange = admitted  # type: ignore[assignment]
        environ[STATE_KEY] = exchange.name_caller()
        environ[METERED_BY] = engine
        response = MeteredResponse(exchange, start_response, direct)
        try:  # from admission on, whatever happens is settled (a body that cannot be rewritten)
            accept = credentials.accept_encoding
            if exchange.parsed is not None:  # a route's target, a stream asked for its usage
                new_body = body_to_send(exchange)
                if new_body is not None:  # JSON as it is: no content-encoding
                    body = new_body
                    environ.pop("HTTP_CONTENT_ENCODING", None)
                if exchange.injected_usage:  # the usage chunk we asked for is cut out in clear
                    accept = "identity"
            if accept is not None:  # answers in codings we cannot read are not asked for
                environ["HTTP_ACCEPT_ENCODING"] = accept
            environ["wsgi.input"] = io.BytesIO(body)  # read once here: the app reads it again
            environ["CONTENT_LENGTH"] = str(len(body))  # its length known: no longer chunked
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            response.iterable = self.app(environ, response.start_response)
        except BaseException as exc:
            response.raised(exc)
            response.settle(response.cut())
            raise
        return response

    def _unsized_body(self, environ: WSGIEnvironment, stream: InputStream) -> bytes:
        """A body sent with no Content-Length (chunked), read to its end (`_TooLarge` past
        BUDGET_MAX_BODY_BYTES)."""
        if not environ.get("wsgi.input_terminated"):
            return b""  # no length, and the server does not end the input: no body (PEP 3333)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = stream.read(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)

    def _caller(
        self, credentials: Credentials, background: bool
    ) -> tuple[KeyConfig | None, str | None] | ErrorAnswer:
        """Who is calling, from the headers alone: the key's configuration (None: no key, or
        one shadow mode serves as none) and the code shadow mode would refuse the credentials
        for; or the answer to give (401, or 503 when the store cannot vouch for the key)."""
        if credentials.key is not None:
            looked_up = self._key(credentials.key, background)
            if looked_up is None and "," in credentials.key:
                # Unknown: a header sent twice, maybe, which the server joined (`a,b`: PEP 3333
                # has one value a name). Its first value counts, as under ASGI (a key chosen
                # with a comma in it was found whole above).
                first = credentials.key.split(",", 1)[0].strip()
                if first:
                    credentials.key = first
                    looked_up = self._key(first, background)
            if type(looked_up) is ErrorAnswer:
                return looked_up
            if looked_up is not None:  # a key found: never refused here (the usual case)
                return looked_up, None  # type: ignore[return-value]
        refused = self._shadowed(credentials, None)  # no key, or one not found
        if type(refused) is ErrorAnswer:
            return refused
        return None, refused  # type: ignore[return-value]

    def _key(self, value: str, background: bool) -> KeyConfig | ErrorAnswer | None:
        """The key's configuration (None: unknown). On the `background` loop a cached key is
        read in this thread under `loop_lock` (the loop's every step holds it); any other key,
        or any key of an engine another loop runs, is read on the loop."""
        engine = self.engine
        if background:
            digest = key_digest(value)  # (hashed before the lock: under it, every thread waits)
            with loop_lock:
                found = engine.keys.get(digest)  # a cached key: no hop
            if found is not NOT_CACHED:
                return found
        return on_loop(engine, lambda: self._look_up(value))

    async def _look_up(self, value: str) -> KeyConfig | ErrorAnswer | None:
        try:
            return await self.engine.vouch_for(value, self.fail_open)
        except ServiceUnavailable:
            return self.gate.unavailable(self.fail_open)

    def _shadowed(
        self, credentials: Credentials, found: KeyConfig | None
    ) -> str | ErrorAnswer | None:
        """The answer to the credentials when they are refused (401); in shadow mode, the code
        they would be refused for (the request goes on without a key), else None."""
        refused: tuple[str, str] | None = None
        if credentials.key is not None:
            if found is None:
                refused = "invalid_virtual_key", _UNKNOWN
        elif self.require_key:
            refused = "virtual_key_required", self.key_required
        if refused is None:
            return None
        if self.shadow:
            return refused[0]
        return self.gate.refuse(401, *refused)


class EnvironHeaders:
    """The request headers the gate reads, as ASGI has them (bytes: environ values are the
    latin-1 text of the bytes sent, PEP 3333), read from the environ only when the app calls
    out through `BudgetSyncTransport` while serving it: noting a request costs one object."""

    __slots__ = ("environ", "wanted")

    def __init__(self, environ: WSGIEnvironment, wanted: tuple[tuple[bytes, str], ...]) -> None:
        self.environ = environ
        self.wanted = wanted

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        get = self.environ.get
        for name, var in self.wanted:
            value = get(var)
            if value:
                yield name, environ_bytes(value)
        length = get("CONTENT_LENGTH")
        if length:
            yield b"content-length", length.encode("latin-1")


class _Noted:
    """An answer iterated (and closed) with its request's caller noted, for the calls the app
    makes through `BudgetSyncTransport` from a generator (SPEC §13)."""

    __slots__ = ("answer", "headers", "next_")

    def __init__(self, answer: Iterable[bytes], headers: EnvironHeaders) -> None:
        self.answer = answer
        self.headers = headers
        self.next_: Callable[[], bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        token = inbound_headers.set(self.headers)
        try:
            if self.next_ is None:
                self.next_ = iter(self.answer).__next__
            return self.next_()
        finally:
            inbound_headers.reset(token)

    def close(self) -> None:
        close = getattr(self.answer, "close", None)
        if close is not None:
            token = inbound_headers.set(self.headers)
            try:
                close()
            finally:
                inbound_headers.reset(token)


class _Handoff:
    """A request's admission made on the engine's loop while its thread waits. Should the
    thread stop waiting (interrupted: a signal-based request timeout, Ctrl+C), the app is never
    called: an admission that went through all the same is settled as a disconnect, at no
    cost, so its slot and reservation go back (as `BudgetSyncTransport`'s handoff does)."""

    __slots__ = ("admitted", "left", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.left = False  # the thread stopped waiting
        self.admitted: Exchange | ErrorAnswer | None = None  # handed to the thread

    async def taken(self, admission: Awaitable[Exchange | ErrorAnswer]) -> Exchange | ErrorAnswer:
        """On the loop: the admission handed over, or settled if its thread has left."""
        admitted = await admission
        with self.lock:
            if not self.left:
                self.admitted = admitted
                return admitted
        if type(admitted) is Exchange:
            admitted.name_caller()  # the usage record's owner
            await admitted.settle("client_disconnected")
        return admitted

    def leave(self) -> None:
        """In the thread, stopping its wait: an admission handed over already is settled on
        the loop (this thread, interrupted, does not wait for it)."""
        with self.lock:
            self.left = True
            admitted, self.admitted = self.admitted, None
        if type(admitted) is Exchange:
            admitted.name_caller()
            admitted.settle_dropped(functools.partial(_Once().take, "client_disconnected"))


class _Once:
    """Whether an answer is settled: its own object, so that a dropped answer's settlement
    (`MeteredResponse.__del__`) holds this and not the answer."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def take(self, outcome: str) -> str | None:
        """`outcome` the first time (on the engine's loop: `loop_lock` held), then None."""
        if self.done:
            return None
        self.done = True
        return outcome


# The answers not settled yet, by id (weakly: an answer dropped unclosed is settled as it goes).
_open: dict[int, weakref.ref[MeteredResponse]] = {}
os.register_at_fork(after_in_child=_open.clear)  # the parent's answers are the parent's


def _settle_open() -> None:
    """At exit: the answers a server's daemon threads still serve (waitress past its 5 s of
    grace, `flask run`, `runserver`) will never end; each is settled now as cut there, charged
    what it streamed, before the engines write what is pending. One of which nothing was sent
    yet (the app still in its provider call) made that call: charged its most output, as ASGI
    charges a request its server cuts before its answer."""
    for ref in list(_open.values()):
        response = ref()
        if response is not None and not response.once.done:
            response.exchange.left_unanswered = not response.wrote
            response.settle(response.cut())


settle_before_exit(_settle_open)


def _with_added(exchange: Exchange, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The app's headers with ours (as `_as_text`, our names' text looked up)."""
    added = [(ADDED_TEXT[n], v.decode("latin-1")) for n, v in exchange.headers_added()]
    return [*replaced(headers, added, ADDED_TEXT_NAMES, str.lower), *added]


class MeteredResponse:
    """The app's answer on its way to the server: headers completed at `start_response`, each
    chunk measured as it passes (never held back), settled exactly once, at the last chunk or
    at `close()`, whichever comes first."""

    iterable: Iterable[bytes] = ()  # the app's answer, once it has given it
    next_: Callable[[], bytes] | None = None  # its iterator's, once iterated
    write_: Write | None = None  # the server's `write()`, once the headers are given
    done = False  # its last chunk passed
    failed = False  # the app raised
    wrote = False  # the app gave bytes of its answer: sent (the headers with them), or held
    length: int | None = None  # the app's Content-Length: where the client knows its answer ends
    given = 0  # the bytes of its answer the app has given

    def __init__(self, exchange: Exchange, start_response: StartResponse, direct: bool) -> None:
        self.exchange = exchange
        self.start = start_response
        self.direct = direct  # settled in this thread under `loop_lock` (else on the loop)
        self.once = _Once()  # settled: shared with a dropped answer's settlement (`__del__`)
        _open[id(self)] = weakref.ref(self)  # settled at exit if still open then

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Write:
        exchange = self.exchange
        if exchange.response_started:
            return self._restarted(status, headers, exc_info)
        # The exchange reads three headers (as bytes); the app's go on as the app wrote them.
        if type(headers) is not list:
            headers = list(headers)
        watched = []
        self.length = None
        for header in headers:
            name = header[0].lower()
            if name in _WATCHED:
                watched.append((_WATCHED[name], header[1].encode("latin-1")))
            elif name == "content-length":
                # Where it bounds what is read: not 0 (an answer without a body has nothing to
                # settle early, and one with bytes all the same, a broken app's, is read on to
                # its end: nothing up to its length says what it cost).
                self.length = count_of_bytes(header[1]) or None
        cost = exchange.read_start(int(status[:3]), watched)
        if cost:  # headers the client must not get (`x-budget-cost`, a stale content-length)
            left_out = [name.decode("latin-1") for name in exchange.left_out]
            headers = [h for h in headers if h[0].lower() not in left_out]
            if "content-length" in left_out:  # the server sends it all, and ends it itself
                self.length = None
        self.write_ = self.start(status, _with_added(exchange, headers), exc_info)
        return self.write

    def _restarted(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None
    ) -> Write:
        """PEP 3333's error pattern: a new status (`start_response("500", ..., exc_info)` after
        a 200). The server takes it while no header is sent (before the body's first byte,
        whatever the app's iteration did: a generator app runs inside the first `next()`),
        and re-raises after: the answer measured is the one the server sends. A server that
        refuses it (sent already, or called again without exc_info: an AssertionError) leaves
        the answer measured as it was. One the app had given bytes of (held back: an SSE
        event's start, which sends nothing) had its provider's answer begun: the server takes
        the new status, and the answer measured stays the one cut, settled now as an upstream
        error (as it is where the server refuses the new status, and under ASGI)."""
        exchange = self.exchange
        if self.wrote:
            self.write_ = self.start(status, _with_added(exchange, list(headers)), exc_info)
            self.failed = self.done = True  # what follows is the new answer's: not measured
            self.settle(self.cut())
            return self.write
        kept = (exchange.status, exchange.stream, exchange.decoder, exchange.unreadable,
                exchange.header_cost, exchange.left_out)  # fmt: skip
        exchange.stream = exchange.decoder = exchange.unreadable = None
        exchange.header_cost = None
        exchange.response_started = False  # read anew by `start_response` (`read_start`)
        try:
            return self.start_response(status, headers, exc_info)
        except BaseException:
            (exchange.status, exchange.stream, exchange.decoder, exchange.unreadable,
             exchange.header_cost, exchange.left_out) = kept  # fmt: skip
            exchange.response_started = True
            raise

    def write(self, data: bytes) -> None:
        """The legacy `write()` of `start_response`, metered as a chunk."""
        assert self.write_ is not None
        out = self._measured(data)
        if out:
            try:
                self.write_(out)
            except Exception:  # the server could not send it: the client is gone (waitress's
                self.exchange.client_gone = True  # `ClientDisconnected`, a `BrokenPipeError`)
                raise

    def _measured(self, chunk: bytes) -> bytes:
        """What goes to the server of the app's `chunk` (from its iterable or `write()`),
        measured. Only bytes begin the answer (PEP 3333: an empty chunk sends nothing; the
        server can answer a failure before them with its 500, which costs nothing). So do bytes
        the exchange holds back (an SSE event's start, until its end, where it cuts out the
        usage chunk it asked for): the provider's answer had begun, and a cut is charged as a
        cut stream, as it is when the client asked for that chunk and the same bytes went on
        (SPEC §7)."""
        if self.done:  # past its Content-Length: no byte of the answer (the server sends none)
            return chunk
        if chunk:
            self.wrote = True
        length = self.length
        if length is None:
            out = self.exchange.on_chunk(chunk, True)
            stream = self.exchange.stream
            if stream is not None and stream.done:
                # `[DONE]`: the client has its answer once the server sends this (the OpenAI
                # SDK stops reading there, and may call again at once), as at the last byte of
                # a Content-Length below. Settled now, so that its slot is free then.
                return out + self._end()
            return out
        given = self.given + len(chunk)
        if given != length:
            if given < length:
                self.given = given
                return self.exchange.on_chunk(chunk, True)
            # Across its length (an app's bug): what the length holds is the answer.
            return self._across(chunk, given - length)
        # Its last byte: the client has its answer once the server sends this, and may call
        # again at once (on another connection, another thread), before the server asks for
        # the next chunk. Settled now, so that its slot is free then.
        out = self.exchange.on_chunk(chunk, True)
        if self.exchange.whole():
            return out + self._end()
        # Cut short there (an app that says too few bytes, its usage in what follows): read on
        # to its end.
        self.length = None
        return out

    def _across(self, chunk: bytes, over: int) -> bytes:
        """A chunk that goes `over` bytes past the answer's Content-Length (an app that writes
        more than it said): measured up to the length, and judged there as a chunk ending at
        it is (whole: settled, the bytes past it not read; cut short: read on), so that the
        charge does not depend on how the app chunked its bytes. The server gets the chunk
        whole, as the app wrote it: what it does with the bytes past the length is its rule
        (gunicorn and waitress drop them, werkzeug's and wsgiref's servers send them)."""
        exchange = self.exchange
        cut = len(chunk) - over
        head = chunk[:cut]
        out = exchange.on_chunk(head, True)
        if exchange.whole():
            last = self._end()
            if out is head and not last:
                return chunk
            return out + last + chunk[cut:]
        self.length = None
        return out + exchange.on_chunk(chunk[cut:], True)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            next_ = self.next_
            if next_ is None:  # an app's answer that is no iterable fails here, as the app
                next_ = self.next_ = iter(self.iterable).__next__
            chunk = next_()
        except StopIteration:
            if self.done:
                raise
            last = self._end()
            if last:
                return last
            raise
        except BaseException as exc:
            self.raised(exc)
            raise
        return self._measured(chunk)

    def _end(self) -> bytes:
        """The answer's end: settled, and what the exchange held back of it returned."""
        self.done = True
        exchange = self.exchange
        last = exchange.on_chunk(b"", False)
        # Ended after a `write()` the server could not send (the app stopped for it and
        # returned): its client was gone, as under ASGI.
        self.settle("client_disconnected" if exchange.client_gone else "completed")
        return last

    def raised(self, exc: BaseException) -> None:
        """The app raised `exc`: its own failure (nothing sent, the server answers 500, and an
        error costs nothing), or the server stopping it with no Exception of the app's
        (gunicorn's sync worker past `--timeout` raises SystemExit in it, Ctrl+C
        KeyboardInterrupt): a call that was made, settled as ASGI's cut by its server, a
        disconnect charged its most output when nothing of its answer was sent."""
        self.failed = True  # (not read to its end at `close()`, either way)
        exchange = self.exchange
        if isinstance(exc, Exception):
            if not self.wrote:
                exchange.status = 500
        else:
            exchange.client_gone = True
            exchange.left_unanswered = not self.wrote

    def close(self) -> None:
        """Called by the server once the answer is sent, or given up (a client gone). A JSON
        answer given up before its end is read to its end here, for its usage (an app that
        passes a provider's answer on in pieces): the provider made all of it and bills it
        whole. A stream ends where it was given up (the provider stops); it is estimated."""
        try:
            if not self.once.done and self._to_drain():
                with contextlib.suppress(Exception):  # what it could read is charged
                    next_ = self.next_ or iter(self.iterable).__next__
                    while True:
                        try:
                            chunk = next_()
                        except StopIteration:
                            self.exchange.on_chunk(b"", False)
                            break
                        self.exchange.on_chunk(chunk, True)
            close = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        finally:
            if not self.once.done:  # settled at the last chunk (the usual case): no lock taken
                self.settle(self.cut())

    def cut(self) -> str:
        """The outcome of an answer that did not reach its end: the app's failure, unless the
        client was gone first (a `write()` the server could not send: the app raised it)."""
        if self.failed and not self.exchange.client_gone:
            return "upstream_error"
        return "client_disconnected"

    def _to_drain(self) -> bool:
        exchange = self.exchange
        return (
            not self.done
            and not self.failed
            and exchange.response_started
            and exchange.stream is None
            and exchange.unreadable is None
            and exchange.status < 400
        )

    def __del__(self) -> None:
        """An answer dropped without `close()` (a server that does not call it): settled on
        the engine's loop, as a disconnect (its callbacks hold `loop_lock`). No lock is taken
        here: the collector may run anywhere. What the loop is handed holds nothing of this
        answer, so the app's iterable goes now, in this thread: its `finally:` and `with`
        exits (a provider stream it held) never run on the engine's loop."""
        _open.pop(id(self), None)
        if not self.once.done:
            self.exchange.settle_dropped(functools.partial(self.once.take, self.cut()))

    def settle(self, outcome: str) -> None:
        """Exactly once, whichever thread gets here first (the flag is tested under the lock
        that settles in process: one acquisition)."""
        try:
            once = self.once
            exchange = self.exchange
            if self.direct:
                record = exchange.charge(outcome)  # worked out before the lock is taken
                with loop_lock:
                    if once.done:
                        return
                    once.done = True
                    exchange.book(record)
                return
            with loop_lock:
                if once.done:
                    return
                once.done = True
            on_loop(exchange.engine, lambda: exchange.settle(outcome))
        except Exception:  # the answer is gone already: log, never raise into the server
            logger.exception("budget-middleware could not settle a request")
