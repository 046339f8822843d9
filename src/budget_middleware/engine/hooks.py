"""The app's hooks (SPEC §14): `on_alert`, `on_refusal`, `on_settled`, called off the request path.

A plain callable runs in this engine's one hook thread (in order, so a slow hook delays only later
hooks, never an answer, nor the process's exit past `EXIT_WAIT`); an async one runs as a task on
the engine's event loop (or, before the engine has one, in the hook thread under its own loop), as
does the coroutine a plain one returns (a lambda around an async function). What a hook raises is
logged and changes nothing. With no hook for an event, emitting it costs one attribute test.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger("budget_middleware.hooks")

Hook = Callable[[Any], Any]
EVENTS = ("on_alert", "on_refusal", "on_settled")
RECENT_REFUSALS = 200  # kept in memory for the dashboard and `GET /refusals`
# Events handed to hooks that have not run yet. A slow hook (one posting to a chat service)
# fell behind without end: every refused request queued one more for `on_refusal`, so a
# client sending unknown keys grew the process's memory as fast as it sent them. Past this
# many, an event is dropped, counted (`dropped`) and logged.
MAX_PENDING = 10_000
EXIT_WAIT = 5.0  # seconds the interpreter's exit waits for the hooks still queued


class HookThread:
    """One daemon thread that runs what it is given in order. A ThreadPoolExecutor's worker
    is joined as the interpreter exits: a hook that never returned (a post with no timeout)
    kept the process from ever ending. This one is waited for `EXIT_WAIT` at most."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._work = queue.SimpleQueue()
        self.pid = os.getpid()  # a forked child's copy has no thread
        # What an engine's shutdown waited for `EXIT_WAIT` in vain (`Hooks.finish`): while
        # it has not run, the exit does not wait again.
        self.behind: Future[Any] | None = None
        threading.Thread(target=self._run, name="budget-hooks", daemon=True).start()
        _LIVE.add(self)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._work.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._work.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


_LIVE: weakref.WeakSet[HookThread] = weakref.WeakSet()


@atexit.register
def _wait_at_exit() -> None:
    """What was handed to the hook threads runs before the process ends, for `EXIT_WAIT` at
    most: a hook that hangs then is left (said once), never waited for without end."""
    for thread in list(_LIVE):
        if thread.pid != os.getpid():
            continue
        behind = thread.behind
        if behind is None or behind.done():  # (else waited for in vain at a shutdown already)
            try:
                thread.submit(lambda: None).result(EXIT_WAIT)
                continue
            except TimeoutError:
                pass
        logger.warning(
            "budget-middleware left hooks unrun at exit: one still ran after %g s", EXIT_WAIT
        )


class Hooks:
    def __init__(self) -> None:
        self.on_alert: tuple[Hook, ...] = ()
        self.on_refusal: tuple[Hook, ...] = ()
        self.on_settled: tuple[Hook, ...] = ()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recent_refusals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self._thread: HookThread | None = None
        self.pending = 0  # events handed over that have not run (`MAX_PENDING`)
        self.dropped = 0
        self._count = threading.Lock()  # hooks are emitted from several threads (WSGI)
        # Async hooks under way on the engine's loop: its shutdown waits for them (`finish`).
        self._async: set[Future[Any]] = set()

    def add(self, **hooks: Hook | None) -> None:
        """Add hooks by event name; an unknown name or a value that is not callable raises. A
        hook given again (a transport made per job with the same `on_settled`) is not added
        twice: it was called once per time it was given."""
        for name, hook in hooks.items():
            if name not in EVENTS:
                raise TypeError(f"unknown hook {name!r}: expected one of {', '.join(EVENTS)}")
            if hook is None:
                continue
            if not callable(hook):
                raise TypeError(f"{name} must be callable, got {type(hook).__name__}")
            given: tuple[Hook, ...] = getattr(self, name)
            if hook not in given:
                setattr(self, name, (*given, hook))

    def emit(self, hooks: tuple[Hook, ...], item: Any) -> None:
        """Call each hook with `item`, off the caller's path; never raises (at interpreter exit
        the hook thread takes no more work: the event is dropped and logged)."""
        try:
            self._emit(hooks, item)
        except RuntimeError as exc:
            logger.warning("budget-middleware could not call a hook: %s", exc)

    def _emit(self, hooks: tuple[Hook, ...], item: Any) -> None:
        for hook in hooks:
            if not self._take():
                continue
            try:
                self._hand_over(hook, item)
            except BaseException:
                self._done()
                raise

    def _hand_over(self, hook: Hook, item: Any) -> None:
        if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
            getattr(hook, "__call__", None)  # noqa: B004 - an object with an async __call__
        ):
            loop = self.loop
            if loop is not None and not loop.is_closed():
                try:
                    future = asyncio.run_coroutine_threadsafe(_guarded_async(hook, item), loop)
                except RuntimeError:
                    pass
                else:  # done when it ran, or was cancelled with its loop
                    self._on_loop(future)
                    return
            self._pool().submit(self._sync, _run_async, hook, item)
        else:
            self._pool().submit(self._sync, self._plain, hook, item)

    def _plain(self, hook: Hook, item: Any) -> None:
        """A plain callable, in the hook thread. What it returns may be a coroutine (a lambda
        around an async function): run as an async hook's is, on the engine's loop (not
        waited for) or, with none, under its own loop here; never left unawaited."""
        try:
            result = hook(item)
        except Exception:
            logger.exception("budget-middleware hook %s raised", getattr(hook, "__name__", hook))
            return
        if not inspect.isawaitable(result):
            return
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with self._count:  # an event pending until its coroutine ran, as an async hook's
                self.pending += 1
            try:
                future = asyncio.run_coroutine_threadsafe(_awaited(hook, result), loop)
            except RuntimeError:
                self._done()
            else:
                self._on_loop(future)
                return
        asyncio.run(_awaited(hook, result))

    def _on_loop(self, future: Future[Any]) -> None:
        """An async hook running on the engine's loop: under way until it ends."""
        self._async.add(future)

        def ended(_: Future[Any]) -> None:
            self._async.discard(future)
            self._done()

        future.add_done_callback(ended)

    async def finish(self) -> None:
        """Wait (`EXIT_WAIT` at most) for the hooks still queued and the async hooks under way
        on the engine's loop, as a shutdown ends: the server's loop ends after it and cancels
        what still runs (an `on_settled` of the last answer, asleep in its post, was never
        heard), and a plain hook queued behind a slow one may yet return a coroutine for it
        (a lambda around an async function: handed to the loop after the wait, lost as the
        process left). One still running then is left, said once."""
        end = time.monotonic() + EXIT_WAIT
        thread = self._thread
        if thread is not None and thread.pid == os.getpid():
            loop = asyncio.get_running_loop()
            ran = asyncio.Event()

            def tell() -> None:
                with contextlib.suppress(RuntimeError):  # (the loop has closed since)
                    loop.call_soon_threadsafe(ran.set)

            queued = thread.submit(tell)
            try:
                await asyncio.wait_for(ran.wait(), EXIT_WAIT)
            except TimeoutError:  # one hangs: said at exit, where it is not waited for again
                thread.behind = queued
        running = [asyncio.wrap_future(f) for f in list(self._async) if not f.done()]
        if not running:
            return
        _, left = await asyncio.wait(running, timeout=max(end - time.monotonic(), 0.0))
        if left:
            logger.warning(
                "budget-middleware left %d async hook(s) running at shutdown after %g s",
                len(left),
                EXIT_WAIT,
            )

    def _take(self) -> bool:
        """Room for one more event (`MAX_PENDING`): taken; else the event is dropped."""
        with self._count:
            if self.pending < MAX_PENDING:
                self.pending += 1
                return True
            self.dropped += 1
            dropped = self.dropped
        if dropped == 1 or dropped % MAX_PENDING == 0:
            logger.warning(
                "budget-middleware hooks are %d events behind: %d events dropped so far",
                MAX_PENDING,
                dropped,
            )
        return False

    def _done(self) -> None:
        with self._count:
            self.pending -= 1

    def _sync(self, run: Callable[[Hook, Any], None], hook: Hook, item: Any) -> None:
        try:
            run(hook, item)
        finally:
            self._done()

    def after_fork_in_child(self) -> None:
        self._thread = None  # its thread is the parent's
        self.loop = None
        self._async = set()  # the parent's loop's
        self.pending = 0  # the parent's events stay the parent's
        self._count = threading.Lock()  # it may have been held as the process forked

    def _pool(self) -> HookThread:
        """The one thread hooks run on, in the order handed over: made on first use, once,
        whatever threads emit at once (two would run hooks out of order)."""
        pool = self._thread
        if pool is None:
            with _MAKING:
                pool = self._thread
                if pool is None:
                    pool = self._thread = HookThread()
        return pool

    def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the hooks handed to the hook thread so far (tests, shutdown)."""
        if self._thread is not None:
            self._thread.submit(lambda: None).result(timeout)


_MAKING = threading.Lock()  # a hook thread made (`Hooks._pool`)


async def _guarded_async(hook: Hook, item: Any) -> None:
    try:
        await hook(item)
    except Exception:
        logger.exception("budget-middleware hook %s raised", getattr(hook, "__name__", hook))


async def _awaited(hook: Hook, result: Any) -> None:
    try:
        await result
    except Exception:
        logger.exception("budget-middleware hook %s raised", getattr(hook, "__name__", hook))


def _run_async(hook: Hook, item: Any) -> None:
    asyncio.run(_guarded_async(hook, item))
