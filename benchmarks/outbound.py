"""Part "outbound": the CPU `BudgetTransport` adds to a provider call, beside a bare client.

The same `httpx2.AsyncClient` calls a fixed completion through `httpx2.MockTransport` (no socket,
so httpx's own share is as small as it gets and the transport's share as large), with and
without `BudgetTransport` around it; CPU time (`time.process_time`) per call, interleaved rounds.
The yardstick, measured in the same run: a bare client's own CPU per real call, over a loopback
socket to a provider in another process (its CPU not counted).
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
from harness import FIXED_COMPLETION, bench_settings, chat_body, make_world
from http_load import _free_port


def _provider(request: httpx2.Request) -> httpx2.Response:
    # Unread, as a real transport's answer is (`content=` would give one read already).
    return httpx2.Response(
        200,
        stream=httpx2.ByteStream(FIXED_COMPLETION),
        headers={"content-type": "application/json", "content-length": str(len(FIXED_COMPLETION))},
    )


async def _cpu_per_call(client: httpx2.AsyncClient, body: bytes, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        answer = await client.post("https://api.openai.com/v1/chat/completions", content=body)
        answer.read()
    return (time.process_time() - started) / n * 1e6


# A provider in a process of its own: HTTP/1.1 keep-alive, the fixed completion to every POST.
_PROVIDER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = sys.stdin.buffer.read()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # the answer in one write (flushed after each request)
    disable_nagle_algorithm = True
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
if len(sys.argv) > 2:  # HTTPS, as every provider answers
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""


def _start_provider(
    directory: str, tls: bool
) -> tuple[subprocess.Popen[bytes], str, ssl.SSLContext | bool]:
    """The provider process, plain or HTTPS (a self-signed certificate for 127.0.0.1 made by
    `openssl`): the process, its URL and the client's `verify`."""
    port = _free_port()
    tls_args: list[str] = []
    verify: ssl.SSLContext | bool = False
    if tls:
        cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
            check=True, capture_output=True,
        )  # fmt: skip
        tls_args = [cert, key]
        verify = ssl.create_default_context(cafile=cert)
    server = subprocess.Popen(
        [sys.executable, "-c", _PROVIDER, str(port), *tls_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(FIXED_COMPLETION)
    server.stdin.close()
    server.stdout.readline()  # "ready"
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/chat/completions", verify


async def _real_calls_cpu_us(body: bytes, n: int, rounds: int) -> tuple[float, float]:
    """A bare client's own CPU per call over a loopback socket, plain HTTP and HTTPS (the
    yardstick), in interleaved rounds: the provider runs in another process, whose CPU is not
    counted."""
    with tempfile.TemporaryDirectory(prefix="bm-bench-tls-") as directory:
        servers = [_start_provider(directory, tls) for tls in (False, True)]
        try:
            clients = [
                (httpx2.AsyncClient(trust_env=False, verify=verify), url)
                for _, url, verify in servers
            ]
            best = [float("inf"), float("inf")]
            for client, url in clients:
                for _ in range(50):  # warm-up: the connection made
                    (await client.post(url, content=body)).read()
            for _ in range(rounds):
                for i, (client, url) in enumerate(clients):
                    started = time.process_time()
                    for _ in range(n):
                        (await client.post(url, content=body)).read()
                    best[i] = min(best[i], (time.process_time() - started) / n * 1e6)
            for client, _ in clients:
                await client.aclose()
            return best[0], best[1]
        finally:
            for server, _, _ in servers:
                server.kill()
                server.wait()


async def run(n: int, rounds: int) -> dict[str, Any]:
    # Imported here: from its import on, the middlewares note every request's caller (SPEC
    # §13), which the other parts measure without (an app that makes no outbound call).
    from budget_middleware import BudgetTransport, charge_to

    with tempfile.TemporaryDirectory(prefix="bm-bench-") as directory:
        settings = bench_settings(Path(directory))
        world = await make_world(settings)
        engine = world.engine
        body = chat_body()
        bare = httpx2.AsyncClient(transport=httpx2.MockTransport(_provider))
        metered = httpx2.AsyncClient(
            transport=BudgetTransport(httpx2.MockTransport(_provider), engine=engine)
        )
        samples: dict[str, list[float]] = {"bare": [], "metered": []}
        with charge_to(virtual_key=world.key):
            for client in (bare, metered):
                await _cpu_per_call(client, body, 300)  # warm-up
            for _ in range(rounds):
                for name, client in (("bare", bare), ("metered", metered)):
                    samples[name].append(await _cpu_per_call(client, body, n // rounds))
                await engine.flush()
        await bare.aclose()
        await metered.aclose()
        await engine.shutdown()
        engine.store.dispose()
    bare_us = min(samples["bare"])
    metered_us = min(samples["metered"])
    plain_us, https_us = await _real_calls_cpu_us(body, max(n // 20, 150), 2 * rounds)
    return {
        "bare_cpu_us": bare_us,
        "metered_cpu_us": metered_us,
        "added_us": metered_us - bare_us,
        "ratio": metered_us / bare_us,
        "plain_call_cpu_us": plain_us,
        "https_call_cpu_us": https_us,
        "added_vs_plain_call_pct": (metered_us - bare_us) / plain_us * 100,
        "added_vs_https_call_pct": (metered_us - bare_us) / https_us * 100,
    }
