"""Part 2: the example app under uvicorn on loopback, with and without the middleware.

One uvicorn worker on a free loopback port; `wrk` (or `loadgen.py` when wrk is missing) keeps a
fixed number of keep-alive connections busy for a bounded time with the hot-path request (a
metered chat completion with a cached key under a team and a customer). The same app is served
with `uvicorn[standard]` (httptools + uvloop) and with plain uvicorn (h11 + asyncio).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, bench_settings, chat_body, make_world

HERE = Path(__file__).resolve().parent
SERVERS = {
    "httptools+uvloop": ["--http", "httptools", "--loop", "uvloop"],
    "h11+asyncio": ["--http", "h11", "--loop", "asyncio"],
}
PATH = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("uvicorn did not answer /health in time")


def _serve(
    server: str,
    middleware: bool,
    env: dict[str, str],
    app: str = "app:app",
    app_dir: Path = ROOT / "examples",
) -> tuple[subprocess.Popen[bytes], int]:
    """uvicorn serving `app` (the example app by default; `middleware`: with BudgetMiddleware)."""
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", app, "--app-dir", str(app_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--no-access-log", "--log-level", "warning", *SERVERS[server],
    ]  # fmt: skip
    child_env = {**env, "PYTHONPATH": str(ROOT / "src")}
    if not middleware:
        child_env["BUDGET_NO_MIDDLEWARE"] = "1"
    process = subprocess.Popen(command, env=child_env)
    try:
        _wait_ready(port, process)
    except BaseException:
        process.kill()
        raise
    return process, port


def _drive(port: int, body: bytes, key: str, concurrency: int, duration: float) -> dict[str, Any]:
    """One load run in its own process: wrk, or `loadgen.py` when wrk is missing."""
    wrk = shutil.which("wrk")
    if wrk is None:
        tool = "loadgen"
        command = [
            sys.executable, str(HERE / "loadgen.py"), str(port), PATH, str(concurrency),
            str(duration),
        ]  # fmt: skip
    else:
        tool = "wrk"
        command = [
            wrk, "-t1", f"-c{concurrency}", f"-d{max(int(duration), 1)}s", "--timeout", "5s",
            "-s", str(HERE / "post.lua"), f"http://127.0.0.1:{port}{PATH}",
        ]  # fmt: skip
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_KEY": key}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH_JSON "))
    return {**json.loads(line.removeprefix("BENCH_JSON ")), "tool": tool}


async def world_env(directory: str) -> tuple[str, dict[str, str]]:
    """A configured store in `directory` (its engine stopped): the hot path's key, and the
    environment a server reads its settings from, as a deployment would."""
    settings = bench_settings(Path(directory))
    world = await make_world(settings, "http")
    await world.engine.shutdown()
    world.engine.store.dispose()
    env = {
        **os.environ,
        "BUDGET_DATABASE_URL": settings.database_url,
        "BUDGET_ADMIN_KEY": "bench-admin-key",
    }
    return world.key, env


def measured(
    server: str,
    middleware: bool,
    env: dict[str, str],
    key: str,
    concurrency: int,
    duration: float,
    app: str = "app:app",
    app_dir: Path = ROOT / "examples",
) -> dict[str, Any]:
    """One served app under load, after a 1 s warm-up: the load run, with the server's CPU."""
    body = chat_body()
    process, port = _serve(server, middleware, env, app, app_dir)
    try:
        _drive(port, body, key, concurrency, 1)  # warm-up
        before = thread_cpu(process.pid)
        run = _drive(port, body, key, concurrency, duration)
        run["cpu"] = _cpu_spent(before, thread_cpu(process.pid), process.pid)
        return run
    finally:
        process.terminate()
        process.wait(10)


async def run(duration: float, repeats: int, concurrency: int = 32) -> list[dict[str, Any]]:
    """Requests/s, p50 and p99 per server and variant; runs alternate bare/middleware."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bm-http-") as directory:
        key, env = await world_env(directory)
        for server in SERVERS:
            found: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for _ in range(repeats):
                for middleware in (False, True):
                    found[middleware].append(
                        measured(server, middleware, env, key, concurrency, duration)
                    )
            bare, metered = _summary(found[False]), _summary(found[True])
            rows.append(
                {
                    "server": server,
                    "concurrency": concurrency,
                    "duration_s": duration,
                    "bare": bare,
                    "middleware": metered,
                    "throughput_ratio": metered["rps"] / bare["rps"] if bare["rps"] else 0.0,
                    "target": ">= 85% of the bare app's requests/s (issue 12)",
                }
            )
    return rows


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) spent so far by each thread of a process (Linux `/proc`;
    empty elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    spent: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        spent[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return spent


def _cpu_spent(before: dict[int, float], after: dict[int, float], pid: int) -> dict[str, float]:
    """Server CPU seconds over a run: the event-loop thread (the process's main thread, where
    every request is handled) and the others (worker threads: the store's writes, DNS)."""
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != pid)
    return {"loop_s": loop, "others_s": others}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of the repeated runs; server CPU per request over all of them."""
    n = len(runs)
    rps = [r["requests"] / (r["duration_us"] / 1e6) for r in runs]
    requests = sum(r["requests"] for r in runs) or 1
    return {
        "loop_cpu_us": sum(r["cpu"]["loop_s"] for r in runs) / requests * 1e6,
        "other_cpu_us": sum(r["cpu"]["others_s"] for r in runs) / requests * 1e6,
        "rps": sum(rps) / n,
        "p50_ms": sum(r["p50_us"] for r in runs) / n / 1000,
        "p99_ms": sum(r["p99_us"] for r in runs) / n / 1000,
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "runs": n,
        "tool": runs[0]["tool"],
    }
