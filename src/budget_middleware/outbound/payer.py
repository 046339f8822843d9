"""Who pays for a call the app makes (SPEC §13), first that applies: `charge_to(...)` around the
call; else the caller of the inbound request being served (`BudgetMiddleware` notes its headers
for every request, on any path, once a transport exists: one context variable, read only when
a call goes out); else
nobody (provider, model and tag limits still apply).

Context variables follow `await`s and tasks, and `asyncio.to_thread`; a thread of its own starts
with nothing set (use `charge_to` there, or `contextvars.copy_context().run`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import AsyncGeneratorType, GeneratorType, TracebackType
from typing import Any, TypeVar, cast

from budget_middleware.core.identity import key_digest

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Payer:
    # Not in its repr: an error reporter that records locals (Sentry's) would keep the key.
    virtual_key: str | None = field(repr=False)
    virtual_key_id: str | None
    tags: tuple[str, ...]
    digest: bytes | None = field(default=None, repr=False)  # of `virtual_key`, hashed once


class _Noting:
    """Whether `BudgetMiddleware` notes inbound callers: from the moment the transports' module
    is imported (`outbound/transport.py` sets it), which an app that calls out does at its top
    (a context variable set and reset costs ~0.8 µs a request in a real request's flow; an app
    that never imports the transports does not pay it)."""

    active = False


noting = _Noting()
payer: ContextVar[Payer | None] = ContextVar("budget_payer", default=None)
inbound_headers: ContextVar[Iterable[tuple[bytes, bytes]] | None] = ContextVar(
    "budget_inbound_headers", default=None
)


class charge_to:
    """Charge the calls made inside to a virtual key (by its value or its id), with tags:

    with charge_to(virtual_key="sk-bm-…", tags=["feature:summary"]):
        await client.chat.completions.create(...)

    @charge_to(virtual_key_id=key.id)
    async def summarize(text: str) -> str: ...
    """

    def __init__(
        self,
        virtual_key: str | None = None,
        *,
        virtual_key_id: str | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        if (virtual_key is None) == (virtual_key_id is None):
            raise ValueError("charge_to needs one of virtual_key (its value) or virtual_key_id")
        for value, name in ((virtual_key, "virtual_key"), (virtual_key_id, "virtual_key_id")):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"charge_to: {name} must be a non-empty string, not {value!r}")
        if isinstance(tags, str):
            raise ValueError("charge_to: tags is a list of strings, not one string")
        tags = tuple(tags)
        if not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"charge_to: every tag is a non-empty string: {tags!r}")
        digest = None if virtual_key is None else key_digest(virtual_key)
        self.payer = Payer(virtual_key, virtual_key_id, tags, digest)

    def __enter__(self) -> charge_to:
        # What it replaces is kept in the context, not on this object: one `charge_to` may be
        # entered by several tasks or threads at once, each in its own context.
        _replaced.set((*_replaced.get(), payer.get()))
        payer.set(self.payer)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        replaced = _replaced.get()
        if not replaced:
            # Left in another context than it was entered in: a FastAPI dependency written as
            # a plain `def` with `yield` runs its two halves in two threads, each with a copy
            # of the request's context (and the route in a third). It had no effect there.
            warnings.warn(
                "charge_to was left in another context than it was entered in, where it had no "
                "effect (a FastAPI dependency that yields runs its halves in two threads): make "
                "the dependency `async def`, or decorate the function that makes the calls",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        payer.set(replaced[-1])
        _replaced.set(replaced[:-1])

    def __call__(self, fn: F) -> F:
        """As a decorator of a plain or an async function, or a generator of either kind:
        every call runs inside (for a generator, each step of it)."""
        chosen = self.payer
        if inspect.isasyncgenfunction(fn):
            return cast(F, _async_generator(fn, chosen))
        if inspect.isgeneratorfunction(fn):
            return cast(F, _generator(fn, chosen))
        # (or an object whose `__call__` is async)
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token = payer.set(chosen)
                try:
                    return _entered_paid(await fn(*args, **kwargs), chosen)
                finally:
                    payer.reset(token)

            return cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = payer.set(chosen)
            try:
                result = fn(*args, **kwargs)
            finally:
                payer.reset(token)
            if inspect.iscoroutine(result):  # an async SDK's call, returned to be awaited
                return _paid(result, chosen)
            return _entered_paid(result, chosen)

        return cast(F, run)


async def _paid(call: Coroutine[Any, Any, Any], chosen: Payer) -> Any:
    """`call` awaited with the payer set: a plain function decorated with `charge_to` that
    returns the coroutine an async SDK's method made (`return client.chat.completions.create(
    ...)`) had the payer only while it made it, and the call ran unpaid when awaited."""
    token = payer.set(chosen)
    try:
        return await call
    finally:
        payer.reset(token)


# The SDKs whose stream managers (`.stream(...)`, `.with_streaming_response.create(...)`) make
# their call when entered, not when made.
_DEFERRING_SDKS = frozenset({"openai", "anthropic"})


def _entered_paid(result: Any, chosen: Payer) -> Any:
    """`result`, or, when it is an SDK's stream manager, that manager entered with the payer
    set: a function decorated with `charge_to` that returns `client.messages.stream(...)` (to
    be used as `with open_stream() as stream:`) had the payer only while it made the manager,
    and the call, made as it is entered, ran unpaid. So for a generator it returns (`return
    stream_words(prompt)`): each of its steps runs with the payer set, as a decorated
    generator's do; its calls, made as it is iterated, ran unpaid."""
    kind = type(result)
    if kind is GeneratorType:
        return _generator(lambda: result, chosen)()
    if kind is AsyncGeneratorType:
        return _async_generator(lambda: result, chosen)()
    if not kind.__name__.endswith("Manager") or (
        kind.__module__.partition(".")[0] not in _DEFERRING_SDKS
    ):
        return result
    return _PaidManager(result, chosen)


class _PaidManager:
    """An SDK's stream manager (`_entered_paid`), entered with the payer set; the rest as it is."""

    __slots__ = ("_chosen", "_manager")

    def __init__(self, manager: Any, chosen: Payer) -> None:
        self._manager = manager
        self._chosen = chosen

    def __enter__(self) -> Any:
        token = payer.set(self._chosen)
        try:
            return self._manager.__enter__()
        finally:
            payer.reset(token)

    def __exit__(self, *exc: Any) -> Any:
        return self._manager.__exit__(*exc)

    async def __aenter__(self) -> Any:
        token = payer.set(self._chosen)
        try:
            return await self._manager.__aenter__()
        finally:
            payer.reset(token)

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._manager.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        if name in _PaidManager.__slots__:  # not set (a copy made without `__init__`)
            raise AttributeError(name)
        return getattr(self._manager, name)


# The payers `charge_to` blocks replaced, innermost last, in this context.
_replaced: ContextVar[tuple[Payer | None, ...]] = ContextVar("budget_payer_replaced", default=())


def _generator(fn: Callable[..., Generator[Any, Any, Any]], chosen: Payer) -> Callable[..., Any]:
    """`fn`'s generator with the payer set while each of its steps runs (and only then: the
    code that iterates it is not charged to it). A `with charge_to(...)` open inside it across
    a `yield` holds at the next step: each step goes on with the payer the last one left."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        inner = fn(*args, **kwargs)
        state: _Inside = (chosen, ())
        step: Callable[[Any], Any] = inner.send
        value: Any = None
        try:
            while True:
                tokens = _enter(state)
                try:
                    item = step(value)
                except StopIteration as stop:
                    return stop.value
                finally:
                    state = _leave(tokens)
                try:
                    value = yield item
                    step = inner.send
                except GeneratorExit:
                    raise
                except BaseException as exc:  # thrown in: passed on to `fn`'s generator
                    step, value = inner.throw, exc
        finally:
            tokens = _enter(state)
            try:
                inner.close()
            finally:
                _leave(tokens)

    return run


def _async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], chosen: Payer
) -> Callable[..., Any]:
    """The same for an async generator."""

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        inner = fn(*args, **kwargs)
        state: _Inside = (chosen, ())
        step: Callable[[Any], Awaitable[Any]] = inner.asend
        value: Any = None
        try:
            while True:
                tokens = _enter(state)
                try:
                    item = await step(value)
                except StopAsyncIteration:
                    return
                finally:
                    state = _leave(tokens)
                try:
                    value = yield item
                    step = inner.asend
                except GeneratorExit:
                    raise
                except BaseException as exc:  # thrown in: passed on to `fn`'s generator
                    step, value = inner.athrow, exc
        finally:
            tokens = _enter(state)
            try:
                await inner.aclose()
            finally:
                _leave(tokens)

    return run


# A decorated generator's own payer and `charge_to` blocks, kept between its steps.
_Inside = tuple[Payer | None, tuple[Payer | None, ...]]
_Tokens = tuple[Token[Payer | None], Token[tuple[Payer | None, ...]]]


def _enter(state: _Inside) -> _Tokens:
    return payer.set(state[0]), _replaced.set(state[1])


def _leave(tokens: _Tokens) -> _Inside:
    """Back to the iterating code's payer; what the step left, for the next one."""
    state = (payer.get(), _replaced.get())
    _replaced.reset(tokens[1])
    payer.reset(tokens[0])
    return state
