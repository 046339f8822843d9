"""Part "wsgi": µs per request of a Flask app called in process (a raw WSGI call, no server),
bare against the same app with `BudgetWSGIMiddleware` around its `wsgi_app`.

The metered route reads its body and answers the fixed completion; the answer is iterated and
closed as a server would. Interleaved rounds after a warm-up; the engine's flush (its background
flusher's work) runs untimed between rounds. Then the same from 8 threads at once, as a threaded
server calls: total requests per second, bare and metered.
"""

from __future__ import annotations

import gc
import io
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from harness import BIG_BUDGET, FIXED_COMPLETION, UNLIMITED_RATE, Timing, bench_settings, chat_body

from budget_middleware import get_engine
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.engine.portal import on_loop
from budget_middleware.outbound.payer import noting
from budget_middleware.wsgi import BudgetWSGIMiddleware

TARGET = "added ≤ 25 µs per metered request"
# Once a process has a `BudgetSyncTransport`, the middleware notes every request's caller (for
# the calls the app makes while serving it): that case apart, the others without it.
NOTED = "non-metered GET, callers noted (the app has a BudgetSyncTransport)"


def flask_app(engine: BudgetEngine | None) -> Flask:
    app = Flask("bench")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        request.get_data()
        return Response(FIXED_COMPLETION, content_type="application/json")

    if engine is not None:
        app.wsgi_app = BudgetWSGIMiddleware(app.wsgi_app, engine=engine)  # type: ignore[method-assign]
    return app


def _environ(method: str, path: str, body: bytes, key: str | None) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "bench",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    if body:
        environ["CONTENT_TYPE"] = "application/json"
        environ["CONTENT_LENGTH"] = str(len(body))
    if key is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return environ


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def _one(app: Callable[..., Iterable[bytes]], environ: dict[str, Any], body: bytes) -> None:
    fresh = {**environ, "wsgi.input": io.BytesIO(body)}
    result = app(fresh, _start_response)
    for _ in result:
        pass
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _time(app: Any, environ: dict[str, Any], body: bytes, n: int) -> list[float]:
    perf = time.perf_counter_ns
    out = []
    for _ in range(n):
        start = perf()
        _one(app, environ, body)
        out.append((perf() - start) / 1000)
    return out


def _threaded_rps(app: Any, environ: dict[str, Any], body: bytes, per_thread: int) -> float:
    threads = 8
    go = threading.Barrier(threads + 1)

    def work() -> None:
        go.wait()
        for _ in range(per_thread):
            _one(app, environ, body)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    go.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - started)


def _world(engine: BudgetEngine) -> str:
    on_loop(engine, engine.ensure_started)
    manager = engine.manager
    customer = manager.create_customer(name="bench-customer", budgets=BIG_BUDGET)
    team = manager.create_team(
        name="bench-team", customer_id=customer.id, budgets=BIG_BUDGET, rate_limit=UNLIMITED_RATE
    )
    key = manager.create_virtual_key(
        name="bench-key", team_id=team.id, budgets=BIG_BUDGET, rate_limit=UNLIMITED_RATE
    )
    on_loop(engine, engine.invalidate)
    assert key.value is not None
    return key.value


def run(n: int, rounds: int) -> dict[str, Any]:
    """Call from a thread that runs no event loop (the engine runs in the background loop)."""
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as directory:
        engine = get_engine(bench_settings(Path(directory)))
        key = _world(engine)
        body = chat_body()
        bare, metered = flask_app(None), flask_app(engine)
        cases = {
            "metered JSON": (_environ("POST", "/v1/chat/completions", body, key), body),
            "non-metered GET": (_environ("GET", "/health", b"", None), b""),
            NOTED: (_environ("GET", "/health", b"", key), b""),
        }
        for environ, data in cases.values():  # the answers are what they should be
            for app in (bare, metered):
                statuses: list[str] = []
                fresh = {**environ, "wsgi.input": io.BytesIO(data)}
                b"".join(app(fresh, lambda s, h, e=None, seen=statuses: seen.append(s)))  # type: ignore[misc]
                assert statuses[0].startswith("200"), statuses
        samples: dict[tuple[str, str], list[float]] = {}
        for name, (environ, data) in cases.items():
            for variant, app in (("bare", bare), ("middleware", metered)):
                _time(app, environ, data, 300)  # warm-up
                samples[(name, variant)] = []
        per_round = max(n // rounds, 1)
        for _ in range(rounds):
            for name, (environ, data) in cases.items():
                for variant, app in (("bare", bare), ("middleware", metered)):
                    on_loop(engine, engine.flush)
                    gc.collect()
                    noting.active = name == NOTED
                    samples[(name, variant)] += _time(app, environ, data, per_round)
                    noting.active = False
        results = []
        for name in cases:
            b, m = Timing.of(samples[(name, "bare")]), Timing.of(samples[(name, "middleware")])
            results.append(
                {
                    "scenario": name,
                    "bare": b.as_dict(),
                    "middleware": m.as_dict(),
                    "added_p50_us": m.median - b.median,
                    "added_p99_us": m.p99 - b.p99,
                    "ratio_p50": m.median / b.median,
                    "target": TARGET if name == "metered JSON" else "-",
                }
            )
        environ, data = cases["metered JSON"]
        per_thread = max(n // 16, 50)
        threaded = {
            "threads": 8,
            "bare_rps": _threaded_rps(bare, environ, data, per_thread),
            "middleware_rps": _threaded_rps(metered, environ, data, per_thread),
        }
        threaded["ratio"] = threaded["middleware_rps"] / threaded["bare_rps"]
        on_loop(engine, engine.shutdown)
        engine.store.dispose()
    return {"in_process": results, "threaded": threaded}


if __name__ == "__main__":
    import json

    print(json.dumps(run(4_000, 4), indent=2))
