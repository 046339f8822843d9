"""Helpers for tests that use the real Redis and PostgreSQL servers (SPEC §11)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store.redis_counters import RedisCounters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class PrivateRedis:
    """A redis-server of a test's own, on a free loopback port: it may be stopped and restarted
    without disturbing anybody else's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="bm-redis-")
        # Removed with the object, or at exit: a suite run left some 90 of them in /tmp.
        weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--dbfilename",
                "dump.rdb",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def kill(self, *, keep_data: bool) -> None:
        """SIGKILL the server; with `keep_data` its data is saved first and loaded again by the
        next `start()` (a Redis that persists), else it comes back empty."""
        if keep_data:
            client = redis.Redis(host="127.0.0.1", port=self.port)
            client.save()
            client.close()
        self.stop()
        if not keep_data:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, "dump.rdb"))


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def unique_prefix() -> str:
    return f"bmtest:{uuid.uuid4().hex[:12]}:"


def use_prefix(engine: BudgetEngine, prefix: str) -> None:
    assert isinstance(engine.counters, RedisCounters)
    engine.counters.prefix = prefix


def delete_prefix(url: str, prefix: str) -> int:
    """Empty Redis of one test's keys (what FLUSHDB does, without touching other tests' keys)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


class TcpProxy:
    """A loopback TCP forwarder to a real server (PostgreSQL, say) that a test can cut: `cut()`
    closes the listener and every connection through it, so the server looks unreachable to the
    code under test while it goes on serving everybody else; `restore()` listens again. With
    `reply_delay` (seconds) the server's answers reach the client that much later: the server
    has done the work, and the client waits for its answer."""

    reply_delay = 0.0

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b, reply in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, reply), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, reply: bool) -> None:
        try:
            while data := source.recv(65536):
                if reply and self.reply_delay:
                    time.sleep(self.reply_delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def tcp_proxy(target_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()


@contextmanager
def private_database(base_url: str) -> Iterator[str]:
    """A PostgreSQL database of a test's own (it may be made read-only), dropped afterwards;
    yields its URL."""
    from sqlalchemy import create_engine, text

    name = f"bm_fault_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def set_read_only(database_url: str, read_only: bool) -> None:
    """Make a private database refuse (or take again) every write, on new connections and, by
    ending them, on the ones already open."""
    from sqlalchemy import create_engine, text

    base, name = database_url.rsplit("/", 1)
    admin = create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(
                f'ALTER DATABASE "{name}" SET default_transaction_read_only = '
                + ("on" if read_only else "off")
            )
        )
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
    admin.dispose()
