"""The two counter backends side by side (SPEC §5, §6, §8): the same store contents and the same
requests, driven through two identical host apps, one counting in process (`core/admission.py`)
and one in Redis (`store/lua/admit.lua`), answer alike request by request (status, `error.code`,
the refusing scope, `error.targets`, the message, `Retry-After`, the limit, route and shadow
headers) and end with the same spend per scope and the same usage records.

Seeded random sequences on a frozen clock (the store's time too): a key under a team under a
customer, budgets (some never resetting, some soft, some $0) and rate limits (requests, tokens,
concurrency) on random scopes, provider, model, key-scoped model and tag limits, a route,
`BUDGET_RESERVE` on and off, enforce and shadow mode; requests to random models and the route
with random `max_tokens` and tags, answered with random usage, `x-budget-cost` or an error,
some held open to occupy slots and reservations, some streams cut; between them the clock moves
on, budgets are reset, limits change terms, and the flusher runs. `DIFF_SEQUENCES`,
`DIFF_FIRST`, `DIFF_LENGTH` and `DIFF_MODE` run more of them (a hunt), and `run_sequence`'s
`keep` narrows a difference down."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlmodel import Session, select

from budget_middleware import BudgetMiddleware, BudgetSettings
from budget_middleware.core import durations
from budget_middleware.core.times import from_ts, utc
from budget_middleware.engine.engine import BudgetEngine
from budget_middleware.store import tables
from budget_middleware.store.tables import BudgetRow, RateLimitRow, UsageRecordRow
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import FrozenClock, running, serve_lifespan

pytestmark = pytest.mark.services

KEY = "sk-bm-differential-fuzz-key-0001"
T0 = datetime(2026, 11, 30, 23, 58, 30, tzinfo=UTC).timestamp()  # a day, a month ending soon
MODELS = ("openai/gpt-4o", "openai/gpt-4o-mini", "anthropic/claude-3-haiku")
PRICES = {
    "openai/gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 10},
    "openai/gpt-4o-mini": {"input_per_mtok": 0.5, "output_per_mtok": 2},
    "anthropic/claude-3-haiku": {"input_per_mtok": 1, "output_per_mtok": 5},
}
TAGS = ("t1", "t2", "t3")
COMPARED_HEADERS = (
    "x-budget-shadow-refusal",
    "x-budget-route",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-budget-limit",
    "x-budget-remaining",
)


# -- the host app: what each request's answer is, told by the test --------------------------------


@dataclass
class Answer:
    """How the host app answers one request."""

    kind: str  # json, cost, error, stream, stream_cut, stream_raise
    prompt: int = 0
    completion: int = 0
    cost: str = "0"
    hold: str = ""  # "", "before" (the answer's start waits), "after" (its body waits)


@dataclass
class Host:
    """One host app's side: the answers, and the gates of held requests."""

    answers: dict[str, Answer] = field(default_factory=dict)
    entered: dict[str, asyncio.Event] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        rid = dict(scope["headers"])[b"x-test-id"].decode()
        answer = self.answers[rid]
        gate = self.gates.setdefault(rid, asyncio.Event())
        entered = self.entered.setdefault(rid, asyncio.Event())
        usage = {
            "prompt_tokens": answer.prompt,
            "completion_tokens": answer.completion,
            "total_tokens": answer.prompt + answer.completion,
        }
        if answer.hold == "before":
            entered.set()
            await gate.wait()
        if answer.kind.startswith("stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            if answer.hold == "after":
                entered.set()
                await gate.wait()
            for n in range(3):
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": f"word{n} " * 5}}],
                }
                data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if answer.kind == "stream_raise":
                raise RuntimeError("upstream cut")
            tail = b""
            if answer.kind == "stream":
                final = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": usage,
                }
                tail = b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            entered.set()
            return
        status = 500 if answer.kind == "error" else 200
        headers = [(b"content-type", b"application/json")]
        if answer.kind == "cost":
            headers.append((b"x-budget-cost", answer.cost.encode()))
        body: dict[str, Any] = {"id": "c1", "object": "chat.completion", "choices": []}
        if answer.kind == "error":
            body = {"error": {"message": "upstream failed", "type": "server_error"}}
        else:
            body["usage"] = usage
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if answer.hold == "after":
            entered.set()
            await gate.wait()
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        entered.set()


# -- store contents ------------------------------------------------------------------------------


def budgets(rng: random.Random, scale: int) -> list[dict[str, Any]]:
    durations = rng.sample([None, "30s", "1m", "1h", "1d"], rng.choice([1, 1, 1, 2, 3]))
    return [
        {
            "max_limit": scale
            * rng.choice([0, 1e-9, 0.00002, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.01, 0.05]),
            "reset_duration": duration,
            **({"soft": True} if rng.random() < 0.1 else {}),
        }
        for duration in durations
    ]


def rate_limit(rng: random.Random, scale: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < 0.6:
        out["request_max_limit"] = scale * rng.choice([0, 1, 2, 3, 5, 8, 20, 20])
        out["request_reset_duration"] = rng.choice(["30s", "1m", "1h"])
    if rng.random() < 0.5:
        out["token_max_limit"] = scale * rng.choice([0, 30, 100, 300, 1000, 3000, 10000])
        out["token_reset_duration"] = rng.choice(["30s", "1m", "1h"])
    if rng.random() < 0.4 or not out:
        out["max_concurrent_requests"] = rng.choice([1, 1, 2, 3])
    return out


SCALE = [1]  # how generous the limits of the sequence being made are


def limits(
    rng: random.Random, budget_odds: float, rate_odds: float, aligned: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < budget_odds:
        out["budgets"] = budgets(rng, SCALE[0])
    if rng.random() < rate_odds:
        out["rate_limit"] = rate_limit(rng, SCALE[0])
    if out and aligned and rng.random() < 0.2:
        out["calendar_aligned"] = True
    return out


def contents(rng: random.Random) -> dict[str, Any]:
    """What a sequence's store holds, as manager calls' keyword arguments."""
    SCALE[0] = rng.choice([1, 1, 10, 100])
    return {
        "exceeded_status": rng.choice([402, 429]),
        "customer": limits(rng, 0.4, 0.3),
        "team": limits(rng, 0.4, 0.3),
        "key": {**limits(rng, 0.5, 0.5), "tags": rng.sample(TAGS, rng.choice([0, 0, 0, 1]))},
        "provider_configs": [
            {"provider": "openai", **limits(rng, 0.3, 0.3, aligned=False)},
            {"provider": "anthropic", **limits(rng, 0.3, 0.3, aligned=False)},
        ],
        "providers": {p: limits(rng, 0.3, 0.3) for p in ("openai", "anthropic")},
        "model_configs": [
            {"model_name": name, **limits(rng, 0.5, 0.4)}
            for name in rng.sample(["gpt-4o", "*", "gpt-4o*", "claude-*"], rng.randint(0, 2))
        ],
        "key_model_configs": [
            {"model_name": name, **limits(rng, 0.6, 0.4)}
            for name in rng.sample(["gpt-4o-mini", "*"], rng.choice([0, 0, 1]))
        ],
        "tags": {t: limits(rng, 0.5, 0.4) for t in rng.sample(TAGS, rng.randint(0, 3))},
        "route": {
            "name": "smart",
            "targets": rng.sample(MODELS, rng.randint(2, 3)),
            "strategy": rng.choice(["ordered", "most_remaining"]),
        },
    }


def populate(engine: BudgetEngine, made: dict[str, Any], begun: datetime) -> dict[str, str]:
    """The store's contents, every window begun at `begun`; owner id -> a name for comparing."""
    manager = engine.manager
    names: dict[str, str] = {}
    customer = manager.create_customer(name="acme", **made["customer"])
    names[customer.id] = "customer"
    team = manager.create_team(name="research", customer_id=customer.id, **made["team"])
    names[team.id] = "team"
    key = manager.create_virtual_key(
        name="alice",
        value=KEY,
        team_id=team.id,
        provider_configs=made["provider_configs"],
        **made["key"],
    )
    names[key.id] = "key"
    for config in key.provider_configs:
        names[config.id] = f"pc:{config.provider}"
    for provider, body in made["providers"].items():
        if body:
            manager.put_provider(provider, **body)
    for config in made["model_configs"]:
        out = manager.create_model_config(**config)
        names[out.id] = f"mc:{out.model_name}"
    for config in made["key_model_configs"]:
        out = manager.create_model_config(**config, scope="virtual_key", scope_id=key.id)
        names[out.id] = f"key mc:{out.model_name}"
    for tag, body in made["tags"].items():
        if body:
            manager.put_tag(tag, **body)
    manager.create_route(**made["route"])
    with engine.store.session() as s:
        for budget in s.exec(select(BudgetRow)):
            budget.last_reset = begun
            s.add(budget)
        for rate in s.exec(select(RateLimitRow)):
            rate.request_last_reset = rate.token_last_reset = begun
            s.add(rate)
        s.commit()
    return names


# -- the requests --------------------------------------------------------------------------------


@dataclass
class Step:
    op: str  # send, hold, release, advance, reset, terms, flush
    rid: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    answer: Answer | None = None
    seconds: float = 0.0
    pick: int = 0  # reset: which budget, in `budget_ids`'s order
    owner: str = ""  # terms: whose limits change, to `change`
    change: dict[str, Any] = field(default_factory=dict)


def request(rng: random.Random, rid: str, hold: str) -> Step:
    body: dict[str, Any] = {
        "model": rng.choice([*MODELS, "smart"]),
        "messages": [{"role": "user", "content": "hello " * rng.randint(1, 30)}],
    }
    if rng.random() < 0.85:
        body["max_tokens"] = rng.choice([1, 5, 10, 50, 100, 300])
    kind = rng.choice(["json", "json", "cost", "error", "stream", "stream_cut", "stream_raise"])
    if kind.startswith("stream"):
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    tags = [t for t in TAGS if rng.random() < 0.3]
    if tags and rng.random() < 0.5:
        body["metadata"] = {"tags": tags}
        tags = []
    headers = {"x-test-id": rid}
    if tags:
        headers["x-budget-tags"] = ",".join(tags)
    if rng.random() < 0.9:
        headers["authorization"] = f"Bearer {KEY}"
    answer = Answer(
        kind,
        prompt=rng.randint(0, 40),
        completion=rng.choice([0, 1, 5, 20, 100, 400]),
        cost=rng.choice(["0", "0.00001", "0.0001", "0.0005", "0.002"]),
        hold=hold,
    )
    return Step("hold" if hold else "send", rid, body, headers, answer)


def sequence(rng: random.Random, length: int) -> list[Step]:
    steps: list[Step] = []
    held: list[str] = []
    for n in range(length):
        roll = rng.random()
        if held and (roll < 0.2 or len(held) >= 3):
            steps.append(Step("release", held.pop(rng.randrange(len(held)))))
        elif roll < 0.3:
            rid = f"r{n}"
            steps.append(request(rng, rid, rng.choice(["before", "after"])))
            held.append(rid)
        elif roll < 0.34:
            steps.append(Step("reset", pick=rng.randrange(1000)))
        elif roll < 0.38:
            owner = rng.choice(["customer", "team", "key"])
            if rng.random() < 0.5:
                change: dict[str, Any] = {"budgets": budgets(rng, SCALE[0])}
            else:
                change = {"rate_limit": rate_limit(rng, SCALE[0])}
            steps.append(Step("terms", owner=owner, change=change))
        elif roll < 0.41:
            steps.append(Step("flush"))
        elif roll < 0.47:
            seconds = rng.choice([0.25, 1, 5, 20, 29.75, 30, 31, 45, 60, 61])
            steps.append(Step("advance", seconds=seconds))
        else:
            steps.append(request(rng, f"r{n}", ""))
    steps += [Step("release", rid) for rid in held]
    return steps


# -- the two sides ---------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    engine: BudgetEngine
    host: Host
    http: httpx.AsyncClient
    names: dict[str, str]
    pending: dict[str, asyncio.Task[httpx.Response]] = field(default_factory=dict)

    async def start(self, step: Step) -> asyncio.Task[httpx.Response]:
        assert step.answer is not None
        self.host.answers[step.rid] = step.answer
        entered = self.host.entered.setdefault(step.rid, asyncio.Event())
        task = asyncio.create_task(
            self.http.post("/v1/chat/completions", json=step.body, headers=step.headers)
        )
        waiting = asyncio.create_task(entered.wait())
        await asyncio.wait({task, waiting}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert task.done() or entered.is_set(), f"{self.name}: {step.rid} neither answered nor in"
        return task

    def budget_ids(self) -> list[str]:
        return budget_ids(self.engine, self.names)

    def apply(self, step: Step) -> None:
        Ids.making = self.name
        try:
            self._apply(step)
        finally:
            Ids.making = None

    def _apply(self, step: Step) -> None:
        manager = self.engine.manager
        if step.op == "reset":
            ids = self.budget_ids()
            if ids:
                manager.reset_budget(ids[step.pick % len(ids)])
            return
        id_ = next(id_ for id_, name in self.names.items() if name == step.owner)
        update = {
            "customer": manager.update_customer,
            "team": manager.update_team,
            "key": manager.update_virtual_key,
        }[step.owner]
        update(id_, **step.change)

    async def release(self, rid: str) -> httpx.Response:
        self.host.gates.setdefault(rid, asyncio.Event()).set()
        return await asyncio.wait_for(self.pending.pop(rid), 20)


def seen(answer: httpx.Response) -> dict[str, Any]:
    """What is compared of an answer."""
    out: dict[str, Any] = {"status": answer.status_code}
    try:
        error = answer.json().get("error") if answer.status_code >= 400 else None
    except ValueError:
        error = None
    if isinstance(error, dict):
        out["code"] = error.get("code")
        scope = error.get("scope") or {}
        out["scope"] = (scope.get("type"), scope.get("name"))
        out["message"] = error.get("message")
        out["targets"] = error.get("targets")
    for name in COMPARED_HEADERS:
        if name in answer.headers:
            out[name] = answer.headers[name]
    return out


def spend(engine: BudgetEngine, names: dict[str, str], now: float) -> dict[str, Any]:
    """Each budget's and rate limit's usage in the store, by owner name, its ended windows
    swept (which the flusher does once a minute of the clock, when its loop comes round: not
    at the same step on both sides); the start of a window with no usage is not compared."""
    engine.store.sweep_windows(from_ts(now))
    out: dict[str, Any] = {}
    with engine.store.session() as s:
        for b in s.exec(select(BudgetRow)):
            owner = names.get(b.owner_id, b.owner_id)
            out[f"budget {b.owner_type}:{owner} {b.reset_duration}"] = (
                b.current_usage_nanos,
                b.last_reset.timestamp() if b.current_usage_nanos else None,
            )
        for r in s.exec(select(RateLimitRow)):
            owner = names.get(r.owner_id, r.owner_id)
            out[f"rate {r.owner_type}:{owner}"] = (
                r.request_current_usage,
                r.token_current_usage,
            )
    return out


def budget_ids(engine: BudgetEngine, names: dict[str, str]) -> list[str]:
    """The budgets in the store, in an order every side of a comparison shares (by owner type,
    owner name, duration), whatever ids each side's store gave them."""
    with engine.store.session() as s:
        rows = list(s.exec(select(BudgetRow)))
    order = sorted(
        rows,
        key=lambda b: (b.owner_type, names.get(b.owner_id, b.owner_id), b.reset_duration or ""),
    )
    return [b.id for b in order]


def records(engine: BudgetEngine, names: dict[str, str]) -> list[tuple[Any, ...]]:
    with engine.store.session() as s:
        rows = [
            (
                names.get(r.virtual_key_id or "", r.virtual_key_id),
                r.provider,
                r.model,
                tuple(r.tags),
                r.input_tokens,
                r.output_tokens,
                r.cost_nanos,
                r.cost_source,
                r.status,
                r.streamed,
                r.outcome,
                r.estimated,
                r.would_refuse,
            )
            for r in s.exec(select(UsageRecordRow))
        ]
    return sorted(rows, key=repr)


@asynccontextmanager
async def sides(
    tmp_path: Path, seed: int, made: dict[str, Any], reserve: bool, clock: FrozenClock
) -> AsyncIterator[tuple[Side, Side]]:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": PRICES}))
    begun = datetime.fromtimestamp(clock.now, UTC)
    prefix = unique_prefix()
    async with AsyncExitStack() as stack:
        out: list[Side] = []
        for name, extra in (("in process", {}), ("Redis", {"redis_url": REDIS_URL})):
            settings = BudgetSettings(
                database_url=f"sqlite:///{tmp_path}/{seed}-{name.replace(' ', '-')}.db",
                pricing_file=prices,
                # The flusher, the re-read and the sweep run when a step says (`flush`), not
                # when a real-time loop comes round: at another step on each side.
                flush_interval_seconds=3600,
                cache_ttl_seconds=86400,
                redis_timeout_seconds=10,
                slot_ttl_seconds=3600,
                reserve=reserve,
                exceeded_status=made["exceeded_status"],
                mode=made["mode"],
                **extra,
            )
            engine = BudgetEngine(settings, clock=clock)
            if extra:
                use_prefix(engine, prefix)
            Ids.making = name
            Ids.made.pop(name, None)
            try:
                names = populate(engine, made, begun)
            finally:
                Ids.making = None
            host = Host()
            app = BudgetMiddleware(host, engine=engine)
            await stack.enter_async_context(running(app))
            transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # type: ignore[arg-type]
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://test")
            )
            stack.callback(engine.store.dispose)
            out.append(Side(name, engine, host, http, names))
        try:
            yield out[0], out[1]
        finally:
            await stack.aclose()
            delete_prefix(REDIS_URL, prefix)


class StoreTime(datetime):
    """The time the manager stamps new windows and the store's rows with (`utcnow`): the
    test's frozen clock, as the engine's, so that both sides begin a budget or rate limit
    made mid-sequence at the same moment (real time differs by the milliseconds between)."""

    clock = FrozenClock()

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime.fromtimestamp(cls.clock.now, tz)


class Ids:
    """The store's ids (`tables.new_id`): while a side's contents are made or changed, counted
    from 1 for that side, so that both sides give their rows the same ids and keep them in the
    same order (a scope's budgets are in the order of their ids: two exhausted ones were told
    in another order with random ids); random otherwise (alerts)."""

    making: str | None = None
    made: dict[str, int] = {}

    @classmethod
    def uuid4(cls) -> uuid.UUID:
        if cls.making is None:
            return uuid.uuid4()
        cls.made[cls.making] = cls.made.get(cls.making, 0) + 1
        return uuid.UUID(int=cls.made[cls.making])


@dataclass
class Tally:
    sequences: int = 0
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    unheaded: int = 0  # answers whose limit headers are not compared (see `run_sequence`)
    differences: list[str] = field(default_factory=list)


async def run_sequence(
    tmp_path: Path, seed: int, length: int, tally: Tally, keep: Any = None
) -> None:
    """One seed's sequence on both sides (`keep`: which of its steps to run, for narrowing a
    difference down; a held request is released at the end all the same)."""
    rng = random.Random(seed)
    made = contents(rng)
    made["mode"] = os.environ.get("DIFF_MODE") or random.Random(-seed).choice(
        ["enforce", "enforce", "enforce", "shadow"]
    )
    reserve = rng.random() < 0.6
    steps = sequence(rng, length)
    if keep is not None:
        steps = [step for n, step in enumerate(steps) if keep(n, step)]
        steps += [Step("release", step.rid) for step in steps if step.op == "hold"]
    clock = StoreTime.clock = FrozenClock()
    clock.now = T0  # the same calendar (midnights, months) on every run
    where = f"seed {seed} (reserve {reserve}, {made['mode']})"
    started: dict[str, Step] = {}
    async with sides(tmp_path, seed, made, reserve, clock) as (one, two):
        for step in steps:
            answers: list[httpx.Response] = []
            # A millisecond a step, as real time moves on: nothing happens at the instant
            # something else did (a settlement at the very instant new terms began a window
            # counts in the old one in process, in the new one with Redis; a tie real time
            # never makes).
            clock.advance(0.001)
            if step.op == "advance":
                clock.advance(step.seconds)
                continue
            if step.op == "flush":
                for side in (one, two):
                    await side.engine.flush()
                    await side.engine.sweep()
                continue
            if step.op in ("reset", "terms"):
                one.apply(step)
                two.apply(step)
                continue
            unheaded = False
            if step.op == "release":
                if step.rid not in one.pending:  # refused on both sides when it came
                    continue
                answers = [await one.release(step.rid), await two.release(step.rid)]
                step = started[step.rid]
                assert step.answer is not None
                # Admitted by Redis, an answer's limit headers are the counters as they are
                # when it starts, in process as admission found them (README, "Admitted
                # answers carry"): they differ for an answer that starts after other steps
                # ran (or a millisecond later: a reset header's rounded second).
                unheaded = step.answer.hold == "before"
            else:
                started[step.rid] = step
                for side in (one, two):
                    task = await side.start(step)
                    if task.done():
                        answers.append(task.result())
                    else:
                        side.pending[step.rid] = task
                if len(answers) == 1:  # held on one side only: answered on the other
                    held = one if step.rid in one.pending else two
                    answers.insert(0 if held is one else 1, await held.release(step.rid))
                    tally.differences.append(f"{where} {step.rid}: held on {held.name} only")
            if not answers:
                continue
            tally.requests += 1
            a, b = seen(answers[0]), seen(answers[1])
            code = str(a.get("code", a["status"]))
            tally.codes[code] = tally.codes.get(code, 0) + 1
            if unheaded:
                tally.unheaded += 1
                for name in COMPARED_HEADERS[5:]:
                    a.pop(name, None)
                    b.pop(name, None)
            if a != b:
                tally.differences.append(
                    f"{where} {step.rid} {step.op} {step.body.get('model')} "
                    f"max_tokens={step.body.get('max_tokens')} {step.headers} "
                    f"{step.answer}: in process {a} / Redis {b}"
                )
    tally.sequences += 1
    a_spend, b_spend = (
        spend(one.engine, one.names, clock.now),
        spend(two.engine, two.names, clock.now),
    )
    if a_spend != b_spend:
        tally.differences.append(f"{where} spend: in process {a_spend} / Redis {b_spend}")
    a_records, b_records = records(one.engine, one.names), records(two.engine, two.names)
    if a_records != b_records:
        tally.differences.append(
            f"{where} records: only in process {sorted(set(a_records) - set(b_records))} / "
            f"only Redis {sorted(set(b_records) - set(a_records))}"
        )


# About one sequence in 600 leaves a Redis connection unclosed at the engine's shutdown (not yet
# narrowed down; CHANGELOG): collected here, under this test's filter, not failing the test the
# collector happens to run in.
@pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning")
async def test_the_two_backends_answer_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_redis()
    monkeypatch.setattr(tables, "datetime", StoreTime)
    monkeypatch.setattr(durations, "datetime", StoreTime)
    monkeypatch.setattr(tables, "uuid", Ids)
    tally = Tally()
    began = time.monotonic()
    first = int(os.environ.get("DIFF_FIRST", "0"))
    for seed in range(first, first + int(os.environ.get("DIFF_SEQUENCES", "30"))):
        await run_sequence(tmp_path, seed, int(os.environ.get("DIFF_LENGTH", "40")), tally)
        gc.collect()
    print(
        f"{tally.sequences} sequences, {tally.requests} requests compared in "
        f"{time.monotonic() - began:.1f} s ({tally.unheaded} answers without their limit "
        f"headers); {len(tally.differences)} differences; answers: {tally.codes}"
    )
    for line in tally.differences:
        print(line)
    assert not tally.differences


# -- regressions the comparison found --------------------------------------------------------------


def one_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str, **settings: Any
) -> tuple[BudgetEngine, FrozenClock, str]:
    """An engine on a store of its own, in process or on Redis (under a prefix of its own,
    returned), its clock (the store's too) frozen on a whole second."""
    extra: dict[str, Any] = {}
    prefix = unique_prefix()
    if counters == "Redis":
        need_redis()
        extra = {"redis_url": REDIS_URL}
    clock = StoreTime.clock = FrozenClock()  # the store's time too
    monkeypatch.setattr(tables, "datetime", StoreTime)
    monkeypatch.setattr(durations, "datetime", StoreTime)
    clock.now = float(int(clock.now))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": PRICES}))
    engine = BudgetEngine(
        BudgetSettings(
            database_url=f"sqlite:///{tmp_path}/store.db",
            pricing_file=prices,
            **{"flush_interval_seconds": 0.05, **settings},
            **extra,
        ),
        clock=clock,
    )
    if extra:
        use_prefix(engine, prefix)
    return engine, clock, prefix


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_new_terms_carry_the_usage_into_a_window_already_rolled_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str
) -> None:
    """A key's $0.01 budget of 30 s, spent in full 10 s into its first window; 31 s in, a request
    admitted (held open) rolls the live counter to the second window ($0 there), then the
    budget becomes $0.01 a minute. The minute from the budget's start holds the $0.01, so it
    carries over to the new window (which begins with the live one; the store holds it there):
    the next request is refused, 402 `budget_exceeded`. In process the live counter, already in
    that window, ignored the carried usage: 429 `budget_reserved` (its $0 left room but for the
    held request), where Redis and the store had it spent (seed 2135 of the comparison,
    narrowed down)."""
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters)
    key = engine.manager.create_virtual_key(
        name="alice", value=KEY, budgets=[{"max_limit": 0.01, "reset_duration": "30s"}]
    )
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def send(http: httpx.AsyncClient, rid: str, completion: int) -> None:
        host.answers[rid] = Answer("json", prompt=0, completion=completion)
        headers = {"authorization": f"Bearer {KEY}", "x-test-id": rid}
        statuses.append(
            (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code
        )

    try:
        async with running(app), client_of(app) as http:
            clock.advance(10)
            await send(http, "spends", 1000)  # $0.01: 1,000 tokens at $10 a million
            clock.advance(21)
            host.answers["rolls"] = Answer("json", prompt=0, completion=0, hold="after")
            headers = {"authorization": f"Bearer {KEY}", "x-test-id": "rolls"}
            held = asyncio.create_task(
                http.post("/v1/chat/completions", json=body, headers=headers)
            )
            await asyncio.wait_for(host.entered.setdefault("rolls", asyncio.Event()).wait(), 10)
            await engine.flush()
            engine.manager.update_virtual_key(
                key.id, budgets=[{"max_limit": 0.01, "reset_duration": "1m"}]
            )
            clock.advance(1)
            await send(http, "after", 0)
            host.gates.setdefault("rolls", asyncio.Event()).set()
            statuses.insert(1, (await held).status_code)
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    print(f"{counters}: {statuses}")
    assert statuses == [200, 200, 402]


# (limits made, the new terms, the refusal, the kind of the window's Redis key, what it holds)
LENGTHENED = {
    "budget": (
        {"budgets": [{"max_limit": 0.1, "reset_duration": "1m"}]},
        {"budgets": [{"max_limit": 0.0002, "reset_duration": "1d"}]},
        (402, "budget_exceeded"),
        "budget",
        500_000,  # $0.0005
    ),
    "tokens": (
        {"rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1m"}},
        {"rate_limit": {"token_max_limit": 40, "token_reset_duration": "1d"}},
        (429, "token_limit_exceeded"),
        "token",
        50,
    ),
}


@pytest.mark.parametrize("limit", list(LENGTHENED))
@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_what_settles_after_new_terms_lengthened_its_window_counts_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str, limit: str
) -> None:
    """A key's $0.1 budget of a minute (or 1,000 tokens a minute); 30 s in, a request admitted
    (held open), then the budget becomes $0.0002 a day (40 tokens a day): the same window, from
    the same start, now a day long. The request settles 31 s later ($0.0005, 50 tokens), past
    where the minute would have ended, before any other request has read the new terms: the
    live counter, still on the old ones, rolls to the next minute. The next request is refused
    (402 `budget_exceeded`, 429 `token_limit_exceeded`). In process the counter carries what
    it counted into the day when it reads the new terms; on Redis the settlement went to the key
    of the next minute, which the new terms never read: the day's key held $0 (0 tokens), and
    the next request was admitted (seed 5152 of the comparison, narrowed down)."""
    made, terms, refused, kind, charged = LENGTHENED[limit]
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters, flush_interval_seconds=3600)
    key = engine.manager.create_virtual_key(name="alice", value=KEY, **made)
    if limit == "budget":
        window = key.budgets[0]
        id_, began = window.id, window.last_reset
        terms = {"budgets": [{**terms["budgets"][0], "id": id_}]}  # the same budget
    else:
        assert key.rate_limit is not None
        id_, began = key.rate_limit.id, key.rate_limit.token_last_reset
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {KEY}", "x-test-id": "held"}
    host.answers["held"] = Answer("json", prompt=0, completion=50, hold="after")  # $0.0005
    host.answers["next"] = Answer("json", prompt=0, completion=0)
    in_redis: int | None = None
    try:
        async with running(app), client_of(app) as http:
            clock.advance(30)
            held = asyncio.create_task(
                http.post("/v1/chat/completions", json=body, headers=headers)
            )
            await asyncio.wait_for(host.entered.setdefault("held", asyncio.Event()).wait(), 10)
            engine.manager.update_virtual_key(key.id, **terms)
            clock.advance(31)
            host.gates.setdefault("held", asyncio.Event()).set()
            statuses = [(await held).status_code]
            headers = {**headers, "x-test-id": "next"}
            answer = await http.post("/v1/chat/completions", json=body, headers=headers)
            statuses.append(answer.status_code)
            if counters == "Redis":
                shared = redis.Redis.from_url(REDIS_URL)
                found = shared.get(f"{prefix}w:{kind}:{id_}:{int(began.timestamp() * 1000)}")
                shared.close()
                in_redis = None if found is None else int(found)
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    code = answer.json()["error"]["code"] if answer.status_code >= 400 else ""
    print(f"{counters}, {limit}: {statuses} {code}; the day's Redis key holds {in_redis}")
    assert (statuses, code) == ([200, refused[0]], refused[1])
    if counters == "Redis":
        assert in_redis == charged


# (limits made, the new terms, the refusal, the kind of the window's counter, what the day
# holds): $0.0003 (30 tokens) spent before a request is held, $0.0003 (30 tokens) that it spends
SPENT_BEFORE_LENGTHENED = {
    "budget": (
        {"budgets": [{"max_limit": 0.1, "reset_duration": "1m"}]},
        {"budgets": [{"max_limit": 0.0005, "reset_duration": "1d"}]},
        (402, "budget_exceeded"),
        "budget",
        600_000,  # $0.0006
    ),
    "tokens": (
        {"rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1m"}},
        {"rate_limit": {"token_max_limit": 50, "token_reset_duration": "1d"}},
        (429, "token_limit_exceeded"),
        "token",
        60,
    ),
}


@pytest.mark.parametrize("flushed", ["never", "before", "after", "before and after"])
@pytest.mark.parametrize("limit", list(SPENT_BEFORE_LENGTHENED))
@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_what_was_spent_before_new_terms_lengthened_its_window_counts_in_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str, limit: str, flushed: str
) -> None:
    """As above, with $0.0003 (30 tokens) spent 10 s into the minute: a request held open 30 s
    in spends $0.0003 more, and settles 31 s after the budget became $0.0005 a day (50 tokens a
    day), past the minute's end, before any request has read the new terms. The day from the
    same start holds both: $0.0006 (60 tokens), and the next request is refused. In process the
    live counter, rolled to the next minute on the old terms, sealed the first minute's $0.0003
    and kept only the second's when the new terms carried it back into the day: it showed
    $0.0003 and admitted the next request where Redis refused it (402) and the store held
    $0.0006 (seed 5152 of the comparison, at 60 steps). `flushed`: the first $0.0003 written
    to the store before the terms change (the live counter takes it from there), and the
    held request's after it settled, before the next request: in process the flusher wrote
    the second minute, rolled to on the old terms, as a window the store began anew, and the
    store and the live counter dropped the first ($0.000324, the next request admitted)."""
    made, terms, refused, kind, charged = SPENT_BEFORE_LENGTHENED[limit]
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters, flush_interval_seconds=3600)
    key = engine.manager.create_virtual_key(name="alice", value=KEY, **made)
    if limit == "budget":
        id_ = key.budgets[0].id
        terms = {"budgets": [{**terms["budgets"][0], "id": id_}]}  # the same budget
    else:
        assert key.rate_limit is not None
        id_ = key.rate_limit.id
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def send(rid: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {KEY}", "x-test-id": rid}
        return await http.post("/v1/chat/completions", json=body, headers=headers)

    host.answers["before"] = Answer("json", prompt=0, completion=30)  # $0.0003
    host.answers["held"] = Answer("json", prompt=0, completion=30, hold="after")
    host.answers["next"] = Answer("json", prompt=0, completion=0)
    try:
        async with running(app), client_of(app) as http:
            clock.advance(10)
            statuses.append((await send("before")).status_code)
            if flushed.startswith("before"):
                await engine.flush()
            clock.advance(20)
            held = asyncio.create_task(send("held"))
            await asyncio.wait_for(host.entered.setdefault("held", asyncio.Event()).wait(), 10)
            engine.manager.update_virtual_key(key.id, **terms)
            clock.advance(31)
            host.gates.setdefault("held", asyncio.Event()).set()
            statuses.append((await held).status_code)
            if flushed.endswith("after"):
                await engine.flush()
            answer = await send("next")
            statuses.append(answer.status_code)
            counter = engine.registry.counter(kind, id_)
            live = None if counter is None else counter.value
            await engine.flush()
            with engine.store.session() as s:
                budget, rate = s.get(BudgetRow, id_), s.get(RateLimitRow, id_)
                stored = budget.current_usage_nanos if budget else rate and rate.token_current_usage
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    code = answer.json()["error"]["code"] if answer.status_code >= 400 else ""
    print(f"{counters}, {limit}, {flushed=}: {statuses} {code}; live {live}, stored {stored}")
    assert (statuses, code) == ([200, 200, refused[0]], refused[1])
    assert (live, stored) == (charged, charged)


# (limits made, the new terms, the refusal, the stored usage column, what the day holds): two
# charges of $0.0003 (30 tokens, a request), the second counted on the old terms in their next
# minute, after another process lengthened the minute to a day
LENGTHENED_ELSEWHERE = {
    "budget": (
        {"budgets": [{"max_limit": 0.1, "reset_duration": "1m"}]},
        {"budgets": [{"max_limit": 0.0005, "reset_duration": "1d"}]},
        (402, "budget_exceeded"),
        "current_usage_nanos",
        600_000,  # $0.0006
    ),
    "tokens": (
        {"rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1m"}},
        {"rate_limit": {"token_max_limit": 50, "token_reset_duration": "1d"}},
        (429, "token_limit_exceeded"),
        "token_current_usage",
        60,
    ),
    "requests": (
        {"rate_limit": {"request_max_limit": 100, "request_reset_duration": "1m"}},
        {"rate_limit": {"request_max_limit": 2, "request_reset_duration": "1d"}},
        (429, "request_limit_exceeded"),
        "request_current_usage",
        2,
    ),
}


@pytest.mark.parametrize("limit", list(LENGTHENED_ELSEWHERE))
async def test_what_was_counted_on_terms_another_process_lengthened_stays_in_their_window(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """Two processes on one store, without Redis (SPEC §11). A key's $0.1 budget of a minute
    (1,000 tokens, 100 requests a minute): $0.0003 (30 tokens, a request) spent through the
    first 10 s in and written to the store; 30 s in, the second process makes it $0.0005 a day
    (50 tokens, 2 requests a day), the same window from the same start. The first still has the
    old terms until its cache's next reload: a request it admitted 30 s in settles 31 s later,
    $0.0003 more (30 tokens; for requests, one more admitted then), counted in the old terms'
    next minute, and its flusher writes that minute before the reload. The store's day, not
    ended under the terms it holds, takes it: $0.0006 (60 tokens, 2 requests), and the next
    request after the reload is refused. The flusher wrote the minute as a window the store
    began anew, dropping the first $0.0003 from the day: the reload read $0.0003 and admitted
    it."""
    made, terms, refused, column, charged = LENGTHENED_ELSEWHERE[limit]
    clock = StoreTime.clock = FrozenClock()  # the store's time too
    monkeypatch.setattr(tables, "datetime", StoreTime)
    monkeypatch.setattr(durations, "datetime", StoreTime)
    clock.now = float(int(clock.now))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": PRICES}))
    settings = BudgetSettings(
        database_url=store_url,
        pricing_file=prices,
        flush_interval_seconds=3600,
        cache_ttl_seconds=3600,  # the first reloads when the test says (`invalidate`)
    )
    first = BudgetEngine(settings, clock=clock)
    second = BudgetEngine(settings.model_copy(update={"admin_key": "second"}), clock=clock)
    key = first.manager.create_virtual_key(name="alice", value=KEY, **made)
    if limit == "budget":
        id_ = key.budgets[0].id
        terms = {"budgets": [{**terms["budgets"][0], "id": id_}]}  # the same budget
    else:
        assert key.rate_limit is not None
        id_ = key.rate_limit.id
    host = Host()
    app = BudgetMiddleware(host, engine=first)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def send(rid: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {KEY}", "x-test-id": rid}
        return await http.post("/v1/chat/completions", json=body, headers=headers)

    def stored() -> tuple[int, float]:
        table = BudgetRow if limit == "budget" else RateLimitRow
        reset = {"budget": "last_reset", "tokens": "token_last_reset"}.get(limit)
        with first.store.session() as s:
            row = s.get(table, id_)
            assert row is not None
            began = getattr(row, reset or "request_last_reset")
            return getattr(row, column), utc(began).timestamp() - start

    late = limit != "requests"
    host.answers["before"] = Answer("json", prompt=0, completion=30)  # $0.0003
    host.answers["late"] = Answer("json", prompt=0, completion=30, hold="after" if late else "")
    host.answers["next"] = Answer("json", prompt=0, completion=0)
    try:
        second_app = BudgetMiddleware(host, engine=second)
        async with running(app), running(second_app), client_of(app) as http:
            start = clock.now
            clock.advance(10)
            statuses.append((await send("before")).status_code)
            await first.flush()
            clock.advance(20)
            if late:
                held = asyncio.create_task(send("late"))
                entered = host.entered.setdefault("late", asyncio.Event())
                await asyncio.wait_for(entered.wait(), 10)
            second.manager.update_virtual_key(key.id, **terms)  # the other process
            clock.advance(31)
            if late:
                host.gates.setdefault("late", asyncio.Event()).set()
                statuses.append((await held).status_code)
            else:
                statuses.append((await send("late")).status_code)  # on the old terms
            before = stored()
            await first.flush()  # before its reload: the old terms' next minute
            after = stored()
            await first.invalidate()  # its cache's reload
            answer = await send("next")
            statuses.append(answer.status_code)
    finally:
        first.store.dispose()
        second.store.dispose()
    code = answer.json()["error"]["code"] if answer.status_code >= 400 else ""
    print(
        f"{store_url.split(':')[0]}, {limit}: stored (usage, window start - T0) {before} before "
        f"the flush, {after} after; {statuses} {code}"
    )
    assert after == (charged, 0.0)
    assert (statuses, code) == ([200, 200, refused[0]], refused[1])


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_shadow_answers_show_the_windows_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str
) -> None:
    """Shadow mode, a key whose request limit of 0 would refuse everything, 10,000 tokens a
    30 s window and $1 a day: a request of 100 tokens ($0.001), then another 31 s later, in the
    next token window. Its answer shows that window (10,000 left, reset in 29 s) and the day's
    budget as enforce has it: the $1 whole, as the first, which enforce refuses, is charged to
    none of its limits (SPEC §14; it showed $0.999 when shadow mode charged it) (seed 2156 of
    the comparison, narrowed down)."""
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters, mode="shadow")
    engine.manager.create_virtual_key(
        name="alice",
        value=KEY,
        budgets=[{"max_limit": 1, "reset_duration": "1d"}],
        rate_limit={
            "request_max_limit": 0,
            "request_reset_duration": "1m",
            "token_max_limit": 10000,
            "token_reset_duration": "30s",
        },
    )
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    seen: list[dict[str, str]] = []
    try:
        async with running(app), client_of(app) as http:
            for rid in ("first", "second"):
                host.answers[rid] = Answer("json", prompt=0, completion=100)  # $0.001
                headers = {"authorization": f"Bearer {KEY}", "x-test-id": rid}
                answer = await http.post("/v1/chat/completions", json=body, headers=headers)
                assert answer.headers["x-budget-shadow-refusal"] == "request_limit_exceeded"
                seen.append({n: answer.headers[n] for n in COMPARED_HEADERS[6:]})
                clock.advance(31)
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    print(f"{counters}: {seen[1]}")
    assert seen[1]["x-ratelimit-remaining-tokens"] == "10000"
    assert seen[1]["x-ratelimit-reset-tokens"] == "29s"
    assert seen[1]["x-budget-remaining"] == "1.000000"


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_shadow_answers_show_the_usage_new_terms_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str
) -> None:
    """Shadow mode, a key of one concurrent request and a $1 budget of 30 s: $0.001 spent at
    once (written to the store), then 45 s on a request held open (its slot full) rolls the
    budget to its second window ($0 there), and the budget becomes $0.01 a minute: the minute
    from its start holds the $0.001, carried over to the window the live counter is in. The
    next request, which the slot would refuse, shows $0.009 left. With Redis it showed
    $0.010000: admit.lua tells this process only the counter that refused, and its copy of the
    budget had not taken the carried usage (seed 5228 of the comparison, narrowed down)."""
    engine, clock, prefix = one_engine(
        tmp_path, monkeypatch, counters, mode="shadow", reserve=False
    )
    key = engine.manager.create_virtual_key(
        name="alice",
        value=KEY,
        budgets=[{"max_limit": 1, "reset_duration": "30s"}],
        rate_limit={"max_concurrent_requests": 1},
    )
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    try:
        async with running(app), client_of(app) as http:
            host.answers["spends"] = Answer("json", prompt=0, completion=100)  # $0.001
            spent = await http.post(
                "/v1/chat/completions", json=body, headers={**headers, "x-test-id": "spends"}
            )
            assert spent.status_code == 200
            await engine.flush()
            clock.advance(45)
            host.answers["holds"] = Answer("json", hold="before")
            held = asyncio.create_task(
                http.post(
                    "/v1/chat/completions", json=body, headers={**headers, "x-test-id": "holds"}
                )
            )
            await asyncio.wait_for(host.entered.setdefault("holds", asyncio.Event()).wait(), 10)
            engine.manager.update_virtual_key(
                key.id, budgets=[{"max_limit": 0.01, "reset_duration": "1m"}]
            )
            clock.advance(1)
            host.answers["after"] = Answer("json", prompt=0, completion=0)
            after = await http.post(
                "/v1/chat/completions", json=body, headers={**headers, "x-test-id": "after"}
            )
            host.gates.setdefault("holds", asyncio.Event()).set()
            await held
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    seen_ = {n: after.headers.get(n) for n in ("x-budget-shadow-refusal", *COMPARED_HEADERS[11:])}
    print(f"{counters}: {seen_}")
    assert after.headers["x-budget-shadow-refusal"] == "concurrency_limit_exceeded"
    assert after.headers["x-budget-remaining"] == "0.009000"


async def held_across_a_step_back(
    engine: BudgetEngine,
    clock: FrozenClock,
    prefix: str,
    meanwhile: Callable[[Callable[[str], Awaitable[httpx.Response]]], Awaitable[Any]],
    read: Callable[[Session], Any],
    swept_by_another: bool = False,
) -> tuple[Any, int, Any, httpx.Response]:
    """OpenAI limited to 1,000 tokens a 30 s window; 100 tokens spent and written, then a
    request held open from 1 s in; 100 s in, `meanwhile(send)`, then the flush and the window
    sweep (this engine's, or the store's alone as another instance's sweep does it:
    `swept_by_another`); the clock steps back 20 s (NTP) and the held request settles its 415
    tokens. What `meanwhile` returned, the windows swept, what `read` read from the store
    after, and the next answer."""
    engine.manager.put_provider(
        "openai", rate_limit={"token_max_limit": 1000, "token_reset_duration": "30s"}
    )
    host = Host()
    app = BudgetMiddleware(host, engine=engine)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    async def send(rid: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {KEY}", "x-test-id": rid}
        return await http.post("/v1/chat/completions", json=body, headers=headers)

    host.answers["first"] = Answer("json", prompt=0, completion=100)  # $0.001
    host.answers["held"] = Answer("json", prompt=15, completion=400, hold="before")
    host.answers["refused"] = Answer("json")
    host.answers["next"] = Answer("json")
    try:
        async with running(app), client_of(app) as http:
            assert (await send("first")).status_code == 200  # 100 tokens, written
            await engine.flush()
            clock.advance(1)
            held = asyncio.create_task(send("held"))
            await asyncio.wait_for(host.entered.setdefault("held", asyncio.Event()).wait(), 10)
            clock.advance(99)
            during = await meanwhile(send)
            await engine.flush()
            if swept_by_another:
                swept = engine.store.sweep_windows(from_ts(clock.now))
            else:
                swept = await engine.sweep()
            clock.advance(-20)  # NTP steps the clock back, before the next re-read
            host.gates.setdefault("held", asyncio.Event()).set()
            assert (await held).status_code == 200
            await engine.flush()
            with engine.store.session() as s:
                stored = read(s)
            answer = await send("next")
    finally:
        engine.store.dispose()
        delete_prefix(REDIS_URL, prefix)
    return during, swept, stored, answer


def provider_tokens(s: Session) -> tuple[int, float]:
    """The provider's stored token window: its usage, and when it began."""
    row = s.exec(select(RateLimitRow).where(RateLimitRow.owner_type == "provider")).one()
    return row.token_current_usage, utc(row.token_last_reset).timestamp()


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_a_window_behind_the_limit_that_refused_ends_before_the_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str
) -> None:
    """A team of one request at a time and OpenAI's 1,000 tokens a 30 s window: 100 tokens
    spent and written, then a request held open from 1 s in; 100 s in another is refused by
    the team's slot, and another instance's window sweep ends the stored token window
    ([+90 s, +120 s) begins; this one's own sweep would roll its live windows too); the clock
    steps back 20 s (NTP) and the held request settles its 415 tokens. The refused request
    touched the token window: it ended there, in process as on Redis, and the 415 tokens count
    in the window the store holds. In process it was left behind the refusal and rolled after
    the step back to [+60 s, +90 s), a window older than the store's, which dropped the 415
    tokens (0 stored; Redis kept them), and the next answer told it reset in 10 s (seed 20163
    of the comparison with steps back, narrowed down)."""
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters, flush_interval_seconds=3600)
    t0 = clock.now
    team = engine.manager.create_team(name="research", rate_limit={"max_concurrent_requests": 1})
    engine.manager.create_virtual_key(name="alice", value=KEY, team_id=team.id)
    refused, _, (tokens, began), answer = await held_across_a_step_back(
        engine, clock, prefix, lambda send: send("refused"), provider_tokens, swept_by_another=True
    )
    reset = answer.headers.get("x-ratelimit-reset-tokens")
    code = refused.json()["error"]["code"]
    print(f"{counters}: {refused.status_code} {code}; stored {tokens} tokens in the window "
          f"from +{began - t0:.0f} s; the next answer: reset in {reset}")  # fmt: skip
    assert code == "concurrency_limit_exceeded"
    assert (tokens, began - t0) == (415, 90)
    assert reset == "40s"


@pytest.mark.parametrize("counters", ["in process", "Redis"])
async def test_a_window_the_sweep_moved_on_takes_what_is_charged_after_the_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counters: str
) -> None:
    """A key of $1 a 30 s window, and OpenAI's 1,000 tokens a 30 s window: 100 tokens
    ($0.001) spent and written, then a request held open from 1 s in, and no other request:
    100 s in, the window sweep moves both stored windows on ([+90 s, +120 s) begins, empty),
    which no live counter had touched; the clock steps back 20 s (NTP) and the held request
    settles its 415 tokens ($0.004015). They count in the windows the store holds. The live
    counters, still in the windows of the start, rolled after the step back to [+60 s, +90 s),
    older than the store's, which dropped the charge (0 tokens and $0 stored of 415 and
    $0.004015), and the next answer told the tokens reset in 10 s."""
    engine, clock, prefix = one_engine(tmp_path, monkeypatch, counters, flush_interval_seconds=3600)
    t0 = clock.now
    engine.manager.create_virtual_key(
        name="alice", value=KEY, budgets=[{"max_limit": 1, "reset_duration": "30s"}]
    )

    async def nothing(send: Callable[[str], Awaitable[httpx.Response]]) -> None:
        return None

    def stored(s: Session) -> tuple[tuple[int, float], tuple[int, float]]:
        budget = s.exec(select(BudgetRow)).one()
        return provider_tokens(s), (budget.current_usage_nanos, utc(budget.last_reset).timestamp())

    _, swept, (tokens, budget), answer = await held_across_a_step_back(
        engine, clock, prefix, nothing, stored
    )
    reset = answer.headers.get("x-ratelimit-reset-tokens")
    print(f"{counters}: {swept} windows swept; charged 415 tokens and $0.004015 after the step "
          f"back, stored {tokens[0]} tokens in the window from +{tokens[1] - t0:.0f} s and "
          f"${budget[0] / 1e9:.6f} in the budget's from +{budget[1] - t0:.0f} s; the next "
          f"answer: tokens reset in {reset}")  # fmt: skip
    assert swept == 2
    assert (tokens[0], tokens[1] - t0) == (415, 90)
    assert (budget[0], budget[1] - t0) == (4_015_000, 90)
    assert reset == "40s"
