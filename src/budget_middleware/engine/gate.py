"""The way in for every adapter (SPEC §5, §12): from a request's body, path, credentials and key
to an admitted `Exchange` or the answer that refuses it. No HTTP of its own: the ASGI middleware
and the outbound transport read their requests and hand over the same four things.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from cachetools import LRUCache

from budget_middleware.answers import (
    ErrorAnswer,
    error_answer,
    refusal_answer,
    request_too_large,
    route_refusal_answer,
    store_unavailable,
    unpriced_message,
)
from budget_middleware.core.admission import FirstAdmitted, Refusal, Ticket
from budget_middleware.core.identity import (
    Credentials,
    Target,
    TargetResolver,
    form_fields,
    lax_true,
    plain_path,
)
from budget_middleware.core.media import (
    asked_image_tokens,
    drawn_image_tokens,
    inline_image_tokens,
    may_reference,
    walk,
)
from budget_middleware.core.money import MAX_CHARGE_NANOS
from budget_middleware.core.pricing import (
    ModelPrice,
    asked_prices,
    at_time,
    draws,
    estimate_nanos,
    image_tool,
    tool_image_nanos,
)
from budget_middleware.core.providers import RESOURCE_PREFIX
from budget_middleware.core.routing import Route
from budget_middleware.core.scopes import KeyConfig, Scope
from budget_middleware.core.times import from_ts, rfc3339
from budget_middleware.core.usage import (
    IMAGE_TOOL,
    BodyDecoder,
    json_bytes,
    json_loads,
)
from budget_middleware.engine.exchange import Exchange
from budget_middleware.exceptions import ServiceUnavailable

if TYPE_CHECKING:
    from budget_middleware.engine.engine import BudgetEngine

USAGE_PATHS = ("/chat/completions", "/completions")  # OpenAI-style: `stream_options` applies


def asks_usage(path: str, credentials: Credentials) -> bool:
    """Whether a stream to `path` is asked for its usage (`body_to_send`): an OpenAI-style path,
    unless the call goes to an API that refuses the field (`Credentials.usage_unasked`)."""
    return path.endswith(USAGE_PATHS) and not credentials.usage_unasked


_UNREAD: Any = object()  # `decide` reads the body itself
# `parse_json` of a body nested deeper than either parser reads: the model, output limit and
# tags it names are unknown, so it would be served as an unpriced model and charged nothing
# (a host that passes the bytes on to a parser with a deeper limit serves the model it names).
TOO_DEEP: Any = object()


class Undecodable(bytes):
    """A request body its `content-encoding` (gzip, deflate) does not decode (corrupt, cut
    short): the bytes as sent, marked by `Gate.plain_body` so that `decide` refuses it. Its
    model and limits cannot be read; a host whose decoder is lenient (a `zlib.decompressobj`
    that does not check the gzip trailer) would serve the model it names at no charge."""

    coding = ""


class Unreadable(bytes):
    """A request body sent in a coding read nowhere here (br, zstd): the bytes as sent, marked
    by `Gate.plain_body` so that `decide` refuses it (415) unless it reads as JSON all the same.
    Its model and limits cannot be read."""

    coding = ""


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
    key: KeyConfig | None
    asked: Target  # the request as it came, naming the route
    candidates: list[tuple[int, Exchange]] = field(default_factory=list)
    refused: dict[int, tuple[str, ErrorAnswer]] = field(default_factory=dict)
    # Shadow mode: targets the key may not use, tried as in enforce (never), and gone on with
    # only when no target is left at all.
    shadow_only: list[tuple[int, Exchange]] = field(default_factory=list)

    @property
    def ranked(self) -> bool:
        """`most_remaining`: the candidates are ranked at admission, in its atomic step."""
        return self.route.strategy == "most_remaining"


class Gate:
    """Decides, admits and counts the requests of one engine, whatever adapter they come by."""

    def __init__(self, engine: BudgetEngine) -> None:
        s = engine.settings
        self.engine = engine
        self.reserve = s.reserve
        self.default_output = s.default_max_output_tokens
        self.exceeded_status = s.exceeded_status
        self.refuse_unpriced = s.unpriced_models == "refuse"
        prices = engine.prices
        self.resolve_target = TargetResolver(
            prices.guess_provider,
            s.key_prefix,
            lambda: engine.globals.tags,
            lambda provider, model: prices.price(provider, model, warn=False) is not None,
        )
        prices.changed.append(self.resolve_target.forget)  # a deployment priced live
        self.price = engine.prices.price
        self.tool_price = engine.prices.tool_price
        # Shadow mode (SPEC §14): every check runs, nothing is refused; what would have been
        # is said on the answer, in the usage record and in the metrics.
        self.shadow = s.mode == "shadow"
        self.hooks = engine.hooks
        self.alerts = engine.alerts
        self.memory = engine.memory  # the in-process counters (`admit_now`), None on Redis
        self.max_body = s.max_body_bytes
        # Per model without a price: the most one of its requests has been charged here.
        self.unpriced_costs: LRUCache[tuple[str, str], int] = LRUCache(4096)
        # Per model: the most input tokens one medium sent by reference (an image URL, a file
        # id) has been measured to take here, beyond its request's estimate from the body.
        self.media_tokens: LRUCache[tuple[str, str], int] = LRUCache(4096)
        # Per priced model: what its latest measured answer's reported cost (`x-budget-cost`,
        # `usage.cost`) was over its tokens' price (a per-request fee: Perplexity's searches, a
        # host's markup), which its tokens' estimate does not hold. Empty as a rule, and then
        # `any_fee` (a plain attribute: tested on every request) is False.
        self.fees: LRUCache[tuple[str, str], int] = LRUCache(4096)
        self.any_fee = False
        # Per priced model: the most one of its requests with server-side tools (`_with_tools`)
        # has been charged here.
        self.tool_costs: LRUCache[tuple[str, str], int] = LRUCache(4096)
        # ... and of those whose image generation tool drew (`_with_tools`): what a request
        # offering that tool with no bound on its calls reserves at least.
        self.drawing_costs: LRUCache[tuple[str, str], int] = LRUCache(4096)

    def saw_unpriced(self, provider: str, model: str, cost: int) -> None:
        """A request to a model without a price was charged `cost`: what the next reserve."""
        key = (provider, model)
        if cost > self.unpriced_costs.get(key, -1):
            self.unpriced_costs[key] = cost

    def saw_fee(self, provider: str, model: str, over: int) -> None:
        """A measured answer of a priced model cost `over` its tokens' price (0: nothing over,
        or no cost reported): what the next requests to it reserve beside their tokens. The
        latest answer's, not the largest ever: one request's markup does not hold every later
        request of every key to it until a restart."""
        key = (provider, model)
        if over > 0:
            self.fees[key] = over
            self.any_fee = True
        elif self.fees.pop(key, None) is not None and not self.fees:
            self.any_fee = False

    def saw_tools(self, provider: str, model: str, cost: int, drew: bool = False) -> None:
        """A request with server-side tools was charged `cost`: what the next reserve; `drew`:
        its image generation tool drew images."""
        key = (provider, model)
        if cost > self.tool_costs.get(key, -1):
            self.tool_costs[key] = cost
        if drew and cost > self.drawing_costs.get(key, -1):
            self.drawing_costs[key] = cost

    def saw_media(self, provider: str, model: str, references: int, input_tokens: int) -> None:
        """A request sending `references` media by reference was measured to take
        `input_tokens`: at most that each (its text, bounded by its body, is counted as theirs
        too: what its body's estimate over-counts could hide what a medium takes, and teach 0),
        what each of the next reserve."""
        each = -(-input_tokens // references)  # rounded up
        key = (provider, model)
        if each > self.media_tokens.get(key, -1):
            self.media_tokens[key] = each

    def plain_body(self, body: bytes, encoding: str) -> bytes | None:
        """A request body sent with a `content-encoding` (gzip, deflate), decoded to be read:
        the app (or the provider) still gets it as sent. One in another coding is `Unreadable`,
        and one that does not decode (corrupt, cut short) `Undecodable`: `decide` refuses them
        (415 `unsupported_content_encoding`, 400 `undecodable_body`). None: over
        BUDGET_MAX_BODY_BYTES once decoded (a 413)."""
        decoder = BodyDecoder(encoding, max_size=self.max_body)
        if not decoder.supported:
            unreadable = Unreadable(body)  # (a copy: on this seldom path only)
            unreadable.coding = encoding
            return unreadable
        plain = decoder.decode(body)
        if plain is None:
            if decoder.oversized:
                return None
            undecodable = Undecodable(body)  # (a copy: on this refused path only)
            undecodable.coding = encoding
            return undecodable
        return plain

    def refuse(
        self,
        status: int,
        code: str,
        message: str,
        key: KeyConfig | None = None,
        target: Target | None = None,
    ) -> ErrorAnswer:
        self.engine.stats.count_refused(code)
        self.tell_refusal(code, status, key, target, None)
        return error_answer(status, code, message)

    def too_large(self, key: KeyConfig | None = None) -> ErrorAnswer:
        """413: a body over BUDGET_MAX_BODY_BYTES (as sent or decoded), a refusal as any other
        (`budget_requests_refused_total{reason="request_too_large"}`, `GET /refusals`,
        `on_refusal`), with the caller's key once it is known."""
        self.engine.stats.count_refused("request_too_large")
        self.tell_refusal("request_too_large", 413, key, None, None)
        return request_too_large(self.max_body)

    def unavailable(
        self, unknown_key: bool = False, key: KeyConfig | None = None, target: Target | None = None
    ) -> ErrorAnswer:
        """503: the store or Redis cannot decide (`answers.store_unavailable`), a refusal as
        any other (`budget_requests_refused_total{reason="service_unavailable"}`, `GET
        /refusals`, `on_refusal`), with the caller's key and target once they are known."""
        self.engine.stats.count_refused("service_unavailable")
        self.tell_refusal("service_unavailable", 503, key, target, None)
        return store_unavailable(unknown_key)

    def unavailable_after(self, decision: Exchange | RoutePlan) -> ErrorAnswer:
        """503 for a request decided and not admitted (Redis away): told with its key and
        target (a route's: the model it named)."""
        if type(decision) is RoutePlan:
            return self.unavailable(key=decision.key, target=decision.asked)
        exchange: Exchange = decision  # type: ignore[assignment]
        return self.unavailable(key=exchange.key, target=exchange.target)

    def tell_refusal(
        self,
        code: str,
        status: int | None,  # None in shadow mode: nothing was answered
        key: KeyConfig | None,
        target: Target | None,
        scope: Scope | dict[str, Any] | None,  # a dict: as the answer's `error.scope` has it
        shadow: bool = False,
    ) -> None:
        """A refusal (or, in shadow mode, a request that would have been refused): kept among
        the recent ones (`GET /refusals`) and handed to the `on_refusal` hooks."""
        hooks = self.hooks
        if scope is None or isinstance(scope, dict):
            owner = scope
        else:
            owner = {"type": scope.type, "id": scope.id, "name": scope.name}
        item = {
            "code": code,
            "status": status,
            "scope": owner,
            "virtual_key_id": None if key is None else key.id,
            "key_name": None if key is None else key.name,
            # the rest of the request's identity (SPEC §2: `request.state.budget`'s six)
            "team_id": None if key is None else key.team_id,
            "customer_id": None if key is None else key.customer_id,
            "provider": None if target is None else target.provider,
            "model": None if target is None else target.model,
            "tags": [] if target is None else list(target.tags),
            "shadow": shadow,
            "at": rfc3339(from_ts(self.engine.clock())),
        }
        hooks.recent_refusals.append(item)
        if hooks.on_refusal:
            hooks.emit(hooks.on_refusal, item)

    def _shadowed(self, exchange: Exchange, code: str) -> None:
        """In shadow mode: a request that goes on although `code` would have refused it."""
        if exchange.would_refuse is None:
            exchange.would_refuse = code

    def decide(
        self,
        body: bytes,
        path: str,
        credentials: Credentials,
        key: KeyConfig | None,
        started: float,
        shadowed: str | None = None,
        parsed: Any = _UNREAD,
    ) -> Exchange | ErrorAnswer | RoutePlan:
        """Everything before admission that needs no await: the key's state, the target (or a
        route's targets), the provider policy, the applicable scopes and the reservation.
        `shadowed`: in shadow mode, what the caller's credentials would have been refused for.
        `parsed`: `parse_json(body)`, when the adapter read it already (WSGI does, before it
        takes the lock the decision is made under)."""
        engine = self.engine
        now = engine.clock()
        if path[-1:] == "/" or "/." in path or "?" in path or "#" in path:  # (`needs_plain`)
            path = plain_path(path)
        if key is not None:
            refused: tuple[str, str] | None = None
            if not key.is_active:
                refused = "virtual_key_inactive", f"Virtual key '{key.name}' is inactive"
            elif key.expires_at is not None and key.expires_at <= now:
                refused = "virtual_key_expired", f"Virtual key '{key.name}' has expired"
            if refused is not None:
                if not self.shadow:
                    return self.refuse(403, *refused, key=key)
                shadowed = shadowed or refused[0]
        if parsed is _UNREAD:
            parsed = parse_json(body)
        if parsed is TOO_DEEP:
            if not self.shadow:
                return self.refuse(400, "request_too_deep", _TOO_DEEP, key=key)
            shadowed = shadowed or "request_too_deep"
            parsed = None
        elif parsed is None:  # no JSON: metered as it is, unless it was sent compressed
            if type(body) is Undecodable:  # what was sent, which its coding does not decode
                if not self.shadow:
                    message = _UNDECODABLE.format(body.coding)
                    return self.refuse(400, "undecodable_body", message, key=key)
                shadowed = shadowed or "undecodable_body"
            elif type(body) is Unreadable:  # a body in a coding read nowhere here
                if not self.shadow:
                    answer = self.refuse(415, "unsupported_content_encoding",
                                         _UNREADABLE.format(body.coding), key=key)  # fmt: skip
                    answer.headers.append((b"accept-encoding", b"gzip, deflate"))
                    return answer
                shadowed = shadowed or "unsupported_content_encoding"
        if key is not None:
            target = self.resolve_target(parsed, path, credentials, key.tags, credentials.key)
        else:
            target = self.resolve_target(parsed, path, credentials, ())
        prompt_tokens = len(body) // 3 + 1  # a generous guess: JSON is mostly text, ~4 chars/token
        # A key looked up, not a search of the body (a 100 KB prompt read whole for nothing);
        # a stored prompt's tools, which the body does not say, too (`_server_tools`)
        tools = (
            type(parsed) is dict
            and ("tools" in parsed or "prompt" in parsed)
            and _server_tools(parsed)
        )
        references = 0
        images: list[tuple[int, int, int]] = []
        if may_reference(body):  # media by reference, or inline? (`core.media`): text has none
            references = walk(parsed, images)
            # Prompt caching asked for (its blocks hold `"type"` too): its input may be writes,
            # dearer than input (Anthropic's: 1.25 times, 2 for a `"ttl": "1h"`)
            if body.find(b'"cache_control"') >= 0 and target.caches < 2:
                target.caches = 2 if body.find(b'"1h"') >= 0 else 1
        routes = engine.globals.routes
        if routes and type(parsed) is dict:  # no route configured: one truth test
            # The name metering reads: the call's Azure deployment over the body's (`Credentials`)
            name = parsed.get("model") if credentials.model is None else credentials.model
            route = None
            if type(name) is str:
                # The name as metered: blanks around it are no part of it (a route's has none),
                # and Gemini's `models/<name>` is the model metering read (`target.model`)
                name = name.strip()
                route = routes.get(name)
                if route is None and name.startswith(_RESOURCE):
                    route = routes.get(target.model)
            if route is not None and _deeper_than(body, parsed, _ROUTED_DEPTH):
                # Its target could not be written into it (`body_to_send`: nested deeper than
                # the stdlib writes, it was a 500 after admission, which SDKs retry)
                if not self.shadow:
                    return self.refuse(400, "request_too_deep", _TOO_DEEP_ROUTED, key=key)
                shadowed = shadowed or "request_too_deep"
                route = None  # in shadow mode: served as named
            if route is not None:
                request, orjson_writes = for_rewrite(parsed, body)
                plan = self._plan_route(
                    route, request, path, credentials, key, target, prompt_tokens, now, started,
                    images,
                )  # fmt: skip
                for _, candidate in plan.candidates + plan.shadow_only:
                    candidate.orjson_writes = orjson_writes
                    if references:
                        self._with_media(candidate, references)
                    if tools:
                        self._with_tools(candidate, parsed)
                    if shadowed is not None:  # the credentials' refusal first, as in enforce
                        candidate.would_refuse = shadowed
                left = plan.candidates or plan.shadow_only
                if shadowed is not None and left:
                    # Refused before any target is tried, as enforce refuses it: it goes on
                    # to the first target the key may use, its limits not asked, as one
                    # naming that target does (`_refused_first`: no slot, no reservation).
                    return left[0][1]
                return plan
        if images:  # inline images and audio: the most their pixels or length are billed
            prompt_tokens += inline_image_tokens(target.model, images, *self._weights(target))
        exchange = self._prepare(key, target, prompt_tokens, now, started)
        if type(exchange) is not Exchange:
            return self.refuse(*exchange, key=key, target=target)  # type: ignore[misc]
        if references:
            self._with_media(exchange, references)
        if tools:
            self._with_tools(exchange, parsed)
        if shadowed is not None:  # the credentials' refusal comes first, as in enforce
            exchange.would_refuse = shadowed
        if target.stream and type(parsed) is dict and asks_usage(path, credentials):
            exchange.parsed, exchange.orjson_writes = for_rewrite(parsed, body)
            exchange.ask_usage = True
        return exchange

    def admit_now(self, decision: Exchange | RoutePlan) -> Exchange | ErrorAnswer:
        """Admission in process (`engine.in_process`): no await, so atomic in its event loop.
        The counters are asked directly (the engine's `admit_now` is the same call)."""
        memory = self.memory
        assert memory is not None, "admit_now needs the in-process counters"
        if type(decision) is RoutePlan:
            options = [(e.limits, e.ticket_estimate) for _, e in decision.candidates]
            return self._routed(decision, memory.admit_first_now(options, decision.ranked))
        exchange: Exchange = decision  # type: ignore[assignment]
        if exchange.would_refuse is not None:  # shadow mode: refused before its limits
            return self._refused_first(exchange)
        return self._admitted(exchange, memory.admit_now(exchange.limits, exchange.ticket_estimate))

    async def admit(self, decision: Exchange | RoutePlan) -> Exchange | ErrorAnswer:
        """Admission by the shared counters (Redis); raises `ServiceUnavailable` when they cannot
        decide and the settings fail closed."""
        engine = self.engine
        if type(decision) is RoutePlan:
            options = [(e.limits, e.ticket_estimate) for _, e in decision.candidates]
            return self._routed(decision, await engine.admit_first(options, decision.ranked))
        exchange: Exchange = decision  # type: ignore[assignment]
        if exchange.would_refuse is not None:  # shadow mode: refused before its limits
            return self._refused_first(exchange)
        ticket = await engine.admit(exchange.limits, exchange.ticket_estimate)
        return self._admitted(exchange, ticket)

    def admitted_now(
        self,
        body: bytes,
        path: str,
        credentials: Credentials,
        key: KeyConfig | None,
        started: float,
        shadowed: str | None,
    ) -> Exchange | ErrorAnswer:
        """A request's decision and admission by the in-process counters (`engine.in_process`),
        no await between them, on the engine's loop: no coroutine made for the ASGI
        middleware's usual request."""
        decision = self.decide(body, path, credentials, key, started, shadowed)
        if type(decision) is ErrorAnswer:
            return decision
        return self.admit_now(decision)  # type: ignore[arg-type]

    async def decided_and_admitted(
        self,
        body: bytes,
        path: str,
        credentials: Credentials,
        key: KeyConfig | None,
        started: float,
        shadowed: str | None,
    ) -> Exchange | ErrorAnswer:
        """A request's decision and admission on the engine's loop, for an adapter that hands
        them there (a WSGI thread, an ASGI app served on another thread's loop): one step among
        the loop's own, as the engine's every admission is. 503 when Redis cannot decide."""
        if self.engine.in_process:
            return self.admitted_now(body, path, credentials, key, started, shadowed)
        decision = self.decide(body, path, credentials, key, started, shadowed)
        if type(decision) is ErrorAnswer:
            return decision
        try:
            return await self.admit(decision)  # type: ignore[arg-type]
        except ServiceUnavailable:
            return self.unavailable_after(decision)  # type: ignore[arg-type]

    def _refused_first(self, exchange: Exchange) -> Exchange:
        """Shadow mode: a request enforce refuses before any limit (its key unknown, turned off
        or expired, a provider or model it may not use, a model without a price where those are
        refused, a body it cannot read) goes on, its limits not asked, as enforce asks none,
        and charged to none of them, as enforce charges it nothing (`count_refused`): counted,
        it had the next request of its team reported `request_limit_exceeded`,
        `token_limit_exceeded`, `budget_exceeded` or, held, refused by its slot, where enforce
        admits it. The money it spent is in its usage record (`GET /usage`), which carries
        `would_refuse`."""
        exchange.ticket = self.engine.counters.admit_anyway(exchange.limits, 0)
        self.engine.stats.admitted += 1
        self._count_shadow(exchange)
        return exchange

    def _admitted(self, exchange: Exchange, ticket: Ticket | Refusal) -> Exchange | ErrorAnswer:
        scope: Scope | None = None
        if isinstance(ticket, Refusal):
            if ticket.counter is not None:
                self.alerts.refused(ticket)
            if not self.shadow:
                self.engine.stats.count_refused(ticket.code)  # the request's outcome, once here
                answer = refusal_answer(
                    ticket,
                    self.exceeded_status,
                    exchange.admitted_at,
                    exchange.ticket_estimate,
                    exchange.limits,
                )
                self.tell_refusal(
                    ticket.code, answer.status, exchange.key, exchange.target, ticket.scope
                )
                return answer
            if exchange.would_refuse is None:
                scope = ticket.scope
            self._shadowed(exchange, ticket.code)
            ticket = self.engine.counters.admit_anyway(exchange.limits, exchange.ticket_estimate)
        self.engine.stats.admitted += 1
        exchange.ticket = ticket
        if exchange.would_refuse is not None:
            self._count_shadow(exchange, scope)
        return exchange

    def _count_shadow(
        self,
        exchange: Exchange,
        scope: Scope | dict[str, Any] | None = None,
        target: Target | None = None,  # a route's: the target enforce's answer names
    ) -> None:
        code = exchange.would_refuse
        assert code is not None
        stats = self.engine.stats
        stats.shadow_refusals[code] = stats.shadow_refusals.get(code, 0) + 1
        told = exchange.target if target is None else target
        self.tell_refusal(code, None, exchange.key, told, scope, shadow=True)

    def _prepare(
        self,
        key: KeyConfig | None,
        target: Target,
        prompt_tokens: int,
        now: float,
        started: float,
    ) -> Exchange | Refused:
        """A request for `target`: may the key use it, its limits, its price and reservation."""
        refused: Refused | None = None
        if key is not None and key.policies:
            policy = key.policies.get(target.provider)
            if policy is None:
                refused = Refused(
                    403,
                    "provider_not_allowed",
                    f"Virtual key '{key.name}' may not use provider '{target.provider}'",
                )
            elif not policy.allows(target.model):
                refused = Refused(
                    403,
                    "model_not_allowed",
                    f"Virtual key '{key.name}' may not use model '{target.model}' "
                    f"of provider '{target.provider}'",
                )
            if refused is not None and not self.shadow:
                return refused
        engine = self.engine
        if key is None:
            limits = engine.globals.resolve_anonymous(target.provider, target.model, target.tags)
        else:
            limits = key.resolve(engine.globals, target.provider, target.model, target.tags)
        price = self.price(target.provider, target.model)  # once: it prices the charge too
        if price is not None and price.daily:  # priced by the hour (DeepSeek's peak hours)
            price = at_time(price, now)
        if price is None and self.refuse_unpriced and refused is None:  # UNPRICED_MODELS=refuse
            refused = Refused(
                403, "model_not_priced", unpriced_message(target.provider, target.model)
            )
            if not self.shadow:
                return refused
        exchange = Exchange(engine, key, target, limits, price, prompt_tokens, now, started)
        if refused is not None:  # shadow mode: it goes on
            exchange.would_refuse = refused.code
        if self.reserve and limits.budgets:
            if price is None:
                # Its cost is known only from the answer (`x-budget-cost`, `usage.cost`): the
                # most a request to this model has cost here, or, before any has ended, the
                # most one request is charged (in flight, it leaves no room on its budgets, so
                # no other request can add to an overrun it may make: SPEC §6). A call naming
                # no model (Mistral's agents, an `agent_id`: priced as the model its answer
                # names) learns nothing: one figure of every agent and model behind `unknown`
                # let 60 at once on $1, after one small call, each hold $0.000075 (spent $4.80).
                most = (
                    None
                    if target.model == "unknown"
                    else self.unpriced_costs.get((target.provider, target.model))
                )
                exchange.ticket_estimate = (
                    MAX_CHARGE_NANOS
                    if most is None
                    else min(most * target.choices, MAX_CHARGE_NANOS)  # each choice at most
                )
            else:
                if target.service_tier is not None:  # at the prices of the tier asked for
                    price = asked_prices(price, target.service_tier)
                exchange.ticket_estimate = estimate_nanos(
                    price,
                    prompt_tokens,
                    self.most_output(target, price),
                    target.spoken,
                    target.caches,
                    target.us_inference,
                )
                if self.any_fee:
                    self._with_fee(exchange)
        return exchange

    def _with_fee(self, exchange: Exchange) -> None:
        """What an answer of its model reported over its tokens' price (`saw_fee`), reserved
        beside its tokens: else requests at once each hold their tokens alone, and spend the
        fee past the budget (SPEC §6)."""
        target = exchange.target
        fee = self.fees.get((target.provider, target.model))
        if fee:
            exchange.ticket_estimate = min(exchange.ticket_estimate + fee, MAX_CHARGE_NANOS)

    def _with_tools(self, exchange: Exchange, parsed: Any) -> None:
        """A request with tools its provider runs (`_server_tools`): their results are input
        tokens its body never held, and their calls a fee each, so its estimate is no worst
        case. It reserves at least the most such a request to its model has been charged here
        (`saw_tools`); before any has ended, the most one request is charged, as for a model
        without a price: in flight, it leaves no room on its budgets, so requests at once
        cannot each add their overrun past the limit (SPEC §6: 60 searches at once spent 6
        times a $1 budget). One naming a stored prompt too: the prompt may name such tools,
        and its text is input its body never held. One offering the image generation tool
        reserves one image at the most that tool asks besides its estimate (`_image_tool`),
        whatever was learned: an answer in text alone teaches a cent, an image bills $0.25.
        With no bound on its tool calls (`max_tool_calls`), an answer may draw several: it
        reserves at least what an answer of its model that drew has cost (`drawing_costs`),
        the most one request is charged before one has (60 at once on $1, after one answered
        in text, drawing 3 images each, spent $2.27)."""
        exchange.tool_calls = True  # its answer's searches are counted
        exchange.server_tools = True  # its answer teaches the next (`saw_tools`)
        target = exchange.target
        drawn = self._image_tool(exchange, parsed)
        if exchange.price is None or not (self.reserve and exchange.limits.budgets):
            return  # unpriced: its own rule reserves
        costs = self.tool_costs
        if drawn:
            calls = parsed.get("max_tool_calls")
            if type(calls) is not int or calls < 1:  # unbounded: what one that drew cost
                costs = self.drawing_costs
        most = costs.get((target.provider, target.model), MAX_CHARGE_NANOS)
        if drawn:
            most = max(most, exchange.ticket_estimate + drawn)
        if most > exchange.ticket_estimate:
            exchange.ticket_estimate = min(most, MAX_CHARGE_NANOS)

    def _image_tool(self, exchange: Exchange, parsed: Any) -> int:
        """The most the images drawn by the image generation tool a request offers are billed,
        in nano-dollars (0: it offers none): one of the size and quality the tool asks and its
        partial images, at the tool's image model (`model`, gpt-image-1 unless it names
        another: its tokens and its image output price, the catalog's), which the exchange's
        answer is charged at (`Exchange.image_tool`); `max_tool_calls` of them where the request
        bounds its tool calls so (an answer may call the tool several times: without a bound,
        what such answers cost is learned, `saw_tools`)."""
        tools = parsed.get("tools") if type(parsed) is dict else None
        if type(tools) is not list:
            return 0
        most = 0
        for tool in tools:
            if type(tool) is dict and tool.get("type") == _IMAGE_TOOL:
                model = tool.get("model")
                if type(model) is not str or not model:
                    model = IMAGE_TOOL.model
                partials = tool.get("partial_images")
                partials = partials if type(partials) is int and partials > 0 else 0
                drawn = image_tool(model, self.tool_price(exchange.target.provider, model))
                tokens = asked_image_tokens(model, tool.get("size"), tool.get("quality"), partials)
                nanos = tool_image_nanos(tokens, drawn.rate)
                if nanos >= most:
                    most, exchange.image_tool = nanos, drawn
        calls = parsed.get("max_tool_calls")  # an image each, at most (one unless it says)
        return most * calls if type(calls) is int and calls > 1 else most

    def _weights(self, target: Target) -> tuple[int, int]:
        """How many input tokens an audio token and an image token cost at `target`'s prices
        (at least 1 each): gpt-4o-transcribe's audio $6 per Mtok, its text $2.50;
        gpt-image-1's input images $10, its text $5."""
        price = self.price(target.provider, target.model)
        if price is None:
            return 1, 1
        heard, seen = price.input_audio_per_mtok, price.input_image_per_mtok
        return _weight(heard, price), _weight(seen, price)

    def _with_media(self, exchange: Exchange, references: int) -> None:
        """A request sending `references` media by reference (SPEC §6): their input tokens are
        not in its body, so its reservation adds, for each, the most one has been measured to
        take for its model here (learned from the answers, `saw_media`). Before any has been
        measured, the most one request is charged, as for a model without a price: in flight,
        it leaves no room on its budgets, so no other request can add to an overrun it makes."""
        exchange.media_references = references  # its answer teaches the next (`saw_media`)
        target = exchange.target
        each = self.media_tokens.get((target.provider, target.model))
        price = exchange.price
        if each is not None:  # the prompt's estimate counts them: an answer without usage too
            # as images, where they are dearer than text (gpt-image-1.5's edits: $8, its text $5)
            weight = 1 if price is None else _weight(price.input_image_per_mtok, price)
            exchange.prompt_tokens += each * references * weight
        # Unpriced: its own rule reserves (the most a request to it has cost). Free input: the
        # media cost nothing.
        if (
            price is None
            or not price.input_per_mtok
            or not (self.reserve and exchange.limits.budgets)
        ):
            return
        if each is None:
            exchange.ticket_estimate = MAX_CHARGE_NANOS
        else:
            asked = asked_prices(price, target.service_tier)
            most = estimate_nanos(
                asked,
                exchange.prompt_tokens,
                self.most_output(target, price),
                target.spoken,
                target.caches,
                target.us_inference,
            )
            exchange.ticket_estimate = min(most, MAX_CHARGE_NANOS)
            if self.any_fee:
                self._with_fee(exchange)

    def most_output(self, target: Target, price: ModelPrice | None) -> int:
        """The most output a request may be answered: its limit (or the default when it sets
        none) for each choice. What a reservation counts, and an unread answer is charged.
        Without a limit, a model that draws (`draws`) may answer an image whatever is asked:
        at least the tokens of one (`drawn_image_tokens`; Gemini 2.5 Flash Image's 1,290 are
        past the default 1,024, and requests in flight together each spent past what they
        held). An Images API request has its images' limit whatever its model's prices say:
        the most one of its size and quality bills (`identity.IMAGES_API_PATHS`), `n` times."""
        output = target.max_output_tokens
        if output is None:
            output = self.default_output
            if price is not None and draws(price):
                output = max(output, drawn_image_tokens(target.model))
        return output * target.choices

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
        images: list[tuple[int, int, int]],
    ) -> RoutePlan:
        """Each target of the route prepared as a request of its own; those the key may not use
        (or that have no price, where unpriced models are refused) are set aside as refused.
        Inline images and audio count for each target as for a request naming it: its model's
        bound, audio at its own audio price (the route's name has none: weighed by it, audio
        was reserved at the text price, half what gpt-audio bills it)."""
        plan = RoutePlan(route, parsed, asks_usage(path, credentials), key, target)
        for index, route_target in enumerate(route.targets):
            retargeted = self.resolve_target.retarget(target, route_target.text, credentials, path)
            tokens = prompt_tokens
            if images:
                tokens += inline_image_tokens(retargeted.model, images, *self._weights(retargeted))
            prepared = self._prepare(key, retargeted, tokens, now, started)
            if type(prepared) is Exchange:
                prepared.route_target = route_target.text
                prepared.route_model = (
                    retargeted.model if credentials.provider_is_host else route_target.text
                )
                prepared.parsed = parsed
                prepared.ask_usage = target.stream and plan.usage_path
                code = prepared.would_refuse  # shadow mode: a policy of the key refuses it
                if code is None:
                    plan.candidates.append((index, prepared))
                else:
                    plan.shadow_only.append((index, prepared))
                    plan.refused[index] = (code, error_answer(403, code, code))
            else:
                refused: Refused = prepared  # type: ignore[assignment]
                plan.refused[index] = (refused.code, error_answer(*refused))
        return plan

    def _routed(self, plan: RoutePlan, first: FirstAdmitted) -> Exchange | ErrorAnswer:
        """The first target admitted (in process in one step, on Redis in one script call), or
        one answer for all (SPEC §12). Counted once, whatever the number of targets."""
        engine = self.engine
        for refusal in first.refusals:
            if refusal.counter is not None:
                self.alerts.refused(refusal)
        if first.ticket is not None:
            engine.stats.admitted += 1
            exchange = plan.candidates[first.index][1]
            exchange.ticket = first.ticket
            if exchange.would_refuse is not None:
                self._count_shadow(exchange)
            return exchange
        for n, refusal in zip(first.tried, first.refusals, strict=True):
            index, exchange = plan.candidates[n]
            answer = refusal_answer(
                refusal,
                self.exceeded_status,
                exchange.admitted_at,
                exchange.ticket_estimate,
                exchange.limits,
            )
            plan.refused[index] = (refusal.code, answer)
        tried = [
            (route_target.text, *plan.refused[index])
            for index, route_target in enumerate(plan.route.targets)
        ]
        answer, chosen, error = route_refusal_answer(tried)
        code = error["code"]
        # Told as answered (and in shadow mode, as it would have been): the scope of the target
        # whose refusal is the answer, and that target when it was tried (else the one asked
        # for: the key may not use it).
        tried_target = dict(plan.candidates).get(chosen)
        told = tried_target.target if tried_target is not None else plan.asked
        left = plan.candidates or plan.shadow_only
        if self.shadow and left:  # the first target goes on, counted anyway
            exchange = left[0][1]
            if exchange.would_refuse is not None:  # no target the key may use: no limit asked
                return self._refused_first(exchange)
            exchange.ticket = engine.counters.admit_anyway(
                exchange.limits, exchange.ticket_estimate
            )
            engine.stats.admitted += 1
            self._shadowed(exchange, code)
            self._count_shadow(exchange, error.get("scope"), told)
            return exchange
        engine.stats.count_refused(code)
        self.tell_refusal(code, answer.status, plan.key, told, error.get("scope"))
        return answer


def _weight(dearer: float | None, price: ModelPrice) -> int:
    """How many input tokens a token of an input kind priced `dearer` (audio, images; None: at
    the input price) costs at `price` (at least 1): an estimate counting them as input covers
    them so."""
    if dearer is None or not price.input_per_mtok:
        return 1
    return max(1, math.ceil(dearer / price.input_per_mtok))


_TOO_DEEP = "Request body is JSON nested deeper than budget-middleware reads: it cannot be metered"
# A routed body is written again naming its target: nested deeper than this, it is refused (the
# stdlib writes ~990 levels less the stack's; orjson reads 1,024).
_ROUTED_DEPTH = 512
_RESOURCE = RESOURCE_PREFIX + "/"  # Gemini's `models/<name>`, a route's name as metering reads it
_TOO_DEEP_ROUTED = (
    f"Request body is JSON nested deeper than {_ROUTED_DEPTH} levels, which budget-middleware "
    "cannot write again naming the route's target"
)


def _deeper_than(body: bytes, parsed: Any, limit: int) -> bool:
    """Whether `parsed` (read from `body`) nests arrays and objects deeper than `limit`: at
    once (in C) for a body holding no more brackets than that, as every usual one does."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if type(value) is dict else value
        stack.extend((item, depth + 1) for item in items if type(item) in (dict, list))
    return False


# A body sent in a coding the middleware cannot decode (and not JSON as it is): a host or
# provider that decodes it would be served a model the middleware never saw, at no charge.
_UNREADABLE = (
    "Request body is sent with content-encoding {!r}, which budget-middleware cannot read to "
    "meter it: send it as is, or with gzip or deflate"
)


# A body its content-encoding does not decode (`Undecodable`), for the same reason.
_UNDECODABLE = (
    "Request body is sent with content-encoding {!r} but does not decode (corrupt or cut "
    "short): budget-middleware cannot read it to meter it"
)


# The tools a provider runs itself, by their `type`'s start: Anthropic's `web_search_20250305`,
# `web_fetch_…`, `code_execution_…` and `advisor_…` (another model's sub-inferences, billed at
# its prices: Opus advising Haiku), OpenAI's Responses `web_search` (`_preview`), `file_search`,
# `code_interpreter` and `image_generation`. Client tools (`function`, `custom`, none) are not.
_IMAGE_TOOL = "image_generation"  # its images are reserved apart (`Gate._image_tool`)
_SERVER_TOOLS = (
    "web_search",
    "web_fetch",
    "code_execution",
    "advisor",
    "code_interpreter",
    "file_search",
    _IMAGE_TOOL,
)


def _server_tools(parsed: Any) -> bool:
    """Whether a request's body asks for tools its provider runs and bills (`_with_tools`): a
    `tools` entry does, or it names a Responses API stored prompt (`prompt: {"id": ...}`), whose
    tools its body does not say."""
    tools = parsed.get("tools") if type(parsed) is dict else None
    if type(tools) is list and any(
        type(tool) is dict
        and type(kind := tool.get("type")) is str
        and kind.startswith(_SERVER_TOOLS)
        for tool in tools
    ):
        return True
    prompt = parsed.get("prompt") if type(parsed) is dict else None
    return type(prompt) is dict and "id" in prompt


def parse_json(body: bytes) -> Any:
    """The request's JSON, or a form's text fields (`form_fields`), or None when it is neither
    (such a request is still metered);
    `TOO_DEEP` when it is nested too deep to read (refused: 400 `request_too_deep`). A body
    that is JSON to a lenient parser alone is read as that parser reads it (`_lenient`)."""
    try:
        return json_loads(body)
    except RecursionError:
        return TOO_DEEP
    except ValueError:  # UnicodeDecodeError is one
        pass
    try:
        return _lenient(body)
    except RecursionError:
        return TOO_DEEP
    except ValueError:
        if type(body) is not bytes:  # what its coding does not decode: refused, not read
            return None
        return form_fields(body)  # a form's text fields (the Images API's edits), else None


_DECODER = json.JSONDecoder()
_JSON_BLANKS = " \t\r\n\ufeff"


def _lenient(body: bytes) -> Any:
    """A body as a lenient server reads it, which a host passing the bytes on may have serve
    the model it names (so it must be charged as such): a byte that is no UTF-8 as U+FFFD
    (Go's encoding/json, silently), and only the first JSON value, what follows it left unread
    (Go's `json.NewDecoder(body).Decode(&v)`, the usual way a Go server reads a request)."""
    text = body.decode("utf-8", "replace").lstrip(_JSON_BLANKS)
    return _DECODER.raw_decode(text)[0]


# What orjson would not write back as the client sent it: an integer 64 bits may not hold (orjson
# reads it as a float): of 20 digits or more, or of 19 below -2**63 (-9223372036854775809), and
# NaN or Infinity (orjson refuses them, and would write them as null). Searched for only in a
# body the middleware may rewrite.
_NOT_ORJSON = re.compile(rb"[0-9]{19}|NaN|Infinity")
# ... nor a number of a 3-digit exponent, which may be past a double's range (`1e400`: orjson
# refuses it, the stdlib reads inf, which orjson wrote back as null). Searched apart: led by a
# literal, this search costs a fifth of the one above.
_BIG_EXPONENT = re.compile(rb"[eE]\+?[0-9]{3}")


def for_rewrite(parsed: Any, body: bytes) -> tuple[Any, bool]:
    """The request as `body_to_send` may rewrite it, and whether orjson may write it back (else
    it is the stdlib's reading, written back by the stdlib, so integers and NaN stay exact)."""
    if _NOT_ORJSON.search(body) is None and _BIG_EXPONENT.search(body) is None:
        return parsed, True
    try:
        return json.loads(body), False
    except (ValueError, UnicodeDecodeError, RecursionError):
        return parsed, True


def body_to_send(exchange: Exchange) -> bytes | None:
    """The body the upstream gets when it differs from the client's: a route's target written
    as its `model`, and an OpenAI-style stream asked for its usage (the chunk that adds is
    removed on the way back). None: the body goes as the client wrote it."""
    parsed = exchange.parsed
    if parsed is None:
        return None
    exchange.parsed = None
    changed = False
    if exchange.route_model is not None:
        parsed["model"] = exchange.route_model
        changed = True
    if exchange.ask_usage:
        options = parsed.get("stream_options")
        # Asked as the host app reads the flag: `"true"` is asked too (pydantic's lax bool),
        # and its usage chunk the client's, not one to remove.
        asked = isinstance(options, dict) and lax_true(options.get("include_usage"))
        if options is None or (isinstance(options, dict) and not asked):  # else left as written
            parsed["stream_options"] = {**(options or {}), "include_usage": True}
            exchange.injected_usage = True
            changed = True
    if not changed:
        return None
    if exchange.orjson_writes:
        try:
            return json_bytes(parsed)
        except TypeError:  # nested deeper than orjson writes (it reads deeper): the stdlib's
            pass
    # NaN and integers over 64 bits as read. Deeper than the stdlib writes (a routed body is
    # refused before: `_ROUTED_DEPTH`), a stream goes as written, not asked for its usage.
    try:
        return json.dumps(parsed, ensure_ascii=False).encode()
    except RecursionError:
        if exchange.route_model is not None:
            raise  # (the adapter settles the request as failed: its slot and reservation back)
        exchange.injected_usage = False
        return None
    except UnicodeEncodeError:
        # Half a surrogate pair (`"\ud83d"`, a string cut through an emoji), which JSON may
        # escape and UTF-8 cannot hold: escaped again, as the client sent it.
        return json.dumps(parsed).encode()
