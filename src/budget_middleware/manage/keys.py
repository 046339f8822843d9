"""Virtual keys: created with a value that is shown once, stored only as its SHA-256.

A key belongs to a team or to a customer (or to neither). Its provider configs say which providers
and models it may use, each with its own budgets and rate limit; in an update they are matched to
the existing ones by `id` or else by `provider`, and keep their usage.
"""

from __future__ import annotations

import hmac
import secrets

from sqlalchemy import func
from sqlmodel import Session, col, select

from budget_middleware.core.identity import KEY_BYTES, hash_key, key_value_problem
from budget_middleware.core.times import utc_or_none
from budget_middleware.exceptions import Conflict, InvalidRequest, NotFound
from budget_middleware.manage.owner_limits import (
    OwnerWriter,
    check_model_names,
    delete_limits,
    is_held,
    remember_deleted,
    write_limits,
)
from budget_middleware.manage.schemas import (
    KEY_VALUE_LENGTH,
    ProviderConfigIn,
    VirtualKeyCreate,
    VirtualKeyOut,
    VirtualKeyUpdate,
)
from budget_middleware.manage.views import Reader
from budget_middleware.store.tables import (
    CustomerRow,
    ModelConfigRow,
    ProviderConfigRow,
    TeamRow,
    VirtualKeyRow,
    utcnow,
)

_TAIL = 4  # the last characters people see of a key
_HIDDEN = 16  # ... only when at least this many others stay hidden


def display(value: str, prefix: str) -> str:
    """What people see of a key: the prefix and the last 4 characters, these only when at
    least 16 others stay hidden (a generated key hides 39; a chosen value of 8 characters
    showed 7 of them, `abc…efgh`, in every list, the dashboard and the CLI's tables)."""
    head = prefix if value.startswith(prefix) else ""
    secret = len(value) - len(head)
    return f"{head}…{value[-_TAIL:] if secret - _TAIL >= _HIDDEN else ''}"


class KeyWriter(OwnerWriter):
    def _new_value(self) -> str:
        return self.settings.key_prefix + secrets.token_urlsafe(KEY_BYTES)

    def _check_parents(self, s: Session, team_id: str | None, customer_id: str | None) -> None:
        if team_id is not None and not is_held(s, TeamRow, team_id):
            raise NotFound(f"team {team_id!r} not found", param="team_id")
        if customer_id is not None and not is_held(s, CustomerRow, customer_id):
            raise NotFound(f"customer {customer_id!r} not found", param="customer_id")

    def _set_value(self, s: Session, row: VirtualKeyRow, value: str) -> None:
        digest = hash_key(value)
        other = s.exec(select(VirtualKeyRow).where(VirtualKeyRow.key_hash == digest)).first()
        if other is not None and other.id != row.id:
            raise Conflict("this key value is already in use", param="value")
        admin_key = self.settings.admin_key  # the admin API would refuse it as a key's value
        if admin_key and hmac.compare_digest(value.encode(), admin_key.encode()):
            raise Conflict(
                "this key value is BUDGET_ADMIN_KEY, which a key may not be", param="value"
            )
        row.key_hash = digest
        row.key_display = display(value, self.settings.key_prefix)

    def _create_key(self, data: VirtualKeyCreate) -> VirtualKeyOut:
        expires_at = utc_or_none(data.expires_at)
        if expires_at is not None and expires_at <= utcnow() and self.origin.source != "config":
            # Its value would be handed out for nothing: every request refused 403
            # `virtual_key_expired` (a config file's key may have expired since it was written:
            # a file valid then stays valid, so a fresh store can still be started from it).
            raise InvalidRequest(
                "expires_at: is in the past, so the key could never be used; give a later "
                "time, or none for a key that never expires (an update may set a past time, "
                "to expire a key now)",
                param="expires_at",
            )
        value = data.value or self._new_value()
        with self._session() as s:
            self._unique_name(s, VirtualKeyRow, data.name, "virtual key", None)
            self._check_parents(s, data.team_id, data.customer_id)
            row = VirtualKeyRow(
                name=data.name,
                key_hash="",
                key_display="",
                team_id=data.team_id,
                customer_id=data.customer_id,
                is_active=data.is_active,
                expires_at=expires_at,
                tags=list(data.tags),
                calendar_aligned=data.calendar_aligned,
            )
            self._set_value(s, row, value)
            self.origin.stamp(row, created=True)
            s.add(row)
            write_limits(s, "virtual_key", row.id, data, calendar_aligned=row.calendar_aligned,
                         origin=self.origin)  # fmt: skip
            if data.provider_configs is not None:
                self._write_provider_configs(s, row, data.provider_configs)
            self._commit(s, "virtual key")
            return Reader(s).virtual_key(row, value=value)

    def _update_key(self, id_: str, data: VirtualKeyUpdate) -> VirtualKeyOut:
        given = data.model_fields_set
        with self._session() as s:
            row = self._get(s, VirtualKeyRow, id_, "virtual key", held=True)
            team_id = data.team_id if "team_id" in given else row.team_id
            customer_id = data.customer_id if "customer_id" in given else row.customer_id
            if "team_id" in given and data.team_id is not None and "customer_id" not in given:
                customer_id = None  # moving a key into a team takes it out of its customer
            if "customer_id" in given and data.customer_id is not None and "team_id" not in given:
                team_id = None
            if team_id is not None and customer_id is not None:
                raise InvalidRequest(
                    "a virtual key belongs to a team or to a customer, not both", param="team_id"
                )
            # A parent the key keeps that is gone (deleted as the key was made in it, the two at
            # once) is left, as its delete leaves its keys: the update is not refused 404 for a
            # team it does not name, which no update could then change.
            if "team_id" not in given and team_id is not None and not s.get(TeamRow, team_id):
                team_id = None
            if "customer_id" not in given and customer_id and not s.get(CustomerRow, customer_id):
                customer_id = None
            self._check_parents(s, team_id, customer_id)
            row.team_id, row.customer_id = team_id, customer_id
            if data.is_active is not None:
                row.is_active = data.is_active
            if "expires_at" in given:
                row.expires_at = utc_or_none(data.expires_at)
            if data.tags is not None:
                row.tags = list(data.tags)
            self._update_owner(s, "virtual_key", row, data)
            if data.provider_configs is not None:
                self._write_provider_configs(s, row, data.provider_configs)
            self._commit(s, "virtual key")
            return Reader(s).virtual_key(row)

    def _write_provider_configs(
        self, s: Session, key: VirtualKeyRow, configs: list[ProviderConfigIn]
    ) -> None:
        for i, config in enumerate(configs):
            for field in ("allowed_models", "blocked_models"):
                names = getattr(config, field)
                check_model_names(names, "provider_configs", f"provider_configs[{i}].{field}")
        providers = [c.provider for c in configs]
        for name in providers:
            if providers.count(name) > 1:
                raise Conflict(f"two provider configs for {name!r}", param="provider_configs")
        existing = list(
            s.exec(select(ProviderConfigRow).where(ProviderConfigRow.virtual_key_id == key.id))
        )
        by_id = {p.id: p for p in existing}
        by_provider = {p.provider: p for p in existing}
        kept: set[str] = set()
        written: list[tuple[ProviderConfigIn, ProviderConfigRow, set[str]]] = []
        for config in configs:
            if config.id is not None and config.id not in by_id:
                raise NotFound(f"provider config {config.id!r} is not one of this key's")
            if config.id is not None and config.id in kept:  # the second made a new one
                raise Conflict(
                    f"provider config {config.id!r} is given twice", param="provider_configs"
                )
            row = by_id.get(config.id or "") or by_provider.get(config.provider)
            given = set(config.model_fields_set)
            if row is None or row.id in kept:
                row = ProviderConfigRow(virtual_key_id=key.id, provider=config.provider)
                given |= {"allowed_models", "blocked_models"}  # new: the defaults
            kept.add(row.id)
            written.append((config, row, given))
        # Those left out go first: a config renamed to the provider of one left out (`openai`
        # made `anthropic`, the key's `anthropic` dropped) was refused as a duplicate.
        gone = [p for p in existing if p.id not in kept]
        delete_limits(s, "provider_config", [p.id for p in gone])
        for row in gone:
            s.delete(row)
        # Those renamed let go of their provider first: configs swapped by id (`openai` made
        # `anthropic` and `anthropic` made `openai`) met each other's at the store's unique key.
        moving = [r for c, r, _ in written if r.id in by_id and r.provider != c.provider]
        if len(moving) > 1:
            for row in moving:
                row.provider = f"~{row.id}"  # for the moment: a name no other config holds
        s.flush()
        for config, row, given in written:
            row.provider = config.provider
            # A config matched to the key's own keeps the model lists it is not sent with (as
            # an owner keeps the budgets it is not sent with): an update naming only the
            # provider used to reset `allowed_models` to ["*"], opening every model.
            if "allowed_models" in given:
                row.allowed_models = list(config.allowed_models)
            if "blocked_models" in given:
                row.blocked_models = list(config.blocked_models)
            row.updated_at = utcnow()
            s.add(row)
            write_limits(s, "provider_config", row.id, config,
                         calendar_aligned=key.calendar_aligned, origin=self.origin)  # fmt: skip
        s.flush()

    def rotate_virtual_key(self, id_: str) -> VirtualKeyOut:
        """A new value for the key, returned once; the old value stops working."""
        with self._session() as s:
            row = self._get(s, VirtualKeyRow, id_, "virtual key", held=True)
            value = self._new_value()
            self._set_value(s, row, value)
            row.updated_at = utcnow()
            s.add(row)
            s.commit()
            return Reader(s).virtual_key(row, value=value)

    def set_virtual_key_value(self, id_: str, value: str) -> None:
        """Give the key a value of your choosing (the config file's `value`), of as many
        characters as a create's `value` may have."""
        shortest, longest = KEY_VALUE_LENGTH
        if not isinstance(value, str) or not shortest <= len(value) <= longest:
            raise InvalidRequest(
                f"value: a key's value has {shortest} to {longest} characters", param="value"
            )
        problem = key_value_problem(value)
        if problem is not None:
            raise InvalidRequest(f"value: {problem}", param="value")
        with self._session() as s:
            row = self._get(s, VirtualKeyRow, id_, "virtual key", held=True)
            self._set_value(s, row, value)
            row.updated_at = utcnow()
            s.add(row)
            self._commit(s, "virtual key")

    def delete_virtual_key(self, id_: str) -> None:
        with self._session() as s:
            row = self._get(s, VirtualKeyRow, id_, "virtual key", held=True)
            policies = s.exec(
                select(ProviderConfigRow).where(ProviderConfigRow.virtual_key_id == id_)
            ).all()
            rules = s.exec(
                select(ModelConfigRow).where(
                    ModelConfigRow.scope == "virtual_key", ModelConfigRow.scope_id == id_
                )
            ).all()
            delete_limits(s, "provider_config", [p.id for p in policies])
            delete_limits(s, "model_config", [r.id for r in rules])
            delete_limits(s, "virtual_key", [id_])
            for child in [*policies, *rules]:
                s.delete(child)
            remember_deleted(s, "virtual_key", row.id, row.name, row)
            s.delete(row)
            s.commit()

    def get_virtual_key(self, id_: str) -> VirtualKeyOut:
        with self._session() as s:
            return Reader(s).virtual_key(self._get(s, VirtualKeyRow, id_, "virtual key"))

    def list_virtual_keys(
        self, team_id: str | None = None, customer_id: str | None = None
    ) -> list[VirtualKeyOut]:
        with self._session() as s:
            query = select(VirtualKeyRow).order_by(col(VirtualKeyRow.name))
            if team_id is not None:
                query = query.where(VirtualKeyRow.team_id == team_id)
            if customer_id is not None:
                # The key's customer as the store reads it for its limits (its own, else its
                # team's; the API refuses a key with both). Only the keys attached to the
                # customer itself were listed, none of its teams'.
                teams = select(TeamRow.customer_id).where(col(TeamRow.id) == VirtualKeyRow.team_id)
                owner = func.coalesce(VirtualKeyRow.customer_id, teams.scalar_subquery())
                query = query.where(owner == customer_id)
            reader = Reader(s)
            return [reader.virtual_key(r) for r in s.exec(query).all()]

    def find_virtual_key(self, value: str) -> str | None:
        """The id of the key with this value, if any (looked up by its hash)."""
        with self._session() as s:
            digest = hash_key(value)
            row = s.exec(select(VirtualKeyRow).where(VirtualKeyRow.key_hash == digest)).first()
            return row.id if row else None
