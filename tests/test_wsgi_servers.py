"""The WSGI adapter under real threaded servers, in subprocesses on free loopback ports (SPEC §15):
gunicorn `gthread` and waitress, one process on SQLite, two gunicorns on PostgreSQL + Redis.

Each server flushes once an hour: what the store holds after it stops was written at its exit
(`atexit`, run by the gunicorn worker as it exits and by waitress on SIGINT)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from conftest import (
    POSTGRES_BASE_URL,
    POSTGRES_URL,
    REDIS_URL,
    need_postgres,
    need_redis,
    reset_postgres,
)
from service_support import (
    delete_prefix,
    free_port,
    private_database,
    set_read_only,
    unique_prefix,
    wait_for_port,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"authorization": "Bearer admin-secret", "content-type": "application/json"}
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
).encode()


@contextmanager
def server(
    command: list[str], env: dict[str, str], port: int, stop: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """A server in a subprocess: waited for, stopped with `stop` (its graceful exit), and
    killed if it does not go within 20 s, whatever the test did."""
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(stop)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def stopped(process: subprocess.Popen[bytes], how: int = signal.SIGTERM) -> int:
    process.send_signal(how)
    return process.wait(20)


def base_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env.update(
        BUDGET_DATABASE_URL=database_url,
        BUDGET_ADMIN_KEY="admin-secret",
        BUDGET_FLUSH_INTERVAL_SECONDS="3600",
        PYTHONPATH=str(ROOT / "src"),
    )
    env.update(extra)
    return env


def gunicorn(port: int, app: str, chdir: Path, threads: int = 8) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", str(threads),
            "-w", "1", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
            "--chdir", str(chdir), app]  # fmt: skip


def call(port: int, method: str, path: str, body: Any = None, headers: Any = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        conn.close()


def hammer(port: int, key: str, threads: int, each: int) -> list[int]:
    """`threads` clients at once, `each` requests apiece on a kept-alive connection."""
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        start.wait()
        mine = []
        for _ in range(each):
            conn.request("POST", "/v1/chat/completions", body=BODY,
                         headers={"authorization": f"Bearer {key}",
                                  "content-type": "application/json"})  # fmt: skip
            answer = conn.getresponse()
            answer.read()
            mine.append(answer.status)
        conn.close()
        with lock:
            statuses.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return statuses


def one_by_one(ports: list[int], key: str) -> list[int]:
    """Requests one at a time (nothing in flight), alternating servers, until a 402."""
    statuses: list[int] = []
    while True:
        status, _ = call(ports[len(statuses) % len(ports)], "POST", "/v1/chat/completions",
                         BODY, {"authorization": f"Bearer {key}"})  # fmt: skip
        statuses.append(status)
        if status == 402 or len(statuses) > 200:
            return statuses


def price_of_one(port: int) -> int:
    """What one request of BODY costs, in nano-dollars: a probe key's live spend after one."""
    _, created = call(port, "POST", "/budget-admin/virtual-keys",
                      {"name": "probe", "budgets": [{"max_limit": 100}]}, ADMIN)  # fmt: skip
    probe = created["virtual_key"]
    status, _ = call(port, "POST", "/v1/chat/completions", BODY,
                     {"authorization": f"Bearer {probe['value']}"})  # fmt: skip
    assert status == 200
    query = f"owner_type=virtual_key&owner_id={probe['id']}&from_memory=true"
    _, budgets = call(port, "GET", f"/budget-admin/budgets?{query}", headers=ADMIN)
    return round(budgets["budgets"][0]["spent"] * 1e9)


def make_key(port: int, name: str, limit_nanos: int) -> dict[str, Any]:
    body = {"name": name, "budgets": [{"max_limit": limit_nanos / 1e9}]}
    status, created = call(port, "POST", "/budget-admin/virtual-keys", body, ADMIN)
    assert status == 201, created
    key: dict[str, Any] = created["virtual_key"]
    return key


def written(database_url: str, key_id: str) -> tuple[int, set[int], int, int]:
    """From the store: (usage records, their costs, their sum, the budget's usage) of a key."""
    store = create_engine(database_url)
    try:
        with store.connect() as conn:
            costs = [c for (c,) in conn.execute(
                text("SELECT cost_nanos FROM bm_usage_records WHERE virtual_key_id = :k"),
                {"k": key_id})]  # fmt: skip
            usage = conn.execute(
                text("SELECT current_usage_nanos FROM bm_budgets WHERE owner_id = :k"),
                {"k": key_id},
            ).scalar_one()
    finally:
        store.dispose()
    return len(costs), set(costs), sum(costs), int(usage)


def check_exact(
    label: str, at_once: list[int], after: list[int], price: int, limit: int, stored: Any
) -> None:
    count, costs, total, usage = stored
    admitted = at_once.count(200) + after.count(200)
    print(
        f"{label}: {len(at_once)} requests at once: {at_once.count(200)} admitted, "
        f"{at_once.count(429)} x 429 budget_reserved, {at_once.count(402)} x 402; then one by one "
        f"{after.count(200)} more; in all {admitted} admitted, recorded spend ${total / 1e9:.6f} = "
        f"{admitted} x ${price / 1e9:.6f}, limit ${limit / 1e9:.6f}, overshoot "
        f"${max(0, usage - limit) / 1e9:.6f}"
    )
    assert set(at_once) <= {200, 402, 429} and after[-1] == 402
    assert count == admitted and costs == {price}
    assert total == usage == admitted * price  # written at exit, each charge once
    assert usage <= limit  # overshoot 0: every reservation covers its request's cost
    assert admitted == limit // price  # with nothing in flight, spent to the last request


def test_gunicorn_gthread_admits_exactly_and_flushes_at_worker_exit(tmp_path: Path) -> None:
    """The Flask example under gunicorn (1 worker, 8 threads), 400 requests from 16 clients at
    once on one budget of 30 requests' price, then one by one until the 402."""
    url = f"sqlite:///{tmp_path}/gunicorn.db"
    port = free_port()
    command = gunicorn(port, "flask_app:create_app()", ROOT / "examples")
    with server(command, base_env(url), port) as process:
        price = price_of_one(port)
        limit = 30 * price
        key = make_key(port, "alice", limit)
        at_once = hammer(port, key["value"], threads=16, each=25)
        after = one_by_one([port], key["value"])
        assert stopped(process) == 0
    check_exact("gunicorn gthread x8", at_once, after, price, limit, written(url, key["id"]))


def test_waitress_serves_the_django_example_exactly(tmp_path: Path) -> None:
    """The Django example under waitress (8 threads), its admin API under its URL prefix."""
    url = f"sqlite:///{tmp_path}/waitress.db"
    port = free_port()
    command = [sys.executable, "-m", "waitress", "--threads=8", f"--listen=127.0.0.1:{port}",
               "llmsite.wsgi:application"]  # fmt: skip
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'examples' / 'django_app'}")
    with server(command, env, port, stop=signal.SIGINT) as process:
        price = price_of_one(port)
        limit = 20 * price
        key = make_key(port, "alice", limit)
        at_once = hammer(port, key["value"], threads=8, each=25)
        after = one_by_one([port], key["value"])
        stopped(process, signal.SIGINT)
    check_exact("waitress x8 (Django)", at_once, after, price, limit, written(url, key["id"]))


@pytest.mark.parametrize("served", ["gunicorn gthread (WSGI)", "uvicorn (ASGI)"])
def test_the_django_example_under_gunicorn_gthread_and_uvicorn_is_exact(
    tmp_path: Path, served: str
) -> None:
    """The Django example under gunicorn `gthread` (its `wsgi.py`) and under uvicorn (its
    `asgi.py`: `BudgetMiddleware(get_asgi_application())`, whose lifespan the middleware
    answers): 400 requests from 16 clients at once on a budget of 20 requests' price, then one
    by one until the 402; everything written at the server's exit (SIGTERM)."""
    url = f"sqlite:///{tmp_path}/django.db"
    port = free_port()
    site = ROOT / "examples" / "django_app"
    if served.startswith("gunicorn"):
        command = gunicorn(port, "llmsite.wsgi:application", site)
    else:
        command = [sys.executable, "-m", "uvicorn", "--port", str(port), "--app-dir", str(site),
                   "--log-level", "warning", "llmsite.asgi:application"]  # fmt: skip
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{site}")
    with server(command, env, port) as process:
        price = price_of_one(port)
        limit = 20 * price
        key = make_key(port, "alice", limit)
        at_once = hammer(port, key["value"], threads=16, each=25)
        after = one_by_one([port], key["value"])
        # uvicorn raises the signal it stopped on again once it has shut down
        assert stopped(process) in (0, -signal.SIGTERM)
    check_exact(f"Django, {served}", at_once, after, price, limit, written(url, key["id"]))


@pytest.mark.parametrize("served", ["gunicorn gthread", "waitress"])
def test_calls_one_after_another_on_one_request_in_flight_are_all_admitted(
    tmp_path: Path, served: str
) -> None:
    """The Django example under gunicorn `gthread` and waitress, a key of one request in flight:
    200 calls one after another, each on a connection of its own once the last answer was read
    in full. An answer that says its Content-Length was settled when the server asked for the
    chunk after its last one, after the client had it all: the next call, in another thread,
    could come first, and was refused 429 (17 of 200 under gunicorn, 16 under waitress)."""
    url = f"sqlite:///{tmp_path}/django.db"
    port = free_port()
    site = ROOT / "examples" / "django_app"
    if served == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=8",
                   f"--listen=127.0.0.1:{port}", "llmsite.wsgi:application"]  # fmt: skip
    else:
        command = gunicorn(port, "llmsite.wsgi:application", site)
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{site}")
    stop = signal.SIGINT if served == "waitress" else signal.SIGTERM
    with server(command, env, port, stop=stop):
        body = {"name": "alice", "rate_limit": {"max_concurrent_requests": 1}}
        _, created = call(port, "POST", "/budget-admin/virtual-keys", body, ADMIN)
        bearer = {"authorization": f"Bearer {created['virtual_key']['value']}"}
        statuses = [call(port, "POST", "/v1/chat/completions", BODY, bearer)[0] for _ in range(200)]
    print(f"{served}: 200 calls one after another, 1 in flight at most:",
          {status: statuses.count(status) for status in sorted(set(statuses))})  # fmt: skip
    assert statuses == [200] * 200


def _streamed_to_its_done(port: int, headers: dict[str, str]) -> int:
    """A streamed call read up to its `[DONE]` event, its connection closed there (as the
    OpenAI SDK stops at it); the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = json.dumps({**json.loads(BODY), "stream": True, "max_tokens": 8}).encode()
        conn.request("POST", "/v1/chat/completions", body, headers)
        answer = conn.getresponse()
        if answer.status != 200:
            answer.read()
            return answer.status
        while True:  # its raw lines: chunk sizes, events
            line = answer.fp.readline()
            if not line or line.startswith(b"data: [DONE]"):
                return answer.status if line else 0
    finally:
        conn.close()


@pytest.mark.parametrize("served", ["gunicorn gthread", "waitress"])
def test_streams_read_to_their_done_one_after_another_are_all_admitted(
    tmp_path: Path, served: str
) -> None:
    """The Flask example under gunicorn `gthread` and waitress, a key of one request in flight:
    200 streams one after another, each read up to its `[DONE]`, where the client has its
    answer. A stream was settled when the server asked the app's generator for the chunk after
    `[DONE]`: the next call, in another thread, could come first, and was refused 429 (11 of
    200 under gunicorn, 12 under waitress)."""
    url = f"sqlite:///{tmp_path}/flask.db"
    port = free_port()
    examples = ROOT / "examples"
    if served == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=8",
                   f"--listen=127.0.0.1:{port}", "--call", "flask_app:create_app"]  # fmt: skip
    else:
        command = gunicorn(port, "flask_app:create_app()", examples)
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{examples}")
    stop = signal.SIGINT if served == "waitress" else signal.SIGTERM
    with server(command, env, port, stop=stop):
        body = {"name": "alice", "rate_limit": {"max_concurrent_requests": 1}}
        _, created = call(port, "POST", "/budget-admin/virtual-keys", body, ADMIN)
        bearer = {"authorization": f"Bearer {created['virtual_key']['value']}"}
        statuses = [_streamed_to_its_done(port, bearer) for _ in range(200)]
    print(f"{served}: 200 streams one after another, read to their [DONE], 1 in flight at most:",
          {status: statuses.count(status) for status in sorted(set(statuses))})  # fmt: skip
    assert statuses == [200] * 200


SHARED_APP = """
import os, sys
sys.path.insert(0, {examples!r})
from flask_app import create_app
from budget_middleware import get_engine
app = create_app()
get_engine().counters.prefix = os.environ["BM_TEST_REDIS_PREFIX"]  # this test's keys only
"""


@pytest.mark.services
def test_two_gunicorns_on_postgres_and_redis_enforce_one_limit(tmp_path: Path) -> None:
    """Two gunicorn processes (8 threads each) on one PostgreSQL store and one Redis: 2 x 200
    requests at once on one key's budget; then one by one, alternating, until the 402."""
    need_postgres()
    need_redis()
    reset_postgres()
    prefix = unique_prefix()
    (tmp_path / "shared_app.py").write_text(SHARED_APP.format(examples=str(ROOT / "examples")))
    env = base_env(POSTGRES_URL, BUDGET_REDIS_URL=REDIS_URL, BM_TEST_REDIS_PREFIX=prefix)
    ports = [free_port(), free_port()]
    try:
        with server(gunicorn(ports[0], "shared_app:app", tmp_path), env, ports[0]) as first:
            price = price_of_one(ports[0])  # the schema exists before the second one starts
            with server(gunicorn(ports[1], "shared_app:app", tmp_path), env, ports[1]) as second:
                limit = 25 * price
                key = make_key(ports[1], "alice", limit)
                results: list[list[int]] = [[], []]
                both = [
                    threading.Thread(
                        target=lambda i=i: results[i].extend(
                            hammer(ports[i], key["value"], threads=8, each=25)
                        )
                    )
                    for i in (0, 1)
                ]
                for t in both:
                    t.start()
                for t in both:
                    t.join(90)
                after = one_by_one(ports, key["value"])
                assert stopped(second) == 0
            assert stopped(first) == 0
        at_once = results[0] + results[1]
        print(f"server 1 admitted {results[0].count(200)}, server 2 {results[1].count(200)}")
        check_exact("2 gunicorns, PostgreSQL + Redis", at_once, after, price, limit,
                    written(POSTGRES_URL, key["id"]))  # fmt: skip
    finally:
        delete_prefix(REDIS_URL, prefix)


def test_preloaded_workers_in_an_outage_take_back_only_their_own_batches(tmp_path: Path) -> None:
    """gunicorn `--preload`, 2 gthread workers, the store read-only for a while (up to three
    times: which worker takes whose batch back is a race). The engine is made in the master and
    never started there, so the workers named their spilled batches with the master's pid and
    one engine id, and each took the other's back as its own: that one's live spend then stayed
    27-37 % above the store's, refusing early for the rest of the window (a fault hunt's)."""
    need_postgres()
    with private_database(POSTGRES_BASE_URL) as url:
        live, statuses, pids, (count, _, total, usage) = _preloaded_outages(url, tmp_path)
    print(
        f"{statuses.count(200)} admitted, batches spilled under pids {sorted(pids)}; store: "
        f"{count} records, spend {usage}; live spend seen by the workers {sorted(live)}"
    )
    assert count == statuses.count(200) and usage == total
    assert live == {usage}


PRELOADED_APP = """
import json, sys, time
sys.path.insert(0, {examples!r})
from flask_app import create_app
from budget_middleware import get_engine
from budget_middleware.engine.portal import on_loop
app = create_app()
engine = get_engine()
body = {body!r}
def warm_up(key):
    answer = app.test_client().post(
        "/v1/chat/completions", data=body, headers={{"authorization": "Bearer " + key.value}}
    )
    assert answer.status_code == 200, answer.get_data()
probe = engine.manager.create_virtual_key(name="probe", budgets=[{{"max_limit": 100}}])
warm_up(probe)  # the engine starts in the master
counter = engine.registry.counter("budget", probe.budgets[0].id)
deadline = time.monotonic() + 20
while not counter.value and time.monotonic() < deadline:
    time.sleep(0.01)  # settled on the engine's loop, a moment after the answer
price = counter.value
assert price > 0, "the warm-up request was never charged"
key = engine.manager.create_virtual_key(name="alice", budgets=[{{"max_limit": 30 * price / 1e9}}])
warm_up(key)  # its counter held by the master, and written
on_loop(engine, engine.flush)
with open({out!r}, "w") as out:
    json.dump({{"id": key.id, "value": key.value, "price": price}}, out)
"""


def test_workers_preload_forks_anew_admit_on_the_store_s_spend_not_the_master_s(
    tmp_path: Path,
) -> None:
    """gunicorn `--preload --max-requests 5`, one worker, the engine started in the master (a
    warm-up request on a budget of 30 requests' price). Each worker forked anew to replace one
    at its 5th request admitted on the counters the master held (1 request spent), not on the
    store's, until its first re-read a TTL later: its whole life. One by one until the 402:
    every request admitted and charged once, spend at most the limit."""
    url = f"sqlite:///{tmp_path}/preload.db"
    out = tmp_path / "key.json"
    (tmp_path / "preloaded_app.py").write_text(
        PRELOADED_APP.format(examples=str(ROOT / "examples"), body=BODY, out=str(out))
    )
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "--preload",
               "--max-requests", "5", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
               "--chdir", str(tmp_path), "preloaded_app:app"]  # fmt: skip
    with server(command, base_env(url, BUDGET_FLUSH_INTERVAL_SECONDS="1"), port) as process:
        key = json.loads(out.read_text())
        after = one_by_one([port], key["value"])
        assert stopped(process) == 0
    price, limit = key["price"], 30 * key["price"]
    count, costs, total, usage = written(url, key["id"])
    print(
        f"after the master's warm-up: {after.count(200)} admitted one by one, then "
        f"{after[-1]}; store: {count} records, spend ${usage / 1e9:.6f} of ${limit / 1e9:.6f}, "
        f"overshoot ${max(0, usage - limit) / 1e9:.6f}"
    )
    assert after[-1] == 402 and costs == {price}
    assert count == after.count(200) + 1 and total == usage == count * price
    assert usage == limit  # nothing in flight: spent to the last request, and not past it


def _preloaded_outages(
    url: str, tmp_path: Path
) -> tuple[set[int], list[int], set[str], tuple[int, set[int], int, int]]:
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "2",
               "--preload", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
               "--chdir", str(ROOT / "examples"), "flask_app:create_app()"]  # fmt: skip
    env = base_env(
        url,
        BUDGET_FLUSH_INTERVAL_SECONDS="0.2",
        BUDGET_CACHE_TTL_SECONDS="0.5",
        BUDGET_SPILL_DIR=str(tmp_path / "spill"),
    )
    with server(command, env, port):
        key = make_key(port, "alice", 10**12)
        statuses = hammer(port, key["value"], threads=8, each=4)  # both workers know the key
        pids: set[str] = set()
        for _ in range(3):
            set_read_only(url, True)
            for _ in range(4):
                statuses += hammer(port, key["value"], threads=8, each=5)
            time.sleep(1.0)  # a few more rounds: spilled
            pids |= {p.name.split("-")[1] for p in (tmp_path / "spill").glob("*/*.json")}
            set_read_only(url, False)
            count, total, usage, live = _settled(url, port, key["id"], statuses.count(200))
            if live != {usage}:
                break
    return live, statuses, pids, (count, set(), total, usage)


def _settled(url: str, port: int, key_id: str, admitted: int) -> tuple[int, int, int, set[int]]:
    """The store back: (records, their sum, the budget's usage, the live spends the workers
    show), once every admitted request is written and the workers (30 calls reach both) show
    the store's spend, or after 60 s as they are then (the assertions say what is wrong). A
    fixed 3 s wait fell short when a worker took over 3 s to write its batches back (with a
    3.5 s pause there: 81 of 192 written)."""
    query = f"owner_type=virtual_key&owner_id={key_id}&from_memory=true"
    deadline = time.monotonic() + 60
    while True:
        count, _, total, usage = written(url, key_id)
        live = {
            round(call(port, "GET", f"/budget-admin/budgets?{query}", headers=ADMIN)[1][
                "budgets"][0]["spent"] * 1e9)
            for _ in range(30)
        }  # fmt: skip
        if (count == admitted and live == {usage}) or time.monotonic() > deadline:
            return count, total, usage, live
        time.sleep(0.2)


def _stream_in_flight(port: int, key: str) -> socket.socket:
    """A slow stream (100 events, 200 ms apart) begun, its first 5 events read: in flight."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 100, "stream": True}).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nx-fake-delay-ms: 200\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    got = b""
    while got.count(b"data: ") < 5:
        got += sock.recv(65536)
    return sock


@pytest.mark.parametrize("how", ["waitress", "flask run"])
def test_a_stream_in_flight_when_the_server_exits_is_charged(tmp_path: Path, how: str) -> None:
    """waitress (on SIGINT) and `flask run` (on Ctrl-C) exit with their request threads still
    running (daemon threads: waitress waits 5 s for them, werkzeug not at all). A stream in
    flight then was never settled: its client had events, and the store had no record of it and
    a spend of $0. Whatever is still open at exit is settled as a disconnect, before the last
    write."""
    url = f"sqlite:///{tmp_path}/exit.db"
    port = free_port()
    examples = ROOT / "examples"
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{examples}")
    if how == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=4", "--call",
                   f"--listen=127.0.0.1:{port}", "flask_app:create_app"]  # fmt: skip
    else:
        command = [sys.executable, "-m", "flask", "--app", "flask_app", "run", "--port", str(port)]
    with server(command, env, port, stop=signal.SIGINT) as process:
        key = make_key(port, "alice", 10**10)
        sock = _stream_in_flight(port, key["value"])
        try:
            assert stopped(process, signal.SIGINT) == 0
        finally:
            sock.close()
    store = create_engine(url)
    try:
        with store.connect() as conn:
            rows = conn.execute(
                text("SELECT outcome, estimated, output_tokens, cost_nanos FROM bm_usage_records")
            ).all()
            usage = conn.execute(
                text("SELECT current_usage_nanos FROM bm_budgets WHERE owner_id = :k"),
                {"k": key["id"]},
            ).scalar_one()
    finally:
        store.dispose()
    print(f"{how}: a stream in flight at exit: records {rows}, budget spend {usage} nano-USD")
    assert len(rows) == 1
    outcome, estimated, output_tokens, cost = rows[0]
    assert (outcome, bool(estimated)) == ("client_disconnected", True)
    assert output_tokens >= 5 and cost > 0 and usage == cost


def test_the_admin_api_under_waitress_on_a_unix_socket(tmp_path: Path) -> None:
    """waitress behind a proxy on a unix socket names the socket as `SERVER_PORT`: every admin
    request failed with a 500 (`int()` of the path), the metered ones were served. A port that
    is no number is none (ASGI's `server` of a unix socket)."""
    path = tmp_path / "waitress.sock"
    env = base_env(f"sqlite:///{tmp_path}/unix.db")
    env["PYTHONPATH"] += f":{ROOT / 'examples'}"
    command = [sys.executable, "-m", "waitress", "--call", f"--unix-socket={path}",
               "flask_app:create_app"]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)

    def ask(request: bytes) -> tuple[int, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = json.dumps({"name": "alice"}).encode()
        health = ask(b"GET /budget-admin/health HTTP/1.0\r\nHost: t\r\n\r\n")
        created = ask(
            b"POST /budget-admin/virtual-keys HTTP/1.0\r\nHost: t\r\n"
            b"Authorization: Bearer admin-secret\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    finally:
        stopped(process, signal.SIGINT)
    print(f"on a unix socket: health {health[0]}, create {created[0]} {created[1][:60]!r}")
    assert health[0] == 200 and json.loads(health[1])["status"] == "ok"
    assert created[0] == 201 and json.loads(created[1])["virtual_key"]["name"] == "alice"


WORKER_EXIT_HOOK = """
def worker_exit(server, worker):
    import budget_middleware.wsgi
    budget_middleware.wsgi.shutdown()
"""


def test_a_charge_settled_after_the_worker_exit_hook_s_shutdown_is_written(
    tmp_path: Path,
) -> None:
    """gunicorn with the README's `worker_exit` hook (`shutdown()`) and `--max-requests`: a
    worker restarts while a stream it serves goes on (no one kills it), its hook shuts the
    engine down, and the stream ends after that. Its charge was settled into the shut-down
    engine, which the exit then skipped: the stream streamed whole, the store had no record of
    it. What is settled after a shutdown is written at exit."""
    url = f"sqlite:///{tmp_path}/restart.db"
    (tmp_path / "gunicorn_conf.py").write_text(WORKER_EXIT_HOOK)
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
               "--max-requests", "3", "--graceful-timeout", "1",
               "-c", str(tmp_path / "gunicorn_conf.py"), "-b", f"127.0.0.1:{port}",
               "--chdir", str(ROOT / "examples"), "flask_app:create_app()"]  # fmt: skip
    with server(command, base_env(url), port) as process:
        key = make_key(port, "alice", 10**10)  # the worker's first request
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 15, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer "
                + key["value"].encode() + b"\r\nx-fake-delay-ms: 200\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip
            streamed = sock.recv(65536)  # the second request, under way
            status, _ = call(port, "POST", "/v1/chat/completions", BODY,
                             {"authorization": f"Bearer {key['value']}"})  # fmt: skip
            while chunk := sock.recv(65536):  # the third made the worker restart: it goes on
                streamed += chunk
        assert status == 200 and b"data: [DONE]" in streamed
        assert stopped(process) == 0
    count, costs, total, usage = written(url, key["id"])
    print(f"records {count}, costs {sorted(costs)}, recorded {total}, budget spend {usage}")
    assert count == 2 and total == usage and len(costs) == 2


SLOW_APP = """
import json, sys, time
sys.path.insert(0, {examples!r})
from flask_app import create_app, fake_completion
from flask import Response, request

app = create_app()


@app.post("/v1/slow/chat/completions")
def slow():  # a provider call that outlives gunicorn's --timeout
    body = request.get_json(force=True)
    time.sleep(10)
    return Response(json.dumps(fake_completion(body)), content_type="application/json")
"""


def test_a_call_gunicorn_s_sync_worker_times_out_is_charged(tmp_path: Path) -> None:
    """gunicorn's default worker (`sync`) stops a request that outlives `--timeout` by raising
    SystemExit in it, then exits (what is pending is written at its exit). The provider call
    it cut was made and is billed; it was recorded as a 500 costing $0. It is charged its most
    output, as under ASGI a request its server cuts before its answer is."""
    url = f"sqlite:///{tmp_path}/timeout.db"
    (tmp_path / "slow_app.py").write_text(SLOW_APP.format(examples=str(ROOT / "examples")))
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-w", "1", "--timeout", "2",
               "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "slow_app:app"]  # fmt: skip
    with server(command, base_env(url), port) as process:
        key = make_key(port, "alice", 10**10)
        body = json.loads(BODY)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/slow/chat/completions",
                     body=json.dumps({**body, "max_tokens": 1000}).encode(),
                     headers={"authorization": f"Bearer {key['value']}"})  # fmt: skip
        status = conn.getresponse().status  # gunicorn's 500, as its worker goes
        conn.close()
        wait_for_port(port, 30)  # a new worker
        assert stopped(process) == 0
    count, _, total, usage = written(url, key["id"])
    print(
        f"a call cut by the worker timeout (answered {status}): {count} record(s), "
        f"charged {total} nano-USD, budget spend {usage}"
    )
    assert count == 1 and total == usage
    assert total >= 1000 * 600  # its 1000 output tokens of gpt-4o-mini at $0.60 a million


@pytest.mark.parametrize("how", ["waitress", "flask run"])
def test_a_call_in_flight_when_the_server_exits_is_charged(tmp_path: Path, how: str) -> None:
    """waitress (on SIGINT, after its 5 s of grace) and `flask run` (on Ctrl-C) exit with a
    request thread still in the app's provider call, which was made and is billed. It was
    settled at exit as a disconnect that had streamed nothing: $0. It is charged its most
    output, as under ASGI a request its server cuts before its answer is."""
    url = f"sqlite:///{tmp_path}/exit.db"
    (tmp_path / "slow_app.py").write_text(SLOW_APP.format(examples=str(ROOT / "examples")))
    port = free_port()
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{tmp_path}")
    if how == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=4", f"--listen=127.0.0.1:{port}",
                   "slow_app:app"]  # fmt: skip
    else:
        command = [sys.executable, "-m", "flask", "--app", "slow_app", "run", "--port", str(port)]
    with server(command, env, port, stop=signal.SIGINT) as process:
        key = make_key(port, "alice", 10**10)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/slow/chat/completions",
                     body=json.dumps({**json.loads(BODY), "max_tokens": 1000}).encode(),
                     headers={"authorization": f"Bearer {key['value']}"})  # fmt: skip
        time.sleep(1)  # the request in the app's call
        try:
            assert stopped(process, signal.SIGINT) == 0
        finally:
            conn.close()
    count, _, total, usage = written(url, key["id"])
    print(
        f"{how}: a call in flight at exit: {count} record(s), charged {total} nano-USD, "
        f"budget spend {usage}"
    )
    assert count == 1 and total == usage
    assert total >= 1000 * 600  # its 1000 output tokens of gpt-4o-mini at $0.60 a million


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_the_wsgi_admin_api_answers_forty_writes_at_once_under_waitress(
    tmp_path: Path, store: str
) -> None:
    """The Flask example under waitress (48 threads): 40 admin PUTs to one key at once, with a
    metered request of another key among them, on SQLite, and on PostgreSQL + Redis. Each write
    tells the engine once its session has given its connection back: told at its commit, each
    read the store on a second connection while holding its own, the pool stalled, and none of
    the 40 (nor the request) was answered within this client's 20 s, on either store. Now 40 x
    200 in 0.4 to 0.6 s on both."""
    prefix = unique_prefix()
    if store == "postgres":
        need_postgres()
        need_redis()
        reset_postgres()
        env = base_env(POSTGRES_URL, BUDGET_REDIS_URL=REDIS_URL, BM_TEST_REDIS_PREFIX=prefix)
        (tmp_path / "shared_app.py").write_text(SHARED_APP.format(examples=str(ROOT / "examples")))
        app, chdir = "shared_app:app", tmp_path
    else:
        env = base_env(f"sqlite:///{tmp_path}/writes.db")
        app, chdir = "flask_app:create_app", ROOT / "examples"
    port = free_port()
    command = [sys.executable, "-m", "waitress", "--threads=48", f"--listen=127.0.0.1:{port}",
               *(["--call"] if store == "sqlite" else []), app]  # fmt: skip
    env["PYTHONPATH"] += f":{chdir}"
    answers: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    try:
        with server(command, env, port, stop=signal.SIGINT):
            key = make_key(port, "alice", 10**11)
            other = make_key(port, "bob", 10**11)
            budget_id = key["budgets"][0]["id"]
            start = threading.Barrier(41)

            def write(i: int) -> None:
                start.wait()
                began = time.monotonic()
                body = {"budgets": [{"id": budget_id, "max_limit": 100 + i}]}
                status, _ = call(port, "PUT", f"/budget-admin/virtual-keys/{key['id']}", body,
                                 ADMIN)  # fmt: skip
                with lock:
                    answers.append(("write", status, time.monotonic() - began))

            def request() -> None:
                start.wait()
                began = time.monotonic()
                status, _ = call(port, "POST", "/v1/chat/completions", BODY,
                                 {"authorization": f"Bearer {other['value']}"})  # fmt: skip
                with lock:
                    answers.append(("request", status, time.monotonic() - began))

            threads = [threading.Thread(target=write, args=(i,)) for i in range(40)]
            threads.append(threading.Thread(target=request))
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            took = time.monotonic() - began
            _, got = call(port, "GET", f"/budget-admin/virtual-keys/{key['id']}", headers=ADMIN)
    finally:
        if store == "postgres":
            delete_prefix(REDIS_URL, prefix)
    writes = sorted(status for kind, status, _ in answers if kind == "write")
    served = [(status, waited) for kind, status, waited in answers if kind == "request"]
    limit = got["virtual_key"]["budgets"][0]["max_limit"]
    print(f"{store}: 40 admin writes at once under waitress: {writes.count(200)} x 200 in "
          f"{took:.2f} s; the request {served}; the limit now {limit}")  # fmt: skip
    assert writes == [200] * 40 and [s for s, _ in served] == [200]
    assert took < 15
    assert 100 <= limit <= 139


RESTARTING_APP = """
import json, sys
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from budget_middleware.wsgi import BudgetWSGIMiddleware, create_admin_wsgi_app

DELTA = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
         "choices": [{"delta": {"content": "hello " * 200}}]}


def relay(environ, start_response):  # relays a provider's stream, which fails mid-event
    environ["wsgi.input"].read()
    start_response("200 OK", [("content-type", "text/event-stream")])
    yield b"data: " + json.dumps(DELTA).encode()  # an event begun: its end never comes
    try:
        raise ConnectionError("the provider reset the stream")
    except ConnectionError:  # PEP 3333's error pattern: a new status, if none was sent yet
        start_response("502 Bad Gateway", [("content-type", "application/json")],
                       sys.exc_info())
        yield b'{"error": {"message": "the provider failed"}}'


app = DispatcherMiddleware(BudgetWSGIMiddleware(relay),
                           {"/budget-admin": create_admin_wsgi_app()})
"""


@pytest.mark.parametrize("served", ["waitress", "gunicorn gthread"])
def test_a_stream_restarted_as_a_502_after_its_first_bytes_is_charged_as_a_cut_stream(
    tmp_path: Path, served: str
) -> None:
    """An app relays a stream (no usage asked: the middleware asks for it, and holds an event
    until its end, to cut that chunk out), the provider fails within its first event, and the
    app gives a new status, `start_response("502 ...", exc_info)`. Nothing had gone to the
    server: waitress (which sends headers at the first non-empty chunk, PEP 3333) sent the
    502, which was measured in place of the stream and charged $0 (`completed`); gunicorn sent
    the 200's headers at the empty chunk, refused the 502, and the same call was charged 5,700
    nano-USD, a cut stream, as under ASGI. The provider's answer had begun: charged so on both."""
    url = f"sqlite:///{tmp_path}/restart.db"
    (tmp_path / "restarting_app.py").write_text(RESTARTING_APP)
    port = free_port()
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{tmp_path}")
    if served == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=4", f"--listen=127.0.0.1:{port}",
                   "restarting_app:app"]  # fmt: skip
    else:
        command = gunicorn(port, "restarting_app:app", tmp_path, threads=4)
    stop = signal.SIGINT if served == "waitress" else signal.SIGTERM
    with server(command, env, port, stop=stop) as process:
        key = make_key(port, "alice", 10**10)
        body = {**json.loads(BODY), "stream": True, "max_tokens": 1000}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers={"authorization": f"Bearer {key['value']}"})  # fmt: skip
            answer = conn.getresponse()
            status = answer.status
            with contextlib.suppress(http.client.IncompleteRead):  # gunicorn: the 200 cut
                answer.read()
        finally:
            conn.close()
        assert stopped(process, stop) == 0
    store = create_engine(url)
    try:
        with store.connect() as conn_:
            query = "SELECT status, outcome, estimated, cost_nanos FROM bm_usage_records"
            rows = [tuple(r) for r in conn_.execute(text(query))]
    finally:
        store.dispose()
    print(f"{served}: answered {status}; recorded (status, outcome, estimated, cost) {rows}")
    assert status == (502 if served == "waitress" else 200)
    assert [(s, outcome, estimated) for s, outcome, estimated, _ in rows] == [
        (200, "upstream_error", 1)]  # fmt: skip
    assert rows[0][3] == 5_700  # its prompt's estimate, as gunicorn and ASGI charge it


# A Django site whose view relays a slow stream (`StreamingHttpResponse` of a generator, 100
# events 100 ms apart, usage at its end), behind `BudgetWSGIMiddleware` in its `wsgi.py`.
SLOW_DJANGO_SITE = """
import json, os, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "slow_site")
SECRET_KEY, DEBUG, ALLOWED_HOSTS, ROOT_URLCONF = "x", False, ["*"], "slow_site"
INSTALLED_APPS, MIDDLEWARE, DATABASES, USE_TZ = [], [], {}, True

from django.http import StreamingHttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from budget_middleware.wsgi.django import admin_urls


def events():
    chunk = {"object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    for _ in range(100):
        time.sleep(0.1)
        event = {**chunk, "choices": [{"index": 0, "delta": {"content": " word"}}]}
        yield f"data: {json.dumps(event)}\\n\\n".encode()
    usage = {"prompt_tokens": 10, "completion_tokens": 100}
    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\\n\\n".encode()
    yield b"data: [DONE]\\n\\n"


@csrf_exempt
def chat(request):
    return StreamingHttpResponse(events(), content_type="text/event-stream")


urlpatterns = [*admin_urls("budget-admin/"), path("v1/chat/completions", chat)]

from django.core.wsgi import get_wsgi_application
from budget_middleware.wsgi import BudgetWSGIMiddleware
application = BudgetWSGIMiddleware(get_wsgi_application())
"""


@pytest.mark.parametrize("served", ["gunicorn gthread", "waitress"])
def test_a_django_stream_whose_client_goes_midway_is_charged_an_estimate_once(
    tmp_path: Path, served: str
) -> None:
    """A client that reads 5 events of a Django `StreamingHttpResponse` (100 events, 100 ms
    apart) and closes its connection, under a real server: the server's write fails, it closes
    the answer, and the call is charged once, an estimate of what streamed (not $0, nor its
    whole 100 tokens); the spend is that record's."""
    (tmp_path / "slow_site.py").write_text(SLOW_DJANGO_SITE)
    url = f"sqlite:///{tmp_path}/slow.db"
    port = free_port()
    env = base_env(url, PYTHONPATH=f"{ROOT / 'src'}:{tmp_path}")
    if served == "waitress":
        command = [sys.executable, "-m", "waitress", "--threads=4",
                   f"--listen=127.0.0.1:{port}", "slow_site:application"]  # fmt: skip
    else:
        command = gunicorn(port, "slow_site:application", tmp_path, threads=4)
    stop = signal.SIGINT if served == "waitress" else signal.SIGTERM
    with server(command, env, port, stop=stop) as process:
        key = make_key(port, "alice", 10**10)
        sock = _stream_in_flight(port, key["value"])
        sock.close()  # gone after 5 events
        time.sleep(2)  # the server's next writes fail, and it closes the answer
        assert stopped(process, stop) == 0
    store = create_engine(url)
    try:
        with store.connect() as conn:
            rows = conn.execute(
                text("SELECT outcome, estimated, output_tokens, cost_nanos FROM bm_usage_records")
            ).all()
            usage = conn.execute(
                text("SELECT current_usage_nanos FROM bm_budgets WHERE owner_id = :k"),
                {"k": key["id"]},
            ).scalar_one()
    finally:
        store.dispose()
    print(f"{served}: a Django stream its client left after 5 events: {rows}, spend {usage}")
    assert len(rows) == 1
    outcome, estimated, output_tokens, cost = rows[0]
    assert (outcome, bool(estimated)) == ("client_disconnected", True)
    assert 5 <= output_tokens < 100 and 0 < cost == usage
