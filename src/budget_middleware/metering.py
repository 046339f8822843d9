"""One metered exchange: pass the response on untouched, measure it, settle it exactly once."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .admission import Ticket
from .identity import Target
from .limits import FAR_FUTURE, WindowCounter
from .pricing import cost_nanos, nanos_from_usd
from .scopes import KeyConfig, Scope
from .sse import StreamMeter
from .usage import BodyDecoder, TokenUsage, usage_from_json

if TYPE_CHECKING:
    from .engine import BudgetEngine

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_TAIL = 1 << 20  # of a huge JSON answer keep the last MiB: usage sits at the end
_COST_HEADER = b"x-budget-cost"


@dataclass(slots=True, eq=False)
class RequestContext:
    key: KeyConfig | None
    target: Target
    scopes: tuple[Scope, ...]
    prompt_tokens: int  # estimated, for reservations and cut streams
    admitted_at: float
    injected_usage: bool = False


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


_NONE: tuple[WindowCounter | None, int] = (None, 0)


def _tighter(
    window: WindowCounter, best: tuple[WindowCounter | None, int]
) -> tuple[WindowCounter | None, int]:
    """`window` and what it has left, if that is less than `best` leaves."""
    left = window.limit - window.value
    if left < 0:
        left = 0
    return (window, left) if best[0] is None or left < best[1] else best


class Exchange:
    """Tracks where the response is; never sends a second start, never holds a chunk back."""

    def __init__(
        self, engine: BudgetEngine, context: RequestContext, ticket: Ticket, started: float
    ) -> None:
        self.engine = engine
        self.context = context
        self.ticket = ticket
        self.started = started
        self.status = 0
        self.response_started = False
        self.response_complete = False
        self.header_cost: int | None = None
        self.stream: StreamMeter | None = None
        self.json_parts: list[bytes] = []
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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:  # the body once; then the real receive (a disconnect, say)
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect" and not self.response_complete:
                self.client_gone = True
            return message

        async def forward(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self._on_start(message)
            elif message["type"] == "http.response.body":
                message = self._on_body(message)
            try:
                await send(message)
            except OSError:
                self.client_gone = True
                raise

        outcome = "upstream_error"
        try:
            await app(scope, replay, forward)
            outcome = "completed"
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            if self.client_gone and not self.response_complete:
                outcome = "client_disconnected"
            await self._settle(outcome)

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
            if lname == _COST_HEADER:
                try:
                    self.header_cost = nanos_from_usd(float(value))
                except ValueError:
                    self.header_cost = None
                continue
            if lname == b"content-type":
                event_stream = value.startswith(b"text/event-stream")
            elif lname == b"content-encoding":
                encoding = value.lower().strip()
            kept.append((name, value))
        if encoding and encoding != b"identity":
            decoder = BodyDecoder(encoding.decode("latin-1"))
            if decoder.supported:
                self.decoder = decoder
            else:
                self.unreadable = f"content-encoding {encoding.decode('latin-1')} not readable"
        if event_stream:
            self.stream = StreamMeter(
                drop_usage_chunk=self.context.injected_usage and self.decoder is None
            )
        kept.extend(self._limit_headers())
        return {**message, "headers": kept}

    def _on_body(self, message: Message) -> Message:
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if not more:
            self.response_complete = True
        if self.unreadable is not None:
            return message
        plain = chunk
        if self.decoder is not None:
            plain = self.decoder.feed(chunk) if chunk else b""
            if not more:
                plain += self.decoder.flush()
            if self.decoder.error is not None:
                self.unreadable = self.decoder.error
                return message
        stream = self.stream
        if stream is not None:
            if self.decoder is not None:
                stream.feed(plain)  # measure only: the compressed bytes go on untouched
                return message
            out = stream.feed(chunk)
            if not more:
                out += stream.finish()
            if out is chunk:
                return message
            return {**message, "body": out}
        if plain:
            self.json_parts.append(plain)
            self.json_size += len(plain)
            if self.json_size > 2 * _JSON_TAIL:  # keep the tail only
                tail = b"".join(self.json_parts)[-_JSON_TAIL:]
                self.json_parts, self.json_size = [tail], len(tail)
        return message

    def _limit_headers(self) -> list[tuple[bytes, bytes]]:
        """Rate-limit and budget headers of the tightest applicable limits (ties keep the first)."""
        requests = tokens = budget = _NONE
        for scope in self.context.scopes:
            for counter in scope.budgets:
                budget = _tighter(counter, budget)
            rate = scope.rate_limit
            if rate is not None:
                if rate.requests is not None:
                    requests = _tighter(rate.requests, requests)
                if rate.tokens is not None:
                    tokens = _tighter(rate.tokens, tokens)
        out: list[tuple[bytes, bytes]] = []
        now = self.context.admitted_at
        if requests[0] is not None:
            out += _rate_headers(_REQUEST_HEADERS, requests[0], requests[1], now)
        if tokens[0] is not None:
            out += _rate_headers(_TOKEN_HEADERS, tokens[0], tokens[1], now)
        if budget[0] is not None:
            out.append((b"x-budget-limit", b"%.6f" % (budget[0].limit / 1e9)))
            out.append((b"x-budget-remaining", b"%.6f" % (budget[1] / 1e9)))
        return out

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
                usage.input_tokens or self.context.prompt_tokens,
                max(usage.output_tokens, streamed),
                usage.cached_tokens,
                usage.cache_write_tokens,
            )
        if self.json_parts:
            body = self.json_parts[0] if len(self.json_parts) == 1 else b"".join(self.json_parts)
            return usage_from_json(body)
        return None

    async def _settle(self, outcome: str) -> None:
        engine = self.engine
        context = self.context
        target = context.target
        usage = None if self.unreadable else self._usage()
        estimated = self.estimated
        note = self.unreadable
        streamed = self.stream is not None
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
                usage = TokenUsage(context.prompt_tokens, (output_chars + 3) // 4)
                note = note or "no usage in the response"
            price = engine.prices.price(target.provider, target.model)
            if price is None:
                cost, source = 0, "unpriced"
                engine.prices.note_unpriced(target.provider, target.model)
                engine.stats.unpriced_requests += 1
            else:
                cost, source = cost_nanos(price, usage), price.source
        tokens = usage.total_tokens if usage is not None else 0
        await engine.settle(self.ticket, cost, tokens)
        key = context.key
        engine.record(
            {
                "request_id": _request_ids.next(),
                "created_at": datetime.fromtimestamp(context.admitted_at, UTC),
                "virtual_key_id": key.id if key else None,
                "team_id": key.team_id if key else None,
                "customer_id": key.customer_id if key else None,
                "provider": target.provider,
                "model": target.model,
                "tags": list(target.tags),
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "cached_tokens": usage.cached_tokens if usage else 0,
                "cost_nanos": cost,
                "cost": cost / 1e9,
                "cost_source": source,
                "status": self.status,
                "streamed": streamed,
                "outcome": outcome,
                "estimated": estimated,
                "note": note,
                "duration_ms": (perf_counter() - self.started) * 1000,
            }
        )


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
    names: tuple[bytes, bytes, bytes], window: WindowCounter, remaining: int, now: float
) -> tuple[tuple[bytes, bytes], ...]:
    left = window.end - now
    reset = b"never" if left == FAR_FUTURE else b"%.0fs" % (left if left > 0 else 0)
    return (
        (names[0], b"%d" % window.limit),
        (names[1], b"%d" % remaining),
        (names[2], reset),
    )
