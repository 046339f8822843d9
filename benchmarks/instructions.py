"""Instructions a metered request costs, counted by callgrind: steady where timings are not.

    .venv/bin/python benchmarks/instructions.py [--where inprocess,http] [--requests N] [--top K]

Needs valgrind (`apt-get install valgrind`). Each count is the difference of two runs of
different lengths (N and 3N requests) with a fixed hash seed, divided by the extra requests, so
start-up and imports cancel out; bare and with the middleware:

- `inprocess`: part 1's FastAPI trivial route called as an ASGI app (no server);
- `http`: the example app under uvicorn (httptools + uvloop, one worker), N sequential requests
  on one keep-alive connection, counted per thread: the event loop's (every request is served
  there) and the others (the flusher's writes to the store). A request's flush share depends on
  how many records a flush writes, which is few under callgrind (it runs ~50 times slower):
  read the other threads as an upper bound.

Prints, per place, the instructions a request bare and with the middleware, and the C functions
whose count grows most (Python's own code shows as `_PyEval_EvalFrameDefault`;
`benchmarks/profile_hot_path.py` counts bytecodes by Python function). Not part of `bench.sh`:
it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from harness import (
    bench_settings,
    call,
    chat_body,
    http_scope,
    json_headers,
    make_world,
    time_calls,
    trivial_host,
)

ROOT = Path(__file__).resolve().parent.parent
_SEED = {"PYTHONHASHSEED": "0"}


# -- what runs under callgrind ----------------------------------------------------------------


async def _inprocess_child(requests: int, middleware: bool, directory: str) -> None:
    settings = bench_settings(Path(directory))
    world = await make_world(settings)
    body = chat_body()
    scope = http_scope("/v1/chat/completions", "POST", json_headers(body, world.key))
    app = trivial_host(settings if middleware else None)
    answer = await call(app, scope, body)
    assert answer.status == 200, answer.status
    await time_calls(app, scope, body, 1_000)  # warm: caches, specialised bytecodes
    await world.engine.flush()
    await time_calls(app, scope, body, requests)
    await world.engine.shutdown()


def _callgrind(out: Path, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    valgrind = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
    with open(f"{out}.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [*valgrind, f"--callgrind-out-file={out}", *command],
            env={**env, **_SEED},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _run_inprocess(out: Path, requests: int, middleware: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-instr-") as directory:
        command = [
            sys.executable, __file__, "--child", "inprocess", "--requests", str(requests),
            "--directory", directory,
        ] + (["--middleware"] if middleware else [])  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        process = _callgrind(out, command, env)
        if process.wait() != 0:
            raise RuntimeError(f"the in-process run failed: see {out}.log")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_http(out: Path, requests: int, middleware: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bm-instr-") as directory:
        settings = bench_settings(Path(directory))

        async def world() -> str:
            made = await make_world(settings, "http")
            await made.engine.shutdown()
            made.engine.store.dispose()
            return made.key

        key = asyncio.run(world())
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "BUDGET_DATABASE_URL": settings.database_url,
            "BUDGET_ADMIN_KEY": "bench-admin-key",
        }
        if not middleware:
            env["BUDGET_NO_MIDDLEWARE"] = "1"
        command = [
            sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "examples"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--no-access-log",
            "--log-level", "warning", "--loop", "uvloop", "--http", "httptools",
        ]  # fmt: skip
        process = _callgrind(out, command, env)
        try:
            deadline = time.monotonic() + 300  # start-up under callgrind takes a while
            while True:
                try:
                    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    probe.request("GET", "/health")
                    probe.getresponse().read()
                    probe.close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"uvicorn did not start: see {out}.log") from None
                    time.sleep(0.5)
            body = chat_body()
            headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(200 + requests):  # 200 to warm up, as the in-process run does
                connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"the server answered {answer.status}")
            connection.close()
            time.sleep(3)  # a flush or two of the records, counted
        finally:
            process.terminate()
            process.wait(300)


# -- reading callgrind's output --------------------------------------------------------------

_LINE = re.compile(r"\s*([\d,]+) \([^)]*\)\s+(.*?)(?: \[(.*)\])?$")


def _by_function(path: Path) -> dict[str, int]:
    """Instructions by C function (self cost) of one callgrind file."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, int] = defaultdict(int)
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or "PROGRAM TOTALS" in line:
            continue
        name = match.group(2).split(":")[-1].split("'")[0]
        library = (match.group(3) or "").rsplit("/", 1)[-1].split(".cpython")[0]
        found[f"{name} ({library})" if library else name] += int(match.group(1).replace(",", ""))
    return found


def _threads(prefix: Path) -> list[Path]:
    """callgrind's files of one run, one a thread (`-01` is the main thread)."""
    return sorted(prefix.parent.glob(prefix.name + "-*[0-9]"))


def _per_request(short: Path, long: Path, extra: int) -> tuple[dict[str, int], dict[str, int]]:
    """Instructions a request by C function, on the main thread and on the others."""
    out: list[dict[str, int]] = [defaultdict(int), defaultdict(int)]
    for run, sign in ((short, -1), (long, 1)):
        for index, path in enumerate(_threads(run)):
            side = out[0 if index == 0 else 1]
            for name, count in _by_function(path).items():
                side[name] += sign * count
    main, others = ({k: round(v / extra) for k, v in d.items()} for d in out)
    return main, others


def _measure(where: str, requests: int, directory: Path) -> dict[bool, tuple[dict, dict]]:
    run = _run_inprocess if where == "inprocess" else _run_http
    found: dict[bool, tuple[dict, dict]] = {}
    for middleware in (False, True):
        name = "middleware" if middleware else "bare"
        short, long = directory / f"{where}.{name}.1", directory / f"{where}.{name}.3"
        print(f"  {where}, {name}: {requests} and {3 * requests} requests under callgrind…")
        run(short, requests, middleware)
        run(long, 3 * requests, middleware)
        found[middleware] = _per_request(short, long, 2 * requests)
    return found


def _report(where: str, found: dict[bool, tuple[dict, dict]], top: int) -> None:
    (bare_main, bare_other), (mw_main, mw_other) = found[False], found[True]
    total = {k: sum(v.values()) for k, v in (("bm", bare_main), ("mm", mw_main))}
    print(f"\n### {where}\n")
    print("| instructions a request | bare | with the middleware | added |")
    print("|---|---:|---:|---:|")
    label = "the calling thread" if where == "inprocess" else "the event loop's thread"
    print(f"| {label} | {total['bm']:,} | {total['mm']:,} | {total['mm'] - total['bm']:,} |")
    if where == "http":
        bo, mo = sum(bare_other.values()), sum(mw_other.values())
        print(f"| other threads (the flusher's; an upper bound) | {bo:,} | {mo:,} | {mo - bo:,} |")
    print(f"\nThe {top} C functions whose count grows most on {label}:\n")
    print("| added | bare | with | function |")
    print("|---:|---:|---:|---|")
    names = sorted(
        set(bare_main) | set(mw_main), key=lambda n: bare_main.get(n, 0) - mw_main.get(n, 0)
    )
    for name in names[:top]:
        bare, with_ = bare_main.get(name, 0), mw_main.get(name, 0)
        print(f"| {with_ - bare:,} | {bare:,} | {with_:,} | `{name}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where", default="inprocess,http")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--middleware", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child == "inprocess":
        asyncio.run(_inprocess_child(arguments.requests, arguments.middleware, arguments.directory))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        sys.exit("instructions.py needs valgrind: apt-get install valgrind")
    places = [p.strip() for p in arguments.where.split(",") if p.strip()]
    unknown = set(places) - {"inprocess", "http"}
    if unknown:
        sys.exit(f"--where: unknown {', '.join(sorted(unknown))} (inprocess, http)")
    with tempfile.TemporaryDirectory(prefix="bm-callgrind-") as directory:
        results = {where: _measure(where, arguments.requests, Path(directory)) for where in places}
    print(f"\nPython {sys.version.split()[0]}, PYTHONHASHSEED=0, {arguments.requests} and "
          f"{3 * arguments.requests} requests a run")  # fmt: skip
    for where, found in results.items():
        _report(where, found, arguments.top)


if __name__ == "__main__":
    main()
