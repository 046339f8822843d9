"""The pure ASGI middleware: a thin adapter between the host app and the engine.

Read the request once, ask the engine, pass the request on (its body replayed exactly once), watch
the response go by without holding it back, and settle the charge however the response ends.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from asyncio import get_running_loop
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

import anyio.to_thread

from budget_middleware.answers import ErrorAnswer
from budget_middleware.core.identity import (
    POST,
    Credentials,
    header_reader,
    is_inference_path,
    key_digest,
    route_path,
    says_post,
)
from budget_middleware.core.scopes import KeyConfig
from budget_middleware.engine.cache import NOT_CACHED
from budget_middleware.engine.engine import BudgetEngine, ServiceUnavailable, get_engine
from budget_middleware.engine.exchange import METERED_BY, Exchange, metering, settle_unwanted
from budget_middleware.engine.gate import body_to_send
from budget_middleware.engine.hooks import Hook
from budget_middleware.engine.mounts import admin_mount, announce, refuse_django_chain
from budget_middleware.engine.portal import done_there, engine_loop
from budget_middleware.exceptions import ConfigurationError
from budget_middleware.outbound.payer import inbound_headers, noting
from budget_middleware.settings import BudgetSettings, raised_again

Scope_ = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope_, Receive, Send], Awaitable[None]]

logger = logging.getLogger("budget_middleware")

_UNKNOWN = "Unknown virtual key"
_LIFESPAN_ENDS = frozenset(
    ("lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed")
)
# Not the rewritten body's: its length is known (a body sent chunked goes with its length).
_REWRITTEN = (b"content-length", b"content-encoding", b"transfer-encoding")


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
        on_alert: Hook | None = None,
        on_refusal: Hook | None = None,
        on_settled: Hook | None = None,
    ) -> None:
        refuse_django_chain(app, "BudgetMiddleware")
        self.app = app
        self.error: Exception | None = None
        try:
            self.engine = engine if engine is not None else get_engine(settings)
            # Called off the request path with the alert, the refusal, the usage record (SPEC
            # §14). A hook that is not callable is the app's error as bad settings are: raised
            # here, in Starlette's lazy stack at lifespan startup, uvicorn took it for a
            # lifespan not supported, served on, and answered every request (/health too) 500.
            self.engine.add_hooks(on_alert=on_alert, on_refusal=on_refusal, on_settled=on_settled)
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
        self.fail_open = s.fail_open
        self.require_key = s.require_virtual_key
        self.shadow = s.mode == "shadow"
        self.gate = self.engine.gate
        self.key_required = (
            "A virtual key is required: send it in the "
            f"'{s.key_header}' header or as 'Authorization: Bearer {s.key_prefix}…'"
        )

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if noting.active:  # the transports are imported: who calls is noted, on any path
                await self._noted(scope, receive, send)
            elif is_inference_path(scope["path"], self.suffixes) and (
                scope["method"] in POST or says_post(scope["headers"])
            ):
                await self._metered(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind == "websocket" and noting.active:
            # Not metered (README), but its handshake's caller pays for the calls its handler
            # makes through `BudgetTransport` (SPEC §13), as an HTTP request's does.
            token = inbound_headers.set(scope["headers"])
            try:
                await self.app(scope, receive, send)
            finally:
                inbound_headers.reset(token)
            return
        await self.app(scope, receive, send)

    async def _noted(self, scope: Scope_, receive: Receive, send: Send) -> None:
        """The request with its caller's headers noted, for the calls the app makes through
        `BudgetTransport` while serving it (read only if it does: SPEC §13)."""
        token = inbound_headers.set(scope["headers"])
        try:
            if is_inference_path(scope["path"], self.suffixes) and (
                scope["method"] in POST or says_post(scope["headers"])
            ):
                await self._metered(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            inbound_headers.reset(token)

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
                # in a worker thread: a Django URL conf imported to find the mount may run
                # the project's sync code, which Django refuses in an event loop
                mount = await anyio.to_thread.run_sync(admin_mount, self.app)
                announce(self.engine.describe(mount))
            except ConfigurationError as exc:  # final: the server must stop
                self._fail(exc)
            except Exception as exc:  # the store may come later: requests retry
                logger.error("budget-middleware could not start: %s", exc)
        if self.error is not None:
            await send({"type": "lifespan.startup.failed", "message": str(self.error)})
            # Raised after the message, as Starlette's router does: a server that stops on the
            # message (uvicorn) ignores it, and a test client raises it. One that waits for the
            # lifespan to end instead (Starlette's TestClient) let the error pass, and hung at
            # its exit waiting for an answer to lifespan.shutdown that never came.
            raise raised_again(self.error)
        pending = [first]
        answered = stopping = ended = False

        async def on_receive() -> Message:
            nonlocal stopping
            message = pending.pop() if pending else await receive()
            stopping = stopping or message["type"] == "lifespan.shutdown"
            return message

        async def on_send(message: Message) -> None:
            nonlocal answered, ended
            answered = True
            # After the app's own shutdown (done, or failed), or when the app could not start.
            if message["type"] in _LIFESPAN_ENDS:
                ended = True
                await self.engine.shutdown()
            await send(message)

        try:
            await self.app(scope, on_receive, on_send)
        except Exception as exc:
            if answered and not (stopping or ended):  # started, then failed: told, carried on
                logger.exception("the host app's lifespan failed after its startup")
            elif answered or not pending:  # the app's own lifespan, which failed
                if stopping and not ended:  # at its shutdown, before it answered it
                    await self.engine.shutdown()
                raise
            else:
                logger.info("the host app does not handle the ASGI lifespan (%r)", exc)
        else:
            if stopping or ended:  # the app's own lifespan, to its end (or a failed start)
                if not ended:  # its shutdown taken, never answered
                    await self.engine.shutdown()
                return
        # The app does not speak the lifespan protocol (Django's ASGI app raises on it, a bare
        # ASGI function returns), or it answered the startup and returned, done with it (or
        # failed after it, which a server only logs): the lifespan is carried on here, so that
        # the server still sends its shutdown (uvicorn sends it only to a lifespan still
        # running), which writes what is pending (uvicorn stopped by SIGTERM runs no `atexit`).
        if not answered:
            await send({"type": "lifespan.startup.complete"})
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        await self.engine.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    # -- metered requests ----------------------------------------------------------------

    async def _metered(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if self.error is not None:
            raise self.error
        engine = self.engine
        if scope.get(METERED_BY) is engine:  # metered further out: counted and charged there
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        credentials = self.read_headers(scope["headers"])
        if (credentials.content_length or 0) > self.max_body:  # (the limit is at least 1)
            await _answer(send, self.gate.too_large())
            return
        # Who is calling first: a request with no valid key is answered before its body is
        # read (it could make this process read and hold BUDGET_MAX_BODY_BYTES for a 401).
        loop = engine.loop  # set once started; closed after a script's `asyncio.run`
        there = None  # the engine's loop, when another thread's runs it: its steps go there
        if loop is not get_running_loop() or not engine.started:
            # Not started, its loop closed (a script's `asyncio.run`), or another thread's loop
            # runs it: two apps of equal settings (one engine) served by two loops at once.
            if loop is None or not engine.started or loop.is_closed():
                try:
                    await engine.ensure_started()
                except ConfigurationError:
                    raise  # final: the configuration is wrong, not the store away
                except Exception:
                    if not self.fail_open:
                        await _answer(send, self.gate.unavailable())
                        return
                    engine.write_at_exit()  # admitted with no flusher: written, or kept, at exit
            there = engine_loop(engine)
        if engine.stale:
            if there is None:
                await engine.ensure_current()
            else:
                await done_there(engine, there, engine.ensure_current)
        key: KeyConfig | None = None
        shadowed: str | None = None  # shadow mode: what the credentials would be refused for
        if credentials.key is not None:
            digest = key_digest(credentials.key)
            found = engine.keys.get(digest)  # a cached key: no await
            if found is NOT_CACHED:
                value = credentials.key
                try:
                    if there is None:
                        found = await engine.vouch_for(value, self.fail_open)
                    else:
                        found = await done_there(
                            engine, there, lambda: engine.vouch_for(value, self.fail_open)
                        )
                except ServiceUnavailable:
                    await _answer(send, self.gate.unavailable(self.fail_open))
                    return
            if found is None:
                if not self.shadow:
                    await _answer(send, self.gate.refuse(401, "invalid_virtual_key", _UNKNOWN))
                    return
                shadowed = "invalid_virtual_key"  # served as a request without a key
            key = found
        elif self.require_key:
            if not self.shadow:
                answer = self.gate.refuse(401, "virtual_key_required", self.key_required)
                await _answer(send, answer)
                return
            shadowed = "virtual_key_required"
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body"):
            body = message.get("body", b"")  # the whole body in one message: the usual case
            if type(body) is not bytes:  # ASGI says bytes; a bytearray or memoryview read as one
                body = bytes(body)
            if len(body) > self.max_body:
                await _answer(send, self.gate.too_large(key))
                return
        else:
            try:
                body = await _read_body(message, receive, self.max_body)
            except BodyTooLarge:
                await _answer(send, self.gate.too_large(key))
                return
            except ClientGone:
                return
        plain = body  # as the gate reads it: decoded, when it was sent compressed
        if credentials.content_encoding is not None:
            decoded = self.gate.plain_body(body, credentials.content_encoding)
            if decoded is None:
                await _answer(send, self.gate.too_large(key))
                return
            plain = decoded
        if there is None:
            if engine.in_process:  # no await: no coroutine to make
                admitted = self.gate.admitted_now(
                    plain, route_path(scope), credentials, key, started, shadowed
                )
            else:
                admitted = await self.gate.decided_and_admitted(
                    plain, route_path(scope), credentials, key, started, shadowed
                )
        else:  # decided and admitted on the engine's loop, settled there
            admitted = await self._admitted_there(
                there, plain, route_path(scope), credentials, key, started, shadowed
            )
        if type(admitted) is ErrorAnswer:
            await _answer(send, admitted)
            return
        exchange: Exchange = admitted  # type: ignore[assignment]
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["budget"] = exchange.name_caller()
        scope[METERED_BY] = engine
        marked = metering.set(engine)  # and for a WSGI app it mounts
        exchange.receive_ = receive
        exchange.send_ = send
        outcome = "completed"
        try:  # from admission on, whatever happens is settled (a body that cannot be rewritten)
            if exchange.parsed is not None or credentials.accept_encoding is not None:
                scope, body = _as_sent(scope, body, exchange, credentials.accept_encoding)
            exchange.body = body
            await self.app(scope, exchange.replay, exchange.forward)
        except asyncio.CancelledError:
            # Cut by the server (its graceful timeout, a gone client's app killed): as when its
            # client left (below).
            outcome = exchange.client_left()
            raise
        except BaseException:
            # (An app failing on bytes past its answer's whole length, which the server refused
            # to send: the answer was served.)
            outcome = "completed" if exchange.served_whole else "upstream_error"
            raise
        finally:
            metering.reset(marked)
            if not exchange.settled:  # as a rule, settled as the answer's last chunk went
                if exchange.client_gone:  # as the last chunk went too (the send failed)
                    # Left before any answer, which the app then never gave (Django's ASGI
                    # handler cancels the view), or after its headers alone (Django reads a
                    # sync stream whole in a thread after them, and drops it all).
                    outcome = exchange.client_left()
                await exchange.settle_anywhere(outcome)

    async def _admitted_there(
        self,
        there: asyncio.AbstractEventLoop,
        body: bytes,
        path: str,
        credentials: Credentials,
        key: KeyConfig | None,
        started: float,
        shadowed: str | None,
    ) -> Exchange | ErrorAnswer:
        """A request served on a loop other than its engine's (another thread's), decided and
        admitted there (`portal.done_there`), as every admission of that engine is: admitted on
        this loop, two loops' admissions could interleave (in-process counters) or use one
        loop's Redis connections from the other ("attached to a different loop", a 500). It is
        settled there too (`Exchange.elsewhere`)."""
        admitted = await done_there(
            self.engine,
            there,
            lambda: self.gate.decided_and_admitted(body, path, credentials, key, started, shadowed),
            unwanted=settle_unwanted,
        )
        if type(admitted) is Exchange:
            admitted.elsewhere = True
        return admitted


class _Unusable:
    """Stands in for the host app of a middleware that could not be set up: every request
    raises the error that stopped it (a copy each time), naming the variable or the file."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        raise raised_again(self.error)


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


def _as_sent(
    scope: Scope_, body: bytes, exchange: Exchange, accept: str | None
) -> tuple[Scope_, bytes]:
    """The request as the app gets it: the body `body_to_send` rewrote (a route's target, a
    stream asked for its usage) with its length and no content-encoding, and an
    `accept-encoding` narrowed to the codings whose answers can be read (in clear, for a stream
    whose usage chunk is cut out)."""
    headers = scope["headers"]
    if exchange.parsed is not None:
        new_body = body_to_send(exchange)
        if new_body is not None:  # JSON as it is: its length, and no content-encoding
            body = new_body
            headers = [(n, v) for n, v in headers if n not in _REWRITTEN]
            headers.append((b"content-length", b"%d" % len(body)))
        if exchange.injected_usage:
            accept = "identity"
    if accept is not None:
        headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
        headers.append((b"accept-encoding", accept.encode("latin-1")))
    return {**scope, "headers": headers}, body


async def _answer(send: Send, answer: ErrorAnswer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})
