"""One metered exchange, whatever adapter it came by: pass the response on untouched, measure it,
settle it exactly once. Every adapter hands the answer's start to `read_start` and each chunk to
`on_chunk`; the ASGI middleware's `forward` does so from its messages."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Awaitable, Callable, Generator, Iterable, MutableMapping
from contextvars import ContextVar
from dataclasses import replace
from operator import itemgetter
from time import perf_counter
from typing import TYPE_CHECKING, Any, AnyStr, NamedTuple

import anyio

from budget_middleware.core.admission import Ticket
from budget_middleware.core.identity import Target
from budget_middleware.core.money import MAX_CHARGE_NANOS, charge_nanos
from budget_middleware.core.pricing import (
    ModelPrice,
    asked_prices,
    cost_nanos,
    draws,
    estimate_nanos,
    for_service_tier,
)
from budget_middleware.core.records import UsageRecord
from budget_middleware.core.scopes import KeyConfig, LimitSet
from budget_middleware.core.sse import StreamMeter
from budget_middleware.core.usage import (
    IMAGE_TOOL,
    JSON_ERRORS,
    BodyDecoder,
    TokenUsage,
    add_tool_images,
    answered_chars,
    begins_json,
    images_answered,
    json_loads,
    json_searches,
    json_tool_images,
    spoken_chars,
    usage_from_head,
    usage_from_json,
    wide_codec,
    without_results,
)
from budget_middleware.engine.portal import done_there, engine_loop, is_background, loop_lock
from budget_middleware.headers import (
    ADDED_NAMES,
    ROUTE_HEADER,
    SHADOW_HEADER,
    add_limit_headers,
    replaced,
    tightest_now,
)

if TYPE_CHECKING:
    from budget_middleware.engine.engine import BudgetEngine

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_TAIL = 1 << 20  # of a huge JSON answer keep the last MiB: usage sits at the end
_JSON_KEPT = 2 * _JSON_TAIL  # ... once it holds more than twice that
_JSON_HEAD = 1 << 16  # and its first 64 KiB: some write their usage first
_INFLATE_SLICE = 1 << 12  # a compressed answer is decoded 4 KiB at a time: ~4 MiB at most
_FILE_CHUNK = 1 << 20  # an answer sent as a file (`read_file`) is read a MiB at a time
COST_HEADER = b"x-budget-cost"  # the app's or upstream's cost: read, never passed on
# What an adapter leaves out of an answer whose stream loses the usage chunk we asked for: its
# `content-length` no longer fits the body.
_COST_AND_LENGTH = (COST_HEADER, b"content-length")
# ... and of one that comes compressed all the same: passed on decoded (`read_start`).
_COST_LENGTH_AND_CODING = (*_COST_AND_LENGTH, b"content-encoding")
_READ_HEADERS = frozenset({b"content-type", b"content-encoding", COST_HEADER})  # `read_start`

# What one request is counted, whatever an upstream reports: the store's token columns are
# 32-bit. (Its charge is capped by `money.charge_nanos`.)
MAX_TOKENS = 2**31 - 1
_MAX_NOTE = 200  # the store's `note` column
_NAME = itemgetter(0)  # a header's name

logger = logging.getLogger("budget_middleware")
# The mark an adapter leaves in a request it meters (the ASGI scope, the WSGI environ, an
# outbound call's extensions): the engine. A middleware of the same engine further in (added to
# a mounted sub-app as well as to the top app), or a transport (one `BudgetTransport` wrapping
# another), passes the request on: counted and charged once, by the outer one.
METERED_BY = "budget_middleware.engine"
# The same, for a request an ASGI middleware passes on to a WSGI app it mounts (Starlette's
# `WSGIMiddleware`, which builds the environ afresh: the scope's mark is not in it): the engine
# metering the request being served in this context, else None.
metering: ContextVar[object] = ContextVar("budget_middleware.metering", default=None)
_DROPPED: set[asyncio.Task[None]] = set()  # settlements of dropped answers, until they end


def count_of_bytes(value: AnyStr) -> int | None:
    """A Content-Length's value as a count of bytes, or None where it is none (RFC 9110 8.6:
    ASCII digits; 20 or more of them, past any 64-bit count, are none either)."""
    value = value.strip()
    return int(value) if value.isdigit() and value.isascii() and len(value) < 20 else None


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """An answer's Content-Length, where it bounds the answer a server sends: None with none,
    with one that is no count of bytes, with two that differ (h11 refuses them), or beside a
    `Transfer-Encoding` (uvicorn then sends all of it, chunked)."""
    found: int | None = None
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            length = count_of_bytes(value)
            if length is None or (found is not None and length != found):
                return None
            found = length
        elif name == b"transfer-encoding":
            return None
    return found


def _json_type(media: bytes) -> bool:
    """Whether a (lowercased) media type is JSON: `application/json`, `application/*+json`,
    with or without parameters."""
    essence = media.split(b";", 1)[0].rstrip()
    return essence == b"application/json" or essence.endswith(b"+json")


class _StreamToItsLength(StreamMeter):
    """An event stream that says its Content-Length, read as the WSGI adapter reads any answer
    (`MeteredResponse._across`): up to its length, and judged there. Ended there (`completed`),
    the bytes past it are not read: no server sends them (gunicorn and waitress drop them,
    uvicorn refuses the message that crosses the length, raising in the app), and what the
    stream reported up to its end is charged, however the app chunked it. Not ended there (an
    app that says too few bytes, its usage in what follows): read on to its end."""

    __slots__ = ("given", "length")

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length: int | None = length  # None once judged at it
        self.given = 0  # bytes fed (the server's to send, or to refuse past the length)

    def feed(self, chunk: bytes) -> bytes:
        given = self.given = self.given + len(chunk)
        length = self.length
        if length is None or given < length:
            return super().feed(chunk)
        self.length = None
        cut = len(chunk) - (given - length)
        super().feed(chunk[:cut] if cut < len(chunk) else chunk)
        if self.completed:
            self.finish()  # its last event read as the answer's end reads it; none after it
        elif cut < len(chunk):
            super().feed(chunk[cut:])
        return chunk  # (not dropping a usage chunk: passed on as it came)


class BudgetState(NamedTuple):
    """Who is calling, for the host app to route on (read-only): `request.state.budget`."""

    virtual_key_id: str | None
    team_id: str | None
    customer_id: str | None
    provider: str
    model: str
    tags: tuple[str, ...]


class Exchange:
    """One admitted request on its way through the app: replays the body once, passes the response
    on without holding a chunk back (never a second start), measures it, and settles exactly once.

    One object with bound methods for `receive`/`send`: no closures, nothing allocated per
    request that could be shared.
    """

    # No __slots__: the state every request starts with is a class attribute, so a new exchange
    # sets only what differs (Python 3.11 keeps such instance attributes inline, as fast).
    ticket: Ticket | None = None
    caller: BudgetState  # who is calling: `request.state.budget`, set once admitted
    ticket_estimate = 0  # nano-dollars to reserve on every budget
    parsed: dict[str, Any] | None = None  # the request, while its body may be rewritten
    orjson_writes = True  # `parsed` written back by orjson (`gate.for_rewrite` says)
    ask_usage = False  # an OpenAI-style stream: asked for its usage (`gate.body_to_send`)
    injected_usage = False
    # An outbound call the provider received and never answered (a read timeout, a dropped
    # connection), or whose answer broke off after its headers: as `left_unanswered`, with
    # nothing of its answer read, the most it could have cost is charged, estimated (a provider
    # finishes, and bills, a call its client gave up on).
    sent_unanswered = False
    # An inbound request whose client left before the app answered, and which the app then ended
    # with no answer (Django's ASGI handler cancels the view): the call was made, its answer is
    # never seen. The most it could have cost is charged, as its reservation counted it.
    left_unanswered = False
    body_sent = False  # a byte of the answer's body was passed to the server (ASGI)
    # Its whole Content-Length was, and a message past it refused (`_past_its_length`): the
    # app that fails so (uvicorn raises in it) has served its answer.
    served_whole = False
    route_target: str | None = None  # the route's target admitted (SPEC §12): x-budget-route
    # The `model` the body gets for it: the target as written, or, on a call to a provider's
    # host, the model as that host names it (`identity.provider_and_model`).
    route_model: str | None = None
    body = b""
    receive_: Receive
    send_: Send
    replayed = False
    status = 0
    response_started = False
    response_complete = False
    header_cost: int | None = None
    stream: StreamMeter | None = None
    sniffing = False  # an answer read as a stream until its first bytes say JSON
    sniffed = b""  # ... its first bytes, while too few to say so (`_measure`)
    json_parts: list[bytes] | None = None
    json_size = 0
    json_dropped = 0  # bytes of a huge JSON answer left out before its kept tail
    json_head = b""  # ... and its first bytes, kept (`_JSON_HEAD`)
    json_cut = 0  # bytes of a huge JSON answer's images left out (`without_results`)
    # A huge JSON answer in UTF-16 or UTF-32: kept as the UTF-8 of its text (`_keep_the_tail`)
    json_text: codecs.IncrementalDecoder | None = None
    json_read: tuple[bytes, TokenUsage] | None = None  # the usage `whole` read, and of what
    # The answer's headers as passed on (ASGI: `forward`), for its Content-Length, read only
    # should its JSON not parse (`_within_length`).
    sent_headers: list[tuple[bytes, bytes]] | None = None
    decoder: BodyDecoder | None = None  # for a compressed answer, measured on the side
    passed_decoded = False  # a compressed stream passed on decoded, less our usage chunk
    unreadable: str | None = None
    client_gone = False
    settled = False  # charged (`charge`): the ASGI adapter settles at the answer's end
    # Served on a loop other than its engine's (two servers' loops in one process): settled
    # there (`settle_anywhere`), as it was admitted there.
    elsewhere = False
    estimated = False
    direction = "inbound"  # "outbound" for the transport's calls (SPEC §13)
    would_refuse: str | None = None  # shadow mode: the code that would have refused it (§14)
    media_references = 0  # media sent by reference (image URLs, file ids): `gate._with_media`
    server_tools = False  # tools its provider runs (web search): `gate._with_tools`
    # Its answer may say tool calls billed apart (a Responses `output`'s searches): it asked
    # for tools its provider runs, or named a stored prompt, which may (`gate._with_tools`)
    tool_calls = False
    # The image generation tool it offers: its images' model and price (`gate._with_tools`)
    image_tool = IMAGE_TOOL
    drew = False  # ... and its answer's images drawn by it were charged (`gate.saw_tools`)
    reported_over = 0  # a reported cost over its tokens' price (nano-dollars): `gate.saw_fee`
    left_out: tuple[bytes, ...] = (COST_HEADER,)  # headers the adapter drops (`read_start`)

    def __init__(
        self,
        engine: BudgetEngine,
        key: KeyConfig | None,
        target: Target,
        limits: LimitSet,
        price: ModelPrice | None,
        prompt_tokens: int,
        admitted_at: float,
        started: float,
    ) -> None:
        self.engine = engine
        self.key = key
        self.target = target
        self.limits = limits
        self.price = price  # of the target, looked up once when admitting
        self.prompt_tokens = prompt_tokens  # estimated, for reservations and cut streams
        self.admitted_at = admitted_at
        self.started = started

    def name_caller(self) -> BudgetState:
        """Once admitted: who is calling (`request.state.budget`, the usage record's owner)."""
        key = self.key
        target = self.target
        # (virtual_key_id, team_id, customer_id, provider, model, tags)
        if key is None:
            self.caller = BudgetState(None, None, None, target.provider, target.model, target.tags)
        else:
            self.caller = BudgetState(
                key.id, key.team_id, key.customer_id, target.provider, target.model, target.tags
            )
        return self.caller

    async def replay(self) -> Message:
        if not self.replayed:  # the body once; then the real receive (a disconnect, say)
            self.replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        message = await self.receive_()
        if message["type"] == "http.disconnect" and not self.response_complete:
            self.client_gone = True
        return message

    async def forward(self, message: Message) -> None:
        """The app's `send`: each message of the answer measured as it goes by (its start with
        our headers, without those the client must not get), and the exchange settled as the
        last chunk goes."""
        kind = message["type"]
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            if type(chunk) is not bytes:  # ASGI says bytes; a bytearray or memoryview read as one
                chunk = bytes(chunk)
                message = {**message, "body": chunk}
            sent_before = self.body_sent  # (a chunk the server refuses was not sent)
            if chunk:  # a byte of the answer's body goes to the server (headers are no answer)
                self.body_sent = True
            out = self.on_chunk(chunk, message.get("more_body", False))
            if out is not chunk:
                message = {**message, "body": out}
        elif kind == "http.response.start":
            # A second start (an app's bug, which the server refuses) passes as it is: the
            # answer the client has is the first's.
            if not self.response_started:
                headers = message.get("headers") or []
                if type(headers) is not list:  # any iterable (ASGI): read here, then passed on
                    headers = list(headers)
                if self.read_start(message["status"], headers):  # headers the client must not get
                    left_out = self.left_out
                    headers = [h for h in headers if h[0].lower() not in left_out]
                self.sent_headers = headers
                added = self.headers_added()
                headers = replaced(headers, added, ADDED_NAMES, bytes.lower)
                message = {**message, "headers": [*headers, *added]}
        elif kind == "http.response.pathsend":
            await self.read_file(message["path"])
        try:
            await self.send_(message)
        except OSError:
            self.client_gone = True
            if kind == "http.response.start":  # the server refused it: no answer was seen
                self.response_started = False
            elif kind == "http.response.body":
                # Nor is a chunk it refused (an ASGI 2.4 server whose client left after the
                # headers, as the first chunk comes): still no byte of the answer.
                self.body_sent = sent_before
            raise
        except Exception:
            if kind == "http.response.body" and self._past_its_length(len(chunk)):
                self.served_whole = True
            raise
        if self.response_complete and not self.settled:
            # The answer's last chunk has gone: settled now, not when the app returns (Starlette
            # runs its background tasks after the answer, in the app's call: no slot held then).
            # In process, charged and booked here (as `settle` does, one frame less).
            # Ended after its client left (a `BaseHTTPMiddleware` inside ends the stream it cut
            # with an empty last chunk): settled as the middleware's `finally` would.
            outcome = self.client_left() if self.client_gone else "completed"
            if self.elsewhere:
                await self.settle_anywhere(outcome)
            elif self.engine.in_process:
                self.book(self.charge(outcome))
            else:
                await self.settle_shared(outcome)

    def _past_its_length(self, size: int) -> bool:
        """Whether a chunk of `size` bytes that the server refused came once the answer's whole
        Content-Length had gone (uvicorn refuses a message that would go past it, raising in
        the app: its client has the whole answer). Counted for JSON and a stream read to its
        length (`_StreamToItsLength`): a compressed one's length is of its coded bytes."""
        headers = self.sent_headers
        if not size or headers is None or self.decoder is not None:
            return False
        stream = self.stream
        if stream is None:
            given = self.json_dropped + self.json_cut + self.json_size
        elif type(stream) is _StreamToItsLength:
            given = stream.given
        else:
            return False
        return given - size == content_length(headers)

    def client_left(self) -> str:
        """The outcome of an exchange whose client left (SPEC §8's `client_disconnected`). The
        call was made: left before a byte of the answer's body went (headers alone are no
        answer), its cost is the most it could have been, not $0 (`left_unanswered`)."""
        self.left_unanswered = not self.body_sent
        return "client_disconnected"

    async def read_file(self, path: str) -> None:
        """The answer as a file the server sends itself (`http.response.pathsend`: Starlette's
        `FileResponse` where the server offers it): read here, off the loop, for its usage; the
        server still sends it."""
        try:
            async with await anyio.open_file(path, "rb") as file:
                while chunk := await file.read(_FILE_CHUNK):
                    self.on_chunk(chunk, True)
        except OSError as exc:
            self.unreadable = f"file not readable: {type(exc).__name__}"
        self.on_chunk(b"", False)

    # -- the response going by -----------------------------------------------------------

    def read_start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """The answer's status and the headers the exchange reads (`content-type`,
        `content-encoding`, `x-budget-cost`; names in any case): every adapter hands them here.
        True when the adapter must leave out the headers named in `left_out`: `x-budget-cost`
        (ours to read) when the answer carries it, and `content-length` when a stream will
        lose the usage chunk we asked for."""
        self.response_started = True
        self.status = status
        event_stream: bool | None = None  # None: untyped
        encoding = b""
        cost_header = None
        for name, value in headers:
            name = name.lower()
            if name not in _READ_HEADERS:
                continue
            if name == b"content-type":
                # a media type is case-insensitive (RFC 9110 8.3.1): `Text/Event-Stream` too
                media = value.strip().lower()
                if media.startswith(b"text/event-stream"):
                    event_stream = True
                elif media == b"application/json" or _json_type(media):  # as a rule the first
                    event_stream = False
                else:
                    # Another type (`text/plain`, `text/html`: Flask's and Django's streamed
                    # answers unless told): the SDKs read a stream they asked for whatever its
                    # type says, so it is taken as untyped (below: a stream if one was asked).
                    event_stream = None
            elif name == b"content-encoding":
                encoding = value.lower().strip()
            else:  # x-budget-cost
                cost_header = value
        if cost_header is not None:
            # A cost that is no amount (negative, NaN, infinite, text) is not the cost: the
            # usage decides.
            try:
                told = float(cost_header)
                self.header_cost = charge_nanos(told) if told >= 0 else None
            except ValueError:
                self.header_cost = None
        if encoding and encoding != b"identity":
            decoder = BodyDecoder(encoding.decode("latin-1"))
            if decoder.supported:
                self.decoder = decoder
            else:
                self.unreadable = f"content-encoding {encoding.decode('latin-1')} not readable"
        if event_stream is None:
            # A stream asked for and answered without a content-type (Starlette's
            # `StreamingResponse(gen())`): the SDKs read it as the stream it is, and so do we.
            event_stream = self.target.stream
        if event_stream:
            # Unless its first bytes say JSON (`on_chunk`): an event stream cannot begin so (a
            # JSON answer labelled `text/event-stream`, or untyped), and the whole answer is read.
            self.sniffing = True
            dropping = self.injected_usage and self.unreadable is None
            if not dropping:
                self.stream = self._meter(headers)
            else:
                self.stream = StreamMeter(drop_usage_chunk=True)
                if self.tool_calls:
                    self.stream.image_tool = self.image_tool
                # The usage chunk we asked for is taken out in clear: a stream compressed all
                # the same (asked for `identity`, the provider or a proxy did not listen) is
                # passed on decoded, without its `content-encoding`.
                self.passed_decoded = self.decoder is not None
                self.left_out = _COST_LENGTH_AND_CODING if self.passed_decoded else _COST_AND_LENGTH
                return True
        elif self.target.stream and event_stream is False:
            # A stream asked for and labelled JSON (`media_type="application/json"` on a relayed
            # stream): read as the stream the SDKs read, unless its first bytes say JSON. Its
            # headers are the app's: nothing is taken out of an answer that says it is JSON.
            self.sniffing = True
            self.stream = self._meter(headers)
        return cost_header is not None

    def _meter(self, headers: Iterable[tuple[bytes, bytes]]) -> StreamMeter:
        """The meter of a stream passed on as it comes: read to its Content-Length, should it
        say one that bounds it (an app's own: a stream as a rule says none), as a server sends
        it (`_StreamToItsLength`). A compressed one's length is of its coded bytes: unbounded."""
        length = None
        if self.decoder is None and b"content-length" in map(bytes.lower, map(_NAME, headers)):
            length = content_length(headers)
        meter = _StreamToItsLength(length) if length else StreamMeter()
        if self.tool_calls:  # (its images counted at its image tool's model)
            meter.image_tool = self.image_tool
        return meter

    def headers_added(self, limits: bool = True) -> list[tuple[bytes, bytes]]:
        """Our headers on the answer (SPEC §8): the tightest applicable limits (ties keep the
        first) as admission found them or, admitted by Redis, as they are now; the route's
        target; shadow mode's refusal. Without `limits` (an outbound call: the answer is the
        provider's, with its own `x-ratelimit-*`) only the last two, when they apply."""
        added: list[tuple[bytes, bytes]] = []
        if limits:
            ticket = self.ticket
            tight = ticket.tightest if ticket is not None else None
            if tight is None:  # admitted by Redis: the local counters as they are now, and when
                add_limit_headers(added, tightest_now(self.limits), self.engine.clock())
            else:  # as admission found them, and when
                add_limit_headers(added, tight, self.admitted_at, self.engine.clock)
        if self.route_target is not None:
            added.append((ROUTE_HEADER, self.route_target.encode()))
        if self.would_refuse is not None:
            added.append((SHADOW_HEADER, self.would_refuse.encode()))
        return added

    def on_chunk(self, chunk: bytes, more: bool) -> bytes:
        """A chunk of the answer going by (`more`: not the last): measured, and passed on as it
        is (the same object) unless an SSE usage chunk we asked for is dropped from it."""
        if not more:
            self.response_complete = True
        if self.unreadable is not None:
            # Passed on decoded until it could not be decoded: the rest cannot be passed so.
            return b"" if self.passed_decoded else chunk
        decoder = self.decoder
        if decoder is None:
            return self._measure(chunk, chunk, more)
        # Decoded a slice at a time, each measured as it comes: a small chunk can inflate to
        # a thousand times its size (an answer sent in one message, 128 MiB held at once).
        size = len(chunk)
        passed: list[bytes] = []
        start = 0
        while True:
            end = start + _INFLATE_SLICE
            piece = chunk if not start and end >= size else chunk[start:end]
            plain = decoder.feed(piece) if piece else b""
            last = end >= size
            if last and not more:
                plain += decoder.flush()
            if decoder.error is not None:
                self.unreadable = decoder.error
                return b"".join(passed) if self.passed_decoded else chunk
            out = self._measure(plain, plain if self.passed_decoded else chunk, more or not last)
            if self.passed_decoded and out:
                passed.append(out)
            if last:
                return b"".join(passed) if self.passed_decoded else chunk
            start = end

    def _measure(self, plain: bytes, chunk: bytes, more: bool) -> bytes:
        """The answer's bytes as they come, `plain` (decoded) and `chunk` (as passed on):
        measured; what to pass on returned (the stream less the usage chunk we asked for)."""
        if self.sniffing:
            coded = self.decoder is not None and not self.passed_decoded  # (`chunk` not `plain`)
            if self.sniffed:  # first bytes too few to say (below): read with these
                plain = self.sniffed + plain
                self.sniffed = b""
                chunk = chunk if coded else plain
            head = plain.lstrip()  # decoded: a compressed answer's first bytes say nothing
            if head:
                says = begins_json(head)
                if says is None and more:  # a wide first character's bytes (1 of UTF-16's)
                    self.sniffed = plain  # held, to go on (and be read) with what follows
                    return chunk if coded else b""
                self.sniffing = False
                if says:  # JSON after all, untyped: read as JSON
                    self.stream = None
        stream = self.stream
        if stream is not None:
            if self.decoder is not None and not self.passed_decoded:
                stream.feed(plain)  # measure only: the compressed bytes go on untouched
                if not more:  # a last event without a blank line after it, read too
                    stream.finish()
                return chunk
            out = stream.feed(chunk)
            if not more:
                out += stream.finish()
            return out
        if plain:  # JSON: kept (the tail of a huge one)
            parts = self.json_parts
            if parts is None:
                self.json_parts = [plain]
            else:
                if self.json_text is not None:  # a huge wide answer's: as UTF-8
                    plain = self.json_text.decode(plain).encode()
                parts.append(plain)
            size = self.json_size + len(plain)
            self.json_size = size
            if size > _JSON_KEPT:
                self._keep_the_tail()
        return chunk

    def _keep_the_tail(self) -> None:
        """Of a huge JSON answer keep the last MiB (its usage sits at the end), and count what
        is left out (for an estimate, should it hold no usage). Its images' base64 is left out
        first (`without_results`: the image generation tool's, megabytes): what is left is
        kept whole if it is no more than a MiB, read whole as a smaller answer is. An answer in
        UTF-16 or UTF-32 is kept (and counted) as the UTF-8 of its text, what follows too
        (`json_text`): its usage is then found where a UTF-8 answer's is, its size that of
        its text."""
        whole = b"".join(self.json_parts or ())
        if not self.json_dropped:
            if self.json_text is None and (codec := wide_codec(whole)) is not None:
                self.json_text = codecs.getincrementaldecoder(codec)("replace")
                whole = self.json_text.decode(whole).encode()
            kept = without_results(whole)
            if len(kept) <= _JSON_TAIL:
                self.json_cut += len(whole) - len(kept)
                self.json_parts, self.json_size = [kept], len(kept)
                return
            self.json_head = whole[:_JSON_HEAD]
        tail = whole[-_JSON_TAIL:]
        self.json_dropped += len(whole) - len(tail)
        self.json_parts, self.json_size = [tail], len(tail)

    def whole(self) -> bool:
        """Whether the answer read so far can be all of it (the WSGI middleware asks at its
        `Content-Length`): a stream that reached its end, JSON that reports its usage or parses,
        a body that is no JSON, or one it cannot read on. False for JSON cut short there (an app
        that says too few bytes, its usage in what follows): read on to its end, as one whose
        chunk crosses it is."""
        if self.unreadable is not None:
            return True
        stream = self.stream
        if stream is not None:
            return stream.completed
        parts = self.json_parts
        if not parts:
            return True
        body = b"".join(parts)
        price = self.price
        usage = usage_from_json(body, price is not None and price.tiered)
        if usage is not None:
            # Kept for the settlement that follows (`_usage`): the answer is not read twice.
            self.json_parts, self.json_read = [body], (body, usage)
            return True
        if not begins_json(body):
            return True
        return answered_chars(body) is not None

    # -- settlement ----------------------------------------------------------------------

    def _usage(self) -> TokenUsage | None:
        stream = self.stream
        if stream is not None:
            usage = stream.usage
            if usage is None:
                return None
            if stream.gave_up and stream.gap_unread():  # (`gave_up` first: no call as a rule)
                # An event over 16 MiB skipped unread, no usage read since: the most it may cost.
                self.estimated = True
                most = self.engine.gate.most_output(self.target, self.price)
                return replace(
                    usage,
                    input_tokens=usage.input_tokens or self.prompt_tokens,
                    output_tokens=max(usage.output_tokens, stream.streamed_output(), most),
                    cost=None,
                )
            if stream.completed and not stream.unreported:
                if stream.text_chars == stream.text_at_usage:  # the usual end: usage last
                    return usage
                # Text went on after the last usage the stream reported: it counts too.
                streamed = stream.streamed_output()
                if streamed <= usage.output_tokens:
                    return usage
                self.estimated = True  # (a prompt of 0 tokens is none reported: see below)
                return _grown(usage, usage.input_tokens or self.prompt_tokens, streamed)
            # Cut before its end: Anthropic reported its input at the start, but the output so
            # far is only in the streamed text. A completion after the last usage that reported
            # none of its own (`unreported`): its prompt too, beside those before it.
            streamed = stream.streamed_output()
            self.estimated = True
            prompt = usage.input_tokens or self.prompt_tokens
            if stream.unreported:
                prompt = usage.input_tokens + self.prompt_tokens
            return _grown(usage, prompt, max(usage.output_tokens, streamed), stream.unreported)
        parts = self.json_parts
        if parts:
            body = b"".join(parts)  # of one part, that part: no copy
            read = self.json_read
            if read is not None and read[0] is body:  # read already (`whole`)
                usage = read[1]
            else:  # a tier written before the usage is looked for if it prices
                price = self.price
                usage = usage_from_json(body, price is not None and price.tiered)
            if usage is None and self.json_dropped:  # a huge answer: its usage may come first
                if self._within_length(body):  # (or at its tail's end, bytes past its length)
                    return self._usage()
                usage = usage_from_head(self.json_head)
            elif usage is None and (self._read_as_events(body) or self._within_length(body)):
                return self._usage()
            if usage is not None and self.tool_calls:
                # Asked for tools its provider runs (or a stored prompt that may name them):
                # the Responses API's web and file searches, which its usage leaves out (its
                # `output` says them; of a huge answer's kept tail, none: it is no JSON)
                json_searches(usage, body, self.image_tool)
            return usage
        return None

    def _within_length(self, body: bytes) -> bool:
        """Whether a JSON answer that reports no usage read as a whole is JSON up to its
        Content-Length, read so from now on (`json_parts`): an ASGI app that sends more bytes
        than its length says (in the message that crosses it, or after it). Its answer is what
        the length holds (uvicorn sends no byte past it, refusing the message that
        crosses it): judged there, as the WSGI middleware judges such an answer at its length,
        so that the charge does not depend on how the app chunked its bytes. JSON cut short
        there (an app that says too few bytes, its usage in what follows) is read whole. Of a
        huge answer, `body` is its kept tail: cut where the length falls in it."""
        headers = self.sent_headers
        if headers is None or self.decoder is not None or self.json_text is not None:
            return False  # (a compressed answer's length is of its coded bytes, a wide one's)
        length = content_length(headers)
        if length is None:
            return False
        length -= self.json_dropped + self.json_cut  # (0 but of a huge answer)
        if not 0 < length < len(body):
            return False
        head = body[:length]
        price = self.price
        if (
            usage_from_json(head, price is not None and price.tiered) is None
            and answered_chars(head) is None
        ):
            return False
        self.json_parts, self.json_size = [head], length
        return True

    def _read_as_events(self, body: bytes) -> bool:
        """Whether an answer read as JSON, which holds no usage and is no JSON, is an event
        stream after all, read as one from now on (`stream`): an app that streams whenever its
        request's `stream` is truthy (`"no"`, `2`: `body.get("stream")`), untyped or as
        `text/plain` or `text/html`, for a request that is no stream as the SDKs send one."""
        if begins_json(body):  # (JSON that does not parse, as a rule)
            return False
        meter = StreamMeter()
        meter.image_tool = self.image_tool
        meter.feed(body)
        meter.finish()
        if meter.usage is None and not (meter.text_chars or meter.completed or meter.failed):
            return False
        self.stream, self.json_parts = meter, None
        return True

    def _work_out(self, outcome: str) -> UsageRecord:
        """Work out the cost: the request's usage record (what it costs, what it counts)."""
        usage = self._usage()  # what could be read: all of it, or a stream's up to a bad byte
        nothing = False
        if usage is not None and not usage.input_tokens and not usage.output_tokens:
            # 0 tokens in and out, no cost: no prompt is 0 tokens, so it reports nothing (a
            # gateway's zeroed counts), and is estimated as an answer without usage is
            nothing = usage.cost is None
            if nothing:
                usage = None
        estimated = self.estimated
        note = self.unreadable
        stream = self.stream
        if note is None and stream is not None and stream.gave_up and stream.gap_unread():
            note = "an event over 16 MiB was not read"
        if self.header_cost is not None or (usage is not None and usage.cost is not None):
            if self.header_cost is not None:
                cost, source = self.header_cost, "header"
            else:
                assert usage is not None and usage.cost is not None
                cost, source = charge_nanos(usage.cost), "usage"
                uncosted = usage.uncosted
                if uncosted is not None and self.price is not None:
                    # The turns that reported no cost (a tool loop's, beside one that did):
                    # their tokens' price.
                    cost += cost_nanos(self._served_price(self.price, uncosted), uncosted)
            if self.price is not None and usage is not None and not estimated:
                # Reported over what its tokens cost (a fee): for the next to reserve
                bounded = _bounded(usage)
                served = self._served_price(self.price, bounded)
                self.reported_over = cost - cost_nanos(served, bounded)
        elif usage is None and (
            self.status >= 300
            or not (self.response_started or self.sent_unanswered or self.left_unanswered)
            or self._only_an_error()
        ):
            # An error or a redirect without usage costs nothing; so does an error answered
            # with status 200 before any output (`_only_an_error`).
            cost, source = 0, "none"
            if note is None and self.status < 300 and self.response_started:
                note = "an error answered with status 200, no output"
        else:
            if usage is None:  # no usage reported: charge what we can see, and say so
                estimated = True
                # The generated text seen: streamed, or in a JSON answer (SPEC §7's estimate;
                # of a huge one cut to its tail, every byte of it)
                said = 0  # of `seen`, a spoken answer's transcript (priced as speech)
                drawn = 0  # images (charged its most output, a model that draws)
                pictures = False  # the answer is the Images API's: images, whatever the model
                if stream is not None:
                    seen = stream.text_chars
                    said = stream.speech_chars
                    by_tool = stream.tool_image_tokens  # images its provider's tool drew: no text
                else:
                    body = b"".join(self.json_parts or ())
                    by_tool = json_tool_images(body, self.image_tool)
                    told = answered_chars(body)
                    seen = told or 0
                    if self.target.spoken and told:
                        said = spoken_chars(body)
                    elif not told:
                        pictures = images_answered(body)
                    if self.json_dropped:
                        seen = max(seen, self.json_dropped + self.json_size)
                    elif told is None and note is None and begins_json(body.lstrip()):
                        # JSON that does not parse: cut short (a `content-length` shorter than
                        # the body, which the client's HTTP library cuts it to) or corrupt. Its
                        # usage may be in what is missing: unreadable, as a bad coding is.
                        note = "a JSON body cut short or corrupt"
                if self.left_unanswered and not self.body_sent:
                    note = "the client left before the app answered"
                elif self.sent_unanswered and note is None and not seen:
                    # (its headers alone came, as they may long before the answer: a stream
                    # of a model that thinks first, a server that sends them at once)
                    note = "sent, and its answer never came"
                if note is None and self.target.background:
                    # Made apart from this answer (queued, or a stream left): its result and
                    # usage are fetched by a GET, which is not metered. The most it may cost.
                    note = "a background response, its usage not in this answer"
                    seen = 0
                drawing = self.price is not None and (pictures or draws(self.price))
                if drawing or (
                    note is not None and (not seen or (stream is not None and stream.gave_up))
                ):
                    # Nothing of the answer could be read (a coding we cannot decode, a corrupt
                    # body), or its output may be images, which its bytes do not count (a model
                    # that draws, an Images API answer): the most it could have cost, as its
                    # reservation counted it.
                    output = max(
                        self.engine.gate.most_output(self.target, self.price), (seen + 3) // 4
                    )
                    if note is None:
                        note = "a usage of 0 tokens" if nothing else "no usage in the response"
                    note = f"{note}: charged its most output"
                    spoken = output if self.target.spoken else 0  # speech: at the audio price
                    if not spoken and drawing:
                        drawn = output  # a model that draws: at the image price, as reserved
                else:
                    output = (seen + 3) // 4
                    if note is None:
                        note = "a usage of 0 tokens" if nothing else "no usage in the response"
                    # speech, counted by its transcript: at the audio price; the rest (a tool
                    # call's arguments) at the text price
                    spoken = min(output, (said + 3) // 4) if self.target.spoken else 0
                usage = TokenUsage(
                    self.prompt_tokens,
                    output,
                    output_audio_tokens=spoken,
                    output_image_tokens=drawn,
                )
                if by_tool:  # at that tool's image prices, beside the text
                    add_tool_images(usage, by_tool, self.image_tool)
            price = self.price
            if price is None and (price := self._answered_price()) is None:
                cost, source = 0, "unpriced"  # noted by `book`
            else:
                # a model that prices no service tier apart, the usual case: no call (OpenAI's
                # answers say their tier, `default`, all the same)
                served = self._served_price(price, usage) if price.tiered else price
                if usage.advisors:  # other models' samplings, at their prices
                    cost, source = self._models_cost(usage, served), price.source
                else:
                    cost, source = cost_nanos(served, usage), price.source
                if (usage.reasoning_tokens or usage.citation_tokens) and not estimated:
                    # Output no limit bounds (Perplexity's), a fee for the next to reserve
                    self.reported_over = cost - cost_nanos(served, _bounded(usage))
        if usage is None:
            inp = out = cached = 0
        else:
            inp, out, cached = usage.input_tokens, usage.output_tokens, usage.cached_tokens
            if usage.tool_image_tokens:
                self.drew = True
            if inp > MAX_TOKENS or out > MAX_TOKENS or cached > MAX_TOKENS:
                inp, out, cached = (
                    min(inp, MAX_TOKENS),
                    min(out, MAX_TOKENS),
                    min(cached, MAX_TOKENS),
                )
                note = "usage over 2**31 tokens, counted as 2**31 - 1"
        if cost > MAX_CHARGE_NANOS:
            cost = MAX_CHARGE_NANOS
            note = "cost over $1,000,000, charged $1,000,000"
        if stream is not None and stream.failed and outcome != "upstream_error":
            # An error event ended it, after output or before (status 200 all the same), and a
            # client that left then left for it (an SDK raises at the event): the upstream
            # failed, whatever it is charged.
            outcome = "upstream_error"
        return self._record(outcome, inp, out, cached, cost, source, estimated, note)

    def _answered_price(self) -> ModelPrice | None:
        """The price of the model the answer names, for a call that named none (Mistral's
        `/v1/agents/completions`: an `agent_id`, its agent's model), charged 0 before."""
        if self.target.model != "unknown":
            return None
        named: object = None
        if self.stream is not None:
            named = self.stream.model
        elif self.json_parts and not self.json_dropped:
            try:
                document = json_loads(b"".join(self.json_parts))
            except JSON_ERRORS:
                return None
            if type(document) is dict:
                named = document.get("model")
        if not isinstance(named, str) or not named.strip():
            return None
        return self.engine.prices.price(self.target.provider, named.strip(), warn=False)

    def _models_cost(self, usage: TokenUsage, served: ModelPrice) -> int:
        """What an answer that reports samplings of other models costs: those at their models'
        prices (`TokenUsage.advisors`: Anthropic's advisor tool's, which its counts leave out,
        and the fallback model's that served, within them: `fallbacks`), the rest at the
        answer's own (`served`), as is one of a model without a price."""
        book = self.engine.prices
        own = usage
        for _, part in usage.fallbacks:
            own = own.less(part)
        return cost_nanos(served, own) + sum(
            cost_nanos(book.price(self.target.provider, model) or served, part)
            for model, part in usage.advisors
        )

    def _served_price(self, price: ModelPrice, usage: TokenUsage) -> ModelPrice:
        """The price of the answer, of its target's `price`: at the service tier it was served
        at, else the one asked for when it costs no less (`asked_prices`)."""
        tier = usage.service_tier
        if tier is not None:
            return for_service_tier(price, tier)
        if self.target.service_tier is not None:
            return asked_prices(price, self.target.service_tier)
        return price

    def _only_an_error(self) -> bool:
        """Whether an answer without usage is an error and nothing else, whatever its status:
        a stream that streamed an error and no output (Anthropic's `overloaded_error` as its
        first event, an OpenAI-style gateway's `data: {"error": ...}`), or a JSON `error`
        object without output."""
        stream = self.stream
        if stream is not None:
            return stream.failed and not stream.text_chars
        parts = self.json_parts
        if not parts or self.json_dropped:
            return False
        try:
            document = json_loads(b"".join(parts))
        except JSON_ERRORS:
            return False
        return (
            type(document) is dict
            and document.get("error") is not None
            and not any(document.get(key) for key in ("choices", "content", "output"))
        )

    def _record(
        self,
        outcome: str,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int,
        cost: int,
        source: str,
        estimated: bool,
        note: str | None,
    ) -> UsageRecord:
        caller = self.caller
        return UsageRecord(
            request_id="",  # named when flushed, after its batch
            # when it is charged: the window it settles in counts it, and so do reports by time
            created_at=self.engine.clock(),
            virtual_key_id=caller.virtual_key_id,
            team_id=caller.team_id,
            customer_id=caller.customer_id,
            provider=caller.provider,
            model=caller.model,
            tags=caller.tags,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            cost_nanos=cost,
            cost_source=source,
            status=self.status,
            streamed=self.stream is not None,
            outcome=outcome,
            estimated=estimated,
            note=note if note is None or len(note) <= _MAX_NOTE else note[:_MAX_NOTE],
            duration_ms=(perf_counter() - self.started) * 1000,
            direction=self.direction,
            would_refuse=self.would_refuse,
        )

    def settle(self, outcome: str) -> Awaitable[None]:
        """Charge it and release what it holds, by the engine's counters: in process at once,
        no await between the charge and the counters (no coroutine made: `_SETTLED`), else
        through the shared ones (`settle_shared`). The settlement to await."""
        if self.engine.in_process:
            self.book(self.charge(outcome))
            return _SETTLED
        return self.settle_shared(outcome)

    def settle_anywhere(self, outcome: str) -> Awaitable[None]:
        """Settled from whatever loop the caller is on, where it would be admitted now: on the
        engine's loop when another thread's runs it (`portal.done_there`), or in this thread
        holding the lock every step of the engine's background loop holds (`settle_locked`);
        here, when the engine runs here (or no loop runs it: `portal.engine_loop`). Settled on
        this thread's own loop, it could interleave with the engine's loop (its flusher taking
        what is pending, another admission) or use its Redis connections. The settlement to
        await."""
        loop = engine_loop(self.engine)
        if loop is None:
            return self.settle(outcome)
        if self.settle_locked(outcome):
            return _SETTLED
        # On its way there, whatever this caller does meanwhile (cancelled as it waits: Starlette
        # ends a stream's task once its client is gone): settled once, not again by the caller.
        self.settled = True
        return done_there(
            self.engine,
            loop,
            lambda: self.settle(outcome),
            lambda: self.settle_locked(outcome) or None,
        )

    def settle_locked(self, outcome: str) -> bool:
        """Whether it was settled in the calling thread, holding `loop_lock`: when the counters
        are in process on the background loop (the charge worked out before the lock is taken,
        as the WSGI middleware settles). Else it is the engine's loop's to settle."""
        engine = self.engine
        if engine.memory is None or not is_background(engine.loop):
            return False
        record = self.charge(outcome)
        with loop_lock:
            self.book(record)
        return True

    async def settle_shared(self, outcome: str) -> None:
        record = self.charge(outcome)
        self._note(record)
        assert self.ticket is not None
        await self.engine.settle(
            self.ticket, record.cost_nanos, record.input_tokens + record.output_tokens
        )

    def settle_dropped(self, outcome: Callable[[], str | None]) -> None:
        """From a finalizer (an answer dropped without being closed, in any adapter): settled
        on the engine's loop, with what `outcome()` says there (None: settled already), so that
        its slot and reservation are not held for ever and the call is charged. With no loop
        running the engine (a script's `asyncio.run` has ended), by the next loop that starts
        it, or at exit. Nothing is touched here: the collector may run anywhere, the engine's
        admission included. An exchange of the process this one was forked from is the
        parent's to settle: left alone."""
        engine = self.engine
        if self.started < engine.forked_at:
            return
        # Kept for the next loop or the exit too, until the loop runs it: a loop can be open
        # and never run again (`asyncio.run` ending, a `run_until_complete` then `close`), and
        # its close drops what was sent to it. Settled twice, `outcome()` says None the second.
        engine.settle_later(self, outcome)
        loop = engine.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: kept for later
                loop.call_soon_threadsafe(self._settle_dropped, outcome)

    def _settle_dropped(self, outcome: Callable[[], str | None]) -> None:
        task = asyncio.get_running_loop().create_task(self.settle_orphaned(outcome))
        _DROPPED.add(task)
        task.add_done_callback(_DROPPED.discard)

    async def settle_orphaned(self, outcome: Callable[[], str | None]) -> None:
        """A dropped answer's settlement, on the engine's loop (`settle_dropped`): at once, or
        once a loop starts the engine again. Kept for later until it gets here: a task
        cancelled before its first step (its loop ending) leaves it to the next loop or the
        exit."""
        self.engine.taken(self)
        how = outcome()
        if how is not None:
            await self.settle(how)

    def book(self, record: UsageRecord) -> None:
        """The charge worked out (`charge`) booked in process: the usage record handed to the
        engine (written by the next flush) and the counters settled. A WSGI thread works the
        charge out first, and holds the engine's lock for this part only."""
        self._note(record)
        memory = self.engine.memory  # (as `BudgetEngine.settle_now`, one frame less)
        assert self.ticket is not None and memory is not None, "book needs in-process counters"
        memory.settle_now(
            self.ticket, record.cost_nanos, record.input_tokens + record.output_tokens
        )

    def _note(self, record: UsageRecord) -> None:
        engine = self.engine
        if self.price is None:  # its cost came with the answer, or none: what the next reserve
            engine.gate.saw_unpriced(record.provider, record.model, record.cost_nanos)
            if record.cost_source == "unpriced":
                engine.prices.note_unpriced(record.provider, record.model)
                engine.stats.unpriced_requests += 1
        elif self.reported_over > 0 or (engine.gate.any_fee and not record.estimated):
            engine.gate.saw_fee(record.provider, record.model, self.reported_over)
        if self.server_tools and not record.estimated and record.cost_source != "none":
            # Its cost measured (an error without usage, an estimate, tells nothing of it):
            # what the next requests with such tools to its model reserve at least.
            engine.gate.saw_tools(record.provider, record.model, record.cost_nanos, self.drew)
        if self.media_references and record.input_tokens and not record.estimated:
            # Its input measured (an error without usage, an estimate, tells nothing of it):
            # what each medium it sent by reference took, for the next to reserve.
            engine.gate.saw_media(
                record.provider,
                record.model,
                self.media_references,
                record.input_tokens,
            )
        engine.record(record)

    def charge(self, outcome: str) -> UsageRecord:
        """The request's usage record, its cost worked out (no shared state touched); should
        working it out fail (a bug, whatever the answer held), the reservation's estimate,
        recorded as such: the slot and reservation are released and no admitted request goes
        uncharged."""
        self.settled = True
        try:
            return self._work_out(outcome)
        except Exception as exc:
            logger.exception(
                "budget-middleware could not work out a charge; the estimate is charged"
            )
            # The reservation's estimate; none without a price, nor all one request can be
            # charged (media not measured yet, `gate._with_media`): those are no estimate.
            reserved = self.ticket_estimate if self.price is not None else 0
            if reserved >= MAX_CHARGE_NANOS:
                reserved = 0
            cost = reserved or estimate_nanos(
                self.price,
                self.prompt_tokens,
                (self.target.max_output_tokens or 0) * self.target.choices,
            )
            note = f"charge failed: {type(exc).__name__}"
            return self._record(outcome, self.prompt_tokens, 0, 0, cost, "estimate", True, note)


async def settle_unwanted(admitted: object) -> None:
    """An admission made on the engine's loop for a caller that stopped waiting for it
    (cancelled, a timeout): the call is never made; settled there as a disconnect, at no cost,
    so its slot and reservation go back (`portal.done_there`'s `unwanted`)."""
    if type(admitted) is Exchange:
        exchange: Exchange = admitted
        exchange.name_caller()  # the usage record's owner
        await exchange.settle("client_disconnected")


class _Settled:
    """A settlement made already, to await all the same: done at once."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_SETTLED = _Settled()


def _bounded(usage: TokenUsage) -> TokenUsage:
    """A usage as a request's reservation counts it, within its output limit: without the
    output reported apart (Perplexity's reasoning and citations, which no `max_tokens` bounds)
    and the searches counted with it. What is beyond is a fee (`reported_over`)."""
    if not (usage.reasoning_tokens or usage.citation_tokens):
        return usage
    apart = usage.reasoning_tokens + usage.citation_tokens
    return replace(
        usage,
        output_tokens=max(usage.output_tokens - apart, 0),
        reasoning_tokens=0,
        citation_tokens=0,
        web_searches=0,
    )


def _grown(
    usage: TokenUsage, input_tokens: int, output_tokens: int, new_turn: bool = False
) -> TokenUsage:
    """A stream's usage grown to the counts its text shows (an estimate): what reported a cost
    keeps it, and the tokens beyond what was reported are priced beside it (`uncosted`, as a
    turn that reported no cost is), so that a turn's reported cost (a fee, a markup) is never
    replaced by its tokens' price, nor the estimated rest left uncharged. What is beyond is the
    last turn's (a tool loop's), or, `new_turn`, a completion's after the last usage, none of
    its own: each priced at its own long-context tier (`TokenUsage.turns`), such a completion's
    at least at the last turn's (its prompt holds that turn's)."""
    more = TokenUsage(
        max(input_tokens - usage.input_tokens, 0), max(output_tokens - usage.output_tokens, 0)
    )
    turns = usage.turns
    last = turns[-1] if turns else usage
    # The last turn's rest at its tier; a completion after it at that tier at least: its prompt
    # holds the last turn's
    more.tier_input_tokens = last.input_tokens + more.input_tokens
    if usage.cost is not None:
        return replace(
            usage,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            uncosted=more if usage.uncosted is None else usage.uncosted.plus(more),
        )
    if new_turn:
        turns = (*(turns or (usage,)), more)
    elif turns:
        grown = replace(
            last,
            input_tokens=last.input_tokens + more.input_tokens,
            output_tokens=last.output_tokens + more.output_tokens,
        )
        turns = (*turns[:-1], grown)
    return replace(usage, input_tokens=input_tokens, output_tokens=output_tokens, turns=turns)
