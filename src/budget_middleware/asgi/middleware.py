"""The pure ASGI middleware: a thin adapter between the host app and the engine.

Read the request once, ask the engine, pass the request on (its body replayed exactly once), watch
the response go by without holding it back, and settle the charge however the response ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, NamedTuple

from budget_middleware.answers import (
    ErrorAnswer,
    error_answer,
    refusal_answer,
    route_refusal_answer,
    unpriced_message,
)
from budget_middleware.asgi.exchange import Exchange
from budget_middleware.core.admission import Refusal, Ticket
from budget_middleware.core.identity import (
    Credentials,
    Target,
    TargetResolver,
    header_reader,
    key_digest,
    route_path,
)
from budget_middleware.core.pricing import estimate_nanos
from budget_middleware.core.routing import Route, by_room, room
from budget_middleware.core.scopes import KeyConfig
from budget_middleware.core.usage import JSON_ERRORS, json_loads
from budget_middleware.engine.cache import NOT_CACHED
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.exceptions import ConfigurationError
from budget_middleware.settings import BudgetSettings, raised_again

Scope_ = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope_, Receive, Send], Awaitable[None]]

logger = logging.getLogger("budget_middleware")

_USAGE_PATHS = ("/chat/completions", "/completions")  # OpenAI-style: `stream_options` applies
_UNKNOWN = "Unknown virtual key"


class BudgetState(NamedTuple):
    """`request.state.budget`: who is calling, for the host app to route on (read-only)."""

    virtual_key_id: str | None
    team_id: str | None
    customer_id: str | None
    provider: str
    model: str
    tags: tuple[str, ...]


class Refused(NamedTuple):
    """A refusal worked out before admission: (status, code, message) of its answer."""

    status: int
    code: str
    message: str


@dataclass(slots=True)
class RoutePlan:
    """A request naming a route: its targets prepared (in the order they are tried), and the
    answer of each target refused so far, by its index in the route."""

    route: Route
    parsed: dict[str, Any]
    usage_path: bool  # an OpenAI-style path, where a stream is asked for its usage
    candidates: list[tuple[int, Exchange]] = field(default_factory=list)
    refused: dict[int, tuple[str, ErrorAnswer]] = field(default_factory=dict)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BudgetMiddleware:
    """`app.add_middleware(BudgetMiddleware)`: budgets and rate limits for every metered request."""

    def __init__(
        self,
        app: ASGIApp,
        settings: BudgetSettings | None = None,
        *,
        engine: BudgetEngine | None = None,
    ) -> None:
        self.app = app
        self.error: Exception | None = None
        try:
            self.engine = engine if engine is not None else get_engine(settings)
        except Exception as exc:  # reported at lifespan startup, where a server stops on it
            self._fail(exc)
            return
        listeners = self.engine.failure_listeners
        listeners[:] = [ref for ref in listeners if ref() is not None]
        listeners.append(weakref.WeakMethod(self._fail))
        if self.engine.failure is not None:
            self._fail(self.engine.failure)
            return
        s = self.engine.settings
        self.suffixes = s.inference_paths
        self.read_headers = header_reader(s.key_header, s.key_prefix)
        self.max_body = s.max_body_bytes
        self.reserve = s.reserve
        self.default_output = s.default_max_output_tokens
        self.fail_open = s.fail_open
        self.require_key = s.require_virtual_key
        self.exceeded_status = s.exceeded_status
        self.resolve_target = TargetResolver(self.engine.prices.guess_provider)
        self.price = self.engine.prices.price
        self.refuse_unpriced = s.unpriced_models == "refuse"
        self.key_required = (
            "A virtual key is required: send it in the "
            f"'{s.key_header}' header or as 'Authorization: Bearer {s.key_prefix}…'"
        )

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["method"] == "POST" and scope["path"].endswith(self.suffixes):
                await self._metered(scope, receive, send)
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _fail(self, error: Exception) -> None:
        """This middleware cannot work (invalid settings or configuration): from now on every
        request raises `error` again, and a lifespan startup fails with its message."""
        self.error = error
        self.suffixes = ()
        self.app = _Unusable(error)

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope_, receive: Receive, send: Send) -> None:
        # The engine starts before the host app does, so that a configuration error stops the
        # server before anything of the app has started (nothing is left half-started).
        first = await receive()
        if first["type"] == "lifespan.startup" and self.error is None:
            try:
                await self.engine.ensure_started()
            except ConfigurationError as exc:  # final: the server must stop
                self._fail(exc)
            except Exception as exc:  # the store may come later: requests retry
                logger.error("budget-middleware could not start: %s", exc)
        if self.error is not None:
            await send({"type": "lifespan.startup.failed", "message": str(self.error)})
            return
        pending = [first]

        async def on_receive() -> Message:
            return pending.pop() if pending else await receive()

        async def on_send(message: Message) -> None:
            # After the app's own shutdown, or when the app itself could not start.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.startup.failed"):
                await self.engine.shutdown()
            await send(message)

        await self.app(scope, on_receive, on_send)

    # -- metered requests ----------------------------------------------------------------

    async def _metered(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if self.error is not None:
            raise self.error
        engine = self.engine
        started = perf_counter()
        credentials = self.read_headers(scope["headers"])
        if credentials.content_length is not None and credentials.content_length > self.max_body:
            await _answer(send, _too_large(self.max_body))
            return
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body = message.get("body", b"")  # the whole body in one message: the usual case
            if len(body) > self.max_body:
                await _answer(send, _too_large(self.max_body))
                return
        else:
            try:
                body = await _read_body(message, receive, self.max_body)
            except BodyTooLarge:
                await _answer(send, _too_large(self.max_body))
                return
            except ClientGone:
                return
        if not engine.started:
            try:
                await engine.ensure_started()
            except ConfigurationError:
                raise  # final: the configuration is wrong, not the store away
            except Exception:
                if not self.fail_open:
                    await _answer(send, _unavailable())
                    return
        if engine.stale:
            await engine.ensure_current()
        key: KeyConfig | None = None
        if credentials.key is not None:
            digest = key_digest(credentials.key)
            found = engine.keys.get(digest)  # a cached key: no await
            if found is NOT_CACHED:
                try:
                    found = await engine.lookup_key(credentials.key)
                except ServiceUnavailable:
                    # Fail open admits a key this process has seen valid, on its last-known
                    # limits; a key it cannot vouch for is never admitted.
                    found = engine.last_known.get(digest) if self.fail_open else None
                    if found is None:
                        await _answer(send, _unavailable())
                        return
                else:
                    if found is None:
                        await _answer(send, self._refuse(401, "invalid_virtual_key", _UNKNOWN))
                        return
            elif found is None:
                await _answer(send, self._refuse(401, "invalid_virtual_key", _UNKNOWN))
                return
            key = found
        elif self.require_key:
            await _answer(send, self._refuse(401, "virtual_key_required", self.key_required))
            return
        decision = self._decide(scope, body, credentials, key, started)
        if type(decision) is ErrorAnswer:
            await _answer(send, decision)
            return
        if type(decision) is RoutePlan:
            try:
                routed = await self._admit_route(decision)
            except ServiceUnavailable:
                await _answer(send, _unavailable())
                return
            if type(routed) is ErrorAnswer:
                await _answer(send, routed)
                return
            exchange: Exchange = routed  # type: ignore[assignment]
            decision.parsed["model"] = exchange.route_target
            if exchange.target.stream and decision.usage_path:
                exchange.parsed = decision.parsed  # rewritten once, with stream_options
            else:
                body, scope = _rewritten(scope, decision.parsed)
        else:
            exchange = decision  # type: ignore[assignment]
            ticket: Ticket | Refusal
            if engine.in_process:
                ticket = engine.admit_now(exchange.limits, exchange.ticket_estimate)
            else:
                try:
                    ticket = await engine.admit(exchange.limits, exchange.ticket_estimate)
                except ServiceUnavailable:
                    await _answer(send, _unavailable())
                    return
            if isinstance(ticket, Refusal):
                answer = refusal_answer(ticket, self.exceeded_status, exchange.admitted_at)
                await _answer(send, answer)
                return
            exchange.ticket = ticket
        target = exchange.target
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["budget"] = exchange.caller = BudgetState(
            virtual_key_id=key.id if key else None,
            team_id=key.team_id if key else None,
            customer_id=key.customer_id if key else None,
            provider=target.provider,
            model=target.model,
            tags=target.tags,
        )
        if target.stream and exchange.parsed is not None:
            body, scope = _ask_for_usage(scope, exchange, body)
        exchange.parsed = None
        exchange.body = body
        exchange.receive_ = receive
        exchange.send_ = send
        outcome = "upstream_error"
        try:
            await self.app(scope, exchange.replay, exchange.forward)
            outcome = "completed"
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            if exchange.client_gone and not exchange.response_complete:
                outcome = "client_disconnected"
            if engine.in_process:
                exchange.settle_now(outcome)
            else:
                await exchange.settle_shared(outcome)

    def _refuse(self, status: int, code: str, message: str) -> ErrorAnswer:
        refused = self.engine.stats.refused
        refused[code] = refused.get(code, 0) + 1
        return error_answer(status, code, message)

    def _decide(
        self,
        scope: Scope_,
        body: bytes,
        credentials: Credentials,
        key: KeyConfig | None,
        started: float,
    ) -> Exchange | ErrorAnswer | RoutePlan:
        """Everything before admission that needs no await: the key's state, the target (or a
        route's targets), the provider policy, the applicable scopes and the reservation."""
        engine = self.engine
        now = engine.clock()
        if key is not None:
            if not key.is_active:
                return self._refuse(
                    403, "virtual_key_inactive", f"Virtual key '{key.name}' is inactive"
                )
            if key.expires_at is not None and key.expires_at <= now:
                return self._refuse(
                    403, "virtual_key_expired", f"Virtual key '{key.name}' has expired"
                )
        parsed = _parse_json(body)
        path = route_path(scope)
        target = self.resolve_target(parsed, path, credentials, key.tags if key is not None else ())
        prompt_tokens = len(body) // 3 + 1  # a generous guess: JSON is mostly text, ~4 chars/token
        routes = engine.globals.routes
        if routes and type(parsed) is dict:  # no route configured: one truth test
            name = parsed.get("model")
            route = routes.get(name) if type(name) is str else None
            if route is not None:
                return self._plan_route(
                    route, parsed, path, credentials, key, target, prompt_tokens, now, started
                )
        exchange = self._prepare(key, target, prompt_tokens, now, started)
        if type(exchange) is not Exchange:
            return self._refuse(*exchange)  # type: ignore[misc]
        if target.stream and type(parsed) is dict and path.endswith(_USAGE_PATHS):
            exchange.parsed = parsed
        return exchange

    def _prepare(
        self,
        key: KeyConfig | None,
        target: Target,
        prompt_tokens: int,
        now: float,
        started: float,
    ) -> Exchange | Refused:
        """A request for `target`: may the key use it, its limits, its price and reservation."""
        if key is not None and key.policies:
            policy = key.policies.get(target.provider)
            if policy is None:
                return Refused(
                    403,
                    "provider_not_allowed",
                    f"Virtual key '{key.name}' may not use provider '{target.provider}'",
                )
            if not policy.allows(target.model):
                return Refused(
                    403,
                    "model_not_allowed",
                    f"Virtual key '{key.name}' may not use model '{target.model}' "
                    f"of provider '{target.provider}'",
                )
        engine = self.engine
        if key is None:
            limits = engine.globals.resolve_anonymous(target.provider, target.model, target.tags)
        else:
            limits = key.resolve(engine.globals, target.provider, target.model, target.tags)
        price = self.price(target.provider, target.model)  # once: it prices the charge too
        if price is None and self.refuse_unpriced:  # BUDGET_UNPRICED_MODELS=refuse
            message = unpriced_message(target.provider, target.model)
            return Refused(403, "model_not_priced", message)
        exchange = Exchange(engine, key, target, limits, price, prompt_tokens, now, started)
        if self.reserve and limits.budgets:
            output = target.max_output_tokens
            exchange.ticket_estimate = estimate_nanos(
                price, prompt_tokens, self.default_output if output is None else output
            )
        return exchange

    # -- routes (SPEC §12) ---------------------------------------------------------------

    def _plan_route(
        self,
        route: Route,
        parsed: dict[str, Any],
        path: str,
        credentials: Credentials,
        key: KeyConfig | None,
        target: Target,
        prompt_tokens: int,
        now: float,
        started: float,
    ) -> RoutePlan:
        """Each target of the route prepared as a request of its own; those the key may not use
        (or that have no price, where unpriced models are refused) are set aside as refused."""
        plan = RoutePlan(route, parsed, path.endswith(_USAGE_PATHS))
        for index, route_target in enumerate(route.targets):
            retargeted = self.resolve_target.retarget(target, route_target.text, credentials, path)
            prepared = self._prepare(key, retargeted, prompt_tokens, now, started)
            if type(prepared) is Exchange:
                prepared.route_target = route_target.text
                plan.candidates.append((index, prepared))
            else:
                refused: Refused = prepared  # type: ignore[assignment]
                plan.refused[index] = (refused.code, error_answer(*refused))
        if route.strategy == "most_remaining" and len(plan.candidates) > 1:
            ranked = by_room([(room(e.limits, now), n) for n, (_, e) in enumerate(plan.candidates)])
            plan.candidates = [plan.candidates[n] for n in ranked]
        return plan

    async def _admit_route(self, plan: RoutePlan) -> Exchange | ErrorAnswer:
        """The first candidate admitted (in process: in one step, no await between targets);
        else one answer for all (SPEC §12). Counted once, whatever the number of targets."""
        engine = self.engine
        options = [(e.limits, e.ticket_estimate) for _, e in plan.candidates]
        if engine.in_process:
            first = engine.admit_first_now(options)
        else:
            first = await engine.admit_first(options)
        if first.ticket is not None:
            engine.stats.admitted += 1
            exchange = plan.candidates[first.index][1]
            exchange.ticket = first.ticket
            return exchange
        for (index, exchange), refusal in zip(plan.candidates, first.refusals, strict=True):
            answer = refusal_answer(refusal, self.exceeded_status, exchange.admitted_at)
            plan.refused[index] = (refusal.code, answer)
        tried = [
            (route_target.text, *plan.refused[index])
            for index, route_target in enumerate(plan.route.targets)
        ]
        answer, code = route_refusal_answer(tried)
        refused = engine.stats.refused
        refused[code] = refused.get(code, 0) + 1
        return answer


class _Unusable:
    """Stands in for the host app of a middleware that could not be set up: every request
    raises the error that stopped it (a copy each time), naming the variable or the file."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        raise raised_again(self.error)


def _parse_json(body: bytes) -> Any:
    try:
        return json_loads(body)  # orjson: a third of the stdlib's time
    except JSON_ERRORS:
        pass
    # What orjson refuses and the stdlib reads (NaN, integers over 64 bits, UTF-16 bodies) is
    # read as before; such bodies are rare, so only they pay for the second parse.
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: not ours to read
        return None


def _ask_for_usage(scope: Scope_, exchange: Exchange, body: bytes) -> tuple[bytes, Scope_]:
    """Ask an OpenAI-style stream for its usage; the chunk it adds is removed on the way back."""
    parsed = exchange.parsed
    assert parsed is not None
    options = parsed.get("stream_options")
    if (isinstance(options, dict) and options.get("include_usage") is True) or (
        options is not None and not isinstance(options, dict)  # malformed: left as written
    ):
        if exchange.route_target is not None:  # a route's target: the model is rewritten
            return _rewritten(scope, parsed)
        return body, scope
    parsed["stream_options"] = {**(options or {}), "include_usage": True}
    exchange.injected_usage = True
    return _rewritten(scope, parsed)


def _rewritten(scope: Scope_, parsed: dict[str, Any]) -> tuple[bytes, Scope_]:
    """The request's body as `parsed` now is, and its scope with the new `content-length`."""
    new_body = json.dumps(parsed, ensure_ascii=False).encode()
    headers = [(n, v) for n, v in scope["headers"] if n != b"content-length"]
    headers.append((b"content-length", str(len(new_body)).encode()))
    return new_body, {**scope, "headers": headers}


async def _read_body(first: Message, receive: Receive, limit: int) -> bytes:
    """The body of a request sent in several messages (`first` is the first one)."""
    chunks: list[bytes] = []
    size = 0
    message = first
    while True:
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
        message = await receive()
    return b"".join(chunks)


async def _answer(send: Send, answer: ErrorAnswer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})


def _too_large(limit: int) -> ErrorAnswer:
    return error_answer(
        413,
        "request_too_large",
        f"Request body is larger than BUDGET_MAX_BODY_BYTES ({limit} bytes)",
    )


def _unavailable() -> ErrorAnswer:
    return error_answer(
        503,
        "service_unavailable",
        "The budget store cannot be reached; the request was not sent (BUDGET_FAIL_OPEN=false)",
        headers=[(b"retry-after", b"1")],
    )
