"""The two ways the CLI reaches the budgets, behind one interface.

`StoreClient` works on the store of `BUDGET_DATABASE_URL` through the Python management API;
`HttpClient` calls a running admin API (`--url`, `--admin-key`). Both answer the admin API's own
JSON shapes (SPEC §9: `{"virtual_key": {...}}`, `{"virtual_keys": [...], "count": n}`, ...), so
the commands format the same dicts whichever is used, and `--json` prints what the API answers.
Every failure is a `CliError` whose message is one line.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from budget_middleware.core.times import rfc3339

if TYPE_CHECKING:
    import httpx

    from budget_middleware.manage.manager import BudgetManager
    from budget_middleware.settings import BudgetSettings

Json = dict[str, Any]
Names = list[str]  # (in the clients, `list` is a method's name)


class CliError(Exception):
    """A failure the CLI reports on one line (`error: <message>`) before exiting with `code`.
    `status` is the HTTP status it stands for (404 for an unknown id), when there is one."""

    def __init__(self, message: str, *, status: int | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Kind:
    """A managed object: its command, its admin API path and envelope names, and its words."""

    command: str  # the CLI's group: "keys"
    path: str  # the admin API's collection: "/virtual-keys"
    one: str  # the envelope of one (and the manager's method suffix): "virtual_key"
    many: str  # the envelope of a list (and the manager's list suffix): "virtual_keys"
    what: str  # in messages: "virtual key"
    named: bool = False  # providers and tags: known by name, written by PUT


KINDS: dict[str, Kind] = {
    kind.command: kind
    for kind in (
        Kind("customers", "/customers", "customer", "customers", "customer"),
        Kind("teams", "/teams", "team", "teams", "team"),
        Kind("keys", "/virtual-keys", "virtual_key", "virtual_keys", "virtual key"),
        Kind("providers", "/providers", "provider", "providers", "provider", named=True),
        Kind("model-configs", "/model-configs", "model_config", "model_configs", "model config"),
        Kind("tags", "/tags", "tag", "tags", "tag", named=True),
        Kind("routes", "/routes", "route", "routes", "route"),
    )
}


class Client(Protocol):
    """What every command needs; each method answers as the admin API's route does."""

    def list(self, kind: Kind, query: Json) -> Json: ...
    def get(self, kind: Kind, ref: str) -> Json: ...
    def create(self, kind: Kind, body: Json) -> Json: ...
    def update(self, kind: Kind, ref: str, body: Json) -> Json: ...
    def put(self, kind: Kind, name: str, body: Json) -> Json: ...
    def delete(self, kind: Kind, ref: str) -> Json: ...
    def rotate_key(self, ref: str) -> Json: ...
    def budgets(self, query: Json) -> Json: ...
    def reset_budget(self, ref: str) -> Json: ...
    def usage(self, query: Json) -> Json: ...
    def alerts(self, query: Json) -> Json: ...
    def server_time(self) -> datetime | None: ...
    def apply_config(self, path: Path, ignored: Names, warnings: Names) -> dict[str, int]: ...
    def need_store(self) -> None: ...
    def close(self) -> None: ...


def _given(query: Json) -> Json:
    return {k: v for k, v in query.items() if v is not None}


def _now() -> str:
    return rfc3339(datetime.now(UTC))


# -- the store, directly -------------------------------------------------------------------


def shown_url(url: str) -> str:
    """A database URL as it may be printed: without its password."""
    from budget_middleware.settings import without_password

    return without_password(url)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite store's URL (relative to the working directory, as SQLite opens
    it); None for another database, an in-memory one, or a `file:` URI."""
    if not url.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


class StoreClient:
    """The management API on the store of the settings (`BUDGET_DATABASE_URL`)."""

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.where = f"the store at {shown_url(settings.database_url)}"
        self._manager: BudgetManager | None = None

    @property
    def manager(self) -> BudgetManager:
        if self._manager is None:
            from budget_middleware.manage.manager import BudgetManager
            from budget_middleware.store.database import Store

            self._manager = BudgetManager(Store(self.settings.database_url), self.settings)
        return self._manager

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from pydantic import BaseModel, ValidationError
        from sqlalchemy.exc import DataError, SQLAlchemyError

        from budget_middleware.exceptions import AdminError, ServiceUnavailable

        try:
            out = fn(*args, **kwargs)
        except AdminError as exc:
            raise CliError(exc.message, status=exc.status) from None
        except ValidationError as exc:
            raise CliError(describe_validation(exc), status=422) from None
        except DataError:
            raise CliError("a value is out of the range the store can hold", status=422) from None
        except (ServiceUnavailable, SQLAlchemyError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            detail = f" ({reason[0]})" if reason else ""
            raise CliError(f"{self.where} cannot be reached{detail}", status=503) from None
        if isinstance(out, BaseModel):
            from budget_middleware.manage.schemas import dump

            return dump(out)
        if isinstance(out, list):
            return [_plain(item) for item in out]
        return out

    def list(self, kind: Kind, query: Json) -> Json:
        fn = getattr(self.manager, f"list_{kind.many}")
        if kind.command == "model-configs":
            items, total = self._call(fn, **_given(query))
            return {kind.many: [_plain(i) for i in items], "total_count": total}
        items = self._call(fn, **_given(query))
        return {kind.many: items, "count": len(items)}

    def get(self, kind: Kind, ref: str) -> Json:
        return {kind.one: self._call(getattr(self.manager, f"get_{kind.one}"), ref)}

    def create(self, kind: Kind, body: Json) -> Json:
        return {kind.one: self._call(getattr(self.manager, f"create_{kind.one}"), body)}

    def update(self, kind: Kind, ref: str, body: Json) -> Json:
        return {kind.one: self._call(getattr(self.manager, f"update_{kind.one}"), ref, body)}

    def put(self, kind: Kind, name: str, body: Json) -> Json:
        return {kind.one: self._call(getattr(self.manager, f"put_{kind.one}"), name, body)}

    def delete(self, kind: Kind, ref: str) -> Json:
        self._call(getattr(self.manager, f"delete_{kind.one}"), ref)
        return {"deleted": True, "id": ref}

    def rotate_key(self, ref: str) -> Json:
        return {"virtual_key": self._call(self.manager.rotate_virtual_key, ref)}

    def budgets(self, query: Json) -> Json:
        items = self._call(self.manager.list_budgets, **_given(query))
        for item in items:  # held by requests in flight: the serving processes alone know it
            item["reserved"] = None
        return {"budgets": items, "count": len(items), "server_time": _now()}

    def reset_budget(self, ref: str) -> Json:
        return {"budget": self._call(self.manager.reset_budget, ref)}

    def usage(self, query: Json) -> Json:
        # RFC 3339 text, which the management API reads (`values.period` checked it)
        start, end = query.get("start"), query.get("end")
        out: Json = self._call(self.manager.usage, query["group_by"], start, end)
        return out

    def server_time(self) -> datetime | None:
        """None: this machine's clock (the store keeps no time of its own)."""
        return None

    def alerts(self, query: Json) -> Json:
        from budget_middleware.manage.owner_limits import ensure_schema
        from budget_middleware.store.alerts import list_alerts

        def listed(**given: Any) -> tuple[list[Json], int]:
            ensure_schema(self.manager.store)  # (a store of a release before alerts)
            return list_alerts(self.manager.store, **given)

        # `count`: every alert the filters match, as `GET /alerts` answers (the page's length,
        # 2 for `--limit 2`, where the admin API said 9 for the same store)
        found, total = self._call(listed, **_given(query))
        return {"alerts": found, "count": total}

    def apply_config(self, path: Path, ignored: Names, warnings: Names) -> dict[str, int]:
        """The file applied to the store; its entries by section (`ignored`: what of a
        LiteLLM file is not read; `warnings`: the apply's other warnings, for the CLI to
        print, not logged)."""
        from budget_middleware.exceptions import ConfigFileError
        from budget_middleware.manage.config_file import check_config_file, load_config_file

        settings = self.settings.model_copy(update={"config_file": path})
        store = self.manager.store
        try:
            # before anything is written, the schema included
            sections = check_config_file(path, ignored=ignored)
            self._call(store.create_schema)  # a fresh store, as the engine's start-up does
            self._call(load_config_file, store, settings, tell_ignored=False, warnings=warnings)
        except ConfigFileError as exc:
            raise CliError(config_message(str(exc))) from None
        return {name: len(entries) for name, entries in sections.items() if entries}

    def need_store(self) -> None:
        """Before a command that reads (or changes what must already exist): a store that is
        not there is refused, not made: a SQLite file that does not exist (it would be made,
        empty, where the command was run), or a database without the store's tables (the
        management API would create them)."""
        url = shown_url(self.settings.database_url)
        advice = (
            "Set BUDGET_DATABASE_URL to your store's URL, or --url to a running admin API; "
            "'create' and 'config apply' make a new store there"
        )
        path = sqlite_file(self.settings.database_url)
        if path is not None and not path.exists():
            raise CliError(f"no store at {url}: {path.absolute()} does not exist. {advice}")
        if not self._call(self._has_tables):
            raise CliError(
                f"no store at {url}: the database has no budget-middleware tables yet. {advice}"
            )

    def _has_tables(self) -> bool:
        from sqlalchemy import inspect

        from budget_middleware.store.tables import MetaRow

        return bool(inspect(self.manager.store.engine).has_table(MetaRow.__tablename__))

    def close(self) -> None:
        if self._manager is not None:
            self._manager.store.dispose()


def _plain(item: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(item, BaseModel):
        from budget_middleware.manage.schemas import dump

        return dump(item)
    return item


def describe_validation(exc: Any) -> str:
    """A pydantic ValidationError as the admin API words its 422: the first failing field."""
    from budget_middleware.manage.schemas import described, failures

    return described(failures(exc))


def config_message(message: str) -> str:
    """A config file error as the CLI says it: the file is an argument, not BUDGET_CONFIG_FILE."""
    prefix = "BUDGET_CONFIG_FILE "
    return "config file " + message[len(prefix) :] if message.startswith(prefix) else message


# -- a running admin API ---------------------------------------------------------------------


def _shown_admin_url(url: str) -> str:
    """`--url` as the CLI's messages show it: without the password of a proxy's basic auth
    (`https://ops:secret@host/budget-admin`), which a terminal or a CI log would keep."""
    import httpx

    try:
        parsed = httpx.URL(url)
        if not parsed.password:
            return url
        return str(parsed.copy_with(username=parsed.username, password="***"))
    except Exception:
        return url.rsplit("@", 1)[-1] if "@" in url else url


class HttpClient:
    """The admin API at `url` (where it is mounted, e.g. `http://host:8000/budget-admin`)."""

    def __init__(self, url: str, admin_key: str, *, timeout: float = 30.0) -> None:
        import httpx

        url = url.rstrip("/")
        self.url = _shown_admin_url(url)  # as messages name it
        try:
            self.http = httpx.Client(
                base_url=url,
                headers={"authorization": f"Bearer {admin_key}", "accept": "application/json"},
                timeout=timeout,
            )
        except httpx.InvalidURL as exc:  # not an HTTPError: it would be a traceback
            raise CliError(f"--url {self.url!r} is not a URL ({exc})", code=2) from None

    def _mount_hint(self) -> str:
        """Where `--url` should point, said after an admin app's "no such route"."""
        url = self.url.rstrip("/")
        if url.endswith("/ui"):  # the dashboard's address, as the README has it opened
            return f" (--url {self.url} is the dashboard's address: the admin API is at {url[:-3]})"
        return f" (is {self.url} where the admin API is mounted?)"

    def _send(
        self,
        method: str,
        path: str,
        envelope: str,
        query: Json | None = None,
        body: Any = None,
        *,
        wait: bool = False,
    ) -> Json:
        """The route's answer: a JSON object holding `envelope` (what the route names its
        answer: `virtual_keys`, `budget`, ...), else a CliError. `wait`: however long the
        server takes to answer, once the request is sent (its work goes on without us)."""
        import httpx

        timeout = self.http.timeout
        if wait:
            timeout = httpx.Timeout(timeout.connect, connect=timeout.connect, read=None)
        try:
            answer = self.http.request(
                method,
                path,
                params=_given(query or {}),
                json=body if body is not None else None,
                timeout=timeout,
            )
        except (httpx.ReadTimeout, httpx.WriteTimeout):
            # Sent, or partly: no answer is not "cannot be reached", and a write may be done
            after = timeout.read if timeout.read is not None else timeout.write
            made = (
                ""
                if method == "GET"
                else ": the change may have been made, look before trying again"
            )
            raise CliError(
                f"the admin API at {self.url} did not answer within {after:g} s{made}",
                status=504,
            ) from None
        except httpx.HTTPError as exc:
            reason = str(exc).strip() or type(exc).__name__
            raise CliError(
                f"the admin API at {self.url} cannot be reached ({reason})", status=503
            ) from None
        try:
            data = answer.json()
        except ValueError:
            data = None
        if answer.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and error.get("message"):
                message = str(error["message"])
                if error.get("code") == "route_not_found":  # inside the admin app, not its root
                    message += self._mount_hint()
            else:
                message = _page_text(answer)
                if answer.status_code == 404:
                    message += self._mount_hint()
            raise CliError(
                f"admin API answered {answer.status_code}: {message}", status=answer.status_code
            )
        if not isinstance(data, dict) or envelope not in data:
            what = "a JSON object" if not isinstance(data, dict) else repr(envelope)
            raise CliError(
                f"admin API answered {answer.status_code} without {what}: is {self.url} "
                "where the admin app is mounted?"
            )
        return data

    @staticmethod
    def _one(kind: Kind, ref: str) -> str:
        return f"{kind.path}/{_segment(ref)}"

    def list(self, kind: Kind, query: Json) -> Json:
        return self._send("GET", kind.path, kind.many, query)

    def get(self, kind: Kind, ref: str) -> Json:
        if kind.named:  # the admin API lists providers and tags; it has no route for one
            from budget_middleware.core.providers import stored_provider

            # a provider by any spelling of its one name, as the store finds it (`google`)
            name = stored_provider(ref) if kind.command == "providers" else ref
            for item in self.list(kind, {}).get(kind.many, []):
                if item.get(kind.one) == name:
                    return {kind.one: item}
            raise CliError(f"{kind.what} {ref!r} not found", status=404)
        return self._send("GET", self._one(kind, ref), kind.one)

    def create(self, kind: Kind, body: Json) -> Json:
        return self._send("POST", kind.path, kind.one, body=body)

    def update(self, kind: Kind, ref: str, body: Json) -> Json:
        return self._send("PUT", self._one(kind, ref), kind.one, body=body)

    def put(self, kind: Kind, name: str, body: Json) -> Json:
        return self._send("PUT", self._one(kind, name), kind.one, body=body)

    def delete(self, kind: Kind, ref: str) -> Json:
        return self._send("DELETE", self._one(kind, ref), "deleted")

    def rotate_key(self, ref: str) -> Json:
        return self._send("POST", f"/virtual-keys/{_segment(ref)}/rotate", "virtual_key")

    def budgets(self, query: Json) -> Json:
        """The server's live counters (`from_memory=true`, as the dashboard reads them): what is
        spent and not written yet, and what requests in flight hold."""
        return self._send("GET", "/budgets", "budgets", {**query, "from_memory": "true"})

    def reset_budget(self, ref: str) -> Json:
        return self._send("POST", f"/budgets/{_segment(ref)}/reset", "budget")

    def usage(self, query: Json) -> Json:
        return self._send("GET", "/usage", "usage", query)

    def alerts(self, query: Json) -> Json:
        return self._send("GET", "/alerts", "alerts", query)

    def server_time(self) -> datetime | None:
        """The server's time (`server_time` of `GET /budgets`, asked for one tag's budget at
        most), or None when it does not say."""
        answer = self._send("GET", "/budgets", "budgets", {"owner_type": "tag", "limit": 1})
        try:
            at = datetime.fromisoformat(str(answer.get("server_time")).replace("Z", "+00:00"))
        except ValueError:
            return None
        return at if at.tzinfo is not None else None

    def apply_config(self, path: Path, ignored: Names, warnings: Names) -> dict[str, int]:
        """The file's text to `POST /config/apply`: the server applies it to its store (its
        `${ENV_VAR}` references are the server's); its entries by section, as the server
        counted them (a check here would read `${ENV_VAR}` from this shell's environment), in
        `ignored` what of a LiteLLM file the server did not read, and in `warnings` the
        apply's warnings, the file named as the store's side names it."""
        from budget_middleware.exceptions import ConfigFileError
        from budget_middleware.manage.config_file import SENT, config_text

        try:
            text = config_text(path)  # as the store's side reads a file: UTF-16 too
        except ConfigFileError as exc:
            raise CliError(config_message(str(exc))) from None
        kind = "json" if path.suffix.lower() == ".json" else "yaml"
        body = {"text": text, "format": kind}
        # The server answers once the whole file is applied (a big one: minutes on SQLite)
        answer = self._send("POST", "/config/apply", "applied", body=body, wait=True)
        entries = answer.get("entries")
        told = answer.get("ignored")
        ignored += [str(part) for part in told] if isinstance(told, list) else []
        said = answer.get("warnings")
        sent, named = f"BUDGET_CONFIG_FILE {SENT}", f"BUDGET_CONFIG_FILE {str(path)!r}"
        warnings += [
            str(text).replace(sent, named, 1) if str(text).startswith(sent) else str(text)
            for text in (said if isinstance(said, list) else [])
        ]
        return {str(k): int(n) for k, n in entries.items()} if isinstance(entries, dict) else {}

    def need_store(self) -> None:
        """The server has its store."""

    def close(self) -> None:
        self.http.close()


def _segment(ref: str) -> str:
    """An id or a name as one segment of a path: its reserved characters quoted, and its dots
    too when it is only dots (`..`, `.`), which a URL reads as "up one level" or "here" (httpx
    removes them: `/customers/..` asked the admin app's root)."""
    text = quote(ref, safe="")
    return text.replace(".", "%2E") if not text.strip(".") else text


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _page_text(answer: httpx.Response) -> str:
    """What an error answer that is not the admin API's says, on one line: an HTML page's title
    (a proxy's or a server's error page, not its markup), else its text, whitespace collapsed,
    at most 200 characters; else the status's reason."""
    text = answer.text
    if "html" in answer.headers.get("content-type", "") or text.lstrip()[:1] == "<":
        found = _TITLE.search(text)
        text = html.unescape(found[1]) if found else ""
    return " ".join(text.split())[:200] or answer.reason_phrase
