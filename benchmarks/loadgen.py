"""A small HTTP/1.1 keep-alive load generator on raw asyncio sockets (uvloop when installed).

The fallback when `wrk` is not installed: fixed concurrency (one connection per worker), a
bounded time, latency per request. It costs more CPU than wrk, so on two cores it saturates a
server less: prefer wrk (`apt-get install wrk`) for the published figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from typing import Any

_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = _LENGTH.search(head)
    if length is not None:
        await reader.readexactly(int(length.group(1)))
    elif _CHUNKED.search(head):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _worker(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], bad: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    perf = time.perf_counter
    try:
        while perf() < deadline:
            start = perf()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(perf() - start)
            if not 200 <= status < 300:
                bad.append(status)
    finally:
        writer.close()


async def _load(
    host: str, port: int, request: bytes, concurrency: int, duration: float
) -> dict[str, Any]:
    latencies: list[float] = []
    bad: list[int] = []
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(
        *(_worker(host, port, request, deadline, latencies, bad) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "duration_us": int(elapsed * 1e6),
        "p50_us": int(latencies[n // 2] * 1e6) if n else 0,
        "p99_us": int(latencies[min(n - 1, int(n * 0.99))] * 1e6) if n else 0,
        "non_2xx": len(bad),
        "socket_errors": 0,
    }


def run_load(
    host: str, port: int, request: bytes, concurrency: int, duration: float
) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(_load(host, port, request, concurrency, duration))
    except ImportError:
        return asyncio.run(_load(host, port, request, concurrency, duration))


def main() -> None:
    """`python loadgen.py PORT PATH CONCURRENCY SECONDS`, the body and the key in BENCH_BODY and
    BENCH_KEY (as for wrk's post.lua): its own process, as wrk is, never the driver's loop."""
    port, path, concurrency, duration = sys.argv[1:5]
    request = build_request(
        "127.0.0.1",
        int(port),
        path,
        os.environ["BENCH_BODY"].encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ['BENCH_KEY']}"},
    )
    found = run_load("127.0.0.1", int(port), request, int(concurrency), float(duration))
    print("BENCH_JSON " + json.dumps(found))


if __name__ == "__main__":
    main()
