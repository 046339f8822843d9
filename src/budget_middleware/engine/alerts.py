"""Alerts (SPEC §14): a budget's thresholds watched as it is charged, raised once, delivered.

On the request path only a comparison per budget is made after settling: a budget's counter
knows the spend (`alert_at`) at which its next threshold is reached. When one is, or a budget
refuses for the first time in a window, an event is queued and this engine's alert task wakes:
it raises the alert in the store (once across every instance: `store.alerts`), calls the
`on_alert` hooks, and delivers it to each of `BUDGET_ALERT_WEBHOOK_URLS` by httpx, signed when
`BUDGET_ALERT_SECRET` is set, retried with doubling delays (the first within 5 s, at most 5
minutes apart) for at least 10 minutes, never again after a success.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import httpx

from budget_middleware.core.admission import Refusal
from budget_middleware.core.alerts import reached
from budget_middleware.core.durations import parse_duration
from budget_middleware.core.money import NANOS_PER_USD, nanos_from_usd, usd_fixed, usd_text
from budget_middleware.core.scopes import LimitSet, Scope
from budget_middleware.core.times import FAR_FUTURE, from_ts, rfc3339, utc
from budget_middleware.core.windows import WindowCounter
from budget_middleware.engine.portal import keep_inherited
from budget_middleware.engine.rounds import FailedRounds
from budget_middleware.settings import shown_url
from budget_middleware.store import alerts as stored
from budget_middleware.store.tables import new_id

if TYPE_CHECKING:
    from budget_middleware.engine.engine import BudgetEngine
    from budget_middleware.store.tables import BudgetRow

logger = logging.getLogger("budget_middleware.alerts")

SIGNATURE_HEADER = "x-budget-signature"
MAX_IN_FLIGHT = 20  # alerts being delivered at once by one instance


@dataclass(slots=True, frozen=True)
class AlertEvent:
    type: str  # budget.threshold, budget.exhausted
    budget_id: str
    window_start: float
    threshold: float  # 0 for budget.exhausted
    owner_type: str
    owner_id: str
    owner_name: str
    raised_at: float
    # The budget as the crossing found it (nano-dollars): the alert tells these, not the spend
    # when it is written or delivered (later requests, another window).
    spent: int = 0
    limit: int = 0
    window_end: float = FAR_FUTURE  # the crossing's window: [window_start, window_end)


def signature(secret: str, body: bytes) -> str:
    """The `x-budget-signature` value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Alerts:
    # Delivery schedule (seconds); tests shorten it on their engine. The first retry comes
    # within 5 s (SPEC §14): due after 3, found by a round at most `poll_interval` later.
    first_retry = 3.0
    max_delay = 300.0
    give_up_after = 600.0
    poll_interval = 1.0
    timeout = 10.0
    # At its first round an instance posts to its URLs the alerts raised within this long
    # that they lack (raised while every instance with them was down), from each URL's first.
    backlog = 86400.0
    # A URL's posts go in the order the alerts were raised (80 % before 100 %, then
    # exhausted), each once the one before it was answered, or after this long.
    order_wait = 1.0

    def __init__(self, engine: BudgetEngine) -> None:
        self.engine = engine
        settings = engine.settings
        self.urls = settings.alert_webhook_urls
        self.secret = settings.alert_secret
        self.defaults = settings.alert_thresholds
        self.thresholds: dict[str, tuple[float, ...]] = {}  # by budget id, where not the default
        self.owners: dict[str, Scope] = {}  # by budget id
        self._raised: dict[str, tuple[float, set[float]]] = {}  # by budget: (window, thresholds)
        self._exhausted: dict[str, float] = {}  # by budget: the window it refused in first
        self.queue: list[AlertEvent] = []
        self.raised: dict[str, int] = {}  # by type, by this instance (metrics)
        self.failed_deliveries = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Deliveries in flight, each its own task: one that hangs (up to `timeout` a URL) holds
        # back no other alert's delivery or retry, nor the raising of new alerts.
        self._deliveries: set[asyncio.Task[bool]] = set()
        self._last_post: dict[str, asyncio.Task[bool]] = {}  # by URL: `order_wait`
        self._client: httpx.AsyncClient | None = None  # the alert task's, from its first post
        self._in_rounds = False  # the alert task runs: deliveries are its tasks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._caught_up = False  # the first round's `backlog` taken

    # -- on the request path ---------------------------------------------------------------

    def on_budget(
        self, counter: WindowCounter, thresholds: list[float] | None, owner: Scope
    ) -> None:
        """A budget's counter was (re)built: its thresholds and owner, and a fresh look at its
        spend."""
        if thresholds is None:
            self.thresholds.pop(counter.id, None)
        else:
            self.thresholds[counter.id] = tuple(thresholds)
        self.owners[counter.id] = owner  # the scope the key cache holds anyway: no copy
        counter.alert_at = 0  # type: ignore[attr-defined]

    def stored_thresholds(
        self, counter: WindowCounter, thresholds: list[float] | None, new_limit: bool = False
    ) -> None:
        """A budget's thresholds as the store holds them, read with its spend (and limit) each
        cache TTL: new ones (set through any instance), or a new limit, are taken now, and
        `refreshed` raises the thresholds its spend has passed. Taken only when a key's request
        read them again, a threshold set (or a limit lowered) below a key's, team's or
        customer's spend was never raised while no request of the key came (a provider's or
        tag's, read again each TTL, was)."""
        if counter.id not in self.owners:
            return  # no scope built on it yet: `on_budget` takes them
        if new_limit:
            counter.alert_at = 0  # type: ignore[attr-defined]
        known = self.thresholds.get(counter.id)
        if known == (None if thresholds is None else tuple(thresholds)):
            return
        if thresholds is None:
            self.thresholds.pop(counter.id, None)
        else:
            self.thresholds[counter.id] = tuple(thresholds)
        counter.alert_at = 0  # type: ignore[attr-defined]

    def refreshed(self, counters: Iterable[WindowCounter]) -> None:
        """The budgets' spend read again from the store (instances sharing a store without
        Redis): a threshold that the charges of others took a budget past is raised here,
        with no charge of this instance's to look at it (none may come)."""
        for counter in counters:
            if counter.value >= counter.alert_at:  # type: ignore[attr-defined]
                owner = self.owners.get(counter.id)
                if owner is not None:
                    self._look(counter, None, owner)

    def forget(self, budget_ids: Iterable[str]) -> None:
        """Budgets deleted from the store, whose counters were forgotten: what is kept of them
        goes (their owner's scope held their key's counters)."""
        for id_ in budget_ids:
            self.thresholds.pop(id_, None)
            self.owners.pop(id_, None)
            self._raised.pop(id_, None)
            self._exhausted.pop(id_, None)

    def _forgotten(self, counter: WindowCounter) -> bool:
        """A budget deleted, whose counter a key cached before the deletion still charges
        until the cache TTL: nothing to tell (`_insert` finds no budget), nor to keep."""
        return self.engine.registry.counter("budget", counter.id) is not counter

    def check(self, limits: LimitSet) -> None:
        """After a charge: has any budget reached its next threshold (or a new window begun)?"""
        for counter in limits.budgets:
            if counter.value >= counter.alert_at:  # type: ignore[attr-defined]
                self._look(counter, limits)
        for counter in limits.soft_budgets:
            if counter.value >= counter.alert_at:  # type: ignore[attr-defined]
                self._look(counter, limits)

    def _look(
        self, counter: WindowCounter, limits: LimitSet | None, scope: Scope | None = None
    ) -> None:
        if self._forgotten(counter):
            return
        start = counter.start
        known = self._raised.get(counter.id)
        if known is None or known[0] != start:
            known = self._raised[counter.id] = (start, set())
        raised = known[1]
        thresholds = self.thresholds.get(counter.id, self.defaults)
        hard = counter.limit > 0 or not _soft(counter, scope or self.owners.get(counter.id))
        new, counter.alert_at = reached(counter.value, counter.limit, thresholds, raised, hard)  # type: ignore[attr-defined]
        if new:
            if scope is None:
                assert limits is not None
                scope = limits.owner_of(counter)
            for threshold in new:
                raised.add(threshold)
                self._queue("budget.threshold", counter, threshold, scope)

    def refused(self, refusal: Refusal) -> None:
        """A budget refused: the first time in its window raises `budget.exhausted`."""
        counter = refusal.counter
        if counter is None or self._forgotten(counter):
            return
        # The spend a refusal finds (charged by other instances, or a limit lowered below it)
        # has reached thresholds no charge of this instance looked at: raised first.
        if counter.value >= counter.alert_at:  # type: ignore[attr-defined]
            self._look(counter, None, refusal.scope)
        if self._exhausted.get(counter.id) == counter.start:
            return
        self._exhausted[counter.id] = counter.start
        self._queue("budget.exhausted", counter, 0.0, refusal.scope)

    def _queue(self, type_: str, counter: WindowCounter, threshold: float, scope: Scope) -> None:
        now = self.engine.clock()
        event = AlertEvent(
            type_,
            counter.id,
            counter.start,
            threshold,
            scope.type,
            scope.id,
            scope.name,
            now,
            counter.value,
            counter.limit,
            counter.end,
        )
        self.queue.append(event)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    # -- the alert task ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wake = asyncio.Event()
        self._caught_up = False
        self._task = loop.create_task(self._run())

    def after_fork_in_child(self) -> None:
        """The parent's task and loop are not this process's; its queued events are its own.
        The parent's webhook client is kept, never closed nor collected (`keep_inherited`)."""
        keep_inherited(self._client)
        self.after_loop_closed()
        self.queue = []

    def after_loop_closed(self) -> None:
        """The task was the closed loop's; what is queued is delivered once it starts again."""
        self._task = self._wake = self._loop = None
        self._deliveries = set()  # the closed loop's tasks: their claims lapse
        self._last_post = {}
        self._client = None
        self._in_rounds = False

    async def stop(self) -> None:
        """Stop the task once its round ends (bounded: a delivery still hanging then is cut and
        its claim lapses), and raise what is queued, so that it is delivered after a restart."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            if self._wake is not None:
                self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.timeout + 2.0)
            except TimeoutError:
                task.cancel()  # it writes what is queued as it ends: bounded too
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, self.timeout + 2.0)
        self._loop = None
        try:
            await self.raise_queued()
        except Exception as exc:
            logger.warning("budget-middleware could not save alerts at shutdown: %s", exc)

    async def _run(self) -> None:
        try:
            await self._rounds()
        except asyncio.CancelledError:
            # The loop ends (`asyncio.run` cancels every task as it ends): what the last
            # requests raised is written first, or it would be lost with the loop.
            try:
                await self.raise_queued()
            except Exception as exc:
                logger.warning("budget-middleware could not save alerts as its loop ended: %s", exc)
            await self.deliver_last()
            raise

    async def deliver_last(self) -> None:
        """As the process ends (a shutdown, once the charges are written; a script's loop
        ending): what is due posted once, awaited, each post bounded by `timeout`. Left in the
        store alone, the alerts of a process's last requests waited for the next process with
        the URL: a job that spent its budget and ended told no receiver of it."""
        if not self.urls:
            return
        try:
            await self.deliver_due()
        except Exception as exc:  # what is left is delivered after a restart
            logger.warning("budget-middleware could not deliver alerts as it ended: %s", exc)

    async def _rounds(self) -> None:
        self._in_rounds = True
        try:
            await self._rounds_with()
        except asyncio.CancelledError:
            for delivery in self._deliveries:  # cut with the task, as they were in it
                delivery.cancel()
            raise
        finally:
            # What is in flight ends (each post is bounded by `timeout`) before the client
            # closes; cancelled with this task, its claim lapses and it is retried.
            self._in_rounds = False
            client, self._client = self._client, None
            if self._deliveries:
                await asyncio.gather(*self._deliveries, return_exceptions=True)
            if client is not None:
                await client.aclose()

    async def _rounds_with(self) -> None:
        wake = self._wake
        task = asyncio.current_task()
        assert wake is not None and task is not None
        self._stopping = False
        # When it last looked for deliveries no instance makes any more: first a sweep interval
        # after start, not in the first round, where its worker thread ran beside the start's
        # own store reads (2 MB more RSS at 10,000 cached keys, 24.2 → 26.3 MB); what it looks
        # for has idled `give_up_after` (10 minutes), so a minute later finds the same.
        swept = time.monotonic()
        failures = FailedRounds("alert")
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_interval)
            wake.clear()
            if self._stopping:
                return
            try:
                await self.raise_queued()
                if self.urls:
                    await self.deliver_due()
                if time.monotonic() - swept >= max(self.poll_interval, self.give_up_after / 10):
                    swept = time.monotonic()
                    await self.give_up_unattended()
            except Exception as exc:  # the task must survive anything: the next round retries
                failures.failed(exc)
            else:
                failures.succeeded()
            if task.cancelling():
                # Cancelled while it waited for a worker thread (`asyncio.run` cancels every
                # task as it ends): anyio's wait for the thread absorbs the cancellation, and
                # going round again would keep the loop from closing, for ever.
                raise asyncio.CancelledError

    async def raise_queued(self) -> int:
        """Raise the queued events in the store; report those this instance raised first."""
        if not self.queue:
            return 0
        events, self.queue = self.queue, []
        try:
            rows = await anyio.to_thread.run_sync(self._insert, events)
        except BaseException:  # cancelled too (a shutdown): raising twice is harmless
            self.queue[:0] = events  # the store is away: kept for the next round
            raise
        hooks = self.engine.hooks
        for row in rows:
            self.raised[row.type] = self.raised.get(row.type, 0) + 1
            logger.info(
                "budget-middleware alert: %s%s of %s %r",  # a name is quoted: one log line
                row.type,
                f" {row.threshold:g}" if row.type == "budget.threshold" else "",
                row.owner_type,
                row.owner_name or row.owner_id,
            )
            if hooks.on_alert:
                hooks.emit(hooks.on_alert, {**json.loads(row.body), **stored.alert_out(row)})
        return len(rows)

    def _insert(self, events: list[AlertEvent]) -> list[Any]:
        from budget_middleware.manage.status import Paths, budget_out
        from budget_middleware.store.tables import BudgetRow

        engine = self.engine
        alerts: list[stored.NewAlert] = []
        with engine.store.session() as s:
            paths = Paths(s)
            now = datetime.now(UTC)
            for event in events:
                row = s.get(BudgetRow, event.budget_id)
                if row is None:  # deleted meanwhile: no budget to tell of (SPEC §9's fields)
                    _log_dropped(event, "its budget was deleted before the alert was written")
                    continue
                if _reset_before(event, row, engine.registry.counter("budget", row.id)):
                    continue
                now_out = budget_out(row, paths.of(row.owner_type, row.owner_id), now,
                                     engine.registry)  # fmt: skip
                budget = now_out.model_copy(update=_as_crossed(event)).model_dump(mode="json")
                raised_at = from_ts(event.raised_at)
                alert_id = new_id()
                body: dict[str, Any] = {"id": alert_id, "type": event.type}
                if event.type == "budget.threshold":
                    body["threshold"] = event.threshold
                owner = {"type": event.owner_type, "id": event.owner_id, "name": event.owner_name}
                body |= {"budget": budget, "owner": owner, "raised_at": rfc3339(raised_at)}
                body["text"] = _text(event, budget, self.engine.gate.shadow)  # shown by Slack
                alerts.append(
                    stored.NewAlert(
                        type=event.type,
                        budget_id=event.budget_id,
                        window_start=from_ts(event.window_start),
                        threshold=event.threshold,
                        owner_type=event.owner_type,
                        owner_id=event.owner_id,
                        owner_name=event.owner_name,
                        raised_at=raised_at,
                        body=json.dumps(body, separators=(",", ":")),
                        delivery="pending" if self.urls else "delivered",
                        id=alert_id,
                    )
                )
        # With no URL here: pending to the URLs posted to in the last `backlog` (an instance
        # with one may be down; back, it takes the alerts its URL lacks), not `delivered`.
        known_since = datetime.now(UTC) - timedelta(seconds=self.backlog)
        return stored.raise_alerts(engine.store, alerts, self.urls, known_since)

    async def give_up_unattended(self) -> int:
        """Deliveries to a URL removed from every instance's settings: none attempts them any
        more; once none has for `give_up_after`, they are dropped (an alert left with none,
        every URL removed, is failed). Only those that idle: another instance's retries are
        never given up by this one's settings."""
        now = datetime.now(UTC)
        own = [stored.url_key(url) for url in self.urls]  # this instance delivers those
        given_up = await anyio.to_thread.run_sync(
            stored.give_up_unattended, self.engine.store, now, self.give_up_after, own
        )
        if given_up:
            logger.error(
                "budget-middleware gave up %d alert delivery(ies): no instance with their "
                "webhook URL attempted them for %g s",
                given_up,
                self.give_up_after,
            )
        return given_up

    async def deliver_due(self) -> int:
        """Post every due delivery to a URL of this instance's: in tasks of their own from the
        alert task (the number started), else here (the number delivered in full)."""
        now = datetime.now(UTC)
        lease = 30.0 + self.timeout
        client = self._client
        room = MAX_IN_FLIGHT - len(self._deliveries)  # a bounded number of posts at once
        if room <= 0:
            return 0
        store = self.engine.store
        backlog = 0.0 if self._caught_up else self.backlog
        await anyio.to_thread.run_sync(
            stored.adopt, store, self.urls, now, self.give_up_after, backlog
        )
        self._caught_up = True
        due = await anyio.to_thread.run_sync(stored.claim_due, store, self.urls, now, lease, room)
        if not due:
            return 0
        if not self._in_rounds:  # called outside the alert task: delivered here, awaited
            async with _webhook_client(self.timeout) as own:
                done = await asyncio.gather(
                    *(self._start(own, delivery) for delivery in due), return_exceptions=True
                )
            self._last_post = {}
            for outcome in done:
                _log_failure(outcome)
            return sum(1 for outcome in done if outcome is True)
        # Each delivery (an alert to one URL) its own task, not awaited: the next round (new
        # alerts, retries due, another URL's retry) comes at the poll interval whatever a
        # receiver takes. A claimed delivery is held by its lease until its outcome is
        # written, so no round posts it twice meanwhile. The client is made at the first
        # delivery: a process that never delivers one (most have no webhook) does not hold one
        # (its TLS context: 2.4 MB of RSS).
        if client is None:
            client = self._client = _webhook_client(self.timeout)
        for delivery in due:
            task = self._start(client, delivery)
            self._deliveries.add(task)
            task.add_done_callback(self._delivered)
        return len(due)

    def _start(self, client: httpx.AsyncClient, due: stored.Due) -> asyncio.Task[bool]:
        """A delivery's task, after the last one started to its URL (`order_wait`). A retry
        waits for none: its first comes within 5 s of the failure (SPEC §14) whatever else
        the URL is taking its time over."""
        before = self._last_post.get(due.url) if due.attempts == 0 else None
        task = asyncio.get_running_loop().create_task(self._deliver(client, due, before))
        self._last_post[due.url] = task
        return task

    def _delivered(self, delivery: asyncio.Task[bool]) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled():
            _log_failure(delivery.exception())

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> str | None:
        """One URL's post: None when it took it (a status below 300), else why not."""
        status: int | None = None
        try:
            # The whole post within `timeout` (httpx's bounds each read): so the claim's lease
            # (30 s and `timeout`) outlasts the delivery. Its status is the answer (SPEC §14):
            # the body after it is not waited for (a receiver that sent `200 OK` and its body
            # after the timeout was counted failed and posted the alert again, and again).
            async with (
                asyncio.timeout(self.timeout),
                client.stream("POST", url, content=body, headers=headers) as answer,
            ):
                status = answer.status_code
        except TimeoutError:
            if status is None:
                return f"{shown_url(url)}: no answer within {self.timeout:g} s"
        except Exception as exc:  # whatever one URL does, the others' outcome is kept
            if status is None:
                return f"{shown_url(url)}: {type(exc).__name__}"
        if status < 300:
            return None
        return f"{shown_url(url)} answered {status}"

    async def _deliver(
        self, client: httpx.AsyncClient, due: stored.Due, before: asyncio.Task[bool] | None
    ) -> bool:
        """One alert to one URL, and its outcome: that URL's next attempt on its own schedule
        (another URL hanging holds it back no more than its own post)."""
        if before is not None and not before.done():  # posted in order, a bounded wait
            await asyncio.wait((before,), timeout=self.order_wait)
        body = due.body.encode()
        headers = {"content-type": "application/json", "user-agent": "budget-middleware"}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        error = await self._post(client, due.url, body, headers)
        attempts = due.attempts + 1
        now = datetime.now(UTC)
        first = due.first_attempt_at or now
        if error is None:
            state = "delivered"
        elif (now - first).total_seconds() >= self.give_up_after:
            # Retried for `give_up_after` from the first attempt (not from when it was raised:
            # a restart or a store outage does not eat the retries).
            state = "failed"
            logger.error("budget-middleware gave up delivering alert %s: %s", due.alert_id, error)
        else:
            state = "pending"
        if error is not None:
            self.failed_deliveries += 1
        delay = min(self.first_retry * 2 ** (attempts - 1), self.max_delay)
        record = (self.engine.store, due, state, now + timedelta(seconds=delay), error)
        while True:
            try:
                recorded = await anyio.to_thread.run_sync(stored.record_attempt, *record)
            except Exception:
                # The store away for a moment: written again while the claim holds (and the
                # alert task runs: a process that ends does not wait for it). Left to the
                # claim's end, a post the receiver took was posted again 31-40 s later (never,
                # after a success: SPEC §14).
                ends = datetime.now(UTC) + timedelta(seconds=self.poll_interval)
                if not self._in_rounds or ends >= due.claimed_until:
                    raise
                await asyncio.sleep(self.poll_interval)
            else:
                return recorded and state == "delivered"


def _webhook_client(timeout: float) -> httpx.AsyncClient:
    """The client alerts are posted with: httpx's, reading the environment as httpx does
    (`HTTPS_PROXY`, `NO_PROXY`, `SSL_CERT_FILE`): a server whose egress goes through a proxy
    reaches its receivers through it (made with `trust_env=False`, it went direct, and a
    receiver only the proxy reaches never got an alert)."""
    return httpx.AsyncClient(timeout=timeout)


def _reset_before(event: AlertEvent, row: BudgetRow, live: WindowCounter | None) -> bool:
    """Whether the store began the budget's window anew (a reset through another instance)
    within the crossing's window and before the crossing: the charges of this instance's that
    crossed it the store counts in the new window, and so does this instance once it learns of
    it (the next re-read: `WindowCounter.configure`), which raises the new window's thresholds
    they reach. Raised in the old window too, a threshold of it was told at a spend it never
    held ("$1.20" of a window that ended at $0.60). So is `budget.exhausted`: a refusal made
    after the reset, before this instance learnt of it, was made in the new window, which the
    store holds not exhausted; told as the old window's, it said "requests are refused" after
    the operator's reset, of a window that refused none. Not when the store's terms are not the
    live counter's (`live`): new terms made elsewhere are taken only with the key's reload, and
    the crossing stays where it was."""
    if live is None:
        return False
    last_reset = utc(row.last_reset).timestamp()
    if not event.window_start < last_reset <= event.raised_at or last_reset >= event.window_end:
        return False
    terms = (parse_duration(row.reset_duration), row.calendar_aligned)
    if terms != (live.duration, live.calendar_aligned):
        return False
    logger.info(
        "budget-middleware alert %s%s of %s %r not raised: its window was reset at %s, "
        "before the crossing (the charges count in the new window)",
        event.type,
        f" {event.threshold:g}" if event.type == "budget.threshold" else "",
        event.owner_type,
        event.owner_name or event.owner_id,
        rfc3339(from_ts(last_reset)),
    )
    return True


def _log_dropped(event: AlertEvent, why: str) -> None:
    """An alert not raised, on one log line (a name is quoted)."""
    logger.warning(
        "budget-middleware alert %s%s of %s %r (budget %s) not raised: %s",
        event.type,
        f" {event.threshold:g}" if event.type == "budget.threshold" else "",
        event.owner_type,
        event.owner_name or event.owner_id,
        event.budget_id,
        why,
    )


def _log_failure(outcome: object) -> None:
    if isinstance(outcome, BaseException):  # its claim lapses: retried after the lease
        # By its type: a store error's text holds its parameters, the URLs among them.
        logger.error("budget-middleware alert delivery failed: %s", type(outcome).__name__)


def _usd(amount: float) -> str:
    """Cents from a dollar up, four decimals from a cent, exactly below: rounded down, so a
    spend never reads as more than it is ($9.996 of $10 read "$10.00 of $10.00" in its 50 %
    alert, as if exhausted)."""
    nanos = nanos_from_usd(amount)
    if nanos >= NANOS_PER_USD:
        return usd_fixed(nanos, 2, grouped=True, down=True)
    if nanos >= NANOS_PER_USD // 100:
        return usd_fixed(nanos, 4, down=True)
    return usd_text(nanos)


def _as_crossed(event: AlertEvent) -> dict[str, Any]:
    """The budget's money and window as the crossing found them, over what the store shows
    when the alert is written (requests settled since; a window begun since, when it is
    written late: the store away, or the crossing at a window's end)."""
    from budget_middleware.manage.status import spend_and_window

    start, end = from_ts(event.window_start), event.window_end
    crossed = spend_and_window(
        event.limit,
        event.spent,
        start,
        from_ts(end) if end != FAR_FUTURE else None,
        from_ts(event.raised_at),
    )
    return {**crossed, "last_reset": start, "last_reset_at": start}


def _text(event: AlertEvent, budget: dict[str, Any], shadow: bool) -> str:
    who = f"{event.owner_type} {event.owner_name or event.owner_id}"
    spent, amount = budget.get("spent", 0.0), budget.get("amount", 0.0)
    period = budget.get("period_label") or ""
    money = f"{_usd(spent)} of {_usd(amount)}" + (f" ({period})" if period else "")
    if event.type == "budget.exhausted":
        then = "it would refuse requests (shadow mode)" if shadow else "requests are refused"
        return f"Budget exhausted: {who} has spent {money}; {then}."
    # As set (12.5%, 0.5%), not rounded to a whole percent (12%, 0%); float noise left out.
    share = f"{event.threshold * 100:g}%"
    return f"Budget alert: {who} reached {share} of its budget: {money}."


def _soft(counter: WindowCounter, owner: Scope | None) -> bool:
    """Whether `counter` is a soft budget of `owner` (SPEC §14: it never refuses)."""
    return owner is not None and any(c is counter for c in owner.soft_budgets)


__all__ = ["SIGNATURE_HEADER", "AlertEvent", "Alerts", "signature"]
