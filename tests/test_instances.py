"""Two real server processes share PostgreSQL (and Redis): one set of limits (SPEC §11).

Each test starts `uvicorn` twice on free loopback ports, serving `examples/app.py`, with a Redis
server of its own (so that it can stop and restart it) and this run's PostgreSQL database.
A request costs exactly $0.01 (10 output tokens at $1000 per million, input free) and reserves
exactly that, against a budget of $1: it is worth 100 requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func
from sqlalchemy.engine import make_url
from sqlmodel import select

from budget_middleware import BudgetSettings
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store
from budget_middleware.store.tables import UsageRecordRow
from conftest import POSTGRES_URL, need_postgres, need_redis, reset_postgres
from service_support import PrivateRedis, free_port, private_redis, tcp_proxy, wait_for_port
from support import until

pytestmark = [pytest.mark.services, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
COST = 10_000_000  # nano-dollars: $0.01 a request
MODEL = "openai/budget-test"
FLUSH = 0.2
TTL = 0.5


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Deployment:
    """Entities in the store, and the servers that share it."""

    store: Store
    pricing: Path
    redis: PrivateRedis | None
    servers: list[Server] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # name -> value
    budgets: dict[str, str] = field(default_factory=dict)  # key name -> budget id

    def start(
        self,
        count: int = 2,
        prefix: tuple[str, ...] = (),
        database_url: str = POSTGRES_URL,
        **env: str,
    ) -> None:
        """`prefix`: a command each server runs under (`unshare …`); `database_url`: the store
        as the servers reach it (a proxy of `POSTGRES_URL` a test can cut)."""
        variables = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")},
            "BUDGET_DATABASE_URL": database_url,
            "BUDGET_PRICING_FILE": str(self.pricing),
            "BUDGET_FLUSH_INTERVAL_SECONDS": str(FLUSH),
            "BUDGET_CACHE_TTL_SECONDS": str(TTL),
            "BUDGET_SLOT_TTL_SECONDS": "2",
            # A loaded 2-core machine (CI runs the suite beside these servers) can hold a Redis
            # answer past the 2 s default: that is load, not an outage (issue 11, item 9).
            "BUDGET_REDIS_TIMEOUT_SECONDS": "10",
            **env,
        }
        if self.redis is not None:
            variables["BUDGET_REDIS_URL"] = self.redis.url
        started = []
        for _ in range(count):
            port = free_port()
            process = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app:app",
                    "--app-dir",
                    str(ROOT / "examples"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    # Past any test: the client's idle connections (hundreds after a storm) were
                    # closed by uvicorn's 5 s default as a request went out on one of them, and
                    # that request failed with `httpx.ReadError` (CI, 2026-12-05).
                    "--timeout-keep-alive",
                    "600",
                ],
                env=variables,
            )
            started.append(Server(port, process))
        for server in started:
            wait_for_port(server.port, timeout=30)
        self.servers += started

    def stop(self, server: Server, sig: int = signal.SIGTERM) -> None:
        if server.process.poll() is None:
            server.process.send_signal(sig)
            server.process.wait(30)

    def stop_all(self) -> None:
        for server in self.servers:
            self.stop(server)

    # -- what the store and Redis say ----------------------------------------------------

    def store_spend(self, key: str) -> int:
        budget = self.budgets[key]
        return self.store.read_counters([budget], [])[0][budget][0]

    def records(self) -> tuple[int, int]:
        with self.store.session() as s:
            count, total = s.exec(
                select(func.count(), func.coalesce(func.sum(UsageRecordRow.cost_nanos), 0))
            ).one()
        return int(count), int(total)

    def redis_spend(self, key: str) -> int:
        assert self.redis is not None
        client = redis.Redis.from_url(self.redis.url)
        try:
            found = list(client.scan_iter(match=f"bm:w:budget:{self.budgets[key]}:*"))
            return sum(int(client.get(k) or 0) for k in found)
        finally:
            client.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Any]:
    need_postgres()
    need_redis()
    reset_postgres()
    pricing = tmp_path / "prices.json"
    pricing.write_text(
        json.dumps({"models": {MODEL: {"input_per_mtok": 0, "output_per_mtok": 1000}}})
    )
    made: list[Deployment] = []

    def make(with_redis: bool = True) -> Deployment:
        store = Store(POSTGRES_URL)
        store.create_schema()
        manager = BudgetManager(store, BudgetSettings(database_url=POSTGRES_URL))
        server = PrivateRedis() if with_redis else None
        if server is not None:
            server.start()
        d = Deployment(store, pricing, server)
        team = manager.create_team(name="research", rate_limit={"max_concurrent_requests": 4})
        specs: dict[str, dict[str, Any]] = {
            "spender": {"budgets": [{"max_limit": 1, "reset_duration": "1d"}]},
            "burst": {"budgets": [{"max_limit": 1, "reset_duration": "1d"}]},
            "limited": {"rate_limit": {"request_max_limit": 50, "request_reset_duration": "1h"}},
            "slow": {"team_id": team.id, "budgets": [{"max_limit": 1000, "reset_duration": "1d"}]},
            "probe": {"team_id": team.id},
        }
        for name, spec in specs.items():
            key = manager.create_virtual_key(name=name, **spec)
            assert key.value is not None
            d.keys[name] = key.value
            if key.budgets:
                d.budgets[name] = key.budgets[0].id
        made.append(d)
        return d

    yield make
    for d in made:
        for server in d.servers:
            d.stop(server, signal.SIGKILL)
        if d.redis is not None:
            d.redis.stop()
        d.store.dispose()


BODY = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


async def post(
    client: httpx.AsyncClient, server: Server, key: str, **headers: str
) -> httpx.Response:
    return await client.post(
        server.url + "/v1/chat/completions", json=BODY, headers={"x-budget-key": key, **headers}
    )


async def burst(d: Deployment, key: str, count: int) -> list[httpx.Response]:
    """`count` requests at once, spread over every server."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(post(client, d.servers[i % len(d.servers)], d.keys[key]) for i in range(count))
        )


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    found: dict[int, int] = {}
    for r in responses:
        found[r.status_code] = found.get(r.status_code, 0) + 1
    return found


async def test_two_instances_with_redis_spend_one_budget_exactly(deployment: Any) -> None:
    d: Deployment = deployment()
    t0 = time.monotonic()
    d.start()
    t1 = time.monotonic()
    responses, limited = await asyncio.gather(burst(d, "spender", 400), burst(d, "limited", 200))
    admitted = statuses(responses).get(200, 0)
    print(f"\nwith Redis: {statuses(responses)}, rate limit: {statuses(limited)}")
    assert 0 < admitted <= 100
    assert set(statuses(responses)) <= {200, 402, 429}
    assert statuses(limited).get(200) == 50  # 50 per window across both processes
    assert d.redis_spend("spender") == admitted * COST
    # No false blocks either (LiteLLM's multi-instance budgets refused early): a client that
    # comes back after the burst's 429s (`budget_reserved`, retryable) is admitted, through
    # either server, until the $1 is spent, and not once more.
    later: dict[int, int] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(101):
            answer = await post(client, d.servers[n % 2], d.keys["spender"])
            later[answer.status_code] = later.get(answer.status_code, 0) + 1
            if answer.status_code == 402:
                break
    print(f"after the burst, one at a time: {later}")
    assert admitted + later.get(200, 0) == 100 and later.get(402) == 1, later
    admitted += later.get(200, 0)
    t2 = time.monotonic()
    d.stop_all()
    print(f"start {t1 - t0:.1f}s, load {t2 - t1:.1f}s, stop {time.monotonic() - t2:.1f}s")
    assert d.store_spend("spender") == admitted * COST
    assert d.records() == (admitted + 50, (admitted + 50) * COST)  # "limited" pays too


async def test_without_redis_the_overshoot_stays_inside_the_bound(deployment: Any) -> None:
    """Each process sees the others' spend at most TTL + 2 flush intervals late (docs)."""
    d: Deployment = deployment(with_redis=False)
    d.start()
    # The same burst as with Redis: within one window neither process sees the other's spend,
    # so each stops at the limit on its own and the overshoot is all the other one spent.
    responses = await burst(d, "burst", 400)
    per_process = [
        sum(1 for n, r in enumerate(responses) if n % 2 == i and r.status_code == 200)
        for i in (0, 1)
    ]
    burst_overshoot = sum(per_process) - 100
    print(f"\nwithout Redis, burst: admitted {per_process}, overshoot {burst_overshoot} requests")
    assert all(n <= 100 for n in per_process)
    assert burst_overshoot <= min(per_process)  # what the other spent in the window
    window = TTL + 2 * FLUSH
    admitted_at: list[list[float]] = [[], []]
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:

        async def instance(i: int) -> None:
            # About 30 requests a second per process for 3 s: the budget runs out half-way.
            for _ in range(100):
                r = await post(client, d.servers[i], d.keys["spender"])
                if r.status_code == 200:
                    admitted_at[i].append(time.monotonic() - start)
                await asyncio.sleep(0.03)

        await asyncio.gather(instance(0), instance(1))
    d.stop_all()
    admitted = len(admitted_at[0]) + len(admitted_at[1])
    spend = d.store_spend("spender")
    assert spend == admitted * COST
    assert d.store_spend("burst") == sum(per_process) * COST
    assert d.records()[1] == spend + sum(per_process) * COST
    overshoot = admitted - 100
    # What the other process spent in one window before each one's last admission, +1 in flight.
    slack = 0.2  # client-side timing of an admission
    bound = max(
        sum(1 for t in admitted_at[1 - i] if t > admitted_at[i][-1] - window - slack) + 1
        for i in (0, 1)
        if admitted_at[i]
    )
    print(
        f"\nwithout Redis: admitted {admitted} (per process {[len(a) for a in admitted_at]}),"
        f" overshoot {overshoot} requests, bound {bound}"
    )
    assert overshoot <= bound
    assert all(len(a) <= 100 for a in admitted_at)  # no process alone passes the limit


async def test_a_killed_instance_loses_at_most_one_flush_interval(deployment: Any) -> None:
    d: Deployment = deployment()
    # The victim's slots outlive it by the slot TTL, real time here (processes): 2 s let a
    # machine stalled that long between the kill and the survivor's request find them gone
    # (reproduced with a 2.5 s pause: admitted, not 429). 10 s holds them through a stall.
    slot_ttl = 10.0
    d.start(BUDGET_SLOT_TTL_SECONDS=str(slot_ttl))
    victim, survivor = d.servers
    completed: list[float] = []
    streaming: list[int] = []
    async with httpx.AsyncClient(timeout=30) as client:
        # Slow streams hold the team's 4 concurrency slots on the victim.
        async def hold() -> None:
            async with client.stream(
                "POST",
                victim.url + "/v1/chat/completions",
                json={**BODY, "stream": True},
                headers={"x-budget-key": d.keys["slow"], "x-mock-delay-ms": "1000"},
            ) as r:
                assert r.status_code == 200
                streaming.append(r.status_code)
                with pytest.raises(httpx.HTTPError):
                    async for _ in r.aiter_raw():
                        pass

        holders = [asyncio.create_task(hold()) for _ in range(4)]
        # All 4 admitted and streaming (waited for: a fixed 0.3 s let a loaded machine kill the
        # victim before some had their answer's head).
        await until(lambda: len(streaming) == 4, 30)
        # Meanwhile quick requests of "spender" complete on the victim and are flushed.
        for _ in range(20):
            r = await post(client, victim, d.keys["spender"])
            if r.status_code == 200:
                completed.append(time.monotonic())
            await asyncio.sleep(0.02)
        killed_at = time.monotonic()
        d.stop(victim, signal.SIGKILL)
        await asyncio.gather(*holders)
        blocked = await post(client, survivor, d.keys["probe"])
        assert blocked.status_code == 429
        assert blocked.json()["error"]["code"] == "concurrency_limit_exceeded"
        blocked_at = time.monotonic()
        while (probe := await post(client, survivor, d.keys["probe"])).status_code == 429:
            if time.monotonic() - blocked_at > slot_ttl + 60:
                break
            await asyncio.sleep(0.2)  # until the victim's slots expire
        print(f"the victim's slots expired {time.monotonic() - blocked_at:.1f} s after the 429")
        assert probe.status_code == 200
    d.stop_all()
    kept = d.store_spend("spender") // COST
    flushed_for_sure = sum(1 for t in completed if t < killed_at - FLUSH - 0.1)
    print(
        f"\nSIGKILL: {len(completed)} completed on the victim, {kept} kept in the store "
        f"(at least {flushed_for_sure} had to be)"
    )
    assert flushed_for_sure <= kept <= len(completed)


@pytest.mark.parametrize("fail_open", [False, True])
async def test_redis_stopped_mid_load(deployment: Any, fail_open: bool) -> None:
    d: Deployment = deployment()
    d.start(BUDGET_FAIL_OPEN=str(fail_open).lower())
    assert d.redis is not None
    seen: dict[str, dict[int, int]] = {"before": {}, "down": {}, "back": {}}
    phase = "before"
    async with httpx.AsyncClient(timeout=30) as client:

        async def load(i: int) -> None:
            # 40 requests each, and on until one is admitted with Redis back (bounded): a loaded
            # machine's Redis start, or a 2 s back-off begun just before it, could outlast the
            # 40 and leave nothing "back". At most 82 admitted: the budget (100) never runs out.
            sent = 0
            while sent < 40 or (not seen["back"].get(200) and sent < 400):
                r = await post(client, d.servers[i], d.keys["spender"])
                counts = seen[phase]
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                sent += 1
                await asyncio.sleep(0.06)

        async def outage() -> None:
            nonlocal phase
            await asyncio.sleep(0.5)
            d.redis.stop()  # type: ignore[union-attr]
            phase = "down"
            await asyncio.sleep(1.0)
            # "back" from the moment it is started: an instance may use it again at once (on a
            # slow machine its back-off ends while the start is awaited).
            phase = "back"
            d.redis.start()  # type: ignore[union-attr]  # empty: it is seeded from the store
            await asyncio.sleep(0.5)

        await asyncio.gather(load(0), load(1), outage())
    d.stop_all()
    print(f"\nRedis stopped, fail_open={fail_open}: {seen}")
    admitted = sum(counts.get(200, 0) for counts in seen.values())
    if fail_open:
        assert seen["down"].get(200, 0) > 0 and 503 not in seen["down"]
    else:
        assert seen["down"].get(503, 0) > 0 and seen["down"].get(200, 0) <= 4  # in-flight edge
    assert seen["back"].get(200, 0) > 0
    # Every admitted request is charged once, a 503 never.
    assert d.store_spend("spender") == admitted * COST
    assert d.records() == (admitted, admitted * COST)


async def test_a_fail_open_outage_then_an_empty_restart_admits_the_budget_exactly(
    deployment: Any,
) -> None:
    """Two fail-open servers, a $1 budget of $0.01 requests: 20 through Redis, Redis killed, 30
    admitted without it (written to the store), Redis restarted empty, then requests over both
    until refused. The outage's charges were in the store when the first instance seeded the
    window from it, and were added again as debts: 61 of the 100 admitted here (a fault hunt's
    76 with two gunicorn servers; the docs said 90). Each is counted once now: 100."""
    d: Deployment = deployment()
    d.start(BUDGET_FAIL_OPEN="true")
    assert d.redis is not None
    seen: dict[str, dict[int, int]] = {"before": {}, "down": {}, "back": {}}
    async with httpx.AsyncClient(timeout=30) as client:

        async def ask(phase: str, n: int) -> None:
            r = await post(client, d.servers[n % 2], d.keys["spender"])
            seen[phase][r.status_code] = seen[phase].get(r.status_code, 0) + 1

        for n in range(20):
            await ask("before", n)
        # Heartbeats after the last of those is written: what an instance wrote after its
        # last beat before the loss may still count twice (docs/deployment.md; 90 without it).
        # Written first (a loaded run's flush came late: 97 of 100), then a beat's time.
        await until(lambda: d.store_spend("spender") == 20 * COST, 10)
        await asyncio.sleep(1.0)
        d.redis.stop()
        for n in range(30):
            await ask("down", n)
        await until(lambda: d.store_spend("spender") == 50 * COST, 10)
        d.redis.start()  # empty
        await asyncio.sleep(2.5)  # past the back-off; heartbeats
        for n in range(150):
            await ask("back", n)
            if seen["back"].get(402, 0) >= 4:
                break
    d.stop_all()
    admitted = sum(counts.get(200, 0) for counts in seen.values())
    print(f"\nfail open, Redis killed then restarted empty: {seen}; admitted {admitted} of 100")
    assert seen["down"] == {200: 30}
    assert admitted == 100
    assert d.store_spend("spender") == admitted * COST


def _own_pid_namespaces() -> tuple[str, ...]:
    """The command that runs a server in a pid namespace of its own (as a container does: its
    pid is 1, and the other servers' pids are not there), or skip."""
    prefix = ("unshare", "--pid", "--fork", "--kill-child")
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot start a process in a pid namespace of its own here (unshare)")
    return prefix


async def test_instances_in_containers_sharing_a_spill_folder_count_each_charge_once(
    deployment: Any, tmp_path: Path
) -> None:
    """Two instances in containers of their own (pid 1 each) keep their unwritten charges in one
    folder (a volume both mount, `BUDGET_SPILL_DIR`) through a store outage. When the store is
    back, one writes the other's batches: that one must not go on counting them as its own
    unconfirmed charges beside the store that holds them (a live view of $0.46 for $0.42 spent,
    refusing early until the window ends)."""
    prefix = _own_pid_namespaces()
    d: Deployment = deployment(with_redis=False)
    target = make_url(POSTGRES_URL)
    with tcp_proxy(target.port or 5432) as proxy:
        proxied = target.set(port=proxy.port).render_as_string(hide_password=False)
        d.start(
            prefix=prefix,
            database_url=proxied,
            BUDGET_FAIL_OPEN="true",
            BUDGET_ADMIN_KEY="admin-secret",
            BUDGET_SPILL_DIR=str(tmp_path / "shared-volume"),
        )
        async with httpx.AsyncClient(timeout=30) as client:
            for server in d.servers:  # each has seen the key valid: fail-open serves it
                assert (await post(client, server, d.keys["spender"])).status_code == 200
            await until(lambda: d.store_spend("spender") == 2 * COST, 30)
            proxy.cut()
            for i in range(40):
                r = await post(client, d.servers[i % 2], d.keys["spender"])
                assert r.status_code == 200
                await asyncio.sleep(0.05)
            await asyncio.sleep(10 * FLUSH)  # rounds that fail and spill
            files = [p.name for p in (tmp_path / "shared-volume").rglob("*.json")]
            writers = {name.split("-")[1:3][1] for name in files}
            print(
                f"\n{len(files)} batches spilled by {len(writers)} engines, pids",
                {name.split("-")[1] for name in files},
            )
            assert len(writers) == 2
            proxy.restore()
            await until(lambda: d.store_spend("spender") == 42 * COST, 30)
            await asyncio.sleep(4 * TTL)  # every instance has read the counters again since

            async def live_view(server: Server) -> float:
                r = await client.get(
                    server.url + "/budget-admin/budgets",
                    params={"from_memory": "true", "owner_type": "virtual_key"},
                    headers={"authorization": "Bearer admin-secret"},
                )
                found = [b for b in r.json()["budgets"] if b["id"] == d.budgets["spender"]]
                return float(found[0]["spent"])

            views = [await live_view(server) for server in d.servers]
    left = list((tmp_path / "shared-volume").rglob("*.json"))
    spent = d.store_spend("spender") / 1e9
    print(f"spent: store ${spent:.2f} (42 requests), live views ${views}, {len(left)} files left")
    assert not left
    assert views == [spent, spent]


# -- changes made through one instance's admin API reach the others (SPEC §11, §3: what is read
# from the store is trusted for BUDGET_CACHE_TTL_SECONDS) --------------------------------------

ADMIN = {"authorization": "Bearer admin-secret"}
BOUND = 20 * (TTL + 2 * FLUSH)  # generous: a loaded machine; SPEC says one TTL (+ a flush)


async def key_id(client: httpx.AsyncClient, d: Deployment, name: str) -> str:
    r = await client.get(d.servers[0].url + "/budget-admin/virtual-keys", headers=ADMIN)
    return next(k["id"] for k in r.json()["virtual_keys"] if k["name"] == name)


async def reached(
    client: httpx.AsyncClient, d: Deployment, server: int, key: str, status: int
) -> tuple[float, int]:
    """Seconds until a request of `key` on server `server` answers `status` (inf: never), and
    how many were admitted meanwhile."""
    start = time.monotonic()
    admitted = 0
    while time.monotonic() - start < BOUND:
        r = await post(client, d.servers[server], d.keys[key])
        if r.status_code == status:
            return time.monotonic() - start, admitted
        admitted += r.status_code == 200
        await asyncio.sleep(0.05)
    return float("inf"), admitted


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_key_revoked_on_one_instance_is_refused_by_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        for server in d.servers:
            assert (await post(client, server, d.keys["spender"])).status_code == 200
        kid = await key_id(client, d, "spender")
        r = await client.put(
            d.servers[0].url + f"/budget-admin/virtual-keys/{kid}",
            json={"is_active": False},
            headers=ADMIN,
        )
        assert r.status_code == 200
        here = await post(client, d.servers[0], d.keys["spender"])
        took, _ = await reached(client, d, 1, "spender", 403)
        print(f"\nrevoked on A (A answers {here.status_code}); B refuses after {took:.2f}s")
        assert here.status_code == 403
        assert took < BOUND


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_budget_lowered_on_one_instance_holds_on_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(20):
            assert (await post(client, d.servers[i % 2], d.keys["spender"])).status_code == 200
        kid = await key_id(client, d, "spender")
        r = await client.put(
            d.servers[0].url + f"/budget-admin/virtual-keys/{kid}",
            json={"budgets": [{"max_limit": 0.1, "reset_duration": "1d"}]},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        took, waited = await reached(client, d, 1, "spender", 402)
        print(f"\nlowered to $0.10 on A; B refuses after {took:.2f}s, {waited} admitted")
        assert took < BOUND
    responses = await burst(d, "spender", 100)
    print(f"after: {statuses(responses)}")
    assert statuses(responses).get(200, 0) == 0
    d.stop_all()
    assert d.store_spend("spender") == (20 + waited) * COST


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_key_moved_to_another_team_on_one_instance_is_charged_there_by_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        for server in d.servers:
            assert (await post(client, server, d.keys["probe"])).status_code == 200
        r = await client.post(
            d.servers[0].url + "/budget-admin/teams",
            json={"name": "small", "budgets": [{"max_limit": 0.05, "reset_duration": "1d"}]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        team = r.json()["team"]
        budget = team["budgets"][0]["id"]
        kid = await key_id(client, d, "probe")
        r = await client.put(
            d.servers[0].url + f"/budget-admin/virtual-keys/{kid}",
            json={"team_id": team["id"]},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        took, _ = await reached(client, d, 1, "probe", 402)
        print(f"\nmoved on A; B refuses on the new team's budget after {took:.2f}s")
        assert took < BOUND
    d.stop_all()
    spent = d.store.read_counters([budget], [])[0][budget][0]
    print(f"new team's budget: ${spent / 1e9:.2f} of $0.05")
    assert spent == 5 * COST


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_budget_reset_on_one_instance_frees_it_on_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        served = 0
        for i in range(400):
            r = await post(client, d.servers[i % 2], d.keys["spender"])
            served += r.status_code == 200
            if r.status_code == 402 and i % 2 == 1:
                break
        # Everything written first: charges an instance has not written when another resets
        # the budget count in the new window (multifix results: a known fault, not this test's).
        await until(lambda: d.store_spend("spender") == served * COST, 30)
        before = d.store_spend("spender")
        r = await client.post(
            d.servers[0].url + f"/budget-admin/budgets/{d.budgets['spender']}/reset",
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        took, _ = await reached(client, d, 1, "spender", 200)
        print(f"\nspent {before / COST:.0f} requests; reset on A; B admits after {took:.2f}s")
        assert took < BOUND
        await asyncio.sleep(2 * (TTL + 2 * FLUSH))
    responses = await burst(d, "spender", 300)
    admitted = statuses(responses).get(200, 0)
    print(f"after the reset: {statuses(responses)}")
    d.stop_all()
    spent = d.store_spend("spender")
    print(f"store: {spent / COST:.0f} requests in the new window, {admitted + 1} served")
    if with_redis:
        assert spent == (admitted + 1) * COST == 100 * COST
    else:
        # docs/deployment.md: what another instance holds unwritten when it reads the reset
        # (charged before it) counts in the new window: limits tighten by that much, never lift.
        assert spent >= (admitted + 1) * COST


async def test_charges_unwritten_at_a_reset_elsewhere_stay_in_the_old_window(
    deployment: Any,
) -> None:
    """With Redis, what one instance settled before a reset made through another, and has not
    written yet, stays in the old window (docs/deployment.md), in the store and in Redis. Its
    flusher wrote it unaware of the reset, as the new window's: 10 requests made before the
    reset filled the new window's $0.10 before anything was spent in it."""
    d: Deployment = deployment()
    d.start(count=1, BUDGET_ADMIN_KEY="admin-secret")
    # B writes every 3 s: its charges are still unwritten when A resets the budget.
    d.start(count=1, BUDGET_ADMIN_KEY="admin-secret", BUDGET_FLUSH_INTERVAL_SECONDS="3")
    a, b = d.servers
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(10):
            assert (await post(client, b, d.keys["spender"])).status_code == 200
        r = await client.post(
            a.url + f"/budget-admin/budgets/{d.budgets['spender']}/reset", headers=ADMIN
        )
        assert r.status_code == 200, r.text
        await until(lambda: d.records()[0] == 10, 30)  # B has written them
        for server in (a, b):
            assert (await post(client, server, d.keys["spender"])).status_code == 200
        await until(lambda: d.records()[0] == 12, 30)
        r = await client.get(  # the live counters: Redis's window
            a.url + "/budget-admin/budgets",
            params={"owner_type": "virtual_key", "from_memory": "true"},
            headers=ADMIN,
        )
        found = [x for x in r.json()["budgets"] if x["id"] == d.budgets["spender"]]
        live = round(float(found[0]["spent"]) * 100)
    d.stop_all()
    stored = d.store_spend("spender") // COST
    print(f"\n2 requests after the reset: the new window holds {stored} in the store, {live} live")
    assert (stored, live) == (2, 2)


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_team_budget_lowered_on_one_instance_holds_on_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(10):
            assert (await post(client, d.servers[i % 2], d.keys["probe"])).status_code == 200
        r = await client.get(d.servers[0].url + "/budget-admin/teams", headers=ADMIN)
        team = next(t for t in r.json()["teams"] if t["name"] == "research")
        r = await client.put(
            d.servers[0].url + f"/budget-admin/teams/{team['id']}",
            json={"budgets": [{"max_limit": 0.15, "reset_duration": "1d"}]},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        budget = r.json()["team"]["budgets"][0]["id"]
        took, waited = await reached(client, d, 1, "probe", 402)
        print(f"\nteam budget $0.15 made on A; B refuses after {took:.2f}s, {waited} admitted")
        assert took < BOUND
        await asyncio.sleep(2 * (TTL + 2 * FLUSH))
    responses = await burst(d, "probe", 100)
    print(f"after: {statuses(responses)}")
    d.stop_all()
    spent = d.store.read_counters([budget], [])[0][budget][0]
    admitted = statuses(responses).get(200, 0)
    print(f"team budget: {spent / COST:.0f} of 15, {waited + admitted} admitted since")
    # What B admitted before it read the new budget is charged to the scopes it was admitted
    # under (one TTL): the budget holds the rest, and nothing passes it once it is read.
    assert spent <= (waited + admitted) * COST
    assert admitted == 0


@pytest.mark.parametrize("with_redis", [True, False])
async def test_a_key_deleted_or_rotated_on_one_instance_is_refused_by_the_other(
    deployment: Any, with_redis: bool
) -> None:
    d: Deployment = deployment(with_redis=with_redis)
    d.start(BUDGET_ADMIN_KEY="admin-secret")
    async with httpx.AsyncClient(timeout=30) as client:
        for server in d.servers:
            for name in ("spender", "burst"):
                assert (await post(client, server, d.keys[name])).status_code == 200
        spender, other = await key_id(client, d, "spender"), await key_id(client, d, "burst")
        r = await client.delete(
            d.servers[0].url + f"/budget-admin/virtual-keys/{spender}", headers=ADMIN
        )
        assert r.status_code in (200, 204), r.text
        r = await client.post(
            d.servers[0].url + f"/budget-admin/virtual-keys/{other}/rotate", headers=ADMIN
        )
        assert r.status_code == 200, r.text
        deleted, _ = await reached(client, d, 1, "spender", 401)
        rotated, _ = await reached(client, d, 1, "burst", 401)
        print(
            f"\nB refuses a deleted key after {deleted:.2f}s, a rotated one's old value after"
            f" {rotated:.2f}s"
        )
        assert deleted < BOUND and rotated < BOUND


@pytest.fixture(autouse=True)
def _no_leftover_redis() -> Iterator[None]:
    with private_redis():  # proves redis-server can be started here; cheap
        pass
    yield


async def test_load_across_a_redis_kill_and_empty_restart_counts_each_charge_once(
    deployment: Any,
) -> None:
    """Two fail-open servers under steady load (requests of 50 ms, ~250 a second) while Redis
    is killed and, still under load, restarted empty: each server's heartbeat finds the loss
    while its outage's debts are being written, and another server's seed already holds some.
    The heartbeat took the debts for the oldest charges the store had confirmed, so the debts
    not written yet were owed again; and what it owed had no place in the store's order, so it
    was added whole to a seed that held it. Redis counted 7 to 42 requests twice, and the
    budget refused at 458 to 493 of its 500. Then, one at a time until refused: exactly 500."""
    d: Deployment = deployment()
    manager = BudgetManager(d.store, BudgetSettings(database_url=POSTGRES_URL))
    key = manager.create_virtual_key(
        name="steady", budgets=[{"max_limit": 5, "reset_duration": "1d"}]
    )
    assert key.value is not None and d.redis is not None
    d.keys["steady"], d.budgets["steady"] = key.value, key.budgets[0].id
    # Flushes a second apart: a seed reading the store as another instance's flush commits
    # cannot tell whether it holds that write, which is added then (twice at worst, as the
    # docs say): rarer so, this test measures the rest.
    d.start(BUDGET_FAIL_OPEN="true", BUDGET_FLUSH_INTERVAL_SECONDS="1")
    admitted = 0
    limits = httpx.Limits(max_connections=500)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def ask(n: int, delay_ms: int = 0) -> int:
            r = await post(
                client, d.servers[n % 2], key.value or "", **{"x-mock-delay-ms": str(delay_ms)}
            )
            return r.status_code

        async def load(seconds: float) -> None:
            nonlocal admitted
            sent: list[asyncio.Task[int]] = []
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                sent.append(asyncio.create_task(ask(len(sent), 50)))
                await asyncio.sleep(0.004)
            admitted += [await t for t in sent].count(200)

        async def after(seconds: float, action: Any) -> None:
            await asyncio.sleep(seconds)
            action()

        await asyncio.gather(load(0.8), after(0.4, d.redis.stop))
        await load(0.3)
        await asyncio.gather(load(0.8), after(0.4, d.redis.start))  # empty
        await asyncio.sleep(4.0)  # heartbeats, flushes
        in_redis = d.redis_spend("steady")
        under_load = admitted
        later: dict[int, int] = {}
        for n in range(600):
            code = await ask(n)
            later[code] = later.get(code, 0) + 1
            if code == 402:
                break
        admitted += later.get(200, 0)
    d.stop_all()
    print(
        f"\nRedis held {in_redis / COST:g} requests' price for {under_load} admitted;"
        f" then one at a time: {later}; admitted {admitted} of 500"
    )
    # The store's spend is exact. Redis may hold a write a seed read as it committed twice,
    # the race the docs name (one request in 4 runs here, none in 22 of a helper's): two
    # requests' price at most, where it held 41 and 42 more at these flushes before the fix.
    assert 0 <= in_redis - under_load * COST <= 2 * COST
    assert 498 <= admitted <= 500
    assert d.store_spend("steady") == admitted * COST
