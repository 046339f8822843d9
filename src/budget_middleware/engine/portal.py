"""The engine's event loop for callers that have none (WSGI servers' threads, sync clients), and
for async callers on another thread's loop (`done_there`).

An engine first used by such a caller starts in one event loop of this module's, run by a daemon
thread (`background_loop`). Every callback that loop runs holds `loop_lock`, so a step of any task
on it (the flusher taking deltas, a reload, an admission) is atomic with respect to a thread that
holds the lock too: a WSGI thread admits a request against the in-process counters under
`loop_lock`, without a hop to the loop, and stays exact however many threads the server runs.
Work that must await (a store read, Redis) goes to the loop with `on_loop` and is waited for.

Engines started in that loop are shut down (every pending charge written) when the process exits
(`atexit`; a gunicorn worker runs it as it exits), or by `shut_down_engines()`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import os
import signal
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from time import monotonic, sleep
from typing import TYPE_CHECKING, Any, TypeVar, cast

from budget_middleware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from budget_middleware.engine.engine import BudgetEngine

T = TypeVar("T")

_YIELDS = 200  # tries with the GIL given away before a thread waits for the lock asleep


class LoopLock:
    """A reentrant lock that a thread which finds it held first waits for by giving the GIL
    away (`sleep(0)`), not asleep on the lock.

    Asleep, a waiter wakes owning the lock and must then wait for the GIL, up to the 5 ms switch
    interval, while every other thread queues on the lock behind it: a convoy that took 8
    threads of a WSGI server from ~11,000 to ~7,000 metered requests a second in the benchmark
    (half the acquisitions waited). Given the GIL, the holder (most often waiting for it) runs
    on and lets go within microseconds. After `_YIELDS` tries (a holder doing something long) a
    waiter sleeps on the lock."""

    __slots__ = ("_lock", "_owned", "acquire", "release")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self._owned = self._lock._is_owned  # type: ignore[attr-defined]

    def __enter__(self) -> None:
        if not self.acquire(False):
            self._wait()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _wait(self) -> None:
        acquire = self.acquire
        for _ in range(_YIELDS):
            sleep(0)
            if acquire(False):
                return
        acquire()

    def _is_owned(self) -> bool:
        return bool(self._owned())

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]


# Held by every callback of the background loop, and by threads working on its engines' live
# state (counters, caches) without a hop to it. Reentrant: a holder may call what takes it again.
loop_lock = LoopLock()

# In a forked child, a lock some parent thread held at the fork would be held for ever.
os.register_at_fork(after_in_child=loop_lock._at_fork_reinit)

# Every engine of this process, by its settings (`engine.get_engine`): kept here, where the
# exit's shutdown finds them, with nothing of the engine's module imported.
engines: weakref.WeakValueDictionary[str, BudgetEngine] = weakref.WeakValueDictionary()
# Every engine started in the background loop, of `engines` or not (one an app made itself,
# `BudgetEngine(settings)`, given to an adapter as `engine=`): shut down by `shut_down_engines`
# too. Left out, such an engine's charges since its last flush were lost at exit (0 of 7 records
# written in `test_wsgi.py`).
started_in_background: weakref.WeakSet[BudgetEngine] = weakref.WeakSet()

_background: asyncio.AbstractEventLoop | None = None
_background_pid = 0
# This process's id, kept as forks change it: `is_background` reads it on every WSGI request,
# where `os.getpid()` is a system call (0.4 µs here).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
_background_lock = threading.Lock()
_exit_registered = False
_sigterm_pid = 0  # the process whose SIGTERM `exit_on_sigterm` made an exit

# What a forked child (a gunicorn `--preload` worker) inherited of its parent's event loops: the
# loops, their tasks, and what they served (Redis's connections), held for the child's life and
# never closed nor collected there. The child shares its parent's epoll instance: collected, a
# stream writer of the parent's closes its transport, which unregisters the socket from that
# epoll (in the child's copy of the loop: the kernel's one for both), and the parent's loop
# never heard Redis's replies again ("Redis unreachable: TimeoutError", its requests 503).
inherited: list[object] = []


def keep_inherited(*objects: object) -> None:
    """In a forked child: keep what the parent's loops own (a loop: with its tasks) for ever."""
    for thing in objects:
        if thing is None:
            continue
        inherited.append(thing)
        if isinstance(thing, asyncio.AbstractEventLoop):
            inherited.extend(asyncio.all_tasks(thing))


os.register_at_fork(after_in_child=lambda: keep_inherited(_background))


def _locked(callback: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with loop_lock:
            return callback(*args)

    return run


class LockedLoop(asyncio.SelectorEventLoop):
    """An event loop whose every scheduled callback (so every step of every task) runs holding
    `loop_lock`. I/O readiness callbacks only move bytes into buffers; what they wake runs as a
    scheduled callback, under the lock."""

    @staticmethod
    def held_here() -> bool:
        """Whether this thread holds the lock every callback of this loop holds (so nothing of
        the loop runs until it lets go): the engine asks it before waiting for the loop."""
        return loop_lock._is_owned()

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        return super().call_soon(_locked(callback), *args, context=context)

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        return super().call_soon_threadsafe(_locked(callback), *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return super().call_at(when, _locked(callback), *args, context=context)


def background_loop() -> asyncio.AbstractEventLoop:
    """The one background loop of this process (started on first use; a forked child starts a
    loop of its own, as the parent's thread does not exist there)."""
    global _background, _background_pid, _exit_registered
    loop = _background
    if loop is not None and _background_pid == os.getpid() and not loop.is_closed():
        return loop
    with _background_lock:
        if _background is None or _background_pid != os.getpid() or _background.is_closed():
            _refuse_green_threads()
            loop = LockedLoop()
            threading.Thread(
                target=loop.run_forever, name="budget-middleware-loop", daemon=True
            ).start()
            _background, _background_pid = loop, os.getpid()
            if not _exit_registered:
                atexit.register(_at_exit)
                _exit_registered = True
            _exit_with_multiprocessing()
        loop = _background
    exit_on_sigterm()  # (a sync script's engine: its first call is most often the main thread's)
    return loop


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process as an exit (`SystemExit(143)`, as Ctrl+C raises
    `KeyboardInterrupt`), so that `atexit` writes what its engines hold: left to the default, it
    killed a script outright, past `atexit` (`kill`, `timeout`, a container's stop: 3 calls
    answered, 0 written). Only where nothing else handles SIGTERM (a server, Celery, the app),
    from the main thread; a second SIGTERM, or one in a forked child, kills as before."""
    global _sigterm_pid
    if _sigterm_pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except (ValueError, OSError):  # (no signals here: a sub-interpreter, say)
        return
    _sigterm_pid = os.getpid()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one kills at once
    if os.getpid() != _sigterm_pid:  # a forked child (a pool's worker): killed, as it was
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise SystemExit(128 + signum)


def _exit_with_multiprocessing() -> None:
    """In a process `multiprocessing` started (a `Process`, a worker of a `Pool` or a
    `ProcessPoolExecutor`), `_at_exit` runs with its own exit finalizers too: forked (`fork`,
    `forkserver`: Linux's defaults), such a process ends with `os._exit`, past `atexit`, and
    what its engines had not written yet was lost. (`_at_exit` may run twice: it is idempotent.)"""
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.parent_process() is not None:
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=0)
    _exit_with_billiard()


def _exit_with_billiard() -> None:
    """In a process `billiard` started (Celery's prefork pool is billiard's), which
    `multiprocessing.parent_process` does not know: `_at_exit` runs with billiard's exit
    finalizers (a `billiard.Process` runs them, then leaves by `os._exit`), and, in a worker of
    its pool, which leaves by `os._exit` from inside its task loop (past `atexit` and every
    finalizer: `max_tasks_per_child`, a pool's close, `terminate`'s SIGTERM, a warm shutdown),
    before the worker's own exit callback (Celery's `worker_process_shutdown`). Only where the
    app imported billiard; the worker's callback is chained on this process's worker alone."""
    process = sys.modules.get("billiard.process")
    if process is None:
        return
    current = process.current_process()
    if getattr(current, "_parent_pid", None) is None:  # billiard's main process
        return
    util = sys.modules.get("billiard.util")
    multiprocessing_util = sys.modules.get("multiprocessing.util")
    finalize = getattr(util, "Finalize", None)
    if finalize is not None and (
        finalize is not getattr(multiprocessing_util, "Finalize", None)
        or sys.modules["multiprocessing"].parent_process() is None  # not registered above
    ):
        finalize(None, _at_exit, exitpriority=0)
    pool = sys.modules.get("billiard.pool")
    worker = getattr(current, "_target", None)
    if pool is not None and isinstance(worker, pool.Worker):
        worker.on_exit = _then(getattr(worker, "on_exit", None))


def _then(on_exit: Callable[[int, int], object] | None) -> Callable[[int, int], None]:
    """A billiard pool worker's exit callback: what is pending is written, then `on_exit`."""

    def written_then(pid: int, exitcode: int) -> None:
        try:
            _at_exit()
        finally:
            if on_exit is not None:
                on_exit(pid, exitcode)

    return written_then


def _refuse_green_threads() -> None:
    """Under gevent's or eventlet's monkey-patching (gunicorn `-k gevent`, `-k eventlet`) a
    thread is a greenlet of one OS thread: the loop's thread and the server's would share one
    running event loop, and every request would fail as if the store were away. Said at once."""
    monkey = sys.modules.get("gevent.monkey")
    patched = monkey is not None and bool(monkey.is_module_patched("threading"))
    if not patched:
        patcher = sys.modules.get("eventlet.patcher")
        patched = patcher is not None and bool(patcher.is_monkey_patched("thread"))
    if patched:
        raise ConfigurationError(
            "budget-middleware's sync adapters (BudgetWSGIMiddleware, create_admin_wsgi_app, "
            "BudgetSyncTransport) need real threads, and gevent or eventlet has patched "
            "`threading` into greenlets: use gunicorn's `gthread` or `sync` workers (or "
            "waitress), or serve the app over ASGI with BudgetMiddleware"
        )


def is_background(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether `loop` is this process's background loop (so `loop_lock` guards its work)."""
    return loop is not None and loop is _background and _background_pid == _pid


def on_loop(engine: BudgetEngine, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work()` on the engine's event loop from a thread that is not that loop's, and wait
    for it. An engine not started yet starts in the background loop. Never call it holding
    `loop_lock` (the loop needs it to run `work`)."""
    while True:
        loop = engine.loop
        if (
            loop is None
            or loop.is_closed()
            or (loop is _background and _background_pid != os.getpid())
        ):
            loop = _asgi_server_loop(engine) or background_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "a sync budget-middleware adapter (BudgetSyncTransport, BudgetWSGIMiddleware) "
                "was called from the event loop its engine runs in, which it would block: use "
                "the async one there (BudgetTransport, BudgetMiddleware)"
            )
        if not is_background(loop) and (_driven is loop or not loop.is_running()):
            # The app's loop, left open and stopped (a script's `run_until_complete`): nothing
            # would run the work sent there, and the wait would never end. This thread runs it,
            # one thread at a time (one that found another running it waits for it, then runs
            # its own). Not a loop stopped for a moment between the steps of `asyncio.run`'s
            # end (its tasks cancelled, then its generators, then its executor): driven then,
            # `asyncio.run` failed to close it ("Cannot close a running event loop").
            if _driven is not loop and not _left_stopped(loop):
                continue
            with _driving:
                if not loop.is_running():
                    began: list[Any] = []
                    try:
                        return _drive(loop, engine, work, began)
                    except RuntimeError:
                        if began or not loop.is_closed():
                            raise
                    continue  # closed as this thread came to run it (`asyncio.run` ending)
        began = []
        step = _awaited(engine, work, began)
        try:
            future = asyncio.run_coroutine_threadsafe(step, loop)
        except RuntimeError:  # closed since it was looked at: the next one runs the engine
            step.close()
            continue
        answer = _waited(future, loop, began)
        if answer is not _NEVER_BEGAN:
            return answer  # type: ignore[return-value]


NEVER_BEGAN = object()  # work handed to a loop that ended before its first step: run it again
_NEVER_BEGAN = NEVER_BEGAN


def closed_outcome(began: list[Any]) -> Any:
    """What work handed to an engine loop that closed comes to (`began`: filled by the work as
    it starts, then with its answer): the answer, if it was done; `NEVER_BEGAN`, if it never
    started; else a RuntimeError, as it was cut midway. One rule for sync and async callers."""
    if len(began) == 2:
        return began[1]
    if began:
        raise RuntimeError(
            "the event loop that ran the budget-middleware engine closed while it did "
            "this call's admission or settlement"
        )
    return NEVER_BEGAN


_LOOP_CHECK = 0.25  # seconds: how often a thread waiting for another's loop sees it still runs


def _waited(
    future: concurrent.futures.Future[T], loop: asyncio.AbstractEventLoop, began: list[Any]
) -> T | object:
    """The work handed to `loop` (another thread's) waited for. That loop can end meanwhile (a
    script's `asyncio.run` returning while its threads still call out): work it cancelled
    before its first step (`asyncio.run` cancels what is left) or dropped unrun (closed before
    its turn) never began, `_NEVER_BEGAN`: it runs on the loop that runs the engine next. Work
    done there whose answer the loop's end kept from the future (it is handed over by the
    loop's next step) gives its answer all the same; work cut midway raises. None is waited
    for for ever."""
    while True:
        try:
            return future.result(_LOOP_CHECK)
        except concurrent.futures.TimeoutError:
            if not loop.is_closed() or future.done():
                continue
            outcome: T | object = closed_outcome(began)
            return outcome
        except concurrent.futures.CancelledError:
            # Cancelled there by the loop's end (`asyncio.run` cancels what is left): never
            # begun, run again; cut midway, said so (a bare CancelledError out of a call its
            # caller never cancelled).
            outcome = closed_outcome(began)
            return outcome


def _asgi_server_loop(engine: BudgetEngine) -> asyncio.AbstractEventLoop | None:
    """The loop of the ASGI server this thread does sync work for (asgiref's `sync_to_async`:
    Django's ASGI handler runs every sync view so), when a `BudgetMiddleware` serves `engine`:
    an engine not started yet starts there, where that middleware uses it, not in the
    background loop (a sync view calling out through `BudgetSyncTransport`, or the admin URLs,
    before the first metered request of a server that sends no lifespan)."""
    if not any(ref() is not None for ref in engine.failure_listeners):  # no ASGI middleware
        return None
    sync = sys.modules.get("asgiref.sync")
    if sync is None:
        return None
    local = sync.SyncToAsync.threadlocal
    if getattr(local, "main_event_loop_pid", None) != os.getpid():
        return None
    loop: asyncio.AbstractEventLoop | None = getattr(local, "main_event_loop", None)
    if loop is None or loop.is_closed() or not loop.is_running():
        return None
    return loop


def home(engine: BudgetEngine) -> asyncio.AbstractEventLoop | None:
    """Where an engine that no loop runs (not started, or its loop has ended) starts for an
    async call: on the call's loop (None), or on the background loop when the call's loop is
    one of a thread other than the main one (`asyncio.run` in a worker thread, a Flask view):
    such a loop ends with its job, and other threads' calls handed to it meanwhile were dropped
    with it (stuck for ever) or cancelled by its end. An engine an ASGI middleware serves starts
    where that middleware serves it."""
    if not engine.needs_start() or threading.current_thread() is threading.main_thread():
        return None
    if any(ref() is not None for ref in engine.failure_listeners):  # an ASGI middleware's
        return None
    return background_loop()


def engine_loop(engine: BudgetEngine) -> asyncio.AbstractEventLoop | None:
    """Where an async caller's admission and settlement run: on the loop that runs the engine,
    when it is another thread's (`done_there`); None on the caller's own, when the engine runs
    there or starts there (`home`). One loop decides: two loops admitting against one engine
    would interleave (Redis's connections, an asyncio future, are one loop's)."""
    loop = engine.loop
    running = asyncio.get_running_loop()  # (called in a coroutine: its loop)
    if loop is running:  # the usual case
        return None
    if loop is None or not loop.is_running():
        loop = home(engine)  # no loop runs the engine: it starts here, or there
    return None if loop is running else loop


async def done_there(
    engine: BudgetEngine,
    loop: asyncio.AbstractEventLoop,
    work: Callable[[], Awaitable[T]],
    here: Callable[[], Any] | None = None,
    unwanted: Callable[[T], Coroutine[Any, Any, None]] | None = None,
) -> T:
    """`work()` for an async caller, done on `loop`, the engine's (another thread's: an ASGI
    app served by a second loop, an async SDK called through `asyncio.run` from a Flask view),
    where every admission and settlement is one step among its own; or in this thread by
    `here()` when it can (None: it cannot), holding the lock every step of the background loop
    holds. Waited for as `asyncio.shield` would: a wait cancelled here leaves the work to end
    there, and hands what it gives to `unwanted` there (an admission for a caller that left:
    its slot and reservation go back). Should that loop end before the work began there (a
    script's `asyncio.run` returning), done on the loop that runs the engine next, or here."""
    while True:
        if here is not None:
            done = here()
            if done is not None:
                return cast(T, done)
        began: list[Any] = []
        step = _marked(work, began)
        try:
            future = asyncio.run_coroutine_threadsafe(step, loop)
        except RuntimeError:  # closed since it was looked at
            step.close()
        else:
            try:
                got = await _waited_there(loop, future, began)
            except asyncio.CancelledError:
                if unwanted is not None:
                    future.add_done_callback(_handed_to(loop, unwanted))
                raise
            if got is not NEVER_BEGAN:
                return cast(T, got)
        next_loop = engine_loop(engine)
        if next_loop is None:
            return await work()
        loop = next_loop


async def _marked(work: Callable[[], Awaitable[T]], began: list[Any]) -> T:
    """`work()` on the loop it was handed to: `began` holds a mark once it has begun there,
    then its answer (`closed_outcome`)."""
    began.append(None)
    done = await work()
    began.append(done)
    return done


_HANDED: set[asyncio.Task[None]] = set()  # answers handed to `unwanted`, until it is done


def _handed_to(
    loop: asyncio.AbstractEventLoop, unwanted: Callable[[T], Coroutine[Any, Any, None]]
) -> Callable[[concurrent.futures.Future[T]], None]:
    def hand(done: concurrent.futures.Future[T]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        answer = done.result()

        def start() -> None:
            task = loop.create_task(unwanted(answer))
            _HANDED.add(task)  # held until done: a task is only weakly referenced
            task.add_done_callback(_HANDED.discard)

        loop.call_soon_threadsafe(start)

    return hand


async def _waited_there(
    loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future[T], began: list[Any]
) -> T | object:
    """`future`, of work handed to `loop`, waited for as `asyncio.shield` would (a wait
    cancelled here leaves the work to finish there). Should that loop end meanwhile: work it
    dropped unrun or cancelled before its first step never began, `NEVER_BEGAN` (to run on
    the loop that runs the engine next); work done there whose answer the loop's end kept back
    gives it all the same; work cut midway raises. None is waited for for ever."""
    waited = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait((waited,), timeout=_LOOP_CHECK)
        if done:
            if waited.cancelled():
                # By that loop's end (`asyncio.run` cancels what is left): as `closed_outcome`
                # says, not a bare CancelledError in a task nobody cancelled (the caller's
                # task group or `asyncio.timeout` would take it for their own).
                return cast(T, closed_outcome(began))
            return waited.result()
        if loop.is_closed():
            return cast(T, closed_outcome(began))


_driving = threading.Lock()  # held by the thread running a stopped loop for its work (`on_loop`)
_STOPPED_FOR = 0.05  # seconds a loop stays stopped, neither running nor closed, to be left so
_left: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None  # the last one seen so


def _left_stopped(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `loop` is left stopped (a script's `run_until_complete` returned), not stopped
    between two of its owner's steps: it stays so for `_STOPPED_FOR` (once a loop: the last one
    seen so is remembered)."""
    global _left
    if _left is not None and _left() is loop:
        return True
    until = monotonic() + _STOPPED_FOR
    while monotonic() < until:
        if loop.is_running() or loop.is_closed():
            return False
        sleep(0.001)
    _left = weakref.ref(loop)
    return True


_driven: asyncio.AbstractEventLoop | None = None  # that loop, while it does


def _drive(
    loop: asyncio.AbstractEventLoop,
    engine: BudgetEngine,
    work: Callable[[], Awaitable[T]],
    began: list[Any],
) -> T:
    global _driven
    _driven = loop
    step = _awaited(engine, work, began)
    try:
        return loop.run_until_complete(step)
    finally:
        step.close()  # (refused by a closed loop, it never began: no warning that it did not)
        _driven = None


async def _awaited(
    engine: BudgetEngine, work: Callable[[], Awaitable[T]], began: list[Any] | None = None
) -> T:
    if began is not None:
        began.append(None)  # its first step, on the loop it was handed to (`_waited`)
    if engine.started and engine.needs_start():  # its loop closed: it starts again in this one
        await engine.ensure_started()
    done = await work()
    if began is not None:
        began.append(done)  # what it gave, should the loop end before it hands it over
    return done


# Run at exit before the engines shut down: adapters settle the answers still open then.
_before_exit: list[Callable[[], None]] = []


def settle_before_exit(callback: Callable[[], None]) -> None:
    """Have `callback` run at the process's exit, before the engines write what is pending."""
    _before_exit.append(callback)


_settled_open_in: int | None = None  # the process whose answers still open were settled


def settle_open_at_exit() -> None:
    """At exit, once a process: the answers still open, which nothing will end, settled by
    their adapters (`settle_before_exit`) before the engines write what is pending. By the
    background loop's exit (`_at_exit`), or, with none ever started (a script's `asyncio.run`
    ran the engine), by the engines' own (`BudgetEngine._settle_at_exit`)."""
    global _settled_open_in
    if _settled_open_in == os.getpid():
        return
    _settled_open_in = os.getpid()
    for callback in _before_exit:
        try:
            callback()
        except Exception:
            import logging

            logging.getLogger("budget_middleware").exception(
                "budget-middleware could not settle the answers still open at exit"
            )


def _at_exit() -> None:
    """At exit the interpreter has joined the threads it waits for; a server's daemon threads
    (waitress past its 5 s, `flask run`, `runserver`) may still serve answers no one will finish:
    the adapters settle those first, so that the last write holds their charges."""
    if _background_pid == os.getpid():
        settle_open_at_exit()
    shut_down_engines()


def _every_engine() -> list[BudgetEngine]:
    """The engines of `engines` and `started_in_background`, each once. Both are weak
    collections, iterated in Python: another thread's addition meanwhile (an engine starting on
    the background loop as the process exits) raises "changed size during iteration", which
    took the exit's whole shutdown with it (every engine's charges lost): read again."""
    while True:
        try:
            return list({id(e): e for e in (*engines.values(), *started_in_background)}.values())
        except RuntimeError:
            continue


def shut_down_engines(timeout: float = 30.0) -> None:
    """Shut down every engine started in the background loop: the flusher stops and every
    pending charge and usage record is written (bounded by `timeout` per engine). Idempotent;
    runs at process exit, and from a gunicorn `worker_exit` hook when one calls it."""
    loop = _background
    if loop is None or loop.is_closed() or _background_pid != os.getpid():
        return
    for engine in _every_engine():
        # Started here, or in a loop that has closed since (a script's `asyncio.run`): its
        # pending charges are written from here. Shut down here already (a gunicorn
        # `worker_exit` hook), it may hold charges settled since (a stream that ended after):
        # written too (`shutdown` of an engine not started writes what it holds, if anything).
        if (engine.loop is loop and not engine.started) or (
            engine.started and (engine.loop is loop or engine.needs_start())
        ):
            try:
                asyncio.run_coroutine_threadsafe(_awaited(engine, engine.shutdown), loop).result(
                    timeout=timeout
                )
            except Exception:  # exiting: say so, and go on with the other engines
                import logging

                logging.getLogger("budget_middleware").exception(
                    "budget-middleware could not shut an engine down at exit"
                )
