"""One metered exchange: pass the response on untouched, measure it, settle it exactly once."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .admission import Ticket
from .identity import Target
from .limits import FAR_FUTURE, WindowCounter
from .pricing import cost_nanos, nanos_from_usd
from .scopes import KeyConfig, Scope
from .sse import StreamMeter
from .store.database import UsageRecord
from .usage import BodyDecoder, TokenUsage, usage_from_json

if TYPE_CHECKING:
    from .engine import BudgetEngine

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_TAIL = 1 << 20  # of a huge JSON answer keep the last MiB: usage sits at the end
_COST_HEADER = b"x-budget-cost"


class _RequestIds:
    """Unique usage-record ids (32 hex digits, like a uuid4's): a random prefix per process and
    a counter. A uuid4 per request cost ~2.5 µs, a tenth of the hot path's budget."""

    def __init__(self) -> None:
        self.renew()
        # A forked worker (gunicorn --preload) must not repeat its parent's ids.
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_request_ids = _RequestIds()


class Exchange:
    """One admitted request on its way through the app: replays the body once, passes the response
    on without holding a chunk back (never a second start), measures it, and settles exactly once.

    One object with slots and bound methods for `receive`/`send`: no closures, nothing allocated
    per request that could be shared.
    """

    __slots__ = (
        "admitted_at",
        "body",
        "client_gone",
        "decoder",
        "engine",
        "estimated",
        "header_cost",
        "injected_usage",
        "json_parts",
        "json_size",
        "key",
        "parsed",
        "prompt_tokens",
        "receive_",
        "replayed",
        "response_complete",
        "response_started",
        "scopes",
        "send_",
        "started",
        "status",
        "stream",
        "target",
        "ticket",
        "ticket_estimate",
        "unreadable",
    )

    def __init__(
        self,
        engine: BudgetEngine,
        key: KeyConfig | None,
        target: Target,
        scopes: tuple[Scope, ...],
        prompt_tokens: int,
        admitted_at: float,
        started: float,
    ) -> None:
        self.engine = engine
        self.key = key
        self.target = target
        self.scopes = scopes
        self.prompt_tokens = prompt_tokens  # estimated, for reservations and cut streams
        self.admitted_at = admitted_at
        self.started = started
        self.injected_usage = False
        self.ticket: Ticket | None = None
        self.ticket_estimate = 0  # nano-dollars to reserve on every budget
        self.parsed: dict[str, Any] | None = None  # the request, for a stream to ask for usage
        self.body = b""
        self.replayed = False
        self.status = 0
        self.response_started = False
        self.response_complete = False
        self.header_cost: int | None = None
        self.stream: StreamMeter | None = None
        self.json_parts: list[bytes] | None = None
        self.json_size = 0
        self.decoder: BodyDecoder | None = None  # for a compressed answer, measured on the side
        self.unreadable: str | None = None
        self.client_gone = False
        self.estimated = False

    async def run(
        self,
        app: Callable[[Any, Receive, Send], Awaitable[None]],
        scope: Any,
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        self.body = body
        self.receive_ = receive
        self.send_ = send
        outcome = "upstream_error"
        try:
            await app(scope, self.replay, self.forward)
            outcome = "completed"
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            if self.client_gone and not self.response_complete:
                outcome = "client_disconnected"
            if self.engine.in_process:
                self.settle_now(outcome)
            else:
                await self.settle_shared(outcome)

    async def replay(self) -> Message:
        if not self.replayed:  # the body once; then the real receive (a disconnect, say)
            self.replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        message = await self.receive_()
        if message["type"] == "http.disconnect" and not self.response_complete:
            self.client_gone = True
        return message

    async def forward(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            message = self._on_body(message)
        elif kind == "http.response.start":
            message = self._on_start(message)
        try:
            await self.send_(message)
        except OSError:
            self.client_gone = True
            raise

    # -- the response going by -----------------------------------------------------------

    def _on_start(self, message: Message) -> Message:
        self.response_started = True
        self.status = message["status"]
        headers = message.get("headers") or []
        kept: list[tuple[bytes, bytes]] = []
        event_stream = False
        encoding = b""
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type":
                event_stream = value.startswith(b"text/event-stream")
            elif lname == b"content-encoding":
                encoding = value.lower().strip()
            elif lname == _COST_HEADER:
                try:
                    self.header_cost = nanos_from_usd(float(value))
                except ValueError:
                    self.header_cost = None
                continue
            kept.append((name, value))
        if encoding and encoding != b"identity":
            decoder = BodyDecoder(encoding.decode("latin-1"))
            if decoder.supported:
                self.decoder = decoder
            else:
                self.unreadable = f"content-encoding {encoding.decode('latin-1')} not readable"
        if event_stream:
            self.stream = StreamMeter(drop_usage_chunk=self.injected_usage and self.decoder is None)
        self._limit_headers(kept)
        return {**message, "headers": kept}

    def _on_body(self, message: Message) -> Message:
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if not more:
            self.response_complete = True
        if self.unreadable is not None:
            return message
        decoder = self.decoder
        stream = self.stream
        if decoder is None and stream is None:  # plain JSON: keep it (the tail of a huge one)
            if chunk:
                parts = self.json_parts
                if parts is None:
                    self.json_parts = [chunk]
                else:
                    parts.append(chunk)
                self.json_size += len(chunk)
                if self.json_size > 2 * _JSON_TAIL:
                    tail = b"".join(self.json_parts or ())[-_JSON_TAIL:]
                    self.json_parts, self.json_size = [tail], len(tail)
            return message
        plain = chunk
        if decoder is not None:
            plain = decoder.feed(chunk) if chunk else b""
            if not more:
                plain += decoder.flush()
            if decoder.error is not None:
                self.unreadable = decoder.error
                return message
        if stream is not None:
            if decoder is not None:
                stream.feed(plain)  # measure only: the compressed bytes go on untouched
                return message
            out = stream.feed(chunk)
            if not more:
                out += stream.finish()
            if out is chunk:
                return message
            return {**message, "body": out}
        if plain:
            parts = self.json_parts
            if parts is None:
                self.json_parts = parts = []
            parts.append(plain)
            self.json_size += len(plain)
            if self.json_size > 2 * _JSON_TAIL:
                tail = b"".join(parts)[-_JSON_TAIL:]
                self.json_parts, self.json_size = [tail], len(tail)
        return message

    def _limit_headers(self, out: list[tuple[bytes, bytes]]) -> None:
        """Rate-limit and budget headers of the tightest applicable limits (ties keep the first)."""
        requests = tokens = budget = None
        requests_left = tokens_left = budget_left = 0
        for scope in self.scopes:
            for counter in scope.budgets:
                left = counter.limit - counter.value
                if left < 0:
                    left = 0
                if budget is None or left < budget_left:
                    budget, budget_left = counter, left
            rate = scope.rate_limit
            if rate is not None:
                window = rate.requests
                if window is not None:
                    left = window.limit - window.value
                    if left < 0:
                        left = 0
                    if requests is None or left < requests_left:
                        requests, requests_left = window, left
                window = rate.tokens
                if window is not None:
                    left = window.limit - window.value
                    if left < 0:
                        left = 0
                    if tokens is None or left < tokens_left:
                        tokens, tokens_left = window, left
        now = self.admitted_at
        if requests is not None:
            _rate_headers(out, _REQUEST_HEADERS, requests, requests_left, now)
        if tokens is not None:
            _rate_headers(out, _TOKEN_HEADERS, tokens, tokens_left, now)
        if budget is not None:
            out.append((b"x-budget-limit", budget.limit_text))
            out.append((b"x-budget-remaining", b"%.6f" % (budget_left / 1e9)))

    # -- settlement ----------------------------------------------------------------------

    def _usage(self) -> TokenUsage | None:
        stream = self.stream
        if stream is not None:
            if stream.completed or stream.usage is None:
                return stream.usage
            # Cut before its end: Anthropic reported its input at the start, but the output so
            # far is only in the streamed text.
            usage = stream.usage
            streamed = (stream.text_chars + 3) // 4
            self.estimated = True
            return TokenUsage(
                usage.input_tokens or self.prompt_tokens,
                max(usage.output_tokens, streamed),
                usage.cached_tokens,
                usage.cache_write_tokens,
            )
        parts = self.json_parts
        if parts:
            return usage_from_json(parts[0] if len(parts) == 1 else b"".join(parts))
        return None

    def _charge(self, outcome: str) -> tuple[int, int]:
        """Work out the cost, record the request; (cost in nano-dollars, tokens) to settle."""
        engine = self.engine
        target = self.target
        usage = None if self.unreadable else self._usage()
        estimated = self.estimated
        note = self.unreadable
        if self.header_cost is not None:
            cost, source = self.header_cost, "header"
        elif usage is not None and usage.cost is not None:
            cost, source = nanos_from_usd(usage.cost), "usage"
        elif usage is None and (self.status >= 400 or not self.response_started):
            cost, source = 0, "none"  # an error without usage costs nothing
        else:
            if usage is None:  # no usage reported: charge what we can see, and say so
                estimated = True
                output_chars = self.stream.text_chars if self.stream is not None else 0
                usage = TokenUsage(self.prompt_tokens, (output_chars + 3) // 4)
                note = note or "no usage in the response"
            price = engine.prices.price(target.provider, target.model)
            if price is None:
                cost, source = 0, "unpriced"
                engine.prices.note_unpriced(target.provider, target.model)
                engine.stats.unpriced_requests += 1
            else:
                cost, source = cost_nanos(price, usage), price.source
        key = self.key
        if usage is None:
            inp = out = cached = 0
        else:
            inp, out, cached = usage.input_tokens, usage.output_tokens, usage.cached_tokens
        engine.record(
            UsageRecord(
                _request_ids.next(),
                self.admitted_at,
                key.id if key else None,
                key.team_id if key else None,
                key.customer_id if key else None,
                target.provider,
                target.model,
                target.tags,
                inp,
                out,
                cached,
                cost,
                source,
                self.status,
                self.stream is not None,
                outcome,
                estimated,
                note,
                (perf_counter() - self.started) * 1000,
            )
        )
        return cost, inp + out

    def settle_now(self, outcome: str) -> None:
        """Settle in process (memory counters): no await between the charge and the counters."""
        cost, tokens = self._charge(outcome)
        assert self.ticket is not None
        self.engine.settle_now(self.ticket, cost, tokens)

    async def settle_shared(self, outcome: str) -> None:
        cost, tokens = self._charge(outcome)
        assert self.ticket is not None
        await self.engine.settle(self.ticket, cost, tokens)


_REQUEST_HEADERS = (
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-reset-requests",
)
_TOKEN_HEADERS = (
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-tokens",
)


def _rate_headers(
    out: list[tuple[bytes, bytes]],
    names: tuple[bytes, bytes, bytes],
    window: WindowCounter,
    remaining: int,
    now: float,
) -> None:
    left = window.end - now
    reset = b"never" if left == FAR_FUTURE else b"%.0fs" % (left if left > 0 else 0)
    out.append((names[0], window.limit_text))
    out.append((names[1], b"%d" % remaining))
    out.append((names[2], reset))
