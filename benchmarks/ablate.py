"""What each phase of a metered request costs where it runs: in front of FastAPI's trivial route.

    .venv/bin/python benchmarks/ablate.py [--iterations N] [--rounds R]

A phase timed alone in a tight loop costs a half to a third of what it costs in a request (the
app's working set and ours evict each other), so the request is timed whole, once as it is and
once with one phase replaced by what it returned the first time (its work skipped, the rest of
the request the same), in interleaved rounds in one process: the difference is what the phase
costs in place. The phases:

- `usage skipped`: the usage read from the answer (`Exchange._usage`: the JSON tail, the
  usage object);
- `record skipped`: the usage record built (`Exchange._record`, 21 fields by keyword);
- `headers skipped`: the limit headers worked out (`Exchange.headers_added`);
- `work out skipped`: the whole cost worked out (`Exchange._work_out`: usage, price, record).

Not a benchmark of the package against its targets (that is `run.py`): a guide to where a
change would save most.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    ASGIApp,
    Message,
    Receive,
    Send,
    bench_settings,
    call,
    chat_body,
    compare,
    http_scope,
    json_headers,
    make_world,
    trivial_host,
)

from budget_middleware.engine.exchange import Exchange


def _first_answer(name: str) -> Callable[..., Any]:
    """`Exchange.<name>` answering what it answered the first time: its work skipped."""
    method = getattr(Exchange, name)
    kept: list[Any] = []

    def first(self: Exchange, *args: Any) -> Any:
        if not kept:
            kept.append(method(self, *args))
        found = kept[0]
        return list(found) if type(found) is list else found  # the headers: a list to extend

    return first


# Each variant: what it sets before the request (the class's own methods otherwise).
_METHODS = ("_usage", "_record", "headers_added", "_work_out")
_VARIANTS: dict[str, dict[str, Any]] = {
    "as it is": {},
    "usage skipped": {"_usage": _first_answer("_usage")},
    "record skipped": {"_record": _first_answer("_record")},
    "headers skipped": {"headers_added": _first_answer("headers_added")},
    "work out skipped": {"_work_out": _first_answer("_work_out")},
}


class _Variant:
    """The same app, with the variant's methods in place for its request."""

    def __init__(self, app: ASGIApp, changes: dict[str, Any]) -> None:
        self.app = app
        self.changes = changes
        self.own = {name: getattr(Exchange, name) for name in _METHODS}

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        for name in _METHODS:
            setattr(Exchange, name, self.changes.get(name, self.own[name]))
        await self.app(scope, receive, send)


async def main(iterations: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-ablate-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        body = chat_body()
        scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
        metered = trivial_host(settings)
        apps: dict[str, ASGIApp] = {"FastAPI trivial route, bare": trivial_host(None)}
        apps.update({name: _Variant(metered, changes) for name, changes in _VARIANTS.items()})
        for name, app in apps.items():
            answer = await call(app, scope, body)
            assert answer.status == 200, (name, answer.status)
        variants = {name: (app, scope, body) for name, app in apps.items()}
        timings = await compare(variants, iterations, rounds, between=world.engine.flush)
        bare = timings["FastAPI trivial route, bare"].median
        whole = timings["as it is"].median
        print("| variant | µs p50 | added to the bare route | the phase in place |")
        print("|---|---:|---:|---:|")
        for name, timing in timings.items():
            median = timing.median
            phase = (
                ""
                if name in ("FastAPI trivial route, bare", "as it is")
                else f"{whole - median:+.1f}"
            )
            print(f"| {name} | {median:.1f} | {median - bare:.1f} | {phase} |")
        print("\nThe last column: what the request saves with the phase skipped (negative: costs).")
        await world.engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.iterations, arguments.rounds))
