"""The Python API to create and change customers, teams, keys, providers, model configs and tags.

Every method is synchronous (it talks to the store) and takes a body either as its pydantic model
or as keyword arguments::

    manager = BudgetManager(store, settings)
    team = manager.create_team(name="research")
    key = manager.create_virtual_key(
        name="alice", team_id=team.id, budgets=[{"max_limit": 1, "reset_duration": "1d"}]
    )
    key.value  # returned once, here and by rotate_virtual_key

Deleting an owner deletes its budgets and rate limit. Deleting a key also deletes its provider
configs and the model configs scoped to it (with their limits). Deleting a team or a customer
detaches what belonged to it: its keys (and a customer's teams) then answer to no team or customer.
A running process sees a write once its engine is invalidated (`await engine.invalidate()`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from budget_middleware.core.identity import MAX_PROVIDER_CHARS, MAX_TAG_CHARS, name_problem
from budget_middleware.core.providers import canonical_provider, owner_name, stored_provider
from budget_middleware.core.times import from_ts
from budget_middleware.core.windows import CounterRegistry, reset_moment
from budget_middleware.exceptions import Conflict, InvalidBody, InvalidRequest, NotFound
from budget_middleware.manage import reports
from budget_middleware.manage.keys import KeyWriter
from budget_middleware.manage.owner_limits import (
    check_model_names,
    delete_limits,
    ensure_schema,
    is_held,
    one_writer_at_a_time,
    remember_deleted,
    write_limits,
)
from budget_middleware.manage.schemas import (
    BudgetOut,
    CustomerCreate,
    CustomerOut,
    CustomerUpdate,
    ModelConfigCreate,
    ModelConfigOut,
    ModelConfigUpdate,
    ProviderOut,
    ProviderPut,
    RateLimitOut,
    RouteCreate,
    RouteOut,
    RouteUpdate,
    TagOut,
    TagPut,
    TeamCreate,
    TeamOut,
    TeamUpdate,
    UsageOut,
    VirtualKeyCreate,
    VirtualKeyOut,
    VirtualKeyUpdate,
    described,
    failures,
    to_utc,
)
from budget_middleware.manage.views import Reader
from budget_middleware.settings import BudgetSettings
from budget_middleware.store import alerts as stored_alerts
from budget_middleware.store.tables import (
    CustomerRow,
    ModelConfigRow,
    ProviderRow,
    RouteRow,
    TagRow,
    TeamRow,
    VirtualKeyRow,
)

__all__ = ["BudgetManager", "Conflict", "InvalidBody", "InvalidRequest", "NotFound"]

logger = logging.getLogger("budget_middleware")

B = TypeVar("B", bound=BaseModel)
R = TypeVar("R")
Body = BaseModel | Mapping[str, Any] | None


def _body(model: type[B], body: Body, fields: dict[str, Any]) -> B:
    """The body validated by `model`; else InvalidBody (an InvalidRequest, 422) naming the first
    failing field as the admin API does, pydantic's ValidationError as its `__cause__`. A body
    that is neither the model nor a mapping (`create_team("research")`) is refused by name."""
    if isinstance(body, model) and not fields:
        return body
    if isinstance(body, BaseModel):
        body = body.model_dump(exclude_unset=True)
    elif body is not None and not isinstance(body, Mapping):
        message = (
            f"must be a {model.__name__} or a mapping of its fields (or the fields as keyword "
            f"arguments), not {type(body).__name__}"
        )
        found = [{"param": "body", "message": message, "kind": "model_type"}]
        raise InvalidBody(described(found), param="body", errors=found)
    try:
        return model.model_validate({**(body or {}), **fields})
    except ValidationError as exc:
        found = failures(exc)
        param = found[0]["param"] if found else "body"
        raise InvalidBody(described(found), param=param, errors=found) from exc


class BudgetManager(KeyWriter):
    """Create, change, list and delete every managed object; see the module's docstring."""

    # -- customers -----------------------------------------------------------------------

    def create_customer(self, body: Body = None, /, **fields: Any) -> CustomerOut:
        data = _body(CustomerCreate, body, fields)
        with self._session() as s:
            self._unique_name(s, CustomerRow, data.name, "customer", None)
            row = CustomerRow(name=data.name, calendar_aligned=data.calendar_aligned)
            self.origin.stamp(row, created=True)
            s.add(row)
            write_limits(s, "customer", row.id, data, calendar_aligned=row.calendar_aligned,
                         origin=self.origin)  # fmt: skip
            self._commit(s, "customer")
            return Reader(s).customer(row)

    def update_customer(self, id_: str, body: Body = None, /, **fields: Any) -> CustomerOut:
        data = _body(CustomerUpdate, body, fields)
        with self._session() as s:
            row = self._get(s, CustomerRow, id_, "customer", held=True)
            self._update_owner(s, "customer", row, data)
            self._commit(s, "customer")
            return Reader(s).customer(row)

    def delete_customer(self, id_: str) -> None:
        with self._session() as s:
            row = self._get(s, CustomerRow, id_, "customer", held=True)
            for team in s.exec(select(TeamRow).where(TeamRow.customer_id == id_)):
                team.customer_id = None
                s.add(team)
            for key in s.exec(select(VirtualKeyRow).where(VirtualKeyRow.customer_id == id_)):
                key.customer_id = None
                s.add(key)
            delete_limits(s, "customer", [id_])
            remember_deleted(s, "customer", row.id, row.name, row)
            s.delete(row)
            s.commit()

    def get_customer(self, id_: str) -> CustomerOut:
        with self._session() as s:
            return Reader(s).customer(self._get(s, CustomerRow, id_, "customer"))

    def list_customers(self) -> list[CustomerOut]:
        with self._session() as s:
            reader = Reader(s)
            rows = s.exec(select(CustomerRow).order_by(col(CustomerRow.name))).all()
            return [reader.customer(r) for r in rows]

    # -- teams ---------------------------------------------------------------------------

    def _check_customer(self, s: Session, customer_id: str | None) -> None:
        if customer_id is not None and not is_held(s, CustomerRow, customer_id):
            raise NotFound(f"customer {customer_id!r} not found", param="customer_id")

    def create_team(self, body: Body = None, /, **fields: Any) -> TeamOut:
        data = _body(TeamCreate, body, fields)
        with self._session() as s:
            self._unique_name(s, TeamRow, data.name, "team", None)
            self._check_customer(s, data.customer_id)
            row = TeamRow(
                name=data.name, customer_id=data.customer_id, calendar_aligned=data.calendar_aligned
            )
            self.origin.stamp(row, created=True)
            s.add(row)
            write_limits(s, "team", row.id, data, calendar_aligned=row.calendar_aligned,
                         origin=self.origin)  # fmt: skip
            self._commit(s, "team")
            return Reader(s).team(row)

    def update_team(self, id_: str, body: Body = None, /, **fields: Any) -> TeamOut:
        data = _body(TeamUpdate, body, fields)
        with self._session() as s:
            row = self._get(s, TeamRow, id_, "team", held=True)
            if "customer_id" in data.model_fields_set:
                self._check_customer(s, data.customer_id)
                row.customer_id = data.customer_id
            self._update_owner(s, "team", row, data)
            self._commit(s, "team")
            return Reader(s).team(row)

    def delete_team(self, id_: str) -> None:
        with self._session() as s:
            row = self._get(s, TeamRow, id_, "team", held=True)
            for key in s.exec(select(VirtualKeyRow).where(VirtualKeyRow.team_id == id_)):
                key.team_id = None
                s.add(key)
            delete_limits(s, "team", [id_])
            remember_deleted(s, "team", row.id, row.name, row)
            s.delete(row)
            s.commit()

    def get_team(self, id_: str) -> TeamOut:
        with self._session() as s:
            return Reader(s).team(self._get(s, TeamRow, id_, "team"))

    def list_teams(self, customer_id: str | None = None) -> list[TeamOut]:
        with self._session() as s:
            query = select(TeamRow).order_by(col(TeamRow.name))
            if customer_id is not None:
                query = query.where(TeamRow.customer_id == customer_id)
            reader = Reader(s)
            return [reader.team(r) for r in s.exec(query).all()]

    # -- virtual keys: see keys.KeyWriter ------------------------------------------------

    def create_virtual_key(self, body: Body = None, /, **fields: Any) -> VirtualKeyOut:
        return self._create_key(_body(VirtualKeyCreate, body, fields))

    def update_virtual_key(self, id_: str, body: Body = None, /, **fields: Any) -> VirtualKeyOut:
        return self._update_key(id_, _body(VirtualKeyUpdate, body, fields))

    # -- providers and tags: named, created by their first PUT ---------------------------

    def put_provider(self, name: str, body: Body = None, /, **fields: Any) -> ProviderOut:
        out, _ = self.put_provider_created(name, _body(ProviderPut, body, fields))
        return out

    def put_provider_created(self, name: str, data: ProviderPut) -> tuple[ProviderOut, bool]:
        data = _body(ProviderPut, data, {})  # as given, when it is one (the admin API's)
        with self._session() as s:
            row, created = self._put_named(s, ProviderRow, "provider", name, data)
            return Reader(s).provider(row), created

    def _put_named(
        self, s: Session, table: type[R], owner_type: str, name: str, data: ProviderPut
    ) -> tuple[R, bool]:
        if not isinstance(name, str):  # put_tag({...}): the body given for the name
            raise InvalidRequest(
                f"a {owner_type} name is a string, not {type(name).__name__}", param=owner_type
            )
        limit = MAX_PROVIDER_CHARS if owner_type == "provider" else MAX_TAG_CHARS
        problem = name_problem(owner_type, name, limit)  # limits no request would ever meet
        if problem is not None:
            raise InvalidRequest(problem, param=owner_type)
        if owner_type == "provider":
            name = canonical_provider(name)  # one name per provider: `OpenAI` is `openai`
        for attempt in range(2):
            # Held, as an update holds its row: a DELETE of it at once waits for this PUT, or
            # this PUT for it (then made anew), and leaves no budget of a tag that is gone.
            row: Any = s.get(table, name) if is_held(s, table, name) else None
            created = row is None
            try:
                if row is None:
                    row = table(
                        **{owner_type: name, "calendar_aligned": bool(data.calendar_aligned)}
                    )
                    self.origin.stamp(row, created=True)
                    s.add(row)
                    write_limits(s, owner_type, name, data, calendar_aligned=row.calendar_aligned,
                                 origin=self.origin)  # fmt: skip
                else:
                    self._update_owner(s, owner_type, row, data)
                self._commit(s, owner_type)
            except (Conflict, IntegrityError):
                # Created by another writer between this read and this write (PUTs of one new
                # tag at once, refused at a flush or at the commit): a PUT is idempotent, so
                # this one is made again, as an update of what the other made.
                if not created or attempt:
                    raise
                s.rollback()
                continue
            break
        return row, created

    def get_provider(self, name: str) -> ProviderOut:
        with self._session() as s:
            row = self._get(s, ProviderRow, stored_provider(name), "provider")
            return Reader(s).provider(row)

    def list_providers(self) -> list[ProviderOut]:
        with self._session() as s:
            reader = Reader(s)
            rows = s.exec(select(ProviderRow).order_by(col(ProviderRow.provider))).all()
            return [reader.provider(r) for r in rows]

    def delete_provider(self, name: str) -> None:
        self._delete_named(ProviderRow, "provider", stored_provider(name))

    def _delete_named(self, table: Any, owner_type: str, name: str) -> None:
        with self._session() as s:
            row = self._get(s, table, name, owner_type, held=True)
            delete_limits(s, owner_type, [name])
            remember_deleted(s, owner_type, name, name, row)
            s.delete(row)
            s.commit()

    def put_tag(self, tag: str, body: Body = None, /, **fields: Any) -> TagOut:
        out, _ = self.put_tag_created(tag, _body(TagPut, body, fields))
        return out

    def put_tag_created(self, tag: str, data: TagPut) -> tuple[TagOut, bool]:
        data = _body(TagPut, data, {})  # as given, when it is one (the admin API's)
        with self._session() as s:
            row, created = self._put_named(s, TagRow, "tag", tag, data)
            return Reader(s).tag(row), created

    def get_tag(self, tag: str) -> TagOut:
        with self._session() as s:
            return Reader(s).tag(self._get(s, TagRow, tag, "tag"))

    def list_tags(self) -> list[TagOut]:
        with self._session() as s:
            reader = Reader(s)
            return [reader.tag(r) for r in s.exec(select(TagRow).order_by(col(TagRow.tag))).all()]

    def delete_tag(self, tag: str) -> None:
        self._delete_named(TagRow, "tag", tag)

    # -- routes (SPEC §12) ---------------------------------------------------------------

    def create_route(self, body: Body = None, /, **fields: Any) -> RouteOut:
        data = _body(RouteCreate, body, fields)
        with self._session() as s:
            self._unique_name(s, RouteRow, data.name, "route", None)
            row = RouteRow(name=data.name, targets=list(data.targets), strategy=data.strategy)
            self.origin.stamp(row, created=True)
            s.add(row)
            self._commit(s, "route")
            return _route_out(row)

    def update_route(self, id_: str, body: Body = None, /, **fields: Any) -> RouteOut:
        data = _body(RouteUpdate, body, fields)
        with self._session() as s:
            row = self._get(s, RouteRow, id_, "route", held=True)
            if data.name is not None:
                self._unique_name(s, RouteRow, data.name, "route", row.id)
                row.name = data.name
            if data.targets is not None:
                row.targets = list(data.targets)
            if data.strategy is not None:
                row.strategy = data.strategy
            self.origin.stamp(row, created=False)
            s.add(row)
            self._commit(s, "route")
            return _route_out(row)

    def delete_route(self, id_: str) -> None:
        with self._session() as s:
            row = self._get(s, RouteRow, id_, "route", held=True)
            remember_deleted(s, "route", row.id, row.name, row)
            s.delete(row)
            s.commit()

    def get_route(self, id_: str) -> RouteOut:
        with self._session() as s:
            return _route_out(self._get(s, RouteRow, id_, "route"))

    def list_routes(self) -> list[RouteOut]:
        with self._session() as s:
            rows = s.exec(select(RouteRow).order_by(col(RouteRow.name))).all()
            return [_route_out(r) for r in rows]

    # -- model configs -------------------------------------------------------------------

    def _unique_rule(self, s: Session, row: ModelConfigRow) -> None:
        """One model config per (model, provider, scope, scope id): checked here, under
        `one_writer_at_a_time`, since the store's unique constraint holds no two NULLs equal
        (a config for any provider, or a global one: 4 creates at once stored 4)."""
        same = s.exec(
            select(ModelConfigRow).where(
                ModelConfigRow.model_name == row.model_name,
                ModelConfigRow.provider == row.provider,
                ModelConfigRow.scope == row.scope,
                ModelConfigRow.scope_id == row.scope_id,
            )
        ).first()
        if same is not None and same.id != row.id:
            raise Conflict(
                f"a model config for {row.model_name!r} with this provider and scope already "
                f"exists: {same.id}",
                param="model_name",
            )

    def create_model_config(self, body: Body = None, /, **fields: Any) -> ModelConfigOut:
        data = _body(ModelConfigCreate, body, fields)
        check_model_names([data.model_name], "model_name")
        with self._session() as s:
            one_writer_at_a_time(s)  # (`_unique_rule`'s check and the write, as one)
            if data.scope_id is not None and s.get(VirtualKeyRow, data.scope_id) is None:
                raise NotFound(f"virtual key {data.scope_id!r} not found", param="scope_id")
            row = ModelConfigRow(
                model_name=data.model_name,
                provider=data.provider,
                scope=data.scope,
                scope_id=data.scope_id,
                calendar_aligned=data.calendar_aligned,
            )
            self._unique_rule(s, row)
            self.origin.stamp(row, created=True)
            s.add(row)
            write_limits(s, "model_config", row.id, data, calendar_aligned=row.calendar_aligned,
                         origin=self.origin)  # fmt: skip
            self._commit(s, "model config")
            return Reader(s).model_config(row)

    def update_model_config(self, id_: str, body: Body = None, /, **fields: Any) -> ModelConfigOut:
        data = _body(ModelConfigUpdate, body, fields)
        if data.model_name is not None:
            check_model_names([data.model_name], "model_name")
        with self._session() as s:
            one_writer_at_a_time(s)
            row = self._get(s, ModelConfigRow, id_, "model config", held=True)
            if data.model_name is not None:
                row.model_name = data.model_name
            if "provider" in data.model_fields_set:
                row.provider = data.provider
            self._unique_rule(s, row)
            self._update_owner(s, "model_config", row, data)
            self._commit(s, "model config")
            return Reader(s).model_config(row)

    def delete_model_config(self, id_: str) -> None:
        with self._session() as s:
            row = self._get(s, ModelConfigRow, id_, "model config", held=True)
            delete_limits(s, "model_config", [id_])
            remember_deleted(s, "model_config", row.id, row.model_name, row)
            s.delete(row)
            s.commit()

    def get_model_config(self, id_: str) -> ModelConfigOut:
        with self._session() as s:
            return Reader(s).model_config(self._get(s, ModelConfigRow, id_, "model config"))

    def list_model_configs(
        self,
        *,
        limit: int | None = None,
        offset: int = 0,
        search: str | None = None,
        scope: str | None = None,
        provider: str | None = None,
        counters: CounterRegistry | None = None,
    ) -> tuple[list[ModelConfigOut], int]:
        """One page of model configs and the number of all that match the filters."""
        with self._session() as s:
            if provider is not None:
                provider = canonical_provider(provider)
            return reports.model_configs(
                s, limit=limit, offset=offset, search=search, scope=scope, provider=provider,
                counters=counters,
            )  # fmt: skip

    # -- budgets, rate limits, usage -----------------------------------------------------

    def list_budgets(
        self,
        *,
        owner_type: str | None = None,
        owner_id: str | None = None,
        from_memory: bool = False,
        counters: CounterRegistry | None = None,
    ) -> list[BudgetOut]:
        """Every budget (or one owner's); with `from_memory`, usage from the live `counters`
        (this manager's engine's when none are given)."""
        owner_id = owner_name(owner_type, owner_id)
        with self._session() as s:
            live = self.live_counters(from_memory, counters)
            return reports.budgets(s, owner_type=owner_type, owner_id=owner_id, counters=live)

    def get_budget(self, id_: str) -> BudgetOut:
        with self._session() as s:
            return reports.budget(s, id_)

    def reset_budget(self, id_: str) -> BudgetOut:
        """Start a new window now: usage 0 from this moment, in this process's live counter and
        in the store, at one moment (the engine's, where requests settle: a charge settled
        after it counts in the new window, one settled before it does not). Other instances
        take the stored moment when they next read the budget. Should the store's write fail,
        the reset stands here and the flusher writes it when the store is back. With Redis,
        the other instances take it at their next admission of the budget (a mark there). The
        moment is after the stored window's start, which a clock ahead of this one's may have
        put after this one's now: a reset before it would leave that window as it is."""
        began: float | None = None
        try:
            with self._session() as s:
                began = reports.window_began(s, id_)  # (NotFound for an unknown budget)
        except SQLAlchemyError:  # the store away: with an engine the reset stands there
            if self.reset_live is None:
                raise
        if self.reset_live is not None:
            at = from_ts(self.reset_live("budget", id_, began))  # marked in Redis there
        else:
            at = datetime.now(UTC)
            if began is not None:
                at = from_ts(reset_moment(at.timestamp(), began))
            if self.settings.redis_url:  # no engine here: marked here, before the store has it
                _mark_in_redis(self.settings, id_, at.timestamp())
        with self._session() as s:
            return reports.reset_budget(s, id_, at)

    def list_alerts(
        self,
        owner_type: str | None = None,
        owner_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Recent alerts, newest first, with their delivery state (SPEC §14)."""
        ensure_schema(self.store)  # (as every other call's session does)
        return stored_alerts.list_alerts(self.store, owner_type, owner_id, limit, offset)[0]

    def list_rate_limits(
        self,
        *,
        owner_type: str | None = None,
        owner_id: str | None = None,
        from_memory: bool = False,
        counters: CounterRegistry | None = None,
    ) -> list[RateLimitOut]:
        owner_id = owner_name(owner_type, owner_id)
        with self._session() as s:
            live = self.live_counters(from_memory, counters)
            return reports.rate_limits(s, owner_type=owner_type, owner_id=owner_id, counters=live)

    def usage(
        self,
        group_by: str = "virtual_key",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
    ) -> UsageOut:
        """Spend, tokens and requests between `start` (inclusive) and `end` (exclusive): each
        a datetime (naive: UTC) or an ISO 8601 / RFC 3339 text (`2026-12-01T00:00:00Z`)."""
        since, until = _moment(start, "start"), _moment(end, "end")
        with self._session() as s:
            return reports.usage(s, group_by, since, until)

    @staticmethod
    def new_key_value(prefix: str) -> str:
        return prefix + secrets.token_urlsafe(32)


def _moment(value: object, name: str) -> datetime | None:
    """A report's bound as given to the Python API; anything else refused, naming it."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())  # `Z` too, from Python 3.11
        except ValueError:
            pass
    raise InvalidRequest(
        f"{name} must be a datetime or an ISO 8601 date and time (2026-12-01T00:00:00Z), "
        f"not {value!r}",
        param=name,
    )


def _route_out(row: RouteRow) -> RouteOut:
    return RouteOut(
        id=row.id,
        name=row.name,
        targets=list(row.targets),
        strategy=row.strategy,  # type: ignore[arg-type]
        config_hash=row.config_hash,
        source=row.source,
        created_at=to_utc(row.created_at),  # SQLite gives them back without their zone
        updated_at=to_utc(row.updated_at),
    )


def _mark_in_redis(settings: BudgetSettings, budget_id: str, at: float) -> None:
    """A reset made without an engine (the CLI on the store): the instances sharing Redis take
    it at their next admission of the budget rather than when they next read it."""
    try:
        from budget_middleware.store.redis_counters import (  # the redis extra
            PREFIX,
            mark_key,
            mark_resets_now,
            mark_ttl_ms,
        )

        marks = {mark_key(PREFIX, "budget", budget_id): (at, mark_ttl_ms(settings))}
        mark_resets_now(settings.redis_url or "", settings.redis_timeout_seconds, marks)
    except Exception as exc:  # the reset stands; the instances take it within the cache TTL
        logger.warning("budget-middleware could not mark a reset in Redis: %s", exc)
