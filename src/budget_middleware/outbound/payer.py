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
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

from budget_middleware.core.identity import key_digest

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Payer:
    virtual_key: str | None
    virtual_key_id: str | None
    tags: tuple[str, ...]
    digest: bytes | None = None  # of `virtual_key`, hashed once: the key cache's index


class _Noting:
    """Whether `BudgetMiddleware` notes inbound callers: only once a transport exists in the
    process (a context variable set and reset costs ~1 µs a request; an app that never calls out
    through the transport does not pay it)."""

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
        self._tokens: list[Token[Payer | None]] = []

    def __enter__(self) -> charge_to:
        self._tokens.append(payer.set(self.payer))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        payer.reset(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        """As a decorator of a plain or an async function: every call runs inside."""
        chosen = self.payer

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token = payer.set(chosen)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    payer.reset(token)

            return cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = payer.set(chosen)
            try:
                return fn(*args, **kwargs)
            finally:
                payer.reset(token)

        return cast(F, run)
